#!/usr/bin/env python3
"""eBPF telemetry overhead: the same node runtime with `--ebpf auto` (programs attached) and
`--ebpf off`, alternating, on the same machine in the same run.

Per run and mode, a fresh node runs, in containers:
  - exec:  a shell that execs /bin/true EXECS times (each a fork and a real execve, both seen
           by the exec, exit, wakeup and switch programs); its own clock (/proc/uptime) gives
           exec/s, and /proc/stat gives the CPU time the whole machine used meanwhile
  - net:   busybox httpd and wget in one container: NET_MIB MiB over loopback, NET_ROUNDS times
           (every packet passes the cgroup_skb programs twice, the TCP ones see each
           connection); MiB/s from the container's clock, machine CPU from /proc/stat
  - idle:  IDLE_S seconds with 10 sleeping containers and /metrics scraped every second:
           the machine's CPU time (the daemon's sampling and exporting, and the programs on
           whatever else runs)
Then the daemon's memory (VmHWM, and the eBPF maps' memlock from its fdinfo) with 100 and 1,000
sleeping containers.

The programs' own run time comes from the kernel's bpf_stats, which time every run with two
clock reads. A third mode, "floor", measures what that timing costs: the node with `--ebpf off`
and, attached next to it, programs that do nothing (ebpf-floor.bpf.c: cgroup_skb on the
containers' parent and tp_btf on sched_switch). Their time per run, by program type, is
subtracted from the node's programs' runs of that type for the figure "less the floor".

Prints a table of medians with each run's figure, and the on/off ratios.
usage: ebpf.py NODE_BIN IMAGE WORK RUNS FLOOR_LOADER FLOOR_OBJECT
"""
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

from benchlib import free_port

node_bin, image, work, runs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
floor_loader, floor_object = sys.argv[5], sys.argv[6]
EXECS = int(os.environ.get("EXECS", "10000"))
NET_MIB = int(os.environ.get("NET_MIB", "256"))
NET_ROUNDS = int(os.environ.get("NET_ROUNDS", "16"))
IDLE_S = int(os.environ.get("IDLE_S", "20"))
COUNTS = [int(c) for c in os.environ.get("COUNTS", "100,1000").split(",") if c]
HZ = os.sysconf("SC_CLK_TCK")
# bpf_prog_type numbers in fdinfo
PROG_TYPES = {8: "cgroup_skb", 26: "tp_btf"}


def v2_root():
    for line in open("/proc/mounts"):
        f = line.split()
        if f[2] == "cgroup2":
            return f[1]
    raise SystemExit("no cgroup v2 mount")


def busy_seconds():
    """CPU time the whole machine spent not idle (all cpus), from /proc/stat."""
    f = open("/proc/stat").readline().split()[1:]
    v = [int(x) for x in f]
    idle = v[3] + v[4]  # idle + iowait
    return (sum(v[:8]) - idle) / HZ


class Node:
    """mode: auto (programs on), off, or floor (off, with the empty programs attached)."""

    def __init__(self, mode, tag):
        self.dir = os.path.join(work, f"{tag}-{mode}")
        os.makedirs(self.dir, exist_ok=True)
        self.sock = os.path.join(self.dir, "node.sock")
        self.metrics = f"127.0.0.1:{free_port()}"
        self.parent = f"/hyperbox-ebpf-bench-{tag}-{mode}"
        self.log = open(os.path.join(self.dir, "node.log"), "w")
        self.proc = subprocess.Popen(
            [node_bin, "--socket", self.sock, "serve", "--state-dir", os.path.join(self.dir, "state"),
             "--run-dir", os.path.join(self.dir, "run"), "--cgroup-parent", self.parent,
             "--insecure-registry", image.split("/")[0], "--metrics-listen", self.metrics,
             "--ebpf", "off" if mode == "floor" else mode, "--pressure-admission", "off", "--pressure-protection", "off",
             "--reserve", "cpu=0,memory=0"],
            stdout=self.log, stderr=self.log)
        for _ in range(300):
            if os.path.exists(self.sock):
                break
            time.sleep(0.1)
        n = json.loads(self.cli("node", "-o", "json"))
        want = mode == "auto"
        if n["features"]["ebpf"] != want:
            raise SystemExit(f"node with --ebpf {mode}: features {n['features']}")
        self.floor = None
        self.stats_pid = self.proc.pid
        if mode == "floor":
            cg = v2_root() + self.parent
            os.makedirs(cg, exist_ok=True)
            self.floor = subprocess.Popen([floor_loader, floor_object, cg], stdout=subprocess.PIPE, text=True)
            if self.floor.stdout.readline().strip() != "attached":
                raise SystemExit("the floor programs did not attach")
            self.stats_pid = self.floor.pid

    def cli(self, *args, check=True):
        return subprocess.run([node_bin, "--socket", self.sock, *args], check=check,
                              capture_output=True, text=True).stdout

    def apply(self, docs):
        path = os.path.join(self.dir, f"apply-{time.monotonic_ns()}.yaml")
        open(path, "w").write("\n---\n".join(docs))
        self.cli("apply", "--no-wait", "-f", path)

    def get(self, name):
        out = subprocess.run([node_bin, "--socket", self.sock, "get", name, "-o", "json"],
                             capture_output=True, text=True)
        return json.loads(out.stdout) if out.returncode == 0 else None

    def wait(self, name, pred, timeout=600):
        end = time.time() + timeout
        while time.time() < end:
            v = self.get(name)
            if v and pred(v):
                return v
            time.sleep(0.2)
        raise SystemExit(f"timed out waiting for {name}: {self.get(name)}")

    def logs(self, name):
        return self.cli("logs", name, check=False)

    def scrape(self):
        return urllib.request.urlopen(f"http://{self.metrics}/metrics", timeout=30).read()

    def status(self, key):
        for l in open(f"/proc/{self.proc.pid}/status"):
            if l.startswith(key + ":"):
                return int(l.split()[1]) * 1024
        return 0

    def fdinfos(self, kind):
        """The fdinfo fields (name: int) of the file descriptors with `kind` (`prog_type` for
        programs, links excluded; `map_type` for maps) of the daemon, or in floor mode of the
        floor's loader."""
        out = []
        for fd in os.listdir(f"/proc/{self.stats_pid}/fdinfo"):
            try:
                t = open(f"/proc/{self.stats_pid}/fdinfo/{fd}").read()
            except OSError:
                continue
            if f"{kind}:" in t and "link_type:" not in t:
                out.append({l.split(":")[0]: int(l.split()[1]) for l in t.splitlines()
                            if len(l.split()) == 2 and l.split()[1].isdigit()})
        return out

    def prog_stats(self):
        """Per program type: [run time ns, runs] (kernel.bpf_stats_enabled must be 1)."""
        out = {}
        for f in self.fdinfos("prog_type"):
            t = out.setdefault(PROG_TYPES.get(f["prog_type"], str(f["prog_type"])), [0, 0])
            t[0] += f.get("run_time_ns", 0)
            t[1] += f.get("run_cnt", 0)
        return out

    def map_memlock(self):
        return sum(f.get("memlock", 0) for f in self.fdinfos("map_type"))

    def stop(self):
        if self.floor:
            self.floor.kill()
            self.floor.wait()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # The daemon leaves containers running on purpose (they survive restarts): kill and
        # remove them through their cgroups.
        for root, dirs, _ in os.walk("/sys/fs/cgroup"):
            if os.path.basename(root) == self.parent.strip("/"):
                for d in dirs:
                    try:
                        open(os.path.join(root, d, "cgroup.kill"), "w").write("1")
                    except OSError:
                        for p in open(os.path.join(root, d, "cgroup.procs")).read().split():
                            try:
                                os.kill(int(p), 9)
                            except OSError:
                                pass
                dirs[:] = []
        time.sleep(0.5)
        subprocess.run(["bash", "-c", f"grep ' {self.dir}' /proc/self/mountinfo | awk '{{print $5}}' | sort -r | xargs -r -n1 umount -l"], check=False)
        for base in os.listdir("/sys/fs/cgroup"):
            p = os.path.join("/sys/fs/cgroup", base, self.parent.strip("/"))
            if os.path.isdir(p):
                for d in os.listdir(p):
                    if os.path.isdir(os.path.join(p, d)):
                        try:
                            os.rmdir(os.path.join(p, d))
                        except OSError:
                            pass
                try:
                    os.rmdir(p)
                except OSError:
                    pass


def workload(name, command, extra=""):
    return (f"apiVersion: hyperbox.dev/v1alpha1\nkind: Workload\nmetadata:\n  name: {name}\n"
            f"spec:\n  image: {image}\n  command: [sh, -c, '{command}']\n"
            f"  restartPolicy: Never\n  terminationGracePeriodSeconds: 0\n{extra}")


CLOCK = "read t0 r < /proc/uptime; "
DONE = "read t1 r < /proc/uptime; echo elapsed $t0 $t1"


def elapsed(node, name):
    node.wait(name, lambda v: v["phase"] in ("Succeeded", "Failed"))
    for l in node.logs(name).splitlines():
        if l.startswith("elapsed "):
            _, a, b = l.split()
            # /proc/uptime ticks in hundredths: keep sizes so that runs take seconds.
            return max(float(b) - float(a), 0.01)
    raise SystemExit(f"{name}: no timing in its log: {node.logs(name)}")


def delta(after, before):
    return {t: [a[0] - before.get(t, [0, 0])[0], a[1] - before.get(t, [0, 0])[1]] for t, a in after.items()}


def one_run(mode, i):
    node = Node(mode, f"r{i}")
    try:
        out = {}
        node.apply([workload("warm", "true")])
        node.wait("warm", lambda v: v["phase"] == "Succeeded")
        # exec-heavy
        b0, p0 = busy_seconds(), node.prog_stats()
        node.apply([workload("exec", CLOCK + f"i=0; while [ $i -lt {EXECS} ]; do /bin/true; i=$((i+1)); done; " + DONE)])
        t = elapsed(node, "exec")
        out["exec_per_s"] = EXECS / t
        out["exec_machine_cpu_s"] = busy_seconds() - b0
        out["exec_bpf"] = delta(node.prog_stats(), p0)
        # network-heavy: the file is made and written back first (writeback would otherwise
        # land in the middle of the transfers), then only the transfers are timed
        b0, p0 = busy_seconds(), node.prog_stats()
        node.apply([workload(
            "net",
            f"mkdir -p /tmp/www && head -c {NET_MIB << 20} /dev/zero > /tmp/www/f && sync && httpd -p 127.0.0.1:8080 -h /tmp/www && "
            + CLOCK + f"for i in $(seq {NET_ROUNDS}); do wget -q -O /dev/null http://127.0.0.1:8080/f; done; " + DONE,
            "  network: none\n")])
        t = elapsed(node, "net")
        out["net_mib_per_s"] = NET_MIB * NET_ROUNDS / t
        out["net_machine_cpu_s"] = busy_seconds() - b0
        out["net_bpf"] = delta(node.prog_stats(), p0)
        # idle with 10 containers, scraped every second
        node.apply([workload(f"idle{k}", "exec sleep 3600") for k in range(10)])
        for k in range(10):
            node.wait(f"idle{k}", lambda v: v["phase"] == "Running")
        time.sleep(3)
        b0, p0 = busy_seconds(), node.prog_stats()
        end = time.time() + IDLE_S
        while time.time() < end:
            node.scrape()
            time.sleep(1)
        out["idle_machine_cpu_pct"] = (busy_seconds() - b0) / IDLE_S * 100
        out["idle_bpf"] = delta(node.prog_stats(), p0)
        return out
    finally:
        node.stop()


def memory(mode, count):
    node = Node(mode, f"m{count}")
    try:
        docs = [workload(f"s{k}", "exec sleep 3600").replace("restartPolicy: Never", "restartPolicy: Always")
                for k in range(count)]
        for k in range(0, count, 100):
            node.apply(docs[k:k + 100])
        end = time.time() + 900
        while time.time() < end:
            lst = json.loads(node.cli("get", "-o", "json"))
            if sum(1 for w in lst if w["phase"] == "Running") == count:
                break
            time.sleep(1)
        else:
            raise SystemExit(f"{count} containers did not all start")
        for _ in range(5):
            node.scrape()
            time.sleep(1)
        text = node.scrape().decode()
        entries = [l for l in text.splitlines() if l.startswith("hyperbox_ebpf_map_entries")]
        return {"rss_mib": node.status("VmRSS") / 2**20, "hwm_mib": node.status("VmHWM") / 2**20,
                "maps_kib": node.map_memlock() / 1024,
                "map_entries": entries[0].split()[-1] if entries else "-",
                "metrics_kib": len(text) / 1024}
    finally:
        node.stop()


# The programs' own run time is counted by the kernel only with bpf_stats on (two clock reads
# per program run, on in every mode so that all pay it).
stats_path = "/proc/sys/kernel/bpf_stats_enabled"
stats_before = open(stats_path).read().strip()
open(stats_path, "w").write("1")
modes = ["auto", "off", "floor"]
results = {m: [] for m in modes}
for i in range(runs):
    # Rotate which goes first, so drift in the machine's load hits all.
    for mode in modes[i % 3:] + modes[:i % 3]:
        r = one_run(mode, i)
        results[mode].append(r)
        print(f"run {i + 1} {mode}: " + json.dumps(r), file=sys.stderr, flush=True)


open(stats_path, "w").write(stats_before)


def med(mode, k):
    return statistics.median(r[k] for r in results[mode])


def spread(mode, k):
    return ", ".join(f"{r[k]:.2f}" for r in results[mode])


def run_ns(stats):
    return sum(v[0] for v in stats.values())


def floor_ns(stats, floor):
    """The run time less, per program type, the runs times the floor's time per run."""
    total = 0
    for t, (ns, cnt) in stats.items():
        f = floor.get(t, [0, 0])
        per_run = f[0] / f[1] if f[1] else 0
        total += max(ns - cnt * per_run, 0)
    return total


print(f"eBPF telemetry on (--ebpf auto) vs off, {runs} runs each, rotating; medians, each run in brackets")
rows = [
    ("exec_per_s", f"exec-heavy: exec/s ({EXECS} execs)", True),
    ("exec_machine_cpu_s", "  machine CPU s for them", False),
    ("net_mib_per_s", f"network-heavy: loopback MiB/s ({NET_ROUNDS}x{NET_MIB} MiB)", True),
    ("net_machine_cpu_s", "  machine CPU s for them", False),
    ("idle_machine_cpu_pct", f"idle, 10 containers, 1 scrape/s: machine CPU %", False),
]
for k, label, higher_better in rows:
    on, off = med("auto", k), med("off", k)
    print(f"  {label}: on {on:.2f} [{spread('auto', k)}], off {off:.2f} [{spread('off', k)}], on/off {on / off:.3f}")


def listed(xs, fmt):
    return f"{statistics.median(xs):{fmt}} [{', '.join(f'{x:{fmt}}' for x in xs)}]"


for phase, label in [("exec", "exec-heavy"), ("net", "network-heavy")]:
    auto, floor = results["auto"], results["floor"]
    machine = [r[f"{phase}_machine_cpu_s"] * 1e9 for r in auto]
    raw = [run_ns(r[f"{phase}_bpf"]) for r in auto]
    less = [floor_ns(a[f"{phase}_bpf"], f[f"{phase}_bpf"]) for a, f in zip(auto, floor)]
    per_run = {t: [f[f"{phase}_bpf"][t][0] / max(f[f"{phase}_bpf"][t][1], 1) for f in floor]
               for t in floor[0][f"{phase}_bpf"]}
    ours = {t: [a[f"{phase}_bpf"].get(t, [0, 1])[0] / max(a[f"{phase}_bpf"].get(t, [0, 1])[1], 1) for a in auto]
            for t in per_run}
    runs_of = {t: [a[f"{phase}_bpf"].get(t, [0, 0])[1] for a in auto] for t in per_run}
    print(f"  the programs' own run time, {label}: {listed([x / 1e6 for x in raw], '.1f')} ms, "
          f"{listed([x / m * 100 for x, m in zip(raw, machine)], '.2f')}% of the machine's CPU time")
    for t in per_run:
        print(f"    {t}: {listed(runs_of[t], '.0f')} runs at {listed(ours[t], '.0f')} ns; "
              f"an empty program (the floor) {listed(per_run[t], '.0f')} ns a run")
    print(f"    less the floor: {listed([x / 1e6 for x in less], '.1f')} ms, "
          f"{listed([x / m * 100 for x, m in zip(less, machine)], '.2f')}% of the machine's CPU time")
idle = [run_ns(r["idle_bpf"]) / 1e9 / IDLE_S * 100 for r in results["auto"]]
print(f"  the programs' own run time at idle: {listed(idle, '.3f')}% of one CPU")
for count in COUNTS:
    for mode in ["auto", "off"]:
        m = memory(mode, count)
        print(f"  daemon memory, {count} containers, ebpf {mode}: RSS {m['rss_mib']:.1f} MiB (peak {m['hwm_mib']:.1f}), "
              f"eBPF maps {m['maps_kib']:.0f} KiB memlock, map entries {m['map_entries']}, /metrics {m['metrics_kib']:.0f} KiB", flush=True)
