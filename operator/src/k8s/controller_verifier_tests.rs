//! The controller against a scripted API server (`tower_test::mock` behind
//! `kube::Client`): each test says which requests the controller must make, in order,
//! checks them, and answers them. Beside the e2e tests on a real API server, these pin
//! down exactly what is written.

use super::*;
use crate::k8s::crd::WorkloadCrSpec;
use crate::k8s::nodes::{NodeAccess, NodeTimings};
use http::{Method, Request, Response};
use kube::client::Body;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

fn context() -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let (nodes, _receivers) = Nodes::new(
        NodeAccess::default(),
        NodeTimings {
            monitor_grace: Duration::from_secs(40),
            eviction_grace: Duration::from_secs(60),
            watch_timeout: Duration::from_secs(30),
        },
        "kubernetes:test/".into(),
    );
    // No HyperNodes, and that is known (the list was read).
    nodes.mark_listed();
    let ctx = Context::new(
        client,
        nodes,
        "kubernetes:test/".into(),
        crate::fleet_core::placement::DEFAULT_PRESSURE_WEIGHTS,
        "test".into(),
    );
    (Arc::new(ctx), handle)
}

fn workload(spec: &str) -> Arc<KubeWorkload> {
    let mut cr = KubeWorkload::new("web", WorkloadCrSpec(serde_json::from_str(spec).unwrap()));
    cr.metadata.namespace = Some("default".into());
    cr.metadata.uid = Some("uid-1".into());
    cr.metadata.generation = Some(3);
    cr.metadata.finalizers = Some(vec![FINALIZER.into()]);
    Arc::new(cr)
}

async fn body_json(req: Request<Body>) -> serde_json::Value {
    let bytes = req.into_body().collect_bytes().await.unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// The next request: its method, path and query, and its body as JSON.
async fn next(
    handle: &mut Handle,
) -> (
    Method,
    String,
    serde_json::Value,
    tower_test::mock::SendResponse<Response<Body>>,
) {
    let (req, send) = handle
        .next_request()
        .await
        .expect("the controller made no request");
    let (method, uri) = (req.method().clone(), req.uri().to_string());
    let body = if method == Method::GET {
        serde_json::Value::Null
    } else {
        body_json(req).await
    };
    (method, uri, body, send)
}

fn answer(send: tower_test::mock::SendResponse<Response<Body>>, obj: &impl serde::Serialize) {
    send.send_response(
        Response::builder()
            .body(Body::from(serde_json::to_vec(obj).unwrap()))
            .unwrap(),
    );
}

fn condition<'a>(status: &'a serde_json::Value, kind: &str) -> &'a serde_json::Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap_or_else(|| panic!("no {kind} condition in {status:#}"))
}

#[tokio::test]
async fn an_invalid_spec_is_stalled_by_one_status_patch_and_never_retried() {
    let (ctx, mut handle) = context();
    // Two replicas with a memory request that is not a quantity.
    let cr =
        workload(r#"{"image":"busybox","replicas":2,"resources":{"requests":{"memory":"lots"}}}"#);
    let verifier = tokio::spawn(async move {
        let (method, uri, body, send) = next(&mut handle).await;
        assert_eq!(method, Method::PATCH);
        assert!(
            uri.starts_with("/apis/hyperbox.dev/v1alpha1/namespaces/default/workloads/web/status?")
                && uri.contains("fieldManager=hyperbox-operator")
                && uri.contains("force=true"),
            "{uri}"
        );
        let status = &body["status"];
        assert_eq!(status["observedGeneration"], 3, "{body:#}");
        let ready = condition(status, "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "InvalidSpec");
        assert!(
            ready["message"]
                .as_str()
                .unwrap()
                .contains("spec.resources.requests.memory"),
            "{ready:#}"
        );
        assert_eq!(condition(status, "Stalled")["status"], "True");
        answer(
            send,
            &serde_json::json!({"apiVersion": "hyperbox.dev/v1alpha1", "kind": "Workload", "metadata": {"name": "web", "namespace": "default"}, "spec": {"image": "busybox"}}),
        );
        handle
    });
    let action = reconcile(cr, ctx).await.unwrap();
    // Nothing to retry until the spec changes.
    assert_eq!(action, Action::await_change());
    let mut handle = verifier.await.unwrap();
    // And nothing more was asked (the client is gone, or nothing comes).
    let more = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
    assert!(!matches!(more, Ok(Some(_))), "an unexpected request");
}

#[tokio::test]
async fn with_no_node_to_take_it_the_failure_is_an_event_and_a_stalled_status() {
    let (ctx, mut handle) = context();
    let cr = workload(r#"{"image":"busybox","replicas":1}"#);
    let verifier = tokio::spawn(async move {
        // First the event, then the status.
        let (method, uri, body, send) = next(&mut handle).await;
        assert_eq!(method, Method::POST, "{uri}");
        assert!(uri.contains("/events"), "{uri}");
        assert_eq!(body["reason"], "FailedPlacement", "{body:#}");
        assert_eq!(body["type"], "Warning");
        assert!(
            body["note"].as_str().unwrap().contains("fit on no node"),
            "{body:#}"
        );
        answer(send, &body);
        let (method, uri, body, send) = next(&mut handle).await;
        assert_eq!(method, Method::PATCH);
        assert!(uri.contains("/workloads/web/status?"), "{uri}");
        let status = &body["status"];
        let stalled = condition(status, "Stalled");
        assert_eq!(stalled["status"], "True");
        assert_eq!(stalled["reason"], "NoMatchingNode", "{status:#}");
        assert_eq!(condition(status, "Ready")["status"], "False");
        answer(
            send,
            &serde_json::json!({"apiVersion": "hyperbox.dev/v1alpha1", "kind": "Workload", "metadata": {"name": "web", "namespace": "default"}, "spec": {"image": "busybox"}}),
        );
    });
    let action = reconcile(cr, ctx).await.unwrap();
    // Looked at again later (a node may join), not in a tight loop.
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    verifier.await.unwrap();
}
