//! Applying a plan's workloads in requests the node accepts. The node caps request bodies
//! (`NODE_MAX_BODY_BYTES`, 4 MiB), so batches are cut by serialized bytes, not by count: 500
//! workloads with large env blocks are several requests. A node with a smaller cap answers 413;
//! the batch is then halved until it fits, down to one workload. A workload too large to send
//! on its own is reported for itself and never holds back the others.

use std::collections::VecDeque;
use std::future::Future;

use hyperbox_client::{apply_body, apply_body_len, ClientError, NODE_MAX_BODY_BYTES};

/// Bodies above this size can be cut off by a node that refuses them before reading them all.
const EARLY_REFUSAL_BYTES: usize = 256 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Target size of one request body: well under the node's cap, so a batch fits even if
    /// the node's framing or cap shifts a little.
    pub batch_bytes: usize,
    /// The node's cap: a workload whose request alone is larger is never sent.
    pub max_body_bytes: usize,
    /// Workloads per request, whatever their size (bounds the node's work per request, and so
    /// the time the request takes).
    pub batch_count: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            batch_bytes: 3 << 20,
            max_body_bytes: NODE_MAX_BODY_BYTES,
            batch_count: 500,
        }
    }
}

/// How the documents of one apply are split into requests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Batches {
    /// Indices of the documents of each request, in order.
    pub batches: Vec<Vec<usize>>,
    /// Documents whose request alone would exceed `max_body_bytes`.
    pub too_large: Vec<usize>,
}

/// Cut documents of these serialized sizes into requests of at most `batch_bytes` (a document
/// larger than that on its own still goes alone, up to `max_body_bytes`) and `batch_count`
/// documents. Order is kept.
pub fn plan_batches(sizes: &[usize], limits: &Limits) -> Batches {
    let mut out = Batches::default();
    let mut current: Vec<usize> = Vec::new();
    let mut current_len = apply_body_len([]);
    for (i, &size) in sizes.iter().enumerate() {
        if apply_body_len([size]) > limits.max_body_bytes {
            out.too_large.push(i);
            continue;
        }
        // A comma before every document but the first.
        let added = size + usize::from(!current.is_empty());
        if !current.is_empty()
            && (current_len + added > limits.batch_bytes || current.len() >= limits.batch_count)
        {
            out.batches.push(std::mem::take(&mut current));
            current_len = apply_body_len([]);
        }
        current_len += size + usize::from(!current.is_empty());
        current.push(i);
    }
    if !current.is_empty() {
        out.batches.push(current);
    }
    out
}

/// What became of one document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Applied,
    /// Too large to send, or the node refused it alone with 413: retrying cannot help.
    TooLarge {
        bytes: usize,
        /// The node's answer when it refused it; `None` when it was never sent.
        refusal: Option<String>,
    },
    /// The node refused this workload itself (its policy, or its validation): the fields and
    /// rules it named. Not retried until the manifest or the node changes.
    Refused(String),
    /// The request holding it failed (node down, timeout, an unexplained refusal): retried at
    /// the next sync.
    Failed(String),
}

impl Delivery {
    /// The message for the workload's result in status.
    pub fn message(&self, name: &str, limits: &Limits) -> Option<String> {
        match self {
            Delivery::Applied => None,
            Delivery::TooLarge {
                bytes,
                refusal: None,
            } => Some(format!(
                "workload {name} is {} as JSON, more than the node accepts in one request ({}): not applied; the previously applied version, if any, keeps running",
                human_bytes(*bytes),
                human_bytes(limits.max_body_bytes)
            )),
            Delivery::TooLarge {
                bytes,
                refusal: Some(e),
            } => Some(format!(
                "workload {name} is {} as JSON, too large for the node ({e}): not applied; the previously applied version, if any, keeps running",
                human_bytes(*bytes)
            )),
            Delivery::Refused(e) => Some(format!(
                "node refused it: {e}; the previously applied version, if any, keeps running"
            )),
            Delivery::Failed(e) => Some(format!("node refused it: {e}")),
        }
    }
}

/// Send `docs` (serialized workloads) in batches; a batch the node refuses as too large (413)
/// is halved and retried. Returns one delivery per document.
pub async fn deliver<F, Fut>(docs: &[Vec<u8>], limits: &Limits, mut send: F) -> Vec<Delivery>
where
    F: FnMut(Vec<u8>) -> Fut,
    Fut: Future<Output = Result<(), ClientError>>,
{
    let sizes: Vec<usize> = docs.iter().map(Vec::len).collect();
    let plan = plan_batches(&sizes, limits);
    let mut out = vec![Delivery::Applied; docs.len()];
    for &i in &plan.too_large {
        tracing::warn!(
            bytes = sizes[i],
            limit = limits.max_body_bytes,
            "workload too large for one request: not sent"
        );
        out[i] = Delivery::TooLarge {
            bytes: sizes[i],
            refusal: None,
        };
    }
    let mut queue: VecDeque<Vec<usize>> = plan.batches.into();
    while let Some(batch) = queue.pop_front() {
        let parts: Vec<&[u8]> = batch.iter().map(|&i| docs[i].as_slice()).collect();
        let body = apply_body(&parts);
        let bytes = body.len();
        match send(body).await {
            Ok(()) => {}
            // A node that refuses a large body early may close the connection while the body
            // is still being written, so the 413 is lost and only a write error is seen: a
            // transport error on a large batch is treated the same way (smaller is never
            // worse). Small requests are written at once, so there it is a real failure.
            Err(e)
                if batch.len() > 1
                    && (e.status() == Some(413)
                        || (matches!(e, ClientError::Http { .. })
                            && bytes > EARLY_REFUSAL_BYTES)) =>
            {
                let (first, second) = batch.split_at(batch.len() / 2);
                tracing::info!(
                    workloads = batch.len(),
                    bytes,
                    error = %e,
                    "node refused the batch or dropped the connection while it was sent; splitting it"
                );
                queue.push_front(second.to_vec());
                queue.push_front(first.to_vec());
            }
            Err(e) if e.status() == Some(413) => {
                let i = batch[0];
                out[i] = Delivery::TooLarge {
                    bytes: sizes[i],
                    refusal: Some(format!("{e}")),
                };
            }
            Err(e)
                if matches!(e.status(), Some(400) | Some(403) | Some(409))
                    && !refused_positions(&e, batch.len()).is_empty() =>
            {
                // The node names the refused workloads (`workloads[i].…`: its policy, its
                // admission (no room, labels that do not match), or another manager owns
                // them): set those aside and send the rest again, so one refused workload
                // never blocks the others.
                let refused = refused_positions(&e, batch.len());
                let mut rest = Vec::new();
                for (pos, &i) in batch.iter().enumerate() {
                    match refused.iter().find(|(p, _)| *p == pos) {
                        Some((_, why)) => {
                            tracing::warn!(reason = %why, "node refused a workload");
                            out[i] = Delivery::Refused(why.clone());
                        }
                        None => rest.push(i),
                    }
                }
                if !rest.is_empty() {
                    queue.push_front(rest);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, workloads = batch.len(), bytes, "apply to node failed");
                for &i in &batch {
                    out[i] = Delivery::Failed(format!("{e}"));
                }
            }
        }
    }
    out
}

/// Positions in a batch of `len` that a 400 answer's field errors name (`workloads[3].spec…`),
/// each with the errors for it joined. Empty when the answer names no workload.
fn refused_positions(e: &ClientError, len: usize) -> Vec<(usize, String)> {
    let ClientError::Api { body, .. } = e else {
        return Vec::new();
    };
    let mut out: Vec<(usize, String)> = Vec::new();
    for f in &body.fields {
        let Some(rest) = f.field.strip_prefix("workloads[") else {
            continue;
        };
        let Some((n, field)) = rest.split_once(']') else {
            continue;
        };
        let Ok(pos) = n.parse::<usize>() else {
            continue;
        };
        if pos >= len {
            continue;
        }
        let field = field.trim_start_matches('.');
        let text = match &f.reason {
            Some(reason) => format!("{field}: {reason}: {}", f.message),
            None => format!("{field}: {}", f.message),
        };
        match out.iter_mut().find(|(p, _)| *p == pos) {
            Some((_, t)) => {
                t.push_str("; ");
                t.push_str(&text);
            }
            None => out.push((pos, text)),
        }
    }
    out
}

/// `812 B`, `20.0 KiB`, `4.5 MiB`.
pub fn human_bytes(n: usize) -> String {
    const KIB: f64 = 1024.0;
    let f = n as f64;
    if f < KIB {
        format!("{n} B")
    } else if f < KIB * KIB {
        format!("{:.1} KiB", f / KIB)
    } else {
        format!("{:.1} MiB", f / (KIB * KIB))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyperbox_api::ApiError;
    use hyperbox_client::ClientError;
    use std::cell::RefCell;

    const KIB: usize = 1024;

    fn limits(batch: usize, max: usize, count: usize) -> Limits {
        Limits {
            batch_bytes: batch,
            max_body_bytes: max,
            batch_count: count,
        }
    }

    fn body_len(sizes: &[usize], batch: &[usize]) -> usize {
        apply_body_len(batch.iter().map(|&i| sizes[i]))
    }

    #[test]
    fn batches_stay_under_the_byte_budget_with_the_envelope() {
        // 500 workloads of ~20 KiB: ~10 MiB, far over the node's 4 MiB in one request.
        let sizes: Vec<usize> = (0..500).map(|i| 20 * KIB + i % 7).collect();
        let l = Limits::default();
        let b = plan_batches(&sizes, &l);
        assert!(b.too_large.is_empty());
        assert!(b.batches.len() >= 4, "{}", b.batches.len());
        let flat: Vec<usize> = b.batches.concat();
        assert_eq!(
            flat,
            (0..500).collect::<Vec<_>>(),
            "every one, once, in order"
        );
        for batch in &b.batches {
            assert!(body_len(&sizes, batch) <= l.batch_bytes);
        }
        // Batches are full: adding the next document would have crossed the budget.
        for pair in b.batches.windows(2) {
            let mut grown = pair[0].clone();
            grown.push(pair[1][0]);
            assert!(body_len(&sizes, &grown) > l.batch_bytes);
        }
    }

    #[test]
    fn exact_fit_and_count_cap() {
        // Envelope 16 bytes + 3 docs of 10 + 2 commas = 48.
        let sizes = [10, 10, 10, 10];
        let b = plan_batches(&sizes, &limits(48, 1000, 100));
        assert_eq!(b.batches, vec![vec![0, 1, 2], vec![3]]);
        let b = plan_batches(&sizes, &limits(47, 1000, 100));
        assert_eq!(b.batches, vec![vec![0, 1], vec![2, 3]]);
        let b = plan_batches(&sizes, &limits(1000, 1000, 3));
        assert_eq!(b.batches, vec![vec![0, 1, 2], vec![3]]);
    }

    #[test]
    fn big_documents_go_alone_and_oversized_ones_are_set_aside() {
        // Budget 100, cap 200: 150 goes alone, 300 cannot be sent at all.
        let sizes = [20, 150, 20, 300, 20];
        let b = plan_batches(&sizes, &limits(100, 200, 100));
        assert_eq!(b.too_large, vec![3]);
        assert_eq!(b.batches, vec![vec![0], vec![1], vec![2, 4]]);
        assert!(plan_batches(&[], &Limits::default()).batches.is_empty());
    }

    fn too_large() -> ClientError {
        ClientError::Api {
            status: 413,
            body: ApiError {
                error: "length limit exceeded".into(),
                fields: vec![],
            },
        }
    }

    /// A node that refuses bodies over `cap` with 413 and records what it applied.
    async fn run_against_cap(
        docs: &[Vec<u8>],
        l: &Limits,
        cap: usize,
    ) -> (Vec<Delivery>, Vec<usize>) {
        let requests = RefCell::new(Vec::new());
        let out = deliver(docs, l, |body| {
            requests.borrow_mut().push(body.len());
            let r = if body.len() > cap {
                Err(too_large())
            } else {
                Ok(())
            };
            async move { r }
        })
        .await;
        (out, requests.into_inner())
    }

    #[tokio::test]
    async fn refused_batches_are_halved_down_to_single_workloads() {
        let doc = |n: usize| vec![b'x'; n];
        // The node takes at most 100 bytes; we aim at 1000.
        let docs = vec![doc(30), doc(30), doc(30), doc(150), doc(30), doc(30)];
        let l = limits(1000, 10_000, 100);
        let (out, requests) = run_against_cap(&docs, &l, 100).await;
        assert_eq!(
            out[3],
            Delivery::TooLarge {
                bytes: 150,
                refusal: Some("node api: length limit exceeded (413)".into())
            }
        );
        for i in [0, 1, 2, 4, 5] {
            assert_eq!(out[i], Delivery::Applied, "{i}");
        }
        assert!(requests.len() < 12, "{requests:?}");
        let msg = out[3].message("big", &l).unwrap();
        assert!(
            msg.contains("workload big is 150 B") && msg.contains("413"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn oversized_workload_is_never_sent_and_others_are_applied() {
        let docs = vec![vec![b'a'; 100], vec![b'b'; 5000], vec![b'c'; 100]];
        let l = limits(1000, 2000, 100);
        let (out, requests) = run_against_cap(&docs, &l, 2000).await;
        assert_eq!(out[0], Delivery::Applied);
        assert_eq!(out[2], Delivery::Applied);
        assert_eq!(
            out[1],
            Delivery::TooLarge {
                bytes: 5000,
                refusal: None
            }
        );
        assert_eq!(requests, vec![apply_body_len([100, 100])]);
        let msg = out[1].message("huge", &l).unwrap();
        assert!(msg.contains("workload huge is 4.9 KiB"), "{msg}");
    }

    #[tokio::test]
    async fn other_errors_fail_the_batch_without_splitting() {
        let docs = vec![vec![b'a'; 10], vec![b'b'; 10]];
        let calls = RefCell::new(0);
        let out = deliver(&docs, &Limits::default(), |_| {
            *calls.borrow_mut() += 1;
            async {
                Err(ClientError::Http {
                    method: "POST".into(),
                    path: "/v1/workloads".into(),
                    message: "connection reset".into(),
                })
            }
        })
        .await;
        assert_eq!(*calls.borrow(), 1);
        assert!(out
            .iter()
            .all(|d| matches!(d, Delivery::Failed(e) if e.contains("connection reset"))));
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(812), "812 B");
        assert_eq!(human_bytes(20 * KIB + 512), "20.5 KiB");
        assert_eq!(human_bytes(9 << 19), "4.5 MiB");
    }

    #[tokio::test]
    async fn admission_refusals_keep_their_reason_and_spare_the_rest() {
        let docs: Vec<Vec<u8>> = (0..3).map(|i| format!("doc{i}").into_bytes()).collect();
        let sent = RefCell::new(0);
        let out = deliver(&docs, &Limits::default(), |body| {
            *sent.borrow_mut() += 1;
            let text = String::from_utf8(body).unwrap();
            let r = match text.split(',').position(|d| d.contains("doc2")) {
                Some(i) => Err(ClientError::Api {
                    status: 403,
                    body: ApiError {
                        error: "refused by node admission".into(),
                        fields: vec![hyperbox_api::validate::FieldError {
                            field: format!("workloads[{i}].spec.resources.requests.memory"),
                            message: "1 × 2Gi requested; 1Gi of the node's 3Gi allocatable memory is free".into(),
                            line: None,
                            reason: Some("InsufficientMemory".into()),
                        }],
                    },
                }),
                None => Ok(()),
            };
            async move { r }
        })
        .await;
        assert_eq!(out[0], Delivery::Applied);
        assert_eq!(out[1], Delivery::Applied);
        assert!(
            matches!(&out[2], Delivery::Refused(m) if m.starts_with("spec.resources.requests.memory: InsufficientMemory: 1 × 2Gi")),
            "{:?}",
            out[2]
        );
        assert_eq!(*sent.borrow(), 2, "the rest is sent again once");
    }

    #[tokio::test]
    async fn workloads_the_node_refuses_are_set_aside_and_the_rest_applied() {
        let docs: Vec<Vec<u8>> = (0..5).map(|i| format!("doc{i}").into_bytes()).collect();
        let applied = RefCell::new(Vec::new());
        // The node refuses any request that holds doc1 or doc3, naming them by position.
        let out = deliver(&docs, &Limits::default(), |body| {
            let text = String::from_utf8(body).unwrap();
            let items: Vec<&str> = text
                .trim_start_matches("{\"workloads\":[")
                .trim_end_matches("]}")
                .split(',')
                .collect();
            let fields: Vec<hyperbox_api::validate::FieldError> = items
                .iter()
                .enumerate()
                .filter(|(_, d)| **d == "doc1" || **d == "doc3")
                .map(|(i, _)| hyperbox_api::validate::FieldError {
                    field: format!("workloads[{i}].spec.volumes[0].hostPath.path"),
                    message: "/etc is outside the host paths this node allows".into(),
                    line: None,
                    reason: None,
                })
                .collect();
            let r = if fields.is_empty() {
                applied
                    .borrow_mut()
                    .extend(items.iter().map(|s| s.to_string()));
                Ok(())
            } else {
                Err(ClientError::Api {
                    status: 400,
                    body: ApiError {
                        error: "invalid workload".into(),
                        fields,
                    },
                })
            };
            async move { r }
        })
        .await;
        assert!(
            matches!(&out[1], Delivery::Refused(m) if m.contains("spec.volumes[0].hostPath.path: /etc"))
        );
        assert!(matches!(&out[3], Delivery::Refused(_)));
        for i in [0, 2, 4] {
            assert_eq!(out[i], Delivery::Applied);
        }
        assert_eq!(applied.into_inner(), vec!["doc0", "doc2", "doc4"]);
    }
}
