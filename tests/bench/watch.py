#!/usr/bin/env python3
"""Watch versus polling, run through tests/bench/watch.sh (which starts the registry).

Three `hyperbox-node serve` on this machine (own state dirs, sockets, cgroup parents) and one
`hyperbox-operator git` with `--node` three times spread WORKLOADS (1,000) sleeping busybox
workloads over them. Then, ROUNDS times, the operator runs once with `--node-watch false`
(it lists every node at every sync) and once with the watch (one long-poll per node), each
from the same state dir, and for SYNCS syncs (10: 5 minutes at the default 30 s interval) of
steady state we record what its own status counts (`nodeApi`: requests to the nodes and
their bytes on the wire, both directions) and its CPU time (utime+stime from /proc).
"""
import json
import os
import signal
import statistics
import subprocess
import sys
import time

NODE, OP, IMAGE, WORK = sys.argv[1:5]
N = int(os.environ.get("WORKLOADS", "1000"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
SYNCS = int(os.environ.get("SYNCS", "10"))
INTERVAL = os.environ.get("INTERVAL", "30s")
GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@hyperbox.invalid",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="b@hyperbox.invalid")
TICK = os.sysconf("SC_CLK_TCK")


def git(*args, cwd=None):
    return subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True,
                          capture_output=True, text=True).stdout.strip()


def start_node(i):
    d = os.path.join(WORK, f"node{i}")
    os.makedirs(d)
    sock = os.path.join(d, "node.sock")
    log = open(os.path.join(d, "node.log"), "w")
    subprocess.Popen([NODE, "--socket", sock, "serve", "--state-dir", os.path.join(d, "state"),
                      "--run-dir", os.path.join(d, "run"), "--insecure-registry", IMAGE.split("/")[0],
                      "--cgroup-parent", f"/hyperbox-watch-bench-{i}"],
                     stdout=log, stderr=log, env=dict(os.environ, RUST_LOG="warn"))
    for _ in range(100):
        if os.path.exists(sock):
            break
        time.sleep(0.1)
    subprocess.run([NODE, "--socket", sock, "pull", IMAGE], check=True, capture_output=True)
    return sock


def make_repo(path):
    os.makedirs(path)
    git("init", "-q", "-b", "main", path)
    for i in range(N):
        d = os.path.join(path, "apps", f"{i % 50:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"w{i}.yaml"), "w") as f:
            f.write(f"apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: w{i}\n"
                    f"spec:\n  image: {IMAGE}\n  command: [sleep, '1000000']\n"
                    f"  terminationGracePeriodSeconds: 0\n")
    git("add", "-A", cwd=path)
    git("commit", "-q", "-m", f"{N} workloads", cwd=path)
    return git("rev-parse", "HEAD", cwd=path)


def status(state):
    try:
        with open(os.path.join(state, "status.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def running(socks):
    n = 0
    for s in socks:
        out = subprocess.run([NODE, "--socket", s, "get", "-o", "json"], check=True,
                             capture_output=True, text=True).stdout
        n += sum(1 for w in json.loads(out) if w["phase"] == "Running")
    return n


def operator(socks, repo, state, watch):
    args = [OP, "git", "--repo", f"file://{repo}", "--branch", "main", "--interval", INTERVAL,
            "--state-dir", state, "--node-watch", watch]
    for s in socks:
        args += ["--node", f"unix://{s}"]
    log = open(os.path.join(state + ".log"), "a")
    return subprocess.Popen(args, stdout=log, stderr=log, env=dict(os.environ, RUST_LOG="warn"))


def wait_syncs(state, at_least, timeout):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        s = status(state)
        if s and s.get("syncs", 0) >= at_least:
            return s
        time.sleep(0.05)
    raise SystemExit(f"operator did not reach {at_least} syncs: {status(state)}")


def measure(socks, repo, state, watch):
    before = (status(state) or {}).get("syncs", 0)
    op = operator(socks, repo, state, watch)
    try:
        # The first sync of a new process lists every node either way (and its counters
        # start at zero): measure from the sync after it.
        s0 = wait_syncs(state, before + 2, 180)
        c0, t0 = cpu_seconds(op.pid), time.monotonic()
        s1 = wait_syncs(state, before + 2 + SYNCS, SYNCS * 60 + 180)
        c1, t1 = cpu_seconds(op.pid), time.monotonic()
        assert s1.get("error") is None, s1.get("error")
        assert s1.get("nodeObservation") == ("watch" if watch == "true" else "poll"), s1
        a, b = s0["nodeApi"], s1["nodeApi"]
        return {
            "mode": "watch" if watch == "true" else "poll",
            "seconds": round(t1 - t0, 1),
            "syncs": s1["syncs"] - s0["syncs"],
            "requests": b["requests"] - a["requests"],
            "bytes_sent": b["bytesSent"] - a["bytesSent"],
            "bytes_received": b["bytesReceived"] - a["bytesReceived"],
            "cpu_s": round(c1 - c0, 3),
        }
    finally:
        op.send_signal(signal.SIGTERM)
        op.wait(timeout=60)


def summary(runs, key):
    vals = [r[key] for r in runs]
    return statistics.median(vals), min(vals), max(vals)


def main():
    socks = [start_node(i) for i in range(3)]
    repo = os.path.join(WORK, "repo")
    rev = make_repo(repo)
    state = os.path.join(WORK, "operator")
    t0 = time.monotonic()
    op = operator(socks, repo, state, "false")
    while True:
        s = status(state)
        if s and s.get("lastAppliedRevision") == rev and s.get("error") is None:
            break
        if time.monotonic() - t0 > 1200:
            raise SystemExit(f"no convergence: {s}")
        time.sleep(0.5)
    while running(socks) < N:
        if time.monotonic() - t0 > 1800:
            raise SystemExit(f"only {running(socks)} of {N} running")
        time.sleep(2)
    print(f"setup: {N} workloads running on 3 nodes after {time.monotonic() - t0:.0f} s", flush=True)
    op.send_signal(signal.SIGTERM)
    op.wait(timeout=60)
    per_node = []
    for s in socks:
        out = subprocess.run([NODE, "--socket", s, "get", "-o", "json"], check=True,
                             capture_output=True, text=True).stdout
        per_node.append(len(json.loads(out)))
    print(f"workloads per node: {per_node}", flush=True)
    runs = []
    for r in range(ROUNDS):
        for watch in ("false", "true"):
            m = measure(socks, repo, state, watch)
            m["round"] = r + 1
            runs.append(m)
            print(json.dumps(m), flush=True)
    print()
    print(f"{N} workloads on 3 nodes, {SYNCS} syncs at --interval {INTERVAL} per run, "
          f"{ROUNDS} runs of each mode (median, min-max):")
    res = {}
    for mode in ("poll", "watch"):
        rs = [r for r in runs if r["mode"] == mode]
        res[mode] = {k: summary(rs, k) for k in ("requests", "bytes_sent", "bytes_received", "cpu_s", "seconds")}
        line = ", ".join(f"{k} {v[0]} ({v[1]}-{v[2]})" for k, v in res[mode].items())
        print(f"  {mode:5}: {line}")
    for k in ("requests", "bytes_received", "cpu_s"):
        p, w = res["poll"][k][0], res["watch"][k][0]
        print(f"  watch/poll {k}: {w / p:.3f}" if p else f"  watch/poll {k}: n/a")


main()
