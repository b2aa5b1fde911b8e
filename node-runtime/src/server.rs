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

use crate::supervisor::{Refused, Supervisor};

/// Largest request body accepted (a batch of workloads).
pub const MAX_BODY_BYTES: usize = hyperbox_api::NODE_MAX_BODY_BYTES;

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
        .layer(middleware::from_fn_with_state(
            sup.clone(),
            digests_version_header,
        ))
        .with_state(sup)
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

/// The workload a path names, checked before it is used: a namespace (DNS label) and a name
/// (DNS subdomain), so no path element can reach a file name.
#[derive(serde::Deserialize)]
struct WorkloadPath {
    #[serde(default)]
    ns: Option<String>,
    name: String,
    #[serde(default)]
    ordinal: Option<u32>,
}

impl WorkloadPath {
    /// The workload's key, or the 400 answer for a malformed namespace or name.
    #[allow(clippy::result_large_err)]
    fn key(&self) -> Result<String, Response> {
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
struct ManagerQuery {
    manager: Option<String>,
    force: Option<bool>,
}

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

async fn apply(
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

/// Longest a watch of the digests is held open.
const MAX_DIGESTS_WATCH: std::time::Duration = std::time::Duration::from_secs(300);

/// `GET /v1/digests`: every workload's digest (a `Vec<WorkloadDigest>`).
///
/// `?watch=true[&after=V][&timeoutMs=T]` is the watch a source uses instead of polling: it
/// answers a `DigestList` at once without `after`, and otherwise once the digests' version
/// differs from `after` (an apply or a delete, or a restarted daemon), or after `timeoutMs`
/// (default 30 s, at most 5 min). An answer without change carries the version and no
/// `items`, so a quiet node costs a few hundred bytes per timeout.
async fn digests(State(sup): State<AppState>, Query(q): Query<WatchQuery>) -> Response {
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

async fn list(State(sup): State<AppState>, Query(q): Query<WatchQuery>) -> Response {
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

async fn evict(
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
async fn restart_one(
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

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct WatchQuery {
    /// On the collection: answer with a `WorkloadList` (and long-poll with `after`).
    watch: Option<bool>,
    /// Long-poll: answer once the node's resourceVersion passes this value.
    after: Option<u64>,
    timeout_ms: Option<u64>,
}

async fn get_one(
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

async fn get_spec(State(sup): State<AppState>, UrlPath(path): UrlPath<WorkloadPath>) -> Response {
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

async fn delete(
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

#[derive(serde::Deserialize)]
struct LogQuery {
    tail: Option<u64>,
    replica: Option<u32>,
}

async fn logs(
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

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PrewarmRequest {
    images: Vec<String>,
}

/// `POST /v1/images/prewarm {"images": [...]}`: keep these images ready (pulled and
/// prepared while the node is calm, kept from garbage collection) for an hour from now.
/// Answers 202 at once; `GET /v1/node` shows how far each is.
async fn prewarm(State(sup): State<AppState>, body: axum::body::Bytes) -> Response {
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
    if req.images.len() > crate::supervisor::MAX_PREWARM_IMAGES {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "{} images: at most {} per request",
                req.images.len(),
                crate::supervisor::MAX_PREWARM_IMAGES
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

async fn pull(State(sup): State<AppState>, Json(req): Json<PullRequest>) -> Response {
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
    Json(node_summary(&sup).await).into_response()
}

pub(crate) async fn node_summary(sup: &Supervisor) -> hyperbox_api::NodeSummary {
    let (cpu_millis, memory_bytes, containers) = sup.allocations().await;
    let facts = sup.node_facts();
    let mut summary = crate::node::summary(
        facts.as_ref(),
        sup.requested(),
        ResourceAmounts {
            cpu_millis,
            memory_bytes,
        },
        sup.workload_count().await,
        containers,
        sup.store().map(|s| s.as_ref()),
    );
    summary.pressure_trend = sup.node_trend();
    summary.protection = sup.protection_status();
    summary.prewarm = sup.prewarm_status().await;
    summary
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

/// TLS for the TCP listener: the node's certificate and key, and optionally a CA that client
/// certificates must chain to (mTLS; the bearer token is still required).
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_ca: Option<std::path::PathBuf>,
}

pub fn server_config(t: &ServerTls) -> Result<Arc<rustls::ServerConfig>> {
    use hyperbox_client::tls::{load_certs, load_key, provider};
    let certs = load_certs(&t.cert).map_err(anyhow::Error::msg)?;
    let key = load_key(&t.key).map_err(anyhow::Error::msg)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .context("tls protocol versions")?;
    let builder = match &t.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certs(ca).map_err(anyhow::Error::msg)? {
                roots
                    .add(c)
                    .with_context(|| format!("--client-ca {}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .with_context(|| format!("--client-ca {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "--tls-cert {} / --tls-key {}",
            t.cert.display(),
            t.key.display()
        )
    })?;
    Ok(Arc::new(config))
}

pub async fn serve_tcp(
    sup: Arc<Supervisor>,
    addr: &str,
    token: Vec<u8>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind {addr}"))?;
    let app = router(sup).layer(middleware::from_fn_with_state(
        Arc::new(token),
        require_token,
    ));
    let Some(tls) = tls else {
        tracing::info!(addr = %listener.local_addr()?, tls = false, "node api listening on tcp (bearer token required)");
        return axum::serve(listener, app).await.context("serve tcp");
    };
    tracing::info!(addr = %listener.local_addr()?, tls = true, "node api listening on tcp (bearer token required)");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of fds and the like: keep serving the connections we have.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let handshake = std::time::Duration::from_secs(10);
            // Plain HTTP sent to the TLS port gets a plain answer saying so, not a TLS alert.
            let mut first = [0u8; 1];
            match tokio::time::timeout(handshake, tcp.peek(&mut first)).await {
                Ok(Ok(1)) if first[0].is_ascii_uppercase() => {
                    refuse_plain_http(tcp).await;
                    return;
                }
                Ok(Ok(_)) => {}
                _ => return,
            }
            let stream = match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::info!(peer = %peer, error = %e, "tls handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::info!(peer = %peer, "tls handshake timed out");
                    return;
                }
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(peer = %peer, error = %e, "connection ended");
            }
        });
    }
}

async fn refuse_plain_http(mut tcp: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body = serde_json::to_vec(&ApiError {
        error: "this port speaks TLS: use https:// (with --ca-file)".into(),
        fields: vec![],
    })
    .unwrap_or_default();
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = tcp.write_all(head.as_bytes()).await;
    let _ = tcp.write_all(&body).await;
    let _ = tcp.shutdown().await;
}

/// Everything the node exports, gathered once: node and container PSI, pressure protection,
/// workload states, per-container cgroup readings and eBPF counters, and the runtime's own
/// counters. Both `/metrics` and the OTLP export encode this.
pub async fn telemetry_snapshot(sup: &Supervisor) -> crate::telemetry::Snapshot {
    use crate::telemetry::{Attrs, Current, Kind, ReplicaKey, Resource, Snapshot, Value, COUNTERS};
    use std::collections::BTreeMap;
    let list = sup.list().await;
    let summary = node_summary(sup).await;
    let telemetry = crate::telemetry::get();
    let since = telemetry
        .map(|t| t.since)
        .unwrap_or_else(std::time::SystemTime::now);
    let node_name = telemetry
        .map(|t| t.node_name.clone())
        .unwrap_or_else(|| summary.name.clone());
    let mut snap = Snapshot {
        resources: vec![Resource {
            otel: vec![
                ("service.name", "hyperbox-node".into()),
                ("service.version", env!("CARGO_PKG_VERSION").into()),
                ("host.name", node_name.clone()),
                ("hyperbox.node.id", summary.id.clone()),
            ],
            labels: vec![],
            since,
        }],
        families: vec![],
        at: std::time::SystemTime::now(),
    };
    // One resource per replica with a container (or with counters from earlier ones).
    let mut current: BTreeMap<ReplicaKey, Option<Current>> = BTreeMap::new();
    let mut replicas = Vec::new();
    let readings = sup
        .cgroup_readings(
            list.iter()
                .flat_map(|w| w.replicas.iter().filter_map(|r| r.container_id.clone()))
                .collect(),
        )
        .await;
    for w in &list {
        for r in &w.replicas {
            let key = ReplicaKey {
                namespace: w.namespace.clone(),
                workload: w.name.clone(),
                replica: r.index,
            };
            // The cgroup id comes with the PSI sample; until then, from this snapshot's read.
            let cur = r.container_id.as_ref().and_then(|id| {
                let reading = readings.get(id).copied().unwrap_or_default();
                Some(Current {
                    id: id.clone(),
                    cgroup_id: r.cgroup_id.or(reading.cgroup_id)?,
                    cpu_usec: reading.cpu_usec,
                })
            });
            // An outdated replica of a rolling update shares the index: the current one wins.
            if r.outdated && current.contains_key(&key) {
                continue;
            }
            current.insert(key.clone(), cur);
            let mut otel = vec![
                ("host.name", node_name.clone()),
                ("k8s.namespace.name", w.namespace.clone()),
                ("hyperbox.workload.name", w.name.clone()),
                ("hyperbox.replica.index", r.index.to_string()),
                ("container.name", format!("{}-{}", w.name, r.index)),
                ("container.runtime", "hyperbox".into()),
                ("container.image.name", w.image.clone()),
            ];
            if let Some(id) = &r.container_id {
                otel.push(("container.id", id.clone()));
            }
            if let Some(d) = &w.image_digest {
                otel.push(("oci.manifest.digest", d.clone()));
            }
            if let Some(rev) = &w.revision {
                otel.push(("vcs.ref.head.revision", rev.clone()));
            }
            snap.resources.push(Resource {
                otel,
                labels: vec![
                    ("namespace", w.namespace.clone()),
                    ("workload", w.name.clone()),
                    ("replica", r.index.to_string()),
                ],
                since,
            });
            replicas.push((snap.resources.len() - 1, key, w, r));
        }
    }
    let totals = match telemetry {
        Some(t) => tokio::task::spawn_blocking(move || t.replica_totals(&current))
            .await
            .unwrap_or_default(),
        None => Default::default(),
    };

    let pressure_points =
        |snap: &mut Snapshot,
         prefix: (&'static str, &'static str),
         help: (&'static str, &'static str),
         readings: Vec<(usize, Attrs, hyperbox_api::Pressure)>| {
            for (res, attrs, p) in readings {
                for (rname, r) in [("cpu", &p.cpu), ("memory", &p.memory), ("io", &p.io)] {
                    for (kind, a) in [("some", &r.some), ("full", &r.full)] {
                        let mut at = attrs.clone();
                        at.push(("resource", rname.to_string()));
                        at.push(("kind", kind.to_string()));
                        snap.family(prefix.0, help.0, "%", Kind::Gauge).push(
                            res,
                            at.clone(),
                            Value::Float(f64::from(a.avg10)),
                        );
                        snap.family(prefix.1, help.1, "s", Kind::Counter).push(
                            res,
                            at,
                            Value::Float(a.total as f64 / 1e6),
                        );
                    }
                }
            }
        };
    let node_readings: Vec<_> = [
        ("host", &summary.pressure),
        ("workloads", &summary.workloads_pressure),
    ]
    .into_iter()
    .filter_map(|(scope, p)| Some((0, vec![("scope", scope.to_string())], p.clone()?)))
    .collect();
    pressure_points(
        &mut snap,
        ("hyperbox.node.pressure.avg10", "hyperbox.node.pressure.stalled"),
        (
            "The host (scope=host) and the node's workloads together (scope=workloads): PSI share of time stalled over 10s (percent).",
            "The host (scope=host) and the node's workloads together (scope=workloads): PSI total stall time.",
        ),
        node_readings,
    );
    let container_readings: Vec<_> = replicas
        .iter()
        .filter_map(|(res, _, _, r)| Some((*res, vec![], r.pressure.clone()?)))
        .collect();
    pressure_points(
        &mut snap,
        (
            "hyperbox.container.pressure.avg10",
            "hyperbox.container.pressure.stalled",
        ),
        (
            "A container: PSI share of time stalled over 10s (percent).",
            "A container: PSI total stall time.",
        ),
        container_readings,
    );

    for (res, key, w, r) in &replicas {
        let int = |v: u64| Value::Int(v);
        snap.family(
            "hyperbox.container.info",
            "The replica's current container, image and source revision (value 1).",
            "",
            Kind::Gauge,
        )
        .push(
            *res,
            vec![
                ("container.id", r.container_id.clone().unwrap_or_default()),
                ("image", w.image.clone()),
                ("image.digest", w.image_digest.clone().unwrap_or_default()),
                ("revision", w.revision.clone().unwrap_or_default()),
            ],
            int(1),
        );
        snap.family(
            "hyperbox.container.restarts",
            "Restarts of the replica's container.",
            "{restart}",
            Kind::Counter,
        )
        .push(*res, vec![], int(u64::from(r.restarts)));
        if r.throttled {
            snap.family(
                "hyperbox.container.throttled",
                "Whether pressure protection holds the replica back.",
                "",
                Kind::Gauge,
            )
            .push(*res, vec![], int(1));
        }
        if let Some(id) = &r.container_id {
            if let Some(m) = readings.get(id).and_then(|x| x.memory_bytes) {
                snap.family(
                    "container.memory.usage",
                    "Memory used by the container's cgroup.",
                    "By",
                    Kind::Gauge,
                )
                .push(*res, vec![], int(m));
            }
        }
        let Some(t) = totals.by_replica.get(key) else {
            continue;
        };
        snap.family(
            "container.cpu.time",
            "CPU time the replica's containers used.",
            "s",
            Kind::Counter,
        )
        .push(*res, vec![], Value::Float(t.cpu_usec as f64 / 1e6));
        if !telemetry.is_some_and(|t| t.ebpf.active) {
            continue;
        }
        let e = &t.ebpf;
        for (dir, bytes, packets) in [
            ("transmit", e.tx_bytes, e.tx_packets),
            ("receive", e.rx_bytes, e.rx_packets),
        ] {
            snap.family(
                "container.network.io",
                "Bytes the replica's containers sent and received (IP packets, eBPF cgroup_skb).",
                "By",
                Kind::Counter,
            )
            .push(*res, vec![("network.io.direction", dir.into())], int(bytes));
            snap.family(
                "hyperbox.container.network.packets",
                "IP packets the replica's containers sent and received.",
                "{packet}",
                Kind::Counter,
            )
            .push(
                *res,
                vec![("network.io.direction", dir.into())],
                int(packets),
            );
        }
        for (name, help, unit, v) in [
            (
                "hyperbox.container.process.execs",
                "Successful execve calls in the replica's containers.",
                "{exec}",
                e.execs,
            ),
            (
                "hyperbox.container.process.exits",
                "Processes (not threads) that exited in the replica's containers.",
                "{process}",
                e.exits,
            ),
            (
                "hyperbox.container.oom_kills",
                "Processes of the replica's containers chosen by the OOM killer.",
                "{kill}",
                e.oom_kills,
            ),
            (
                "hyperbox.container.tcp.connects",
                "TCP connections the replica's containers opened (SYN sent).",
                "{connection}",
                e.tcp_connects,
            ),
            (
                "hyperbox.container.tcp.accepts",
                "TCP connections the replica's containers' listeners established.",
                "{connection}",
                e.tcp_accepts,
            ),
            (
                "hyperbox.container.tcp.retransmits",
                "TCP retransmissions the replica's containers sent (one per retransmitted packet, which may carry several segments).",
                "{packet}",
                e.tcp_retransmits,
            ),
        ] {
            snap.family(name, help, unit, Kind::Counter)
                .push(*res, vec![], int(v));
        }
        // The kernel's power-of-two slots, two to a bucket (2 us, 8 us, ... 2.1 s, +Inf):
        // half the series per container, still a factor of 4 between bounds.
        let buckets: Vec<(f64, u64)> = e
            .rq_slots
            .chunks(2)
            .enumerate()
            .map(|(i, c)| {
                (
                    crate::telemetry::CgStats::rq_bound_seconds(2 * i + c.len() - 1),
                    c.iter().sum(),
                )
            })
            .collect();
        snap.family(
            "hyperbox.container.runqueue.latency",
            "Time the replica's tasks waited in a run queue (wakeup or preemption to running).",
            "s",
            Kind::Histogram,
        )
        .push(
            *res,
            vec![],
            Value::Histogram(crate::telemetry::HistogramValue {
                buckets,
                sum: e.rq_sum_ns as f64 / 1e9,
                count: e.rq_count,
            }),
        );
    }

    if let Some(p) = &summary.protection {
        snap.family("hyperbox.protection.level", "Pressure protection's signal: the workloads' memory full stall over its sustain window (percent).", "", Kind::Gauge)
            .push(0, vec![], Value::Float(f64::from(p.level.unwrap_or(0.0))));
        for (name, v, help) in [
            (
                "hyperbox.protection.throttles",
                p.throttles_total,
                "Replicas throttled by pressure protection.",
            ),
            (
                "hyperbox.protection.evictions",
                p.evictions_total,
                "Replicas evicted by pressure protection (EvictedForPressure).",
            ),
            (
                "hyperbox.protection.restores",
                p.restores_total,
                "Evicted replicas started again once the node was calm.",
            ),
        ] {
            snap.family(name, help, "", Kind::Counter)
                .push(0, vec![], Value::Int(v));
        }
    }
    if let Some(g) = &summary.pressure_admission {
        snap.family(
            "hyperbox.pressure_admission.info",
            "The signal and threshold above which new replicas are refused (NodePressure).",
            "",
            Kind::Gauge,
        )
        .push(0, vec![("gate", g.clone())], Value::Int(1));
    }
    for w in &list {
        let labels = vec![
            ("namespace", w.namespace.clone()),
            ("workload", w.name.clone()),
        ];
        snap.family(
            "hyperbox.workload.ready",
            "Whether all replicas of the workload are ready.",
            "",
            Kind::Gauge,
        )
        .push(0, labels.clone(), Value::Int(u64::from(w.ready)));
        snap.family(
            "hyperbox.workload.restarts",
            "Container restarts of the workload.",
            "",
            Kind::Counter,
        )
        .push(0, labels, Value::Int(u64::from(w.restarts)));
    }
    // The runtime's own counters.
    let c = &COUNTERS;
    for (name, help, o) in [
        (
            "hyperbox.image.pulls",
            "Image pulls from a registry, by result.",
            &c.pulls,
        ),
        (
            "hyperbox.image.prepares",
            "Image preparations (pull if needed, unpack into the store), by result.",
            &c.prepares,
        ),
        (
            "hyperbox.container.starts",
            "Container creations, by result.",
            &c.starts,
        ),
        (
            "hyperbox.probe.runs",
            "Readiness probe runs, by result.",
            &c.probes,
        ),
    ] {
        let f = snap.family(name, help, "", Kind::Counter);
        for (result, v) in [("success", &o.ok), ("failure", &o.failed)] {
            f.push(
                0,
                vec![("result", result.into())],
                Value::Int(v.load(std::sync::atomic::Ordering::Relaxed)),
            );
        }
    }
    for (name, help, h) in [
        (
            "hyperbox.image.prepare.duration",
            "How long image preparations took (pull included).",
            &c.prepare_seconds,
        ),
        (
            "hyperbox.container.start.duration",
            "How long container creation and start took.",
            &c.start_seconds,
        ),
        (
            "hyperbox.reconcile.duration",
            "From a workload's spec being applied to all its replicas running it.",
            &c.reconcile_seconds,
        ),
    ] {
        snap.family(name, help, "s", Kind::Histogram)
            .push(0, vec![], Value::Histogram(h.read()));
    }
    if let Some(t) = telemetry {
        let f = snap.family(
            "hyperbox.ebpf.program.attached",
            "Whether each eBPF telemetry program is attached.",
            "",
            Kind::Gauge,
        );
        for (p, state) in &t.ebpf.programs {
            f.push(
                0,
                vec![("program", p.clone())],
                Value::Int(u64::from(state == crate::telemetry::ebpf::ATTACHED)),
            );
        }
        snap.family(
            "hyperbox.ebpf.map.entries",
            "Containers in the eBPF counters map.",
            "",
            Kind::Gauge,
        )
        .push(0, vec![], Value::Int(totals.map_entries as u64));
    }
    snap
}

/// OpenMetrics text of [`telemetry_snapshot`].
pub async fn metrics_text(sup: &Supervisor) -> String {
    crate::telemetry::prom::encode(telemetry_snapshot(sup).await)
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
                    [(header::CONTENT_TYPE, crate::telemetry::prom::CONTENT_TYPE)],
                    metrics_text(&sup).await,
                )
            }),
        )
        .with_state(sup);
    axum::serve(listener, app).await.context("serve metrics")
}
