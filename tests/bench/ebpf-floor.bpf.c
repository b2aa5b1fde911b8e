// The instrument's floor for tests/bench/ebpf.sh: programs that do nothing, of the two kinds
// the node's programs are (cgroup_skb and tp_btf). With kernel.bpf_stats_enabled, the kernel
// times every program run with two clock reads around it; what it records for these is that
// timing's own cost plus an empty program's call, per run.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

SEC("cgroup_skb/ingress")
int floor_ingress(struct __sk_buff *skb)
{
	return 1;
}

SEC("cgroup_skb/egress")
int floor_egress(struct __sk_buff *skb)
{
	return 1;
}

// The node's busiest tracepoint: the floor for its tp_btf programs.
SEC("tp_btf/sched_switch")
int floor_switch(unsigned long long *ctx)
{
	return 0;
}
