//! The node API: HTTP/JSON over a unix socket (mode 0600) and, optionally, TCP guarded by a
//! bearer token. Bodies are size-capped; invalid specs get 400 with the field paths.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use hyperbox_api::validate::{parse_json_workload, FieldError};
use hyperbox_api::{ApiError, ResourceAmounts, Workload};
use subtle::ConstantTimeEq;

use crate::supervisor::Supervisor;

/// Largest request body accepted (a batch of workloads).
pub const MAX_BODY_BYTES: usize = hyperbox_api::client::NODE_MAX_BODY_BYTES;

type AppState = Arc<Supervisor>;

fn error(status: StatusCode, msg: impl Into<String>, fields: Vec<FieldError>) -> Response {
    (
        status,
        Json(ApiError {
            error: msg.into(),
            fields,
        }),
    )
        .into_response()
}

pub fn router(sup: Arc<Supervisor>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/v1/workloads", get(list).post(apply))
        .route("/v1/workloads/{name}", get(get_one).delete(delete))
        .route("/v1/workloads/{name}/spec", get(get_spec))
        .route("/v1/workloads/{name}/logs", get(logs))
        .route("/v1/digests", get(digests))
        .route("/v1/node", get(node))
        .route("/v1/images/pull", axum::routing::post(pull))
        .route("/v1/images/progress", get(pull_progress))
        .route("/v1/images", axum::routing::delete(remove_image))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(sup)
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
        if !names.insert(w.metadata.name.clone()) {
            fields.push(FieldError {
                field: format!("workloads[{i}].metadata.name"),
                message: format!("duplicate workload {:?} in one request", w.metadata.name),
                line: None,
            });
        }
    }
    if !fields.is_empty() {
        return Err(("invalid workload".to_string(), fields));
    }
    Ok(workloads)
}

async fn apply(State(sup): State<AppState>, body: axum::body::Bytes) -> Response {
    let workloads = match parse_apply_body(&body) {
        Ok(w) => w,
        // Nothing of an invalid request is applied.
        Err((msg, fields)) => return error(StatusCode::BAD_REQUEST, msg, fields),
    };
    match sup.apply(workloads).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("apply: {e:#}"),
            vec![],
        ),
    }
}

async fn digests(State(sup): State<AppState>) -> Response {
    Json(sup.digests().await).into_response()
}

async fn list(State(sup): State<AppState>) -> Response {
    Json(sup.list().await).into_response()
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatchQuery {
    /// Long-poll: answer once the node's resourceVersion passes this value.
    after: Option<u64>,
    timeout_ms: Option<u64>,
}

async fn get_one(
    State(sup): State<AppState>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<WatchQuery>,
) -> Response {
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

async fn get_spec(State(sup): State<AppState>, UrlPath(name): UrlPath<String>) -> Response {
    match sup.workload(&name).await {
        Some(w) => Json(w).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            format!("workload {name:?} not found"),
            vec![],
        ),
    }
}

async fn delete(State(sup): State<AppState>, UrlPath(name): UrlPath<String>) -> Response {
    match sup.delete(&name).await {
        Ok(true) => Json(serde_json::json!({"deleted": name})).into_response(),
        Ok(false) => error(
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

#[derive(serde::Deserialize)]
struct LogQuery {
    tail: Option<u64>,
    replica: Option<u32>,
}

async fn logs(
    State(sup): State<AppState>,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<LogQuery>,
) -> Response {
    if sup.status(&name).await.is_none() {
        return error(
            StatusCode::NOT_FOUND,
            format!("workload {name:?} not found"),
            vec![],
        );
    }
    let path = sup.log_path(&name, q.replica.unwrap_or(0));
    let tail = q.tail.unwrap_or(1 << 20).min(64 << 20);
    let segments =
        match tokio::task::spawn_blocking(move || crate::logs::tail_segments(&path, tail)).await {
            Ok(s) => s,
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}"), vec![]),
        };
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        axum::body::Body::from_stream(crate::logs::stream(segments, tail)),
    )
        .into_response()
}

#[derive(serde::Deserialize)]
struct PullRequest {
    image: String,
}

async fn pull(State(sup): State<AppState>, Json(req): Json<PullRequest>) -> Response {
    if let Err(e) = hyperbox_api::reference::ImageRef::parse(&req.image) {
        let field = FieldError {
            field: "image".into(),
            message: e,
            line: None,
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
struct ProgressQuery {
    image: String,
}

async fn pull_progress(State(sup): State<AppState>, Query(q): Query<ProgressQuery>) -> Response {
    Json(sup.images().progress_of(&q.image)).into_response()
}

async fn remove_image(State(sup): State<AppState>, Query(q): Query<ProgressQuery>) -> Response {
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

async fn node(State(sup): State<AppState>) -> Response {
    let (cpu_millis, memory_bytes, containers) = sup.allocations().await;
    let summary = crate::node::summary(
        ResourceAmounts {
            cpu_millis,
            memory_bytes,
        },
        sup.workload_count().await,
        containers,
        sup.store().map(|s| s.erofs()),
    );
    Json(summary).into_response()
}

/// Constant-time bearer token check for the TCP listener.
async fn require_token(State(token): State<Arc<Vec<u8>>>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().as_bytes().to_vec())
        .unwrap_or_default();
    let ok = presented.len() == token.len() && bool::from(presented.ct_eq(&token));
    if !ok {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing or invalid bearer token",
            vec![],
        );
    }
    next.run(req).await
}

pub async fn serve_unix(sup: Arc<Supervisor>, socket: &Path) -> Result<()> {
    if socket.exists() {
        std::fs::remove_file(socket)
            .with_context(|| format!("remove stale socket {}", socket.display()))?;
    }
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("bind {}", socket.display()))?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "node api listening");
    axum::serve(listener, router(sup))
        .await
        .context("serve unix socket")
}

pub async fn serve_tcp(sup: Arc<Supervisor>, addr: &str, token: Vec<u8>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "node api listening on tcp (bearer token required)");
    let app = router(sup).layer(middleware::from_fn_with_state(
        Arc::new(token),
        require_token,
    ));
    axum::serve(listener, app).await.context("serve tcp")
}

/// Prometheus text exposition of node pressure and workload states.
pub async fn metrics_text(sup: &Supervisor) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if let Some(p) = crate::node::pressure() {
        let _ = writeln!(
            out,
            "# HELP hyperbox_node_pressure_avg10 PSI share of time stalled over 10s (percent)."
        );
        let _ = writeln!(out, "# TYPE hyperbox_node_pressure_avg10 gauge");
        for (res, r) in [("cpu", &p.cpu), ("memory", &p.memory), ("io", &p.io)] {
            for (kind, a) in [("some", &r.some), ("full", &r.full)] {
                let _ = writeln!(
                    out,
                    "hyperbox_node_pressure_avg10{{resource=\"{res}\",kind=\"{kind}\"}} {}",
                    a.avg10
                );
            }
        }
    }
    let list = sup.list().await;
    let _ = writeln!(
        out,
        "# HELP hyperbox_workload_ready Whether all replicas of the workload are ready."
    );
    let _ = writeln!(out, "# TYPE hyperbox_workload_ready gauge");
    for w in &list {
        let _ = writeln!(
            out,
            "hyperbox_workload_ready{{workload=\"{}\"}} {}",
            w.name,
            u8::from(w.ready)
        );
    }
    let _ = writeln!(
        out,
        "# HELP hyperbox_workload_restarts_total Container restarts of the workload."
    );
    let _ = writeln!(out, "# TYPE hyperbox_workload_restarts_total counter");
    for w in &list {
        let _ = writeln!(
            out,
            "hyperbox_workload_restarts_total{{workload=\"{}\"}} {}",
            w.name, w.restarts
        );
    }
    out
}

pub async fn serve_metrics(sup: Arc<Supervisor>, addr: &str) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind metrics {addr}"))?;
    tracing::info!(addr = %listener.local_addr()?, "metrics listening");
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(sup): State<AppState>| async move {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    metrics_text(&sup).await,
                )
            }),
        )
        .with_state(sup);
    axum::serve(listener, app).await.context("serve metrics")
}
