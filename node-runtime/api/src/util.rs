//! Small helpers both binaries share: durations on the command line, secret files, the clock
//! and atomic file replacement. No async runtime here: this crate stays tokio-free.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

/// A duration as humantime writes it (`500ms`, `10s`, `5m`, `1h 30m`, `2d`), or plain
/// (possibly fractional) seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let n: f64 = s
            .parse()
            .map_err(|_| format!("{s:?} is not a number of seconds"))?;
        return Ok(Duration::from_secs_f64(n));
    }
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 10s, 500ms or 5m: {e}"))
}

/// A secret (token, password) from a file, without surrounding whitespace. The error names the
/// file and what it is for.
pub fn read_secret_file(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("read {what} file {}: {e}", path.display()))
}

/// Seconds since the epoch.
pub fn now_unix() -> u64 {
    now_unix_ms() / 1000
}

/// Milliseconds since the epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Replace `path` with `data` so that readers (and a process restarted after `kill -9`) see
/// the old or the new content, never a torn write: a temporary file of its own in the same
/// directory (two writers never share one), optionally fsynced, then renamed over `path`;
/// `durable` also fsyncs the directory.
pub fn write_atomic(path: &Path, data: &[u8], durable: bool) -> std::io::Result<()> {
    let dir = path.parent().ok_or_else(|| {
        std::io::Error::other(format!("{} has no parent directory", path.display()))
    })?;
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(
            ".{}.",
            path.file_name().unwrap_or_default().to_string_lossy()
        ))
        .suffix(".tmp")
        .tempfile_in(dir)?;
    tmp.write_all(data)?;
    if durable {
        tmp.as_file().sync_all()?;
    }
    tmp.persist(path).map_err(|e| e.error)?;
    if durable {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// For `skip_serializing_if` on counters that are usually zero.
pub fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("0.5").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(
            parse_duration("2d").unwrap(),
            Duration::from_secs(2 * 86400)
        );
        let e = parse_duration("soon").unwrap_err();
        assert!(e.contains("\"soon\" is not a duration like 10s"), "{e}");
        assert!(parse_duration("5 lightyears").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn secrets_are_trimmed_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("t");
        std::fs::write(&f, "  s3cret\n").unwrap();
        assert_eq!(read_secret_file(&f, "token").unwrap(), "s3cret");
        let e = read_secret_file(&dir.path().join("nope"), "token").unwrap_err();
        assert!(
            e.starts_with("read token file ") && e.contains("nope"),
            "{e}"
        );
    }

    #[test]
    fn atomic_writes_leave_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b.json");
        write_atomic(&p, b"one", true).unwrap();
        write_atomic(&p, b"two", false).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
