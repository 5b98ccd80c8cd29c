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

// Unix stream sockets. bind/connect to `path`; -1 with errno ENAMETOOLONG when it does not fit.
int clinux_unix_bind(int fd, const char *path);
int clinux_unix_connect(int fd, const char *path);

// Most descriptors passed in one message by the two calls below.
#define CLINUX_MAX_PASSED_FDS 16

// recvmsg(2) of up to `len` bytes, collecting descriptors passed with SCM_RIGHTS: up to `maxfds`
// go to `fds` (count in *nfds), any more are closed. Pass MSG_CMSG_CLOEXEC in `flags` to get them
// close-on-exec. Returns the byte count (0 at end of stream) or -1 with errno.
long clinux_recv_fds(int sock, void *buf, size_t len, int flags, int *fds, int maxfds, int *nfds);

// sendmsg(2) of `len` bytes with `nfds` descriptors (at most CLINUX_MAX_PASSED_FDS) attached with
// SCM_RIGHTS; MSG_NOSIGNAL. Returns the byte count or -1 with errno.
long clinux_send_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);

// accept4(2) without the peer address (accept4 needs _GNU_SOURCE, which Swift's Glibc lacks).
int clinux_accept4(int fd, int flags);

// renameat2(2) with RENAME_NOREPLACE: fails with EEXIST instead of replacing `to` (a plain rename
// of a directory silently replaces an empty one). EINVAL when the file system does not support it.
int clinux_rename_noreplace(const char *from, const char *to);

// CRC32C (Castagnoli), the checksum of snapshot files. `crc` is the checksum of the bytes before
// `p` (0 to start), so a stream can be checksummed in pieces; CRC32C("123456789") = 0xE3069283.
// Uses the SSE4.2 crc32 instruction when the CPU has it, else a table.
uint32_t clinux_crc32c(uint32_t crc, const void *p, size_t n);
// The two implementations, for tests: the table one, and the SSE4.2 one (which falls back to the
// table when clinux_crc32c_hw_available() is 0).
uint32_t clinux_crc32c_sw(uint32_t crc, const void *p, size_t n);
uint32_t clinux_crc32c_hw(uint32_t crc, const void *p, size_t n);
int clinux_crc32c_hw_available(void);

// 1 when all `n` bytes at `p` are zero (sparse snapshot writing skips such pages), else 0.
int clinux_all_zero(const void *p, size_t n);

#endif
