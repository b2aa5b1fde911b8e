//! Orchestration tests without root: the real supervisor and actors over the in-memory
//! runtime and an instant image source.

use std::sync::Arc;
use std::time::Duration;

use hyperbox_api::{ApplyAction, Phase, Workload};

use super::*;
use crate::containers::fake::FakeRuntime;
use crate::images::{ImageConfig, ImageError, ImageFuture, ImageSource, PreparedImage};

struct InstantImages;

impl ImageSource for InstantImages {
    fn prepare(self: Arc<Self>, reference: String) -> ImageFuture {
        Box::pin(async move {
            if reference.contains("missing") {
                return Err(ImageError::Pull(format!("{reference}: not found")));
            }
            Ok(PreparedImage {
                digest: format!("sha256:{:0>64}", reference.len()),
                lowers: vec!["/nonexistent".into()],
                config: ImageConfig::default(),
                rootfs_kind: "directory".into(),
            })
        })
    }

    fn progress_of(&self, _: &str) -> Option<hyperbox_api::PullProgress> {
        None
    }
}

fn cfg() -> SupervisorConfig {
    SupervisorConfig {
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(100),
        ..Default::default()
    }
}

fn sup(dir: &std::path::Path, rt: &Arc<FakeRuntime>) -> Arc<Supervisor> {
    Supervisor::new(
        dir,
        dir.join("volumes"),
        rt.clone(),
        Arc::new(InstantImages),
        None,
        cfg(),
    )
    .unwrap()
}

/// A state dir, the in-memory runtime and a supervisor over both.
fn setup() -> (tempfile::TempDir, Arc<FakeRuntime>, Arc<Supervisor>) {
    let dir = tempfile::tempdir().unwrap();
    let rt = Arc::new(FakeRuntime::new());
    let s = sup(dir.path(), &rt);
    (dir, rt, s)
}

fn workload(name: &str, extra: &str) -> Workload {
    serde_norway::from_str(&format!(
        "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n  image: reg/img:1\n  terminationGracePeriodSeconds: 1\n{extra}"
    ))
    .unwrap()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Poll the workload's status until `pred` holds; returns that status.
async fn wait_status(
    s: &Arc<Supervisor>,
    name: &str,
    what: &str,
    pred: impl Fn(&hyperbox_api::WorkloadStatus) -> bool,
) -> hyperbox_api::WorkloadStatus {
    let mut last = None;
    for _ in 0..400 {
        last = s.status(name).await;
        if let Some(st) = &last {
            if pred(st) {
                return st.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for {what}: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_applies_of_a_new_name_make_one_workload() {
    let (_dir, rt, s) = setup();
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.apply(vec![workload("a", "  replicas: 2\n")])
                .await
                .unwrap()
        }));
    }
    let mut created = 0;
    for t in tasks {
        if t.await.unwrap()[0].action == ApplyAction::Created {
            created += 1;
        }
    }
    assert_eq!(created, 1, "exactly one apply creates the workload");
    eventually("two running containers", || rt.running().len() == 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rt.running().len(), 2);
    assert_eq!(rt.starts(), 2, "no replica started twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_then_quick_reapply_keeps_the_new_workload() {
    let (dir, rt, s) = setup();
    s.apply(vec![workload("a", "")]).await.unwrap();
    eventually("running", || rt.running().len() == 1).await;
    let old = rt.running();
    let d = {
        let s = s.clone();
        tokio::spawn(async move { s.delete("a").await.unwrap() })
    };
    // Re-apply while the delete is in flight: it waits for the delete, then creates afresh.
    tokio::time::sleep(Duration::from_millis(1)).await;
    let r = s.apply(vec![workload("a", "")]).await.unwrap();
    assert!(d.await.unwrap());
    assert_eq!(r[0].action, ApplyAction::Created);
    eventually("new container running", || {
        let now = rt.running();
        now.len() == 1 && now != old
    })
    .await;
    // Its record survived the delete's cleanup.
    assert!(dir.path().join("workloads/a.json").exists());
    wait_status(&s, "a", "running", |st| st.phase == Phase::Running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_delete_completes_and_never_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Arc::new(FakeRuntime::new());
    {
        let s = sup(dir.path(), &rt);
        s.apply(vec![workload("a", "")]).await.unwrap();
        eventually("running", || rt.running().len() == 1).await;
        // The client goes away at once.
        let _ = tokio::time::timeout(Duration::ZERO, s.delete("a")).await;
        eventually("stopped", || rt.running().is_empty()).await;
        eventually("record removed", || {
            !dir.path().join("workloads/a.json").exists()
        })
        .await;
        s.detach_all().await;
    }
    let s = sup(dir.path(), &rt);
    s.recover().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(s.status("a").await.is_none());
    assert!(rt.running().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_cut_short_by_a_crash_is_finished_by_recovery() {
    let (dir, rt, s) = setup();
    s.apply(vec![workload("a", "")]).await.unwrap();
    eventually("running", || rt.running().len() == 1).await;
    s.detach_all().await;
    // What a crash right after the delete was accepted leaves: the record says deleting.
    let path = dir.path().join("workloads/a.json");
    let mut rec: WorkloadRecord = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    rec.deleting = true;
    std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
    let s = sup(dir.path(), &rt);
    s.recover().await.unwrap();
    eventually("container stopped", || rt.running().is_empty()).await;
    eventually("record removed", || !path.exists()).await;
    for _ in 0..400 {
        if s.status("a").await.is_none() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("the workload is still listed after its delete finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_adopts_proven_containers_and_replaces_the_rest() {
    let (dir, rt, s) = setup();
    s.apply(vec![workload("a", "  replicas: 2\n")])
        .await
        .unwrap();
    eventually("running", || rt.running().len() == 2).await;
    s.detach_all().await;
    let before = rt.running();
    // One container dies while the daemon is away.
    rt.exit(&before[0], 1);
    let s = sup(dir.path(), &rt);
    s.recover().await.unwrap();
    eventually("two running again", || rt.running().len() == 2).await;
    let after = rt.running();
    assert!(
        after.contains(&before[1]),
        "the live one is adopted, not restarted"
    );
    assert!(!after.contains(&before[0]));
    wait_status(&s, "a", "the lost replica counted as a restart", |st| {
        st.restarts == 1 && st.phase == Phase::Running
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_record_keeps_its_containers_and_is_reported() {
    let (dir, rt, s) = setup();
    s.apply(vec![workload("web", ""), workload("other", "")])
        .await
        .unwrap();
    eventually("running", || rt.running().len() == 2).await;
    s.detach_all().await;
    std::fs::write(dir.path().join("workloads/web.json"), b"{not json").unwrap();
    let s = sup(dir.path(), &rt);
    s.recover().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(rt.running().len(), 2, "nothing killed");
    let st = s.status("web").await.unwrap();
    assert_eq!(st.phase, Phase::Unknown);
    assert_eq!(st.reason, Some(hyperbox_api::Reason::RecordUnreadable));
    assert!(s.list().await.iter().any(|w| w.name == "web"));
    // Applying it again replaces the orphan with a managed container.
    s.apply(vec![workload("web", "")]).await.unwrap();
    eventually("one web container", || {
        rt.running()
            .iter()
            .filter(|i| i.starts_with("web-"))
            .count()
            == 1
            && rt.starts() == 3
    })
    .await;
    let mut st = None;
    for _ in 0..200 {
        st = s.status("web").await;
        if st.as_ref().is_some_and(|x| x.phase == Phase::Running) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let st = st.unwrap();
    assert_eq!(
        (st.phase, st.reason),
        (Phase::Running, None),
        "managed again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_change_stops_old_containers_before_new_ones_start() {
    let (_dir, rt, s) = setup();
    s.apply(vec![workload("a", "  replicas: 2\n")])
        .await
        .unwrap();
    eventually("running", || rt.running().len() == 2).await;
    let old = rt.running();
    let r = s
        .apply(vec![workload("a", "  replicas: 2\n  args: [x]\n")])
        .await
        .unwrap();
    assert_eq!(r[0].action, ApplyAction::Configured);
    eventually("replaced", || {
        let now = rt.running();
        now.len() == 2 && now.iter().all(|i| !old.contains(i))
    })
    .await;
    // Old containers are destroyed, not just stopped.
    let all = rt.containers();
    assert!(old.iter().all(|i| !all.contains_key(i)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_loops_restart_with_backoff_and_failed_starts_retry() {
    let (_dir, rt, s) = setup();
    s.apply(vec![workload("a", "")]).await.unwrap();
    for round in 0..3 {
        eventually("running", || rt.running().len() == 1).await;
        let id = rt.running()[0].clone();
        rt.exit(&id, 3);
        let want = round + 1;
        wait_status(&s, "a", "restart counted", |st| st.restarts == want).await;
    }
    eventually("running", || rt.running().len() == 1).await;
    rt.fail_starts(Some("boom"));
    let id = rt.running()[0].clone();
    rt.exit(&id, 1);
    wait_status(&s, "a", "a start failure", |st| {
        st.reason == Some(hyperbox_api::Reason::CreateContainerError)
    })
    .await;
    rt.fail_starts(None);
    eventually("running after the failures", || rt.running().len() == 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_failures_back_off_and_report() {
    let (_dir, rt, s) = setup();
    let mut w = workload("a", "");
    w.spec.image = "reg/missing:1".into();
    s.apply(vec![w]).await.unwrap();
    let st = wait_status(&s, "a", "pull back-off", |st| {
        st.reason == Some(hyperbox_api::Reason::ImagePullBackOff)
    })
    .await;
    assert_eq!(st.phase, Phase::Pending);
    assert_eq!(rt.starts(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_applies_and_deletes_never_fail_or_leave_strays() {
    let (dir, rt, s) = setup();
    for round in 0..40 {
        let a = {
            let s = s.clone();
            tokio::spawn(async move { s.apply(vec![workload("a", "")]).await })
        };
        let d = {
            let s = s.clone();
            tokio::spawn(async move { s.delete("a").await })
        };
        let applied = a.await.unwrap();
        assert!(applied.is_ok(), "round {round}: {applied:?}");
        assert!(d.await.unwrap().is_ok());
        // Whatever the order was, the node ends consistent: the workload exists with one
        // container, or it does not exist and nothing runs.
        let exists = s.status("a").await.is_some();
        let want = usize::from(exists);
        eventually("containers match the workload", || {
            rt.running().len() == want
        })
        .await;
        assert_eq!(
            dir.path().join("workloads/a.json").exists(),
            exists,
            "round {round}: record and registry disagree"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scaling_keeps_the_survivors() {
    let (_dir, rt, s) = setup();
    s.apply(vec![workload("a", "  replicas: 2\n")])
        .await
        .unwrap();
    eventually("two running", || rt.running().len() == 2).await;
    let two = rt.running();
    let r = s
        .apply(vec![workload("a", "  replicas: 3\n")])
        .await
        .unwrap();
    assert_eq!(r[0].action, ApplyAction::Configured);
    eventually("three running", || rt.running().len() == 3).await;
    let three = rt.running();
    assert!(
        two.iter().all(|id| three.contains(id)),
        "{two:?} -> {three:?}"
    );
    s.apply(vec![workload("a", "  replicas: 1\n")])
        .await
        .unwrap();
    eventually("one running", || rt.running().len() == 1).await;
    let st = wait_status(&s, "a", "one replica", |st| st.replicas.len() == 1).await;
    // The survivor is ordinal 0, the same container all along.
    assert_eq!(st.replicas[0].index, 0);
    let first = two.iter().find(|id| id.starts_with("a-0-")).unwrap();
    assert_eq!(rt.running(), vec![first.clone()]);
    assert_eq!(st.restarts, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_one_replica_leaves_the_others_alone() {
    let (_dir, rt, s) = setup();
    s.apply(vec![workload("a", "  replicas: 2\n")])
        .await
        .unwrap();
    eventually("two running", || rt.running().len() == 2).await;
    let before = rt.running();
    let zero = before
        .iter()
        .find(|i| i.starts_with("a-0-"))
        .unwrap()
        .clone();
    let one = before
        .iter()
        .find(|i| i.starts_with("a-1-"))
        .unwrap()
        .clone();
    assert!(s.restart("a", Some(1)).await.unwrap());
    eventually("replica 1 replaced", || {
        let now = rt.running();
        now.len() == 2 && now.contains(&zero) && !now.contains(&one)
    })
    .await;
    let st = wait_status(&s, "a", "restart counted", |st| {
        st.replicas.iter().all(|r| r.phase == Phase::Running) && st.replicas[1].restarts == 1
    })
    .await;
    assert_eq!(st.replicas[0].restarts, 0);
    assert!(!s.restart("a", Some(7)).await.unwrap(), "no replica 7");
    assert!(!s.restart("nope", None).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managers_own_what_they_apply() {
    let (_dir, _rt, s) = setup();
    let a = Some("git:a".to_string());
    let b = Some("git:b".to_string());
    s.apply_as(vec![workload("w", "")], a.clone(), false)
        .await
        .unwrap()
        .unwrap();
    // Another manager is refused, with the owner named, and nothing is applied.
    let refused = s
        .apply_as(
            vec![workload("x", ""), workload("w", "  args: [b]\n")],
            b.clone(),
            false,
        )
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(refused, Refused::Conflicts(vec![(1, "git:a".to_string())]));
    assert!(
        s.status("x").await.is_none(),
        "a refused batch applies nothing"
    );
    assert_eq!(
        s.delete_as("w", b.as_deref(), false).await.unwrap(),
        Err("git:a".to_string())
    );
    // By hand: allowed, and the owner stays.
    s.apply(vec![workload("w", "  args: [hand]\n")])
        .await
        .unwrap();
    assert_eq!(
        s.status("w").await.unwrap().manager.as_deref(),
        Some("git:a")
    );
    // A forced takeover changes the owner.
    s.apply_as(vec![workload("w", "")], b.clone(), true)
        .await
        .unwrap()
        .unwrap();
    let st = wait_status(&s, "w", "owned by b", |st| {
        st.manager.as_deref() == Some("git:b")
    })
    .await;
    assert_eq!(st.name, "w");
    let digests: Vec<hyperbox_api::WorkloadDigest> =
        serde_json::from_slice(&s.digests_json().await).unwrap();
    assert_eq!(digests.len(), 1);
    assert_eq!(digests[0].name, "w");
    assert_eq!(digests[0].manager.as_deref(), Some("git:b"));
    assert_eq!(digests[0].spec_hash, st.spec_hash);
    assert_eq!(
        digests[0].config_hash,
        hyperbox_api::config_hash(&workload("w", ""))
    );
    assert_eq!(
        s.delete_as("w", b.as_deref(), false).await.unwrap(),
        Ok(true)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_replica_stays_stopped_until_restarted() {
    let (dir, rt, s) = setup();
    s.apply(vec![workload("a", "  replicas: 2\n")])
        .await
        .unwrap();
    eventually("two running", || rt.running().len() == 2).await;
    assert!(s.evict("a", 1, "memory pressure").await.unwrap());
    eventually("one running", || rt.running().len() == 1).await;
    let st = wait_status(&s, "a", "evicted", |st| {
        st.replicas[1].reason == Some(hyperbox_api::Reason::Evicted)
    })
    .await;
    assert_eq!(st.replicas[1].phase, Phase::Failed);
    assert!(st.replicas[1]
        .message
        .as_deref()
        .unwrap()
        .contains("memory pressure"));
    assert_eq!(st.replicas[0].phase, Phase::Running);
    // It survives a daemon restart as evicted.
    s.detach_all().await;
    let s = sup(dir.path(), &rt);
    s.recover().await.unwrap();
    let st = wait_status(&s, "a", "recovered", |st| {
        st.replicas[0].phase == Phase::Running
    })
    .await;
    assert_eq!(st.replicas[1].reason, Some(hyperbox_api::Reason::Evicted));
    assert_eq!(rt.running().len(), 1);
    // A restart brings it back.
    assert!(s.restart("a", Some(1)).await.unwrap());
    eventually("two running again", || rt.running().len() == 2).await;
    assert!(!s.evict("a", 9, "x").await.unwrap());
}

/// Samples a workload's status until `done` holds: (min ready, max containers) over the run.
async fn sample_rollout(
    s: &Arc<Supervisor>,
    name: &str,
    done: impl Fn(&hyperbox_api::WorkloadStatus) -> bool,
) -> (u32, u32, hyperbox_api::WorkloadStatus) {
    let (mut min_ready, mut max_current) = (u32::MAX, 0);
    for _ in 0..4000 {
        let st = s.status(name).await.unwrap();
        min_ready = min_ready.min(st.ready_replicas);
        max_current = max_current.max(st.current_replicas);
        if done(&st) {
            return (min_ready, max_current, st);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!(
        "rollout of {name} did not finish: {:?}",
        s.status(name).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_updates_keep_enough_replicas_ready() {
    let (_dir, rt, s) = setup();
    s.apply(vec![workload("w", "  replicas: 4\n")])
        .await
        .unwrap();
    let st = wait_status(&s, "w", "4 ready", |st| st.ready_replicas == 4).await;
    assert!(st.rollout_complete(), "{st:?}");
    let old: Vec<String> = rt.running();
    s.apply(vec![workload("w", "  replicas: 4\n  args: [v2]\n")])
        .await
        .unwrap();
    let (min_ready, max_current, st) =
        sample_rollout(&s, "w", |st| st.generation == 2 && st.rollout_complete()).await;
    // Defaults: 25% of 4 is one surge replica and one unavailable.
    assert!(min_ready >= 3, "ready dropped to {min_ready}");
    assert!(max_current <= 5, "{max_current} containers at once");
    assert_eq!(st.observed_generation, 2);
    assert_eq!((st.updated_replicas, st.ready_replicas), (4, 4));
    assert!(st.replicas.iter().all(|r| !r.outdated));
    eventually("old containers gone", || {
        let now = rt.running();
        now.len() == 4 && now.iter().all(|c| !old.contains(c))
    })
    .await;

    // maxUnavailable 0: a new replica must be ready before any old one stops.
    s.apply(vec![workload(
        "w",
        "  replicas: 4\n  args: [v3]\n  strategy: {rollingUpdate: {maxUnavailable: 0, maxSurge: 2}}\n",
    )])
    .await
    .unwrap();
    let (min_ready, max_current, _) =
        sample_rollout(&s, "w", |st| st.generation == 3 && st.rollout_complete()).await;
    assert_eq!(min_ready, 4);
    assert!(max_current <= 6, "{max_current}");

    // Recreate: never more than the replica count.
    s.apply(vec![workload(
        "w",
        "  replicas: 4\n  args: [v4]\n  strategy: {type: Recreate}\n",
    )])
    .await
    .unwrap();
    let (_, max_current, _) =
        sample_rollout(&s, "w", |st| st.generation == 4 && st.rollout_complete()).await;
    assert!(max_current <= 4, "{max_current}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_version_halts_the_rollout_and_old_replicas_keep_serving() {
    let (dir, rt, s) = setup();
    s.apply(vec![workload("w", "  replicas: 4\n")])
        .await
        .unwrap();
    wait_status(&s, "w", "4 ready", |st| st.ready_replicas == 4).await;
    rt.fail_starts(Some("exec: no such file"));
    s.apply(vec![workload(
        "w",
        "  replicas: 4\n  args: [broken]\n  progressDeadlineSeconds: 1\n",
    )])
    .await
    .unwrap();
    let st = wait_status(&s, "w", "deadline exceeded", |st| {
        st.reason == Some(hyperbox_api::Reason::ProgressDeadlineExceeded)
    })
    .await;
    let msg = st.message.clone().unwrap();
    assert!(msg.contains("old replicas keep serving"), "{msg}");
    assert_eq!(st.ready_replicas, 3, "{st:?}");
    assert_eq!(
        st.replicas.iter().filter(|r| r.outdated && r.ready).count(),
        3
    );
    assert!(!st.ready && !st.rollout_complete());
    assert_eq!(rt.running().len(), 3);
    // Still halted after a daemon restart: the old replicas are adopted, not restarted.
    let running = rt.running();
    s.detach_all().await;
    let s = sup(dir.path(), &rt);
    s.recover().await.unwrap();
    let st = wait_status(&s, "w", "recovered", |st| st.ready_replicas == 3).await;
    assert_eq!(
        st.reason,
        Some(hyperbox_api::Reason::ProgressDeadlineExceeded)
    );
    assert_eq!(rt.running(), running);
    // A fixed version rolls out from there.
    rt.fail_starts(None);
    s.apply(vec![workload("w", "  replicas: 4\n  args: [fixed]\n")])
        .await
        .unwrap();
    let (min_ready, _, st) = sample_rollout(&s, "w", |st| st.rollout_complete()).await;
    assert!(min_ready >= 3);
    assert_eq!(st.generation, 3);
    assert!(st.reason.is_none(), "{st:?}");
}
