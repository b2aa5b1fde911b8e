//! Readiness probes: exec inside the container, or HTTP GET from inside its network namespace
//! (so `network: none` containers can be probed too). Probes run on blocking threads, at most
//! [`MAX_CONCURRENT_PROBES`] at once; each is bounded by its timeout, an exec probe is killed
//! when it overruns.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use hyperbox_api::Probe;
use tokio::sync::Semaphore;

use crate::runtime::{ProcHandle, Runtime};

/// Probes running at the same time, node-wide. More wait for a slot (and count the wait
/// against nothing: a slow node delays probes rather than piling up processes).
pub const MAX_CONCURRENT_PROBES: usize = 8;

/// Run one probe; true when it passed within `timeout`.
pub async fn run(
    runtime: Arc<dyn Runtime>,
    slots: Arc<Semaphore>,
    id: &str,
    proc: Arc<ProcHandle>,
    probe: &Probe,
    timeout: Duration,
) -> bool {
    let Ok(_permit) = slots.acquire_owned().await else {
        return false;
    };
    let id2 = id.to_string();
    let ok = if let Some(exec) = &probe.exec {
        let cmd = exec.command.clone();
        tokio::task::spawn_blocking(move || match runtime.exec(&id2, &cmd, timeout) {
            Ok(code) => code == 0,
            Err(e) => {
                tracing::debug!(container = %id2, error = %format!("{e:#}"), "exec probe failed");
                false
            }
        })
        .await
        .unwrap_or(false)
    } else if let Some(http) = &probe.http_get {
        let host = http.host.clone().unwrap_or_else(|| "127.0.0.1".into());
        let port = http.port;
        let path = http.path.clone();
        tokio::task::spawn_blocking(move || runtime.http_get(&proc, &host, port, &path, timeout))
            .await
            .unwrap_or(false)
    } else {
        false
    };
    tracing::debug!(container = id, ok, "readiness probe");
    ok
}

/// HTTP GET from inside the network namespace of the process behind `pidfd`.
pub fn http_get_in_netns(
    pidfd: std::os::fd::BorrowedFd<'_>,
    host: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> bool {
    crate::fsutil::in_network_namespace(pidfd, || Ok(http_get(host, port, path, timeout)))
        .unwrap_or(false)
}

fn http_get(host: &str, port: u16, path: &str, timeout: Duration) -> bool {
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
