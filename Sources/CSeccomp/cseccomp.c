#include "cseccomp.h"

#include <errno.h>
#include <seccomp.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

int cseccomp_resolve(const char *name) {
    int nr = seccomp_syscall_resolve_name(name);
    return nr == __NR_SCMP_ERROR || nr < 0 ? -1 : nr;
}

// Names of system calls 0..511, resolved once before any filter is loaded (libseccomp allocates
// them; the signal handler only reads).
#define NAMES 512
static char *names[NAMES];
static __thread char thread_role[16];
static __thread char thread_name[16];

static size_t put(char *buf, size_t at, size_t cap, const char *s) {
    while (*s && at + 1 < cap) buf[at++] = *s++;
    return at;
}

static size_t put_number(char *buf, size_t at, size_t cap, long n) {
    char digits[24];
    int k = 0;
    unsigned long v = n < 0 ? (unsigned long)-n : (unsigned long)n;
    do { digits[k++] = (char)('0' + v % 10); v /= 10; } while (v && k < 23);
    if (n < 0 && at + 1 < cap) buf[at++] = '-';
    while (k > 0 && at + 1 < cap) buf[at++] = digits[--k];
    return at;
}

// Async-signal-safe: formats into a stack buffer, one write(2), then exit_group. Both calls are on
// every role's list.
static void on_sigsys(int sig, siginfo_t *info, void *context) {
    (void)sig; (void)context;
    char line[256];
    size_t n = 0;
    int nr = info->si_syscall;
    n = put(line, n, sizeof line, "swiftvmm: seccomp: thread ");
    n = put(line, n, sizeof line, thread_name[0] ? thread_name : "?");
    n = put(line, n, sizeof line, " (");
    n = put(line, n, sizeof line, thread_role[0] ? thread_role : "?");
    n = put(line, n, sizeof line, " role) made system call ");
    n = put(line, n, sizeof line, nr >= 0 && nr < NAMES && names[nr] ? names[nr] : "?");
    n = put(line, n, sizeof line, " (");
    n = put_number(line, n, sizeof line, nr);
    n = put(line, n, sizeof line, "), which its filter forbids; stopping (--seccomp off or log to debug)\n");
    ssize_t ignored = write(2, line, n);
    (void)ignored;
    syscall(SYS_exit_group, 128 + SIGSYS);
}

int cseccomp_install_handler(void) {
    static int installed;
    if (installed) return 0;
    for (int i = 0; i < NAMES; i++) names[i] = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, i);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSYS, &sa, NULL) < 0) return -errno;
    installed = 1;
    return 0;
}

int cseccomp_load(const cseccomp_rule *rules, int count, int log_only, const char *role, const char *name) {
    strncpy(thread_role, role, sizeof thread_role - 1);
    strncpy(thread_name, name, sizeof thread_name - 1);
    scmp_filter_ctx ctx = seccomp_init(log_only ? SCMP_ACT_LOG : SCMP_ACT_TRAP);
    if (!ctx) return -ENOMEM;
    int rc = 0;
    for (int i = 0; i < count && rc == 0; i++) {
        uint32_t action = rules[i].error > 0 ? SCMP_ACT_ERRNO((uint32_t)rules[i].error) : SCMP_ACT_ALLOW;
        if (rules[i].arg < 0) {
            rc = seccomp_rule_add(ctx, action, rules[i].nr, 0);
        } else {
            struct scmp_arg_cmp cmp = {
                .arg = (unsigned)rules[i].arg, .op = SCMP_CMP_MASKED_EQ,
                .datum_a = rules[i].mask, .datum_b = rules[i].value,
            };
            rc = seccomp_rule_add_array(ctx, action, rules[i].nr, 1, &cmp);
        }
    }
    if (rc == 0) rc = seccomp_load(ctx);
    seccomp_release(ctx);
    return rc;
}
