//! Readiness probes: exec inside the container, or HTTP GET from inside its network namespace
//! (so `network: none` containers can be probed too). Probes run on blocking threads, at most
//! [`MAX_CONCURRENT_PROBES`] at once; each is bounded by its timeout, an exec probe is killed
//! when it overruns.

use std::sync::Arc;
use std::time::Duration;

use hyperbox_api::Probe;
use tokio::sync::Semaphore;

use crate::containers::{ProcHandle, Runtime};

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
