//! What the operator asks of a node, as a trait: the node client answers it over the node's
//! API, and [`FakeNode`] in memory, recording the calls and answering, failing or hanging as
//! told, so that what the operator does with slow, failing and hung nodes is tested without
//! a node or a network.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;
use hyperbox_api::{ApiError, Workload, WorkloadStatus};
use hyperbox_client::{ClientError, NodeClient};

pub trait NodeApi: Send + Sync + 'static {
    /// Apply `w` as `manager`; `force` takes it over from another manager.
    fn apply(
        &self,
        manager: &str,
        force: bool,
        w: Workload,
    ) -> BoxFuture<'static, Result<(), ClientError>>;
    /// What the node reports of workload `key`.
    fn get(&self, key: &str) -> BoxFuture<'static, Result<WorkloadStatus, ClientError>>;
    /// Delete workload `key` as `manager`; answers once its containers stopped.
    fn delete(&self, manager: &str, key: &str) -> BoxFuture<'static, Result<(), ClientError>>;
}

impl NodeApi for NodeClient {
    fn apply(
        &self,
        manager: &str,
        force: bool,
        w: Workload,
    ) -> BoxFuture<'static, Result<(), ClientError>> {
        let c = self.clone().with_manager(manager.to_string(), force);
        async move { c.apply(vec![w]).await.map(drop) }.boxed()
    }

    fn get(&self, key: &str) -> BoxFuture<'static, Result<WorkloadStatus, ClientError>> {
        let (c, key) = (self.clone(), key.to_string());
        async move { NodeClient::get(&c, &key).await }.boxed()
    }

    fn delete(&self, manager: &str, key: &str) -> BoxFuture<'static, Result<(), ClientError>> {
        let c = self.clone().with_manager(manager.to_string(), false);
        let key = key.to_string();
        async move { NodeClient::delete(&c, &key).await }.boxed()
    }
}

/// How a [`FakeNode`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behavior {
    /// As a node does.
    Answer,
    /// Answers after this long.
    Slow(Duration),
    /// Never answers.
    Hang,
    /// Answers with this error status.
    Fail(u16),
}

/// A node in memory: it keeps the workloads applied to it with their manager, refuses
/// another manager's workload without `force` (409) as a node does, and records every call.
#[derive(Clone, Default)]
pub struct FakeNode {
    inner: Arc<Mutex<Fake>>,
}

#[derive(Default)]
struct Fake {
    behavior: Option<Behavior>,
    workloads: BTreeMap<String, (String, Workload)>,
    calls: Vec<String>,
}

fn api_error(status: u16, message: String) -> ClientError {
    ClientError::Api {
        status,
        body: ApiError {
            error: message,
            fields: Vec::new(),
        },
    }
}

impl FakeNode {
    pub fn new(behavior: Behavior) -> FakeNode {
        let f = FakeNode::default();
        f.set(behavior);
        f
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Fake> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set(&self, behavior: Behavior) {
        self.lock().behavior = Some(behavior);
    }

    /// Calls so far: `apply <key> as <manager>`, `get <key>`, `delete <key> as <manager>`.
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// The manager and spec of workload `key`, if it holds one.
    pub fn holds(&self, key: &str) -> Option<(String, Workload)> {
        self.lock().workloads.get(key).cloned()
    }

    /// Hold `w` as `manager` (as left by an earlier operator or by hand).
    pub fn put(&self, manager: &str, w: Workload) {
        self.lock()
            .workloads
            .insert(w.key(), (manager.to_string(), w));
    }

    /// Record the call, then answer `f` after the behavior's delay (or never).
    fn call<T: Send + 'static>(
        &self,
        what: String,
        f: impl FnOnce(&mut Fake) -> Result<T, ClientError> + Send + 'static,
    ) -> BoxFuture<'static, Result<T, ClientError>> {
        let behavior = {
            let mut g = self.lock();
            g.calls.push(what);
            g.behavior.clone().unwrap_or(Behavior::Answer)
        };
        let inner = self.inner.clone();
        async move {
            match behavior {
                Behavior::Hang => futures::future::pending::<()>().await,
                Behavior::Slow(d) => tokio::time::sleep(d).await,
                Behavior::Fail(status) => {
                    return Err(api_error(status, format!("fake node failed ({status})")))
                }
                Behavior::Answer => {}
            }
            let mut g = inner.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut g)
        }
        .boxed()
    }
}

impl NodeApi for FakeNode {
    fn apply(
        &self,
        manager: &str,
        force: bool,
        w: Workload,
    ) -> BoxFuture<'static, Result<(), ClientError>> {
        let key = w.key();
        let manager = manager.to_string();
        self.call(format!("apply {key} as {manager}"), move |f| {
            if let Some((owner, _)) = f.workloads.get(&key) {
                if *owner != manager && !force {
                    return Err(api_error(409, format!("managed by {owner}")));
                }
            }
            f.workloads.insert(key, (manager, w));
            Ok(())
        })
    }

    fn get(&self, key: &str) -> BoxFuture<'static, Result<WorkloadStatus, ClientError>> {
        let key = key.to_string();
        self.call(format!("get {key}"), move |f| match f.workloads.get(&key) {
            Some((manager, w)) => Ok(WorkloadStatus {
                name: w.metadata.name.clone(),
                manager: Some(manager.clone()),
                spec_hash: hyperbox_api::spec_hash(w),
                ..WorkloadStatus::default()
            }),
            None => Err(api_error(404, format!("workload {key:?} not found"))),
        })
    }

    fn delete(&self, manager: &str, key: &str) -> BoxFuture<'static, Result<(), ClientError>> {
        let (key, manager) = (key.to_string(), manager.to_string());
        self.call(format!("delete {key} as {manager}"), move |f| {
            match f.workloads.get(&key) {
                None => Err(api_error(404, format!("workload {key:?} not found"))),
                Some((owner, _)) if *owner != manager => {
                    Err(api_error(409, format!("managed by {owner}")))
                }
                Some(_) => {
                    f.workloads.remove(&key);
                    Ok(())
                }
            }
        })
    }
}
