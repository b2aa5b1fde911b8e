//! Fixtures for the operator's failure paths: a server that accepts connections and never
//! answers, and a `hyperbox-operator git` process that can be signalled and waited for.

use std::fs;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{bin, tail, wait_for_value};

/// A TCP server on a free loopback port that accepts every connection, holds it open and
/// never writes a byte: a hung Git server or node, as seen from the client.
pub struct SilentServer {
    pub port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl SilentServer {
    pub fn start() -> Result<SilentServer> {
        let listener = TcpListener::bind("127.0.0.1:0").context("bind silent server")?;
        let port = listener.local_addr()?.port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s) = (accepted.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut held: Vec<TcpStream> = Vec::new();
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(c) = conn {
                    // Read what the client sends (so it never blocks on a full buffer), answer
                    // nothing.
                    if let Ok(mut r) = c.try_clone() {
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 4096];
                            while matches!(r.read(&mut buf), Ok(n) if n > 0) {}
                        });
                    }
                    held.push(c);
                    a.fetch_add(1, Ordering::SeqCst);
                }
            }
            // Shut the sockets down (not just close this copy): the readers hold clones.
            for c in held {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        });
        Ok(SilentServer {
            port,
            accepted,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for SilentServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag; the held connections close with it.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `hyperbox-operator status -o json` of a state dir.
pub fn operator_status(state: &Path) -> Option<Value> {
    let out = Command::new(bin("hyperbox-operator"))
        .args(["status", "-o", "json", "--state-dir"])
        .arg(state)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Wait until the operator status of `state` satisfies `pred`; the error carries the last
/// status and the tail of the operator's log.
pub fn wait_operator_status(
    state: &Path,
    log: &Path,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    wait_for_value(
        timeout,
        what,
        || operator_status(state),
        pred,
        |last| {
            format!(
                "last operator status: {last:#}\noperator log:\n{}",
                tail(&fs::read_to_string(log).unwrap_or_default(), 4000)
            )
        },
    )
}

/// `hyperbox-operator status` (the text form) of a state dir.
pub fn operator_status_text(state: &Path) -> String {
    let out = Command::new(bin("hyperbox-operator"))
        .args(["status", "--state-dir"])
        .arg(state)
        .output()
        .expect("run hyperbox-operator status");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A `hyperbox-operator git` process in a state dir under `dir`, for any node endpoint (it
/// need not exist: a sync that fails before reaching the node never asks it).
pub struct OperatorProcess {
    child: Child,
    pub state: PathBuf,
    pub log: PathBuf,
}

impl OperatorProcess {
    pub fn start(dir: &Path, node: &str, repo_url: &str, extra: &[&str]) -> Result<Self> {
        let state = dir.join(format!("operator-{}", crate::random_suffix()));
        fs::create_dir_all(&state)?;
        let log = state.join("operator.log");
        let out = fs::File::create(&log)?;
        let child = Command::new(bin("hyperbox-operator"))
            .args(["git", "--repo", repo_url, "--node", node, "--state-dir"])
            .arg(&state)
            .args(extra)
            .env("RUST_LOG", "info,hyperbox_operator=debug")
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start hyperbox-operator")?;
        Ok(OperatorProcess { child, state, log })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn sigterm(&self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
    }

    /// The exit status, if the process ends within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn status(&self) -> Option<Value> {
        operator_status(&self.state)
    }

    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        wait_operator_status(&self.state, &self.log, timeout, what, pred)
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
