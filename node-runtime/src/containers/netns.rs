//! A container's network namespace, entered from a short-lived thread: its loopback brought
//! up at creation, and HTTP GET from inside it (through its init's pidfd), so that a
//! `network: none` container can be probed too.

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use anyhow::{bail, Context, Result};

#[repr(C)]
struct IfReqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// A fresh network namespace has its loopback down; services inside expect 127.0.0.1 to work
/// (runc brings it up too). Done from a short-lived thread: setns only moves that thread.
pub fn bring_up_loopback(pid: i32) -> Result<()> {
    use std::os::fd::{AsFd, AsRawFd};
    const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
    const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
    // The init is our unreaped child here, so the pid is still it.
    let ns = fs::File::open(format!("/proc/{pid}/ns/net"))
        .with_context(|| format!("open network namespace of pid {pid}"))?;
    crate::fsutil::in_network_namespace(ns.as_fd(), || {
        // SAFETY: socket() has no memory arguments; the fd is wrapped right away.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: sock is a fresh fd we own.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let mut req = IfReqFlags {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        req.name[..2].copy_from_slice(b"lo");
        // SAFETY: ioctl with a properly sized ifreq.
        if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCGIFFLAGS as _, &mut req) } != 0 {
            bail!("get flags of lo: {}", std::io::Error::last_os_error());
        }
        req.flags |= libc::IFF_UP as libc::c_short;
        // SAFETY: as above.
        if unsafe { libc::ioctl(sock.as_raw_fd(), SIOCSIFFLAGS as _, &req) } != 0 {
            bail!("bring up lo: {}", std::io::Error::last_os_error());
        }
        Ok(())
    })
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
