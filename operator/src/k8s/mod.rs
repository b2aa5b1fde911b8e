//! The Kubernetes side: custom resources, and the controller that places Workloads on the
//! node runtimes registered as HyperNodes.

pub mod controller;
// clippy reads the repeated `printcolumn(type_ = ...)` of the kube derive as duplicates.
#[allow(clippy::duplicated_attributes)]
pub mod crd;
pub mod lease;
pub mod node_calls;
pub mod nodes;
pub mod status;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use kube::api::Api;

use crate::fleet_core::placement::PressureWeights;

/// What `hyperbox-operator kubernetes` was given.
pub struct KubeOptions {
    /// A kubeconfig file; none: in-cluster, else the usual places.
    pub kubeconfig: Option<std::path::PathBuf>,
    pub access: nodes::NodeAccess,
    pub timings: nodes::NodeTimings,
    /// Names this cluster in the managers of its workloads (`kubernetes:<cluster>/<uid>`).
    pub cluster: String,
    pub weights: PressureWeights,
    /// None: no leader election (one replica).
    pub lease: Option<lease::LeaseConfig>,
    pub concurrency: u16,
}

/// A kube client for `--kubeconfig`, else in-cluster or `$KUBECONFIG` / `~/.kube/config`.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("read kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig: give --kubeconfig, or run in a pod")?,
    };
    kube::Client::try_from(config).context("kubernetes client")
}

/// Run the controller (once leader, with leader election) until the process is stopped or
/// the lease is lost.
pub async fn run(opts: KubeOptions) -> Result<()> {
    let client = client(opts.kubeconfig.as_deref()).await?;
    let version = client
        .apiserver_version()
        .await
        .context("reach the kubernetes api server")?;
    tracing::info!(server = %version.git_version, "connected to the kubernetes api server");
    let identity = opts
        .lease
        .as_ref()
        .map(|l| l.identity.clone())
        .unwrap_or_else(|| format!("{}-{}", crate::k8s::hostname(), std::process::id()));
    let elector = opts
        .lease
        .clone()
        .map(|l| lease::Elector::new(client.clone(), l));
    // Writes to nodes carry the leader's epoch: a node refuses those of an older leader.
    let mut access = opts.access.clone();
    if let Some(e) = &elector {
        let fence = Arc::new(hyperbox_client::Fence::new(format!(
            "kubernetes:{}",
            opts.cluster
        )));
        fence.set(e.acquire().await);
        access.fence = Some(fence);
    }
    let prefix = format!("kubernetes:{}/", opts.cluster);
    let (nodes, receivers) = nodes::Nodes::new(access, opts.timings.clone(), prefix.clone());
    let node_api: Api<crd::KubeHyperNode> = Api::all(client.clone());
    let ctx = Arc::new(controller::Context::new(
        client.clone(),
        nodes.clone(),
        prefix,
        opts.weights,
        identity,
    ));
    let work = async {
        tokio::join!(
            nodes::run(
                nodes.clone(),
                node_api,
                controller::FIELD_MANAGER.to_string()
            ),
            controller::run(ctx, receivers, opts.concurrency),
        );
    };
    match &elector {
        Some(e) => {
            tokio::select! {
                _ = work => {}
                _ = e.hold() => anyhow::bail!("lost the leader lease: stopping so that only the new leader acts"),
            }
        }
        None => work.await,
    }
    Ok(())
}

/// The host name (for the default leader identity).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "hyperbox-operator".into())
}

/// Default lease wait: renew every 5 s, take over after 15 s (client-go's defaults are 15 s
/// and a 10 s renew deadline with 2 s retries).
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
