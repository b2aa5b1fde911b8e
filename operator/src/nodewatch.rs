//! Watching a node's digests instead of polling them.
//!
//! One task per node holds a long-poll open (`GET /v1/digests?watch=true&after=V`). The node
//! answers when an apply or a delete changed its digests, or after the timeout with nothing.
//! The task keeps the last list, and wakes the sync loop when the list changed, so drift is
//! repaired at once instead of at the next poll, and a quiet node costs one small request per
//! timeout instead of a full list per interval.
//!
//! A sync uses the cached list only when it is known to include this source's own changes:
//! every node answer carries the digests' version (`x-hyperbox-digests-version`), the client
//! keeps the highest it saw, and a list at least that new is current. Otherwise (and while
//! the watch is failing) the sync asks the node directly, as without a watch. A node that
//! cannot watch (it answers a plain list) is polled.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyperbox_client::{DigestHash, NodeClient};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

#[derive(Default)]
struct Cache {
    /// The node's digests at `version`, while the watch is healthy.
    digests: Option<Arc<Vec<DigestHash>>>,
    version: u64,
}

/// A running watch of one node (stopped when dropped).
pub struct NodeWatch {
    cache: Arc<Mutex<Cache>>,
    task: JoinHandle<()>,
}

impl Drop for NodeWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Wait before re-watching after `failures` failed rounds: 250 ms doubling to 5 s.
fn backoff(failures: u32) -> Duration {
    const WATCH_BACKOFF: hyperbox_api::backoff::Backoff =
        hyperbox_api::backoff::Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    WATCH_BACKOFF.after(failures)
}

impl NodeWatch {
    /// Watch `client`'s node, each round held up to `timeout`; `changed` is notified when the
    /// digests change after the first list.
    pub fn start(client: NodeClient, timeout: Duration, changed: Arc<Notify>) -> NodeWatch {
        let cache = Arc::new(Mutex::new(Cache::default()));
        let task = tokio::spawn(run(client, timeout, changed, cache.clone()));
        NodeWatch { cache, task }
    }

    /// The node's digests, if the watch holds a list of at least version `seen` (the
    /// highest the node answered this source with: it includes the source's own changes).
    pub fn current(&self, seen: u64) -> Option<Arc<Vec<DigestHash>>> {
        let c = self.cache.lock().unwrap();
        if c.version < seen {
            return None;
        }
        c.digests.clone()
    }
}

async fn run(
    client: NodeClient,
    timeout: Duration,
    changed: Arc<Notify>,
    cache: Arc<Mutex<Cache>>,
) {
    let mut after: Option<u64> = None;
    let mut failures = 0u32;
    loop {
        match client.watch_digests(after, timeout).await {
            Ok(answer) => {
                // Back after an outage: what happened meanwhile is worth a sync now.
                let recovered = failures > 0;
                failures = 0;
                let Some(version) = answer.resource_version else {
                    tracing::info!(node = %client.endpoint(), "node cannot watch its digests; polling it");
                    *cache.lock().unwrap() = Cache::default();
                    return;
                };
                if version < client.digests_version_seen() && answer.items.is_some() {
                    // A node restarted on a new state dir counts from lower now.
                    client.reset_digests_version_seen(version);
                }
                let mut c = cache.lock().unwrap();
                if let Some(items) = answer.items {
                    c.digests = Some(Arc::new(items));
                    if after.is_some() || recovered {
                        tracing::debug!(node = %client.endpoint(), version, "node digests changed");
                        changed.notify_one();
                    }
                }
                c.version = version;
                after = Some(version);
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(node = %client.endpoint(), error = %e, "node watch failed; syncs ask the node directly until it is back");
                }
                *cache.lock().unwrap() = Cache::default();
                after = None;
                tokio::time::sleep(backoff(failures)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_five_seconds() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(5), Duration::from_secs(4));
        assert_eq!(backoff(6), Duration::from_secs(5));
        assert_eq!(backoff(60), Duration::from_secs(5));
    }

    #[test]
    fn a_list_older_than_the_last_write_is_not_current() {
        let cache = Arc::new(Mutex::new(Cache::default()));
        let w = NodeWatch {
            cache: cache.clone(),
            task: tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .spawn(async {}),
        };
        assert!(w.current(0).is_none(), "nothing listed yet");
        {
            let mut c = cache.lock().unwrap();
            c.digests = Some(Arc::new(Vec::new()));
            c.version = 7;
        }
        assert!(w.current(0).is_some());
        assert!(w.current(7).is_some());
        assert!(w.current(8).is_none(), "a write answered with version 8");
    }
}
