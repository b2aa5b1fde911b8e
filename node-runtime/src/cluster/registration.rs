//! Node registration: the node creates its `HyperNode` and keeps it current with heartbeats
//! (server-side apply of the object and of its status), so the operator finds it, places work
//! on it and notices when it goes away.

use std::time::{Duration, Instant};

use anyhow::Result;
use hyperbox_api::hypernode::{
    HyperNodeSpec, HyperNodeStatus, NodeCondition, CONDITION_READY, KIND_HYPERNODE,
};
use kube::api::DynamicObject;

use super::apiserver::{ApiServer, WriteError};
use crate::workloads::Supervisor;

/// What the node registers as.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The HyperNode's name (`--node-name`, default the host name).
    pub name: String,
    /// The node API address the operator uses (`--advertise-address`).
    pub address: String,
    pub interval: Duration,
}

/// A HyperNode name must be a DNS subdomain (lowercase letters, digits, `-` and `.`).
pub fn check_node_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "node name {name:?} is not a DNS subdomain (lowercase letters, digits, '-' and '.'): set --node-name"
        ))
    }
}

/// The address to advertise when `--advertise-address` is not given: the TCP listener's, with
/// the host name in place of a wildcard address.
pub fn default_address(listen: &str, tls: bool, hostname: &str) -> String {
    let scheme = if tls { "https" } else { "http" };
    let (host, port) = listen.rsplit_once(':').unwrap_or((listen, "7443"));
    let host = match host {
        "" | "0.0.0.0" | "[::]" | "::" => hostname,
        h => h,
    };
    format!("{scheme}://{host}:{port}")
}

pub(crate) fn rfc3339_now() -> String {
    crate::fsutil::format_rfc3339(hyperbox_api::util::now_unix())
}

/// The object part (labels and spec) of the node's HyperNode.
pub fn object_body(reg: &Registration, summary: &hyperbox_api::NodeSummary) -> serde_json::Value {
    serde_json::json!({
        "apiVersion": hyperbox_api::API_VERSION,
        "kind": KIND_HYPERNODE,
        "metadata": {"name": reg.name, "labels": summary.labels},
        "spec": HyperNodeSpec {address: reg.address.clone(), node_id: summary.id.clone()},
    })
}

/// The status part: the summary's figures, the heartbeat and `Ready=True` since `ready_since`.
pub fn status_body(
    reg: &Registration,
    summary: &hyperbox_api::NodeSummary,
    now: &str,
    ready_since: &str,
) -> serde_json::Value {
    let status = HyperNodeStatus {
        version: summary.version.clone(),
        capacity: summary.capacity,
        allocatable: summary.allocatable,
        requested: summary.requested,
        allocations: summary.allocations,
        workloads: summary.workloads as u32,
        containers: summary.containers as u32,
        pressure: summary.pressure.clone(),
        heartbeat_time: Some(now.to_string()),
        conditions: vec![NodeCondition {
            kind: CONDITION_READY.to_string(),
            status: "True".to_string(),
            reason: "HeartbeatReceived".to_string(),
            message: "the node runtime is running and reports to the API server".to_string(),
            last_transition_time: Some(ready_since.to_string()),
        }],
    };
    serde_json::json!({
        "apiVersion": hyperbox_api::API_VERSION,
        "kind": KIND_HYPERNODE,
        "metadata": {"name": reg.name},
        "status": status,
    })
}

/// What this node makes of the HyperNode of its name: whose it is.
#[derive(Debug, Clone, PartialEq)]
enum Claim {
    /// Not read yet, or a write found it changed: read it before writing again.
    Unknown,
    /// Ours, as of this resourceVersion (our last write, or our read).
    Ours { version: String },
    /// Another node's (another node id): its heartbeat as last read, and when this node
    /// first read that value (its own monotonic clock: the two clocks need not agree).
    Theirs {
        id: String,
        heartbeat: Option<String>,
        since: Instant,
    },
}

/// The HyperNode as read: whose it is and its last heartbeat.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    node_id: String,
    heartbeat: Option<String>,
    version: String,
}

impl Seen {
    fn of(obj: &DynamicObject) -> Seen {
        let field =
            |v: &serde_json::Value, k: &str| v.get(k).and_then(|s| s.as_str()).map(String::from);
        Seen {
            node_id: obj
                .data
                .get("spec")
                .and_then(|s| field(s, "nodeId"))
                .unwrap_or_default(),
            heartbeat: obj
                .data
                .get("status")
                .and_then(|s| field(s, "heartbeatTime")),
            version: obj.metadata.resource_version.clone().unwrap_or_default(),
        }
    }
}

/// What to do after reading the HyperNode.
#[derive(Debug, Clone, PartialEq)]
enum Verdict {
    /// None exists: create it.
    Create,
    /// Ours (our id, or none yet): write it.
    Write,
    /// Another node's whose heartbeats stopped `takeover_after` ago or more: take it over.
    TakeOver { id: String, silent: Duration },
    /// Another node's that heartbeats: two nodes have this name. Write nothing.
    Duplicate { id: String },
}

/// Judge the HyperNode read (`None`: there is none). A node id differing from ours is
/// another node with our name: it keeps the HyperNode while its heartbeat changes; once it
/// has not changed for `takeover_after` on this node's clock, the node is taken to be gone
/// (a reinstall, a replaced machine) and this node takes the name over.
fn judge(
    seen: Option<&Seen>,
    our_id: &str,
    claim: &Claim,
    now: Instant,
    takeover_after: Duration,
) -> (Claim, Verdict) {
    let Some(seen) = seen else {
        return (Claim::Unknown, Verdict::Create);
    };
    if seen.node_id.is_empty() || seen.node_id == our_id {
        let version = seen.version.clone();
        return (Claim::Ours { version }, Verdict::Write);
    }
    let since = match claim {
        Claim::Theirs {
            id,
            heartbeat,
            since,
        } if *id == seen.node_id && *heartbeat == seen.heartbeat => *since,
        _ => now,
    };
    let silent = now.saturating_duration_since(since);
    let id = seen.node_id.clone();
    if silent >= takeover_after {
        let version = seen.version.clone();
        return (Claim::Ours { version }, Verdict::TakeOver { id, silent });
    }
    let claim = Claim::Theirs {
        id: id.clone(),
        heartbeat: seen.heartbeat.clone(),
        since,
    };
    (claim, Verdict::Duplicate { id })
}

/// How long another node's heartbeat must stand still before this node takes the name over:
/// four of its heartbeat intervals (as the operator's default node monitor grace is four of
/// the default interval), at least 4 s.
pub fn takeover_after(interval: Duration) -> Duration {
    (interval * 4).max(Duration::from_secs(4))
}

/// `body` with a resourceVersion precondition.
fn at_version(mut body: serde_json::Value, version: &str) -> serde_json::Value {
    body["metadata"]["resourceVersion"] = serde_json::Value::String(version.to_string());
    body
}

/// Register and heartbeat until the daemon stops. Failures are logged and retried at the
/// next heartbeat: the API server being away never affects the containers. Every write names
/// the resourceVersion this node last saw, so a write by anyone else in between (the
/// operator marking the node not ready, another node of the same name) is noticed: the node
/// reads the object again and judges whose it is before it writes ([`judge`]).
pub async fn run(sup: std::sync::Arc<Supervisor>, api: ApiServer, reg: Registration) {
    let mut claim = Claim::Unknown;
    let mut applied_object: Option<serde_json::Value> = None;
    let mut ready_since: Option<String> = None;
    let mut failing = false;
    let mut registered = false;
    let mut reported: Option<String> = None;
    let patience = takeover_after(reg.interval);
    let mut tick = tokio::time::interval(reg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let summary = sup.node_summary().await;
        let object = object_body(&reg, &summary);
        let round = async {
            // Two passes at most: a conflicting write reads the object again and retries once.
            for _ in 0..2 {
                if !matches!(claim, Claim::Ours { .. }) {
                    let seen = api.get(&reg.name).await?.as_ref().map(Seen::of);
                    let (next, verdict) =
                        judge(seen.as_ref(), &summary.id, &claim, Instant::now(), patience);
                    claim = next;
                    match verdict {
                        Verdict::Create => match api.create(&object).await {
                            Ok(o) => {
                                claim = Claim::Ours {
                                    version: Seen::of(&o).version,
                                };
                                applied_object = Some(object.clone());
                            }
                            // Another node created it first: read it again.
                            Err(WriteError::Conflict(_)) => continue,
                            Err(e) => return Err(anyhow::Error::from(e)),
                        },
                        Verdict::Write => {}
                        Verdict::TakeOver { id, silent } => {
                            tracing::warn!(node = %reg.name, other_id = %id, silent_s = silent.as_secs(), "taking over the HyperNode of this name: the node that held it stopped heartbeating");
                            applied_object = None;
                        }
                        Verdict::Duplicate { id } => {
                            return Ok(Some(format!(
                                "another node (id {id}) heartbeats as HyperNode {}: two nodes have this name; this node ({}) writes nothing until that one stops for {}s (give one of them another --node-name)",
                                reg.name,
                                summary.id,
                                patience.as_secs()
                            )));
                        }
                    }
                }
                let Claim::Ours { version } = &claim else {
                    continue;
                };
                let mut version = version.clone();
                let wrote = async {
                    if applied_object.as_ref() != Some(&object) {
                        let o = api
                            .apply(&reg.name, &at_version(object.clone(), &version), false)
                            .await?;
                        version = Seen::of(&o).version;
                        applied_object = Some(object.clone());
                    }
                    let now = rfc3339_now();
                    let since = ready_since.get_or_insert_with(|| now.clone()).clone();
                    let body = status_body(&reg, &summary, &now, &since);
                    let o = api
                        .apply(&reg.name, &at_version(body, &version), true)
                        .await?;
                    Ok::<_, WriteError>(Seen::of(&o).version)
                }
                .await;
                match wrote {
                    Ok(v) => {
                        claim = Claim::Ours { version: v };
                        return Ok(None);
                    }
                    Err(WriteError::Conflict(e)) => {
                        tracing::debug!(node = %reg.name, error = %e, "the HyperNode changed since this node wrote it; reading it again");
                        claim = Claim::Unknown;
                        // The operator may have marked it not ready: a new ready period.
                        ready_since = None;
                        applied_object = None;
                    }
                    Err(e) => return Err(anyhow::Error::from(e)),
                }
            }
            anyhow::Ok(None)
        };
        match round.await {
            Ok(None) if matches!(claim, Claim::Ours { .. }) => {
                if failing || !registered || reported.is_some() {
                    tracing::info!(node = %reg.name, address = %reg.address, "HyperNode registered; heartbeats every {:?}", reg.interval);
                }
                registered = true;
                failing = false;
                reported = None;
                sup.set_registration_problem(None);
            }
            Ok(None) => {}
            Ok(Some(problem)) => {
                if reported.as_deref() != Some(problem.as_str()) {
                    tracing::error!(node = %reg.name, "{problem}");
                }
                sup.set_registration_problem(Some(problem.clone()));
                reported = Some(problem);
                registered = false;
            }
            Err(e) => {
                // The operator may have marked the node not ready meanwhile: the next
                // success starts a new ready period, and re-applies the object.
                ready_since = None;
                applied_object = None;
                claim = Claim::Unknown;
                if !failing {
                    tracing::warn!(node = %reg.name, error = %format!("{e:#}"), "heartbeat to the API server failed; retrying every interval");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(id: &str, heartbeat: &str) -> Seen {
        Seen {
            node_id: id.into(),
            heartbeat: Some(heartbeat.into()),
            version: "7".into(),
        }
    }

    #[test]
    fn a_name_held_by_a_heartbeating_node_is_not_taken_and_a_silent_one_is() {
        let t0 = Instant::now();
        let wait = Duration::from_secs(4);
        let s = Duration::from_secs;
        // None yet: create. Ours, or no id: write.
        assert_eq!(
            judge(None, "me", &Claim::Unknown, t0, wait).1,
            Verdict::Create
        );
        let (claim, v) = judge(Some(&seen("me", "h1")), "me", &Claim::Unknown, t0, wait);
        assert_eq!(v, Verdict::Write);
        assert_eq!(
            claim,
            Claim::Ours {
                version: "7".into()
            }
        );
        assert_eq!(
            judge(Some(&seen("", "h1")), "me", &Claim::Unknown, t0, wait).1,
            Verdict::Write
        );
        // Another id: a duplicate while its heartbeat moves, however long that goes on.
        let (mut claim, v) = judge(Some(&seen("other", "h1")), "me", &Claim::Unknown, t0, wait);
        assert_eq!(v, Verdict::Duplicate { id: "other".into() });
        for (i, beat) in ["h2", "h3", "h4", "h5"].iter().enumerate() {
            let at = t0 + s(3 * (i as u64 + 1));
            let (next, v) = judge(Some(&seen("other", beat)), "me", &claim, at, wait);
            assert_eq!(v, Verdict::Duplicate { id: "other".into() }, "{beat}");
            claim = next;
        }
        // Its heartbeat stands still: taken over once it stood still for the whole wait, on
        // this node's clock (the other's heartbeat times are never compared with it).
        let last = t0 + s(12);
        let (_, v) = judge(Some(&seen("other", "h5")), "me", &claim, last + s(3), wait);
        assert_eq!(v, Verdict::Duplicate { id: "other".into() });
        let (claim2, v) = judge(Some(&seen("other", "h5")), "me", &claim, last + s(4), wait);
        assert_eq!(
            v,
            Verdict::TakeOver {
                id: "other".into(),
                silent: s(4)
            }
        );
        assert_eq!(
            claim2,
            Claim::Ours {
                version: "7".into()
            }
        );
        // A third id starts its own wait.
        let (_, v) = judge(Some(&seen("third", "h5")), "me", &claim, last + s(60), wait);
        assert_eq!(v, Verdict::Duplicate { id: "third".into() });
        assert_eq!(takeover_after(Duration::from_secs(10)), s(40));
        assert_eq!(takeover_after(Duration::from_millis(500)), s(4));
    }

    #[test]
    fn node_names_must_be_dns_subdomains() {
        assert!(check_node_name("edge-1.site").is_ok());
        for bad in ["", "Edge", "-a", "a-", "a_b", &"a".repeat(254)] {
            assert!(check_node_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_default_address_is_the_listener_with_a_host_for_wildcards() {
        assert_eq!(
            default_address("127.0.0.1:7443", true, "h"),
            "https://127.0.0.1:7443"
        );
        assert_eq!(default_address("0.0.0.0:80", false, "h"), "http://h:80");
        assert_eq!(default_address("[::]:7443", true, "h"), "https://h:7443");
    }

    #[test]
    fn the_status_carries_the_heartbeat_and_a_ready_condition() {
        let reg = Registration {
            name: "n1".into(),
            address: "https://127.0.0.1:7443".into(),
            interval: Duration::from_secs(10),
        };
        let summary = hyperbox_api::NodeSummary {
            id: "abc".into(),
            workloads: 2,
            ..Default::default()
        };
        let body = status_body(
            &reg,
            &summary,
            "2026-01-01T00:00:10Z",
            "2026-01-01T00:00:00Z",
        );
        let status: HyperNodeStatus = serde_json::from_value(body["status"].clone()).unwrap();
        assert_eq!(
            status.heartbeat_time.as_deref(),
            Some("2026-01-01T00:00:10Z")
        );
        let ready = status.condition(CONDITION_READY).unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(
            ready.last_transition_time.as_deref(),
            Some("2026-01-01T00:00:00Z")
        );
        assert_eq!(status.workloads, 2);
        assert_eq!(object_body(&reg, &summary)["spec"]["nodeId"], "abc");
    }
}
