// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
//
// HyperBox per-container telemetry, kernel side.
//
// Every event is attributed to a container by its cgroup v2 id: the id of the cgroup one level
// below the runtime's cgroup parent (`parent_cgid` at `parent_level`, set by the loader). Tasks
// and sockets elsewhere on the host are skipped after a couple of loads, so the programs cost
// little outside containers. Counters live in one bounded per-CPU hash map keyed by that id;
// the node runtime reads them, and deletes a container's entry once the container is gone.
//
// Built by node-runtime/build.rs with clang against a vmlinux.h dumped from the running
// kernel's BTF (CO-RE: field offsets are relocated at load time). Loaded with aya. Only
// tracepoints (tp_btf) and cgroup_skb are used: this kernel has no kprobes.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

// Run-queue latency histogram: slot i counts waits in [2^(i-1), 2^i) microseconds (slot 0:
// under 1 us); the last slot takes everything longer.
#define RQ_SLOTS 24
#define MAX_CONTAINERS 16384

// Must match `CgStats` in node-runtime/src/telemetry/ebpf.rs.
struct cg_stats {
	__u64 execs;
	__u64 exits;
	__u64 oom_kills;
	__u64 rx_bytes;
	__u64 rx_packets;
	__u64 tx_bytes;
	__u64 tx_packets;
	__u64 tcp_connects;
	__u64 tcp_accepts;
	__u64 tcp_retransmits;
	__u64 rq_count;
	__u64 rq_sum_ns;
	__u64 rq_slots[RQ_SLOTS];
};

// Set by the loader before load (frozen .rodata: the verifier sees constants).
const volatile __u64 parent_cgid = 0;
const volatile __u32 parent_level = 0;

// Per CPU: a container's packets go in on one CPU and out on another at the same time, and
// one shared entry would bounce between their caches on every packet. The runtime sums the
// CPUs' copies when it reads.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, MAX_CONTAINERS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct cg_stats);
} stats SEC(".maps");

// When a container's task became runnable (woken, or preempted while running): task-local
// storage, freed with the task, so it cannot grow with exited tasks and costs no hashing.
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} runnable SEC(".maps");

static const struct cg_stats zero_stats;

// The container (cgroup v2 id one level below the parent) a cgroup belongs to, or 0.
//
// Hot: it runs on every context switch and wakeup of the host. The pointers come from
// BTF-typed tracepoint arguments, so the walk is plain loads (the verifier guards them), no
// helper calls; tasks outside the parent's subtree are dismissed after reading their level.
static __always_inline __u64 container_of_cgroup(struct cgroup *cg)
{
	if (!cg)
		return 0;
	int level = cg->level;
	if (level <= (int)parent_level)
		return 0;
	if (level == (int)parent_level + 1) {
		// The usual case: the container's own cgroup. Its parent must be ours.
		struct cgroup_subsys_state *up = cg->self.parent;
		if (!up || !up->cgroup || up->cgroup->kn->id != parent_cgid)
			return 0;
		return cg->kn->id;
	}
	// A cgroup nested inside a container: its ancestors at our level and one below.
	unsigned long base = (unsigned long)cg + bpf_core_field_offset(struct cgroup, ancestors);
	struct cgroup *anc = NULL;
	bpf_probe_read_kernel(&anc, sizeof(anc), (void *)(base + parent_level * sizeof(anc)));
	if (!anc || BPF_CORE_READ(anc, kn, id) != parent_cgid)
		return 0;
	anc = NULL;
	bpf_probe_read_kernel(&anc, sizeof(anc), (void *)(base + (parent_level + 1) * sizeof(anc)));
	if (!anc)
		return 0;
	return BPF_CORE_READ(anc, kn, id);
}

static __always_inline __u64 container_of_task(struct task_struct *t)
{
	return container_of_cgroup(t->cgroups->dfl_cgrp);
}

static __always_inline __u64 container_of_sock(const struct sock *sk)
{
	return container_of_cgroup(sk->sk_cgrp_data.cgroup);
}

static __always_inline struct cg_stats *stats_of(__u64 cg)
{
	struct cg_stats *s = bpf_map_lookup_elem(&stats, &cg);
	if (s)
		return s;
	// A full map refuses the entry: that container goes uncounted rather than evicting another.
	bpf_map_update_elem(&stats, &cg, &zero_stats, BPF_NOEXIST);
	return bpf_map_lookup_elem(&stats, &cg);
}

#define COUNT(cg, field, n)                                        \
	do {                                                       \
		struct cg_stats *__s = stats_of(cg);               \
		if (__s)                                           \
			__sync_fetch_and_add(&__s->field, (n));    \
	} while (0)

SEC("tp_btf/sched_process_exec")
int BPF_PROG(hb_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	__u64 cg = container_of_task(p);
	if (cg)
		COUNT(cg, execs, 1);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(hb_exit, struct task_struct *p)
{
	// A process, not a thread: only the thread-group leader's exit counts.
	if (p->pid != p->tgid)
		return 0;
	__u64 cg = container_of_task(p);
	if (cg)
		COUNT(cg, exits, 1);
	return 0;
}

SEC("tp_btf/mark_victim")
int BPF_PROG(hb_oom, struct task_struct *task)
{
	__u64 cg = container_of_task(task);
	if (cg)
		COUNT(cg, oom_kills, 1);
	return 0;
}

static __always_inline void became_runnable(struct task_struct *p)
{
	if (!container_of_task(p))
		return;
	__u64 *since = bpf_task_storage_get(&runnable, p, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (since)
		*since = bpf_ktime_get_ns();
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(hb_wakeup, struct task_struct *p)
{
	became_runnable(p);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(hb_wakeup_new, struct task_struct *p)
{
	became_runnable(p);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(hb_switch, bool preempt, struct task_struct *prev, struct task_struct *next,
	     unsigned int prev_state)
{
	// Preempted while running (state TASK_RUNNING): it waits in the run queue from now.
	if (prev_state == 0)
		became_runnable(prev);
	__u64 cg = container_of_task(next);
	if (!cg)
		return 0;
	__u64 *since = bpf_task_storage_get(&runnable, next, 0, 0);
	if (!since || !*since)
		return 0;
	__u64 now = bpf_ktime_get_ns();
	__u64 wait = now > *since ? now - *since : 0;
	*since = 0;
	struct cg_stats *s = stats_of(cg);
	if (!s)
		return 0;
	__u64 us = wait / 1000;
	__u32 slot = 0;
	while (us && slot < RQ_SLOTS - 1) {
		us >>= 1;
		slot++;
	}
	// Plain adds: the entry is this CPU's, and sched_switch runs with interrupts off, so
	// nothing else on this CPU can be halfway through an update of these fields.
	s->rq_count += 1;
	s->rq_sum_ns += wait;
	if (slot < RQ_SLOTS)
		s->rq_slots[slot] += 1;
	return 0;
}

SEC("tp_btf/inet_sock_set_state")
int BPF_PROG(hb_sock_state, const struct sock *sk, const int oldstate, const int newstate)
{
	if (sk->sk_protocol != IPPROTO_TCP)
		return 0;
	int connect = newstate == TCP_SYN_SENT;
	int accept = oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED;
	if (!connect && !accept)
		return 0;
	// A passive socket inherits its listener's cgroup: the accept is the listener's.
	__u64 cg = container_of_sock(sk);
	if (!cg)
		return 0;
	if (connect)
		COUNT(cg, tcp_connects, 1);
	else
		COUNT(cg, tcp_accepts, 1);
	return 0;
}

SEC("tp_btf/tcp_retransmit_skb")
int BPF_PROG(hb_retransmit, const struct sock *sk)
{
	// Kernels whose event records the transmit's error fire it for retransmits that did not
	// go out too (the original still queued, a local drop). Only those that went out count
	// here; the kernel's RetransSegs counts the failed attempts as well (and TCPRetransFail
	// counts them again). The field check is a CO-RE constant, so older kernels, whose
	// tracepoint has no third argument, never read one.
	if (bpf_core_field_exists(struct trace_event_raw_tcp_retransmit_skb, err) && (int)ctx[2])
		return 0;
	__u64 cg = container_of_sock(sk);
	if (cg)
		COUNT(cg, tcp_retransmits, 1);
	return 0;
}

// Attached once to the cgroup parent, so they run only for sockets below it; the socket's
// cgroup one level below the parent says which container. They only count: 1 lets every
// packet through.
static __always_inline void count_skb(struct __sk_buff *skb, int egress)
{
	__u64 cg = bpf_skb_ancestor_cgroup_id(skb, parent_level + 1);
	if (!cg)
		return;
	struct cg_stats *s = stats_of(cg);
	if (!s)
		return;
	if (egress) {
		__sync_fetch_and_add(&s->tx_bytes, skb->len);
		__sync_fetch_and_add(&s->tx_packets, 1);
	} else {
		__sync_fetch_and_add(&s->rx_bytes, skb->len);
		__sync_fetch_and_add(&s->rx_packets, 1);
	}
}

SEC("cgroup_skb/ingress")
int hb_ingress(struct __sk_buff *skb)
{
	count_skb(skb, 0);
	return 1;
}

SEC("cgroup_skb/egress")
int hb_egress(struct __sk_buff *skb)
{
	count_skb(skb, 1);
	return 1;
}
