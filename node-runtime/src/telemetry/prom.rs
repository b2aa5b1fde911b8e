//! Prometheus exposition of a [`Snapshot`] with prometheus-client (OpenMetrics text).
//!
//! Names come from the OpenTelemetry names the standard way: dots become underscores, `s` and
//! `By` units become `_seconds` and `_bytes` suffixes, and counters get `_total`. Every series
//! of a container carries its `namespace`, `workload` and `replica` labels; the changing
//! identity (container id, image digest, Git revision) is on `hyperbox_container_info`.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::{Kind, Snapshot, Value};

/// The content type of [`encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

/// A Prometheus label name from an OpenTelemetry attribute name.
fn label_name(attr: &str) -> String {
    attr.replace('.', "_")
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let snap = &self.0;
        for f in &snap.families {
            let name = f.name.replace('.', "_");
            let unit = match f.unit {
                "s" => Some(Unit::Seconds),
                "By" => Some(Unit::Bytes),
                _ => None,
            };
            let kind = match f.kind {
                Kind::Counter => MetricType::Counter,
                Kind::Gauge => MetricType::Gauge,
                Kind::Histogram => MetricType::Histogram,
            };
            let mut metric = encoder.encode_descriptor(&name, f.help, unit.as_ref(), kind)?;
            for p in &f.points {
                let labels: Vec<(String, String)> = snap.resources[p.resource]
                    .labels
                    .iter()
                    .chain(p.attrs.iter())
                    .map(|(k, v)| (label_name(k), v.clone()))
                    .collect();
                if labels.is_empty() {
                    write_value(&mut metric, &p.value, f.kind)?;
                } else {
                    write_value(&mut metric.encode_family(&labels)?, &p.value, f.kind)?;
                }
            }
        }
        Ok(())
    }
}

fn write_value(series: &mut MetricEncoder, value: &Value, kind: Kind) -> Result<(), fmt::Error> {
    match (value, kind) {
        (Value::Histogram(h), _) => {
            // prometheus-client marks the +Inf bucket by f64::MAX.
            let buckets: Vec<(f64, u64)> = h
                .buckets
                .iter()
                .map(|(b, c)| (if b.is_finite() { *b } else { f64::MAX }, *c))
                .collect();
            series.encode_histogram::<NoLabelSet>(h.sum, h.count, &buckets, None)
        }
        (Value::Int(v), Kind::Counter) => series.encode_counter::<NoLabelSet, _, u64>(v, None),
        (Value::Float(v), Kind::Counter) => series.encode_counter::<NoLabelSet, _, f64>(v, None),
        (Value::Int(v), _) => series.encode_gauge(v),
        (Value::Float(v), _) => series.encode_gauge(v),
    }
}

/// OpenMetrics text of the snapshot.
pub fn encode(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot)));
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
    out
}
