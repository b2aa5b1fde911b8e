//! The Workload controller: a kube-runtime `Controller` on Workloads, also triggered when a
//! node reports a change to one of them and when the set of nodes changes. An adapter around
//! the fleet core ([`crate::fleet_core`]): each reconcile feeds it the workload, where its
//! replicas were placed and what the nodes report, carries out its steps (each node's
//! share through the node API (as manager `kubernetes:<cluster>/<uid>`), and writes the status
//! by server-side apply. A finalizer deletes the containers before the object goes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use hyperbox_api::backoff::Backoff;
use hyperbox_api::{config_hash, spec_hash, Reason, Workload};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{finalizer, Event as Finalizer};
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::crd::{KubeWorkload, KubeWorkloadStatus};
use super::node_calls::{send_all, ApplyError, Removal, Removals, Send};
use super::nodes::{Nodes, Receivers};
use super::status::{find, same_status, workload_status, Observation, READY, STALLED};
use crate::fleet_core::avoid::AvoidMemory;
use crate::fleet_core::decide::{Known, Step};
use crate::fleet_core::ledger::Ledger;
use crate::fleet_core::orphans::{orphans, Held};
use crate::fleet_core::place::{Counts, Desired};
use crate::fleet_core::placement::PressureWeights;
use crate::fleet_core::rollout::Copy;
use crate::fleet_core::{self};
use crate::node_api::NodeApi;

pub const FINALIZER: &str = "hyperbox.dev/containers";
/// The field manager of everything the operator writes.
pub const FIELD_MANAGER: &str = "hyperbox-operator";

pub struct Context {
    pub client: kube::Client,
    pub nodes: Arc<Nodes>,
    /// `kubernetes:<cluster>/`: the manager of a workload is this plus its uid.
    pub manager_prefix: String,
    pub weights: PressureWeights,
    pub recorder: Recorder,
    /// Placements are one at a time (two workloads placed at once would both count the same
    /// free room); the lock is held while deciding, never across a call to a node.
    place_lock: Mutex<()>,
    state: Mutex<State>,
    /// Removals still running on a node (a long grace period).
    removals: Removals,
}

#[derive(Default)]
struct State {
    /// Failed reconciles in a row, by workload: the error policy backs off with it.
    failures: HashMap<String, u32>,
    /// Nodes each workload avoids: those that refused its spec (by its config hash), and
    /// those that evicted one of its replicas for pressure lately.
    avoid: AvoidMemory,
    /// What was last applied to each node (node, key) → config hash: an unchanged workload
    /// costs no request.
    applied: HashMap<(String, String), String>,
    /// Placements made one workload at a time, and what they take on nodes that have not
    /// reported them yet.
    ledger: Ledger,
}

impl Context {
    pub fn new(
        client: kube::Client,
        nodes: Arc<Nodes>,
        manager_prefix: String,
        weights: PressureWeights,
        instance: String,
    ) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.to_string(),
                instance: Some(instance),
            },
        );
        Context {
            client,
            nodes,
            manager_prefix,
            weights,
            recorder,
            place_lock: Mutex::new(()),
            state: Mutex::new(State::default()),
            removals: Removals::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes api: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Nodes(String),
    /// Containers still stopping within their grace period on these nodes: not a failure.
    #[error("its containers are still stopping on {0}")]
    Stopping(String),
}

/// Backoff after `failures` failed reconciles in a row: 1 s doubling to 5 min.
pub fn backoff(failures: u32) -> Duration {
    RECONCILE_BACKOFF.after(failures)
}

const RECONCILE_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));

fn key_of(cr: &KubeWorkload) -> String {
    hyperbox_api::workload_key(
        cr.metadata
            .namespace
            .as_deref()
            .unwrap_or(hyperbox_api::DEFAULT_NAMESPACE),
        &cr.name_any(),
    )
}

/// The manager of a Workload's copies on the nodes: `kubernetes:<cluster>/<uid>`.
fn manager_of(ctx: &Context, cr: &KubeWorkload) -> String {
    format!(
        "{}{}",
        ctx.manager_prefix,
        cr.metadata.uid.as_deref().unwrap_or_default()
    )
}

/// Whether one of the replica reasons (as the node or the status writes them) is a pressure
/// eviction.
fn evicted_for_pressure<'a>(mut reasons: impl Iterator<Item = Option<&'a str>>) -> bool {
    reasons.any(|r| r == Some(Reason::EvictedForPressure.as_str()))
}

async fn reconcile(cr: Arc<KubeWorkload>, ctx: Arc<Context>) -> Result<Action, Error> {
    let ns = cr.metadata.namespace.clone().unwrap_or_default();
    let api: Api<KubeWorkload> = Api::namespaced(ctx.client.clone(), &ns);
    let key = key_of(&cr);
    let result = finalizer(&api, FINALIZER, cr, |event| async {
        match event {
            Finalizer::Apply(cr) => apply(cr, &api, &ctx).await,
            Finalizer::Cleanup(cr) => cleanup(cr, &ctx).await,
        }
    })
    .await;
    match result {
        Ok(action) => {
            ctx.state().failures.remove(&key);
            Ok(action)
        }
        Err(kube::runtime::finalizer::Error::ApplyFailed(e))
        | Err(kube::runtime::finalizer::Error::CleanupFailed(e)) => Err(e),
        Err(kube::runtime::finalizer::Error::AddFinalizer(e))
        | Err(kube::runtime::finalizer::Error::RemoveFinalizer(e)) => Err(Error::Kube(e)),
        Err(e) => Err(Error::Nodes(e.to_string())),
    }
}

fn error_policy(cr: Arc<KubeWorkload>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = key_of(&cr);
    if let Error::Stopping(nodes) = error {
        tracing::debug!(workload = %key, nodes = %nodes, "waiting for its containers to stop");
        return Action::requeue(Duration::from_secs(2));
    }
    let n = {
        let mut st = ctx.state();
        let n = st.failures.entry(key.clone()).or_default();
        *n += 1;
        *n
    };
    let wait = backoff(n);
    tracing::warn!(workload = %key, error = %error, failures = n, retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

async fn event(ctx: &Context, cr: &KubeWorkload, warning: bool, reason: &str, note: String) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_string(),
        note: Some(note),
        action: "Reconcile".to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &cr.object_ref(&())).await {
        tracing::warn!(error = %e, reason, "publishing an event failed");
    }
}

fn describe(counts: &BTreeMap<String, u32>) -> String {
    counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(node, n)| format!("{node} ({n})"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn node_schedulable(ctx: &Context, node: &str) -> bool {
    ctx.nodes
        .with(|e| e.get(node).is_some_and(|e| e.schedulable()))
}

/// What a reconcile decided, under the placement lock and without a network call.
struct Decision {
    previous: BTreeMap<String, u32>,
    counts: BTreeMap<String, u32>,
    unplaced: Vec<(&'static str, String)>,
    /// Copies to send: node, its client, the copy and its config hash.
    applies: Vec<Send>,
    /// Nodes that should no longer run it.
    removals: Vec<(String, Arc<dyn NodeApi>)>,
    /// Nodes whose copy waits (a removal of the same workload still runs there).
    waiting: usize,
}

/// Place the workload and decide what each node gets. Runs under the placement lock, which is
/// never held across a network call: what it decides is recorded at once (where the replicas
/// go, and what they take there) for the next workload's placement to see.
fn decide(
    ctx: &Context,
    key: &str,
    manager: &str,
    w: &Workload,
    hash: &str,
    recorded: Option<&BTreeMap<String, u32>>,
) -> Decision {
    let _guard = ctx
        .place_lock
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let copies = ctx.nodes.copies(key);
    let mut st = ctx.state();
    // Where it runs: the nodes holding our copy. Where it was placed: what the last reconcile
    // decided (a node that comes back after its replicas moved still holds a copy, which is
    // removed, not counted); after a restart, what the status recorded; else (a status from
    // before that record) the holders.
    let ours: BTreeMap<&String, &hyperbox_api::WorkloadStatus> = copies
        .iter()
        .filter(|(_, c)| c.manager.as_deref() == Some(manager))
        .collect();
    let holders: BTreeMap<String, u32> = ours
        .iter()
        .map(|(node, c)| ((*node).clone(), c.desired_replicas))
        .collect();
    let previous = st
        .ledger
        .placed(key)
        .or(recorded.filter(|r| !r.is_empty()))
        .cloned()
        .unwrap_or_else(|| holders.clone());
    // Nodes to avoid: those that refused this spec, and those that evicted a replica for
    // pressure lately.
    let now = Instant::now();
    st.avoid.expire(now);
    for (node, copy) in &copies {
        if evicted_for_pressure(
            copy.replicas
                .iter()
                .map(|r| r.reason.as_ref().map(Reason::as_str)),
        ) {
            st.avoid.evicted_for_pressure(key, node, now);
        }
    }
    let avoid = st.avoid.avoid(key, hash);
    let desired: Desired = BTreeMap::from([(key, w)]);
    let previous_counts: Counts = BTreeMap::from([(key.to_string(), previous.clone())]);
    let holder_nodes = BTreeMap::from([(key.to_string(), holders.keys().cloned().collect())]);
    let our_copies = BTreeMap::from([(
        key.to_string(),
        ours.iter()
            .map(|(node, c)| ((*node).clone(), Copy::of(c)))
            .collect(),
    )]);
    let avoid = BTreeMap::from([(key.to_string(), avoid)]);
    let mut views = ctx.nodes.views();
    // Workloads are placed one at a time: what the others took and the nodes have not
    // reported yet counts (see the ledger).
    ctx.nodes.with(|entries| {
        st.ledger.adjust(key, &mut views, |node, other| {
            entries
                .get(node)
                .and_then(|e| e.workloads.as_ref())
                .and_then(|m| m.get(other))
                .filter(|w| {
                    w.manager
                        .as_deref()
                        .is_some_and(|m| m.starts_with(&ctx.manager_prefix))
                })
                .map_or(0, |w| w.desired_replicas)
        })
    });
    let mut decision = fleet_core::decide::decide(
        &desired,
        Known {
            previous: &previous_counts,
            holders: &holder_nodes,
            copies: &our_copies,
            unknown: &BTreeMap::new(),
            avoid: &avoid,
        },
        &views,
        &ctx.weights,
    );
    let counts = decision.placement.counts.remove(key).unwrap_or_default();
    let unplaced: Vec<(&'static str, String)> = decision
        .placement
        .unplaced
        .get(key)
        .map(|v| {
            v.iter()
                .map(|u| {
                    (
                        u.reason(),
                        format!("{} (nodes: {})", u.reason(), views.len()),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    let mut applies = Vec::new();
    let mut removals: Vec<(String, Arc<dyn NodeApi>)> = Vec::new();
    let mut waiting = 0;
    for (node, step) in decision.steps.remove(key).unwrap_or_default() {
        let Some(client) = ctx.nodes.client(&node) else {
            continue;
        };
        match step {
            Step::Hold => continue,
            Step::Remove => removals.push((node, Arc::new(client))),
            Step::Send(copy) => {
                let copy_hash = config_hash(&copy);
                let cache_key = (node.clone(), key.to_string());
                if copies.contains_key(&node) && st.applied.get(&cache_key) == Some(&copy_hash) {
                    continue;
                }
                if ctx.removals.running(&node, key) {
                    waiting += 1;
                    continue;
                }
                applies.push(Send {
                    node,
                    api: Arc::new(client),
                    copy: *copy,
                    copy_hash,
                });
            }
        }
    }
    st.ledger.record(key, w, &counts);
    Decision {
        previous,
        counts,
        unplaced,
        applies,
        removals,
        waiting,
    }
}

async fn apply(
    cr: Arc<KubeWorkload>,
    api: &Api<KubeWorkload>,
    ctx: &Context,
) -> Result<Action, Error> {
    let key = key_of(&cr);
    let manager = manager_of(ctx, &cr);
    let generation = cr.metadata.generation.unwrap_or(0);
    let mut w = cr.to_workload();
    w.metadata.annotations.insert(
        hyperbox_api::REVISION_ANNOTATION.to_string(),
        format!("generation-{generation}"),
    );
    let previous_status = cr.status.clone();
    let errors = hyperbox_api::validate::validate_workload(&w);
    if !errors.is_empty() {
        let message = errors
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("; ");
        let o = Observation {
            generation,
            desired: w.desired_replicas(),
            problem: Some(("InvalidSpec".into(), message.clone(), true)),
            previous: previous_status.as_ref(),
            ..Default::default()
        };
        write_status(api, &cr, workload_status(&o), &previous_status).await?;
        return Ok(Action::await_change());
    }
    if !ctx.nodes.synced() {
        // Where replicas run is not known until every node answered once.
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let hash = config_hash(&w);
    let shash = spec_hash(&w);
    let mut problem: Option<(String, String, bool)> = None;
    let mut applied_all = true;
    // Events are sent at the end (they cost a request each), in the order they arise.
    let mut events: Vec<(bool, &'static str, String)> = Vec::new();
    let Decision {
        previous,
        counts,
        unplaced,
        applies,
        removals,
        mut waiting,
    } = decide(
        ctx,
        &key,
        &manager,
        &w,
        &hash,
        previous_status.as_ref().map(|s| &s.placement),
    );
    // Every node's share at once, each within its deadline.
    let sends = send_all(applies, &manager, &ctx.manager_prefix);
    let removing = removals.into_iter().map(|(node, api)| {
        let (key, manager) = (key.as_str(), manager.as_str());
        async move {
            let r = ctx.removals.remove(&node, key, manager, api).await;
            (node, r)
        }
    });
    let (sent, removed) = futures::join!(sends, futures::future::join_all(removing));
    for (node, copy_hash, r) in sent {
        match r {
            Ok(()) => {
                ctx.state().applied.insert((node, key.clone()), copy_hash);
            }
            Err(ApplyError::Refused(message)) => {
                applied_all = false;
                ctx.state().avoid.refused(&key, &hash, &node);
                events.push((
                    true,
                    "Refused",
                    format!("node {node} refused it: {message}"),
                ));
                problem.get_or_insert(("Refused".into(), format!("{node}: {message}"), false));
            }
            Err(ApplyError::Conflict(message)) => {
                applied_all = false;
                problem = Some((
                    "ManagedElsewhere".into(),
                    format!("{node}: {message}"),
                    true,
                ));
            }
            Err(ApplyError::Unreachable(message)) => {
                applied_all = false;
                problem.get_or_insert((
                    "NodeUnreachable".into(),
                    format!("{node}: {message}"),
                    false,
                ));
            }
        }
    }
    for (node, r) in removed {
        match r {
            Removal::Done => {
                ctx.state().applied.remove(&(node, key.clone()));
            }
            Removal::Running => waiting += 1,
            // A node past its grace is gone for placement: its copy is removed when it comes
            // back (its next report still lists it), not waited for.
            Removal::Failed(e) if !node_schedulable(ctx, &node) => {
                tracing::debug!(workload = %key, node = %node, error = %e, "removal from a gone node deferred");
            }
            Removal::Failed(e) => {
                applied_all = false;
                problem.get_or_insert((
                    "NodeUnreachable".into(),
                    format!("removing it from {node}: {e}"),
                    false,
                ));
            }
        }
    }
    if previous
        .iter()
        .filter(|(_, n)| **n > 0)
        .collect::<BTreeMap<_, _>>()
        != counts
            .iter()
            .filter(|(_, n)| **n > 0)
            .collect::<BTreeMap<_, _>>()
        && !counts.values().all(|n| *n == 0)
    {
        events.push((
            false,
            "Placed",
            format!("replicas placed on {}", describe(&counts)),
        ));
    }
    // Failures and pressure evictions become events once, when they appear.
    let stalled_before = previous_status
        .as_ref()
        .and_then(|s| find(s, STALLED))
        .map(|c| c.reason.clone());
    if let Some((reason, _)) = unplaced.first() {
        if stalled_before.as_deref() != Some(*reason) {
            events.push((
                true,
                "FailedPlacement",
                format!("{} replica(s) fit on no node: {reason}", unplaced.len()),
            ));
        }
    }
    // The nodes' reports as they are now (after the applies above).
    let copies = ctx.nodes.copies(&key);
    let reports: BTreeMap<String, Option<&hyperbox_api::WorkloadStatus>> = counts
        .keys()
        .map(|node| {
            let ours = copies
                .get(node)
                .filter(|s| s.manager.as_deref() == Some(manager.as_str()));
            (node.clone(), ours)
        })
        .collect();
    let o = Observation {
        generation,
        desired: w.desired_replicas(),
        suspended: w.spec.suspend,
        counts: counts.clone(),
        reports,
        spec_hash: shash,
        unplaced,
        problem,
        applied: applied_all,
        previous: previous_status.as_ref(),
    };
    let status = workload_status(&o);
    let ready = find(&status, READY).is_some_and(|c| c.status == "True");
    if let Some(c) = find(&status, STALLED) {
        if stalled_before.as_deref() != Some(c.reason.as_str())
            && c.reason != "InsufficientMemory"
            && c.reason != "InsufficientCPU"
            && c.reason != "NoMatchingNode"
        {
            events.push((true, "Failed", format!("{}: {}", c.reason, c.message)));
        }
    }
    let evicted = |s: &KubeWorkloadStatus| {
        evicted_for_pressure(s.replica_statuses.iter().map(|r| r.reason.as_deref()))
    };
    if evicted(&status) && !previous_status.as_ref().is_some_and(evicted) {
        events.push((
            true,
            "Evicted",
            "a replica was evicted for node pressure; it is placed on another node".to_string(),
        ));
    }
    for (warning, reason, note) in events {
        event(ctx, &cr, warning, reason, note).await;
    }
    write_status(api, &cr, status, &previous_status).await?;
    if o.problem.as_ref().is_some_and(|p| !p.2) {
        return Err(Error::Nodes(o.problem.map(|p| p.1).unwrap_or_default()));
    }
    Ok(if waiting > 0 {
        // A removal still runs, or a copy waits for it: look again soon.
        Action::requeue(Duration::from_secs(2))
    } else if ready {
        Action::requeue(Duration::from_secs(300))
    } else {
        Action::requeue(Duration::from_secs(30))
    })
}

async fn write_status(
    api: &Api<KubeWorkload>,
    cr: &KubeWorkload,
    status: KubeWorkloadStatus,
    previous: &Option<KubeWorkloadStatus>,
) -> Result<(), Error> {
    if previous.as_ref().is_some_and(|p| same_status(p, &status)) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": hyperbox_api::API_VERSION,
        "kind": hyperbox_api::KIND_WORKLOAD,
        "status": status,
    });
    api.patch_status(
        &cr.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Deleting a Workload: its containers stop on every node first; the finalizer goes after.
/// A node past its eviction grace is gone: it is not waited for. Removals that take longer
/// than [`REMOVAL_WAIT`] go on in the background while the reconcile comes back for them.
async fn cleanup(cr: Arc<KubeWorkload>, ctx: &Context) -> Result<Action, Error> {
    let key = key_of(&cr);
    let manager = manager_of(ctx, &cr);
    let targets: Vec<(String, Arc<dyn NodeApi>, bool)> = ctx.nodes.with(|entries| {
        entries
            .values()
            .filter(|e| {
                // Unknown (not listed yet) counts as possibly holding it.
                e.workloads.as_ref().is_none_or(|m| {
                    m.get(&key)
                        .is_some_and(|s| s.manager.as_deref() == Some(manager.as_str()))
                })
            })
            .map(|e| {
                let api: Arc<dyn NodeApi> = Arc::new(e.client.clone());
                (e.name.clone(), api, e.schedulable())
            })
            .collect()
    });
    let removing = targets.into_iter().map(|(node, client, alive)| {
        let (key, manager) = (key.as_str(), manager.as_str());
        async move {
            let r = ctx.removals.remove(&node, key, manager, client).await;
            (node, alive, r)
        }
    });
    let mut pending = Vec::new();
    let mut running = Vec::new();
    for (node, alive, r) in futures::future::join_all(removing).await {
        match r {
            Removal::Done => {}
            Removal::Running => running.push(node.clone()),
            Removal::Failed(e) if !alive => {
                tracing::warn!(workload = %key, node = %node, error = %e, "node gone: not waiting for it to stop the workload");
            }
            Removal::Failed(e) => pending.push(format!("{node}: {e}")),
        }
        ctx.state().applied.remove(&(node, key.clone()));
    }
    if !pending.is_empty() {
        return Err(Error::Nodes(format!(
            "stopping its containers failed: {}",
            pending.join("; ")
        )));
    }
    if !running.is_empty() {
        return Err(Error::Stopping(running.join(", ")));
    }
    {
        let mut st = ctx.state();
        st.avoid.forget(&key);
        st.ledger.forget(&key);
    }
    event(
        ctx,
        &cr,
        false,
        "Deleted",
        "its containers were stopped and removed on every node".to_string(),
    )
    .await;
    Ok(Action::await_change())
}

/// How often the nodes' copies are checked for orphans.
const ORPHAN_SWEEP: Duration = Duration::from_secs(10);

/// Remove the copies whose Workload no longer exists (see [`crate::fleet_core::orphans`]),
/// from the nodes that answer, every [`ORPHAN_SWEEP`]; only once the Workloads were listed.
async fn sweep_orphans(ctx: Arc<Context>, store: Store<KubeWorkload>) {
    if store.wait_until_ready().await.is_err() {
        return;
    }
    loop {
        tokio::time::sleep(ORPHAN_SWEEP).await;
        let owners: HashSet<String> = store
            .state()
            .iter()
            .filter_map(|w| w.metadata.uid.clone())
            .collect();
        let held: Vec<(Held, Arc<dyn NodeApi>)> = ctx.nodes.with(|entries| {
            entries
                .values()
                .filter(|e| e.schedulable() && !e.unreachable())
                .flat_map(|e| {
                    e.workloads.iter().flatten().filter_map(|(key, st)| {
                        let manager = st.manager.clone()?;
                        let h = Held {
                            node: e.name.clone(),
                            key: key.clone(),
                            manager,
                        };
                        let api: Arc<dyn NodeApi> = Arc::new(e.client.clone());
                        Some((h, api))
                    })
                })
                .collect()
        });
        let found: HashSet<&Held> =
            orphans(held.iter().map(|(h, _)| h), &ctx.manager_prefix, &owners)
                .into_iter()
                .collect();
        let removals = held
            .iter()
            .filter(|(h, _)| found.contains(h))
            .map(|(h, client)| {
                let ctx = &ctx;
                async move {
                    let r = ctx
                        .removals
                        .remove(&h.node, &h.key, &h.manager, client.clone())
                        .await;
                    (h, r)
                }
            });
        for (h, r) in futures::future::join_all(removals).await {
            match r {
                Removal::Done => {
                    tracing::info!(node = %h.node, workload = %h.key, manager = %h.manager, "removed an orphan: its Workload no longer exists");
                }
                Removal::Running => {}
                Removal::Failed(e) => {
                    tracing::warn!(node = %h.node, workload = %h.key, error = %e, "removing an orphan failed; retried at the next sweep");
                }
            }
        }
    }
}

/// Run the controller until the process ends.
pub async fn run(ctx: Arc<Context>, receivers: Receivers, concurrency: u16) {
    let api: Api<KubeWorkload> = Api::all(ctx.client.clone());
    let (changed, all) = receivers;
    let controller = Controller::new(api, watcher::Config::default())
        .with_config(kube::runtime::controller::Config::default().concurrency(concurrency));
    let sweep = sweep_orphans(ctx.clone(), controller.store());
    let reconciles = controller
        .reconcile_on(UnboundedReceiverStream::new(changed))
        .reconcile_all_on(UnboundedReceiverStream::new(all))
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            match r {
                Ok((obj, _)) => tracing::debug!(workload = %obj, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        });
    tokio::join!(reconciles, sweep);
}

#[cfg(test)]
#[path = "controller_verifier_tests.rs"]
mod verifier_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_a_second_to_five_minutes() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(9), Duration::from_secs(256));
        assert_eq!(backoff(30), Duration::from_secs(300));
        assert!(backoff(u32::MAX) <= Duration::from_secs(300));
    }
}
