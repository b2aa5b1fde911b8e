//! Fixtures for the end-to-end tests: a real registry (`docker-registry`), OCI images built
//! here from a busybox-static rootfs and pushed with `skopeo`, and a real `hyperbox-node`
//! daemon in its own state dir, socket and cgroup parent.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub mod kube;
pub mod operator_fixtures;

/// A built binary of the workspace (`cargo build` puts them next to the test's deps dir).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

/// A port nobody listens on right now. Another process may take it before ours binds it: start
/// servers through [`spawn_on_free_port`], which retries on another port when that happens.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start a server on a free loopback port: `spawn` gets the port and starts the process. When
/// the process exits before it listens (the port was taken between choosing and binding), it
/// is tried again on another port.
pub fn spawn_on_free_port(
    what: &str,
    mut spawn: impl FnMut(u16) -> Result<Child>,
) -> Result<(Child, u16)> {
    for _ in 0..5 {
        let port = free_port();
        let mut child = spawn(port)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // Ours, not someone else's that won the port: ours is still running.
                std::thread::sleep(Duration::from_millis(20));
                if child.try_wait()?.is_none() {
                    return Ok((child, port));
                }
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("timed out waiting for {what} to listen on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    bail!("{what} could not bind a free port in 5 tries")
}

/// The address a server bound to port 0 reports in its log: the `addr=` of the first line
/// that contains `message` (tracing's text format).
pub fn logged_addr(log: &str, message: &str) -> Option<String> {
    log.lines()
        .filter(|l| l.contains(message))
        .find_map(|l| l.split("addr=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
        .filter(|a| !a.is_empty())
}

pub fn random_suffix() -> String {
    let mut b = [0u8; 4];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    hex::encode(b)
}

/// Wait until `get` returns a value that satisfies `pred`; on timeout the error carries
/// `context` of the last value seen (Null when none).
pub fn wait_for_value(
    timeout: Duration,
    what: &str,
    mut get: impl FnMut() -> Option<Value>,
    pred: impl Fn(&Value) -> bool,
    context: impl FnOnce(&Value) -> String,
) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(timeout, what, || {
        let v = get()?;
        last = v.clone();
        pred(&v).then_some(v)
    })
    .with_context(|| context(&last))
}

pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A real OCI registry on a free loopback port, optionally with htpasswd auth.
pub struct Registry {
    child: Child,
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub creds: Option<(String, String)>,
    /// With TLS: the CA certificate (PEM) that signed the registry's certificate.
    pub ca: Option<PathBuf>,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .context("run openssl")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Registry {
    pub fn start(auth: bool) -> Result<Registry> {
        Self::start_with(auth, false)
    }

    /// A registry serving HTTPS with a certificate from a throwaway CA.
    pub fn start_tls() -> Result<Registry> {
        Self::start_with(false, true)
    }

    fn start_with(auth: bool, tls: bool) -> Result<Registry> {
        let dir = tempfile::tempdir()?;
        let mut auth_cfg = String::new();
        let creds = if auth {
            let out = Command::new("htpasswd")
                .args(["-Bbn", "tester", "s3cret-pass"])
                .output()
                .context("run htpasswd (apache2-utils)")?;
            fs::write(dir.path().join("htpasswd"), &out.stdout)?;
            auth_cfg = format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            );
            Some(("tester".to_string(), "s3cret-pass".to_string()))
        } else {
            None
        };
        let mut tls_cfg = String::new();
        let ca = if tls {
            let d = dir.path();
            openssl(
                d,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=hyperbox-test-ca",
                ],
            )?;
            openssl(
                d,
                &[
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-nodes",
                    "-keyout",
                    "srv.key",
                    "-out",
                    "srv.csr",
                    "-subj",
                    "/CN=127.0.0.1",
                ],
            )?;
            fs::write(
                d.join("ext.cnf"),
                "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
            )?;
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    "srv.csr",
                    "-CA",
                    "ca.crt",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    "srv.crt",
                    "-days",
                    "2",
                    "-extfile",
                    "ext.cnf",
                ],
            )?;
            tls_cfg = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                d.join("srv.crt").display(),
                d.join("srv.key").display()
            );
            Some(d.join("ca.crt"))
        } else {
            None
        };
        let (child, port) = spawn_on_free_port("docker-registry", |port| {
            let config = format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{tls_cfg}{auth_cfg}",
                dir.path().join("data").display()
            );
            fs::write(dir.path().join("config.yml"), config)?;
            Command::new("docker-registry")
                .arg("serve")
                .arg(dir.path().join("config.yml"))
                .stdout(Stdio::null())
                .stderr(fs::File::create(dir.path().join("registry.log"))?)
                .spawn()
                .context("start docker-registry")
        })?;
        Ok(Registry {
            child,
            dir,
            addr: format!("127.0.0.1:{port}"),
            creds,
            ca,
        })
    }

    /// Push an OCI layout with skopeo; returns the manifest digest in the registry.
    pub fn push(&self, layout: &Path, tag: &str, repo: &str) -> Result<String> {
        self.push_with(layout, tag, repo, &[])
    }

    /// `push` with extra skopeo arguments (`--all` for a multi-platform index).
    pub fn push_with(
        &self,
        layout: &Path,
        tag: &str,
        repo: &str,
        extra: &[&str],
    ) -> Result<String> {
        let digest_file = layout.join("pushed.digest");
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false", "--digestfile"])
            .arg(&digest_file)
            .args(extra);
        if let Some((u, p)) = &self.creds {
            cmd.arg(format!("--dest-creds={u}:{p}"));
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}:{tag}", self.addr))
            .output()
            .context("run skopeo")?;
        if !out.status.success() {
            bail!(
                "skopeo copy failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(fs::read_to_string(digest_file)?.trim().to_string())
    }

    /// Where the registry stores a blob's bytes (to corrupt it on purpose).
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// A docker config.json with this registry's credentials.
    pub fn write_auth_file(&self, path: &Path) -> Result<()> {
        let (u, p) = self.creds.clone().context("registry has no auth")?;
        let b64 = base64_encode(format!("{u}:{p}").as_bytes());
        fs::write(
            path,
            serde_json::to_vec(&json!({"auths": {self.addr.clone(): {"auth": b64}}}))?,
        )?;
        Ok(())
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = ((b[0] as u32) << 16) | ((b[1] as u32) << 8) | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Layer tarballs of one image, with how each is compressed in the registry.
pub type Layers = Vec<(Vec<u8>, Compress)>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Compress {
    None,
    Gzip,
    Zstd,
}

/// A layer tarball under construction. Raw entry names are written byte for byte so tests can
/// build the malicious layers (`..`, absolute paths) that well-behaved tools refuse to make.
pub struct Layer {
    tar: tar::Builder<Vec<u8>>,
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

impl Layer {
    pub fn new() -> Layer {
        let mut tar = tar::Builder::new(Vec::new());
        tar.mode(tar::HeaderMode::Deterministic);
        Layer { tar }
    }

    fn header(name: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        let bytes = name.as_bytes();
        assert!(bytes.len() < 100, "test entry names must be short");
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name = [0; 100];
        gnu.name[..bytes.len()].copy_from_slice(bytes);
        h.set_cksum();
        h
    }

    pub fn dir(mut self, name: &str, mode: u32) -> Layer {
        let h = Self::header(name, tar::EntryType::Directory, 0, mode);
        self.tar.append(&h, std::io::empty()).unwrap();
        self
    }

    pub fn file(mut self, name: &str, data: &[u8], mode: u32) -> Layer {
        let h = Self::header(name, tar::EntryType::Regular, data.len() as u64, mode);
        self.tar.append(&h, data).unwrap();
        self
    }

    /// A regular file entry that declares `size` bytes of zeros (streamed, not held in memory).
    pub fn big_file(mut self, name: &str, size: u64) -> Layer {
        let h = Self::header(name, tar::EntryType::Regular, size, 0o644);
        self.tar
            .append(&h, std::io::Read::take(std::io::repeat(0), size))
            .unwrap();
        self
    }

    fn link_entry(mut self, name: &str, target: &str, kind: tar::EntryType) -> Layer {
        let mut h = Self::header(name, kind, 0, 0o777);
        let t = target.as_bytes();
        let gnu = h.as_gnu_mut().unwrap();
        gnu.linkname = [0; 100];
        gnu.linkname[..t.len()].copy_from_slice(t);
        h.set_cksum();
        self.tar.append(&h, std::io::empty()).unwrap();
        self
    }

    pub fn symlink(self, name: &str, target: &str) -> Layer {
        self.link_entry(name, target, tar::EntryType::Symlink)
    }

    pub fn hardlink(self, name: &str, target: &str) -> Layer {
        self.link_entry(name, target, tar::EntryType::Link)
    }

    pub fn char_device(mut self, name: &str, major: u32, minor: u32) -> Layer {
        let mut h = Self::header(name, tar::EntryType::Char, 0, 0o666);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.tar.append(&h, std::io::empty()).unwrap();
        self
    }

    pub fn finish(self) -> Vec<u8> {
        self.tar.into_inner().unwrap()
    }
}

/// The busybox-static binary and its applet links: a small but real userland.
pub fn busybox_layer() -> Layer {
    let busybox = fs::read("/bin/busybox").expect("busybox-static is installed (/bin/busybox)");
    let mut l = Layer::new()
        .dir("bin/", 0o755)
        .dir("etc/", 0o755)
        .dir("tmp/", 0o1777)
        .dir("proc/", 0o755)
        .dir("sys/", 0o755)
        .dir("dev/", 0o755)
        .file("bin/busybox", &busybox, 0o755)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
            0o644,
        )
        .file("etc/group", b"root:x:0:\napp:x:1000:\n", 0o644);
    for applet in [
        "sh", "ls", "cat", "echo", "sleep", "touch", "rm", "test", "true", "false", "dd", "head",
        "tr", "date", "id", "mkdir", "wc", "env", "grep", "seq", "pwd", "ps", "kill", "stat",
        "httpd", "nc", "wget", "hostname", "mount", "yes",
    ] {
        l = l.symlink(&format!("bin/{applet}"), "busybox");
    }
    l
}

/// An image config as JSON.
pub fn image_config(entrypoint: &[&str], cmd: &[&str], diff_ids: &[String]) -> Value {
    json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": if entrypoint.is_empty() { Value::Null } else { json!(entrypoint) },
            "Cmd": cmd,
            "Env": ["PATH=/bin"],
            "WorkingDir": "/",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn write_blob(layout: &Path, data: &[u8]) -> Result<String> {
    let hex = sha256_hex(data);
    let p = layout.join("blobs/sha256").join(&hex);
    fs::create_dir_all(p.parent().unwrap())?;
    fs::write(p, data)?;
    Ok(format!("sha256:{hex}"))
}

/// Write an OCI image layout (`oci-layout`, `index.json`, blobs) for `layers` under `layout`,
/// tagged `tag`. Returns the manifest digest.
pub fn write_layout(
    layout: &Path,
    tag: &str,
    layers: Layers,
    entrypoint: &[&str],
    cmd: &[&str],
) -> Result<String> {
    fs::create_dir_all(layout.join("blobs/sha256"))?;
    fs::write(
        layout.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, compress) in layers {
        diff_ids.push(format!("sha256:{}", sha256_hex(&tar)));
        let (data, mt) = match compress {
            Compress::None => (tar, "application/vnd.oci.image.layer.v1.tar"),
            Compress::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&tar)?;
                (e.finish()?, "application/vnd.oci.image.layer.v1.tar+gzip")
            }
            Compress::Zstd => (
                zstd::encode_all(&tar[..], 3)?,
                "application/vnd.oci.image.layer.v1.tar+zstd",
            ),
        };
        let digest = write_blob(layout, &data)?;
        descs.push(json!({"mediaType": mt, "digest": digest, "size": data.len()}));
    }
    let config = serde_json::to_vec(&image_config(entrypoint, cmd, &diff_ids))?;
    let config_digest = write_blob(layout, &config)?;
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
        "layers": descs,
    }))?;
    let manifest_digest = write_blob(layout, &manifest)?;
    write_layout_index(
        layout,
        tag,
        "application/vnd.oci.image.manifest.v1+json",
        &manifest_digest,
        manifest.len(),
    )?;
    Ok(manifest_digest)
}

/// The layout's `index.json`: one entry, tagged `tag`, pointing at a manifest or an index.
fn write_layout_index(
    layout: &Path,
    tag: &str,
    media_type: &str,
    digest: &str,
    size: usize,
) -> Result<()> {
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": media_type,
            "digest": digest,
            "size": size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

/// Write a multi-platform OCI layout: one image per `(architecture, layers)`, under one image
/// index tagged `tag`. Push it with `skopeo copy --all`.
pub fn write_multiarch_layout(
    layout: &Path,
    tag: &str,
    images: Vec<(&str, Layers)>,
    cmd: &[&str],
) -> Result<()> {
    let mut entries = Vec::new();
    for (arch, layers) in images {
        // Reuse the single-image writer, then lift its manifest into our index.
        let manifest_digest = write_layout(layout, tag, layers, &[], cmd)?;
        let manifest = fs::read(
            layout
                .join("blobs/sha256")
                .join(manifest_digest.trim_start_matches("sha256:")),
        )?;
        let mut m: Value = serde_json::from_slice(&manifest)?;
        // Each variant's config must carry its own architecture.
        let cfg_digest = m["config"]["digest"].as_str().unwrap().to_string();
        let mut cfg: Value = serde_json::from_slice(&fs::read(
            layout
                .join("blobs/sha256")
                .join(cfg_digest.trim_start_matches("sha256:")),
        )?)?;
        cfg["architecture"] = json!(arch);
        let cfg_bytes = serde_json::to_vec(&cfg)?;
        let new_cfg = write_blob(layout, &cfg_bytes)?;
        m["config"]["digest"] = json!(new_cfg);
        m["config"]["size"] = json!(cfg_bytes.len());
        let mbytes = serde_json::to_vec(&m)?;
        let mdigest = write_blob(layout, &mbytes)?;
        entries.push(json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": mdigest,
            "size": mbytes.len(),
            "platform": {"architecture": arch, "os": "linux"},
        }));
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": entries,
    }))?;
    let index_digest = write_blob(layout, &index)?;
    write_layout_index(
        layout,
        tag,
        "application/vnd.oci.image.index.v1+json",
        &index_digest,
        index.len(),
    )
}

/// Build an image from layers and push it; returns (reference by tag, manifest digest).
pub fn push_image(
    reg: &Registry,
    repo: &str,
    tag: &str,
    layers: Layers,
    entrypoint: &[&str],
    cmd: &[&str],
) -> Result<(String, String)> {
    let dir = tempfile::tempdir()?;
    write_layout(dir.path(), tag, layers, entrypoint, cmd)?;
    let digest = reg.push(dir.path(), tag, repo)?;
    Ok((format!("{}/{repo}:{tag}", reg.addr), digest))
}

/// A busybox image in `reg` (`<addr>/busybox:1`).
pub fn push_busybox(reg: &Registry) -> Result<String> {
    Ok(push_image(
        reg,
        "busybox",
        "1",
        vec![(busybox_layer().finish(), Compress::Gzip)],
        &[],
        &["sh"],
    )?
    .0)
}

/// A running `hyperbox-node serve` with its own state dir, socket and cgroup parent.
pub struct Node {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state: PathBuf,
    pub cgroup_parent: String,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Node {
    pub fn start(extra: &[&str]) -> Result<Node> {
        Self::start_with_env(extra, &[])
    }

    pub fn start_with_env(extra: &[&str], env: &[(&str, &str)]) -> Result<Node> {
        let dir = tempfile::Builder::new().prefix("hbnode").tempdir()?;
        let mut n = Node {
            child: None,
            socket: dir.path().join("node.sock"),
            state: dir.path().join("state"),
            cgroup_parent: format!("/hyperbox-test-{}", random_suffix()),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            dir,
        };
        n.spawn()?;
        Ok(n)
    }

    pub fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))?;
        let child = Command::new(bin("hyperbox-node"))
            .arg("--socket")
            .arg(&self.socket)
            .arg("serve")
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--run-dir")
            .arg(self.dir.path().join("run"))
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .args(&self.extra)
            .env(
                "RUST_LOG",
                "info,hyperbox_node=debug,libcgroups=error,libcontainer=warn",
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start hyperbox-node")?;
        self.child = Some(child);
        let sock = self.socket.clone();
        wait_until(Duration::from_secs(30), "node socket", || {
            std::os::unix::net::UnixStream::connect(&sock).ok()
        })
        .with_context(|| self.daemon_log())?;
        Ok(())
    }

    /// Pid of the running daemon.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait until `workload`'s container log (`logs WORKLOAD`) contains `text`.
    pub fn wait_for_log(&self, workload: &str, text: &str, timeout: Duration) -> Result<()> {
        wait_until(timeout, &format!("{workload} logging {text:?}"), || {
            let out = self.cli(&["logs", workload]);
            String::from_utf8_lossy(&out.stdout)
                .contains(text)
                .then_some(())
        })
    }

    /// Run the CLI against this node.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("hyperbox-node"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run hyperbox-node client")
    }

    /// The v2 directory of a container of this node (its cgroup parent for ""): under the
    /// unified tree of a hybrid host, or the root of a pure v2 host; none without a v2 tree.
    pub fn v2_dir(&self, container: &str) -> Option<PathBuf> {
        Some(
            v2_root()?
                .join(self.cgroup_parent.trim_start_matches('/'))
                .join(container),
        )
    }

    /// `node -o json`: capacity, allocations, pressure, features; panics when it fails.
    pub fn node_json(&self) -> Value {
        let out = self.cli(&["node", "-o", "json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Apply YAML text; panics with the output when it fails.
    pub fn apply(&self, yaml: &str) -> Output {
        let f = self
            .dir
            .path()
            .join(format!("apply-{}.yaml", random_suffix()));
        fs::write(&f, yaml).unwrap();
        self.cli(&["apply", "--no-wait", "-f", f.to_str().unwrap()])
    }

    /// The status of workload `name` (namespace default) straight from the node's API: fast
    /// enough to sample every few milliseconds.
    pub fn status_now(&self, name: &str) -> Option<Value> {
        let out = http_over_unix(
            &self.socket,
            "GET",
            &format!("/v1/workloads/default/{name}"),
            "",
        );
        if !out.starts_with("HTTP/1.1 200") {
            return None;
        }
        serde_json::from_str(out.split("\r\n\r\n").nth(1)?).ok()
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        let out = self.cli(&["get", name, "-o", "json"]);
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn wait_for(
        &self,
        name: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        wait_for_value(
            timeout,
            what,
            || self.get(name),
            pred,
            |last| {
                format!(
                    "last status of {name}: {last:#}\ndaemon log:\n{}",
                    tail(&self.daemon_log(), 4000)
                )
            },
        )
    }

    /// Mount points under this node's state dir.
    pub fn mounts(&self) -> Vec<String> {
        let state = self.state.to_string_lossy().to_string();
        fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(|s| s.to_string()))
            .filter(|m| m.starts_with(&state))
            .collect()
    }

    /// cgroup directories of this node's containers, over all hierarchies.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let rel = self.cgroup_parent.trim_start_matches('/');
        for c in fs::read_dir("/sys/fs/cgroup").unwrap().flatten() {
            if let Ok(entries) = fs::read_dir(c.path().join(rel)) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        out.push(e.path());
                    }
                }
            }
        }
        out.sort();
        out
    }

    /// Pids of processes inside this node's containers (from the pids cgroups).
    pub fn container_pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for cg in self.cgroups() {
            if let Ok(t) = fs::read_to_string(cg.join("cgroup.procs")) {
                pids.extend(t.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
        }
        pids.sort();
        pids.dedup();
        pids
    }
}

/// The cgroup v2 tree: the unified tree of a hybrid host or the root of a pure v2 host; none
/// without one.
pub fn v2_root() -> Option<PathBuf> {
    if fs::metadata("/sys/fs/cgroup/cgroup.controllers").is_ok() {
        Some(PathBuf::from("/sys/fs/cgroup"))
    } else if fs::metadata("/sys/fs/cgroup/unified/cgroup.controllers").is_ok() {
        Some(PathBuf::from("/sys/fs/cgroup/unified"))
    } else {
        None
    }
}

pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        s
    } else {
        let mut i = s.len() - n;
        while !s.is_char_boundary(i) {
            i += 1;
        }
        &s[i..]
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Tests that care about orderly deletion do it themselves; here the daemon goes away and
        // whatever is left (containers keep running by design) is torn down by hand.
        self.kill9();
        for pid in self.container_pids() {
            // SAFETY: plain kill.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut mounts = self.mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let c = std::ffi::CString::new(m).unwrap();
            // SAFETY: umount2 with a valid C string.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        // A cgroup can only go once its last process has exited, a moment after SIGKILL:
        // retry for up to 2 s rather than leak it.
        let rel = self.cgroup_parent.trim_start_matches('/').to_string();
        let parents = || -> Vec<PathBuf> {
            fs::read_dir("/sys/fs/cgroup")
                .unwrap()
                .flatten()
                .map(|c| c.path().join(&rel))
                .filter(|p| p.exists())
                .collect()
        };
        for _ in 0..20 {
            for cg in self.cgroups() {
                let _ = fs::remove_dir(cg);
            }
            for p in parents() {
                let _ = fs::remove_dir(p);
            }
            if parents().is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A Workload document.
pub fn workload(name: &str, image: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  image: {image}\n{extra_spec}"
    )
}

/// Container ids of every replica in a workload status (`get -o json`).
pub fn container_ids(status: &Value) -> Vec<String> {
    status["replicas"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|r| r["containerId"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// This machine's memory (`MemTotal` of /proc/meminfo), in bytes: tests size `--reserve` from
/// it to give a node an exact allocatable.
pub fn mem_total() -> u64 {
    let text = fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal in /proc/meminfo");
    kb * 1024
}

/// A real Git remote (a bare repository) and a working clone to commit and push from.
pub struct GitRepo {
    pub dir: tempfile::TempDir,
    pub bare: PathBuf,
    pub work: PathBuf,
}

fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "HyperBox Test")
        .env("GIT_AUTHOR_EMAIL", "test@hyperbox.invalid")
        .env("GIT_COMMITTER_NAME", "HyperBox Test")
        .env("GIT_COMMITTER_EMAIL", "test@hyperbox.invalid")
        .output()
        .context("run git")?;
    if !out.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl GitRepo {
    pub fn new() -> Result<GitRepo> {
        let dir = tempfile::Builder::new().prefix("hbgit").tempdir()?;
        let bare = dir.path().join("remote.git");
        let work = dir.path().join("work");
        git(
            dir.path(),
            &["init", "-q", "--bare", "-b", "main", bare.to_str().unwrap()],
        )?;
        git(
            dir.path(),
            &["init", "-q", "-b", "main", work.to_str().unwrap()],
        )?;
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()])?;
        Ok(GitRepo { dir, bare, work })
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    pub fn write(&self, path: &str, content: &str) {
        let p = self.work.join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    pub fn remove(&self, path: &str) {
        fs::remove_file(self.work.join(path)).unwrap();
    }

    /// Commit everything and push; returns the commit id.
    pub fn commit_push(&self, msg: &str) -> String {
        git(&self.work, &["add", "-A"]).unwrap();
        git(&self.work, &["commit", "-q", "--allow-empty", "-m", msg]).unwrap();
        git(&self.work, &["push", "-q", "origin", "main"]).unwrap();
        git(&self.work, &["rev-parse", "HEAD"]).unwrap()
    }

    pub fn git(&self, args: &[&str]) -> Result<String> {
        git(&self.work, args)
    }
}

/// `git daemon` serving a directory of repositories over git:// on a free port.
pub struct GitDaemon {
    child: Child,
    pub port: u16,
    base: PathBuf,
}

impl GitDaemon {
    pub fn start(base: &Path, port: Option<u16>) -> Result<GitDaemon> {
        use std::os::unix::process::CommandExt;
        // Its own process group: `git daemon` runs git-daemon as a child, and stopping the
        // server must stop both.
        let spawn = |port: u16| {
            Command::new("git")
                .process_group(0)
                .arg("daemon")
                .arg("--reuseaddr")
                .arg("--export-all")
                .arg("--listen=127.0.0.1")
                .arg(format!("--port={port}"))
                .arg(format!("--base-path={}", base.display()))
                .arg(base)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start git daemon")
        };
        let (child, port) = match port {
            // A restart keeps its port (clients know it); --reuseaddr makes that safe.
            Some(port) => {
                let child = spawn(port)?;
                wait_until(Duration::from_secs(10), "git daemon", || {
                    std::net::TcpStream::connect(("127.0.0.1", port)).ok()
                })?;
                (child, port)
            }
            None => spawn_on_free_port("git daemon", spawn)?,
        };
        Ok(GitDaemon {
            child,
            port,
            base: base.to_path_buf(),
        })
    }

    pub fn stop(&mut self) {
        // SAFETY: signalling the process group we created.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        *self = GitDaemon::start(&self.base.clone(), Some(self.port))?;
        Ok(())
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Stop process `pid` (SIGSTOP: its sockets still accept, nothing answers, as a hung
/// daemon); it continues when the guard is dropped, also when the test fails.
pub fn pause(pid: i32) -> Paused {
    assert_eq!(
        unsafe { libc::kill(pid, libc::SIGSTOP) },
        0,
        "SIGSTOP {pid}"
    );
    Paused(pid)
}

pub struct Paused(i32);

impl Drop for Paused {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A TCP proxy that can be frozen: while frozen, bytes in both directions are held (the
/// connections stay open and nothing answers), as in a partition that drops packets. New
/// connections are accepted and held too.
pub struct FreezableProxy {
    pub addr: String,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FreezableProxy {
    pub fn start(target: &str) -> Result<FreezableProxy> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let frozen = Arc::new(AtomicBool::new(false));
        let target = target.to_string();
        let f = frozen.clone();
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { continue };
                let Ok(up) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    let f = f.clone();
                    std::thread::spawn(move || {
                        use std::io::Read;
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            while f.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Ok(FreezableProxy { addr, frozen })
    }

    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn thaw(&self) {
        self.frozen
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A running `hyperbox-operator git` against a node.
pub struct Operator {
    child: Option<Child>,
    pub state: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
    /// A command the operator runs under (for example `faketime -f +300s`); none by default.
    pub wrapper: Vec<String>,
}

impl Operator {
    /// Whether the process has ended (it is reaped then).
    pub fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_some())
    }

    pub fn start(node: &Node, repo_url: &str, extra: &[&str]) -> Result<Operator> {
        let state = node
            .dir
            .path()
            .join(format!("operator-{}", random_suffix()));
        fs::create_dir_all(&state)?;
        let mut args = vec![
            "git".to_string(),
            "--repo".into(),
            repo_url.into(),
            "--node".into(),
            format!("unix://{}", node.socket.display()),
            "--state-dir".into(),
            state.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut op = Operator {
            child: None,
            log: state.join("operator.log"),
            state,
            args,
            wrapper: Vec::new(),
        };
        op.spawn()?;
        Ok(op)
    }

    /// `hyperbox-operator` with exactly `args` (for example `git --config FILE --state-dir
    /// DIR`), logging to `state/operator.log`; `state` must be the state dir the args name.
    pub fn start_with_args(state: PathBuf, args: &[&str]) -> Result<Operator> {
        Operator::start_wrapped(state, &[], args)
    }

    /// Like [`Operator::start_with_args`], run under `wrapper` (a command and its arguments
    /// that take the operator's command line after them, such as `faketime -f +300s`).
    pub fn start_wrapped(state: PathBuf, wrapper: &[&str], args: &[&str]) -> Result<Operator> {
        fs::create_dir_all(&state)?;
        let mut op = Operator {
            child: None,
            log: state.join("operator.log"),
            state,
            args: args.iter().map(|s| s.to_string()).collect(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        op.spawn()?;
        Ok(op)
    }

    pub fn spawn(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("hyperbox-operator"));
                c
            }
            None => Command::new(bin("hyperbox-operator")),
        };
        self.child = Some(
            cmd.args(&self.args)
                .env("RUST_LOG", "info,hyperbox_operator=debug")
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("start hyperbox-operator")?,
        );
        Ok(())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn status(&self) -> Option<Value> {
        operator_fixtures::operator_status(&self.state)
    }

    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        operator_fixtures::wait_operator_status(&self.state, &self.log, timeout, what, pred)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// HMAC-SHA256 signature header value (`sha256=<hex>`) of a webhook body.
pub fn webhook_signature(secret: &[u8], body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// POST to a local HTTP endpoint; returns the status code.
pub fn http_post(addr: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// `git http-backend` behind a small HTTP server (tests/support/git_http_server.py), optionally
/// demanding Basic auth.
pub struct GitHttpServer {
    child: Child,
    pub port: u16,
}

impl GitHttpServer {
    pub fn start(project_root: &Path, creds: Option<&str>) -> Result<GitHttpServer> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("support/git_http_server.py");
        let (child, port) = spawn_on_free_port("git http server", |port| {
            let mut cmd = Command::new("python3");
            cmd.arg(&script).arg(port.to_string()).arg(project_root);
            if let Some(c) = creds {
                cmd.arg(c);
            }
            cmd.stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start git http server")
        })?;
        Ok(GitHttpServer { child, port })
    }
}

impl Drop for GitHttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real OpenSSH server on a free loopback port that accepts one generated client key for
/// root, serving the repositories on this machine over `ssh://`.
pub struct SshServer {
    child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub client_key: PathBuf,
    /// A known_hosts file holding this server's host key.
    pub known_hosts: PathBuf,
}

fn keygen(path: &Path) -> Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "hyperbox-test", "-f"])
        .arg(path)
        .output()
        .context("run ssh-keygen")?;
    if !out.status.success() {
        bail!("ssh-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl SshServer {
    pub fn start() -> Result<SshServer> {
        let dir = tempfile::Builder::new().prefix("hbssh").tempdir()?;
        let host_key = dir.path().join("host_ed25519");
        let client_key = dir.path().join("client_ed25519");
        keygen(&host_key)?;
        keygen(&client_key)?;
        fs::copy(
            client_key.with_extension("pub"),
            dir.path().join("authorized_keys"),
        )?;
        let config = dir.path().join("sshd_config");
        // sshd's privilege separation directory.
        fs::create_dir_all("/run/sshd")?;
        let (child, port) = spawn_on_free_port("sshd", |port| {
            fs::write(
                &config,
                format!(
                    "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n",
                    host_key.display(),
                    dir.path().join("authorized_keys").display()
                ),
            )?;
            Command::new("/usr/sbin/sshd")
                .args(["-D", "-e", "-f"])
                .arg(&config)
                .stdout(Stdio::null())
                .stderr(fs::File::create(dir.path().join("sshd.log"))?)
                .spawn()
                .context("start sshd (openssh-server)")
        })?;
        let host_pub = fs::read_to_string(host_key.with_extension("pub"))?;
        let mut parts = host_pub.split_whitespace();
        let (kind, key) = (parts.next().unwrap(), parts.next().unwrap());
        let known_hosts = dir.path().join("known_hosts");
        fs::write(&known_hosts, format!("[127.0.0.1]:{port} {kind} {key}\n"))?;
        Ok(SshServer {
            child,
            dir,
            port,
            client_key,
            known_hosts,
        })
    }

    pub fn url(&self, repo: &Path) -> String {
        format!("ssh://root@127.0.0.1:{}{}", self.port, repo.display())
    }
}

impl Drop for SshServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A throwaway PKI made with the `openssl` CLI: a CA, a server certificate for 127.0.0.1, a
/// client certificate, both signed by the CA, and an unrelated second CA.
pub struct TestPki {
    pub dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> Result<TestPki> {
        let dir = tempfile::Builder::new().prefix("hbpki").tempdir()?;
        let d = dir.path();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for (name, cn) in [("ca", "hyperbox-test-ca"), ("other-ca", "someone-else")] {
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            let key = format!("{name}.key");
            let crt = format!("{name}.crt");
            let subj = format!("/CN={cn}");
            args.extend(["-keyout", &key, "-out", &crt, "-days", "2", "-subj", &subj]);
            openssl(d, &args)?;
        }
        for (name, cn, ext) in [
            (
                "server",
                "127.0.0.1",
                "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
            ),
            (
                "client",
                "hyperbox-operator",
                "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
            ),
        ] {
            let (key, csr, crt, cnf) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.crt"),
                format!("{name}.cnf"),
            );
            let subj = format!("/CN={cn}");
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
            openssl(d, &args)?;
            fs::write(d.join(&cnf), ext)?;
            openssl(
                d,
                &[
                    "x509", "-req", "-in", &csr, "-CA", "ca.crt", "-CAkey", "ca.key",
                    "-CAcreateserial", "-out", &crt, "-days", "2", "-extfile", &cnf,
                ],
            )?;
        }
        Ok(TestPki { dir })
    }

    /// `ca.crt`, `other-ca.crt`, `server.crt`/`.key`, `client.crt`/`.key`.
    pub fn path(&self, file: &str) -> String {
        self.dir.path().join(file).to_string_lossy().into_owned()
    }
}

/// One HTTP/1.1 request over the node's unix socket; the whole raw answer (status line,
/// headers, body).
pub fn http_over_unix(sock: &std::path::Path, method: &str, path: &str, body: &str) -> String {
    http_with_headers(
        sock,
        method,
        path,
        &[("Content-Type", "application/json")],
        body,
    )
}

/// A request over a unix socket with these headers and body; the whole answer, head included.
pub fn http_with_headers(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> String {
    use std::io::Read;
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// A plain HTTP GET over TCP (with a bearer token if given); the whole answer, head included.
pub fn http_tcp(addr: &str, path: &str, token: Option<&str>) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// What sampling a rollout across nodes saw (see [`sample_rollout`]).
#[derive(Debug)]
pub struct RolloutSamples {
    /// The fewest ready replicas of the workload, over all its nodes, held over two samples
    /// in a row. One round reads the nodes one after another, so a node that finishes between
    /// two reads could show as down on one node and already released on the next: a dip seen
    /// once is that, a real one (a node rolls for a second or more) lasts many samples.
    pub fewest_ready: u64,
    pub samples: usize,
    /// When each node finished its part (a new spec, all replicas updated and ready, no old
    /// one left), from the start.
    pub done_at: Vec<Duration>,
}

/// Sample workload `name` on every node every 20 ms until each runs a spec other than
/// `old_spec_hash` to completion with `per_node` replicas; fails after `timeout`.
pub fn sample_rollout(
    nodes: &[&Node],
    name: &str,
    old_spec_hash: &Value,
    per_node: u64,
    timeout: Duration,
) -> Result<RolloutSamples> {
    let started = Instant::now();
    let mut fewest_ready = u64::MAX;
    let mut last: Option<u64> = None;
    let mut samples = 0;
    let mut done_at: Vec<Option<Duration>> = vec![None; nodes.len()];
    loop {
        if started.elapsed() > timeout {
            bail!("the rollout of {name} did not finish in {timeout:?}: nodes done at {done_at:?}");
        }
        let states: Vec<Option<Value>> = nodes.iter().map(|n| n.status_now(name)).collect();
        let ready: u64 = states
            .iter()
            .map(|s| {
                s.as_ref()
                    .map_or(0, |s| s["readyReplicas"].as_u64().unwrap_or(0))
            })
            .sum();
        if let Some(previous) = last {
            fewest_ready = fewest_ready.min(previous.max(ready));
        }
        last = Some(ready);
        samples += 1;
        for (i, st) in states.iter().enumerate() {
            let done = st.as_ref().is_some_and(|s| {
                &s["specHash"] != old_spec_hash
                    && s["readyReplicas"] == per_node
                    && s["updatedReplicas"] == per_node
                    && s["currentReplicas"] == per_node
            });
            if done && done_at[i].is_none() {
                done_at[i] = Some(started.elapsed());
            }
        }
        if done_at.iter().all(Option::is_some) {
            let mut done_at: Vec<Duration> = done_at.into_iter().flatten().collect();
            done_at.sort();
            return Ok(RolloutSamples {
                fewest_ready,
                samples,
                done_at,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
