//! A workload's replicas: restart all or one (`.../restart`, `.../replicas/{ordinal}/restart`)
//! and evict one (`.../replicas/{ordinal}/evict`).

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::request::{error, AppState, WorkloadPath};

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EvictRequest {
    #[serde(default)]
    reason: Option<String>,
    /// For pressure (reason `EvictedForPressure`, which sources with other nodes act on),
    /// as the node's own protection does; else `Evicted`.
    #[serde(default)]
    pressure: bool,
}

pub(super) async fn evict(
    State(sup): State<AppState>,
    UrlPath(path): UrlPath<WorkloadPath>,
    body: axum::body::Bytes,
) -> Response {
    let name = match path.key() {
        Ok(k) => k,
        Err(r) => return r,
    };
    let ordinal = path.ordinal.unwrap_or(0);
    let req: EvictRequest = if body.is_empty() {
        EvictRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("request body is not an eviction ({{\"reason\": \"...\", \"pressure\": false}}): {e}"),
                    vec![],
                )
            }
        }
    };
    let reason = req
        .reason
        .unwrap_or_else(|| "requested through the API".into());
    let done = if req.pressure {
        Ok(sup.evict_for_pressure(&name, ordinal, &reason).await)
    } else {
        sup.evict(&name, ordinal, &reason).await
    };
    match done {
        Ok(true) => Json(serde_json::json!({
            "evicted": name,
            "replica": ordinal,
            "reason": reason,
            "pressure": req.pressure,
        }))
        .into_response(),
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            format!("workload {name:?} has no replica {ordinal}"),
            vec![],
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("evict {name}: {e:#}"),
            vec![],
        ),
    }
}

/// Restart every replica, or (`replicas/{ordinal}/restart`) one.
pub(super) async fn restart_one(
    State(sup): State<AppState>,
    UrlPath(path): UrlPath<WorkloadPath>,
) -> Response {
    match path.key() {
        Ok(name) => restart(sup, name, path.ordinal).await,
        Err(r) => r,
    }
}

async fn restart(sup: AppState, name: String, replica: Option<u32>) -> Response {
    match sup.restart(&name, replica).await {
        Ok(true) => {
            Json(serde_json::json!({"restarted": name, "replica": replica})).into_response()
        }
        Ok(false) => error(
            StatusCode::NOT_FOUND,
            match replica {
                Some(n) => format!("workload {name:?} has no replica {n}"),
                None => format!("workload {name:?} not found"),
            },
            vec![],
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("restart {name}: {e:#}"),
            vec![],
        ),
    }
}
