// CLinux: small non-variadic wrappers around Linux calls that Swift cannot import directly.
#ifndef CLINUX_H
#define CLINUX_H

#include <stdint.h>
#include <signal.h>
#include <sys/types.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/random.h>
#include <linux/falloc.h>
#include <linux/if_tun.h>
#include <pthread.h>
#include <spawn.h>

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

// pipe2(2) (also _GNU_SOURCE): O_CLOEXEC gives both ends close-on-exec from the start, with no
// window in which another thread's fork or spawn inherits them.
int clinux_pipe2(int fds[2], int flags);

// posix_spawn_file_actions_addclosefrom_np (glibc 2.34, _GNU_SOURCE): the child closes every
// descriptor from `from` up, so descriptors another thread left inheritable do not leak into it.
int clinux_spawn_addclosefrom(posix_spawn_file_actions_t *actions, int from);

// renameat2(2) with RENAME_NOREPLACE: fails with EEXIST instead of replacing `to` (a plain rename
// of a directory silently replaces an empty one). EINVAL when the file system does not support it.
int clinux_rename_noreplace(const char *from, const char *to);

// CRC32C (Castagnoli), the checksum of snapshot files. `crc` is the checksum of the bytes before
// `p` (0 to start), so a stream can be checksummed in pieces; CRC32C("123456789") = 0xE3069283.
// Uses the SSE4.2 crc32 instruction when the CPU has it and runs it faster than the table (its
// first call of 4 KiB or more times both), else a table.
uint32_t clinux_crc32c(uint32_t crc, const void *p, size_t n);
// What clinux_crc32c chose: 0 not yet, 1 the instruction, 2 the table.
int clinux_crc32c_choice(void);
// The two implementations, for tests: the table one, and the SSE4.2 one (which falls back to the
// table when clinux_crc32c_hw_available() is 0).
uint32_t clinux_crc32c_sw(uint32_t crc, const void *p, size_t n);
uint32_t clinux_crc32c_hw(uint32_t crc, const void *p, size_t n);
int clinux_crc32c_hw_available(void);

// The checksum of the bytes before (`crc`) followed by `n` zero bytes, in O(log n).
uint32_t clinux_crc32c_zeros(uint32_t crc, uint64_t n);
// The checksum of A followed by B, from both checksums and B's length.
uint32_t clinux_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b);

// 1 when all `n` bytes at `p` are zero (sparse snapshot writing skips such pages), else 0.
int clinux_all_zero(const void *p, size_t n);


// Guest memory into a snapshot's memory.bin (memwrite.c). The file holds the regions one after the
// other; it must already have its final length (ftruncate), so pages left unwritten read as zero.
// Pages are read only where they may hold data: /proc/self/pagemap tells which pages of an
// anonymous mapping were never touched, and which pages of a restored VM's copy-on-write mapping of
// its parent's memory file the guest never wrote. A 1 MiB chunk with no written page is copied
// from the parent's file with copy_file_range and keeps the parent's checksum, without being read.
#define CLINUX_MEMORY_CHUNK (1u << 20)
struct clinux_memory_region {
    const unsigned char *base;
    uint64_t size; // a multiple of 4096
};
struct clinux_memory_write {
    // In.
    const struct clinux_memory_region *regions;
    int region_count;
    int out_fd;                        // the new memory file
    int parent_fd;                     // a restored VM's memory file (mapped MAP_PRIVATE), else -1
    const uint32_t *parent_chunk_crcs; // that file's CRC32C per chunk, else NULL
    uint64_t parent_chunk_count;
    int (*should_stop)(void *context); // asked before each chunk (NULL: never); nonzero stops (ECANCELED)
    void *context;
    // Out.
    uint32_t *chunk_crcs;   // required: the caller's array, one entry per chunk of the file
    uint32_t crc;           // of the whole file
    uint64_t bytes_written; // written from memory
    uint64_t bytes_copied;  // copied from the parent's file in the kernel
    uint64_t bytes_read;    // pages read (and checked for zero)
    uint64_t pages_skipped; // pages neither read nor written (known zero or unchanged)
    int status;             // clinux_fork_memory_writer: the child's result (0 or an errno value)
    int done;               // clinux_fork_memory_writer: 1 once the results are in place
};
// Returns 0 or an errno value (ECANCELED when should_stop said so).
int clinux_write_memory(struct clinux_memory_write *w);
// The same in a child process made by fork(2): the child sees memory as it was at the fork
// (copy-on-write), so the caller may let the guest run on at once. The child keeps only out_fd and
// parent_fd open, dies with the parent, fsyncs out_fd after writing, and leaves its results in
// `shared` (which must be a MAP_SHARED mapping, chunk_crcs too) with `done` set. Returns its pid,
// or -1 with errno.
pid_t clinux_fork_memory_writer(struct clinux_memory_write *shared);
// pidfd_open(2): a descriptor that becomes readable when process `pid` exits; -1 with errno.
int clinux_pidfd_open(pid_t pid);

/// fallocate(2) (glibc declares it only under _GNU_SOURCE, which Swift's importer does not set).
int clinux_fallocate(int fd, int mode, int64_t offset, int64_t length);

/// copy_file_range(2) of up to `length` bytes between the given offsets (not the files' own).
int64_t clinux_copy_file_range(int in_fd, int64_t in_offset, int out_fd, int64_t out_offset, uint64_t length);

/// ioctl(FICLONE): `dest_fd` shares all of `src_fd`'s blocks (a reflink), where the file system can.
int clinux_clone_file(int dest_fd, int src_fd);

/// Opens /dev/net/tun (non-blocking, close-on-exec) and attaches it to the tap device `name`
/// (IFF_TAP | IFF_NO_PI): the descriptor, or -errno.
int clinux_tap_attach(const char *name);

/// The tun/tap flags of a descriptor attached to a tun/tap device (TUNGETIFF), or -errno (EBADFD:
/// not attached; ENOTTY/EINVAL: not a tun/tap descriptor).
int clinux_tap_flags(int fd);

#endif
