//! The operator's view of the node runtimes registered as HyperNodes: a watch of the
//! HyperNode objects, one long-poll per node of the workloads it runs (so the controller reads
//! a cache instead of asking every node at every reconcile), and the node lifecycle: what the
//! fleet core's [`Liveness`] makes of each node's heartbeats (seen to change, on the
//! operator's own clock) and of its direct reachability. A node silent and unreachable past
//! the monitor grace is marked `Ready=False`; past the eviction grace its replicas move,
//! unless most nodes look down at once ([`crate::fleet_core::liveness::disrupted`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hyperbox_api::hypernode::{HyperNodeStatus, NodeCondition, CONDITION_READY};
use hyperbox_api::{NodeSummary, WorkloadStatus};
use hyperbox_client::tls::TlsFiles;
use hyperbox_client::{Endpoint, NodeClient};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use tokio::sync::mpsc;

use super::crd::{KubeHyperNode, KubeWorkload};
use crate::fleet_core::liveness::{keeps_replicas, Health, Judge, Liveness, LivenessTimings};
use crate::fleet_core::place::NodeView;

/// How the operator reaches the nodes' APIs.
#[derive(Clone, Default)]
pub struct NodeAccess {
    pub token: Option<String>,
    pub tls: TlsFiles,
    /// The leader's epoch, sent with every request once elected (see
    /// [`hyperbox_client::Fence`]).
    pub fence: Option<std::sync::Arc<hyperbox_client::Fence>>,
    /// Use plain http:// node addresses too (by default only https://).
    pub allow_http: bool,
}

#[derive(Debug, Clone)]
pub struct NodeTimings {
    /// A node whose last heartbeat is older than this is marked `Ready=False`.
    pub monitor_grace: Duration,
    /// A node not ready for this long loses its replicas to other nodes.
    pub eviction_grace: Duration,
    /// How long one long-poll of a node's workloads is held.
    pub watch_timeout: Duration,
}

/// One HyperNode as the operator knows it.
pub struct NodeEntry {
    pub name: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub status: HyperNodeStatus,
    pub client: NodeClient,
    /// The node's own last answer to `GET /v1/node` (fresher than the HyperNode's status).
    pub summary: Option<NodeSummary>,
    /// Every workload on the node, by key, from the last long-poll; none before the first.
    pub workloads: Option<BTreeMap<String, WorkloadStatus>>,
    /// Its heartbeats and direct contacts, as the operator observed them.
    pub liveness: Liveness,
    /// What the last lifecycle tick made of them.
    pub health: Health,
    /// Whether it keeps its replicas and takes work (not lost, or the fleet is disrupted).
    pub keeps: bool,
    poll: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for NodeEntry {
    fn drop(&mut self) {
        if let Some(p) = self.poll.take() {
            p.abort();
        }
    }
}

impl NodeEntry {
    /// The node keeps its replicas and takes work: ready, not ready for less than the
    /// eviction grace, or lost while most nodes are (see [`keeps_replicas`]).
    pub fn schedulable(&self) -> bool {
        self.keeps
    }

    /// The last direct request to its API failed.
    pub fn unreachable(&self) -> bool {
        self.liveness.contacted() && !self.liveness.reachable()
    }

    /// What placement needs: the node's own summary, else the HyperNode's status.
    pub fn summary(&self) -> NodeSummary {
        if let Some(s) = &self.summary {
            return s.clone();
        }
        NodeSummary {
            name: self.name.clone(),
            labels: self.labels.clone(),
            capacity: self.status.capacity,
            allocatable: self.status.allocatable,
            requested: self.status.requested,
            allocations: self.status.allocations,
            pressure: self.status.pressure.clone(),
            ..NodeSummary::default()
        }
    }
}

/// Why a HyperNode's address is not used, if it is not: only https:// unless plain http is
/// allowed (the node token and the workloads would travel in the clear).
pub fn refuse_address(address: &str, allow_http: bool) -> Option<String> {
    if address.starts_with("https://") || (allow_http && address.starts_with("http://")) {
        return None;
    }
    Some(if address.starts_with("http://") {
        format!(
            "node address {address} is not https: serve the node API over TLS, or start the operator with --allow-http-nodes"
        )
    } else {
        format!("node address {address:?} is not an https:// URL")
    })
}

/// Everything the controller reads about the nodes.
pub struct Nodes {
    entries: Mutex<BTreeMap<String, NodeEntry>>,
    access: NodeAccess,
    pub timings: NodeTimings,
    /// Workloads whose status changed on a node: the controller reconciles them.
    changed: mpsc::UnboundedSender<ObjectRef<KubeWorkload>>,
    /// The node set changed in a way placement sees (ready, address, labels): reconcile all.
    all: mpsc::UnboundedSender<()>,
    /// Manager prefix of this operator's workloads on the nodes (`kubernetes:<cluster>/`).
    manager_prefix: String,
    /// The HyperNodes have been listed once: before that, an empty node set means "not
    /// known yet", not "no nodes".
    listed: std::sync::atomic::AtomicBool,
}

/// Whether a node answer belongs to a workload this operator manages.
fn ours(st: &WorkloadStatus, prefix: &str) -> bool {
    st.manager.as_deref().is_some_and(|m| m.starts_with(prefix))
}

pub type Receivers = (
    mpsc::UnboundedReceiver<ObjectRef<KubeWorkload>>,
    mpsc::UnboundedReceiver<()>,
);

impl Nodes {
    pub fn new(
        access: NodeAccess,
        timings: NodeTimings,
        manager_prefix: String,
    ) -> (Arc<Nodes>, Receivers) {
        let (changed, changed_rx) = mpsc::unbounded_channel();
        let (all, all_rx) = mpsc::unbounded_channel();
        (
            Arc::new(Nodes {
                entries: Mutex::new(BTreeMap::new()),
                access,
                timings,
                changed,
                all,
                manager_prefix,
                listed: std::sync::atomic::AtomicBool::new(false),
            }),
            (changed_rx, all_rx),
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, NodeEntry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Run `f` on the entries (never across an await).
    pub fn with<T>(&self, f: impl FnOnce(&BTreeMap<String, NodeEntry>) -> T) -> T {
        f(&self.lock())
    }

    /// What each node last reported for workload `key` (whoever manages it), by node.
    pub fn copies(&self, key: &str) -> BTreeMap<String, WorkloadStatus> {
        self.lock()
            .values()
            .filter_map(|e| {
                let st = e.workloads.as_ref()?.get(key)?;
                Some((e.name.clone(), st.clone()))
            })
            .collect()
    }

    /// The client of a node, by HyperNode name.
    pub fn client(&self, name: &str) -> Option<NodeClient> {
        self.lock().get(name).map(|e| e.client.clone())
    }

    /// The nodes as placement sees them.
    pub fn views(&self) -> Vec<NodeView> {
        self.lock()
            .values()
            .map(|e| NodeView {
                key: e.name.clone(),
                summary: Some(e.summary()),
                schedulable: e.schedulable(),
                nominal_load: 0,
            })
            .collect()
    }

    /// The HyperNode list has been read once.
    pub fn mark_listed(&self) {
        self.listed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether the HyperNodes were listed and every node has answered its first long-poll
    /// (before that, where replicas run is not known and nothing is placed: after an operator
    /// restart, a status written from a partial view would flap).
    pub fn synced(&self) -> bool {
        self.listed.load(std::sync::atomic::Ordering::SeqCst)
            && self
                .lock()
                .values()
                .all(|e| e.workloads.is_some() || !e.schedulable() || e.unreachable())
    }

    fn endpoint(&self, address: &str) -> Endpoint {
        if let Some(why) = refuse_address(address, self.access.allow_http) {
            return Endpoint::Unusable {
                shown: address.to_string(),
                why,
            };
        }
        Endpoint::parse_tls(address, self.access.token.clone(), &self.access.tls).unwrap_or_else(
            |why| Endpoint::Unusable {
                shown: address.to_string(),
                why,
            },
        )
    }

    /// What placement depends on, per node: a change re-places every workload.
    #[allow(clippy::type_complexity)]
    fn fingerprint(&self) -> Vec<(String, String, bool, bool, BTreeMap<String, String>)> {
        self.lock()
            .values()
            .map(|e| {
                (
                    e.name.clone(),
                    e.address.clone(),
                    e.health.is_ready(),
                    e.schedulable(),
                    e.labels.clone(),
                )
            })
            .collect()
    }

    /// Add or update a node from its HyperNode.
    fn upsert(self: &Arc<Self>, node: &KubeHyperNode) {
        let Some(name) = node.metadata.name.clone() else {
            return;
        };
        let address = node.spec.0.address.clone();
        let labels = node.metadata.labels.clone().unwrap_or_default();
        let status = node.status.clone().map(|s| s.0).unwrap_or_default();
        let now = Instant::now();
        let mut entries = self.lock();
        let restart = entries.get(&name).is_none_or(|e| e.address != address);
        if restart {
            let mut client = NodeClient::new(self.endpoint(&address));
            if let Some(f) = &self.access.fence {
                client = client.with_fence(f.clone());
            }
            // A new node (or one at a new address) keeps what the operator saw of its
            // heartbeats, and is judged at the next lifecycle tick.
            let liveness = entries
                .get(&name)
                .map(|e| e.liveness.clone())
                .unwrap_or_default();
            let mut entry = NodeEntry {
                name: name.clone(),
                address: address.clone(),
                labels,
                status,
                client: client.clone(),
                summary: None,
                workloads: None,
                liveness,
                health: Health::Ready,
                keeps: true,
                poll: None,
            };
            entry.liveness.heartbeat(sign_of_life(&entry.status), now);
            entry.poll = Some(tokio::spawn(poll(self.clone(), name.clone(), client)));
            entries.insert(name, entry);
        } else if let Some(e) = entries.get_mut(&name) {
            e.labels = labels;
            e.status = status;
            e.liveness.heartbeat(sign_of_life(&e.status), now);
        }
    }

    fn remove(&self, name: &str) {
        self.lock().remove(name);
    }
}

/// After a failed long-poll of a node: 1 s doubling to 8 s.
const POLL_BACKOFF: hyperbox_api::backoff::Backoff =
    hyperbox_api::backoff::Backoff::new(Duration::from_secs(1), Duration::from_secs(8));

/// Keep the node's workloads current with long-polls; tell the controller which of ours
/// changed.
async fn poll(nodes: Arc<Nodes>, name: String, client: NodeClient) {
    let mut after: Option<u64> = None;
    let mut failures = 0u32;
    loop {
        let first = after.is_none();
        match client.watch_all(after, nodes.timings.watch_timeout).await {
            Ok((version, items)) => {
                failures = 0;
                let unchanged = after == Some(version);
                after = Some(version);
                if unchanged {
                    continue;
                }
                let summary = client.node().await.ok();
                let items: BTreeMap<String, WorkloadStatus> =
                    items.into_iter().map(|s| (s.key(), s)).collect();
                let mut changed: BTreeSet<String> = BTreeSet::new();
                {
                    let mut entries = nodes.lock();
                    let Some(e) = entries.get_mut(&name) else {
                        return;
                    };
                    let before = e.workloads.take().unwrap_or_default();
                    for (k, st) in &items {
                        if before.get(k) != Some(st) && ours(st, &nodes.manager_prefix) {
                            changed.insert(k.clone());
                        }
                    }
                    for (k, st) in &before {
                        if !items.contains_key(k) && ours(st, &nodes.manager_prefix) {
                            changed.insert(k.clone());
                        }
                    }
                    e.workloads = Some(items);
                    if summary.is_some() {
                        e.summary = summary;
                    }
                    e.liveness.contact(true);
                }
                for key in changed {
                    let (ns, n) = hyperbox_api::split_key(&key);
                    let _ = nodes.changed.send(ObjectRef::new(n).within(ns));
                }
                if first {
                    // Placement waits for every node's first answer.
                    let _ = nodes.all.send(());
                }
            }
            Err(e) => {
                failures += 1;
                {
                    let mut entries = nodes.lock();
                    let Some(entry) = entries.get_mut(&name) else {
                        return;
                    };
                    if !entry.unreachable() {
                        tracing::warn!(node = %name, error = %e, "node api unreachable; retrying");
                    }
                    entry.liveness.contact(false);
                }
                after = None;
                tokio::time::sleep(POLL_BACKOFF.after(failures)).await;
            }
        }
    }
}

/// The heartbeat of a status that says the node is ready (`Ready=True`); none otherwise. Only
/// compared with the previous one: its time is the node's clock, never the operator's.
pub fn sign_of_life(status: &HyperNodeStatus) -> Option<&str> {
    let ready = status
        .condition(CONDITION_READY)
        .is_some_and(|c| c.status == "True");
    status.heartbeat_time.as_deref().filter(|_| ready)
}

/// Watch the HyperNodes and run the node lifecycle until the process ends.
pub async fn run(nodes: Arc<Nodes>, api: Api<KubeHyperNode>, field_manager: String) {
    let watch = {
        let nodes = nodes.clone();
        let api = api.clone();
        async move {
            let mut stream = watcher(api, watcher::Config::default()).boxed();
            let mut seen: BTreeSet<String> = BTreeSet::new();
            let mut listing: BTreeSet<String> = BTreeSet::new();
            while let Some(ev) = stream.next().await {
                match ev {
                    Ok(watcher::Event::Apply(n)) => {
                        seen.extend(n.metadata.name.clone());
                        nodes.upsert(&n);
                    }
                    Ok(watcher::Event::Delete(n)) => {
                        if let Some(name) = &n.metadata.name {
                            seen.remove(name);
                            nodes.remove(name);
                        }
                    }
                    Ok(watcher::Event::Init) => listing.clear(),
                    Ok(watcher::Event::InitApply(n)) => {
                        listing.extend(n.metadata.name.clone());
                        nodes.upsert(&n);
                    }
                    Ok(watcher::Event::InitDone) => {
                        for gone in seen.difference(&listing) {
                            nodes.remove(gone);
                        }
                        seen = std::mem::take(&mut listing);
                        nodes.mark_listed();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "watching HyperNodes failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    };
    let lifecycle = async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut last = nodes.fingerprint();
        let mut judge = Judge::default();
        loop {
            tick.tick().await;
            let mut stale: Vec<(String, String)> = Vec::new();
            {
                let now = Instant::now();
                let timings = LivenessTimings {
                    monitor_grace: nodes.timings.monitor_grace,
                    eviction_grace: nodes.timings.eviction_grace,
                };
                let mut entries = nodes.lock();
                let frozen = judge.judge(
                    entries
                        .values_mut()
                        .map(|e| (e.name.as_str(), &mut e.liveness, &mut e.health)),
                    now,
                    timings,
                );
                for e in entries.values_mut() {
                    e.keeps = keeps_replicas(e.health, frozen);
                    let marked = e
                        .status
                        .condition(CONDITION_READY)
                        .is_some_and(|c| c.status == "False");
                    if !e.health.is_ready() && !marked {
                        stale.push((
                            e.name.clone(),
                            e.status.heartbeat_time.clone().unwrap_or_default(),
                        ));
                    }
                }
            }
            for (name, heartbeat) in stale {
                if let Err(e) = mark_not_ready(&api, &name, &heartbeat, &field_manager).await {
                    tracing::warn!(node = %name, error = %e, "marking the node not ready failed");
                }
            }
            let now = nodes.fingerprint();
            if now != last {
                last = now;
                let _ = nodes.all.send(());
            }
        }
    };
    tokio::join!(watch, lifecycle);
}

async fn mark_not_ready(
    api: &Api<KubeHyperNode>,
    name: &str,
    heartbeat: &str,
    field_manager: &str,
) -> kube::Result<()> {
    let condition = NodeCondition {
        kind: CONDITION_READY.to_string(),
        status: "False".to_string(),
        reason: "NodeHeartbeatMissed".to_string(),
        message: if heartbeat.is_empty() {
            "the node runtime never reported a heartbeat".to_string()
        } else {
            format!("the node runtime stopped reporting (last heartbeat {heartbeat})")
        },
        last_transition_time: Some(k8s_openapi::jiff::Timestamp::now().to_string()),
    };
    let patch = serde_json::json!({
        "apiVersion": hyperbox_api::API_VERSION,
        "kind": hyperbox_api::hypernode::KIND_HYPERNODE,
        "metadata": {"name": name},
        "status": {"conditions": [condition]},
    });
    api.patch_status(
        name,
        &PatchParams::apply(field_manager).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    tracing::info!(node = %name, "HyperNode marked Ready=False (NodeHeartbeatMissed)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_node_addresses_unless_plain_http_is_allowed() {
        assert_eq!(refuse_address("https://10.0.0.1:7070", false), None);
        let why = refuse_address("http://10.0.0.1:7070", false).unwrap();
        assert!(
            why.contains("is not https") && why.contains("--allow-http-nodes"),
            "{why}"
        );
        assert_eq!(refuse_address("http://10.0.0.1:7070", true), None);
        assert!(refuse_address("10.0.0.1:7070", true).is_some());
        assert!(refuse_address("unix:///run/x.sock", true).is_some());
    }

    fn status(ready: &str, heartbeat: Option<String>) -> HyperNodeStatus {
        HyperNodeStatus {
            heartbeat_time: heartbeat,
            conditions: vec![NodeCondition {
                kind: CONDITION_READY.into(),
                status: ready.into(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn only_a_ready_status_carries_a_sign_of_life() {
        // Whatever its time says: the fleet core compares it with the last one only.
        let old = "2001-01-01T00:00:00Z".to_string();
        assert_eq!(
            sign_of_life(&status("True", Some(old.clone()))),
            Some(old.as_str())
        );
        assert_eq!(sign_of_life(&status("False", Some(old))), None);
        assert_eq!(sign_of_life(&status("True", None)), None);
    }
}
