//! `/v1/digests`: every workload's digest, and the watch a source uses instead of polling.

use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::request::{AppState, WatchQuery};

/// Longest a watch of the digests is held open.
const MAX_DIGESTS_WATCH: std::time::Duration = std::time::Duration::from_secs(300);

/// `GET /v1/digests`: every workload's digest (a `Vec<WorkloadDigest>`).
///
/// `?watch=true[&after=V][&timeoutMs=T]` is the watch a source uses instead of polling: it
/// answers a `DigestList` at once without `after`, and otherwise once the digests' version
/// differs from `after` (an apply or a delete, or a restarted daemon), or after `timeoutMs`
/// (default 30 s, at most 5 min). An answer without change carries the version and no
/// `items`, so a quiet node costs a few hundred bytes per timeout.
pub(super) async fn digests(State(sup): State<AppState>, Query(q): Query<WatchQuery>) -> Response {
    if q.watch != Some(true) {
        return (
            [(header::CONTENT_TYPE, "application/json")],
            sup.digests_json().await,
        )
            .into_response();
    }
    let version = match q.after {
        Some(after) => {
            let timeout = std::time::Duration::from_millis(q.timeout_ms.unwrap_or(30_000))
                .min(MAX_DIGESTS_WATCH);
            let v = sup.wait_digests(after, timeout).await;
            if v == after {
                return Json(serde_json::json!({ "resourceVersion": v })).into_response();
            }
            v
        }
        None => sup.digests_version(),
    };
    // The version is read before the items: a change in between shows in the items, and the
    // next watch (after this version) answers again at once.
    let items = sup.digests_json().await;
    let mut body = format!("{{\"resourceVersion\":{version},\"items\":").into_bytes();
    body.extend_from_slice(&items);
    body.push(b'}');
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}
