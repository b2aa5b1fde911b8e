//! A real OCI registry (`docker-registry`), plain or with TLS and Basic auth.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::json;

use base64::Engine;

use crate::*;

/// A real OCI registry on a free loopback port, optionally with htpasswd auth.
pub struct Registry {
    child: Child,
    pub dir: tempfile::TempDir,
    pub addr: String,
    pub creds: Option<(String, String)>,
    /// With TLS: the CA certificate (PEM) that signed the registry's certificate.
    pub ca: Option<PathBuf>,
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
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
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
