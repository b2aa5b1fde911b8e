//! Untrusted OCI layers applied as root: whatever the bytes, the unpacker must not panic and
//! must not create, change or remove anything outside its target directory. The target sits
//! in an outer directory holding canaries; after every apply (success or error) the outer
//! directory must list exactly as before and the canaries must be unchanged.
#![no_main]

use std::collections::BTreeMap;
use std::fs;
use std::io::Cursor;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use hyperbox_unpack::{Compression, UnpackOptions, Unpacker};
use libfuzzer_sys::fuzz_target;

const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

struct Outer {
    _dir: tempfile::TempDir,
    root: PathBuf,
    before: BTreeMap<PathBuf, Snapshot>,
}

/// What we compare for every path outside the target.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u64,
    ino: u64,
    mtime: (i64, i64),
    content: Option<Vec<u8>>,
    link: Option<PathBuf>,
}

fn snapshot(p: &Path) -> Snapshot {
    let m = fs::symlink_metadata(p).unwrap();
    Snapshot {
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        nlink: m.nlink(),
        ino: m.ino(),
        mtime: (m.mtime(), m.mtime_nsec()),
        content: m.is_file().then(|| fs::read(p).unwrap()),
        link: m.is_symlink().then(|| fs::read_link(p).unwrap()),
    }
}

/// Everything under `root` except the target directory's contents.
fn listing(root: &Path, target: &Path) -> BTreeMap<PathBuf, Snapshot> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p == target {
                continue;
            }
            let s = snapshot(&p);
            if fs::symlink_metadata(&p).unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.insert(p, s);
        }
    }
    // The root's mtime and link count change as the target comes and goes: compare the rest.
    let mut r = snapshot(root);
    r.mtime = (0, 0);
    r.nlink = 0;
    out.insert(root.to_path_buf(), r);
    out
}

const OUTER_PREFIX: &str = "hyperbox-fuzz-layer-";

fn remove_stale_outer_dirs() {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(OUTER_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn outer() -> &'static Outer {
    static OUTER: OnceLock<Outer> = OnceLock::new();
    OUTER.get_or_init(|| {
        // libFuzzer leaves by exit(), so statics are never dropped: name the outer dir by pid
        // and remove those of processes that are gone (a crashed run's dir stays until then,
        // for a look at what happened).
        remove_stale_outer_dirs();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{OUTER_PREFIX}{}-", std::process::id()))
            .tempdir()
            .unwrap();
        let root = dir.path().to_path_buf();
        fs::write(root.join("canary"), b"do not touch").unwrap();
        fs::create_dir(root.join("etc")).unwrap();
        fs::write(root.join("etc/passwd"), b"root:x:0:0::/root:/bin/sh\n").unwrap();
        // Names a layer entry might try to reach with `..` or through a symlink.
        std::os::unix::fs::symlink("/etc", root.join("hostetc")).unwrap();
        let before = listing(&root, &root.join("target"));
        Outer {
            _dir: dir,
            root,
            before,
        }
    })
}

fn apply(u: &mut Unpacker, compression: Compression, data: &[u8]) {
    let _ = u.apply_layer(DIGEST, compression, Cursor::new(data));
}

fuzz_target!(|data: &[u8]| {
    let o = outer();
    let target = o.root.join("target");
    fs::create_dir(&target).unwrap();
    {
        let opts = UnpackOptions {
            max_bytes: 8 << 20,
            max_entries: 4096,
            ..UnpackOptions::default()
        };
        let mut u = Unpacker::new(&target, opts).unwrap();
        apply(&mut u, Compression::None, data);
        // A second layer over the first exercises replacement, whiteouts and opaque
        // directories over existing entries (and the compressed readers when it looks so).
        let second = if data.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        };
        apply(&mut u, second, data);
    }
    let after = listing(&o.root, &target);
    if after != o.before {
        let added: Vec<_> = after
            .keys()
            .filter(|k| !o.before.contains_key(*k))
            .collect();
        let changed: Vec<_> = o
            .before
            .iter()
            .filter(|(k, v)| after.get(*k) != Some(v))
            .map(|(k, _)| k)
            .collect();
        panic!("layer escaped the target: added {added:?}, changed or removed {changed:?}");
    }
    fs::remove_dir_all(&target).unwrap();
});
