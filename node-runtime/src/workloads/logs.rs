//! Container logs: each replica writes stdout and stderr straight into one O_APPEND file (so
//! output keeps flowing while the daemon restarts); the daemon caps its size by copying it to
//! `<file>.1` and truncating it, like logrotate's copytruncate.

use std::fs;
use std::path::{Path, PathBuf};

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

/// Where to read the last `tail` bytes of a replica's output: the previous file (if any) then
/// the current one, each with the offset to start from. The files are streamed from there, so
/// a large log is never held in memory.
pub fn tail_segments(path: &Path, tail: u64) -> Vec<(PathBuf, u64)> {
    let files = [path.with_extension("log.1"), path.to_path_buf()];
    let sizes: Vec<u64> = files
        .iter()
        .map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .collect();
    let mut skip = sizes.iter().sum::<u64>().saturating_sub(tail);
    let mut out = Vec::new();
    for (p, size) in files.iter().zip(sizes) {
        if size == 0 {
            continue;
        }
        if skip >= size {
            skip -= size;
            continue;
        }
        out.push((p.clone(), skip));
        skip = 0;
    }
    out
}

/// Stream at most `limit` bytes of the segments as HTTP body chunks (64 KiB reads, async
/// file I/O). The limit holds even while a busy container keeps appending.
pub fn stream(
    segments: Vec<(PathBuf, u64)>,
    limit: u64,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    futures_util::stream::unfold(
        (segments.into_iter(), None::<tokio::fs::File>, limit),
        |(mut segments, mut current, left)| async move {
            loop {
                if left == 0 {
                    return None;
                }
                if current.is_none() {
                    let (p, offset) = segments.next()?;
                    let Ok(mut f) = tokio::fs::File::open(&p).await else {
                        continue;
                    };
                    if f.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
                        continue;
                    }
                    current = Some(f);
                }
                let mut buf = vec![0u8; (64 << 10).min(left) as usize];
                match current.as_mut()?.read(&mut buf).await {
                    Ok(0) => current = None,
                    Ok(n) => {
                        buf.truncate(n);
                        let left = left - n as u64;
                        return Some((Ok(bytes::Bytes::from(buf)), (segments, current, left)));
                    }
                    Err(e) => return Some((Err(e), (segments, None, 0))),
                }
            }
        },
    )
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
        let segments = tail_segments(&p, 8);
        assert_eq!(
            segments,
            vec![(p.with_extension("log.1"), 97), (p.clone(), 0)]
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let all: Vec<u8> = rt.block_on(async {
            use futures_util::StreamExt;
            let chunks: Vec<_> = stream(segments, 8).collect().await;
            chunks
                .into_iter()
                .flat_map(|c| c.unwrap().to_vec())
                .collect()
        });
        assert_eq!(all, b"aaaafter");
    }
}
