//! Node registration: the node creates its `HyperNode` and keeps it current with heartbeats
//! (server-side apply of the object and of its status), so the operator finds it, places work
//! on it and notices when it goes away.

use std::time::Duration;

use anyhow::Result;
use hyperbox_api::hypernode::{
    HyperNodeSpec, HyperNodeStatus, NodeCondition, CONDITION_READY, HYPERNODES, KIND_HYPERNODE,
};

use super::apiserver::ApiServer;
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

/// Register and heartbeat until the daemon stops. Failures are logged and retried at the
/// next heartbeat: the API server being away never affects the containers.
pub async fn run(sup: std::sync::Arc<Supervisor>, api: ApiServer, reg: Registration) {
    let path = format!(
        "/apis/{}/{HYPERNODES}/{}",
        hyperbox_api::API_VERSION,
        reg.name
    );
    let status_path = format!("{path}/status");
    let mut applied_object: Option<serde_json::Value> = None;
    let mut ready_since: Option<String> = None;
    let mut failing = false;
    let mut registered = false;
    let mut tick = tokio::time::interval(reg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let summary = sup.node_summary().await;
        let object = object_body(&reg, &summary);
        let round = async {
            if applied_object.as_ref() != Some(&object) {
                api.apply(&path, &object).await?;
                applied_object = Some(object);
            }
            let now = rfc3339_now();
            let since = ready_since.get_or_insert_with(|| now.clone()).clone();
            api.apply(&status_path, &status_body(&reg, &summary, &now, &since))
                .await?;
            anyhow::Ok(())
        };
        match round.await {
            Ok(()) => {
                if failing || !registered {
                    tracing::info!(node = %reg.name, address = %reg.address, "HyperNode registered; heartbeats every {:?}", reg.interval);
                }
                registered = true;
                failing = false;
            }
            Err(e) => {
                // The operator may have marked the node not ready meanwhile: the next
                // success starts a new ready period, and re-applies the object.
                ready_since = None;
                applied_object = None;
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
