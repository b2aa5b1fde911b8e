//! Readiness probes: exec inside the container, or HTTP GET from inside its network namespace
//! (so `network: none` containers can be probed too).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::time::Duration;

use hyperbox_api::Probe;

use crate::container::{self, RuntimeDirs};

/// Run one probe; true when it passed within `timeout`.
pub async fn run(dirs: &RuntimeDirs, id: &str, pid: i32, probe: &Probe, timeout: Duration) -> bool {
    let result = if let Some(exec) = &probe.exec {
        let dirs = dirs.clone();
        let id = id.to_string();
        let cmd = exec.command.clone();
        tokio::time::timeout(
            timeout,
            tokio::task::spawn_blocking(move || container::exec_in(&dirs, &id, &cmd)),
        )
        .await
        .map(|r| matches!(r, Ok(Ok(0))))
    } else if let Some(http) = &probe.http_get {
        let host = http.host.clone().unwrap_or_else(|| "127.0.0.1".into());
        let port = http.port;
        let path = http.path.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        // A dedicated thread: setns(CLONE_NEWNET) changes only the calling thread.
        std::thread::spawn(move || {
            let _ = tx.send(http_get_in_netns(pid, &host, port, &path, timeout));
        });
        tokio::time::timeout(timeout + Duration::from_millis(100), rx)
            .await
            .map(|r| r.unwrap_or(false))
    } else {
        Ok(false)
    };
    let ok = result.unwrap_or(false);
    tracing::debug!(container = id, ok, "readiness probe");
    ok
}

fn http_get_in_netns(pid: i32, host: &str, port: u16, path: &str, timeout: Duration) -> bool {
    let ns = format!("/proc/{pid}/ns/net");
    let Ok(f) = std::fs::File::open(&ns) else {
        return false;
    };
    // SAFETY: setns on an fd we own; affects only this thread, which exits afterwards.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return false;
    }
    let Some(addr) = (host, port)
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
    else {
        return false;
    };
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: hyperbox-probe\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut n = 0;
    while n < 12 {
        match s.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k,
        }
    }
    parse_status(&buf[..n]).is_some_and(|c| (200..400).contains(&c))
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head).ok()?;
    let mut parts = text.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn status_line() {
        assert_eq!(
            super::parse_status(b"HTTP/1.1 204 No Content\r\n"),
            Some(204)
        );
        assert_eq!(super::parse_status(b"garbage"), None);
    }
}
