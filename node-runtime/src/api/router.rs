//! The node API's routes, and the digests' version on every answer.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use super::digests::digests;
use super::images::{prewarm, pull, pull_progress, remove_image};
use super::logs::logs;
use super::node::node;
use super::replicas::{evict, restart_one};
use super::request::{error, AppState};
use super::workloads::{apply, delete, get_one, get_spec, list};
use crate::workloads::fence::Refusal;
use crate::workloads::Supervisor;

/// Largest request body accepted (a batch of workloads).
pub const MAX_BODY_BYTES: usize = hyperbox_api::NODE_MAX_BODY_BYTES;

pub fn router(sup: Arc<Supervisor>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/workloads", get(list).post(apply))
        // A workload is `{namespace}/{name}`; `/v1/workloads/{name}` alone is the default
        // namespace's (what nodes before namespaces answered).
        .route("/v1/workloads/{name}", get(get_one).delete(delete))
        .route("/v1/workloads/{ns}/{name}", get(get_one).delete(delete))
        .route("/v1/workloads/{ns}/{name}/spec", get(get_spec))
        .route("/v1/workloads/{ns}/{name}/logs", get(logs))
        .route(
            "/v1/workloads/{ns}/{name}/restart",
            axum::routing::post(restart_one),
        )
        .route(
            "/v1/workloads/{ns}/{name}/replicas/{ordinal}/restart",
            axum::routing::post(restart_one),
        )
        .route(
            "/v1/workloads/{ns}/{name}/replicas/{ordinal}/evict",
            axum::routing::post(evict),
        )
        .route("/v1/digests", get(digests))
        .route("/v1/node", get(node))
        .route("/v1/images/pull", axum::routing::post(pull))
        .route("/v1/images/prewarm", axum::routing::post(prewarm))
        .route("/v1/images/progress", get(pull_progress))
        .route("/v1/images", axum::routing::delete(remove_image))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn_with_state(sup.clone(), fenced))
        .layer(middleware::from_fn_with_state(
            sup.clone(),
            digests_version_header,
        ))
        .with_state(sup)
}

/// Writes (anything but GET and HEAD) that carry a leader's epoch pass only if no newer epoch
/// of their scope was seen (see [`crate::workloads::fence`]): 409 otherwise, 400 for a
/// malformed header.
async fn fenced(State(sup): State<AppState>, req: Request, next: Next) -> Response {
    use axum::http::{Method, StatusCode};
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    let Some(value) = req.headers().get(hyperbox_client::FENCE_HEADER) else {
        return next.run(req).await;
    };
    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
    match sup.fences().admit(&value) {
        Ok(Ok(())) => {
            // The soak checks from these that no older epoch was admitted after a newer one.
            tracing::debug!(fence = %value, method = %req.method(), path = %req.uri().path(), "fenced write admitted");
            next.run(req).await
        }
        Ok(Err(r @ Refusal::Stale { .. })) => {
            tracing::warn!(refusal = %r, method = %req.method(), path = %req.uri().path(), "refused a write of an older leader");
            error(StatusCode::CONFLICT, r.to_string(), vec![])
        }
        Ok(Err(r)) => error(StatusCode::BAD_REQUEST, r.to_string(), vec![]),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("recording the leader epoch: {e:#}"),
            vec![],
        ),
    }
}

/// Header on every answer: the digests' version once the request was handled (see
/// `GET /v1/digests?watch=true`). A source that applied or deleted knows from it which
/// version of a watched list includes its own change.
pub const DIGESTS_VERSION_HEADER: &str = "x-hyperbox-digests-version";

async fn digests_version_header(State(sup): State<AppState>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    resp.headers_mut().insert(
        DIGESTS_VERSION_HEADER,
        axum::http::HeaderValue::from(sup.digests_version()),
    );
    resp
}
