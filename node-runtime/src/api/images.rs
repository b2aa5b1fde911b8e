//! `/v1/images`: pull, prewarm, pull progress and remove (`rmi`).

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hyperbox_api::validate::FieldError;

use super::request::{error, AppState};

#[derive(serde::Deserialize)]
pub(super) struct PullRequest {
    image: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PrewarmRequest {
    images: Vec<String>,
}

/// `POST /v1/images/prewarm {"images": [...]}`: keep these images ready (pulled and
/// prepared while the node is calm, kept from garbage collection) for an hour from now.
/// Answers 202 at once; `GET /v1/node` shows how far each is.
pub(super) async fn prewarm(State(sup): State<AppState>, body: axum::body::Bytes) -> Response {
    let req: PrewarmRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                "request body is not a prewarm request ({{\"images\": [\"REFERENCE\", ...]}}): {e}"
            ),
                vec![],
            )
        }
    };
    if req.images.len() > crate::workloads::MAX_PREWARM_IMAGES {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{} images: at most {} per request",
                req.images.len(),
                crate::workloads::MAX_PREWARM_IMAGES
            ),
            vec![],
        );
    }
    let fields: Vec<FieldError> = req
        .images
        .iter()
        .enumerate()
        .filter_map(|(i, r)| {
            hyperbox_api::reference::ImageRef::parse(r)
                .err()
                .map(|e| FieldError {
                    field: format!("images[{i}]"),
                    message: e,
                    line: None,
                    reason: None,
                })
        })
        .collect();
    if !fields.is_empty() {
        return error(StatusCode::BAD_REQUEST, "invalid image reference", fields);
    }
    sup.request_prewarm(&req.images);
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "prewarm": req.images })),
    )
        .into_response()
}

pub(super) async fn pull(State(sup): State<AppState>, Json(req): Json<PullRequest>) -> Response {
    if let Err(e) = hyperbox_api::reference::ImageRef::parse(&req.image) {
        let field = FieldError {
            field: "image".into(),
            message: e,
            line: None,
            reason: None,
        };
        return error(
            StatusCode::BAD_REQUEST,
            "invalid image reference",
            vec![field],
        );
    }
    let started = std::time::Instant::now();
    match sup.images().prepare(req.image.clone()).await {
        Ok(img) => Json(hyperbox_api::PullResult {
            image: req.image,
            digest: img.digest,
            rootfs: img.rootfs_kind,
            elapsed_ms: started.elapsed().as_millis() as u64,
        })
        .into_response(),
        Err(e) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{}: {e}", e.reason()),
            vec![],
        ),
    }
}

#[derive(serde::Deserialize)]
pub(super) struct ProgressQuery {
    image: String,
}

pub(super) async fn pull_progress(
    State(sup): State<AppState>,
    Query(q): Query<ProgressQuery>,
) -> Response {
    Json(sup.images().progress_of(&q.image)).into_response()
}

pub(super) async fn remove_image(
    State(sup): State<AppState>,
    Query(q): Query<ProgressQuery>,
) -> Response {
    match sup.remove_image(&q.image).await {
        Ok(Some(digest)) => Json(serde_json::json!({"removed": digest})).into_response(),
        Ok(None) => error(
            StatusCode::NOT_FOUND,
            format!("image {:?} not found", q.image),
            vec![],
        ),
        Err(e) => error(StatusCode::CONFLICT, format!("{e:#}"), vec![]),
    }
}
