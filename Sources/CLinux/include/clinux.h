// CLinux: small non-variadic wrappers around Linux calls that Swift cannot import directly.
#ifndef CLINUX_H
#define CLINUX_H

#include <stdint.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <pthread.h>

// ioctl(2) is variadic; these fix the third argument's type.
int clinux_ioctl_ptr(int fd, unsigned long request, void *arg);
int clinux_ioctl_ulong(int fd, unsigned long request, unsigned long arg);
int clinux_ioctl_none(int fd, unsigned long request);

// open(2) is variadic too.
int clinux_open(const char *path, int flags, unsigned int mode);

// Installs a handler that does nothing for `signo` without SA_RESTART, so a blocking system call in
// the receiving thread returns EINTR. Used to kick vCPU threads out of KVM_RUN.
int clinux_install_kick_handler(int signo);

// Returns SIGRTMIN + offset (SIGRTMIN is a function call in glibc).
int clinux_sigrtmin(int offset);

// Names the calling thread or another (glibc keeps at most 15 characters).
int clinux_set_thread_name(pthread_t thread, const char *name);

#endif
