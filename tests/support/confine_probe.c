/* Tries what a container must not be able to do and prints "name=errno" (0 = allowed).
   Built static by the e2e tests and run inside a HyperBox container. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <unistd.h>

static void report(const char *name, long r) {
    printf("%s=%d\n", name, r < 0 ? errno : 0);
}

int main(void) {
    report("unshare_user", unshare(CLONE_NEWUSER));
    report("unshare_mount", unshare(CLONE_NEWNS));
    /* clone with a namespace flag, straight to the syscall (no glibc wrapper choices). */
    long c = syscall(SYS_clone, CLONE_NEWNET | SIGCHLD, 0, 0, 0, 0);
    if (c == 0) _exit(0);
    if (c > 0) waitpid((pid_t)c, 0, 0);
    report("clone_newnet", c);
    /* A plain fork must work. */
    long f = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
    if (f == 0) _exit(0);
    if (f > 0) waitpid((pid_t)f, 0, 0);
    report("clone_plain", f);
    report("clone3", syscall(435, 0, 0));
    report("io_uring_setup", syscall(425, 1, 0));
    report("bpf", syscall(SYS_bpf, 0, 0, 0));
    report("perf_event_open", syscall(SYS_perf_event_open, 0, 0, -1, -1, 0));
    report("keyctl", syscall(SYS_keyctl, 0, 0, 0, 0, 0));
    report("add_key", syscall(SYS_add_key, 0, 0, 0, 0, 0));
    report("mount_setattr", syscall(442, -1, 0, 0, 0, 0));
    int s = socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
    report("raw_socket", s);
    fflush(stdout);
    pause();
    return 0;
}
