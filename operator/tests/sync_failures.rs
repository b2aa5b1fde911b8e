//! Every failed sync is recorded (error, stale, failure count) wherever it fails, a hung fetch
//! never blocks the async runtime, and applies fit the node's body cap.

mod support;

use std::time::{Duration, Instant};

use hyperbox_client::{Endpoint, NodeClient};
use hyperbox_operator::reconcile::Outcome;
use support::*;

fn files(n: usize, env_bytes: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            (
                format!("w{i}.yaml"),
                workload_yaml(&format!("w{i}"), env_bytes),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unwritable_inventory_is_recorded_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Remote::new(dir.path());
    remote.commit(&files(2, 0));
    let node = FakeNode::start(dir.path().join("node.sock"), 4 << 20);
    let state = dir.path().join("op");
    let mut syncer = syncer(&state, &remote.url(), "", node.client());
    syncer.sync_once().await.unwrap();
    assert_eq!(node.names(), vec!["w0", "w1"]);

    // The inventory cannot be replaced: a directory sits where the file goes.
    let inventory = state.join("inventory.json");
    std::fs::remove_file(&inventory).unwrap();
    std::fs::create_dir(&inventory).unwrap();
    let rev2 = remote.commit(&files(3, 0));
    for round in 1..=3u32 {
        let e = syncer.sync_once().await.unwrap_err();
        assert!(format!("{e:#}").contains("inventory.json"), "{e:#}");
        let st = status_on_disk(&state);
        assert_eq!(st["consecutiveFailures"], round, "{st:#}");
        assert_eq!(st["stale"], true, "{st:#}");
        assert!(
            st["error"].as_str().unwrap().contains("inventory.json"),
            "{st:#}"
        );
        assert_eq!(st["lastFetchedRevision"], rev2.as_str());
        assert_ne!(st["lastAppliedRevision"], rev2.as_str());
    }
    // Never acted without recording ownership first.
    assert_eq!(node.names(), vec!["w0", "w1"]);

    std::fs::remove_dir(&inventory).unwrap();
    syncer.sync_once().await.unwrap();
    let st = status_on_disk(&state);
    assert_eq!(st["consecutiveFailures"], 0);
    assert_eq!(st["stale"], false);
    assert!(st["error"].is_null());
    assert_eq!(st["lastAppliedRevision"], rev2.as_str());
    assert_eq!(node.names(), vec!["w0", "w1", "w2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_manifests_are_recorded_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Remote::new(dir.path());
    let rev = remote.commit(&files(1, 0));
    let node = FakeNode::start(dir.path().join("node.sock"), 4 << 20);
    let state = dir.path().join("op");
    // The manifests' directory is not in the commit.
    let mut syncer = syncer(&state, &remote.url(), "apps", node.client());
    for round in 1..=2u32 {
        let e = syncer.sync_once().await.unwrap_err();
        assert!(
            format!("{e:#}").contains("--path apps does not exist"),
            "{e:#}"
        );
        let st = status_on_disk(&state);
        assert_eq!(st["consecutiveFailures"], round, "{st:#}");
        assert_eq!(st["stale"], true);
        assert!(
            st["error"].as_str().unwrap().contains("read manifests"),
            "{st:#}"
        );
        assert_eq!(st["lastFetchedRevision"], rev.as_str());
    }
    assert!(node.names().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_node_is_recorded_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Remote::new(dir.path());
    remote.commit(&files(1, 0));
    let state = dir.path().join("op");
    let client = NodeClient::new(Endpoint::Unix(dir.path().join("no-node.sock")));
    let mut syncer = syncer(&state, &remote.url(), "", client);
    for round in 1..=2u32 {
        syncer.sync_once().await.unwrap_err();
        let st = status_on_disk(&state);
        assert_eq!(st["consecutiveFailures"], round, "{st:#}");
        assert!(
            st["error"].as_str().unwrap().starts_with("node: "),
            "{st:#}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_refused_as_too_large_are_split_and_an_oversized_workload_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let remote = Remote::new(dir.path());
    // A node that takes 64 KiB per request (the real one takes 4 MiB): 20 workloads of ~8 KiB
    // go in one 3 MiB batch, get 413, and must be split; one of 100 KiB never fits.
    let mut fs = files(20, 8 << 10);
    fs.push(("huge.yaml".into(), workload_yaml("huge", 100 << 10)));
    let rev = remote.commit(&fs);
    let node = FakeNode::start(dir.path().join("node.sock"), 64 << 10);
    let state = dir.path().join("op");
    let mut syncer = syncer(&state, &remote.url(), "", node.client());
    syncer.sync_once().await.unwrap();
    let names = node.names();
    assert_eq!(names.len(), 20, "{names:?}");
    assert!(!names.contains(&"huge".to_string()));
    assert!(node
        .state
        .lock()
        .unwrap()
        .applied_bodies
        .iter()
        .all(|&b| b <= 64 << 10));
    let st = syncer.status();
    assert_eq!(st.last_applied_revision.as_deref(), Some(rev.as_str()));
    assert!(
        st.error.is_none(),
        "a workload the node cannot take is not a failed sync"
    );
    let huge = st.workloads.iter().find(|w| w.name == "huge").unwrap();
    assert_eq!(huge.outcome, Outcome::Failed);
    let msg = huge.message.as_deref().unwrap();
    assert!(
        msg.contains("workload huge is 100.") && msg.contains("KiB"),
        "{msg}"
    );
    assert!(msg.contains("413"), "{msg}");
    // Not owned: nothing of it was applied.
    let inventory: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("inventory.json")).unwrap()).unwrap();
    assert!(inventory.get("huge").is_none(), "{inventory}");
    assert!(inventory.get("w19").is_some());
}

/// A hung fetch runs on a blocking thread: the task that runs the sync still answers (signals,
/// in the binary; a timer here) while the fetch waits on a server that never speaks.
#[test]
fn hung_fetch_does_not_block_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("git://{}/remote.git", silent.local_addr().unwrap());
    let held = std::thread::spawn(move || {
        let mut conns = Vec::new();
        while let Ok((c, _)) = silent.accept() {
            conns.push(c);
        }
    });
    drop(held);
    let state = dir.path().join("op");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let answered = rt.block_on(async {
            let client = NodeClient::new(Endpoint::Unix(state.join("no-node.sock")));
            let mut syncer = syncer(&state, &url, "", client);
            tokio::select! {
                _ = syncer.sync_once() => false,
                _ = tokio::time::sleep(Duration::from_millis(300)) => true,
            }
        });
        // The fetch is still stuck: leave it behind as the binary does.
        rt.shutdown_timeout(Duration::from_millis(100));
        let _ = tx.send(answered);
    });
    let started = Instant::now();
    let answered = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the runtime was blocked by the fetch");
    assert!(answered, "the fetch from a silent server returned");
    assert!(started.elapsed() < Duration::from_secs(5));
}
