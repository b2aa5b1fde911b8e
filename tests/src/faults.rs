//! Faults to inject: a paused process, a TCP proxy that can be frozen (a partition).

use std::io::Write;
use std::net::TcpListener;
use std::time::Duration;

use anyhow::Result;

/// Stop process `pid` (SIGSTOP: its sockets still accept, nothing answers, as a hung
/// daemon); it continues when the guard is dropped, also when the test fails.
pub fn pause(pid: i32) -> Paused {
    assert_eq!(
        unsafe { libc::kill(pid, libc::SIGSTOP) },
        0,
        "SIGSTOP {pid}"
    );
    Paused(pid)
}

pub struct Paused(i32);

impl Drop for Paused {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A TCP proxy that can be frozen: while frozen, bytes in both directions are held (the
/// connections stay open and nothing answers), as in a partition that drops packets. New
/// connections are accepted and held too.
pub struct FreezableProxy {
    pub addr: String,
    frozen: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl FreezableProxy {
    pub fn start(target: &str) -> Result<FreezableProxy> {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let frozen = Arc::new(AtomicBool::new(false));
        let target = target.to_string();
        let f = frozen.clone();
        std::thread::spawn(move || {
            for down in listener.incoming() {
                let Ok(down) = down else { continue };
                let Ok(up) = std::net::TcpStream::connect(&target) else {
                    continue;
                };
                for (mut from, mut to) in [
                    (down.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, down),
                ] {
                    let f = f.clone();
                    std::thread::spawn(move || {
                        use std::io::Read;
                        let mut buf = vec![0u8; 64 << 10];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            while f.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Ok(FreezableProxy { addr, frozen })
    }

    pub fn freeze(&self) {
        self.frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    pub fn thaw(&self) {
        self.frozen
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}
