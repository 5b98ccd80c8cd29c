// CSeccomp: the part of libseccomp (Debian's libseccomp-dev, linked statically) that swiftvmm uses
// to put each of its threads in a seccomp filter, and the SIGSYS handler that names a forbidden
// system call before the process ends. The lists themselves live in Sources/Sandbox.
#ifndef CSECCOMP_H
#define CSECCOMP_H

#include <stdint.h>

/// One rule: system call `nr` is allowed (or, with `error` > 0, fails with that errno), and with
/// `arg` >= 0 only when (argument `arg` & `mask`) == `value`. Several rules for one call: any may match.
typedef struct {
    int nr;
    int arg;
    uint64_t mask;
    uint64_t value;
    int error;
} cseccomp_rule;

/// The system call number of `name` on this architecture; -1 if it has none.
int cseccomp_resolve(const char *name);

/// Installs the SIGSYS handler (process-wide, once) that writes one line naming the thread, its
/// role and the system call its filter refused, then ends the process with status 128 + SIGSYS.
/// Also fills the table of system call names it prints from (the handler cannot allocate).
int cseccomp_install_handler(void);

/// Loads a filter on the calling thread only (no TSYNC; the threads it starts later inherit it):
/// `rules` allowed, everything else trapped (SIGSYS, see above), or only logged by the kernel when
/// `log_only`. Sets no_new_privs. `role` and `name` (at most 15 characters each) are kept for the
/// handler's line.
/// Returns 0 or a negative errno.
int cseccomp_load(const cseccomp_rule *rules, int count, int log_only, const char *role, const char *name);

#endif
