#!/usr/bin/env python3
"""Chaos soak of the Kubernetes path (issue 20): a real kube-apiserver and etcd, a registry,
three hyperbox-node runtimes registered as HyperNodes (each with its own credential, under the
chart's RBAC and node-identity policy), and two hyperbox-operators electing a leader on a
Lease. Each reaches the API server through its own TCP proxy that the soak can freeze (a
partition: packets stop, connections hang). ROUNDS rounds of one disruption each:

  kill9-leader      kill -9 of the operator holding the Lease (restarted 0-3 s later)
  kill9-standby     kill -9 of the other operator (restarted at once)
  kill9-node        kill -9 of a node, restarted after 1-14 s (past the grace: its replicas
                    move, and it comes back holding stale copies)
  apiserver         the API server restarted
  cut-leader        the leader cut off from the API server (its proxy frozen) while it still
                    reaches the nodes, for the lease duration and more; then healed
  clock-ahead       the leader restarted with its clock 5 minutes ahead (faketime), for the
                    rest of the soak or until the next clock round puts it back
  lost-heartbeats   a node cut off from the API server while the operator still reaches it,
                    past the monitor grace and the eviction grace; then healed
  rollout           a Workload's template changes (a rollout across its nodes), with one of
                    the above at the same time in some rounds

Invariants (RELIABILITY.md, "Kubernetes chaos soak"):
  fencing     on every node, no write of an older leader epoch is admitted after a newer
              one (the nodes' "fenced write admitted" log), so two operators never write to
              a node at once;
  budget      while every node is up, each Workload has at least replicas - maxUnavailable
              ready replicas across the nodes (a dip must hold over two samples 0.25 s apart);
  kept        a node cut off from the API server but reachable keeps every container it ran;
  orphans     after settling, the nodes hold copies only of Workloads that exist, and the
              replicas add up to spec.replicas;
  converges   after settling, each Workload is Ready with observedGeneration == generation and
              readyReplicas == replicas, within SETTLE_TIMEOUT.

Started by tests/chaos/kube.sh, which owns the work dir and cleans up. Stdlib only.
"""

import argparse
import json
import os
import random
import re
import select
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from benchlib import free_port  # noqa: E402
from chaos import Proc, log, port_open, registry_proc, tail, wait_for  # noqa: E402

NS = "hyperbox-system"
NODES = ["n1", "n2", "n3"]
WORKLOADS = ["w0", "w1", "w2", "w3"]
LEASE = 6.0  # seconds
MONITOR_GRACE = "4s"
NODE_GRACE = "8s"
SETTLE_TIMEOUT = 120.0
SAMPLE_EVERY = 0.25
DISRUPTIONS = ["kill9-leader", "kill9-standby", "kill9-node", "apiserver", "cut-leader",
               "clock-ahead", "lost-heartbeats", "rollout"]
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


class Proxy:
    """A TCP proxy to the API server that can be frozen: while frozen, nothing is forwarded
    either way and new connections wait (a partition, not a refusal)."""

    def __init__(self, name, target_port):
        self.name, self.target = name, ("127.0.0.1", target_port)
        self.frozen = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            c, _ = self.sock.accept()
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        while self.frozen.is_set():
            time.sleep(0.05)
        try:
            u = socket.create_connection(self.target, timeout=5)
        except OSError:
            c.close()
            return
        u.settimeout(None)
        pair = {c: u, u: c}
        try:
            while True:
                if self.frozen.is_set():
                    time.sleep(0.05)
                    continue
                r, _, _ = select.select(list(pair), [], [], 0.1)
                for s in r:
                    if self.frozen.is_set():
                        break
                    data = s.recv(65536)
                    if not data:
                        return
                    pair[s].sendall(data)
        except OSError:
            return
        finally:
            c.close()
            u.close()


class KubeChaos:
    def __init__(self, a):
        self.a = a
        self.rng = random.Random(a.seed)
        self.work, self.bin, self.root = a.work, a.bin_dir, a.repo_root
        self.kube = os.path.join(self.work, "kube")
        self.kubectl_bin = os.path.join(self.kube, "bin", "kubectl")
        self.admin_kc = os.path.join(self.kube, "kubeconfig")
        for d in ("logs", "pids"):
            os.makedirs(os.path.join(self.work, d), exist_ok=True)
        self.stats = {k: 0 for k in DISRUPTIONS}
        self.stats.update(rounds=0, violations=0, budget_samples=0, stale_refused=0, operator_exits=0)
        self.settle_times = []
        self.violations = []
        self.gen = 0
        self.specs = {}
        self.sampling = threading.Event()
        self.sample_lock = threading.Lock()
        self.dips = {}  # workload -> consecutive low samples
        self.skewed = set()  # operators running with the clock ahead
        # Operators exit when they lose the Lease (so that only the new leader acts); in a
        # cluster their Deployment restarts them, here the watchdog does.
        self.ops_lock = threading.RLock()

    # ---------- plumbing ----------
    def kubectl(self, args, kc=None, check=True, stdin=None, timeout=60):
        r = subprocess.run([self.kubectl_bin, "--kubeconfig", kc or self.admin_kc] + args,
                           input=stdin, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def kube_json(self, args):
        try:
            return json.loads(self.kubectl(args + ["-o", "json"], timeout=20))
        except (RuntimeError, ValueError, subprocess.TimeoutExpired):
            return None

    def kubeconfig(self, name, token, port):
        """A kubeconfig for `token` that reaches the API server through proxy `port`."""
        text = open(self.admin_kc).read()
        text = re.sub(r"server: https://127\.0\.0\.1:\d+", f"server: https://127.0.0.1:{port}", text)
        text = re.sub(r"token: .*", f"token: {token}", text)
        path = os.path.join(self.work, f"kubeconfig-{name}")
        with open(path, "w") as f:
            f.write(text)
        return path

    def violation(self, rnd, what, detail, logs=()):
        self.stats["violations"] += 1
        msg = f"VIOLATION round {rnd} [{what}]: {detail}"
        self.violations.append(msg)
        log(msg)
        for p in logs:
            log(f"--- {p.name} log tail ---\n{tail(p.log, 60)}")

    # ---------- setup ----------
    def setup(self):
        subprocess.run([os.path.join(self.root, "tests/kube/cluster.sh"), "up", self.kube], check=True,
                       stdout=subprocess.DEVNULL)
        self.api_port = int(re.search(r"server: https://127\.0\.0\.1:(\d+)", open(self.admin_kc).read()).group(1))
        self.kubectl(["apply", "-f", os.path.join(self.root, "crds")])
        self.kubectl(["create", "namespace", NS])
        helm = os.path.join(self.kube, "bin", "helm")
        rendered = subprocess.run([helm, "template", "hb", os.path.join(self.root, "charts/hyperbox"), "-n", NS,
                                   "--show-only", "templates/rbac.yaml",
                                   "--show-only", "templates/node-identity.yaml"],
                                  check=True, capture_output=True, text=True, env=dict(os.environ, HOME=self.kube)).stdout
        self.kubectl(["apply", "-f", "-"], stdin=rendered)
        self.start_registry()
        self.node_token = os.path.join(self.work, "node-token")
        with open(self.node_token, "w") as f:
            f.write(os.urandom(24).hex() + "\n")
        os.chmod(self.node_token, 0o600)
        self.proxies = {}
        self.nodes = {}
        self.node_ports = {}
        for n in NODES:
            self.kubectl(["apply", "-f", "-"], stdin=f"apiVersion: v1\nkind: Node\nmetadata: {{name: {n}}}\n")
            token = self.kubectl(["create", "token", "hb-node", "-n", NS, "--duration=24h",
                                  "--bound-object-kind", "Node", "--bound-object-name", n]).strip()
            self.proxies[n] = Proxy(n, self.api_port)
            kc = self.kubeconfig(n, token, self.proxies[n].port)
            self.node_ports[n] = free_port()
            self.nodes[n] = Proc(n, [
                os.path.join(self.bin, "hyperbox-node"), "--socket", self.sock(n), "serve",
                "--state-dir", os.path.join(self.work, n, "state"), "--run-dir", os.path.join(self.work, n, "run"),
                "--cgroup-parent", f"{self.a.cgroup_parent}/{n}", "--insecure-registry", self.reg_addr,
                "--listen", f"127.0.0.1:{self.node_ports[n]}", "--token-file", self.node_token,
                "--kubeconfig", kc, "--node-name", n, "--heartbeat-interval", "1s",
                "--backoff-base", "200ms", "--backoff-max", "2s"],
                self.work, env={"RUST_LOG": "info,hyperbox_node=debug,libcgroups=error,libcontainer=warn"})
            self.up_node(n)
        op_token = self.kubectl(["create", "token", "hb-operator", "-n", NS, "--duration=24h"]).strip()
        self.ops = {}
        self.op_kc = {}
        for o in ("op-a", "op-b"):
            self.proxies[o] = Proxy(o, self.api_port)
            self.op_kc[o] = self.kubeconfig(o, op_token, self.proxies[o].port)
            self.start_operator(o, first=True)
        for w in WORKLOADS:
            self.specs[w] = self.new_spec()
            self.apply_workload(w)

    def sock(self, n):
        return os.path.join(self.work, n, "node.sock")

    def start_registry(self):
        self.registry, port, self.reg_addr = registry_proc(self.work)
        self.registry.start()
        if not wait_for(lambda: port_open(port), 20):
            raise RuntimeError("registry did not start:\n" + tail(self.registry.log))
        script = os.path.join(self.root, "tests/bench/build-busybox-image.sh")
        subprocess.run([script, self.reg_addr, "chaos/busybox:k", "0"], check=True, stdout=subprocess.DEVNULL)
        self.image = f"{self.reg_addr}/chaos/busybox:k"

    def up_node(self, n, note=""):
        self.nodes[n].start(note)
        ok = wait_for(lambda: self.node_cli(n, ["get", "-o", "json"]).returncode == 0, 30, 0.05)
        if not ok:
            self.violation(self.stats["rounds"], "node", f"{n} did not answer within 30 s of its start",
                           logs=[self.nodes[n]])

    def watchdog(self):
        while True:
            time.sleep(0.5)
            with self.ops_lock:
                for o, p in self.ops.items():
                    if p.p is not None and p.p.poll() is not None:
                        code = p.p.returncode
                        p.p = None
                        self.stats["operator_exits"] += 1
                        log(f"{o} exited ({code}); restarting it as its Deployment would")
                        self.start_operator(o, skew=o in self.skewed)

    def start_operator(self, o, skew=False, first=False):
        argv = [os.path.join(self.bin, "hyperbox-operator"), "kubernetes", "--kubeconfig", self.op_kc[o],
                "--node-token-file", self.node_token, "--allow-http-nodes", "--identity", o,
                "--lease-name", "hb-operator", "--lease-namespace", NS, "--lease-duration", f"{int(LEASE)}s",
                "--node-monitor-grace", MONITOR_GRACE, "--node-grace", NODE_GRACE]
        env = {"RUST_LOG": "info,hyperbox_operator=debug,kube=warn"}
        if skew:
            # The wall clock 5 minutes ahead; durations (the monotonic clock) unchanged.
            env.update(LD_PRELOAD=FAKETIME_LIB, FAKETIME="+300s", FAKETIME_DONT_FAKE_MONOTONIC="1")
            self.skewed.add(o)
        else:
            self.skewed.discard(o)
        if o not in self.ops:
            self.ops[o] = Proc(o, argv, self.work, env=env)
        else:
            self.ops[o].argv, self.ops[o].env = argv, dict(os.environ, **env)
        with self.ops_lock:
            self.ops[o].start("(clock +300s)" if skew else "")
            if first:
                time.sleep(0.5)
                if self.ops[o].p.poll() is not None:
                    raise RuntimeError(f"{o} exited at its start:\n{tail(self.ops[o].log)}")

    def node_cli(self, n, args, timeout=10):
        try:
            return subprocess.run([os.path.join(self.bin, "hyperbox-node"), "--socket", self.sock(n)] + args,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(e.cmd, 124, "", f"timed out after {timeout}s")

    def node_get(self, n):
        if not self.nodes[n].running():
            return None
        r = self.node_cli(n, ["get", "-o", "json"])
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def leader(self):
        lease = self.kube_json(["get", "lease", "hb-operator", "-n", NS])
        return (lease or {}).get("spec", {}).get("holderIdentity")

    # ---------- workloads ----------
    def new_spec(self):
        self.gen += 1
        return dict(replicas=self.rng.choice([2, 3, 3, 4]), surge=self.rng.choice([0, 1]), gen=self.gen)

    def apply_workload(self, w):
        s = self.specs[w]
        y = f"""apiVersion: hyperbox.dev/v1alpha1
kind: Workload
metadata: {{name: {w}, namespace: default}}
spec:
  image: {self.image}
  command: [sleep, '1000000']
  replicas: {s['replicas']}
  env:
  - {{name: CHAOS_GEN, value: '{s['gen']}'}}
  strategy:
    type: RollingUpdate
    rollingUpdate: {{maxSurge: {s['surge']}, maxUnavailable: 1}}
  readinessProbe:
    exec: {{command: [test, -d, /tmp]}}
    periodSeconds: 1
  terminationGracePeriodSeconds: 1
"""
        for _ in range(30):
            r = subprocess.run([self.kubectl_bin, "--kubeconfig", self.admin_kc, "apply", "-f", "-"], input=y,
                               capture_output=True, text=True)
            if r.returncode == 0:
                return
            time.sleep(1)  # the API server may be restarting
        raise RuntimeError(f"apply {w}: {r.stderr}")

    # ---------- observation ----------
    def ready_by_workload(self):
        """Ready replicas of each Workload across the nodes (ours only), or None when a node
        did not answer."""
        out = {w: 0 for w in WORKLOADS}
        for n in NODES:
            got = self.node_get(n)
            if got is None:
                return None
            for ws in got:
                w = ws.get("name")
                if w in out and (ws.get("manager") or "").startswith("kubernetes:"):
                    out[w] += sum(1 for r in ws.get("replicas", []) if r.get("ready"))
        return out

    def sampler(self):
        while True:
            time.sleep(SAMPLE_EVERY)
            if not self.sampling.is_set():
                self.dips.clear()
                continue
            ready = self.ready_by_workload()
            if ready is None or not self.sampling.is_set():
                continue
            with self.sample_lock:
                self.stats["budget_samples"] += 1
                for w, n in ready.items():
                    floor = self.floor.get(w, 0)
                    if n < floor:
                        self.dips[w] = self.dips.get(w, 0) + 1
                        if self.dips[w] == 2:
                            self.violation(self.stats["rounds"], "budget",
                                           f"{w}: {n} ready across the nodes, below its floor {floor} for two samples")
                    else:
                        self.dips[w] = 0

    def arm_budget(self, specs):
        self.floor = {w: max(0, s["replicas"] - 1) for w, s in specs.items()}
        self.dips.clear()
        self.sampling.set()

    def fenced_epochs(self, n):
        """(epochs admitted in order, stale writes refused) from the node's log."""
        epochs, refused = [], 0
        try:
            with open(self.nodes[n].log, errors="replace") as f:
                for line in f:
                    if "fenced write admitted" in line:
                        m = re.search(r"fence=\S*?=(\d+)", line)
                        if m:
                            epochs.append(int(m.group(1)))
                    elif "refused a write of an older leader" in line:
                        refused += 1
        except OSError:
            pass
        return epochs, refused

    def check_fencing(self, rnd):
        refused = 0
        for n in NODES:
            epochs, r = self.fenced_epochs(n)
            refused += r
            for i in range(1, len(epochs)):
                if epochs[i] < epochs[i - 1]:
                    self.violation(rnd, "fencing", f"{n} admitted epoch {epochs[i]} after epoch {epochs[i - 1]}",
                                   logs=[self.nodes[n]])
                    break
        self.stats["stale_refused"] = refused

    def settled(self):
        """Why the cluster is not settled yet, or None."""
        items = self.kube_json(["get", "workloads", "-n", "default"])
        if items is None:
            return "the API server did not answer"
        by_name = {i["metadata"]["name"]: i for i in items.get("items", [])}
        for w in WORKLOADS:
            i = by_name.get(w)
            if i is None:
                return f"{w} missing"
            st = i.get("status") or {}
            if st.get("observedGeneration") != i["metadata"].get("generation"):
                return f"{w}: observedGeneration {st.get('observedGeneration')} != {i['metadata'].get('generation')}"
            ready = [c for c in st.get("conditions", []) if c.get("type") == "Ready"]
            if not ready or ready[0].get("status") != "True":
                return f"{w}: not Ready ({ready[0].get('reason') if ready else 'no condition'})"
            if st.get("readyReplicas") != self.specs[w]["replicas"]:
                return f"{w}: readyReplicas {st.get('readyReplicas')} != {self.specs[w]['replicas']}"
        # The nodes: replicas add up, nothing but our Workloads, none stale.
        total = {w: 0 for w in WORKLOADS}
        for n in NODES:
            got = self.node_get(n)
            if got is None:
                return f"{n} did not answer"
            for ws in got:
                if not (ws.get("manager") or "").startswith("kubernetes:"):
                    continue
                w = ws.get("name")
                if w not in total:
                    return f"{n} holds {w}, which is no Workload (an orphan)"
                total[w] += ws.get("desiredReplicas", 0)
                if ws.get("readyReplicas", 0) != ws.get("desiredReplicas", 0):
                    return f"{n}: {w} has {ws.get('readyReplicas')} of {ws.get('desiredReplicas')} ready"
        for w, t in total.items():
            if t != self.specs[w]["replicas"]:
                return f"{w}: the nodes hold {t} replicas, spec.replicas is {self.specs[w]['replicas']}"
        return None

    def settle(self, rnd):
        started = time.monotonic()
        why = None
        while time.monotonic() - started < SETTLE_TIMEOUT:
            why = self.settled()
            if why is None:
                self.settle_times.append(time.monotonic() - started)
                return True
            time.sleep(0.5)
        self.violation(rnd, "converges/orphans", f"not settled after {SETTLE_TIMEOUT:.0f}s: {why}",
                       logs=[self.ops["op-a"], self.ops["op-b"]])
        return False

    def containers(self, n):
        got = self.node_get(n) or []
        return {r["containerId"] for ws in got for r in ws.get("replicas", []) if r.get("containerId")}

    # ---------- disruptions ----------
    def other(self, o):
        return "op-b" if o == "op-a" else "op-a"

    def round(self, rnd):
        kind = self.rng.choice(DISRUPTIONS)
        self.stats[kind] += 1
        self.stats["rounds"] += 1
        also_rollout = kind != "rollout" and self.rng.random() < 0.3
        # Nodes stay up in these: the budget is watched throughout.
        nodes_up = kind not in ("kill9-node", "lost-heartbeats")
        before = {w: dict(s) for w, s in self.specs.items()}
        changed = None
        if kind == "rollout" or also_rollout:
            changed = self.rng.choice(WORKLOADS)
            s = self.specs[changed]
            self.gen += 1
            # The template changes (a rollout); sometimes the replica count too.
            s["gen"] = self.gen
            if self.rng.random() < 0.3:
                s["replicas"] = self.rng.choice([2, 3, 4])
        if nodes_up:
            # A scale-down lowers the floor at once; a scale-up only once the new replicas run.
            floor_specs = {w: dict(before[w], replicas=min(before[w]["replicas"], self.specs[w]["replicas"]))
                           for w in WORKLOADS}
            self.arm_budget(floor_specs)
        leader = self.leader() or "op-a"
        detail = ""
        if changed:
            self.apply_workload(changed)
            detail += f" rollout of {changed}"
        if kind == "kill9-leader":
            with self.ops_lock:
                self.ops[leader].kill9()
                time.sleep(self.rng.uniform(0, 3))
                self.start_operator(leader, skew=leader in self.skewed)
            detail += f" ({leader})"
        elif kind == "kill9-standby":
            o = self.other(leader)
            with self.ops_lock:
                self.ops[o].kill9()
                self.start_operator(o, skew=o in self.skewed)
            detail += f" ({o})"
        elif kind == "kill9-node":
            n = self.rng.choice(NODES)
            down = self.rng.uniform(1, 14)
            self.nodes[n].kill9()
            time.sleep(down)
            self.up_node(n, f"after {down:.1f}s down")
            detail += f" ({n}, {down:.1f}s down)"
        elif kind == "apiserver":
            subprocess.run([os.path.join(self.root, "tests/kube/cluster.sh"), "restart-apiserver", self.kube],
                           check=True, stdout=subprocess.DEVNULL)
        elif kind == "cut-leader":
            cut = LEASE + self.rng.uniform(1, 6)
            self.proxies[leader].frozen.set()
            time.sleep(cut)
            self.proxies[leader].frozen.clear()
            detail += f" ({leader}, {cut:.1f}s)"
        elif kind == "clock-ahead":
            o = leader
            skew = o not in self.skewed
            with self.ops_lock:
                self.ops[o].kill9()
                self.start_operator(o, skew=skew)
            detail += f" ({o} {'+300s' if skew else 'back to the true time'})"
        elif kind == "lost-heartbeats":
            n = self.rng.choice(NODES)
            had = self.containers(n)
            cut = 14 + self.rng.uniform(0, 4)  # past the monitor grace and the eviction grace
            self.proxies[n].frozen.set()
            time.sleep(cut)
            still = self.containers(n)
            self.proxies[n].frozen.clear()
            # Containers of the Workload rolled this round may be replaced: compare the others.
            lost = had - still
            if lost and not changed:
                self.violation(rnd, "kept", f"{n} lost {len(lost)} containers while it was reachable and only its "
                               f"heartbeats were cut ({cut:.1f}s)", logs=[self.nodes[n], self.ops[leader]])
            detail += f" ({n}, {cut:.1f}s, {len(had)} containers kept)" if not lost else f" ({n}, {cut:.1f}s)"
        # Let the round's effects play out while the budget is still watched, then settle.
        ok = self.settle(rnd)
        self.sampling.clear()
        self.check_fencing(rnd)
        log(f"round {rnd}: {kind}{detail}: {'settled' if ok else 'NOT settled'} in "
            f"{self.settle_times[-1] if ok else SETTLE_TIMEOUT:.1f}s")

    def run(self):
        log(f"seed {self.a.seed}, {self.a.rounds} rounds, work dir {self.work}")
        self.setup()
        threading.Thread(target=self.sampler, daemon=True).start()
        threading.Thread(target=self.watchdog, daemon=True).start()
        if not self.settle(0):
            return 1
        log(f"initial state settled in {self.settle_times[-1]:.1f}s")
        for rnd in range(1, self.a.rounds + 1):
            self.round(rnd)
        self.stop()
        st = sorted(self.settle_times)
        summary = dict(self.stats, seed=self.a.seed,
                       settle_median_s=round(st[len(st) // 2], 1) if st else None,
                       settle_max_s=round(st[-1], 1) if st else None)
        print(json.dumps(summary, indent=1))
        with open(os.path.join(self.work, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        for v in self.violations:
            print(v)
        return 1 if self.violations else 0

    def stop(self):
        self.ops_lock.acquire()  # the watchdog restarts nothing from here on
        for p in list(self.ops.values()) + list(self.nodes.values()):
            p.stop()
        self.registry.stop()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--cgroup-parent", required=True)
    ap.add_argument("--repo-root", required=True)
    a = ap.parse_args()
    c = KubeChaos(a)
    try:
        rc = c.run()
    finally:
        try:
            c.stop()
        except Exception:  # noqa: BLE001 - best effort; run.sh kills what is left
            pass
    sys.exit(rc)


if __name__ == "__main__":
    main()
