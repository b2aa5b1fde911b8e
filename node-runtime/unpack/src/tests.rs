//! Tests against the real filesystem, in temporary directories. Archives
//! are built with `tar::Builder`; malicious names are written straight
//! into the header fields, which `Header::set_path` would refuse.

use super::*;

use std::fs;
use std::io::Cursor;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use tar::{Builder, EntryType, Header};

const MTIME: u64 = 1_600_000_000;
const DIGEST: &str = "sha256:0123456789abcdef";

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn sha256_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Builds a tar layer from raw headers.
struct Layer {
    builder: Builder<Vec<u8>>,
}

struct Opts<'a> {
    link: Option<&'a [u8]>,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    dev: Option<(u32, u32)>,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            link: None,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: MTIME,
            dev: None,
        }
    }
}

fn put(field: &mut [u8], value: &[u8]) {
    assert!(value.len() <= field.len(), "name too long for a raw header");
    field.fill(0);
    field[..value.len()].copy_from_slice(value);
}

impl Layer {
    fn new() -> Self {
        Layer {
            builder: Builder::new(Vec::new()),
        }
    }

    fn entry(&mut self, kind: EntryType, path: &str, data: &[u8], opts: Opts<'_>) -> &mut Self {
        let mut h = Header::new_gnu();
        put(&mut h.as_old_mut().name, path.as_bytes());
        if let Some(link) = opts.link {
            put(&mut h.as_old_mut().linkname, link);
        }
        h.set_entry_type(kind);
        h.set_mode(opts.mode);
        h.set_uid(opts.uid);
        h.set_gid(opts.gid);
        h.set_mtime(opts.mtime);
        h.set_size(data.len() as u64);
        if let Some((major, minor)) = opts.dev {
            h.set_device_major(major).unwrap();
            h.set_device_minor(minor).unwrap();
        }
        h.set_cksum();
        self.builder.append(&h, data).unwrap();
        self
    }

    fn file(&mut self, path: &str, data: &[u8]) -> &mut Self {
        self.entry(EntryType::Regular, path, data, Opts::default())
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Self {
        self.entry(
            EntryType::Directory,
            path,
            b"",
            Opts {
                mode,
                ..Opts::default()
            },
        )
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(
            EntryType::Symlink,
            path,
            b"",
            Opts {
                link: Some(target.as_bytes()),
                mode: 0o777,
                ..Opts::default()
            },
        )
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Self {
        self.entry(
            EntryType::Link,
            path,
            b"",
            Opts {
                link: Some(target.as_bytes()),
                ..Opts::default()
            },
        )
    }

    fn finish(&mut self) -> Vec<u8> {
        let builder = std::mem::replace(&mut self.builder, Builder::new(Vec::new()));
        builder.into_inner().unwrap()
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A temporary directory with the target at `root/` and a sentinel
/// directory `outside/` next to it.
struct Env {
    tmp: tempfile::TempDir,
}

impl Env {
    fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir(tmp.path().join("outside")).unwrap();
        fs::write(tmp.path().join("outside/sentinel"), b"keep").unwrap();
        Env { tmp }
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    fn outside(&self) -> PathBuf {
        self.tmp.path().join("outside")
    }

    fn unpacker(&self) -> Unpacker {
        self.unpacker_with(UnpackOptions::default())
    }

    fn unpacker_with(&self, opts: UnpackOptions) -> Unpacker {
        Unpacker::new(&self.root(), opts).unwrap()
    }

    /// Only `root`, `outside` and the sentinel exist outside the target.
    fn assert_outside_untouched(&self) {
        let mut top: Vec<_> = fs::read_dir(self.tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        top.sort();
        assert_eq!(top, ["outside", "root"], "new entries next to the target");
        let inside: Vec<_> = fs::read_dir(self.outside())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(inside, ["sentinel"], "new entries in the outside directory");
        assert_eq!(fs::read(self.outside().join("sentinel")).unwrap(), b"keep");
    }
}

fn apply(u: &mut Unpacker, tar: &[u8]) -> Result<LayerStats, UnpackError> {
    u.apply_layer(DIGEST, Compression::None, Cursor::new(tar))
}

fn expect_err(result: Result<LayerStats, UnpackError>) -> String {
    match result {
        Ok(stats) => panic!("layer was accepted: {stats:?}"),
        Err(e) => e.to_string(),
    }
}

fn lmeta(p: impl AsRef<Path>) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap()
}

#[test]
fn basic_entries_modes_and_ownership() {
    let env = Env::new();
    let mut u = env.unpacker();
    let tar = Layer::new()
        .dir("./", 0o755)
        .dir("./etc/", 0o750)
        .entry(
            EntryType::Regular,
            "./etc/hello",
            b"hello world\n",
            Opts {
                mode: 0o640,
                uid: 1000,
                gid: 1001,
                mtime: 1_234_567_890,
                ..Opts::default()
            },
        )
        .entry(
            EntryType::Regular,
            "bin/su",
            b"#!/bin/true\n",
            Opts {
                mode: 0o4755,
                uid: 0,
                gid: 0,
                ..Opts::default()
            },
        )
        .entry(
            EntryType::Directory,
            "tmp",
            b"",
            Opts {
                mode: 0o1777,
                ..Opts::default()
            },
        )
        .symlink("etc/link", "hello")
        .symlink("abs", "/etc/hello")
        .hardlink("etc/hard", "etc/hello")
        .entry(
            EntryType::Fifo,
            "run/fifo",
            b"",
            Opts {
                mode: 0o620,
                uid: 7,
                gid: 8,
                ..Opts::default()
            },
        )
        .entry(
            EntryType::Symlink,
            "owned-link",
            b"",
            Opts {
                link: Some(b"etc"),
                uid: 33,
                gid: 34,
                ..Opts::default()
            },
        )
        .finish();
    let stats = apply(&mut u, &tar).unwrap();
    assert_eq!(stats.entries, 10);
    assert_eq!(stats.bytes, 12 + 12);
    assert_eq!(u.total_bytes(), 24);
    assert_eq!(stats.computed_digest, sha256_of(&tar));

    let root = env.root();
    assert_eq!(fs::read(root.join("etc/hello")).unwrap(), b"hello world\n");
    let hello = lmeta(root.join("etc/hello"));
    assert_eq!(hello.mode() & 0o7777, 0o640);
    assert_eq!(hello.mtime(), 1_234_567_890);
    assert_eq!(lmeta(root.join("bin/su")).mode() & 0o7777, 0o4755);
    assert_eq!(
        lmeta(root.join("bin")).mode() & 0o7777,
        0o755,
        "implicit parent"
    );
    assert_eq!(lmeta(root.join("tmp")).mode() & 0o7777, 0o1777);
    let etc = lmeta(root.join("etc"));
    assert!(etc.is_dir());
    assert_eq!(etc.mode() & 0o7777, 0o750);
    assert_eq!(
        etc.mtime() as u64,
        MTIME,
        "dir mtime set after its children"
    );
    assert_eq!(lmeta(&root).mode() & 0o7777, 0o755, "root entry mode");

    assert_eq!(
        fs::read_link(root.join("etc/link")).unwrap(),
        Path::new("hello")
    );
    assert_eq!(
        fs::read_link(root.join("abs")).unwrap(),
        Path::new("/etc/hello")
    );
    let hard = lmeta(root.join("etc/hard"));
    assert_eq!(hard.ino(), hello.ino());
    assert_eq!(hard.nlink(), 2);
    let fifo = lmeta(root.join("run/fifo"));
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o7777, 0o620);

    if is_root() {
        assert_eq!((hello.uid(), hello.gid()), (1000, 1001));
        assert_eq!((fifo.uid(), fifo.gid()), (7, 8));
        let link = lmeta(root.join("owned-link"));
        assert_eq!((link.uid(), link.gid()), (33, 34), "lchown of the symlink");
        assert_eq!(
            lmeta(root.join("etc")).uid(),
            0,
            "symlink target not chowned"
        );
    }
}

#[test]
fn ownership_not_applied_when_disabled() {
    if !is_root() {
        return;
    }
    let env = Env::new();
    let mut u = env.unpacker_with(UnpackOptions {
        preserve_ownership: false,
        ..UnpackOptions::default()
    });
    let tar = Layer::new()
        .entry(
            EntryType::Regular,
            "f",
            b"x",
            Opts {
                uid: 1234,
                gid: 4321,
                ..Opts::default()
            },
        )
        .finish();
    apply(&mut u, &tar).unwrap();
    let m = lmeta(env.root().join("f"));
    assert_eq!((m.uid(), m.gid()), (0, 0));
}

#[test]
fn gzip_and_zstd_layers_report_digest() {
    let tar = Layer::new()
        .dir("d", 0o755)
        .file("d/a", b"alpha")
        .file("d/b", &vec![7u8; 300_000])
        .finish();

    let env = Env::new();
    let mut u = env.unpacker();
    let gz = gzip(&tar);
    let stats = u
        .apply_layer(DIGEST, Compression::Gzip, Cursor::new(&gz))
        .unwrap();
    assert_eq!(stats.computed_digest, sha256_of(&gz));
    assert_ne!(stats.computed_digest, sha256_of(&tar));
    assert_eq!(fs::read(env.root().join("d/a")).unwrap(), b"alpha");
    assert_eq!(
        fs::read(env.root().join("d/b")).unwrap(),
        vec![7u8; 300_000]
    );

    let env = Env::new();
    let mut u = env.unpacker();
    let zst = zstd::encode_all(Cursor::new(&tar), 3).unwrap();
    let stats = u
        .apply_layer(DIGEST, Compression::Zstd, Cursor::new(&zst))
        .unwrap();
    assert_eq!(stats.computed_digest, sha256_of(&zst));
    assert_eq!(fs::read(env.root().join("d/a")).unwrap(), b"alpha");
    assert_eq!(
        fs::read(env.root().join("d/b")).unwrap(),
        vec![7u8; 300_000]
    );
}

#[test]
fn digest_covers_bytes_after_the_archive_end() {
    let mut tar = Layer::new().file("a", b"1").finish();
    tar.extend_from_slice(&[0u8; 10_000]);
    tar.extend_from_slice(b"trailing junk that is not tar");

    let env = Env::new();
    let mut u = env.unpacker();
    let mut reader = Cursor::new(&tar);
    let stats = u
        .apply_layer(DIGEST, Compression::None, &mut reader)
        .unwrap();
    assert_eq!(reader.position(), tar.len() as u64, "reader drained");
    assert_eq!(stats.computed_digest, sha256_of(&tar));

    // Same for a gzip blob followed by garbage.
    let mut gz = gzip(&Layer::new().file("b", b"2").finish());
    gz.extend_from_slice(b"not gzip at all");
    let stats = u
        .apply_layer(DIGEST, Compression::Gzip, Cursor::new(&gz))
        .unwrap();
    assert_eq!(stats.computed_digest, sha256_of(&gz));
    assert!(env.root().join("b").exists());
}

#[test]
fn media_types() {
    use Compression as C;
    assert_eq!(
        C::from_media_type("application/vnd.oci.image.layer.v1.tar+gzip"),
        C::Gzip
    );
    assert_eq!(
        C::from_media_type("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
        C::Gzip
    );
    assert_eq!(
        C::from_media_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
        C::Gzip
    );
    assert_eq!(
        C::from_media_type("application/vnd.oci.image.layer.v1.tar+zstd"),
        C::Zstd
    );
    assert_eq!(
        C::from_media_type("application/vnd.oci.image.layer.v1.tar"),
        C::None
    );
}

#[test]
fn whiteouts_and_opaque_dirs() {
    let env = Env::new();
    let mut u = env.unpacker();
    let lower = Layer::new()
        .file("a/file", b"lower")
        .file("a/other", b"lower")
        .file("d/x/y", b"lower")
        .symlink("d/link", "/etc")
        .file("o/lower1", b"lower")
        .file("o/sub/lower2", b"lower")
        .file("o/keepdir/lower3", b"lower")
        .file("p/q/lower4", b"lower")
        .file("same", b"lower")
        .finish();
    apply(&mut u, &lower).unwrap();

    let upper = Layer::new()
        .file("a/.wh.file", b"")
        .file(".wh.d", b"")
        .file(".wh.missing", b"")
        .file("nodir/.wh.missing", b"")
        .file("o/new_before", b"upper")
        .file("o/keepdir/new", b"upper")
        .file("o/.wh..wh..opq", b"")
        .file("o/new_after", b"upper")
        // Same-layer content survives a later whiteout of the same name.
        .file("fresh", b"upper")
        .file(".wh.fresh", b"")
        // An opaque marker of a nested dir, then of its parent.
        .file("p/q/.wh..wh..opq", b"")
        .file("p/.wh..wh..opq", b"")
        .file(".wh.same", b"")
        .file("same", b"upper")
        .finish();
    apply(&mut u, &upper).unwrap();

    let root = env.root();
    assert!(!root.join("a/file").exists());
    assert_eq!(fs::read(root.join("a/other")).unwrap(), b"lower");
    assert!(!root.join("d").exists(), "whole tree whited out");
    assert!(fs::symlink_metadata(root.join("d")).is_err());
    assert!(!root.join("nodir").join(".wh.missing").exists());
    for gone in ["o/lower1", "o/sub", "o/keepdir/lower3", "p/q/lower4"] {
        assert!(
            fs::symlink_metadata(root.join(gone)).is_err(),
            "{gone} should be gone"
        );
    }
    for kept in [
        "o/new_before",
        "o/new_after",
        "o/keepdir/new",
        "fresh",
        "same",
    ] {
        assert_eq!(fs::read(root.join(kept)).unwrap(), b"upper", "{kept}");
    }
    assert!(
        root.join("p/q").is_dir(),
        "dir present in the layer is kept"
    );
    for marker in ["a/.wh.file", ".wh.d", "o/.wh..wh..opq", ".wh.fresh"] {
        assert!(fs::symlink_metadata(root.join(marker)).is_err(), "{marker}");
    }
}

#[test]
fn whiteout_through_a_symlink_is_refused() {
    let env = Env::new();
    let mut u = env.unpacker();
    let outside = env.outside();
    apply(
        &mut u,
        &Layer::new()
            .symlink("evil", outside.to_str().unwrap())
            .finish(),
    )
    .unwrap();
    let msg = expect_err(apply(
        &mut u,
        &Layer::new().file("evil/.wh.sentinel", b"").finish(),
    ));
    assert!(msg.contains("parent is a symlink"), "{msg}");
    let msg = expect_err(apply(
        &mut u,
        &Layer::new().file("evil/.wh..wh..opq", b"").finish(),
    ));
    assert!(msg.contains("parent is a symlink"), "{msg}");
    env.assert_outside_untouched();
}

#[test]
fn path_traversal_refused() {
    for name in ["../escape", "a/../../escape", "./../escape", ".."] {
        let env = Env::new();
        let mut u = env.unpacker();
        let tar = Layer::new()
            .file("ok", b"fine")
            .file(name, b"pwned")
            .finish();
        let msg = expect_err(apply(&mut u, &tar));
        assert_eq!(
            msg,
            format!("layer {DIGEST}: entry {name:?}: path escapes the root")
        );
        env.assert_outside_untouched();
        assert!(!env.tmp.path().join("escape").exists());
    }
    // Directories and links with such names are refused the same way.
    let env = Env::new();
    let mut u = env.unpacker();
    let msg = expect_err(apply(&mut u, &Layer::new().dir("../d", 0o755).finish()));
    assert!(msg.contains("path escapes the root"), "{msg}");
    let msg = expect_err(apply(&mut u, &Layer::new().symlink("../s", "x").finish()));
    assert!(msg.contains("path escapes the root"), "{msg}");
    env.assert_outside_untouched();
}

#[test]
fn absolute_path_refused() {
    let env = Env::new();
    let mut u = env.unpacker();
    let tar = Layer::new().file("/abs/file", b"pwned").finish();
    let msg = expect_err(apply(&mut u, &tar));
    assert_eq!(
        msg,
        format!("layer {DIGEST}: entry \"/abs/file\": path escapes the root")
    );
    assert!(!Path::new("/abs/file").exists());
    assert!(!env.root().join("abs").exists());
    env.assert_outside_untouched();
}

#[test]
fn nul_in_pax_path_refused() {
    let env = Env::new();
    let mut u = env.unpacker();
    let mut b = Builder::new(Vec::new());
    b.append_pax_extensions([("path", &b"a\0b"[..])]).unwrap();
    let mut h = Header::new_gnu();
    h.set_path("placeholder").unwrap();
    h.set_size(0);
    h.set_cksum();
    b.append(&h, &b""[..]).unwrap();
    let msg = expect_err(apply(&mut u, &b.into_inner().unwrap()));
    assert!(msg.contains("nul byte"), "{msg}");
}

#[test]
fn symlink_parent_refused_in_same_layer() {
    // A unique name, so that a broken implementation writing through
    // `evil -> /` leaves a file the test can find and remove.
    let victim = format!("hyperbox-unpack-test-{}", std::process::id());
    let host_victim = Path::new("/").join(&victim);
    let deep_up = "../".repeat(32);
    for target in ["/", deep_up.as_str(), "../outside", "OUTSIDE"] {
        let env = Env::new();
        let mut u = env.unpacker();
        let outside = env.outside();
        let target = if target == "OUTSIDE" {
            outside.to_str().unwrap().to_owned()
        } else {
            target.to_owned()
        };
        let entry = format!("evil/{victim}");
        let tar = Layer::new()
            .symlink("evil", &target)
            .file(&entry, b"pwned")
            .finish();
        let result = apply(&mut u, &tar);
        let escaped = host_victim.exists();
        let _ = fs::remove_file(&host_victim);
        assert!(!escaped, "wrote {host_victim:?} through a symlink");
        let msg = expect_err(result);
        assert_eq!(
            msg,
            format!(
                "layer {DIGEST}: entry {entry:?}: parent is a symlink (\"evil\"), refusing to follow it"
            )
        );
        env.assert_outside_untouched();
        // The symlink itself is fine and kept verbatim.
        assert_eq!(
            fs::read_link(env.root().join("evil")).unwrap(),
            Path::new(&target)
        );
    }
}

#[test]
fn symlink_parent_refused_across_layers() {
    let env = Env::new();
    let mut u = env.unpacker();
    let outside = env.outside();
    let lower = Layer::new()
        .dir("a", 0o755)
        .symlink("a/evil", outside.to_str().unwrap())
        .symlink("rel", "../outside")
        .finish();
    apply(&mut u, &lower).unwrap();

    let cases: Vec<Vec<u8>> = vec![
        Layer::new().file("a/evil/sentinel", b"pwned").finish(),
        Layer::new().file("a/evil/new/deeper", b"pwned").finish(),
        Layer::new().dir("a/evil/newdir", 0o755).finish(),
        Layer::new().symlink("a/evil/ln", "x").finish(),
        Layer::new().file("rel/sentinel", b"pwned").finish(),
        Layer::new()
            .file("target", b"x")
            .hardlink("rel/hl", "target")
            .finish(),
        Layer::new()
            .entry(EntryType::Fifo, "rel/fifo", b"", Opts::default())
            .finish(),
    ];
    for tar in cases {
        let msg = expect_err(apply(&mut u, &tar));
        assert!(msg.contains("parent is a symlink"), "{msg}");
        env.assert_outside_untouched();
    }
}

#[test]
fn final_symlink_is_replaced_not_followed() {
    let env = Env::new();
    let mut u = env.unpacker();
    let sentinel = env.outside().join("sentinel");
    let outside_dir = env.outside();
    let lower = Layer::new()
        .symlink("f", sentinel.to_str().unwrap())
        .symlink("d", outside_dir.to_str().unwrap())
        .symlink("dangling", "/nonexistent/x")
        .finish();
    apply(&mut u, &lower).unwrap();
    let outside_mode = lmeta(&outside_dir).mode();
    let upper = Layer::new()
        .file("f", b"inside")
        .dir("d", 0o700)
        .file("dangling", b"inside")
        .finish();
    apply(&mut u, &upper).unwrap();
    let root = env.root();
    assert_eq!(fs::read(root.join("f")).unwrap(), b"inside");
    assert!(lmeta(root.join("d")).is_dir());
    assert_eq!(fs::read(root.join("dangling")).unwrap(), b"inside");
    assert!(!Path::new("/nonexistent/x").exists());
    assert_eq!(
        lmeta(&outside_dir).mode(),
        outside_mode,
        "chmod went through"
    );
    env.assert_outside_untouched();
}

#[test]
fn hardlink_escapes_refused() {
    let env = Env::new();
    let mut u = env.unpacker();
    let msg = expect_err(apply(
        &mut u,
        &Layer::new().hardlink("pw", "/etc/passwd").finish(),
    ));
    assert_eq!(
        msg,
        format!("layer {DIGEST}: entry \"pw\": hardlink target \"/etc/passwd\" escapes the root")
    );
    let msg = expect_err(apply(
        &mut u,
        &Layer::new().hardlink("out", "../outside/sentinel").finish(),
    ));
    assert!(
        msg.contains("hardlink target \"../outside/sentinel\" escapes the root"),
        "{msg}"
    );
    let msg = expect_err(apply(
        &mut u,
        &Layer::new()
            .hardlink("out", "a/../../outside/sentinel")
            .finish(),
    ));
    assert!(msg.contains("escapes the root"), "{msg}");

    // Through a symlink inside the root, or to a symlink pointing out.
    let outside = env.outside();
    let sentinel = outside.join("sentinel");
    apply(
        &mut u,
        &Layer::new()
            .symlink("evil", outside.to_str().unwrap())
            .symlink("s", sentinel.to_str().unwrap())
            .dir("dir", 0o755)
            .finish(),
    )
    .unwrap();
    let msg = expect_err(apply(
        &mut u,
        &Layer::new().hardlink("h1", "evil/sentinel").finish(),
    ));
    assert!(msg.contains("is reached through a symlink"), "{msg}");
    let msg = expect_err(apply(&mut u, &Layer::new().hardlink("h2", "s").finish()));
    assert!(msg.contains("hardlink target \"s\" is a symlink"), "{msg}");
    let msg = expect_err(apply(&mut u, &Layer::new().hardlink("h3", "dir").finish()));
    assert!(msg.contains("is a directory"), "{msg}");
    let msg = expect_err(apply(&mut u, &Layer::new().hardlink("h4", "nope").finish()));
    assert!(msg.contains("does not exist"), "{msg}");

    for name in ["pw", "out", "h1", "h2", "h3", "h4"] {
        assert!(
            fs::symlink_metadata(env.root().join(name)).is_err(),
            "{name}"
        );
    }
    assert_eq!(lmeta(&sentinel).nlink(), 1);
    env.assert_outside_untouched();
}

#[test]
fn hardlink_across_layers() {
    let env = Env::new();
    let mut u = env.unpacker();
    apply(&mut u, &Layer::new().file("bin/busybox", b"bb").finish()).unwrap();
    apply(
        &mut u,
        &Layer::new()
            .hardlink("bin/sh", "bin/busybox")
            .hardlink("./bin/busybox", "bin/busybox")
            .finish(),
    )
    .unwrap();
    let root = env.root();
    assert_eq!(
        lmeta(root.join("bin/sh")).ino(),
        lmeta(root.join("bin/busybox")).ino()
    );
    assert_eq!(fs::read(root.join("bin/busybox")).unwrap(), b"bb");
}

fn char_device_layer() -> Vec<u8> {
    Layer::new()
        .entry(
            EntryType::Char,
            "dev/null",
            b"",
            Opts {
                mode: 0o666,
                dev: Some((1, 3)),
                ..Opts::default()
            },
        )
        .finish()
}

#[test]
fn devices_refused_by_default() {
    let env = Env::new();
    let mut u = env.unpacker();
    let msg = expect_err(apply(&mut u, &char_device_layer()));
    assert_eq!(
        msg,
        format!("layer {DIGEST}: entry \"dev/null\": device nodes are not allowed")
    );
    assert!(fs::symlink_metadata(env.root().join("dev/null")).is_err());
    let block = Layer::new()
        .entry(
            EntryType::Block,
            "dev/sda",
            b"",
            Opts {
                dev: Some((8, 0)),
                ..Opts::default()
            },
        )
        .finish();
    let msg = expect_err(apply(&mut u, &block));
    assert!(msg.contains("device nodes are not allowed"), "{msg}");
}

#[test]
fn devices_created_when_allowed() {
    if !is_root() {
        return;
    }
    let env = Env::new();
    let mut u = env.unpacker_with(UnpackOptions {
        allow_devices: true,
        ..UnpackOptions::default()
    });
    apply(&mut u, &char_device_layer()).unwrap();
    let m = lmeta(env.root().join("dev/null"));
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), libc::makedev(1, 3));
    assert_eq!(m.mode() & 0o7777, 0o666);
}

/// A reader that counts the bytes handed out.
struct Counting<R> {
    inner: R,
    read: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        Ok(n)
    }
}

/// A gzip bomb: a tar of `files` files of `mib` MiB of zeros each.
///
/// It is a valid multi-member gzip stream (RFC 1952 allows concatenated
/// members; `gzip -d` and Go's reader accept it) in which every MiB of
/// zeros is the same member, compressed once, so the test spends its time
/// unpacking rather than compressing 200 MiB in a debug build.
fn zero_bomb(files: usize, mib: usize) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    enc.write_all(&vec![0u8; 1 << 20]).unwrap();
    let zeros = enc.finish().unwrap();
    let mut out = Vec::new();
    for i in 0..files {
        let mut h = Header::new_gnu();
        h.set_path(format!("zeros/{i:04}")).unwrap();
        h.set_size((mib as u64) << 20);
        h.set_mode(0o644);
        h.set_cksum();
        out.extend_from_slice(&gzip(h.as_bytes()));
        for _ in 0..mib {
            out.extend_from_slice(&zeros);
        }
    }
    out.extend_from_slice(&gzip(&[0u8; 1024]));
    out
}

fn tree_size(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path()).unwrap();
            total += if m.is_dir() {
                tree_size(&e.path())
            } else {
                m.len()
            };
        }
    }
    total
}

#[test]
fn declared_size_over_the_limit_is_refused_before_writing() {
    const MIB: u64 = 1 << 20;
    let gz = zero_bomb(1, 100);
    let env = Env::new();
    let mut u = env.unpacker_with(UnpackOptions {
        max_bytes: 10 * MIB,
        ..UnpackOptions::default()
    });
    let mut reader = Counting {
        inner: Cursor::new(&gz),
        read: 0,
    };
    let msg = expect_err(u.apply_layer(DIGEST, Compression::Gzip, &mut reader));
    assert_eq!(
        msg,
        format!(
            "layer {DIGEST}: entry \"zeros/0000\": expanded size exceeds the limit of {} bytes",
            10 * MIB
        )
    );
    assert!(fs::symlink_metadata(env.root().join("zeros/0000")).is_err());
    assert!(tree_size(&env.root()) < 10 * MIB);
    assert!(
        reader.read < gz.len() as u64 / 2,
        "read {} of {} compressed bytes",
        reader.read,
        gz.len()
    );
}

#[test]
fn decompression_bomb_stops_at_the_cap() {
    const MIB: u64 = 1 << 20;
    // 200 MiB of zeros in 1 MiB files, compressing to a few hundred KiB.
    let gz = zero_bomb(200, 1);
    assert!(gz.len() < 400 << 10, "bomb is {} bytes", gz.len());
    let env = Env::new();
    let mut u = env.unpacker_with(UnpackOptions {
        max_bytes: 50 * MIB,
        ..UnpackOptions::default()
    });
    let mut reader = Counting {
        inner: Cursor::new(&gz),
        read: 0,
    };
    let msg = expect_err(u.apply_layer(DIGEST, Compression::Gzip, &mut reader));
    assert!(
        msg.contains(&format!(
            "expanded size exceeds the limit of {} bytes",
            50 * MIB
        )),
        "{msg}"
    );
    assert!(u.total_bytes() <= 50 * MIB);
    assert!(tree_size(&env.root()) <= 50 * MIB);
    assert!(
        reader.read < gz.len() as u64 / 2,
        "read {} of {} compressed bytes",
        reader.read,
        gz.len()
    );
}

#[test]
fn size_limit_counts_across_layers() {
    let env = Env::new();
    let mut u = env.unpacker_with(UnpackOptions {
        max_bytes: 1000,
        ..UnpackOptions::default()
    });
    apply(&mut u, &Layer::new().file("a", &[1u8; 600]).finish()).unwrap();
    assert_eq!(u.total_bytes(), 600);
    let msg = expect_err(apply(&mut u, &Layer::new().file("b", &[1u8; 600]).finish()));
    assert!(msg.contains("exceeds the limit of 1000 bytes"), "{msg}");
    assert!(!env.root().join("b").exists());
}

#[test]
fn entry_limit() {
    let env = Env::new();
    let mut u = env.unpacker_with(UnpackOptions {
        max_entries: 3,
        ..UnpackOptions::default()
    });
    apply(&mut u, &Layer::new().file("a", b"").file("b", b"").finish()).unwrap();
    let msg = expect_err(apply(
        &mut u,
        &Layer::new().file("c", b"").file("d", b"").finish(),
    ));
    assert_eq!(
        msg,
        format!("layer {DIGEST}: entry \"d\": entry count exceeds the limit of 3 entries")
    );
    assert!(env.root().join("c").exists());
    assert!(!env.root().join("d").exists());
}

#[test]
fn read_only_directories_get_their_mode_at_the_end() {
    let env = Env::new();
    let mut u = env.unpacker();
    let tar = Layer::new()
        .dir("ro", 0o555)
        .file("ro/child", b"c")
        .dir("ro/sub", 0o500)
        .file("ro/sub/f", b"f")
        .dir("ro/sub/deeper", 0o555)
        .finish();
    apply(&mut u, &tar).unwrap();
    let root = env.root();
    assert_eq!(fs::read(root.join("ro/sub/f")).unwrap(), b"f");
    assert_eq!(lmeta(root.join("ro")).mode() & 0o7777, 0o555);
    assert_eq!(lmeta(root.join("ro/sub")).mode() & 0o7777, 0o500);
    assert_eq!(lmeta(root.join("ro/sub/deeper")).mode() & 0o7777, 0o555);
    assert_eq!(lmeta(root.join("ro")).mtime() as u64, MTIME);

    // A later layer writes into it and re-declares it.
    apply(
        &mut u,
        &Layer::new()
            .file("ro/late", b"l")
            .dir("ro", 0o555)
            .file("ro/later", b"l")
            .finish(),
    )
    .unwrap();
    assert_eq!(fs::read(root.join("ro/late")).unwrap(), b"l");
    assert_eq!(fs::read(root.join("ro/later")).unwrap(), b"l");
    assert_eq!(lmeta(root.join("ro")).mode() & 0o7777, 0o555);
    // Let the tempdir be removed even when not running as root.
    for d in ["ro/sub/deeper", "ro/sub", "ro"] {
        fs::set_permissions(root.join(d), fs::Permissions::from_mode(0o755)).unwrap();
    }
}

#[test]
fn entries_replace_existing_ones() {
    let env = Env::new();
    let mut u = env.unpacker();
    apply(
        &mut u,
        &Layer::new()
            .file("x/deep/tree", b"1")
            .file("y", b"file")
            .file("z", b"file")
            .dir("w", 0o700)
            .file("w/keep", b"k")
            .finish(),
    )
    .unwrap();
    apply(
        &mut u,
        &Layer::new()
            .file("x", b"now a file")
            .dir("y", 0o711)
            .symlink("z", "y")
            .dir("w", 0o755)
            .finish(),
    )
    .unwrap();
    let root = env.root();
    assert_eq!(fs::read(root.join("x")).unwrap(), b"now a file");
    assert!(lmeta(root.join("y")).is_dir());
    assert_eq!(lmeta(root.join("y")).mode() & 0o7777, 0o711);
    assert!(lmeta(root.join("z")).file_type().is_symlink());
    assert_eq!(fs::read(root.join("w/keep")).unwrap(), b"k");
    assert_eq!(lmeta(root.join("w")).mode() & 0o7777, 0o755);
}

#[test]
fn parent_that_is_a_file_is_refused() {
    let env = Env::new();
    let mut u = env.unpacker();
    let msg = expect_err(apply(
        &mut u,
        &Layer::new().file("f", b"x").file("f/child", b"y").finish(),
    ));
    assert_eq!(
        msg,
        format!("layer {DIGEST}: entry \"f/child\": parent \"f\" is not a directory")
    );
}

#[test]
fn long_names_gnu_and_pax() {
    let env = Env::new();
    let mut u = env.unpacker();
    let long_dir = "d".repeat(120);
    let long_path = format!("{long_dir}/{}", "f".repeat(150));
    let mut b = Builder::new(Vec::new());
    // GNU long name.
    let mut h = Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o600);
    h.set_entry_type(EntryType::Regular);
    b.append_data(&mut h, &long_path, &b"gnu"[..]).unwrap();
    // PAX path, linkpath, mtime with nanoseconds and a user xattr.
    let pax_path = format!("{long_dir}/pax-link");
    b.append_pax_extensions([
        ("path", pax_path.as_bytes()),
        ("linkpath", long_path.as_bytes()),
        ("mtime", b"1700000000.5".as_slice()),
        ("SCHILY.xattr.user.test", b"v\nalue".as_slice()),
    ])
    .unwrap();
    let mut h = Header::new_ustar();
    h.set_path("short").unwrap();
    h.set_entry_type(EntryType::Symlink);
    h.set_size(0);
    h.set_cksum();
    b.append(&h, &b""[..]).unwrap();
    // PAX xattr on a regular file.
    b.append_pax_extensions([("SCHILY.xattr.user.test", b"v\nalue".as_slice())])
        .unwrap();
    let mut h = Header::new_ustar();
    h.set_path("xattr-file").unwrap();
    h.set_size(1);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"x"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    apply(&mut u, &tar).unwrap();

    let root = env.root();
    assert_eq!(fs::read(root.join(&long_path)).unwrap(), b"gnu");
    let link = root.join(&pax_path);
    assert_eq!(fs::read_link(&link).unwrap(), Path::new(&long_path));
    let m = lmeta(&link);
    assert_eq!((m.mtime(), m.mtime_nsec()), (1_700_000_000, 500_000_000));
    assert!(!root.join("short").exists());

    // user xattrs are best-effort (tmpfs before 6.6 lacks them).
    let mut value = [0u8; 32];
    let name = CString::new("user.test").unwrap();
    let file = CString::new(root.join("xattr-file").to_str().unwrap()).unwrap();
    let n = unsafe {
        libc::lgetxattr(
            file.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    if n >= 0 {
        assert_eq!(&value[..n as usize], b"v\nalue");
    }
}

#[test]
fn oversized_extension_header_refused() {
    let env = Env::new();
    let mut u = env.unpacker();
    let mut b = Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    put(&mut h.as_old_mut().name, b"././@LongLink");
    h.set_entry_type(EntryType::GNULongName);
    let size = tarstream::MAX_META_SIZE + 1;
    h.set_size(size);
    h.set_cksum();
    b.append(&h, io::repeat(b'a').take(size)).unwrap();
    let msg = expect_err(apply(&mut u, &b.into_inner().unwrap()));
    assert!(msg.contains("gnu long name"), "{msg}");
    assert!(
        msg.starts_with(&format!("layer {DIGEST}: tar stream: ")),
        "{msg}"
    );
}

#[test]
fn stream_errors_name_the_failing_layer() {
    let env = Env::new();
    let mut u = env.unpacker();
    let tar = Layer::new().file("a", &[5u8; 100_000]).finish();

    let mut gz = gzip(&tar);
    let mid = gz.len() / 2;
    gz[mid..].iter_mut().for_each(|b| *b ^= 0x5a);
    let msg = expect_err(u.apply_layer(DIGEST, Compression::Gzip, Cursor::new(&gz)));
    assert!(msg.starts_with(&format!("layer {DIGEST}")), "{msg}");
    assert!(msg.contains("gzip stream"), "{msg}");

    let msg = expect_err(u.apply_layer(DIGEST, Compression::Zstd, Cursor::new(b"nope")));
    assert!(msg.contains("zstd stream"), "{msg}");

    let msg = expect_err(apply(&mut u, &tar[..2000]));
    assert_eq!(
        msg,
        format!("layer {DIGEST}: entry \"a\": tar stream: archive is truncated inside entry data")
    );

    let mut bad = tar.clone();
    bad[10] ^= 1;
    let msg = expect_err(apply(&mut u, &bad));
    assert!(msg.contains("checksum mismatch"), "{msg}");

    struct Failing;
    impl Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::Error::other("connection reset"))
        }
    }
    let msg = expect_err(u.apply_layer(DIGEST, Compression::Gzip, Failing));
    assert_eq!(
        msg,
        format!("layer {DIGEST}: read layer blob: connection reset")
    );
}

#[test]
fn io_errors_have_context() {
    let env = Env::new();
    let mut u = env.unpacker();
    let long = "n".repeat(300);
    let mut b = Builder::new(Vec::new());
    let mut h = Header::new_gnu();
    h.set_size(1);
    h.set_mode(0o644);
    b.append_data(&mut h, &long, &b"x"[..]).unwrap();
    let msg = expect_err(apply(&mut u, &b.into_inner().unwrap()));
    assert!(
        msg.starts_with(&format!(
            "layer {DIGEST}: entry \"{long}\": remove existing entry: "
        )) && msg.contains("(os error 36)"),
        "{msg}"
    );
}

#[test]
fn target_is_created() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("a/b/rootfs");
    let mut u = Unpacker::new(&target, UnpackOptions::default()).unwrap();
    assert_eq!(u.target(), target);
    apply(&mut u, &Layer::new().file("x", b"1").finish()).unwrap();
    assert!(target.join("x").exists());
    assert_eq!(u.total_entries(), 1);
}

#[test]
fn public_types_are_thread_safe() {
    fn check<T: Send + Sync + 'static>() {}
    check::<UnpackError>();
    check::<Unpacker>();
    check::<LayerStats>();
}

/// Every entry below `root`: path -> (kind, permissions, uid, gid, content or link target).
fn tree_of(root: &Path) -> std::collections::BTreeMap<String, (String, u32, u32, u32, Vec<u8>)> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let m = lmeta(&p);
            let ft = m.file_type();
            let (kind, data) = if ft.is_dir() {
                stack.push(p.clone());
                ("dir", Vec::new())
            } else if ft.is_symlink() {
                (
                    "symlink",
                    fs::read_link(&p)
                        .unwrap()
                        .into_os_string()
                        .into_encoded_bytes(),
                )
            } else if ft.is_file() {
                ("file", fs::read(&p).unwrap())
            } else if ft.is_char_device() {
                ("char", m.rdev().to_le_bytes().to_vec())
            } else {
                ("other", Vec::new())
            };
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            out.insert(
                rel,
                (kind.to_string(), m.mode() & 0o7777, m.uid(), m.gid(), data),
            );
        }
    }
    out
}

/// A layer unpacked on its own with overlay whiteouts, stacked by overlayfs over the lower
/// one, shows exactly the tree that applying both layers in order gives.
#[test]
fn overlay_form_stacks_to_the_applied_tree() {
    if !is_root() {
        eprintln!("skipped: needs root to mount overlayfs and create whiteout devices");
        return;
    }
    let lower = Layer::new()
        .dir("a", 0o755)
        .file("a/file", b"lower")
        .file("a/other", b"lower")
        .dir("d", 0o755)
        .file("d/x/y", b"lower")
        .symlink("d/link", "/etc")
        .dir("o", 0o750)
        .file("o/lower1", b"lower")
        .file("o/sub/lower2", b"lower")
        .file("o/keepdir/lower3", b"lower")
        .file("same", b"lower")
        .finish();
    let upper = Layer::new()
        .dir("a", 0o755)
        .file("a/.wh.file", b"")
        .file(".wh.d", b"")
        .file(".wh.missing", b"")
        .dir("o", 0o750)
        .file("o/new_before", b"upper")
        .dir("o/keepdir", 0o755)
        .file("o/keepdir/new", b"upper")
        .file("o/.wh..wh..opq", b"")
        .file("o/new_after", b"upper")
        .file("fresh", b"upper")
        .file(".wh.fresh", b"")
        .file(".wh.same", b"")
        .file("same", b"upper")
        .finish();
    // The reference: both applied in order onto one tree.
    let applied = Env::new();
    let mut u = applied.unpacker();
    apply(&mut u, &lower).unwrap();
    apply(&mut u, &upper).unwrap();
    // Each on its own, in overlay form.
    let opts = UnpackOptions {
        overlay_whiteouts: true,
        ..UnpackOptions::default()
    };
    let (l, h) = (Env::new(), Env::new());
    let ls = apply(&mut l.unpacker_with(opts.clone()), &lower).unwrap();
    let hs = apply(&mut h.unpacker_with(opts), &upper).unwrap();
    let mut implicit = ls.implicit_dirs.clone();
    implicit.sort();
    assert_eq!(
        implicit,
        vec![b"d/x".to_vec(), b"o/keepdir".to_vec(), b"o/sub".to_vec()]
    );
    assert!(hs.implicit_dirs.is_empty(), "{:?}", hs.implicit_dirs);
    assert_eq!(ls.diff_id.as_deref(), Some(sha256_of(&lower).as_str()));
    let whiteout = lmeta(h.root().join("a/file"));
    assert!(whiteout.file_type().is_char_device() && whiteout.rdev() == 0);
    assert_eq!(
        xattr_of(&h.root().join("o"), "trusted.overlay.opaque").as_deref(),
        Some(&b"y"[..])
    );
    assert!(
        lmeta(h.root().join("fresh")).is_file(),
        "same-layer content wins"
    );
    assert!(lmeta(h.root().join("same")).is_file());
    // Stack them.
    let merged = tempfile::tempdir().unwrap();
    let opts = format!("lowerdir={}:{}", h.root().display(), l.root().display());
    let src = std::ffi::CString::new("overlay").unwrap();
    let target = std::ffi::CString::new(merged.path().as_os_str().as_encoded_bytes()).unwrap();
    let data = std::ffi::CString::new(opts).unwrap();
    // SAFETY: mount(2) with valid C strings.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            src.as_ptr(),
            libc::MS_RDONLY,
            data.as_ptr().cast(),
        )
    };
    assert_eq!(rc, 0, "mount overlay: {}", io::Error::last_os_error());
    let got = tree_of(merged.path());
    // SAFETY: umount2 with a valid C string.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    assert_eq!(got, tree_of(&applied.root()));
}

fn xattr_of(p: &Path, name: &str) -> Option<Vec<u8>> {
    let path = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    let name = std::ffi::CString::new(name).unwrap();
    let mut buf = vec![0u8; 64];
    // SAFETY: lgetxattr into a buffer of the given length.
    let n = unsafe {
        libc::lgetxattr(
            path.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    (n >= 0).then(|| {
        buf.truncate(n as usize);
        buf
    })
}

#[test]
fn diff_id_is_the_uncompressed_digest_and_implicit_dirs_are_listed() {
    let tar = Layer::new()
        .file("usr/bin/tool", b"x")
        .dir("etc", 0o755)
        .finish();
    let env = Env::new();
    let mut u = env.unpacker_with(UnpackOptions {
        overlay_whiteouts: true,
        ..UnpackOptions::default()
    });
    let stats = u
        .apply_layer(DIGEST, Compression::Gzip, Cursor::new(gzip(&tar)))
        .unwrap();
    assert_eq!(stats.diff_id.as_deref(), Some(sha256_of(&tar).as_str()));
    assert_ne!(stats.computed_digest, sha256_of(&tar));
    let mut implicit = stats.implicit_dirs.clone();
    implicit.sort();
    assert_eq!(implicit, vec![b"usr".to_vec(), b"usr/bin".to_vec()]);
}
