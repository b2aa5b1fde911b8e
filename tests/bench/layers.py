#!/usr/bin/env python3
"""Layer store benchmarks, run through tests/bench/layers.sh (registry and big:1 layout made).

The OCI layout gets more tags here, sharing big:1's three layers: `2` adds a layer holding a
3-byte file, `v1`..`v20` each add a 1 MiB layer of their own (a new app version). Then, ROUNDS
times, a fresh node runs with `--image-store flattened` and one with `--image-store layers`:
(a) pull big:1 then big:2: time and growth of the images dir; (c) pull v1..v20 in order:
total time and growth. Each round also times the peers of (b): `skopeo copy` + `umoci unpack`
of big:1, and writing big:1's unpacked bytes once with dd (fsync).
"""
import gzip
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

NODE, REG, LAYOUT, WORK = sys.argv[1:5]
ROUNDS = int(os.environ.get("ROUNDS", "3"))
VERSIONS = int(os.environ.get("VERSIONS", "20"))


def blob(data):
    h = hashlib.sha256(data).hexdigest()
    with open(os.path.join(LAYOUT, "blobs/sha256", h), "wb") as f:
        f.write(data)
    return "sha256:" + h


def read_blob(digest):
    with open(os.path.join(LAYOUT, "blobs/sha256", digest.split(":")[1]), "rb") as f:
        return f.read()


def layer_with(files):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        d = tarfile.TarInfo("app")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 1_700_000_000
        t.addfile(d)
        for name, data in files:
            i = tarfile.TarInfo(name)
            i.size, i.mode, i.mtime = len(data), 0o644, 1_700_000_000
            t.addfile(i, io.BytesIO(data))
    tar = raw.getvalue()
    return gzip.compress(tar, 1, mtime=0), "sha256:" + hashlib.sha256(tar).hexdigest()


def add_tags():
    index = json.load(open(os.path.join(LAYOUT, "index.json")))
    base_desc = next(m for m in index["manifests"]
                     if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "1")
    manifest = json.loads(read_blob(base_desc["digest"]))
    config = json.loads(read_blob(manifest["config"]["digest"]))
    tags = [("2", [("app/v", b"v2\n")])]
    for v in range(1, VERSIONS + 1):
        seed = hashlib.sha256(f"version {v}".encode()).digest()
        data = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(1 << 15))
        tags.append((f"v{v}", [("app/bin", data), ("app/v", f"v{v}\n".encode())]))
    for tag, files in tags:
        gz, diff_id = layer_with(files)
        ld = blob(gz)
        c = json.loads(json.dumps(config))
        c["rootfs"]["diff_ids"] = config["rootfs"]["diff_ids"] + [diff_id]
        c["history"] = c.get("history", []) + [{"created_by": f"bench {tag}"}]
        cb = json.dumps(c).encode()
        m = json.loads(json.dumps(manifest))
        m["config"] = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(cb), "size": len(cb)}
        m["layers"] = manifest["layers"] + [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                             "digest": ld, "size": len(gz)}]
        mb = json.dumps(m).encode()
        index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                   "digest": blob(mb), "size": len(mb),
                                   "annotations": {"org.opencontainers.image.ref.name": tag}})
    json.dump(index, open(os.path.join(LAYOUT, "index.json"), "w"))
    for tag in ["1"] + [t for t, _ in tags]:
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                        f"oci:{LAYOUT}:{tag}", f"docker://{REG}/bench/big:{tag}"], check=True)


def du(path):
    # -x: not into the mounted layers and images (what is on disk, once).
    out = subprocess.run(["du", "-sx", "--block-size=1", path], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out else 0


def unpacked_bytes():
    out = subprocess.run(["du", "-sb", "/usr/include", "/usr/lib/gcc", "/usr/bin"],
                         capture_output=True, text=True).stdout
    return sum(int(l.split()[0]) for l in out.splitlines())


class Node:
    def __init__(self, store, n):
        self.dir = os.path.join(WORK, f"node-{store}-{n}")
        os.makedirs(self.dir)
        self.sock = os.path.join(self.dir, "node.sock")
        self.log = open(os.path.join(self.dir, "node.log"), "w")
        self.p = subprocess.Popen([NODE, "--socket", self.sock, "serve", "--state-dir",
                                   os.path.join(self.dir, "state"), "--run-dir", os.path.join(self.dir, "run"),
                                   "--insecure-registry", REG, "--image-store", store,
                                   "--image-keep-for", "24h", "--cgroup-parent", "/hyperbox-layers-bench"],
                                  stdout=self.log, stderr=self.log)
        for _ in range(100):
            if os.path.exists(self.sock):
                break
            time.sleep(0.1)
        self.images = os.path.join(self.dir, "state", "images")

    def pull(self, tag):
        subprocess.run(["sync"])
        t0 = time.monotonic()
        subprocess.run([NODE, "--socket", self.sock, "pull", f"{REG}/bench/big:{tag}"],
                       check=True, capture_output=True)
        return time.monotonic() - t0

    def stop(self):
        self.p.terminate()
        self.p.wait()
        subprocess.run(f"grep ' {self.dir}' /proc/self/mountinfo | awk '{{print $5}}' | sort -r | "
                       "xargs -r -n1 umount -l", shell=True)
        shutil.rmtree(self.dir, ignore_errors=True)


def peers(n, nbytes):
    d = os.path.join(WORK, f"peer-{n}")
    os.makedirs(d)
    subprocess.run(["sync"])
    t0 = time.monotonic()
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{REG}/bench/big:1",
                    f"oci:{d}/oci:1"], check=True)
    subprocess.run(["umoci", "unpack", "--image", f"{d}/oci:1", f"{d}/bundle"], check=True, capture_output=True)
    skopeo_umoci = time.monotonic() - t0
    shutil.rmtree(d)
    f = os.path.join(WORK, f"dd-{n}")
    subprocess.run(["sync"])
    t0 = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={f}", "bs=1M", f"count={nbytes >> 20}", "conv=fsync"],
                   check=True, capture_output=True)
    dd = time.monotonic() - t0
    os.remove(f)
    return skopeo_umoci, dd


def med(xs):
    return statistics.median(xs), min(xs), max(xs)


def main():
    add_tags()
    nbytes = unpacked_bytes()
    print(f"big:1 is {nbytes / 1e6:.0f} MB unpacked; {VERSIONS} versions; {ROUNDS} rounds", flush=True)
    res = {}
    for n in range(ROUNDS):
        for store in ("flattened", "layers"):
            node = Node(store, n)
            base = du(node.images)
            t1 = node.pull("1")
            d1 = du(node.images) - base
            t2 = node.pull("2")
            d2 = du(node.images) - base - d1
            before = du(node.images)
            t0 = time.monotonic()
            for v in range(1, VERSIONS + 1):
                node.pull(f"v{v}")
            loop = time.monotonic() - t0
            grown = du(node.images) - before
            node.stop()
            r = {"store": store, "round": n + 1, "pull1_s": round(t1, 3), "disk1_mb": d1 / 1e6,
                 "pull2_s": round(t2, 3), "disk2_mb": d2 / 1e6, "loop_s": round(loop, 2),
                 "loop_disk_mb": grown / 1e6}
            print(json.dumps(r), flush=True)
            for k, v in r.items():
                if k not in ("store", "round"):
                    res.setdefault((store, k), []).append(v)
        su, dd = peers(n, nbytes)
        print(json.dumps({"round": n + 1, "skopeo_umoci_s": round(su, 3), "dd_fsync_s": round(dd, 3)}), flush=True)
        res.setdefault(("peer", "skopeo_umoci_s"), []).append(su)
        res.setdefault(("peer", "dd_s"), []).append(dd)
    print()
    print(f"median [min-max] of {ROUNDS} rounds")
    for store in ("flattened", "layers"):
        print(f"  {store}:")
        for k in ("pull1_s", "disk1_mb", "pull2_s", "disk2_mb", "loop_s", "loop_disk_mb"):
            m = med(res[(store, k)])
            print(f"    {k}: {m[0]:.2f} [{m[1]:.2f}-{m[2]:.2f}]")
    su, dd = med(res[("peer", "skopeo_umoci_s")]), med(res[("peer", "dd_s")])
    print(f"  skopeo copy + umoci unpack: {su[0]:.2f} s [{su[1]:.2f}-{su[2]:.2f}]")
    print(f"  dd of {nbytes >> 20} MiB with fsync: {dd[0]:.2f} s [{dd[1]:.2f}-{dd[2]:.2f}]")
    lay = med(res[("layers", "pull1_s")])[0]
    flat = med(res[("flattened", "pull1_s")])[0]
    print(f"  cold big:1, layers: {lay / su[0]:.2f}x skopeo+umoci, {lay / dd[0]:.2f}x dd; "
          f"flattened: {flat / su[0]:.2f}x, {flat / dd[0]:.2f}x")
    print(f"  big:2 after big:1: layers {med(res[('layers', 'pull2_s')])[0]:.2f} s / "
          f"{med(res[('layers', 'disk2_mb')])[0]:.1f} MB, flattened {med(res[('flattened', 'pull2_s')])[0]:.2f} s / "
          f"{med(res[('flattened', 'disk2_mb')])[0]:.0f} MB")
    print(f"  deploy loop of {VERSIONS}: layers {med(res[('layers', 'loop_s')])[0]:.2f} s / "
          f"{med(res[('layers', 'loop_disk_mb')])[0]:.0f} MB, flattened {med(res[('flattened', 'loop_s')])[0]:.2f} s / "
          f"{med(res[('flattened', 'loop_disk_mb')])[0]:.0f} MB")


main()
