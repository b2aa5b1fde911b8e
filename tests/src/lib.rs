//! Fixtures for the end-to-end tests: a real registry (`docker-registry`), OCI images built
//! here from a busybox-static rootfs and pushed with `skopeo`, and a real `hyperbox-node`
//! daemon in its own state dir, socket and cgroup parent.

use std::fs;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub mod faults;
pub mod git;
pub mod http;
pub mod images;
pub mod kube;
pub mod node;
pub mod operator;
pub mod operator_fixtures;
pub mod pki;
pub mod registry;

pub use faults::*;
pub use git::*;
pub use http::*;
pub use images::*;
pub use node::*;
pub use operator::*;
pub use pki::*;
pub use registry::*;

/// The JSON a command printed, if it succeeded.
pub fn json_of(out: &std::process::Output) -> Option<Value> {
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// A built binary of the workspace (`cargo build` puts them next to the test's deps dir).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

/// A port nobody listens on right now. Another process may take it before ours binds it: start
/// servers through [`spawn_on_free_port`], which retries on another port when that happens.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start a server on a free loopback port: `spawn` gets the port and starts the process. When
/// the process exits before it listens (the port was taken between choosing and binding), it
/// is tried again on another port.
pub fn spawn_on_free_port(
    what: &str,
    mut spawn: impl FnMut(u16) -> Result<Child>,
) -> Result<(Child, u16)> {
    for _ in 0..5 {
        let port = free_port();
        let mut child = spawn(port)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if child.try_wait()?.is_some() {
                break;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // Ours, not someone else's that won the port: ours is still running.
                std::thread::sleep(Duration::from_millis(20));
                if child.try_wait()?.is_none() {
                    return Ok((child, port));
                }
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("timed out waiting for {what} to listen on port {port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    bail!("{what} could not bind a free port in 5 tries")
}

/// The address a server bound to port 0 reports in its log: the `addr=` of the first line
/// that contains `message` (tracing's text format).
pub fn logged_addr(log: &str, message: &str) -> Option<String> {
    log.lines()
        .filter(|l| l.contains(message))
        .find_map(|l| l.split("addr=").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap_or("").to_string())
        .filter(|a| !a.is_empty())
}

pub fn random_suffix() -> String {
    let mut b = [0u8; 4];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    hex::encode(b)
}

/// Wait until `get` returns a value that satisfies `pred`; on timeout the error carries
/// `context` of the last value seen (Null when none).
pub fn wait_for_value(
    timeout: Duration,
    what: &str,
    mut get: impl FnMut() -> Option<Value>,
    pred: impl Fn(&Value) -> bool,
    context: impl FnOnce(&Value) -> String,
) -> Result<Value> {
    let mut last = Value::Null;
    wait_until(timeout, what, || {
        let v = get()?;
        last = v.clone();
        pred(&v).then_some(v)
    })
    .with_context(|| context(&last))
}

pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        s
    } else {
        let mut i = s.len() - n;
        while !s.is_char_boundary(i) {
            i += 1;
        }
        &s[i..]
    }
}

/// This machine's memory (`MemTotal` of /proc/meminfo), in bytes: tests size `--reserve` from
/// it to give a node an exact allocatable.
pub fn mem_total() -> u64 {
    let text = fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
    let kb: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal in /proc/meminfo");
    kb * 1024
}
