//! `/v1/workloads`: apply a batch (validated, then admitted by the node), list and watch, get
//! one workload's status or spec, delete.

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyperbox_api::validate::{parse_json_workload, FieldError};
use hyperbox_api::Workload;

use super::request::{error, AppState, ManagerQuery, WatchQuery, WorkloadPath};
use crate::workloads::Refused;

fn conflict_fields(names: &[String], conflicts: Vec<(usize, String)>) -> Vec<FieldError> {
    conflicts
        .into_iter()
        .map(|(i, owner)| FieldError {
            field: format!("workloads[{i}].metadata.name"),
            message: format!(
                "workload {:?} is managed by {owner}; apply with force to take it over",
                names.get(i).map(String::as_str).unwrap_or("")
            ),
            line: None,
            reason: None,
        })
        .collect()
}

/// Parses and validates a `POST /v1/workloads` body (`{"workloads": [...]}`): every item must
/// be a valid Workload and names must be unique. On failure returns the message and the field
/// errors the handler answers 400 with; nothing of an invalid request is applied.
pub fn parse_apply_body(body: &[u8]) -> Result<Vec<Workload>, (String, Vec<FieldError>)> {
    let value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => return Err((format!("request body is not json: {e}"), vec![])),
    };
    let Some(items) = value.get("workloads").and_then(|w| w.as_array()).cloned() else {
        return Err((
            "request body needs a \"workloads\" array".to_string(),
            vec![],
        ));
    };
    let mut workloads = Vec::new();
    let mut fields = Vec::new();
    for (i, item) in items.into_iter().enumerate() {
        match parse_json_workload(item) {
            Ok(w) => workloads.push(w),
            Err(errs) => fields.extend(errs.into_iter().map(|mut e| {
                e.field = if e.field.is_empty() {
                    format!("workloads[{i}]")
                } else {
                    format!("workloads[{i}].{}", e.field)
                };
                e
            })),
        }
    }
    let mut names = std::collections::HashSet::new();
    for (i, w) in workloads.iter().enumerate() {
        if !names.insert(w.key()) {
            fields.push(FieldError {
                field: format!("workloads[{i}].metadata.name"),
                message: format!("duplicate workload {:?} in one request", w.key()),
                line: None,
                reason: None,
            });
        }
    }
    if !fields.is_empty() {
        return Err(("invalid workload".to_string(), fields));
    }
    Ok(workloads)
}

pub(super) async fn apply(
    State(sup): State<AppState>,
    Query(who): Query<ManagerQuery>,
    body: axum::body::Bytes,
) -> Response {
    let workloads = match parse_apply_body(&body) {
        Ok(w) => w,
        // Nothing of an invalid request is applied.
        Err((msg, fields)) => return error(StatusCode::BAD_REQUEST, msg, fields),
    };
    // The node's own policy (host paths): a refusal names the field and the rule.
    let mut refused = Vec::new();
    for (i, w) in workloads.iter().enumerate() {
        refused.extend(sup.admit(w).into_iter().map(|mut e| {
            e.field = format!("workloads[{i}].{}", e.field);
            e
        }));
    }
    if !refused.is_empty() {
        return error(StatusCode::BAD_REQUEST, "refused by node policy", refused);
    }
    let names: Vec<String> = workloads.iter().map(Workload::key).collect();
    match sup
        .apply_as(workloads, who.manager, who.force.unwrap_or(false))
        .await
    {
        Ok(Ok(r)) => Json(r).into_response(),
        Ok(Err(Refused::Conflicts(conflicts))) => error(
            StatusCode::CONFLICT,
            "managed by another source",
            conflict_fields(&names, conflicts),
        ),
        // Like a Kubernetes quota or admission denial: 403, each refusal with its reason.
        Ok(Err(Refused::Admission(refused))) => error(
            StatusCode::FORBIDDEN,
            "refused by node admission",
            refused
                .into_iter()
                .map(|(i, mut e)| {
                    e.field = format!("workloads[{i}].{}", e.field);
                    e
                })
                .collect(),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("apply: {e:#}"),
            vec![],
        ),
    }
}

pub(super) async fn list(State(sup): State<AppState>, Query(q): Query<WatchQuery>) -> Response {
    if q.watch != Some(true) {
        return Json(sup.list().await).into_response();
    }
    // A watch of the whole node: answer once anything changed after `after`.
    if let Some(after) = q.after {
        let timeout = std::time::Duration::from_millis(q.timeout_ms.unwrap_or(1000).min(60_000));
        sup.wait_change(after, timeout).await;
    }
    let resource_version = sup.version();
    Json(hyperbox_api::WorkloadList {
        resource_version,
        items: sup.list().await,
    })
    .into_response()
}

pub(super) async fn get_one(
    State(sup): State<AppState>,
    UrlPath(path): UrlPath<WorkloadPath>,
    Query(q): Query<WatchQuery>,
) -> Response {
    let name = match path.key() {
        Ok(k) => k,
        Err(r) => return r,
    };
    if let Some(after) = q.after {
        let timeout = std::time::Duration::from_millis(q.timeout_ms.unwrap_or(1000).min(60_000));
        sup.wait_change(after, timeout).await;
    }
    match sup.status(&name).await {
        Some(s) => Json(s).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("workload {name:?} not found"),
            vec![],
        ),
    }
}

pub(super) async fn get_spec(
    State(sup): State<AppState>,
    UrlPath(path): UrlPath<WorkloadPath>,
) -> Response {
    let name = match path.key() {
        Ok(k) => k,
        Err(r) => return r,
    };
    match sup.workload(&name).await {
        Some(w) => Json(w).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("workload {name:?} not found"),
            vec![],
        ),
    }
}

pub(super) async fn delete(
    State(sup): State<AppState>,
    UrlPath(path): UrlPath<WorkloadPath>,
    Query(who): Query<ManagerQuery>,
) -> Response {
    let name = match path.key() {
        Ok(k) => k,
        Err(r) => return r,
    };
    match sup
        .delete_as(&name, who.manager.as_deref(), who.force.unwrap_or(false))
        .await
    {
        Ok(Ok(true)) => Json(serde_json::json!({"deleted": name})).into_response(),
        Ok(Err(owner)) => error(
            StatusCode::CONFLICT,
            format!("workload {name:?} is managed by {owner}; delete with force to take it over"),
            vec![],
        ),
        Ok(Ok(false)) => error(
            StatusCode::NOT_FOUND,
            format!("workload {name:?} not found"),
            vec![],
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("delete {name}: {e:#}"),
            vec![],
        ),
    }
}
