//! Container logs: each replica writes stdout and stderr straight into one O_APPEND file (so
//! output keeps flowing while the daemon restarts); the daemon caps its size by copying it to
//! `<file>.1` and truncating it, like logrotate's copytruncate.

use std::fs;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

pub fn rotate_if_needed(path: &Path, max_bytes: u64) -> Result<()> {
    let Ok(meta) = fs::metadata(path) else {
        return Ok(());
    };
    if meta.len() <= max_bytes {
        return Ok(());
    }
    let rotated = path.with_extension("log.1");
    fs::copy(path, &rotated)
        .with_context(|| format!("copy {} to {}", path.display(), rotated.display()))?;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    f.set_len(0)
        .with_context(|| format!("truncate {}", path.display()))?;
    tracing::debug!(file = %path.display(), bytes = meta.len(), "rotated log");
    Ok(())
}

/// The previous file (if any) followed by the current one, keeping at most `tail` bytes.
pub fn read(path: &Path, tail: Option<u64>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for p in [path.with_extension("log.1"), path.to_path_buf()] {
        if let Ok(mut f) = fs::File::open(&p) {
            f.read_to_end(&mut out)
                .with_context(|| format!("read {}", p.display()))?;
        }
    }
    if let Some(t) = tail {
        let t = t as usize;
        if out.len() > t {
            out.drain(..out.len() - t);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn rotation_keeps_appending_writer_working() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("0.log");
        let mut w = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        w.write_all(&[b'a'; 100]).unwrap();
        rotate_if_needed(&p, 50).unwrap();
        w.write_all(b"after").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"after");
        assert_eq!(fs::metadata(p.with_extension("log.1")).unwrap().len(), 100);
        let all = read(&p, Some(8)).unwrap();
        assert_eq!(all, b"aaaafter");
    }
}
