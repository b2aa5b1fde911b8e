//! `/v1/workloads/{ns}/{name}/logs`: the tail of a replica's log, streamed.

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::request::{error, AppState, WorkloadPath};

#[derive(serde::Deserialize)]
pub(super) struct LogQuery {
    tail: Option<u64>,
    replica: Option<u32>,
}

pub(super) async fn logs(
    State(sup): State<AppState>,
    UrlPath(path): UrlPath<WorkloadPath>,
    Query(q): Query<LogQuery>,
) -> Response {
    let name = match path.key() {
        Ok(k) => k,
        Err(r) => return r,
    };
    if sup.status(&name).await.is_none() {
        return error(
            StatusCode::NOT_FOUND,
            format!("workload {name:?} not found"),
            vec![],
        );
    }
    let path = sup.log_path(&name, q.replica.unwrap_or(0));
    let tail = q.tail.unwrap_or(1 << 20).min(64 << 20);
    let segments = match tokio::task::spawn_blocking(move || {
        crate::workloads::logs::tail_segments(&path, tail)
    })
    .await
    {
        Ok(s) => s,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}"), vec![]),
    };
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(crate::workloads::logs::stream(segments, tail)),
    )
        .into_response()
}
