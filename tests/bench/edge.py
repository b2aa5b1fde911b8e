#!/usr/bin/env python3
"""Edge GitOps benchmarks (run through tests/bench/edge.sh, which builds and starts the peers).

(a) git push -> container running, through the signed webhook, image cached: median of N pushes
(b) one sync of a repo with 1,000 and 10,000 Workload files (time, peak RSS of the operator),
    and a no-change sync of the same repo
(c) the operator's fetch of those repos against a plain `git fetch` into an empty repository
"""
import hashlib
import hmac
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import free_port

NODE, OP, SOCK, IMAGE, WORK = sys.argv[1:6]
PUSHES = int(os.environ.get("PUSHES", "15"))
SIZES = [int(s) for s in os.environ.get("SIZES", "1000,10000").split(",")]
GIT_ENV = dict(os.environ, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@hyperbox.invalid",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="b@hyperbox.invalid")


def git(*args, cwd=None):
    return subprocess.run(["git", *args], cwd=cwd, env=GIT_ENV, check=True,
                          capture_output=True, text=True).stdout.strip()


def node(*args):
    return subprocess.run([NODE, "--socket", SOCK, *args], check=True, capture_output=True, text=True).stdout


def doc(name, extra=""):
    return (f"apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\n"
            f"spec:\n  image: {IMAGE}\n  command: [sleep, '100000']\n"
            f"  terminationGracePeriodSeconds: 0\n{extra}")


def make_repo(path, n, suspended):
    os.makedirs(path)
    git("init", "-q", "-b", "main", path)
    extra = "  suspend: true\n" if suspended else ""
    for i in range(n):
        d = os.path.join(path, "apps", f"{i % 100:02d}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"w{i}.yaml"), "w") as f:
            f.write(doc(f"w{i}", extra))
    git("add", "-A", cwd=path)
    git("commit", "-q", "--allow-empty", "-m", f"{n} workloads", cwd=path)
    return git("rev-parse", "HEAD", cwd=path)


def post(addr, body, secret):
    sig = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    host, port = addr.split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /hook HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
              + f"Content-Length: {len(body)}\r\nX-Hub-Signature-256: {sig}\r\n\r\n".encode() + body)
    resp = s.recv(100)
    s.close()
    assert b" 202 " in resp, resp


def workload(name):
    out = subprocess.run([NODE, "--socket", SOCK, "get", name, "-o", "json"], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def bench_webhook():
    tmp = tempfile.mkdtemp(dir=WORK)
    repo = os.path.join(tmp, "repo")
    make_repo(repo, 0, False)
    secret = b"bench-secret"
    with open(os.path.join(tmp, "secret"), "wb") as f:
        f.write(secret)
    hook = f"127.0.0.1:{free_port()}"
    log = open(os.path.join(tmp, "operator.log"), "w")
    op = subprocess.Popen([OP, "git", "--repo", f"file://{repo}", "--branch", "main", "--interval", "1h",
                           "--node", f"unix://{SOCK}", "--state-dir", os.path.join(tmp, "state"),
                           "--webhook-listen", hook, "--webhook-secret-file", os.path.join(tmp, "secret")],
                          stdout=log, stderr=log)
    try:
        for _ in range(100):
            try:
                socket.create_connection(tuple([hook.split(":")[0], int(hook.split(":")[1])])).close()
                break
            except OSError:
                time.sleep(0.05)
        latencies = []
        for i in range(PUSHES):
            with open(os.path.join(repo, f"w{i}.yaml"), "w") as f:
                f.write(doc(f"hook{i}"))
            git("add", "-A", cwd=repo)
            git("commit", "-q", "-m", f"push {i}", cwd=repo)
            rev = git("rev-parse", "HEAD", cwd=repo)
            t0 = time.monotonic()
            # The Git server's post-receive hook would send this; the push is local and instant.
            post(hook, json.dumps({"ref": "refs/heads/main", "after": rev}).encode(), secret)
            while True:
                w = workload(f"hook{i}")
                if w and w["phase"] == "Running" and w.get("revision") == rev and w["replicas"] and w["replicas"][0].get("pid"):
                    break
                time.sleep(0.002)
            latencies.append(time.monotonic() - t0)
        for i in range(PUSHES):
            node("delete", f"hook{i}")
        return latencies
    finally:
        op.terminate()
        op.wait()


def run_sync(url, state):
    """One `hyperbox-operator git --once`; returns (seconds, peak RSS MiB, log)."""
    t0 = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb=%M", OP, "git", "--once", "--repo", url,
                        "--branch", "main", "--node", f"unix://{SOCK}", "--state-dir", state],
                       capture_output=True, text=True, env=dict(os.environ, RUST_LOG="info,hyperbox_operator=debug"))
    dt = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-2000:]
    rss_kb = int(re.findall(r"maxrss_kb=(\d+)", p.stderr)[-1])
    return dt, rss_kb / 1024, p.stderr


def git_daemon(base):
    port = free_port()
    d = subprocess.Popen(["git", "daemon", "--reuseaddr", "--export-all", "--listen=127.0.0.1",
                          f"--port={port}", f"--base-path={base}", base],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            break
        except OSError:
            time.sleep(0.05)
    return d, port


def fetch_compare(url, tmp, rounds=5):
    """Fetch-only timings, alternating sides, each into a fresh repository: the operator
    (process start, shallow git2 fetch into its bare repo; it then stops at an unreachable
    node) against `git fetch` and `git fetch --depth=1` processes. Medians, in seconds."""
    ours, full, shallow = [], [], []
    for i in range(rounds):
        d = os.path.join(tmp, f"fetch{i}")
        os.makedirs(d)
        git("init", "-q", "--bare", os.path.join(d, "a.git"))
        git("init", "-q", "--bare", os.path.join(d, "b.git"))
        t0 = time.monotonic()
        git("-C", os.path.join(d, "a.git"), "fetch", "-q", url, "+refs/heads/main:refs/heads/main")
        full.append(time.monotonic() - t0)
        t0 = time.monotonic()
        git("-C", os.path.join(d, "b.git"), "fetch", "-q", "--depth=1", url, "+refs/heads/main:refs/heads/main")
        shallow.append(time.monotonic() - t0)
        t0 = time.monotonic()
        p = subprocess.run([OP, "git", "--once", "--repo", url, "--branch", "main", "--node",
                            "unix:///nonexistent/hyperbox.sock", "--state-dir", os.path.join(d, "op")],
                           capture_output=True, text=True)
        ours.append(time.monotonic() - t0)
        assert "connect to node api" in p.stderr, p.stderr[-1000:]
    return statistics.median(ours), statistics.median(full), statistics.median(shallow)


def bench_sync(n):
    tmp = tempfile.mkdtemp(dir=WORK)
    repo = os.path.join(tmp, "repo")
    make_repo(repo, n, True)
    # Both fetches go through the same server (git daemon, the git:// protocol), as an edge
    # box would fetch from a remote; and nothing else is left dirty for the node's flush.
    daemon, port = git_daemon(tmp)
    url = f"git://127.0.0.1:{port}/repo"
    os.sync()
    try:
        state = os.path.join(tmp, "state")
        full, rss, log = run_sync(url, state)
        m = re.search(r"fetch_ms=(\d+) parse_ms=(\d+) node_ms=(\d+)", log)
        phases = m.groups() if m else ("?", "?", "?")
        nochange, _, log2 = run_sync(url, state)
        assert "no change" in log2, log2[-2000:]
        ours_f, git_f, git_shallow = fetch_compare(url, tmp)
    finally:
        os.killpg(daemon.pid, 9)
        daemon.wait()
    # Clean the node for the next size.
    names = [w["name"] for w in json.loads(node("get", "-o", "json"))]
    for name in names:
        node("delete", name)
    shutil.rmtree(tmp, ignore_errors=True)
    return dict(n=n, full=full, rss=rss, nochange=nochange, fetch_ms=phases[0], parse_ms=phases[1],
                node_ms=phases[2], ours_fetch=ours_f, git_fetch=git_f, git_fetch_shallow=git_shallow)


def main():
    lat = bench_webhook()
    med = statistics.median(lat)
    print(f"(a) push -> running via webhook, {len(lat)} pushes: median {med*1000:.0f} ms, "
          f"min {min(lat)*1000:.0f} ms, max {max(lat)*1000:.0f} ms "
          f"(Flux default poll 1 min, Argo CD 3 min)")
    rows = [bench_sync(n) for n in SIZES]
    print()
    print("| files | full sync | (fetch / parse+diff / node apply) | peak RSS | no-change sync | no-change / full | fetch only: ours | `git fetch` | `git fetch --depth=1` | ours / `--depth=1` |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["nochange"] / r["full"]
        fetch_ratio = r["ours_fetch"] / r["git_fetch_shallow"]
        print(f"| {r['n']:,} | {r['full']:.2f} s | {r['fetch_ms']} / {r['parse_ms']} / {r['node_ms']} ms "
              f"| {r['rss']:.0f} MiB | {r['nochange']*1000:.0f} ms | {ratio*100:.1f}% | {r['ours_fetch']*1000:.0f} ms "
              f"| {r['git_fetch']*1000:.0f} ms | {r['git_fetch_shallow']*1000:.0f} ms | {fetch_ratio:.2f}x |")


main()
