//! OTLP export: metrics as OTLP/HTTP protobuf (one request per interval carrying one resource
//! per container plus the node's), and the daemon's spans through tracing-opentelemetry and
//! opentelemetry-otlp.
//!
//! Why metrics do not go through the SDK's `MeterProvider`: the SDK gives every provider one
//! fixed `Resource`, so per-container resources would take a provider (and a reader thread and
//! a request) per container. The data is already aggregated (kernel counters, cgroup files),
//! so it is written straight into the OTLP protobuf messages of `opentelemetry-proto` (the
//! types opentelemetry-otlp itself sends) and posted the way its HTTP exporter does.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Histogram, HistogramDataPoint,
    Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use prost::Message;

use super::{Kind, Snapshot, Value};

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.to_string())),
        }),
        ..Default::default()
    }
}

/// The OTLP request for a snapshot: the node's resource first, then one per container.
pub fn request(snap: &Snapshot) -> ExportMetricsServiceRequest {
    let now = nanos(snap.at);
    let scope = InstrumentationScope {
        name: "hyperbox-node".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    let mut per_resource: Vec<Vec<Metric>> = vec![Vec::new(); snap.resources.len()];
    for f in &snap.families {
        // Split the family by resource, keeping its points' order.
        let mut by_res: Vec<Vec<&super::Point>> = vec![Vec::new(); snap.resources.len()];
        for p in &f.points {
            by_res[p.resource].push(p);
        }
        for (r, points) in by_res.into_iter().enumerate() {
            if points.is_empty() {
                continue;
            }
            let start = nanos(snap.resources[r].since);
            let attrs = |p: &super::Point| p.attrs.iter().map(|(k, v)| kv(k, v)).collect();
            let number = |p: &super::Point| NumberDataPoint {
                attributes: attrs(p),
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(match &p.value {
                    Value::Int(v) => number_data_point::Value::AsInt(*v as i64),
                    Value::Float(v) => number_data_point::Value::AsDouble(*v),
                    Value::Histogram(h) => number_data_point::Value::AsDouble(h.sum),
                }),
                ..Default::default()
            };
            let data = match f.kind {
                Kind::Counter => metric::Data::Sum(Sum {
                    data_points: points.iter().map(|p| number(p)).collect(),
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    is_monotonic: true,
                }),
                Kind::Gauge => metric::Data::Gauge(Gauge {
                    data_points: points.iter().map(|p| number(p)).collect(),
                }),
                Kind::Histogram => metric::Data::Histogram(Histogram {
                    data_points: points
                        .iter()
                        .filter_map(|p| match &p.value {
                            Value::Histogram(h) => Some(HistogramDataPoint {
                                attributes: attrs(p),
                                start_time_unix_nano: start,
                                time_unix_nano: now,
                                count: h.count,
                                sum: Some(h.sum),
                                bucket_counts: h.buckets.iter().map(|b| b.1).collect(),
                                explicit_bounds: h
                                    .buckets
                                    .iter()
                                    .map(|b| b.0)
                                    .filter(|b| b.is_finite())
                                    .collect(),
                                ..Default::default()
                            }),
                            _ => None,
                        })
                        .collect(),
                    aggregation_temporality: AggregationTemporality::Cumulative as i32,
                }),
            };
            per_resource[r].push(Metric {
                name: f.name.to_string(),
                description: f.help.to_string(),
                unit: f.unit.to_string(),
                data: Some(data),
                ..Default::default()
            });
        }
    }
    ExportMetricsServiceRequest {
        resource_metrics: snap
            .resources
            .iter()
            .zip(per_resource)
            .filter(|(_, m)| !m.is_empty())
            .map(|(res, metrics)| ResourceMetrics {
                resource: Some(Resource {
                    attributes: res.otel.iter().map(|(k, v)| kv(k, v)).collect(),
                    ..Default::default()
                }),
                scope_metrics: vec![ScopeMetrics {
                    scope: Some(scope.clone()),
                    metrics,
                    ..Default::default()
                }],
                ..Default::default()
            })
            .collect(),
    }
}

/// The metrics URL for a collector base URL (`http://host:4318` -> `.../v1/metrics`), as
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is read.
pub fn metrics_url(endpoint: &str) -> anyhow::Result<String> {
    let base = endpoint.trim_end_matches('/');
    if !(base.starts_with("http://") || base.starts_with("https://")) {
        anyhow::bail!("--otlp-endpoint {endpoint:?}: expected an http:// or https:// URL");
    }
    Ok(format!("{base}/v1/metrics"))
}

/// Start the thread that posts OTLP/HTTP protobuf requests to the collector (a blocking HTTP
/// client must live outside the async runtime). Send it requests; a failure is logged when
/// sending starts failing and when it works again, not on every request.
pub fn spawn_sender(
    endpoint: &str,
) -> anyhow::Result<std::sync::mpsc::SyncSender<ExportMetricsServiceRequest>> {
    let url = metrics_url(endpoint)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<ExportMetricsServiceRequest>(1);
    std::thread::Builder::new()
        .name("hb-otlp".into())
        .spawn(move || {
            let client = match reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = %e, "otlp metrics export off: no http client");
                    return;
                }
            };
            let mut failing = false;
            for req in rx {
                let r = client
                    .post(&url)
                    .header("content-type", "application/x-protobuf")
                    .body(req.encode_to_vec())
                    .send()
                    .map_err(|e| e.to_string())
                    .and_then(|resp| {
                        if resp.status().is_success() {
                            Ok(())
                        } else {
                            Err(resp.status().to_string())
                        }
                    });
                match r {
                    Ok(()) if failing => {
                        failing = false;
                        tracing::info!(url = %url, "otlp metrics export works again");
                    }
                    Err(e) if !failing => {
                        failing = true;
                        tracing::warn!(url = %url, error = %e, "otlp metrics export failed; retrying every interval");
                    }
                    _ => {}
                }
            }
        })?;
    Ok(tx)
}

/// A tracing layer exporting the daemon's spans (pull, prepare, start, reconcile) to
/// `<endpoint>/v1/traces` over OTLP/HTTP protobuf. The provider is returned so that it can be
/// flushed at exit.
pub fn trace_layer(
    endpoint: &str,
    node: &str,
) -> anyhow::Result<(
    hyperbox_client::cli::ExtraLayer,
    opentelemetry_sdk::trace::SdkTracerProvider,
)> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let base = endpoint.trim_end_matches('/');
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{base}/v1/traces"))
        .with_timeout(Duration::from_secs(10))
        .with_headers(Default::default())
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("hyperbox-node")
        .with_attributes([
            opentelemetry::KeyValue::new("host.name", node.to_string()),
            opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ])
        .build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("hyperbox-node");
    Ok((
        Box::new(tracing_opentelemetry::layer().with_tracer(tracer)),
        provider,
    ))
}
