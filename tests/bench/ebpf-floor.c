// Loads ebpf-floor.bpf.o, attaches its cgroup_skb programs to a cgroup v2 directory and its
// tp_btf program to its tracepoint, prints "attached" and holds them until it is killed (the
// links are its file descriptors: they go with the process).
//   usage: ebpf-floor OBJECT CGROUP_V2_DIR
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <bpf/libbpf.h>

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s OBJECT CGROUP_V2_DIR\n", argv[0]);
		return 2;
	}
	struct bpf_object *obj = bpf_object__open_file(argv[1], NULL);
	if (!obj) {
		fprintf(stderr, "open %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	if (bpf_object__load(obj)) {
		fprintf(stderr, "load %s: %s\n", argv[1], strerror(errno));
		return 1;
	}
	int cg = open(argv[2], O_RDONLY | O_DIRECTORY);
	if (cg < 0) {
		fprintf(stderr, "open %s: %s\n", argv[2], strerror(errno));
		return 1;
	}
	struct bpf_program *prog;
	bpf_object__for_each_program(prog, obj)
	{
		struct bpf_link *link = bpf_program__type(prog) == BPF_PROG_TYPE_CGROUP_SKB
						? bpf_program__attach_cgroup(prog, cg)
						: bpf_program__attach(prog);
		if (!link) {
			fprintf(stderr, "attach %s: %s\n", bpf_program__name(prog), strerror(errno));
			return 1;
		}
	}
	printf("attached\n");
	fflush(stdout);
	for (;;)
		pause();
}
