//! The controller's calls to the nodes, through [`NodeApi`]: every node's share is applied at
//! once, each within a deadline, and a removal that outlasts a short wait goes on in the
//! background, tracked so that the next reconcile neither waits for it nor starts another.
//! Tested with [`crate::node_api::FakeNode`]s that hang, fail and answer slowly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hyperbox_api::Workload;
use hyperbox_client::ClientError;
use tokio::task::JoinHandle;

use crate::node_api::NodeApi;

/// How long a node may take to answer an apply. A node that hangs delays only its own share
/// of the workload that is being reconciled: the others are applied at the same time, other
/// workloads are reconciled beside it, and the apply is retried at the next reconcile.
pub const NODE_APPLY_DEADLINE: Duration = Duration::from_secs(15);
/// How long a reconcile waits for a node to remove a workload before it leaves the removal
/// running (a long termination grace period) and looks again at the next reconcile.
pub const REMOVAL_WAIT: Duration = Duration::from_secs(5);

/// A copy to send to a node.
pub struct Send {
    pub node: String,
    pub api: Arc<dyn NodeApi>,
    pub copy: Workload,
    /// Its config hash (what the controller remembers as applied there).
    pub copy_hash: String,
}

#[derive(Debug, PartialEq, Eq)]
pub enum ApplyError {
    /// The node's admission or policy said no: place elsewhere.
    Refused(String),
    /// Another manager owns a workload of that name on the node.
    Conflict(String),
    Unreachable(String),
}

/// Apply every copy at once, each within [`NODE_APPLY_DEADLINE`]; (node, copy hash, result)
/// for each, in the order given.
pub async fn send_all(
    sends: Vec<Send>,
    manager: &str,
    prefix: &str,
) -> Vec<(String, String, Result<(), ApplyError>)> {
    futures::future::join_all(sends.into_iter().map(|s| async move {
        let r = tokio::time::timeout(
            NODE_APPLY_DEADLINE,
            apply_one(s.api.as_ref(), manager, prefix, s.copy),
        )
        .await
        .unwrap_or_else(|_| {
            Err(ApplyError::Unreachable(format!(
                "no answer within {}s",
                NODE_APPLY_DEADLINE.as_secs()
            )))
        });
        (s.node, s.copy_hash, r)
    }))
    .await
}

/// Apply one copy as `manager`. A workload of the same name left by another manager of this
/// cluster (`prefix`: an earlier object of that name, deleted while the operator was away) is
/// taken over; anyone else's is a conflict.
pub async fn apply_one(
    api: &dyn NodeApi,
    manager: &str,
    prefix: &str,
    w: Workload,
) -> Result<(), ApplyError> {
    let key = w.key();
    let e = match api.apply(manager, false, w.clone()).await {
        Ok(()) => return Ok(()),
        Err(e) => e,
    };
    match &e {
        ClientError::Api { status: 409, .. } => {
            let owner = api.get(&key).await.ok().and_then(|s| s.manager);
            if owner.as_deref().is_some_and(|m| m.starts_with(prefix)) {
                return api
                    .apply(manager, true, w)
                    .await
                    .map_err(|e| ApplyError::Unreachable(e.to_string()));
            }
            Err(ApplyError::Conflict(format!(
                "managed by {}",
                owner.unwrap_or_else(|| "another source".into())
            )))
        }
        ClientError::Api {
            status: 403 | 400,
            body,
        } => Err(ApplyError::Refused(
            body.fields
                .first()
                .map(|f| f.message.clone())
                .unwrap_or_else(|| body.error.clone()),
        )),
        _ => Err(ApplyError::Unreachable(e.to_string())),
    }
}

/// How a removal from a node went.
#[derive(Debug, PartialEq, Eq)]
pub enum Removal {
    Done,
    /// Still running in the background (the containers' grace period).
    Running,
    Failed(String),
}

/// A removal running in the background, by (node, workload).
type Running = HashMap<(String, String), JoinHandle<Result<(), ClientError>>>;

/// Removals still running.
#[derive(Default)]
pub struct Removals {
    running: Mutex<Running>,
}

impl Removals {
    fn lock(&self) -> std::sync::MutexGuard<'_, Running> {
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a removal of `key` from `node` is still running.
    pub fn running(&self, node: &str, key: &str) -> bool {
        self.lock()
            .contains_key(&(node.to_string(), key.to_string()))
    }

    /// Remove workload `key` from `node`, waiting at most [`REMOVAL_WAIT`]: a removal that
    /// takes longer keeps running in the background, and the next call for it picks it up
    /// instead of starting a second one.
    pub async fn remove(
        &self,
        node: &str,
        key: &str,
        manager: &str,
        api: Arc<dyn NodeApi>,
    ) -> Removal {
        let slot = (node.to_string(), key.to_string());
        let running = self.lock().remove(&slot);
        let mut handle = running.unwrap_or_else(|| tokio::spawn(api.delete(manager, key)));
        match tokio::time::timeout(REMOVAL_WAIT, &mut handle).await {
            Err(_) => {
                self.lock().insert(slot, handle);
                Removal::Running
            }
            Ok(Ok(Ok(()))) => Removal::Done,
            Ok(Ok(Err(e))) if e.status() == Some(404) => Removal::Done,
            Ok(Ok(Err(e))) => Removal::Failed(e.to_string()),
            Ok(Err(e)) => Removal::Failed(format!("removal task: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node_api::{Behavior, FakeNode};

    const PREFIX: &str = "kubernetes:c/";

    fn workload(name: &str) -> Workload {
        let doc = format!(
            "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  image: busybox\n"
        );
        serde_norway::from_str(&doc).unwrap()
    }

    fn send(node: &str, fake: &FakeNode, name: &str) -> Send {
        Send {
            node: node.into(),
            api: Arc::new(fake.clone()),
            copy: workload(name),
            copy_hash: format!("hash-{node}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_node_costs_its_deadline_and_the_others_are_applied_at_once() {
        let (a, b, hung) = (
            FakeNode::new(Behavior::Slow(Duration::from_secs(2))),
            FakeNode::new(Behavior::Answer),
            FakeNode::new(Behavior::Hang),
        );
        let started = tokio::time::Instant::now();
        let out = send_all(
            vec![
                send("a", &a, "web"),
                send("hung", &hung, "web"),
                send("b", &b, "web"),
            ],
            "kubernetes:c/uid-1",
            PREFIX,
        )
        .await;
        // Together: the hung node's deadline, not the sum of the nodes' times.
        assert_eq!(started.elapsed(), NODE_APPLY_DEADLINE);
        assert_eq!(out[0], ("a".into(), "hash-a".into(), Ok(())));
        assert_eq!(out[2], ("b".into(), "hash-b".into(), Ok(())));
        assert_eq!(
            out[1].2,
            Err(ApplyError::Unreachable("no answer within 15s".into()))
        );
        assert_eq!(a.holds("web").unwrap().0, "kubernetes:c/uid-1");
        assert_eq!(hung.calls(), vec!["apply web as kubernetes:c/uid-1"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_leftover_of_this_cluster_is_taken_over_and_anyone_elses_is_a_conflict() {
        let node = FakeNode::new(Behavior::Answer);
        node.put("kubernetes:c/old-uid", workload("web"));
        node.put("git:https://example.com/repo#apps", workload("db"));
        let me = "kubernetes:c/new-uid";
        assert_eq!(apply_one(&node, me, PREFIX, workload("web")).await, Ok(()));
        assert_eq!(node.holds("web").unwrap().0, me);
        assert_eq!(
            apply_one(&node, me, PREFIX, workload("db")).await,
            Err(ApplyError::Conflict(
                "managed by git:https://example.com/repo#apps".into()
            ))
        );
        assert_eq!(
            node.holds("db").unwrap().0,
            "git:https://example.com/repo#apps"
        );
        let refused = FakeNode::new(Behavior::Fail(403));
        assert!(matches!(
            apply_one(&refused, me, PREFIX, workload("web")).await,
            Err(ApplyError::Refused(_))
        ));
        let down = FakeNode::new(Behavior::Fail(503));
        assert!(matches!(
            apply_one(&down, me, PREFIX, workload("web")).await,
            Err(ApplyError::Unreachable(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_removal_goes_on_in_the_background_and_is_never_started_twice() {
        let node = FakeNode::new(Behavior::Answer);
        let me = "kubernetes:c/uid-1";
        node.put(me, workload("web"));
        // Its containers take 30 s to stop (their grace period).
        node.set(Behavior::Slow(Duration::from_secs(30)));
        let removals = Removals::default();
        let api: Arc<dyn NodeApi> = Arc::new(node.clone());
        let started = tokio::time::Instant::now();
        let first = removals.remove("n1", "web", me, api.clone()).await;
        assert_eq!(first, Removal::Running);
        assert_eq!(started.elapsed(), REMOVAL_WAIT);
        assert!(removals.running("n1", "web"));
        let second = removals.remove("n1", "web", me, api.clone()).await;
        assert_eq!(second, Removal::Running);
        tokio::time::sleep(Duration::from_secs(30)).await;
        let third = removals.remove("n1", "web", me, api.clone()).await;
        assert_eq!(third, Removal::Done);
        assert!(!removals.running("n1", "web"));
        assert!(node.holds("web").is_none());
        assert_eq!(node.calls().len(), 1, "{:?}", node.calls());
        // Gone already: done.
        node.set(Behavior::Answer);
        assert_eq!(removals.remove("n1", "web", me, api).await, Removal::Done);
    }
}
