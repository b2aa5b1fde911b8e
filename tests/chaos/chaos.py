#!/usr/bin/env python3
"""Chaos soak for HyperBox (issue 6): a real registry, a Git remote served by `git daemon`, a
hyperbox-node and a hyperbox-operator, and ROUNDS rounds of one random disruption each
(kill -9 of a daemon, a Git push, a registry or Git outage, a delete behind the operator's
back). After every round it waits for the operator to report Git HEAD as applied and for the
node to match, then checks the invariants (listed in RELIABILITY.md, "Chaos soak"). Stdlib only.

Started by tests/chaos/run.sh, which owns the work dir and the cgroup parent and cleans up.
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from benchlib import free_port  # noqa: E402

SETTLE_TIMEOUT = 90.0  # seconds a round may take to converge
NAMES = [f"w{i}" for i in range(10)]  # names are reused: re-adds after removals
MIN_WORKLOADS, MAX_WORKLOADS = 3, 8
IMAGE_KEEP_FOR = "5s"  # short, so unused images are collected and switching image pulls again
GC_PERIOD = 60.0
STRESS_REPLICAS = 6
IMAGE_PAD_MB = 32  # random bytes in each image: pulls take long enough to be interrupted  # the node collects images every 60 s (and after deletes)


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def wait_for(pred, timeout, step=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


def tail(path, n=40):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 200_000))
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])
    except OSError as e:
        return f"(no log: {e})"


class Proc:
    """A restartable daemon with an append-only log and a pid file (for run.sh's cleanup)."""

    def __init__(self, name, argv, work, env=None, group_kill=False):
        self.name, self.argv, self.work = name, argv, work
        self.env = dict(os.environ, **(env or {}))
        self.group_kill = group_kill  # git daemon forks a child: stop the whole group
        self.log = os.path.join(work, "logs", f"{name}.log")
        self.p = None

    def start(self, note=""):
        with open(self.log, "ab") as lf:
            lf.write(f"\n=== chaos: start {self.name} {note} at {time.strftime('%H:%M:%S')}\n".encode())
            lf.flush()
            self.p = subprocess.Popen(self.argv, stdout=lf, stderr=lf, env=self.env,
                                      stdin=subprocess.DEVNULL, start_new_session=True)
        with open(os.path.join(self.work, "pids", f"{self.name}.pid"), "w") as f:
            f.write(f"{self.p.pid}\n")

    def running(self):
        return self.p is not None and self.p.poll() is None

    def kill9(self):
        if self.p is None:
            return
        try:
            if self.group_kill:
                os.killpg(self.p.pid, signal.SIGKILL)
            else:
                os.kill(self.p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.p.wait()
        self.p = None

    def stop(self):
        if self.p is None:
            return
        try:
            os.killpg(self.p.pid, signal.SIGTERM) if self.group_kill else self.p.terminate()
            self.p.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.kill9()


def registry_proc(work):
    """A `docker-registry` on a free loopback port with its storage under WORK/registry (not
    started yet): the Proc, its port and its address."""
    port = free_port()
    addr = f"127.0.0.1:{port}"
    d = os.path.join(work, "registry")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.yml"), "w") as f:
        f.write(f"version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {d}/data}}}}\n"
                f"http: {{addr: {addr}}}\n")
    proc = Proc("registry", ["docker-registry", "serve", os.path.join(d, "config.yml")], work, group_kill=True)
    return proc, port, addr


class Chaos:
    def __init__(self, a):
        self.a = a
        self.rng = random.Random(a.seed)
        self.work = a.work
        self.bin = a.bin_dir
        self.repo_root = a.repo_root
        self.cg_parent = a.cgroup_parent  # e.g. /hyperbox-chaos-1a2b3c4d
        self.cg_rel = self.cg_parent.strip("/")
        self.state = os.path.join(self.work, "node")
        self.run_dir = os.path.join(self.work, "run")
        self.sock = os.path.join(self.work, "node.sock")
        self.op_state = os.path.join(self.work, "operator")
        self.run_id = f"{a.seed:x}-{os.getpid()}"
        for d in ("logs", "pids"):
            os.makedirs(os.path.join(self.work, d), exist_ok=True)
        self.stats = dict(rounds=0, kills_node=0, kills_operator=0, pushes=0,
                          outages_registry=0, outages_git=0, drift_deletes=0, violations=0, repairs=0, transients=0)
        self.settle_times = []
        self.violation_log = []
        self.desired = {}  # name -> spec dict
        # Revisions pushed, in order, and per workload the first of them with its current
        # manifest: the operator applies a workload only when it changed, so its revision
        # annotation is the commit at which the operator saw that change (or a later one, after
        # drift or a missed commit), never an earlier one, and not necessarily HEAD.
        self.revs = []
        self.last_manifest = {}
        self.changed_at = {}
        self.gen = 0
        self.released = {}  # image digest -> when it may have stopped being used
        self.in_use_prev = set()
        self.layers_in_use_prev = set()
        self.node_started_at = 0.0

    # ---------- peers ----------
    def start_registry(self):
        self.registry, self.reg_port, self.reg_addr = registry_proc(self.work)
        self.up_registry()

    def up_registry(self):
        if self.registry.running():
            return
        self.registry.start()
        if not wait_for(lambda: port_open(self.reg_port), 20):
            raise RuntimeError("registry did not start:\n" + tail(self.registry.log))

    def push_images(self):
        script = os.path.join(self.repo_root, "tests/bench/build-busybox-image.sh")
        self.images = {}
        for tag in ("a", "b"):
            ref = f"chaos/busybox:{tag}"
            subprocess.run([script, self.reg_addr, ref, str(IMAGE_PAD_MB)], check=True)
            out = subprocess.run(["skopeo", "inspect", "--tls-verify=false", "--raw",
                                  f"docker://{self.reg_addr}/{ref}"], check=True, capture_output=True)
            import hashlib
            digest = "sha256:" + hashlib.sha256(out.stdout).hexdigest()
            self.images[tag] = (f"{self.reg_addr}/{ref}", digest)
        if self.images["a"][1] == self.images["b"][1]:
            raise RuntimeError("the two image tags have the same digest")
        log(f"images: a={self.images['a'][1][:19]} b={self.images['b'][1][:19]}")

    def start_git(self):
        gdir = os.path.join(self.work, "git")
        self.bare = os.path.join(gdir, "fleet.git")
        self.clone = os.path.join(self.work, "clone")
        os.makedirs(gdir, exist_ok=True)
        self.git(["init", "-q", "--bare", "-b", "main", self.bare])
        self.git(["init", "-q", "-b", "main", self.clone])
        self.git(["-C", self.clone, "remote", "add", "origin", self.bare])
        os.makedirs(os.path.join(self.clone, "apps"), exist_ok=True)
        self.git_port = free_port()
        self.gitd = Proc("git-daemon", ["git", "daemon", "--reuseaddr", "--export-all",
                                        "--listen=127.0.0.1", f"--port={self.git_port}",
                                        f"--base-path={gdir}", gdir], self.work, group_kill=True)
        self.up_git()

    def up_git(self):
        if self.gitd.running():
            return
        self.gitd.start()
        if not wait_for(lambda: port_open(self.git_port), 20):
            raise RuntimeError("git daemon did not start:\n" + tail(self.gitd.log))

    def git(self, args, **kw):
        env = dict(os.environ, GIT_AUTHOR_NAME="chaos", GIT_AUTHOR_EMAIL="chaos@hyperbox.invalid",
                   GIT_COMMITTER_NAME="chaos", GIT_COMMITTER_EMAIL="chaos@hyperbox.invalid")
        return subprocess.run(["git"] + args, check=True, capture_output=True, text=True, env=env,
                              **kw).stdout.strip()

    def head(self):
        return self.git(["--git-dir", self.bare, "rev-parse", "refs/heads/main"])

    def start_node(self):
        node_bin = os.path.join(self.bin, "hyperbox-node")
        self.node = Proc("node", [node_bin, "--socket", self.sock, "serve", "--state-dir", self.state,
                                  "--run-dir", self.run_dir, "--cgroup-parent", self.cg_parent,
                                  "--insecure-registry", self.reg_addr, "--backoff-base", "200ms",
                                  "--backoff-max", "2s", "--image-keep-for", IMAGE_KEEP_FOR],
                         self.work, env={"RUST_LOG": "info,hyperbox_node=debug,libcgroups=error,libcontainer=warn"})
        self.up_node()

    def up_node(self, note=""):
        self.node.start(note)
        self.node_started_at = time.monotonic()
        ok = wait_for(lambda: self.node_cli(["get", "-o", "json"], timeout=5).returncode == 0, 30, 0.05)
        if not ok:
            self.violation(None, "node", "the node did not answer within 30 s of its start",
                           logs=True)

    def start_operator(self):
        op_bin = os.path.join(self.bin, "hyperbox-operator")
        self.op = Proc("operator", [op_bin, "git", "--repo", f"git://127.0.0.1:{self.git_port}/fleet.git",
                                    "--branch", "main", "--path", "apps", "--node", f"unix://{self.sock}",
                                    "--state-dir", self.op_state, "--interval", "1s"],
                       self.work, env={"RUST_LOG": "info,hyperbox_operator=debug"})
        self.op.start()

    def node_cli(self, args, timeout=30):
        try:
            return subprocess.run([os.path.join(self.bin, "hyperbox-node"), "--socket", self.sock] + args,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(e.cmd, 124, "", f"timed out after {timeout}s")

    def node_get(self):
        r = self.node_cli(["get", "-o", "json"], timeout=10)
        if r.returncode != 0:
            return None
        try:
            return {w["name"]: w for w in json.loads(r.stdout)}
        except (ValueError, KeyError):
            return None

    def op_status(self):
        try:
            r = subprocess.run([os.path.join(self.bin, "hyperbox-operator"), "status", "--state-dir",
                                self.op_state, "-o", "json"], capture_output=True, text=True, timeout=10)
            return json.loads(r.stdout) if r.returncode == 0 else None
        except (ValueError, subprocess.TimeoutExpired):
            return None

    # ---------- the desired state in Git ----------
    def new_spec(self):
        self.gen += 1
        return dict(tag=self.rng.choice("ab"), replicas=self.rng.choice([0, 1, 1, 2, 2, 3]),
                    sleep=100000 + self.rng.randrange(900000), gen=self.gen,
                    probe=self.rng.random() < 0.5)

    def manifest(self, name, s):
        y = [
            "apiVersion: hyperbox.dev/v1alpha1",
            "kind: Workload",
            "metadata:",
            f"  name: {name}",
            "spec:",
            f"  image: {self.images[s['tag']][0]}",
            "  command: [sleep]",
            f"  args: ['{s['sleep']}']",
            f"  replicas: {s['replicas']}",
            "  env:",
            f"  - {{name: CHAOS_RUN, value: '{self.run_id}'}}",
            f"  - {{name: CHAOS_WL, value: {name}}}",
            f"  - {{name: CHAOS_GEN, value: '{s['gen']}'}}",
            "  terminationGracePeriodSeconds: 1",
        ]
        if s["probe"]:
            y += ["  readinessProbe:", "    exec: {command: [test, -d, /tmp]}", "    periodSeconds: 1"]
        return "\n".join(y) + "\n"

    def write_and_push(self, msg):
        apps = os.path.join(self.clone, "apps")
        for f in os.listdir(apps):
            if f[:-5] not in self.desired:
                os.remove(os.path.join(apps, f))
        for name, s in self.desired.items():
            with open(os.path.join(apps, f"{name}.yaml"), "w") as f:
                f.write(self.manifest(name, s))
        self.git(["-C", self.clone, "add", "-A"])
        self.git(["-C", self.clone, "commit", "-q", "--allow-empty", "-m", msg])
        self.git(["-C", self.clone, "push", "-q", "origin", "main"])
        self.stats["pushes"] += 1
        head = self.git(["-C", self.clone, "rev-parse", "HEAD"])
        self.revs.append(head)
        for name in list(self.last_manifest):
            if name not in self.desired:
                del self.last_manifest[name]
                self.changed_at.pop(name, None)
        for name, s in self.desired.items():
            text = self.manifest(name, s)
            if self.last_manifest.get(name) != text:
                self.last_manifest[name] = text
                self.changed_at[name] = head

    def mutate(self, prefer=None):
        """One or two edits of the desired set, pushed as one commit; returns a description."""
        done = []
        for _ in range(1 if self.rng.random() < 0.8 else 2):
            ops = ["change", "scale"]
            if len(self.desired) < MAX_WORKLOADS:
                ops.append("add")
            if len(self.desired) > MIN_WORKLOADS:
                ops.append("remove")
            op = "change" if prefer == "image" else prefer if prefer in ops else self.rng.choice(ops)
            if op == "add":
                name = self.rng.choice([n for n in NAMES if n not in self.desired])
                self.desired[name] = self.new_spec()
                s = self.desired[name]
                done.append(f"add {name}(tag={s['tag']},replicas={s['replicas']},probe={s['probe']})")
            elif op == "remove":
                name = self.rng.choice(sorted(self.desired))
                del self.desired[name]
                done.append(f"remove {name}")
            elif op == "scale":
                name = self.rng.choice(sorted(self.desired))
                s = self.desired[name]
                old = s["replicas"]
                s["replicas"] = self.rng.choice([r for r in range(4) if r != old])
                done.append(f"scale {name} {old}->{s['replicas']}")
            else:
                name = self.rng.choice(sorted(self.desired))
                s = self.desired[name]
                self.gen += 1
                what = "image" if prefer == "image" else self.rng.choice(["args", "env", "image"])
                if what == "args":
                    s["sleep"] = 100000 + self.rng.randrange(900000)
                elif what == "env":
                    s["gen"] = self.gen
                else:
                    s["tag"] = "b" if s["tag"] == "a" else "a"
                done.append(f"change {name} {what}" + (f"->{s['tag']}" if what == "image" else ""))
            prefer = None
        desc = "; ".join(done)
        self.write_and_push(desc)
        return desc

    # ---------- rounds ----------
    def round(self, n):
        kind = self.rng.choices(["kill", "push", "outage", "drift"], weights=[35, 30, 15, 20])[0]
        if kind == "kill":
            target = self.rng.choices(["node", "operator"], weights=[55, 45])[0]
            trigger = self.rng.choice(["push", "push-image", "drift", "sync"])
            bg, what = None, "mid sync"
            if trigger == "push":
                what = "after push: " + self.mutate()
            elif trigger == "push-image":
                what = "after push: " + self.mutate(prefer="image")
            elif trigger == "drift":
                name = self.rng.choice(sorted(self.desired))
                bg = subprocess.Popen([os.path.join(self.bin, "hyperbox-node"), "--socket", self.sock,
                                       "delete", name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                self.stats["drift_deletes"] += 1
                what = f"mid delete {name}"
            delay = self.rng.uniform(0, 1.5)
            time.sleep(delay)
            proc = self.node if target == "node" else self.op
            proc.kill9()
            self.stats[f"kills_{target}"] += 1
            time.sleep(self.rng.uniform(0, 0.5))
            if target == "node":
                self.up_node(f"(round {n})")
            else:
                self.op.start(f"(round {n})")
            if bg is not None:
                try:
                    bg.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    bg.kill()
                    bg.wait()
            return f"kill -9 {target} {delay:.2f}s {what}"
        if kind == "push":
            return "push: " + self.mutate()
        if kind == "outage":
            svc = self.rng.choice(["registry", "git"])
            proc = self.registry if svc == "registry" else self.gitd
            proc.kill9()
            self.stats[f"outages_{svc}"] += 1
            extra = ""
            if self.rng.random() < 0.7:
                extra = ", push: " + self.mutate(prefer="image" if svc == "registry" else None)
            down = self.rng.uniform(1, 4)
            time.sleep(down)
            if self.rng.random() < 0.5:
                (self.up_registry if svc == "registry" else self.up_git)()
                return f"{svc} down {down:.1f}s then started{extra}"
            return f"{svc} down {down:.1f}s (started by the settle){extra}"
        name = self.rng.choice(sorted(self.desired))
        r = self.node_cli(["delete", name], timeout=60)
        self.stats["drift_deletes"] += 1
        return f"drift: delete {name} on the node (rc={r.returncode})"

    # ---------- settle + invariants ----------
    def expected(self):
        return {name: dict(s, image=self.images[s["tag"]][0], digest=self.images[s["tag"]][1])
                for name, s in self.desired.items()}

    def workload_problems(self, got, head):
        """What differs between the node's workloads and HEAD's manifests (empty when equal)."""
        if got is None:
            return ["the node does not answer `get`"]
        p = []
        exp = self.expected()
        for name in sorted(set(got) - set(exp)):
            p.append(f"{name}: on the node but not in Git (phase {got[name].get('phase')})")
        for name, e in sorted(exp.items()):
            w = got.get(name)
            if w is None:
                p.append(f"{name}: missing on the node")
                continue
            since = self.changed_at.get(name)
            allowed = self.revs[self.revs.index(since):] if since in self.revs else [head]
            if w.get("revision") not in allowed:
                p.append(f"{name}: revision {str(w.get('revision'))[:12]} is not between the commit that "
                         f"last changed it ({str(since)[:12]}) and HEAD {head[:12]}")
            if w.get("image") != e["image"]:
                p.append(f"{name}: image {w.get('image')} != {e['image']}")
            reps = w.get("replicas") or []
            if len(reps) != e["replicas"]:
                p.append(f"{name}: {len(reps)} replicas != {e['replicas']}")
            bad = [(r.get("index"), r.get("phase"), r.get("reason")) for r in reps if r.get("phase") != "Running"]
            if bad:
                p.append(f"{name}: replicas not Running: {bad}")
            if e["replicas"] > 0:
                if w.get("phase") != "Running":
                    p.append(f"{name}: phase {w.get('phase')} reason {w.get('reason')} ({w.get('message')})")
                if not w.get("ready"):
                    p.append(f"{name}: not ready (reason {w.get('reason')})")
                if w.get("imageDigest") != e["digest"]:
                    p.append(f"{name}: imageDigest {w.get('imageDigest')} != {e['digest']}")
            if w.get("reason") == "Terminating":
                p.append(f"{name}: still terminating")
        return p

    def cgroup_dirs(self, hierarchy):
        d = os.path.join("/sys/fs/cgroup", hierarchy, self.cg_rel)
        try:
            return {e.name: e.path for e in os.scandir(d) if e.is_dir()}
        except FileNotFoundError:
            return {}

    def settled(self, head):
        st = self.op_status()
        if st is None:
            return ["no operator status yet"]
        p = []
        if st.get("lastAppliedRevision") != head:
            p.append(f"operator applied {str(st.get('lastAppliedRevision'))[:12]}, HEAD is {head[:12]}"
                     f" (error: {st.get('error')})")
        elif st.get("stale"):
            p.append(f"operator stale: {st.get('error')}")
        p += self.workload_problems(self.node_get(), head)
        total = sum(s["replicas"] for s in self.desired.values())
        n = len(self.cgroup_dirs("pids"))
        if n != total:
            p.append(f"{n} container cgroups, {total} replicas desired")
        return p

    def settle(self, n):
        self.up_registry()
        self.up_git()
        if not self.node.running():
            self.violation(n, "node", f"the node exited (rc {self.node.p and self.node.p.returncode}); restarting it",
                           logs=True)
            self.up_node("(after it exited)")
        if not self.op.running():
            self.violation(n, "operator", f"the operator exited (rc {self.op.p and self.op.p.returncode}); restarting it",
                           logs=True)
            self.op.start("(after it exited)")
        head = self.head()
        t0 = time.monotonic()
        problems = []
        while time.monotonic() - t0 < SETTLE_TIMEOUT:
            problems = self.settled(head)
            if not problems:
                break
            time.sleep(0.25)
        took = time.monotonic() - t0
        self.settle_times.append(took)
        if problems:
            self.violation(n, "settle", f"not converged after {SETTLE_TIMEOUT:.0f} s:\n  " + "\n  ".join(problems),
                           logs=True)
        return head, took, not problems

    def repair(self, n):
        """After a round that did not converge, the node and the operator are restarted
        (kill -9), so that one stuck daemon does not fail every later round: later violations
        are then new ones."""
        self.stats["repairs"] += 1
        log(f"round {n}: repair: kill -9 the node and the operator, restart both")
        self.node.kill9()
        self.op.kill9()
        self.up_node(f"(repair after round {n})")
        self.op.start(f"(repair after round {n})")
        head = self.head()
        t0 = time.monotonic()
        problems = []
        while time.monotonic() - t0 < SETTLE_TIMEOUT:
            problems = self.settled(head)
            if not problems:
                break
            time.sleep(0.25)
        if problems:
            self.violation(n, "repair", "still not converged 90 s after restarting node and operator:\n  " + "\n  ".join(problems),
                           logs=True)
        else:
            log(f"round {n}: repaired: converged {time.monotonic() - t0:.1f}s after the restarts")
            self.check(n, head)

    def violation(self, n, cat, detail, logs=False):
        self.stats["violations"] += 1
        self.violation_log.append((n, cat, detail.splitlines()[0]))
        msg = f"VIOLATION round {n} [{cat}]: {detail}"
        if logs:
            msg += (f"\n--- node log (tail) ---\n{tail(self.node.log)}"
                    f"\n--- operator log (tail) ---\n{tail(self.op.log)}")
        print(msg, flush=True)

    def mounts(self):
        out = []
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                mp = parts[4].replace("\\040", " ")
                if mp.startswith(self.state + "/"):
                    fstype = parts[parts.index("-") + 1]
                    out.append((mp, fstype))
        return out

    def exec_in_flight(self, pid):
        """An exec readiness probe the running node started (its child): it sits in the
        container's cgroup for as long as the probe runs, and is not a leak."""
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        return self.node.p is not None and ppid == self.node.p.pid

    @staticmethod
    def describe(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                st = dict(l.split(":\t", 1) for l in f.read().splitlines() if ":\t" in l)
            return (f"{st.get('Name', '?').strip()}, ppid {st.get('PPid', '?').strip()}, "
                    f"{st.get('State', '?').strip()}, fds {len(os.listdir(f'/proc/{pid}/fd'))}")
        except OSError:
            return "gone"

    def our_processes(self):
        """Pids whose environment carries this run's tag: every container process (and probe)."""
        tag = f"CHAOS_RUN={self.run_id}".encode()
        found = {}
        for e in os.scandir("/proc"):
            if not e.name.isdigit():
                continue
            try:
                with open(f"/proc/{e.name}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                if tag not in env:
                    continue
                wl = next((v[9:].decode() for v in env if v.startswith(b"CHAOS_WL=")), "?")
                cg = ""
                with open(f"/proc/{e.name}/cgroup") as f:
                    for line in f:
                        _, ctrl, path = line.rstrip("\n").split(":", 2)
                        if "pids" in ctrl.split(","):
                            cg = path
                found[int(e.name)] = (wl, cg)
            except (OSError, ValueError):
                continue  # gone, or a zombie
        return found

    def check(self, n, head):
        """The invariants, on a settled node. Each failed invariant counts once per round.
        A failure seen once is looked at again 3 s later: only what is still wrong then counts
        (the node finishes some cleanup, e.g. removing a stopped container's directory, just
        after its status already shows the replica gone); what went away is printed as a note."""
        first = self.invariants(head)
        if not first:
            return True
        time.sleep(3)
        fails = self.invariants(head)
        for cat, msgs in first.items():
            if cat not in fails:
                self.stats["transients"] += 1
                print(f"NOTE round {n} [{cat}] transient, gone 3 s later: " + "\n  ".join(msgs), flush=True)
        for cat, msgs in fails.items():
            self.violation(n, cat, "\n  ".join(msgs), logs=True)
        return not fails

    def invariants(self, head):
        fails = {}

        def bad(cat, msg):
            fails.setdefault(cat, []).append(msg)

        got = self.node_get() or {}
        for p in self.workload_problems(got, head):
            bad("workloads", p)
        # containers the node reports, per workload
        cids = {}
        for name, w in got.items():
            for r in w.get("replicas") or []:
                if r.get("containerId"):
                    cids[r["containerId"]] = (name, r)
        total = sum(s["replicas"] for s in self.desired.values())
        # the running process of every replica is what Git asks for
        for cid, (name, r) in cids.items():
            s = self.desired.get(name)
            pid = r.get("pid")
            if s is None or not pid:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().rstrip(b"\0").split(b"\0")
                with open(f"/proc/{pid}/environ", "rb") as f:
                    env = f.read().split(b"\0")
                with open(f"/proc/{pid}/cgroup") as f:
                    cgs = f.read()
            except OSError as e:
                bad("processes", f"{name}[{r.get('index')}]: pid {pid} unreadable: {e}")
                continue
            if argv != [b"sleep", str(s["sleep"]).encode()]:
                bad("processes", f"{name}[{r.get('index')}]: pid {pid} runs {argv}, Git wants sleep {s['sleep']}")
            if f"CHAOS_GEN={s['gen']}".encode() not in env:
                bad("processes", f"{name}[{r.get('index')}]: pid {pid} has an old env (want CHAOS_GEN={s['gen']})")
            if f"/{self.cg_rel}/{cid}" not in cgs:
                bad("processes", f"{name}[{r.get('index')}]: pid {pid} is not in cgroup {self.cg_rel}/{cid}")
        # cgroups: one per desired replica, each with a process, none elsewhere
        for h in sorted(os.listdir("/sys/fs/cgroup")):
            dirs = self.cgroup_dirs(h)
            leaked = sorted(set(dirs) - set(cids))
            if leaked:
                bad("cgroups", f"{h}: cgroup dirs with no replica on the node: {leaked}")
            if h in ("pids", "memory"):
                if len(dirs) != total:
                    bad("cgroups", f"{h}: {len(dirs)} container cgroups, {total} replicas desired")
                missing = sorted(set(cids) - set(dirs))
                if missing:
                    bad("cgroups", f"{h}: replicas without a cgroup: {missing}")
        for cid, path in self.cgroup_dirs("pids").items():
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    if not f.read().split():
                        bad("cgroups", f"pids/{cid}: no process in it")
            except OSError:
                pass
        # processes of ours: only in the cgroups of the replicas of workloads Git wants
        for pid, (wl, cg) in sorted(self.our_processes().items()):
            cid = cg.rsplit("/", 1)[-1]
            if not cg.startswith(f"/{self.cg_rel}/") or cid not in cids:
                bad("processes", f"pid {pid} of {wl} outside every replica's cgroup (pids cgroup {cg})")
            elif wl not in self.desired:
                bad("processes", f"pid {pid} of {wl}, which Git no longer wants, still runs")
            elif cids[cid][0] != wl:
                bad("processes", f"pid {pid} of {wl} sits in {cid} of {cids[cid][0]}")
        # nothing else in the containers' cgroups: a process there that is not a container
        # process of ours (no run tag: e.g. a runtime helper that never exec'd) is a leak
        ours = self.our_processes()
        for cid, path in self.cgroup_dirs("pids").items():
            try:
                with open(os.path.join(path, "cgroup.procs")) as f:
                    pids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            for pid in pids:
                if pid not in ours and not self.exec_in_flight(pid):
                    bad("processes", f"pid {pid} ({self.describe(pid)}) in container cgroup {cid} "
                                     f"is not a container process")
        # forks of the node daemon that outlived it or never exec'd (they hold the daemon's fds)
        node_exe = os.path.realpath(os.path.join(self.bin, "hyperbox-node"))
        for e in os.scandir("/proc"):
            if not e.name.isdigit() or self.node.p is None or int(e.name) == self.node.p.pid:
                continue
            try:
                if os.readlink(f"/proc/{e.name}/exe") != node_exe:
                    continue
                with open(f"/proc/{e.name}/cmdline", "rb") as f:
                    if self.state.encode() not in f.read():
                        continue
            except OSError:
                continue
            bad("processes", f"pid {e.name} ({self.describe(int(e.name))}) is a fork of the node daemon "
                             f"that is not the daemon")
        # mounts
        mounts = self.mounts()
        seen = {}
        for mp, fs in mounts:
            seen[mp] = seen.get(mp, 0) + 1
        for mp, c in seen.items():
            if c > 1:
                bad("mounts", f"{mp} mounted {c} times")
        cdir = os.path.join(self.state, "containers") + "/"
        idir = os.path.join(self.state, "images", "mnt") + "/"
        ldir = os.path.join(self.state, "images", "lmnt") + "/"
        rootfs = {mp[len(cdir):].split("/")[0] for mp, _ in mounts if mp.startswith(cdir) and mp.endswith("/rootfs")}
        if rootfs != set(cids) or len(rootfs) != total:
            bad("mounts", f"overlay rootfs mounts {len(rootfs)} (extra {sorted(rootfs - set(cids))}, "
                          f"missing {sorted(set(cids) - rootfs)}), {total} replicas desired")
        images = {mp[len(idir):]: fs for mp, fs in mounts if mp.startswith(idir)}
        layers = {mp[len(ldir):]: fs for mp, fs in mounts if mp.startswith(ldir)}
        others = [(mp, fs) for mp, fs in mounts
                  if not (mp.startswith(idir) or mp.startswith(ldir)
                          or (mp.startswith(cdir) and mp.endswith("/rootfs")))]
        if others:
            bad("mounts", f"other mounts under the state dir: {others}")
        running = {self.images[s["tag"]][1].split(":")[1] for s in self.desired.values() if s["replicas"] > 0}
        # the node keeps the image of a workload scaled to 0 (its record names it)
        in_use = running | {w["imageDigest"].split(":")[1] for w in got.values() if w.get("imageDigest")}

        def image_layers(hexd):
            """The layer hexes of a prepared image made of shared layers (None: flattened)."""
            try:
                with open(os.path.join(self.state, "images", hexd, "meta.json")) as f:
                    meta = json.load(f)
            except (OSError, ValueError):
                return None
            if meta.get("store") != "layers":
                return None
            return {d.split(":")[1] for d in meta.get("diffIds", [])}

        layers_in_use = set()
        for hexd in in_use:
            layers_in_use |= image_layers(hexd) or set()
        now = time.monotonic()
        for d in self.in_use_prev - in_use:
            self.released[d] = now
        for d in self.layers_in_use_prev - layers_in_use:
            self.released["layer:" + d] = now
        self.in_use_prev = in_use
        self.layers_in_use_prev = layers_in_use
        limit = 5 + GC_PERIOD + 15
        for hexd, fs in images.items():
            if not os.path.exists(os.path.join(self.state, "images", hexd, "meta.json")):
                bad("mounts", f"image mount {hexd[:12]} ({fs}) of an image that is not prepared")
            if hexd in in_use:
                continue
            since = max(self.released.get(hexd, 0.0), self.node_started_at)
            if now - since > limit:
                bad("mounts", f"image {hexd[:12]} unused for {now - since:.0f}s (> keep-for {IMAGE_KEEP_FOR} + "
                              f"GC period) and still mounted")
        for lhex, fs in layers.items():
            if not os.path.exists(os.path.join(self.state, "images", "layers", lhex, "meta.json")):
                bad("mounts", f"layer mount {lhex[:12]} ({fs}) of a layer that is not in the store")
            if lhex in layers_in_use:
                continue
            since = max(self.released.get("layer:" + lhex, 0.0), self.node_started_at)
            if now - since > limit:
                bad("mounts", f"layer {lhex[:12]} unused for {now - since:.0f}s (> keep-for {IMAGE_KEEP_FOR} + "
                              f"GC period) and still mounted")
        for hexd in running:
            if not self.erofs:
                continue
            lays = image_layers(hexd)
            if lays is None:
                if hexd not in images:
                    bad("mounts", f"image {hexd[:12]} in use but not mounted")
            elif not lays <= set(layers):
                bad("mounts", f"image {hexd[:12]} in use but {len(lays - set(layers))} of its layers not mounted")
        # loop devices backed by files in the state dir: only for mounted images, one each
        try:
            lo = subprocess.run(["losetup", "-a"], capture_output=True, text=True, timeout=10).stdout
            backs = [l for l in lo.splitlines() if self.state in l]
            files = {}
            for l in backs:
                f = l.rsplit("(", 1)[-1].rstrip(")")
                files[f] = files.get(f, 0) + 1
            for f, c in files.items():
                hexd = os.path.basename(os.path.dirname(f))
                mounted = hexd in images or hexd in layers
                if c > 1 or not mounted or "(deleted)" in f:
                    bad("loop", f"loop device(s) for {f} x{c} (image or layer mounted: {mounted})")
        except (OSError, subprocess.TimeoutExpired) as e:
            bad("loop", f"losetup: {e}")
        # staging, records, container and runtime dirs
        tmp = os.path.join(self.state, "images", "tmp")
        if os.path.isdir(tmp) and os.listdir(tmp):
            bad("staging", f"{tmp} not empty: {os.listdir(tmp)[:5]}")
        wdir = os.path.join(self.state, "workloads")
        recs = {f[:-5] for f in os.listdir(wdir) if f.endswith(".json") and not f.startswith(".")}
        if recs != set(self.desired):
            bad("records", f"records {sorted(recs)} != Git {sorted(self.desired)}")
        q = os.path.join(wdir, "quarantine")
        if os.path.isdir(q) and os.listdir(q):
            bad("records", f"quarantined records: {os.listdir(q)}")
        cont = set(os.listdir(os.path.join(self.state, "containers")))
        if cont - set(cids):
            bad("records", f"container dirs with no replica: {sorted(cont - set(cids))}")
        lc = os.path.join(self.run_dir, "libcontainer")
        if os.path.isdir(lc) and set(os.listdir(lc)) - set(cids):
            bad("records", f"libcontainer state with no replica: {sorted(set(os.listdir(lc)) - set(cids))}")
        return fails

    # ---------- a focused reproducer: container creates racing with thread churn ----------
    def stress_create(self, iterations):
        """Recreate a 6-replica workload with a fast exec probe again and again, straight on the
        node (no Git, no operator); stop at the first create that does not finish in 30 s.
        Each recreate clones 6 containers while probes clone exec processes and the daemon
        starts and ends threads. Returns 1 when a create hangs."""
        self.start_registry()
        self.push_images()
        self.start_node()
        f = os.path.join(self.work, "stress.yaml")
        started = time.monotonic()
        for i in range(1, iterations + 1):
            s = dict(tag="a", replicas=STRESS_REPLICAS, sleep=100000 + i, gen=i, probe=True)
            with open(f, "w") as fh:
                fh.write(self.manifest("stress", s).replace("periodSeconds: 1", "periodSeconds: 0.1")
                         .replace("terminationGracePeriodSeconds: 1", "terminationGracePeriodSeconds: 0"))
            r = self.node_cli(["apply", "--no-wait", "-f", f])
            if r.returncode != 0:
                log(f"apply failed: {r.stderr.strip()}")
                continue
            t0 = time.monotonic()
            ok = wait_for(lambda: self.stress_running(s), 30, 0.05)
            if not ok:
                w = (self.node_get() or {}).get("stress")
                log(f"iteration {i}: the recreate did not finish in 30 s "
                    f"({time.monotonic() - started:.0f}s into the run): "
                    f"{json.dumps([(r.get('index'), r.get('phase'), r.get('reason')) for r in (w or {}).get('replicas', [])])}")
                subprocess.run(["ps", "-eo", "pid,ppid,stat,wchan:20,comm"], check=False)
                print(f"node pid {self.node.p.pid}; inspect with: gdb -p <pid> -batch -ex 'thread apply all bt'\n"
                      f"--- node log (tail) ---\n{tail(self.node.log)}", flush=True)
                if os.environ.get("CHAOS_HOLD"):
                    log("CHAOS_HOLD set: holding for inspection (Ctrl-C to clean up)")
                    time.sleep(3600)
                return 1
            if i % 25 == 0:
                log(f"iteration {i}: recreated in {time.monotonic() - t0:.2f}s")
        log(f"no hang in {iterations} recreates")
        return 0

    def stress_running(self, s):
        w = (self.node_get() or {}).get("stress")
        return (w is not None and len(w.get("replicas") or []) == STRESS_REPLICAS
                and all(r.get("phase") == "Running" for r in w["replicas"])
                and self.pid_runs(w, s))

    def pid_runs(self, w, s):
        for r in w["replicas"]:
            try:
                with open(f"/proc/{r.get('pid')}/cmdline", "rb") as fh:
                    if fh.read().split(b"\0")[1] != str(s["sleep"]).encode():
                        return False
            except (OSError, IndexError):
                return False
        return True

    # ---------- main ----------
    def run(self):
        log(f"seed {self.a.seed} (replay: CHAOS_SEED={self.a.seed}), {self.a.rounds} rounds, "
            f"work dir {self.work}, cgroup parent {self.cg_parent}")
        self.start_registry()
        self.push_images()
        self.start_git()
        for _ in range(4):
            name = self.rng.choice([n for n in NAMES if n not in self.desired])
            self.desired[name] = self.new_spec()
        self.write_and_push("initial fleet")
        self.stats["pushes"] = 0
        self.start_node()
        r = self.node_cli(["node", "-o", "json"])
        self.erofs = bool(json.loads(r.stdout).get("features", {}).get("erofs")) if r.returncode == 0 else False
        log(f"node up; erofs: {self.erofs}")
        self.start_operator()
        started = time.monotonic()
        self.started = started
        head, took, ok = self.settle(0)
        log(f"round 0: initial sync, settled in {took:.1f}s")
        if ok:
            self.check(0, head)
        self.settle_times.clear()
        try:
            self.rounds(started)
        except BaseException:
            # interrupted (SIGTERM, Ctrl-C) or crashed: the figures so far, then the cause
            self.summary(time.monotonic() - started, partial=True)
            raise
        self.summary(time.monotonic() - started)
        return 1 if self.stats["violations"] else 0

    def rounds(self, started):
        for n in range(1, self.a.rounds + 1):
            v0 = self.stats["violations"]
            what = self.round(n)
            head, took, ok = self.settle(n)
            self.check(n, head)  # when not settled: the details of what is left behind
            if not ok:
                self.repair(n)
            self.stats["rounds"] = n
            total = sum(s["replicas"] for s in self.desired.values())
            flag = "" if self.stats["violations"] == v0 else f"  !! {self.stats['violations'] - v0} violation(s)"
            log(f"round {n}: {what} | settled in {took:.1f}s | {len(self.desired)} workloads, "
                f"{total} replicas, HEAD {head[:8]}{flag}")

    def summary(self, wall, partial=False):
        s, t = self.stats, sorted(self.settle_times) or [0.0]
        print("\n== chaos soak summary" + (f" (INTERRUPTED after round {s['rounds']})" if partial else ""),
              flush=True)
        print(f"seed:            {self.a.seed}")
        print(f"rounds:          {s['rounds']}")
        print(f"kills:           {s['kills_node'] + s['kills_operator']} (node {s['kills_node']}, operator {s['kills_operator']})")
        print(f"pushes:          {s['pushes']}")
        print(f"outages:         {s['outages_registry'] + s['outages_git']} (registry {s['outages_registry']}, git {s['outages_git']})")
        print(f"drift deletes:   {s['drift_deletes']}")
        try:
            with open(self.node.log, errors="replace") as f:
                text = f.read()
            pulls, gcs = text.count("image prepared"), text.count("removed image")
        except OSError:
            pulls = gcs = "?"
        print(f"images pulled:   {pulls} (prepared from the registry), collected by GC: {gcs}")
        print(f"violations:      {s['violations']} (node restarts to repair a stuck node: {s['repairs']}; "
              f"transient findings gone 3 s later, not counted: {s['transients']})")
        print(f"settle time:     median {statistics.median(t):.1f}s, max {max(t):.1f}s")
        print(f"wall time:       {wall:.0f}s")
        for n, cat, first in self.violation_log:
            print(f"  round {n} [{cat}] {first}")
        sys.stdout.flush()

    def shutdown(self):
        for p in ("op", "node", "gitd", "registry"):
            proc = getattr(self, p, None)
            if proc is not None:
                proc.kill9()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--cgroup-parent", required=True)
    ap.add_argument("--repo-root", required=True)
    ap.add_argument("--stress-create", type=int, default=0,
                    help="instead of the soak: recreate a workload N times, stop at a hung create")
    a = ap.parse_args()
    c = Chaos(a)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        rc = c.stress_create(a.stress_create) if a.stress_create else c.run()
    finally:
        c.shutdown()
    sys.exit(rc)


if __name__ == "__main__":
    main()
