#!/usr/bin/env python3
"""Fleet node API benchmarks (run through tests/bench/fleet.sh, which starts the node).

(a) rolling update of 10 replicas (readiness probe, default 25% surge / 25% unavailable):
    time from the apply until the rollout is complete, and the minimum ready count seen by
    following the node's watch (every status change wakes it)
(b) scale 1 -> 50: time from the apply until 50 replicas run; peer: 50 `runc run -d`
"""
import json
import socket
import subprocess
import sys
import time

NODE, SOCK, IMAGE, BUNDLE = sys.argv[1:5]


def get(path):
    s = socket.socket(socket.AF_UNIX)
    s.connect(SOCK)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def apply(doc):
    subprocess.run([NODE, "--socket", SOCK, "apply", "--no-wait", "-f", "-"], input=doc,
                   text=True, check=True, capture_output=True)


def delete(name):
    subprocess.run([NODE, "--socket", SOCK, "delete", name], check=True, capture_output=True)


def follow(name, done, each=lambda w: None, timeout=300):
    """Long-poll the node watch until done(status) holds; returns the status."""
    rv, t0 = 0, time.monotonic()
    while time.monotonic() - t0 < timeout:
        lst = get(f"/v1/workloads?watch=true&after={rv}&timeoutMs=5000")
        rv = lst["resourceVersion"]
        for w in lst["items"]:
            if w["name"] == name:
                each(w)
                if done(w):
                    return w
    raise SystemExit(f"{name}: timed out")


def doc(name, replicas, extra=""):
    return (f"apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata: {{name: {name}}}\n"
            f"spec:\n  image: {IMAGE}\n  replicas: {replicas}\n  terminationGracePeriodSeconds: 0\n{extra}")


def complete(w, gen, n):
    return (w["generation"] == gen and w["observedGeneration"] == gen and w["updatedReplicas"] == n
            and w["availableReplicas"] == n and w["currentReplicas"] == n)


def rolling(n=10):
    probe = ("  readinessProbe:\n    exec: {command: [test, -f, /tmp/ready]}\n    periodSeconds: 0.2\n")
    cmd = "  command: [sh, -c, 'touch /tmp/ready; exec sleep {v}']\n"
    apply(doc("roll", n, cmd.format(v=1000) + probe))
    follow("roll", lambda w: complete(w, 1, n))
    seen = {"min_ready": n, "max_current": 0}

    def each(w):
        if w["generation"] == 2:
            seen["min_ready"] = min(seen["min_ready"], w["readyReplicas"])
            seen["max_current"] = max(seen["max_current"], w["currentReplicas"])

    t0 = time.monotonic()
    apply(doc("roll", n, cmd.format(v=1001) + probe))
    follow("roll", lambda w: complete(w, 2, n), each)
    took = time.monotonic() - t0
    delete("roll")
    return took, seen["min_ready"], seen["max_current"]


def scale(n=50):
    cmd = "  command: [sleep, '1000']\n"
    apply(doc("wide", 1, cmd))
    follow("wide", lambda w: w["readyReplicas"] == 1)
    t0 = time.monotonic()
    apply(doc("wide", n, cmd))
    follow("wide", lambda w: w["readyReplicas"] == n and w["currentReplicas"] == n)
    ours = time.monotonic() - t0
    delete("wide")
    t0 = time.monotonic()
    for i in range(n):
        subprocess.run(["runc", "run", "-d", "--bundle", BUNDLE, f"hb-fleet-{i}"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peer = time.monotonic() - t0
    for i in range(n):
        subprocess.run(["runc", "delete", "-f", f"hb-fleet-{i}"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    return ours, peer


took, min_ready, max_current = rolling()
print(f"(a) rolling update of 10 replicas: {took:.2f} s, min ready {min_ready} "
      f"(bound: 10 - 2 unavailable = 8), max containers {max_current} (bound: 10 + 3 surge = 13)")
ours, peer = scale()
print(f"(b) scale 1 -> 50: {ours:.2f} s; 50 x runc run -d: {peer:.2f} s; ratio {ours/peer:.2f}x")
