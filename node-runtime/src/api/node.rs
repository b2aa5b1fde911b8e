//! `/v1/node`: the node's summary (owned by the workloads, see `Supervisor::node_summary`).

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::request::AppState;

pub(super) async fn node(State(sup): State<AppState>) -> Response {
    Json(sup.node_summary().await).into_response()
}
