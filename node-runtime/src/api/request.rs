//! What the handlers share: the state they serve from, what a request names (a workload's path,
//! the manager asking, the watch parameters) and the error answer.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyperbox_api::validate::FieldError;
use hyperbox_api::ApiError;

use crate::workloads::Supervisor;

pub(super) type AppState = Arc<Supervisor>;

pub(super) fn error(
    status: StatusCode,
    msg: impl Into<String>,
    fields: Vec<FieldError>,
) -> Response {
    (
        status,
        Json(ApiError {
            error: msg.into(),
            fields,
        }),
    )
        .into_response()
}

/// The workload a path names, checked before it is used: a namespace (DNS label) and a name
/// (DNS subdomain), so no path element can reach a file name.
#[derive(serde::Deserialize)]
pub(super) struct WorkloadPath {
    #[serde(default)]
    ns: Option<String>,
    name: String,
    #[serde(default)]
    pub(super) ordinal: Option<u32>,
}

impl WorkloadPath {
    /// The workload's key, or the 400 answer for a malformed namespace or name.
    #[allow(clippy::result_large_err)]
    pub(super) fn key(&self) -> Result<String, Response> {
        use hyperbox_api::validate::{is_dns_label, is_dns_subdomain};
        let ns = self
            .ns
            .as_deref()
            .unwrap_or(hyperbox_api::DEFAULT_NAMESPACE);
        if !is_dns_label(ns) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("{ns:?} is not a valid namespace"),
                vec![],
            ));
        }
        if !is_dns_subdomain(&self.name) {
            return Err(error(
                StatusCode::BAD_REQUEST,
                format!("{:?} is not a valid workload name", self.name),
                vec![],
            ));
        }
        Ok(hyperbox_api::workload_key(ns, &self.name))
    }
}

/// Who is asking: a manager (`git:<url>#<path>`, `kubernetes:<cluster>/<uid>`) owns what it
/// applies, and may not change or delete another manager's workloads unless it forces a
/// takeover. Requests without a manager (by hand) may change anything and keep the owner.
#[derive(serde::Deserialize)]
pub(super) struct ManagerQuery {
    pub(super) manager: Option<String>,
    pub(super) force: Option<bool>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct WatchQuery {
    /// On the collection: answer with a `WorkloadList` (and long-poll with `after`).
    pub(super) watch: Option<bool>,
    /// Long-poll: answer once the node's resourceVersion passes this value.
    pub(super) after: Option<u64>,
    pub(super) timeout_ms: Option<u64>,
}
