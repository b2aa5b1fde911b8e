//! Plain data for the core's unit tests: workloads from YAML and nodes with room.

use hyperbox_api::validate::{parse_documents, ParsedDocument};
use hyperbox_api::{NodeSummary, Workload};

use super::place::{Desired, NodeView};

pub const MI: u64 = 1 << 20;

/// Workloads named as given, image `r.io/a:1`, each with `extra` spec lines.
pub fn workloads(docs: &[(&str, &str)]) -> Vec<Workload> {
    docs.iter()
        .map(|(name, extra)| {
            let text = format!(
                "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}}}\nspec:\n  image: r.io/a:1\n{extra}"
            );
            match parse_documents(&text).expect("parse").remove(0) {
                ParsedDocument::Workload(w) => *w,
                other => panic!("{name}: not a workload: {other:?}"),
            }
        })
        .collect()
}

/// The workloads by name.
pub fn desired(ws: &[Workload]) -> Desired<'_> {
    ws.iter().map(|w| (w.metadata.name.as_str(), w)).collect()
}

/// A node that takes work: 2 CPUs, `mem_mi` MiB allocatable of which `requested_mi` are
/// requested, labelled `zone`.
pub fn view(key: &str, zone: &str, mem_mi: u64, requested_mi: u64) -> NodeView {
    NodeView {
        key: key.into(),
        summary: Some(NodeSummary {
            labels: [("zone".to_string(), zone.to_string())].into(),
            allocatable: hyperbox_api::ResourceAmounts {
                cpu_millis: 2000,
                memory_bytes: mem_mi * MI,
            },
            requested: hyperbox_api::ResourceAmounts {
                cpu_millis: 0,
                memory_bytes: requested_mi * MI,
            },
            ..Default::default()
        }),
        schedulable: true,
        nominal_load: 0,
    }
}
