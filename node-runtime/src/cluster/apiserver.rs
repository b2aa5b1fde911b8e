//! The node's client of the Kubernetes API server: kube's own, from a kubeconfig (tokens,
//! token files, client certificates, exec plugins, OIDC) or from the pod's in-cluster
//! ServiceAccount (whose projected token kube rereads as it rotates). It is used for one
//! object only: the node's HyperNode, read, created and written by server-side apply with the
//! resourceVersion it last wrote as a precondition.

use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use hyperbox_api::hypernode::{HYPERNODES, KIND_HYPERNODE};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube::Config;

/// `--kubeconfig in-cluster`: the pod's ServiceAccount.
pub const IN_CLUSTER: &str = "in-cluster";
pub const FIELD_MANAGER: &str = "hyperbox-node";

/// How long the node waits to connect, and for an answer: a heartbeat that hangs must not
/// outlive the next one.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// The HyperNodes of the API server, and where the credentials came from (for errors).
#[derive(Clone)]
pub struct ApiServer {
    api: Api<DynamicObject>,
    source: String,
}

/// Why a write was not made.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The object changed since the resourceVersion given (409), or exists already (create).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Other(String),
}

/// What a kubeconfig or in-cluster config must give: an https server the node verifies.
fn check(config: &Config, what: &str) -> Result<()> {
    if config.cluster_url.scheme_str() != Some("https") {
        bail!(
            "{what}: the API server {} is not https: the node only talks to an API server it can verify",
            config.cluster_url
        );
    }
    if config.accept_invalid_certs {
        bail!(
            "{what}: insecure-skip-tls-verify is not supported: give certificate-authority(-data)"
        );
    }
    Ok(())
}

impl ApiServer {
    /// From `--kubeconfig`: a file, or `in-cluster`.
    pub async fn load(kubeconfig: &str) -> Result<ApiServer> {
        let (mut config, what) = if kubeconfig == IN_CLUSTER {
            let what = "in-cluster config".to_string();
            let config = Config::incluster().map_err(|e| anyhow!("{what}: {e} (not in a pod?)"))?;
            (config, what)
        } else {
            let what = format!("kubeconfig {kubeconfig}");
            let kc = Kubeconfig::read_from(kubeconfig).map_err(|e| anyhow!("{what}: {e}"))?;
            let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| anyhow!("{what}: {e}"))?;
            (config, what)
        };
        check(&config, &what)?;
        config.connect_timeout = Some(CONNECT_TIMEOUT);
        config.read_timeout = Some(READ_TIMEOUT);
        config.write_timeout = Some(READ_TIMEOUT);
        let client = kube::Client::try_from(config).map_err(|e| anyhow!("{what}: {e}"))?;
        let (group, version) = hyperbox_api::API_VERSION
            .split_once('/')
            .expect("API_VERSION is group/version");
        let gvk = GroupVersionKind::gvk(group, version, KIND_HYPERNODE);
        let resource = ApiResource::from_gvk_with_plural(&gvk, HYPERNODES);
        Ok(ApiServer {
            api: Api::all_with(client, &resource),
            source: what,
        })
    }

    fn describe(&self, verb: &str, name: &str, e: kube::Error) -> WriteError {
        let (code, message) = match &e {
            kube::Error::Api(s) => (s.code, s.message.clone()),
            other => (0, other.to_string()),
        };
        let hint = if code == 404 {
            " (is the HyperNode CRD installed? kubectl apply -f crds/hyperbox.yaml)"
        } else {
            ""
        };
        let text = format!("{}: {verb} hypernode {name}: {message}{hint}", self.source);
        if code == 409 {
            WriteError::Conflict(text)
        } else {
            WriteError::Other(text)
        }
    }

    /// The HyperNode `name`, if it exists.
    pub(super) async fn get(&self, name: &str) -> Result<Option<DynamicObject>> {
        self.api
            .get_opt(name)
            .await
            .map_err(|e| anyhow!(self.describe("get", name, e)))
    }

    /// Create it (a conflict if it exists already).
    pub(super) async fn create(
        &self,
        body: &serde_json::Value,
    ) -> Result<DynamicObject, WriteError> {
        let obj: DynamicObject =
            serde_json::from_value(body.clone()).map_err(|e| WriteError::Other(e.to_string()))?;
        let name = obj.metadata.name.clone().unwrap_or_default();
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..PostParams::default()
        };
        self.api
            .create(&pp, &obj)
            .await
            .map_err(|e| self.describe("create", &name, e))
    }

    /// Server-side apply of `body` (its status when `status`). A `metadata.resourceVersion`
    /// in `body` is a precondition: another writer since makes it a conflict.
    pub(super) async fn apply(
        &self,
        name: &str,
        body: &serde_json::Value,
        status: bool,
    ) -> Result<DynamicObject, WriteError> {
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let patch = Patch::Apply(body);
        let r = if status {
            self.api.patch_status(name, &pp, &patch).await
        } else {
            self.api.patch(name, &pp, &patch).await
        };
        r.map_err(|e| self.describe("apply", name, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn load_err(text: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kc");
        std::fs::write(&path, text).unwrap();
        match ApiServer::load(path.to_str().unwrap()).await {
            Ok(_) => "loaded".to_string(),
            Err(e) => format!("{e:#}"),
        }
    }

    #[tokio::test]
    async fn kubeconfig_errors_name_the_file_and_what_is_wrong() {
        let base = "clusters: [{name: c, cluster: {server: 'https://127.0.0.1:6443'CA}}]\nusers: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n";
        let e = load_err(&base.replace("CA", ", insecure-skip-tls-verify: true")).await;
        assert!(
            e.contains("kubeconfig") && e.contains("insecure-skip-tls-verify"),
            "{e}"
        );
        let e = load_err(
            &base
                .replace("https://127.0.0.1:6443", "http://127.0.0.1:6443")
                .replace("CA", ""),
        )
        .await;
        assert!(e.contains("is not https"), "{e}");
        let e = load_err(&base.replace("CA", ", certificate-authority-data: '!!'")).await;
        assert!(e.contains("kubeconfig") && e.contains("/kc"), "{e}");
        let e = load_err(
            &base
                .replace("current-context: x", "current-context: y")
                .replace("CA", ""),
        )
        .await;
        assert!(
            e.contains("kubeconfig") && e.contains("current context: y"),
            "{e}"
        );
        let e = load_err(&base.replace("CA", ", certificate-authority: /nonexistent")).await;
        assert!(e.contains("/nonexistent"), "{e}");
        // A good one loads (no request is made).
        assert_eq!(load_err(&base.replace("CA", "")).await, "loaded");
    }
}
