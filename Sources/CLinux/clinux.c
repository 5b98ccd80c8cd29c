#include "clinux.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <spawn.h>
#include <unistd.h>

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

// Unix stream sockets and descriptor passing (SCM_RIGHTS), for the QMP monitor.

static int clinux_unix_address(struct sockaddr_un *addr, const char *path) {
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof(addr->sun_path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memset(addr, 0, sizeof(*addr));
    addr->sun_family = AF_UNIX;
    memcpy(addr->sun_path, path, n + 1);
    return 0;
}

int clinux_unix_bind(int fd, const char *path) {
    struct sockaddr_un addr;
    if (clinux_unix_address(&addr, path) < 0) return -1;
    return bind(fd, (struct sockaddr *)&addr, sizeof(addr));
}

int clinux_unix_connect(int fd, const char *path) {
    struct sockaddr_un addr;
    if (clinux_unix_address(&addr, path) < 0) return -1;
    return connect(fd, (struct sockaddr *)&addr, sizeof(addr));
}

long clinux_recv_fds(int sock, void *buf, size_t len, int flags, int *fds, int maxfds, int *nfds) {
    union {
        char buf[CMSG_SPACE(sizeof(int) * CLINUX_MAX_PASSED_FDS)];
        struct cmsghdr align;
    } control;
    struct iovec iov = { .iov_base = buf, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    memset(&control, 0, sizeof(control));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.buf;
    msg.msg_controllen = sizeof(control.buf);
    *nfds = 0;
    ssize_t n = recvmsg(sock, &msg, flags);
    if (n < 0) return -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const unsigned char *data = CMSG_DATA(c);
        for (size_t i = 0; i < count; i++) {
            int fd;
            memcpy(&fd, data + i * sizeof(int), sizeof(int));
            if (*nfds < maxfds) fds[(*nfds)++] = fd;
            else close(fd);
        }
    }
    return (long)n;
}

long clinux_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    union {
        char buf[CMSG_SPACE(sizeof(int) * CLINUX_MAX_PASSED_FDS)];
        struct cmsghdr align;
    } control;
    if (nfds < 0 || nfds > CLINUX_MAX_PASSED_FDS) {
        errno = EINVAL;
        return -1;
    }
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    memset(&control, 0, sizeof(control));
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        msg.msg_control = control.buf;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * (size_t)nfds);
    }
    return (long)sendmsg(sock, &msg, MSG_NOSIGNAL);
}

int clinux_accept4(int fd, int flags) { return accept4(fd, 0, 0, flags); }

int clinux_pipe2(int fds[2], int flags) { return pipe2(fds, flags); }

int clinux_spawn_addclosefrom(posix_spawn_file_actions_t *actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np(actions, from);
}

int clinux_rename_noreplace(const char *from, const char *to) {
    return renameat2(AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE);
}

int clinux_fallocate(int fd, int mode, int64_t offset, int64_t length) {
    return fallocate(fd, mode, (off_t)offset, (off_t)length);
}

#include <linux/fs.h>

int64_t clinux_copy_file_range(int in_fd, int64_t in_offset, int out_fd, int64_t out_offset, uint64_t length) {
    loff_t in = (loff_t)in_offset, out = (loff_t)out_offset;
    return (int64_t)copy_file_range(in_fd, &in, out_fd, &out, (size_t)length, 0);
}

int clinux_clone_file(int dest_fd, int src_fd) {
    return ioctl(dest_fd, FICLONE, src_fd);
}

#include <net/if.h>
#include <linux/if_tun.h>

int clinux_tap_attach(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

int clinux_tap_flags(int fd) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    if (ioctl(fd, TUNGETIFF, &ifr) < 0) return -errno;
    return ifr.ifr_flags;
}
