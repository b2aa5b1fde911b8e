//! The node API's listeners: a unix socket (mode 0600), and TCP guarded by a bearer token,
//! optionally with TLS (and mTLS).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use hyperbox_api::ApiError;
use subtle::ConstantTimeEq;

use super::request::error;
use super::router::router;
use crate::workloads::Supervisor;

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

/// What a flood of connections meets on one TCP listener.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open connections at most; more are closed as soon as they are accepted, so a flood
    /// never takes the descriptors the daemon needs for its own work.
    pub max_connections: usize,
    /// A TLS handshake (and the first byte before it) must come within this time.
    pub handshake: Duration,
    /// A request's headers must arrive within this time of the connection opening or of the
    /// previous response (hyper's header read timeout): a connection that sends nothing, or
    /// sits idle between requests, is closed after it. A long-poll is a request being
    /// answered, not idle time.
    pub header_read: Duration,
}

impl ConnLimits {
    /// The node API on TCP: the operator holds one long-poll per node and a few requests.
    pub const API: ConnLimits = ConnLimits {
        max_connections: 256,
        handshake: Duration::from_secs(10),
        header_read: Duration::from_secs(30),
    };
    /// `/metrics`: a scraper or two.
    pub const METRICS: ConnLimits = ConnLimits {
        max_connections: 32,
        handshake: Duration::from_secs(10),
        header_read: Duration::from_secs(15),
    };
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
    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), max_connections = ConnLimits::API.max_connections, "node api listening on tcp (bearer token required)");
    serve_connections(listener, app, tls, ConnLimits::API).await;
    Ok(())
}

/// Accept and serve connections on `listener` within `limits`, over TLS when `tls` is set.
pub async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: ConnLimits,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let mut refused: u64 = 0;
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of fds and the like: keep serving the connections we have.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            // Closed at once: the peer sees a reset, the daemon keeps its descriptors.
            refused += 1;
            if refused.is_power_of_two() {
                tracing::warn!(peer = %peer, max = limits.max_connections, refused, "connection limit reached; closing new connections");
            }
            drop(tcp);
            continue;
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper_util::service::TowerToHyperService::new(app);
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read);
            let Some(acceptor) = acceptor else {
                if let Err(e) = http
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await
                {
                    tracing::debug!(peer = %peer, error = %e, "connection ended");
                }
                return;
            };
            // Plain HTTP sent to the TLS port gets a plain answer saying so, not a TLS alert.
            let mut first = [0u8; 1];
            match tokio::time::timeout(limits.handshake, tcp.peek(&mut first)).await {
                Ok(Ok(1)) if first[0].is_ascii_uppercase() => {
                    refuse_plain_http(tcp).await;
                    return;
                }
                Ok(Ok(_)) => {}
                _ => return,
            }
            let stream = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
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
            if let Err(e) = http
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
