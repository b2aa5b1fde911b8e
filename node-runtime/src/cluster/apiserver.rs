//! The Kubernetes API server as the node reaches it: where it is and how to authenticate
//! (a kubeconfig or the in-cluster service account), and server-side apply.
//!
//! The node side does not depend on `kube`: a kubeconfig (or the in-cluster service account)
//! gives an API address, a CA and credentials, and the few requests below go through the
//! node API client's HTTP/TLS stack.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use hyperbox_client::{Endpoint, NodeClient};
use serde::Deserialize;

/// `--kubeconfig in-cluster`: the service account a DaemonSet pod gets.
pub const IN_CLUSTER: &str = "in-cluster";
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// Who the node's writes belong to (server-side apply).
pub const FIELD_MANAGER: &str = "hyperbox-node";
const APPLY_PATCH: &str = "application/apply-patch+yaml";

/// Where the API server is and how to authenticate.
#[derive(Clone)]
pub struct ApiServer {
    /// `host:port`.
    addr: String,
    tls: std::sync::Arc<rustls::ClientConfig>,
    token: Option<String>,
    /// Re-read before each request: service account tokens are rotated.
    token_file: Option<PathBuf>,
    /// Where the settings came from, for errors.
    source: String,
}

#[derive(Deserialize, Default)]
struct Kubeconfig {
    #[serde(default)]
    clusters: Vec<NamedCluster>,
    #[serde(default)]
    users: Vec<NamedUser>,
    #[serde(default)]
    contexts: Vec<NamedContext>,
    #[serde(rename = "current-context", default)]
    current_context: String,
}

#[derive(Deserialize)]
struct NamedCluster {
    name: String,
    cluster: Cluster,
}

#[derive(Deserialize)]
struct Cluster {
    server: String,
    #[serde(rename = "certificate-authority-data", default)]
    ca_data: Option<String>,
    #[serde(rename = "certificate-authority", default)]
    ca_file: Option<PathBuf>,
    #[serde(rename = "insecure-skip-tls-verify", default)]
    insecure: bool,
}

#[derive(Deserialize)]
struct NamedUser {
    name: String,
    #[serde(default)]
    user: User,
}

#[derive(Deserialize, Default)]
struct User {
    #[serde(default)]
    token: Option<String>,
    #[serde(rename = "tokenFile", default)]
    token_file: Option<PathBuf>,
    #[serde(rename = "client-certificate-data", default)]
    cert_data: Option<String>,
    #[serde(rename = "client-key-data", default)]
    key_data: Option<String>,
    #[serde(rename = "client-certificate", default)]
    cert_file: Option<PathBuf>,
    #[serde(rename = "client-key", default)]
    key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
struct NamedContext {
    name: String,
    context: Context_,
}

#[derive(Deserialize)]
struct Context_ {
    cluster: String,
    #[serde(default)]
    user: String,
}

fn b64(what: &str, s: &str) -> Result<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .map_err(|e| anyhow!("{what}: not base64: {e}"))
}

/// A kubeconfig's paths are relative to the kubeconfig's directory.
fn resolve(path: &Path, base: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

fn read(path: &Path, base: &Path, what: &str) -> Result<Vec<u8>> {
    let p = resolve(path, base);
    std::fs::read(&p).with_context(|| format!("{what}: read {}", p.display()))
}

/// `https://host:port` → `host:port` (no path prefix: the node talks to the API directly).
fn host_port(server: &str, what: &str) -> Result<String> {
    let rest = server.strip_prefix("https://").ok_or_else(|| {
        anyhow!("{what}: server {server:?} must be https:// (the API server's TLS address)")
    })?;
    let rest = rest.trim_end_matches('/');
    if rest.contains('/') {
        bail!("{what}: server {server:?} has a path; only https://host:port is supported");
    }
    Ok(if rest.contains(':') && !rest.ends_with(']') {
        rest.to_string()
    } else {
        format!("{rest}:443")
    })
}

impl ApiServer {
    /// From `--kubeconfig`: a file, or `in-cluster`.
    pub fn load(kubeconfig: &str) -> Result<ApiServer> {
        if kubeconfig == IN_CLUSTER {
            return ApiServer::in_cluster();
        }
        ApiServer::from_file(Path::new(kubeconfig))
    }

    fn from_file(path: &Path) -> Result<ApiServer> {
        let what = format!("kubeconfig {}", path.display());
        let text = std::fs::read_to_string(path).with_context(|| format!("read {what}"))?;
        let cfg: Kubeconfig = serde_norway::from_str(&text).map_err(|e| anyhow!("{what}: {e}"))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let ctx = cfg
            .contexts
            .iter()
            .find(|c| c.name == cfg.current_context)
            .ok_or_else(|| {
                anyhow!(
                    "{what}: current-context {:?} is not among its contexts",
                    cfg.current_context
                )
            })?;
        let cluster = &cfg
            .clusters
            .iter()
            .find(|c| c.name == ctx.context.cluster)
            .ok_or_else(|| anyhow!("{what}: no cluster named {:?}", ctx.context.cluster))?
            .cluster;
        let user = cfg
            .users
            .iter()
            .find(|u| u.name == ctx.context.user)
            .map(|u| &u.user);
        if cluster.insecure {
            bail!("{what}: insecure-skip-tls-verify is not supported: give certificate-authority(-data)");
        }
        let ca = match (&cluster.ca_data, &cluster.ca_file) {
            (Some(d), _) => b64(&format!("{what}: certificate-authority-data"), d)?,
            (None, Some(f)) => read(f, base, &format!("{what}: certificate-authority"))?,
            (None, None) => bail!(
                "{what}: the cluster has no certificate-authority(-data): the node verifies the API server"
            ),
        };
        let empty = User::default();
        let user = user.unwrap_or(&empty);
        let cert = match (&user.cert_data, &user.cert_file) {
            (Some(d), _) => Some(b64(&format!("{what}: client-certificate-data"), d)?),
            (None, Some(f)) => Some(read(f, base, &format!("{what}: client-certificate"))?),
            _ => None,
        };
        let key = match (&user.key_data, &user.key_file) {
            (Some(d), _) => Some(b64(&format!("{what}: client-key-data"), d)?),
            (None, Some(f)) => Some(read(f, base, &format!("{what}: client-key"))?),
            _ => None,
        };
        let client = match (&cert, &key) {
            (Some(c), Some(k)) => Some((c.as_slice(), k.as_slice())),
            (None, None) => None,
            _ => bail!("{what}: a client certificate needs its key, and the other way round"),
        };
        let tls =
            hyperbox_client::tls::client_config_pem(&ca, client, &what).map_err(|e| anyhow!(e))?;
        let token_file = user.token_file.as_ref().map(|f| resolve(f, base));
        if user.token.is_none() && token_file.is_none() && client.is_none() {
            bail!("{what}: the user has no token, tokenFile or client certificate");
        }
        Ok(ApiServer {
            addr: host_port(&cluster.server, &what)?,
            tls,
            token: user.token.clone(),
            token_file,
            source: what,
        })
    }

    fn in_cluster() -> Result<ApiServer> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
            anyhow!("in-cluster config: KUBERNETES_SERVICE_HOST is not set (not in a pod?)")
        })?;
        let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
        ApiServer::in_cluster_at(Path::new(SERVICE_ACCOUNT_DIR), host, &port)
    }

    /// The service account mounted at `dir` (its `ca.crt` and `token`), for the API server at
    /// `host:port`.
    fn in_cluster_at(dir: &Path, host: String, port: &str) -> Result<ApiServer> {
        let what = "in-cluster config".to_string();
        let ca = read(&dir.join("ca.crt"), dir, &what)?;
        let tls =
            hyperbox_client::tls::client_config_pem(&ca, None, &what).map_err(|e| anyhow!(e))?;
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        Ok(ApiServer {
            addr: format!("{host}:{port}"),
            tls,
            token: None,
            token_file: Some(dir.join("token")),
            source: what,
        })
    }

    fn client(&self) -> Result<NodeClient> {
        let token = match &self.token_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("{}: read token {}", self.source, f.display()))?
                    .trim()
                    .to_string(),
            ),
            None => self.token.clone(),
        };
        Ok(NodeClient::new(Endpoint::Tcp {
            addr: self.addr.clone(),
            token,
            tls: Some(self.tls.clone()),
        })
        .with_timeouts(Duration::from_secs(5), Duration::from_secs(15)))
    }

    /// Server-side apply of `body` at `path`; the answer's JSON on success.
    pub(super) async fn apply(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value> {
        let client = self.client()?;
        let url = format!("{path}?fieldManager={FIELD_MANAGER}&force=true");
        let (status, bytes) = client
            .raw_typed(
                hyper::Method::PATCH,
                &url,
                APPLY_PATCH,
                serde_json::to_vec(body).expect("serialize"),
            )
            .await
            .map_err(|e| anyhow!("{}: {e}", self.source))?;
        if !status.is_success() {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
            let hint = if status.as_u16() == 404 {
                " (is the HyperNode CRD installed? kubectl apply -f crds/hyperbox.yaml)"
            } else {
                ""
            };
            bail!("PATCH {path}: {status}: {message}{hint}");
        }
        serde_json::from_slice(&bytes).with_context(|| format!("PATCH {path}: decode the answer"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_errors_name_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kc");
        let write = |text: &str| std::fs::write(&path, text).unwrap();
        let err = |text: &str| {
            write(text);
            format!("{:#}", ApiServer::from_file(&path).err().unwrap())
        };
        let base = "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:6443'CA}}]\nusers: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n";
        let e = err(&base.replace("CA", ""));
        assert!(
            e.contains("kubeconfig") && e.contains("certificate-authority"),
            "{e}"
        );
        let e = err(&base.replace("CA", ", insecure-skip-tls-verify: true"));
        assert!(e.contains("insecure-skip-tls-verify"), "{e}");
        let e = err(&base.replace("CA", ", certificate-authority-data: '!!'"));
        assert!(e.contains("certificate-authority-data: not base64"), "{e}");
        let e = err(&base
            .replace("CA", "")
            .replace("current-context: x", "current-context: y"));
        assert!(e.contains("current-context \"y\""), "{e}");
        let e = err(&base
            .replace("https://127.0.0.1:6443", "http://127.0.0.1:6443")
            .replace("CA", ", certificate-authority: /nonexistent"));
        assert!(e.contains("/nonexistent"), "{e}");
    }

    /// A throwaway self-signed CA certificate (PEM), only parsed here.
    const TEST_CA: &str = include_str!("../../tests/data/test-ca.pem");

    #[test]
    fn in_cluster_reads_the_service_account_and_rereads_its_token() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.crt"), TEST_CA).unwrap();
        std::fs::write(dir.path().join("token"), "first\n").unwrap();
        let api = ApiServer::in_cluster_at(dir.path(), "10.0.0.1".into(), "443").unwrap();
        assert_eq!(api.addr, "10.0.0.1:443");
        let token = |api: &ApiServer| match api.client().unwrap().endpoint() {
            Endpoint::Tcp { token, .. } => token.clone(),
            _ => None,
        };
        assert_eq!(token(&api).as_deref(), Some("first"));
        // Projected tokens rotate: the next request reads the new one.
        std::fs::write(dir.path().join("token"), "second").unwrap();
        assert_eq!(token(&api).as_deref(), Some("second"));
        let v6 = ApiServer::in_cluster_at(dir.path(), "fd00::1".into(), "6443").unwrap();
        assert_eq!(v6.addr, "[fd00::1]:6443");
        let e = ApiServer::in_cluster_at(Path::new("/nonexistent"), "h".into(), "443")
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("/nonexistent/ca.crt"), "{e:#}");
    }
}
