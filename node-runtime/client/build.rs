//! Records the Git commit the binaries are built from (`HYPERBOX_GIT_COMMIT`), for
//! `--version` and support requests.
//!
//! Outside a Git checkout (a packaged source tree, a tarball) the commit is "unknown", unless
//! the packager sets `HYPERBOX_GIT_COMMIT` in the build environment.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=HYPERBOX_GIT_COMMIT");
    let commit = match std::env::var("HYPERBOX_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => {
            let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
            let commit = git(&dir, &["rev-parse", "--short=12", "HEAD"]);
            if commit.is_some() {
                watch_head(&dir);
            }
            commit.unwrap_or_else(|| "unknown".to_string())
        }
    };
    println!("cargo:rustc-env=HYPERBOX_GIT_COMMIT={commit}");
}

/// Rebuild when HEAD moves: a commit or checkout changes HEAD, the branch's ref or packed-refs.
/// Only paths that exist are named (cargo reruns the script on every build for a missing one).
fn watch_head(dir: &Path) {
    let resolve = |p: String| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            dir.join(p)
        }
    };
    let mut files = Vec::new();
    if let Some(git_dir) = git(dir, &["rev-parse", "--git-dir"]).map(resolve) {
        files.push(git_dir.join("HEAD"));
    }
    if let Some(common) = git(dir, &["rev-parse", "--git-common-dir"]).map(resolve) {
        files.push(common.join("packed-refs"));
        if let Some(head_ref) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
            let ref_file = common.join(head_ref);
            // A packed ref has no file yet; the next commit creates it in its directory.
            match ref_file.parent().filter(|_| !ref_file.exists()) {
                Some(ref_dir) => files.push(ref_dir.to_path_buf()),
                None => files.push(ref_file),
            }
        }
    }
    for f in files.into_iter().filter(|f| f.exists()) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
}
