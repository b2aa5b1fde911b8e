//! The CRDs against a real kube-apiserver (built from the Go modules by tests/kube/cluster.sh):
//! they are structural and accepted, every example applies unchanged, and the API server itself
//! refuses an invalid spec with the field path the offline validator names too.

use std::process::Command;

use hyperbox_e2e::kube::*;
use hyperbox_e2e::*;

fn example_workload_files() -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut out = Vec::new();
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml")
                && std::fs::read_to_string(&p)
                    .unwrap()
                    .contains("kind: Workload")
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_crds_are_accepted_and_every_example_applies_unchanged() {
    let c = KubeCluster::start().unwrap();
    let crds = c.kubectl_ok(&["get", "crd", "-o", "name"]).unwrap();
    assert!(crds.contains("workloads.hyperbox.dev"), "{crds}");
    assert!(crds.contains("hypernodes.hyperbox.dev"), "{crds}");
    // Structural: the API server reports no NonStructuralSchema condition.
    let crd = c.get("crd", "workloads.hyperbox.dev").unwrap();
    let conditions = crd["status"]["conditions"].as_array().unwrap();
    assert!(
        !conditions
            .iter()
            .any(|c| c["type"] == "NonStructuralSchema"),
        "{conditions:#?}"
    );
    let files = example_workload_files();
    assert!(files.len() >= 3, "{files:?}");
    for f in &files {
        // The same files validate offline...
        let out = Command::new(bin("hyperbox-operator"))
            .arg("validate")
            .arg(f)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}: {out:?}", f.display());
        // ...and apply to the API server with strict field validation, unchanged.
        let out = c.kubectl(&["apply", "--validate=strict", "-f", f.to_str().unwrap()]);
        assert!(out.status.success(), "{}: {out:?}", f.display());
    }
    // The printer columns and the short name.
    let table = c.kubectl_ok(&["get", "hbw"]).unwrap();
    let header = table.lines().next().unwrap();
    for col in ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "NODES", "AGE"] {
        assert!(header.contains(col), "{header}");
    }
    assert!(table.contains("worker"), "{table}");
    // The scale subresource.
    c.kubectl_ok(&["scale", "workload/worker", "--replicas=3"])
        .unwrap();
    let w = c.get("workload", "worker").unwrap();
    assert_eq!(w["spec"]["replicas"], 3);
}

#[test]
fn the_api_server_refuses_an_invalid_spec_with_the_field_path() {
    let c = KubeCluster::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("imagePullPolicy: Always", "spec.imagePullPolicy"),
        ("resources: {memory: 12XB}", "spec.resources.memory"),
        ("resources: {cpu: 1e3}", "spec.resources.cpu"),
        ("restartPolicy: Sometimes", "spec.restartPolicy"),
        ("replicas: many", "spec.replicas"),
    ];
    for (i, (line, field)) in cases.iter().enumerate() {
        let yaml = format!(
            "apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: bad{i}\nspec:\n  image: busybox\n  {line}\n"
        );
        let f = dir.path().join(format!("bad{i}.yaml"));
        std::fs::write(&f, &yaml).unwrap();
        let out = c.kubectl(&["apply", "-f", f.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{line}: accepted");
        assert!(err.contains(field), "{line}: {err}");
        // The offline validator names the same field.
        let out = Command::new(bin("hyperbox-operator"))
            .arg("validate")
            .arg(&f)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{line}: valid offline");
        assert!(text.contains(field), "{line}: {text}");
        assert!(c.get("workload", &format!("bad{i}")).is_none());
    }
}
