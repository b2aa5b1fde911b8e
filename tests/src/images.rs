//! OCI images built here: layer tarballs (busybox-static and synthetic files), configs and
//! OCI layouts, pushed with `skopeo`.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::Result;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::*;

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
