//! Client of the node API: HTTP/1.1 + JSON over a unix socket, or TCP with a bearer token.

use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::spec::Workload;
use crate::status::{ApiError, ApplyResult, NodeSummary, WorkloadStatus};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to node api at {endpoint}: {cause}")]
    Connect {
        endpoint: String,
        cause: std::io::Error,
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

#[derive(Debug, Clone)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp { addr: String, token: Option<String> },
}

impl Endpoint {
    /// `unix:///run/hyperbox.sock`, `/run/hyperbox.sock`, or `http://host:port`.
    pub fn parse(s: &str, token: Option<String>) -> Endpoint {
        if let Some(p) = s.strip_prefix("unix://") {
            Endpoint::Unix(PathBuf::from(p))
        } else if let Some(a) = s.strip_prefix("http://") {
            Endpoint::Tcp {
                addr: a.trim_end_matches('/').to_string(),
                token,
            }
        } else {
            Endpoint::Unix(PathBuf::from(s))
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display()),
            Endpoint::Tcp { addr, .. } => write!(f, "http://{addr}"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeClient {
    endpoint: Endpoint,
}

#[derive(Serialize, serde::Deserialize)]
pub struct ApplyRequest {
    pub workloads: Vec<Workload>,
}

impl NodeClient {
    pub fn new(endpoint: Endpoint) -> NodeClient {
        NodeClient { endpoint }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// One request on a fresh connection; returns status and body bytes.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
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
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| http_err(e.to_string()))?;
        let connect_err = |cause| ClientError::Connect {
            endpoint: self.endpoint.to_string(),
            cause,
        };
        let resp = match &self.endpoint {
            Endpoint::Unix(p) => {
                let stream = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(connect_err)?;
                send(stream, req).await
            }
            Endpoint::Tcp { addr, .. } => {
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(connect_err)?;
                send(stream, req).await
            }
        }
        .map_err(|e| http_err(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| http_err(e.to_string()))?
            .to_bytes();
        Ok((status, body))
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let (status, bytes) = self.raw(method.clone(), path, body).await?;
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
        self.json(Method::POST, "/v1/workloads", Some(body)).await
    }

    /// Name, spec hash and revision of every workload: a cheap list for diffing.
    pub async fn digests(&self) -> Result<Vec<crate::status::WorkloadDigest>, ClientError> {
        self.json(Method::GET, "/v1/digests", None).await
    }

    pub async fn list(&self) -> Result<Vec<WorkloadStatus>, ClientError> {
        self.json(Method::GET, "/v1/workloads", None).await
    }

    /// Status once something changed after `after` (a `resourceVersion`), or after `timeout`.
    pub async fn watch(
        &self,
        name: &str,
        after: u64,
        timeout: std::time::Duration,
    ) -> Result<WorkloadStatus, ClientError> {
        self.json(
            Method::GET,
            &format!(
                "/v1/workloads/{name}?after={after}&timeoutMs={}",
                timeout.as_millis()
            ),
            None,
        )
        .await
    }

    /// Pull and prepare an image (returns when it is ready).
    pub async fn pull(&self, image: &str) -> Result<crate::status::PullResult, ClientError> {
        let body = serde_json::to_vec(&serde_json::json!({ "image": image })).expect("json");
        self.json(Method::POST, "/v1/images/pull", Some(body)).await
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
    ) -> Result<Option<crate::status::PullProgress>, ClientError> {
        let path = format!("/v1/images/progress?image={}", url_encode(image));
        self.json(Method::GET, &path, None).await
    }

    pub async fn get(&self, name: &str) -> Result<WorkloadStatus, ClientError> {
        self.json(Method::GET, &format!("/v1/workloads/{name}"), None)
            .await
    }

    /// The workload document as last applied (the operator diffs against it).
    pub async fn get_spec(&self, name: &str) -> Result<Workload, ClientError> {
        self.json(Method::GET, &format!("/v1/workloads/{name}/spec"), None)
            .await
    }

    pub async fn delete(&self, name: &str) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .json(Method::DELETE, &format!("/v1/workloads/{name}"), None)
            .await?;
        Ok(())
    }

    pub async fn logs(
        &self,
        name: &str,
        replica: Option<u32>,
        tail_bytes: Option<u64>,
    ) -> Result<Bytes, ClientError> {
        let mut path = format!("/v1/workloads/{name}/logs?replica={}", replica.unwrap_or(0));
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

async fn send<S>(
    stream: S,
    req: Request<Full<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, hyper::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
