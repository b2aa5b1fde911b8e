//! Client of the node API: HTTP/1.1 + JSON over a unix socket, or TCP with a bearer token.
//!
//! Every request is bounded in time: a node that accepts a connection and then never answers
//! (hung, stopped with SIGSTOP, a half-open TCP peer) must fail the caller's request instead of
//! holding it forever.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use counting::Counting;
use hyperbox_api::validate::MAX_TERMINATION_GRACE_PERIOD_SECONDS;
use hyperbox_api::{ApiError, ApplyResult, NodeSummary, Workload, WorkloadList, WorkloadStatus};

pub mod buildinfo;
pub mod cli;
pub mod clidocs;
pub mod config;
pub mod counting;
pub mod tls;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to node api at {endpoint}: {cause}")]
    Connect {
        endpoint: String,
        cause: std::io::Error,
    },
    #[error("connect to node api at {endpoint}: {message}")]
    Tls { endpoint: String, message: String },
    #[error("node api {method} {path} at {endpoint}: {stage} timed out after {timeout:?}")]
    Timeout {
        endpoint: String,
        method: String,
        path: String,
        /// `connect` or `request` (send and read the whole answer).
        stage: &'static str,
        timeout: Duration,
    },
    #[error("node api request {method} {path}: {message}")]
    Http {
        method: String,
        path: String,
        message: String,
    },
    /// The daemon answered with an error status.
    #[error("{}", render_api_error(.status, .body))]
    Api { status: u16, body: ApiError },
}

fn render_api_error(status: &u16, body: &ApiError) -> String {
    let mut s = format!("node api: {} ({status})", body.error);
    for f in &body.fields {
        s.push_str(&format!("\n  {f}"));
    }
    s
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A workload digest without its revision and manager (see [`NodeClient::digest_hashes`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DigestHash {
    pub name: String,
    #[serde(default = "hyperbox_api::key::default_namespace")]
    pub namespace: String,
    pub spec_hash: String,
    /// Empty from nodes older than this field.
    #[serde(default)]
    pub config_hash: String,
    /// Replicas the node evicted for pressure.
    #[serde(default)]
    pub evicted_for_pressure: u32,
}

#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp {
        addr: String,
        token: Option<String>,
        /// Set for `https://`: the connection is TLS, verified against this configuration.
        tls: Option<Arc<rustls::ClientConfig>>,
    },
    /// An endpoint that cannot be used as given (`https://` without a CA): every request
    /// fails with the reason.
    Unusable {
        shown: String,
        why: String,
    },
}

impl DigestHash {
    /// The workload's key (see [`hyperbox_api::key`]).
    pub fn key(&self) -> String {
        hyperbox_api::workload_key(&self.namespace, &self.name)
    }
}

impl Endpoint {
    /// `unix:///run/hyperbox.sock`, `/run/hyperbox.sock`, or `http://host:port`. For
    /// `https://` use [`Endpoint::parse_tls`].
    pub fn parse(s: &str, token: Option<String>) -> Endpoint {
        Endpoint::parse_tls(s, token, &tls::TlsFiles::default()).unwrap_or_else(|why| {
            Endpoint::Unusable {
                shown: s.to_string(),
                why,
            }
        })
    }

    /// Like [`Endpoint::parse`], and `https://host:port` with the CA (and client certificate)
    /// from `files`.
    pub fn parse_tls(
        s: &str,
        token: Option<String>,
        files: &tls::TlsFiles,
    ) -> Result<Endpoint, String> {
        Ok(if let Some(p) = s.strip_prefix("unix://") {
            Endpoint::Unix(PathBuf::from(p))
        } else if let Some(a) = s.strip_prefix("http://") {
            Endpoint::Tcp {
                addr: a.trim_end_matches('/').to_string(),
                token,
                tls: None,
            }
        } else if let Some(a) = s.strip_prefix("https://") {
            Endpoint::Tcp {
                addr: a.trim_end_matches('/').to_string(),
                token,
                tls: Some(tls::client_config(files)?),
            }
        } else {
            Endpoint::Unix(PathBuf::from(s))
        })
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp {
                addr, tls: None, ..
            } => write!(f, "http://{addr}"),
            Endpoint::Tcp { addr, .. } => write!(f, "https://{addr}"),
            Endpoint::Unusable { shown, .. } => f.write_str(shown),
        }
    }
}

/// Default bound on establishing a connection to the node.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on one request, from sending it to reading the whole answer.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default bound on `pull`, which answers only once the image is ready (a cold pull of a large
/// image over a slow link takes minutes; the node's own progress is visible meanwhile).
pub const DEFAULT_PULL_TIMEOUT: Duration = Duration::from_secs(3600);
/// Added to a long-poll's own timeout: the node answers when the poll expires, and the answer
/// still has to travel and be serialized on a busy node.
pub const LONG_POLL_MARGIN: Duration = Duration::from_secs(10);

pub use hyperbox_api::NODE_MAX_BODY_BYTES;

pub use counting::{WireStats, WireTotals};

/// Header with the node's digests version on every answer (the node's
/// `server::DIGESTS_VERSION_HEADER`).
pub const DIGESTS_VERSION_HEADER: &str = "x-hyperbox-digests-version";

/// `{"workloads":[` and `]}` around the comma-separated workload documents of an apply.
const APPLY_PREFIX: &[u8] = b"{\"workloads\":[";
const APPLY_SUFFIX: &[u8] = b"]}";

/// Size of the apply request body holding workload documents of these serialized sizes.
pub fn apply_body_len(sizes: impl IntoIterator<Item = usize>) -> usize {
    let (count, total) = sizes
        .into_iter()
        .fold((0usize, 0usize), |(n, t), s| (n + 1, t + s));
    APPLY_PREFIX.len() + APPLY_SUFFIX.len() + total + count.saturating_sub(1)
}

/// The apply request body (`{"workloads":[...]}`) from workload documents already serialized
/// as JSON, so a caller can size its batches exactly and serialize each workload once.
pub fn apply_body<T: AsRef<[u8]>>(workloads: &[T]) -> Vec<u8> {
    let mut body = Vec::with_capacity(apply_body_len(workloads.iter().map(|w| w.as_ref().len())));
    body.extend_from_slice(APPLY_PREFIX);
    for (i, w) in workloads.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(w.as_ref());
    }
    body.extend_from_slice(APPLY_SUFFIX);
    body
}

#[derive(Debug, Clone)]
pub struct NodeClient {
    endpoint: Endpoint,
    connect_timeout: Duration,
    request_timeout: Duration,
    pull_timeout: Duration,
    /// The manager this client applies and deletes as (see [`NodeClient::with_manager`]).
    manager: Option<String>,
    force: bool,
    /// Requests and wire bytes of this client and its clones.
    stats: Arc<WireStats>,
    /// The leader's epoch its writes carry (see [`Fence`]).
    fence: Option<Arc<Fence>>,
}

/// Header of a write made by an elected leader: `<scope>=<epoch>`. A node keeps the newest
/// epoch it has seen for each scope and refuses writes of an older one with 409, so a leader
/// that was replaced (and does not know it yet) cannot undo its successor's work.
pub const FENCE_HEADER: &str = "x-hyperbox-fence";

/// The epoch of a leader, shared by all its node clients: set when it wins the election (the
/// Lease's transitions), and sent with every request once set.
#[derive(Debug)]
pub struct Fence {
    scope: String,
    /// -1 until the first election is won.
    epoch: std::sync::atomic::AtomicI64,
}

impl Fence {
    pub fn new(scope: impl Into<String>) -> Fence {
        Fence {
            scope: scope.into(),
            epoch: std::sync::atomic::AtomicI64::new(-1),
        }
    }

    pub fn set(&self, epoch: u32) {
        self.epoch
            .store(i64::from(epoch), std::sync::atomic::Ordering::SeqCst);
    }

    /// The header value, once an epoch is set.
    pub fn header(&self) -> Option<String> {
        let e = self.epoch.load(std::sync::atomic::Ordering::SeqCst);
        (e >= 0).then(|| format!("{}={e}", self.scope))
    }
}

/// One answer of the digests watch (see [`NodeClient::watch_digests`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DigestWatch {
    /// The digests' version: the `after` of the next round. None from a node that cannot
    /// watch (it answered a plain list): poll it instead.
    pub resource_version: Option<u64>,
    /// Every digest, when they changed (or on the first round); None when nothing changed.
    pub items: Option<Vec<DigestHash>>,
}

#[derive(Serialize, serde::Deserialize)]
pub struct ApplyRequest {
    pub workloads: Vec<Workload>,
}

impl NodeClient {
    /// A client with the default timeouts (5 s to connect, 30 s per request).
    pub fn new(endpoint: Endpoint) -> NodeClient {
        NodeClient {
            endpoint,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            pull_timeout: DEFAULT_PULL_TIMEOUT,
            manager: None,
            fence: None,
            force: false,
            stats: Arc::default(),
        }
    }

    /// Requests made and bytes sent and received so far, by this client and its clones.
    pub fn wire_totals(&self) -> WireTotals {
        self.stats.totals()
    }

    /// The highest digests version the node answered any request of this client (and its
    /// clones) with: a watched list at least this new includes every change they made.
    pub fn digests_version_seen(&self) -> u64 {
        self.stats.digests_version()
    }

    /// The node restarted and counts from `v` now (lower than before).
    pub fn reset_digests_version_seen(&self, v: u64) {
        self.stats.reset_digests_version(v);
    }

    /// Bound connecting by `connect` and each request (send, answer, whole body) by `request`.
    /// Long polls get their own poll timeout plus [`LONG_POLL_MARGIN`] instead.
    pub fn with_timeouts(mut self, connect: Duration, request: Duration) -> NodeClient {
        self.connect_timeout = connect;
        self.request_timeout = request;
        self
    }

    /// Bound `pull`, which answers only when the image is ready.
    pub fn with_pull_timeout(mut self, pull: Duration) -> NodeClient {
        self.pull_timeout = pull;
        self
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// One request on a fresh connection, bounded by the request timeout; returns status and
    /// body bytes.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.raw_within(method, path, body, self.request_timeout)
            .await
    }

    /// Like [`NodeClient::raw`] with a body of another content type (the Kubernetes API's
    /// `application/apply-patch+yaml`, for the node's HyperNode).
    pub async fn raw_typed(
        &self,
        method: Method,
        path: &str,
        content_type: &'static str,
        body: Vec<u8>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.exchange(
            method,
            path,
            Some((content_type, body)),
            self.request_timeout,
        )
        .await
    }

    async fn raw_within(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        self.exchange(method, path, body.map(|b| ("application/json", b)), timeout)
            .await
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<(&'static str, Vec<u8>)>,
        timeout: Duration,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let timeout_err = |stage, timeout| ClientError::Timeout {
            endpoint: self.endpoint.to_string(),
            method: method.to_string(),
            path: path.to_string(),
            stage,
            timeout,
        };
        let http_err = |message: String| ClientError::Http {
            method: method.to_string(),
            path: path.to_string(),
            message,
        };
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header("host", "hyperbox-node");
        if let Endpoint::Tcp {
            token: Some(token), ..
        } = &self.endpoint
        {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        if let Some(value) = self.fence.as_ref().and_then(|f| f.header()) {
            req = req.header(FENCE_HEADER, value);
        }
        let body = match body {
            Some((content_type, bytes)) => {
                req = req.header("content-type", content_type);
                bytes
            }
            None => Vec::new(),
        };
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| http_err(e.to_string()))?;
        let connect_err = |cause| ClientError::Connect {
            endpoint: self.endpoint.to_string(),
            cause,
        };
        let connect_timeout = self.connect_timeout;
        let tls_err = |message: String| ClientError::Tls {
            endpoint: self.endpoint.to_string(),
            message,
        };
        let connecting = async {
            match &self.endpoint {
                Endpoint::Unusable { why, .. } => Err(tls_err(why.clone())),
                Endpoint::Unix(p) => tokio::net::UnixStream::connect(p)
                    .await
                    .map(|s| Stream::Unix(Counting::new(s, self.stats.clone())))
                    .map_err(connect_err),
                Endpoint::Tcp {
                    addr, tls: None, ..
                } => tokio::net::TcpStream::connect(addr)
                    .await
                    .map(|s| Stream::Tcp(Counting::new(s, self.stats.clone())))
                    .map_err(connect_err),
                Endpoint::Tcp {
                    addr,
                    tls: Some(config),
                    ..
                } => {
                    let tcp = tokio::net::TcpStream::connect(addr)
                        .await
                        .map_err(connect_err)?;
                    let tcp = Counting::new(tcp, self.stats.clone());
                    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    let name = rustls::pki_types::ServerName::try_from(host.to_string())
                        .map_err(|e| tls_err(format!("server name {host:?}: {e}")))?;
                    tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .map(|s| Stream::Tls(Box::new(s)))
                        .map_err(|e| tls_err(tls::explain(&e)))
                }
            }
        };
        self.stats.request();
        let stream = tokio::time::timeout(connect_timeout, connecting)
            .await
            .map_err(|_| timeout_err("connect", connect_timeout))??;
        let exchange = async {
            let (resp, _conn) = match stream {
                Stream::Unix(s) => send(s, req).await,
                Stream::Tcp(s) => send(s, req).await,
                Stream::Tls(s) => send(*s, req).await,
            }
            .map_err(|e| http_err(tls::with_hint(&error_chain(&e))))?;
            let status = resp.status();
            if let Some(v) = resp
                .headers()
                .get(DIGESTS_VERSION_HEADER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
            {
                self.stats.saw_digests_version(v);
            }
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| http_err(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| timeout_err("request", timeout))?
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        self.json_within(method, path, body, self.request_timeout)
            .await
    }

    async fn json_within<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.raw_within(method.clone(), path, body, timeout).await?;
        if !status.is_success() {
            let body = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_else(|_| ApiError {
                error: String::from_utf8_lossy(&bytes).trim().to_string(),
                fields: vec![],
            });
            return Err(ClientError::Api {
                status: status.as_u16(),
                body,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Http {
            method: method.to_string(),
            path: path.to_string(),
            message: format!("decode response: {e}"),
        })
    }

    pub async fn apply(&self, workloads: Vec<Workload>) -> Result<Vec<ApplyResult>, ClientError> {
        let body = serde_json::to_vec(&ApplyRequest { workloads }).expect("serialize workloads");
        self.apply_json(body).await
    }

    /// Apply a request body built by [`apply_body`] (the node refuses bodies over
    /// [`NODE_MAX_BODY_BYTES`] with 413).
    pub async fn apply_json(&self, body: Vec<u8>) -> Result<Vec<ApplyResult>, ClientError> {
        let path = format!("/v1/workloads{}", self.manager_query());
        self.json(Method::POST, &path, Some(body)).await
    }

    /// Apply and delete as `manager` (`git:<url>#<path>`, …): the node then refuses (409) to
    /// let this client change or delete another manager's workloads, unless `force`.
    /// Send the leader's epoch with every request (see [`Fence`]).
    pub fn with_fence(mut self, fence: Arc<Fence>) -> NodeClient {
        self.fence = Some(fence);
        self
    }

    pub fn with_manager(mut self, manager: impl Into<String>, force: bool) -> NodeClient {
        self.manager = Some(manager.into());
        self.force = force;
        self
    }

    fn manager_query(&self) -> String {
        match &self.manager {
            Some(m) => format!(
                "?manager={}{}",
                url_encode(m),
                if self.force { "&force=true" } else { "" }
            ),
            None => String::new(),
        }
    }

    /// Name, spec hash and revision of every workload: a cheap list for diffing.
    pub async fn digests(&self) -> Result<Vec<hyperbox_api::WorkloadDigest>, ClientError> {
        self.json(Method::GET, "/v1/digests", None).await
    }

    /// The digests reduced to what a diff needs (name and hashes): the other fields are
    /// skipped while parsing, which counts at 10,000 workloads.
    pub async fn digest_hashes(&self) -> Result<Vec<DigestHash>, ClientError> {
        self.json(Method::GET, "/v1/digests", None).await
    }

    /// One round of the digests watch, instead of polling [`NodeClient::digest_hashes`]:
    /// without `after`, every digest and the version at once; with it, the node answers once
    /// the digests changed (with all of them) or after `timeout` (with none).
    pub async fn watch_digests(
        &self,
        after: Option<u64>,
        timeout: Duration,
    ) -> Result<DigestWatch, ClientError> {
        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Answer {
            #[serde(rename_all = "camelCase")]
            Watch {
                resource_version: u64,
                #[serde(default)]
                items: Option<Vec<DigestHash>>,
            },
            /// A node before the watch ignores `watch=true` and lists.
            Plain(Vec<DigestHash>),
        }
        let path = match after {
            Some(v) => format!(
                "/v1/digests?watch=true&after={v}&timeoutMs={}",
                timeout.as_millis()
            ),
            None => "/v1/digests?watch=true".to_string(),
        };
        let answer: Answer = self
            .json_within(Method::GET, &path, None, timeout + LONG_POLL_MARGIN)
            .await?;
        Ok(match answer {
            Answer::Watch {
                resource_version,
                items,
            } => DigestWatch {
                resource_version: Some(resource_version),
                items,
            },
            Answer::Plain(items) => DigestWatch {
                resource_version: None,
                items: Some(items),
            },
        })
    }

    pub async fn list(&self) -> Result<Vec<WorkloadStatus>, ClientError> {
        self.json(Method::GET, "/v1/workloads", None).await
    }

    /// Every workload once anything on the node changed after `after` (a `resourceVersion`),
    /// or after `timeout`: one long-poll for the whole node instead of one per workload.
    /// Without `after`, at once. Returns the node's resourceVersion with the list; pass it as
    /// the next `after`.
    pub async fn watch_all(
        &self,
        after: Option<u64>,
        timeout: Duration,
    ) -> Result<(u64, Vec<WorkloadStatus>), ClientError> {
        let path = match after {
            Some(after) => format!(
                "/v1/workloads?watch=true&after={after}&timeoutMs={}",
                timeout.as_millis()
            ),
            None => "/v1/workloads?watch=true".to_string(),
        };
        let list: WorkloadList = self
            .json_within(Method::GET, &path, None, timeout + LONG_POLL_MARGIN)
            .await?;
        Ok((list.resource_version, list.items))
    }

    /// Evict one replica: the node stops it and keeps it stopped (Failed/Evicted, with
    /// `reason`) until it is restarted or re-placed.
    pub async fn evict(&self, name: &str, replica: u32, reason: &str) -> Result<(), ClientError> {
        let stop = Duration::from_secs(MAX_TERMINATION_GRACE_PERIOD_SECONDS.into());
        let body = serde_json::to_vec(&serde_json::json!({ "reason": reason }))
            .expect("serialize eviction");
        let _: serde_json::Value = self
            .json_within(
                Method::POST,
                &format!("{}/replicas/{replica}/evict", workload_path(name)),
                Some(body),
                self.request_timeout + stop,
            )
            .await?;
        Ok(())
    }

    /// Restart one replica (`Some(ordinal)`) or all of them: each is stopped (grace period,
    /// then SIGKILL) and started again as a new container.
    pub async fn restart(&self, name: &str, replica: Option<u32>) -> Result<(), ClientError> {
        let stop = Duration::from_secs(MAX_TERMINATION_GRACE_PERIOD_SECONDS.into());
        let path = match replica {
            Some(n) => format!("{}/replicas/{n}/restart", workload_path(name)),
            None => format!("{}/restart", workload_path(name)),
        };
        let _: serde_json::Value = self
            .json_within(Method::POST, &path, None, self.request_timeout + stop)
            .await?;
        Ok(())
    }

    /// Status once something changed after `after` (a `resourceVersion`), or after `timeout`.
    pub async fn watch(
        &self,
        name: &str,
        after: u64,
        timeout: Duration,
    ) -> Result<WorkloadStatus, ClientError> {
        self.json_within(
            Method::GET,
            &format!(
                "{}?after={after}&timeoutMs={}",
                workload_path(name),
                timeout.as_millis()
            ),
            None,
            timeout + LONG_POLL_MARGIN,
        )
        .await
    }

    /// Pull and prepare an image (returns when it is ready).
    pub async fn pull(&self, image: &str) -> Result<hyperbox_api::PullResult, ClientError> {
        let body = serde_json::to_vec(&serde_json::json!({ "image": image })).expect("json");
        self.json_within(
            Method::POST,
            "/v1/images/pull",
            Some(body),
            self.pull_timeout,
        )
        .await
    }

    /// Ask the node to keep these images ready (pulled and prepared while it is calm) for the
    /// next hour; answers at once.
    pub async fn prewarm(&self, images: &[String]) -> Result<(), ClientError> {
        let body = serde_json::to_vec(&serde_json::json!({ "images": images })).expect("json");
        let _: serde_json::Value = self
            .json(Method::POST, "/v1/images/prewarm", Some(body))
            .await?;
        Ok(())
    }

    /// Remove a prepared image (refused while a workload uses it).
    pub async fn remove_image(&self, image: &str) -> Result<String, ClientError> {
        let path = format!("/v1/images?image={}", url_encode(image));
        let v: serde_json::Value = self.json(Method::DELETE, &path, None).await?;
        Ok(v["removed"].as_str().unwrap_or_default().to_string())
    }

    /// Progress of an ongoing pull of `image`, if any.
    pub async fn pull_progress(
        &self,
        image: &str,
    ) -> Result<Option<hyperbox_api::PullProgress>, ClientError> {
        let path = format!("/v1/images/progress?image={}", url_encode(image));
        self.json(Method::GET, &path, None).await
    }

    pub async fn get(&self, name: &str) -> Result<WorkloadStatus, ClientError> {
        self.json(Method::GET, &workload_path(name), None).await
    }

    /// The workload document as last applied (the operator diffs against it).
    pub async fn get_spec(&self, name: &str) -> Result<Workload, ClientError> {
        self.json(Method::GET, &format!("{}/spec", workload_path(name)), None)
            .await
    }

    /// Delete a workload. The node answers once its containers have stopped, which takes up to
    /// the workload's grace period, so the bound is the request timeout plus the longest grace
    /// period a workload may have. Cutting it shorter would not stop the deletion: it would
    /// only cut the node's handler short halfway through.
    pub async fn delete(&self, name: &str) -> Result<(), ClientError> {
        let stop = Duration::from_secs(MAX_TERMINATION_GRACE_PERIOD_SECONDS.into());
        let _: serde_json::Value = self
            .json_within(
                Method::DELETE,
                &format!("{}{}", workload_path(name), self.manager_query()),
                None,
                self.request_timeout + stop,
            )
            .await?;
        Ok(())
    }

    pub async fn logs(
        &self,
        name: &str,
        replica: Option<u32>,
        tail_bytes: Option<u64>,
    ) -> Result<Bytes, ClientError> {
        let mut path = format!(
            "{}/logs?replica={}",
            workload_path(name),
            replica.unwrap_or(0)
        );
        if let Some(n) = tail_bytes {
            path.push_str(&format!("&tail={n}"));
        }
        let (status, bytes) = self.raw(Method::GET, &path, None).await?;
        if !status.is_success() {
            let body = serde_json::from_slice::<ApiError>(&bytes).unwrap_or_default();
            return Err(ClientError::Api {
                status: status.as_u16(),
                body,
            });
        }
        Ok(bytes)
    }

    pub async fn node(&self) -> Result<NodeSummary, ClientError> {
        self.json(Method::GET, "/v1/node", None).await
    }
}

enum Stream {
    Unix(Counting<tokio::net::UnixStream>),
    Tcp(Counting<tokio::net::TcpStream>),
    Tls(Box<tokio_rustls::client::TlsStream<Counting<tokio::net::TcpStream>>>),
}

/// Aborts the task driving a connection when the request using it is done or given up (a
/// timed-out request must not leave its connection open in the background).
struct ConnectionTask(tokio::task::JoinHandle<Result<(), hyper::Error>>);

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn send<S>(
    stream: S,
    req: Request<Full<Bytes>>,
) -> Result<(hyper::Response<hyper::body::Incoming>, ConnectionTask), hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let mut task = ConnectionTask(tokio::spawn(conn));
    match sender.send_request(req).await {
        Ok(resp) => Ok((resp, task)),
        Err(e) => {
            // When the connection failed first (with TLS 1.3, a server that refuses the client
            // certificate says so on the first read, which can beat the request), the request
            // only says "canceled": the connection's own error says why.
            match tokio::time::timeout(Duration::from_secs(1), &mut task.0).await {
                Ok(Ok(Err(conn_err))) => Err(conn_err),
                _ => Err(e),
            }
        }
    }
}

/// An error with its causes, `outer: inner: innermost` (hyper's own message alone often says
/// only "connection error").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// The API path of the workload with key `key` (`name` or `namespace/name`).
pub fn workload_path(key: &str) -> String {
    let (ns, name) = hyperbox_api::split_key(key);
    format!("/v1/workloads/{}/{}", url_encode(ns), url_encode(name))
}

/// Everything but RFC 3986's unreserved characters is escaped (a path segment or a query
/// value alike).
const ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

fn url_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, ESCAPED).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A socket path of its own under the temp dir (this crate has no tempfile dependency).
    fn socket_path(tag: &str) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        std::env::temp_dir().join(format!("hb-client-{tag}-{}-{n}.sock", std::process::id()))
    }

    /// Accepts connections and holds them open without ever reading or answering.
    fn hold_connections<S: Send + 'static>(
        mut accept: impl FnMut() -> Option<S> + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while let Some(s) = accept() {
                held.push(s);
            }
        })
    }

    /// Fails (instead of hanging) when the client does not give up by itself.
    async fn within_5s<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(5), f)
            .await
            .expect("the client must give up on its own, within its timeouts")
    }

    fn assert_timeout(e: &ClientError, stage: &str, endpoint: &str, path: &str) {
        let text = e.to_string();
        assert!(
            matches!(e, ClientError::Timeout { stage: s, .. } if *s == stage),
            "{e:?}"
        );
        for part in [endpoint, "GET", path, "timed out"] {
            assert!(text.contains(part), "{part:?} missing from {text:?}");
        }
    }

    #[tokio::test]
    async fn silent_unix_socket_times_out() {
        let path = socket_path("silent");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        hold_connections(move || listener.accept().ok().map(|(s, _)| s));
        let client = NodeClient::new(Endpoint::Unix(path.clone()))
            .with_timeouts(Duration::from_secs(1), Duration::from_millis(300));
        let started = Instant::now();
        let e = within_5s(client.digests()).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3), "{e}");
        assert_timeout(&e, "request", &path.display().to_string(), "/v1/digests");
        assert!(e.to_string().contains("300ms"), "{e}");
        let _ = std::fs::remove_file(&path);
    }

    #[tokio::test]
    async fn silent_tcp_port_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        hold_connections(move || listener.accept().ok().map(|(s, _)| s));
        let client = NodeClient::new(Endpoint::parse(&format!("http://{addr}"), None))
            .with_timeouts(Duration::from_secs(1), Duration::from_millis(300));
        let started = Instant::now();
        let e = within_5s(client.list()).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3), "{e}");
        assert_timeout(&e, "request", &addr, "/v1/workloads");
    }

    #[tokio::test]
    async fn connect_to_a_full_backlog_times_out() {
        // A listener that never accepts, its backlog filled: the kernel drops further SYNs, so
        // connecting hangs the way it does to a host that went away.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(1).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fillers = Vec::new();
        for _ in 0..8 {
            match tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(addr),
            )
            .await
            {
                Ok(Ok(s)) => fillers.push(s),
                _ => break,
            }
        }
        let client = NodeClient::new(Endpoint::parse(&format!("http://{addr}"), None))
            .with_timeouts(Duration::from_millis(300), Duration::from_secs(5));
        let started = Instant::now();
        let e = within_5s(client.node()).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3), "{e}");
        assert_timeout(&e, "connect", &addr.to_string(), "/v1/node");
    }

    #[tokio::test]
    async fn long_poll_and_delete_get_longer_bounds() {
        // Answers each request 600 ms late: longer than the request timeout, shorter than the
        // long poll plus its margin, or a delete's bound.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    tokio::time::sleep(Duration::from_millis(600)).await;
                    let body = br#"{"error":"workload \"w\" not found"}"#;
                    let head = format!(
                        "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body).await;
                });
            }
        });
        let client = NodeClient::new(Endpoint::parse(&format!("http://{addr}"), None))
            .with_timeouts(Duration::from_secs(1), Duration::from_millis(200));
        let e = within_5s(client.get("w")).await.unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
        let e = client
            .watch("w", 1, Duration::from_millis(500))
            .await
            .unwrap_err();
        assert_eq!(e.status(), Some(404), "{e:?}");
        // A delete waits for the containers to stop (up to their grace period).
        let e = within_5s(client.delete("w")).await.unwrap_err();
        assert_eq!(e.status(), Some(404), "{e:?}");
    }

    #[test]
    fn apply_body_is_the_serialized_request() {
        let docs: Vec<Vec<u8>> = vec![br#"{"a":1}"#.to_vec(), br#"{"b":2}"#.to_vec()];
        let body = apply_body(&docs);
        assert_eq!(body, br#"{"workloads":[{"a":1},{"b":2}]}"#);
        assert_eq!(apply_body_len(docs.iter().map(Vec::len)), body.len());
        let empty: [&[u8]; 0] = [];
        assert_eq!(apply_body(&empty), br#"{"workloads":[]}"#);
        assert_eq!(apply_body_len([]), br#"{"workloads":[]}"#.len());
    }
}
