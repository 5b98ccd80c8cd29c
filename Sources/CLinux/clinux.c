#include "clinux.h"

#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>

int clinux_ioctl_ptr(int fd, unsigned long request, void *arg) { return ioctl(fd, request, arg); }
int clinux_ioctl_ulong(int fd, unsigned long request, unsigned long arg) { return ioctl(fd, request, arg); }
int clinux_ioctl_none(int fd, unsigned long request) { return ioctl(fd, request, 0); }
int clinux_open(const char *path, int flags, unsigned int mode) { return open(path, flags, (mode_t)mode); }

static void clinux_kick_handler(int signo) { (void)signo; }

int clinux_install_kick_handler(int signo) {
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = clinux_kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; // no SA_RESTART: KVM_RUN must return EINTR
    return sigaction(signo, &sa, 0);
}

int clinux_sigrtmin(int offset) { return SIGRTMIN + offset; }

int clinux_set_thread_name(pthread_t thread, const char *name) { return pthread_setname_np(thread, name); }
