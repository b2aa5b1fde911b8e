//! The daemon's life number on a state dir: kept in `<state>/epoch`, one more at every start
//! and written durably before anything is served. The versions clients watch (the workloads'
//! `changes` and the digests' version) start at `epoch << 32`, so every life's versions lie
//! above every earlier life's: a watcher's version is never reused after a restart, and no
//! clock (set back on a box without an RTC, or skewed) is involved.

use std::path::Path;

use anyhow::{Context, Result};

/// The file, beside the records.
const FILE: &str = "epoch";

/// Count this start and return its number (1 on a new state dir).
pub fn next(state_dir: &Path) -> Result<u64> {
    let path = state_dir.join(FILE);
    let last = match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse::<u64>().with_context(|| {
            format!(
                "{}: not a number ({:?}); move it away to start counting again",
                path.display(),
                text.chars().take(40).collect::<String>()
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    };
    let epoch = last
        .checked_add(1)
        .filter(|e| *e < (1 << 31))
        .with_context(|| format!("{}: {last} starts, no more fit", path.display()))?;
    crate::fsutil::write_atomic(&path, format!("{epoch}\n").as_bytes())
        .with_context(|| format!("write {}", path.display()))?;
    Ok(epoch)
}

/// The first version a life hands out.
pub fn first_version(epoch: u64) -> u64 {
    epoch << 32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_start_counts_one_more_and_versions_only_grow() {
        let dir = tempfile::tempdir().unwrap();
        let a = next(dir.path()).unwrap();
        let b = next(dir.path()).unwrap();
        assert_eq!((a, b), (1, 2));
        // A whole life's worth of changes stays below the next life's first version.
        assert!(first_version(a) + u32::MAX as u64 - 1 < first_version(b));
    }

    #[test]
    fn a_damaged_epoch_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("epoch"), "garbage").unwrap();
        let err = format!("{:#}", next(dir.path()).unwrap_err());
        assert!(err.contains("epoch: not a number"), "{err}");
    }
}
