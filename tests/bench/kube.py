#!/usr/bin/env python3
"""One run of the Kubernetes benchmark (driven by kube.sh, which starts the API server).

N Workloads (one replica each: suspended, or a tiny `sleep`) over 3 node runtimes that
register as HyperNodes, against the real kube-apiserver in CLUSTER_DIR, with the operator and
the nodes authenticated as the chart's ServiceAccounts (the chart's RBAC):
  - apply_s:  `kubectl apply -f` of all of them
  - ready_s:  from the start of that apply until every one is Ready=True at its generation
  - rss_mib:  the operator's peak RSS (VmHWM) over the run
  - steady:   API requests per second at steady state (a quiet minute after all are Ready,
              from the API server's audit log): the operator's, and the three nodes'
              heartbeats
  - resync:   a full no-op resync (a HyperNode label change re-places every workload):
              the operator's API requests and CPU seconds over the 30 s after it
Prints one JSON line.

usage: kube.py NODE_BIN OPERATOR_BIN CLUSTER_DIR IMAGE COUNT MODE(suspended|tiny) CHART WORK
"""
import json
import os
import subprocess
import sys
import time

from benchlib import free_port

node_bin, op_bin, cdir, image, count, mode, chart, work = sys.argv[1:9]
count = int(count)
kubectl = [os.path.join(cdir, "bin/kubectl"), "--kubeconfig", os.path.join(cdir, "kubeconfig")]
helm = os.path.join(cdir, "bin/helm")
NS = "hyperbox-system"
procs = []


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw).stdout


def k(*args):
    return run(kubectl + list(args))


def kubeconfig_for(sa):
    token = k("create", "token", sa, "-n", NS, "--duration=2h").strip()
    admin = open(os.path.join(cdir, "kubeconfig")).read().splitlines()
    out = [f"    token: {token}" if l.strip().startswith("token:") else l for l in admin]
    path = os.path.join(work, f"kubeconfig-{sa}")
    open(path, "w").write("\n".join(out) + "\n")
    return path


def wait(what, pred, timeout=300, every=0.5):
    end = time.time() + timeout
    while time.time() < end:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise SystemExit(f"timed out: {what}")


def ready_count():
    items = json.loads(k("get", "workloads", "-n", "bench", "-o", "json"))["items"]
    n = 0
    for w in items:
        st = w.get("status") or {}
        conds = {c["type"]: c for c in st.get("conditions", [])}
        if conds.get("Ready", {}).get("status") == "True" and st.get(
            "observedGeneration"
        ) == w["metadata"]["generation"]:
            n += 1
    return n


def vm_hwm(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid):
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def audit_counts(since, until):
    """Requests completed in [since, until) (unix seconds) by user."""
    import datetime

    counts = {}
    for line in open(os.path.join(cdir, "audit.log")):
        e = json.loads(line)
        if e.get("stage") != "ResponseComplete":
            continue
        t = datetime.datetime.fromisoformat(e["stageTimestamp"].replace("Z", "+00:00")).timestamp()
        if since <= t < until:
            u = e["user"]["username"]
            counts[u] = counts.get(u, 0) + 1
    return counts


try:
    os.makedirs(work, exist_ok=True)
    k("create", "namespace", NS)
    k("create", "namespace", "bench")
    rbac = run([helm, "template", "hb", chart, "-n", NS, "--show-only", "templates/rbac.yaml"],
               env={**os.environ, "HOME": work})
    open(os.path.join(work, "rbac.yaml"), "w").write(rbac)
    k("apply", "-f", os.path.join(work, "rbac.yaml"))
    op_kc = kubeconfig_for("hb-operator")
    node_kc = kubeconfig_for("hb-node")
    token = os.path.join(work, "node-token")
    open(token, "w").write("bench-node-token-0123456789abcdef\n")
    os.chmod(token, 0o600)
    registry = image.split("/")[0]
    for i in range(3):
        d = os.path.join(work, f"n{i}")
        os.makedirs(d, exist_ok=True)
        log = open(os.path.join(d, "node.log"), "w")
        procs.append(subprocess.Popen([
            node_bin, "--socket", os.path.join(d, "node.sock"), "--token-file", token,
            "serve", "--state-dir", os.path.join(d, "state"), "--run-dir", os.path.join(d, "run"),
            "--cgroup-parent", f"/hyperbox-kube-bench-{i}", "--insecure-registry", registry,
            "--listen", f"127.0.0.1:{free_port()}", "--kubeconfig", node_kc,
            "--node-name", f"bench-n{i}", "--heartbeat-interval", "10s",
            # Three nodes share this host: its pressure must not close them all.
            "--pressure-admission", "off",
        ], stdout=log, stderr=log))
    wait("3 HyperNodes ready", lambda: k("get", "hypernodes", "-o", "json").count('"status": "True"') >= 3, 60)
    if mode == "tiny":
        # The image once per node, so that the run measures placement and starts, not pulls.
        for i in range(3):
            run([node_bin, "--socket", os.path.join(work, f"n{i}", "node.sock"), "pull", image])
    op_log = open(os.path.join(work, "operator.log"), "w")
    # The bench's nodes serve plain http; builds before https-only nodes take no flag for it.
    helptext = subprocess.run([op_bin, "kubernetes", "--help"], capture_output=True, text=True).stdout
    http_ok = ["--allow-http-nodes"] if "--allow-http-nodes" in helptext else []
    op = subprocess.Popen([
        op_bin, "kubernetes", "--kubeconfig", op_kc, "--node-token-file", token,
        *http_ok,
        # Extra operator flags for experiments (for example --concurrency 1).
        *os.environ.get("HB_OPERATOR_ARGS", "").split(),
        "--lease-name", "hb-operator", "--lease-namespace", NS,
    ], stdout=op_log, stderr=op_log, env={**os.environ, "RUST_LOG": "info"})
    procs.append(op)
    wait("the operator leads", lambda: "became the leader" in open(os.path.join(work, "operator.log")).read(), 60)
    docs = []
    for i in range(count):
        spec = "  suspend: true\n" if mode == "suspended" else "  terminationGracePeriodSeconds: 0\n"
        docs.append(
            f"apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: w{i:04d}\n"
            f"  namespace: bench\nspec:\n  image: {image}\n  command: [sleep, '3600']\n{spec}"
        )
    manifest = os.path.join(work, "workloads.yaml")
    open(manifest, "w").write("---\n".join(docs))
    t0 = time.time()
    k("apply", "-f", manifest)
    apply_s = time.time() - t0
    wait(f"{count} Ready", lambda: ready_count() >= count, 900, 1.0)
    ready_s = time.time() - t0
    # Steady state: let the last status writes settle, then a quiet minute.
    time.sleep(10)
    since = time.time()
    quiet_cpu0 = cpu_seconds(op.pid)
    time.sleep(60)
    until = time.time()
    quiet_cpu = cpu_seconds(op.pid) - quiet_cpu0
    # A full no-op resync: a new label on a HyperNode re-places every workload (nothing moves,
    # no status changes). Its API requests and the operator's CPU time for it.
    cpu0 = cpu_seconds(op.pid)
    resync_since = time.time()
    k("label", "hypernode", "bench-n0", "bench=resync")
    time.sleep(30)
    resync_until = time.time()
    resync_cpu = cpu_seconds(op.pid) - cpu0
    resync_counts = audit_counts(resync_since, resync_until)
    resync_reqs = resync_counts.get(f"system:serviceaccount:{NS}:hb-operator", 0)
    rss = vm_hwm(op.pid)
    counts = audit_counts(since, until)
    op_rps = counts.get(f"system:serviceaccount:{NS}:hb-operator", 0) / (until - since)
    node_rps = counts.get(f"system:serviceaccount:{NS}:hb-node", 0) / (until - since)
    per_node = {}
    for w in json.loads(k("get", "workloads", "-n", "bench", "-o", "json"))["items"]:
        for r in (w.get("status") or {}).get("replicaStatuses", []):
            per_node[r["node"]] = per_node.get(r["node"], 0) + 1
    print(json.dumps({
        "mode": mode, "count": count, "apply_s": round(apply_s, 2), "ready_s": round(ready_s, 2),
        "rss_mib": round(rss, 1), "operator_rps": round(op_rps, 2), "nodes_rps": round(node_rps, 2),
        "quiet_cpu_s": round(quiet_cpu, 2),
        "resync_requests": resync_reqs, "resync_cpu_s": round(resync_cpu, 2),
        "replicas_per_node": per_node,
    }))
finally:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
