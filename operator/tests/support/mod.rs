//! Test doubles for the sync loop: a Git repository written with git2 and an in-memory node
//! API served by axum on a unix socket (the real client, the real HTTP framing, the real 413).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::Router;
use git2::{Repository, Signature};
use hyperbox_api::REVISION_ANNOTATION;
use hyperbox_api::{config_hash, spec_hash, ApplyAction, ApplyResult, Workload, WorkloadDigest};
use hyperbox_client::{Endpoint, NodeClient};
use hyperbox_operator::apply::Limits;
use hyperbox_operator::gitsource::{GitAuth, GitConfig, GitRef, GitSource};
use hyperbox_operator::sync::{SyncOptions, Syncer};

/// A bare repository to commit flat files into.
pub struct Remote {
    pub repo: Repository,
    pub path: PathBuf,
}

impl Remote {
    pub fn new(dir: &Path) -> Remote {
        let path = dir.join("remote.git");
        let repo = Repository::init_bare(&path).unwrap();
        Remote { repo, path }
    }

    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    /// Commit exactly these files (the whole tree) on HEAD; returns the commit id.
    pub fn commit(&self, files: &[(String, String)]) -> String {
        let mut tb = self.repo.treebuilder(None).unwrap();
        for (name, text) in files {
            let blob = self.repo.blob(text.as_bytes()).unwrap();
            tb.insert(name, blob, 0o100644).unwrap();
        }
        let tree = self.repo.find_tree(tb.write().unwrap()).unwrap();
        let sig = Signature::now("HyperBox Test", "test@hyperbox.invalid").unwrap();
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        self.repo
            .commit(Some("HEAD"), &sig, &sig, "test", &tree, &parents)
            .unwrap()
            .to_string()
    }
}

pub fn workload_yaml(name: &str, env_bytes: usize) -> String {
    let mut y = format!(
        "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\nspec:\n  image: registry.local/busybox:1\n  suspend: true\n"
    );
    if env_bytes > 0 {
        y.push_str(&format!(
            "  env:\n  - name: BIG\n    value: {}\n",
            "x".repeat(env_bytes)
        ));
    }
    y
}

#[derive(Default)]
pub struct NodeState {
    /// name -> (spec hash, revision)
    pub workloads: BTreeMap<String, ((String, String), Option<String>)>,
    /// Body sizes of the apply requests that got through.
    pub applied_bodies: Vec<usize>,
}

/// The node API's apply, digests and delete, in memory, with a body cap like the real one.
pub struct FakeNode {
    pub socket: PathBuf,
    pub state: Arc<Mutex<NodeState>>,
}

type Shared = Arc<Mutex<NodeState>>;

fn json(value: &impl serde::Serialize) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        serde_json::to_vec(value).unwrap(),
    )
        .into_response()
}

async fn digests(State(s): State<Shared>) -> Response {
    let s = s.lock().unwrap();
    json(
        &s.workloads
            .iter()
            .map(|(key, (h, r))| WorkloadDigest {
                name: hyperbox_api::split_key(key).1.to_string(),
                namespace: hyperbox_api::split_key(key).0.to_string(),
                spec_hash: h.0.clone(),
                config_hash: h.1.clone(),
                manager: None,
                revision: r.clone(),
                evicted_for_pressure: 0,
            })
            .collect::<Vec<_>>(),
    )
}

async fn apply(State(s): State<Shared>, body: Bytes) -> Response {
    #[derive(serde::Deserialize)]
    struct Req {
        workloads: Vec<Workload>,
    }
    let req: Req = serde_json::from_slice(&body).expect("apply body is a valid request");
    let mut s = s.lock().unwrap();
    s.applied_bodies.push(body.len());
    let mut out = Vec::new();
    for w in req.workloads {
        let rev = w.metadata.annotations.get(REVISION_ANNOTATION).cloned();
        s.workloads
            .insert(w.key(), ((spec_hash(&w), config_hash(&w)), rev));
        out.push(ApplyResult {
            namespace: w.metadata.namespace().to_string(),
            name: w.metadata.name,
            action: ApplyAction::Created,
        });
    }
    json(&out)
}

async fn remove(
    State(s): State<Shared>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> StatusCode {
    match s
        .lock()
        .unwrap()
        .workloads
        .remove(&hyperbox_api::workload_key(&ns, &name))
    {
        Some(_) => StatusCode::OK,
        None => StatusCode::NOT_FOUND,
    }
}

impl FakeNode {
    /// Serve on `socket` from the current runtime, refusing bodies over `body_limit` with 413.
    pub fn start(socket: PathBuf, body_limit: usize) -> FakeNode {
        let state: Shared = Arc::default();
        let app = Router::new()
            .route("/v1/digests", get(digests))
            .route("/v1/workloads", axum::routing::post(apply))
            .route("/v1/workloads/{ns}/{name}", delete(remove))
            .layer(DefaultBodyLimit::max(body_limit))
            .with_state(state.clone());
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeNode { socket, state }
    }

    pub fn client(&self) -> NodeClient {
        NodeClient::new(Endpoint::Unix(self.socket.clone()))
            .with_timeouts(Duration::from_secs(2), Duration::from_secs(10))
    }

    pub fn names(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .workloads
            .keys()
            .cloned()
            .collect()
    }
}

pub fn syncer(state_dir: &Path, url: &str, path: &str, node: NodeClient) -> Syncer {
    let source = GitSource::open(
        &state_dir.join("repo.git"),
        GitConfig {
            url: url.to_string(),
            reference: GitRef::Head,
            path: path.to_string(),
            auth: GitAuth::default(),
        },
    )
    .unwrap();
    Syncer::new(
        source,
        node,
        SyncOptions {
            state_dir: state_dir.to_path_buf(),
            interval: Duration::from_secs(30),
            prune: true,
            verify_signatures: None,
            apply_limits: Limits::default(),
            node_watch: None,
            pressure_weights: hyperbox_operator::fleet_core::placement::DEFAULT_PRESSURE_WEIGHTS,
        },
    )
    .unwrap()
}

/// The status as `hyperbox-operator status` reads it: from the state dir.
pub fn status_on_disk(state_dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(state_dir.join("status.json")).unwrap()).unwrap()
}
