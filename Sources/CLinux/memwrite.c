// Writing guest memory into a snapshot's memory.bin: only pages that hold data are read and written,
// checksums are combined instead of recomputed over zeros, and pages a restored VM never wrote are
// copied from its parent snapshot's file in the kernel. Also runs in a forked child for live
// snapshots, so beyond system calls it uses only what glibc keeps usable after a fork (pthread_create),
// never a lock another thread of the parent could have held.

#include "clinux.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define PAGES_PER_CHUNK (CLINUX_MEMORY_CHUNK / PAGE)
#define MAX_RUN (8u << 20)

enum page_kind { PAGE_NEW, PAGE_ZERO, PAGE_PARENT };

struct writer {
    struct clinux_memory_write *w;
    int pagemap;               // -1: unknown, every page is read
    uint64_t bytes_written, bytes_copied, bytes_read, pages_skipped;
    // The pending run of data pages: host pointer, file offset, length.
    const unsigned char *run_base;
    uint64_t run_offset, run_length;
    // The parent file after the last query at query_from: a hole up to data_start, then data up to
    // data_end (data_start == UINT64_MAX: no data after query_from).
    uint64_t query_from, data_start, data_end;
    int data_valid;
};

static int write_all(int fd, const unsigned char *p, uint64_t n, uint64_t offset) {
    while (n > 0) {
        ssize_t done = pwrite(fd, p, n > (1u << 30) ? (1u << 30) : n, (off_t)offset);
        if (done < 0) {
            if (errno == EINTR) continue;
            return errno;
        }
        if (done == 0) return EIO;
        p += done;
        n -= (uint64_t)done;
        offset += (uint64_t)done;
    }
    return 0;
}

static int flush_run(struct writer *s) {
    if (s->run_length == 0) return 0;
    int error = write_all(s->w->out_fd, s->run_base, s->run_length, s->run_offset);
    if (error == 0) s->bytes_written += s->run_length;
    s->run_length = 0;
    return error;
}

static int add_to_run(struct writer *s, const unsigned char *p, uint64_t offset) {
    if (s->run_length > 0 && (s->run_base + s->run_length != p || s->run_offset + s->run_length != offset ||
                              s->run_length >= MAX_RUN)) {
        int error = flush_run(s);
        if (error) return error;
    }
    if (s->run_length == 0) {
        s->run_base = p;
        s->run_offset = offset;
    }
    s->run_length += PAGE;
    return 0;
}

// Whether the parent file holds data (not a hole) anywhere in [offset, offset + length).
static int parent_has_data(struct writer *s, uint64_t offset, uint64_t length) {
    if (!s->data_valid || offset < s->query_from || (s->data_start != UINT64_MAX && offset >= s->data_end)) {
        s->query_from = offset;
        off_t data = lseek(s->w->parent_fd, (off_t)offset, SEEK_DATA);
        if (data < 0) {
            if (errno == ENXIO) { // no data after offset
                s->data_start = UINT64_MAX;
                s->data_end = UINT64_MAX;
            } else { // cannot tell: assume data
                s->data_start = 0;
                s->data_end = UINT64_MAX;
            }
        } else {
            off_t hole = lseek(s->w->parent_fd, data, SEEK_HOLE);
            s->data_start = (uint64_t)data;
            s->data_end = hole > data ? (uint64_t)hole : UINT64_MAX;
        }
        s->data_valid = 1;
    }
    if (s->data_start == UINT64_MAX) return 0;
    return s->data_start < offset + length && offset < s->data_end;
}

static int copy_from_parent(struct writer *s, uint64_t offset, uint64_t length, const unsigned char *mapped) {
    uint64_t end = offset + length;
    while (offset < end) {
        // The next data range of the parent within [offset, end).
        if (!parent_has_data(s, offset, end - offset)) return 0;
        uint64_t from = s->data_start > offset ? s->data_start : offset;
        uint64_t to = s->data_end < end ? s->data_end : end;
        uint64_t at = from;
        while (at < to) {
            loff_t in = (loff_t)at, out = (loff_t)at;
            ssize_t n = copy_file_range(s->w->parent_fd, &in, s->w->out_fd, &out, to - at, 0);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                // No in-kernel copy here (or the file shrank under us): write from the mapping.
                int error = write_all(s->w->out_fd, mapped + (at - (end - length)), to - at, at);
                if (error) return error;
                s->bytes_written += to - at;
                break;
            }
            at += (uint64_t)n;
            s->bytes_copied += (uint64_t)n;
        }
        offset = to;
    }
    return 0;
}

// Classifies the pages of [base, base + pages * PAGE) (one region's part of a chunk).
static void classify(struct writer *s, const unsigned char *base, uint64_t file_offset, unsigned pages,
                     unsigned char *kinds) {
    uint64_t entries[PAGES_PER_CHUNK];
    int have = 0;
    if (s->pagemap >= 0 && (uintptr_t)base % PAGE == 0) { // else each "page" spans two: read them all
        ssize_t want = (ssize_t)pages * 8, n;
        do {
            n = pread(s->pagemap, entries, (size_t)want, (off_t)((uintptr_t)base / PAGE * 8));
        } while (n < 0 && errno == EINTR);
        have = n == want;
    }
    for (unsigned i = 0; i < pages; i++) {
        if (!have) {
            kinds[i] = PAGE_NEW;
            continue;
        }
        uint64_t e = entries[i];
        int present = (e >> 63) & 1, swapped = (e >> 62) & 1, file = (e >> 61) & 1;
        if (swapped || (present && !file)) kinds[i] = PAGE_NEW; // a private copy: the guest wrote it
        else if (s->w->parent_fd >= 0) kinds[i] = parent_has_data(s, file_offset + (uint64_t)i * PAGE, PAGE) ? PAGE_PARENT : PAGE_ZERO;
        else if (present) kinds[i] = PAGE_NEW; // a file page of an anonymous mapping cannot be: read it
        else kinds[i] = PAGE_ZERO;             // never touched
    }
}

// The length of chunk `chunk` of a file of `total` bytes (the last one may be shorter).
static uint64_t chunk_length_of(uint64_t chunk, uint64_t total) {
    uint64_t start = chunk * CLINUX_MEMORY_CHUNK;
    return total - start < CLINUX_MEMORY_CHUNK ? total - start : CLINUX_MEMORY_CHUNK;
}

// Writes chunk `chunk` (file offsets [chunk * CHUNK, + its length)) and returns its checksum.
static int write_chunk(struct writer *s, uint64_t chunk, uint64_t total, uint32_t *chunk_crc) {
    struct clinux_memory_write *w = s->w;
    uint64_t chunk_start = chunk * CLINUX_MEMORY_CHUNK;
    uint64_t chunk_length = chunk_length_of(chunk, total);
    // The regions' parts that make up the chunk.
    struct { const unsigned char *base; unsigned first, count; } parts[8];
    int part_count = 0, changed = 0;
    unsigned char kinds[PAGES_PER_CHUNK];
    uint64_t region_start = 0;
    for (int r = 0; r < w->region_count && part_count < 8; r++) {
        uint64_t region_end = region_start + w->regions[r].size;
        uint64_t from = chunk_start > region_start ? chunk_start : region_start;
        uint64_t to = chunk_start + chunk_length < region_end ? chunk_start + chunk_length : region_end;
        if (from < to) {
            unsigned first = (unsigned)((from - chunk_start) / PAGE), count = (unsigned)((to - from) / PAGE);
            const unsigned char *base = w->regions[r].base + (from - region_start);
            classify(s, base, from, count, kinds + first);
            parts[part_count].base = base;
            parts[part_count].first = first;
            parts[part_count].count = count;
            part_count++;
            for (unsigned i = 0; i < count; i++) changed |= kinds[first + i] == PAGE_NEW;
        }
        region_start = region_end;
    }
    int error = 0;
    if (!changed && w->parent_fd >= 0 && w->parent_chunk_crcs && chunk < w->parent_chunk_count) {
        // Unchanged since the parent snapshot: its checksum, and its data copied in the kernel.
        if ((error = flush_run(s))) return error;
        *chunk_crc = w->parent_chunk_crcs[chunk];
        for (int p = 0; p < part_count && !error; p++)
            error = copy_from_parent(s, chunk_start + (uint64_t)parts[p].first * PAGE, (uint64_t)parts[p].count * PAGE,
                                     parts[p].base);
        s->pages_skipped += chunk_length / PAGE;
        return error;
    }
    uint32_t crc = 0;
    uint64_t zeros = 0;
    for (int p = 0; p < part_count; p++) {
        for (unsigned i = 0; i < parts[p].count; i++) {
            const unsigned char *page = parts[p].base + (uint64_t)i * PAGE;
            uint64_t offset = chunk_start + (uint64_t)(parts[p].first + i) * PAGE;
            int zero = kinds[parts[p].first + i] == PAGE_ZERO;
            if (zero) {
                s->pages_skipped++;
            } else {
                s->bytes_read += PAGE;
                zero = clinux_all_zero(page, PAGE);
            }
            if (zero) {
                if ((error = flush_run(s))) return error;
                zeros += PAGE;
                continue;
            }
            crc = clinux_crc32c(clinux_crc32c_zeros(crc, zeros), page, PAGE);
            zeros = 0;
            if ((error = add_to_run(s, page, offset))) return error;
        }
    }
    *chunk_crc = clinux_crc32c_zeros(crc, zeros);
    return 0;
}

// One thread's share: chunks [first, end), each checksum into w->chunk_crcs.
struct share {
    struct writer s;
    uint64_t first, end, total;
    int *stop;   // set by any share that fails or is told to stop; every share stops then
    int asks;    // this share asks should_stop (the caller's thread)
    int error;
    pthread_t thread;
};

static void *write_share(void *arg) {
    struct share *sh = arg;
    struct clinux_memory_write *w = sh->s.w;
    sh->s.pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    for (uint64_t chunk = sh->first; chunk < sh->end && !sh->error; chunk++) {
        if (__atomic_load_n(sh->stop, __ATOMIC_ACQUIRE)) {
            sh->error = ECANCELED;
            break;
        }
        if (sh->asks && w->should_stop && w->should_stop(w->context)) {
            sh->error = ECANCELED;
            break;
        }
        sh->error = write_chunk(&sh->s, chunk, sh->total, &w->chunk_crcs[chunk]);
    }
    if (!sh->error) sh->error = flush_run(&sh->s);
    if (sh->error) __atomic_store_n(sh->stop, 1, __ATOMIC_RELEASE);
    if (sh->s.pagemap >= 0) close(sh->s.pagemap);
    return NULL;
}

#define MAX_SHARES 4

int clinux_write_memory(struct clinux_memory_write *w) {
    if (!w->chunk_crcs) return EINVAL; // they are combined into the file's checksum
    uint64_t total = 0;
    for (int r = 0; r < w->region_count; r++) total += w->regions[r].size;
    uint64_t chunks = total / CLINUX_MEMORY_CHUNK + (total % CLINUX_MEMORY_CHUNK ? 1 : 0);
    w->crc = 0;
    w->bytes_written = w->bytes_copied = w->bytes_read = w->pages_skipped = 0;
    // Checksums run at the speed of one core: share the chunks among up to MAX_SHARES threads
    // (contiguous ranges, so that each writes its part of the file in order), 8 MiB at least each,
    // no more than the CPUs this process may run on.
    cpu_set_t allowed;
    long cpus = sched_getaffinity(0, sizeof allowed, &allowed) == 0 ? CPU_COUNT(&allowed) : sysconf(_SC_NPROCESSORS_ONLN);
    int count = cpus < 1 ? 1 : cpus > MAX_SHARES ? MAX_SHARES : (int)cpus;
    if ((uint64_t)count > chunks / 8) count = chunks / 8 > 0 ? (int)(chunks / 8) : 1;
    int stop = 0;
    struct share shares[MAX_SHARES];
    for (int i = 0; i < count; i++) {
        shares[i] = (struct share){.s = {.w = w, .pagemap = -1}, .first = chunks * (uint64_t)i / (uint64_t)count,
                                   .end = chunks * (uint64_t)(i + 1) / (uint64_t)count, .total = total, .stop = &stop,
                                   .asks = i == 0};
    }
    int started = 1;
    for (int i = 1; i < count; i++, started++) {
        if (pthread_create(&shares[i].thread, NULL, write_share, &shares[i]) != 0) break;
    }
    // Shares that got no thread run here after the first, each asking should_stop.
    write_share(&shares[0]);
    for (int i = started; i < count; i++) {
        shares[i].asks = 1;
        write_share(&shares[i]);
    }
    // While the other threads write, keep asking should_stop (every 50 ms) for them.
    for (int i = 1; i < started; i++) {
        for (;;) {
            struct timespec deadline;
            clock_gettime(CLOCK_REALTIME, &deadline);
            deadline.tv_nsec += 50 * 1000 * 1000;
            if (deadline.tv_nsec >= 1000 * 1000 * 1000) {
                deadline.tv_sec++;
                deadline.tv_nsec -= 1000 * 1000 * 1000;
            }
            if (pthread_timedjoin_np(shares[i].thread, NULL, &deadline) == 0) break;
            if (w->should_stop && w->should_stop(w->context)) __atomic_store_n(&stop, 1, __ATOMIC_RELEASE);
        }
    }
    int error = 0;
    for (int i = 0; i < count; i++) {
        // The first real error wins over the ECANCELED it made the others stop with.
        if (shares[i].error && (!error || error == ECANCELED)) error = shares[i].error;
        w->bytes_written += shares[i].s.bytes_written;
        w->bytes_copied += shares[i].s.bytes_copied;
        w->bytes_read += shares[i].s.bytes_read;
        w->pages_skipped += shares[i].s.pages_skipped;
    }
    if (!error) {
        for (uint64_t c = 0; c < chunks; c++) w->crc = clinux_crc32c_combine(w->crc, w->chunk_crcs[c], chunk_length_of(c, total));
    }
    return error;
}

// Closes descriptors [from, to] (close_range, else one by one up to RLIMIT_NOFILE).
static void close_between(unsigned int from, unsigned int to) {
    if (from > to || syscall(SYS_close_range, from, to, 0) == 0) return;
    struct rlimit limit;
    unsigned int most = getrlimit(RLIMIT_NOFILE, &limit) == 0 && limit.rlim_cur < 1u << 20 ? (unsigned int)limit.rlim_cur : 1u << 20;
    for (unsigned int fd = from; fd <= to && fd <= most; fd++) close((int)fd);
}

// Closes every descriptor except `a` and `b` (either may be -1): the child must not hold the
// parent's sockets, KVM or lock descriptors open after the parent closed them.
static void close_all_but(int a, int b) {
    unsigned int lo = (unsigned int)(a < b ? a : b), hi = (unsigned int)(a < b ? b : a);
    if ((int)lo < 0) lo = hi; // only one to keep
    if ((int)hi < 0) {        // none
        close_between(0, ~0u);
        return;
    }
    if (lo > 0) close_between(0, lo - 1);
    if (hi > lo) close_between(lo + 1, hi - 1);
    close_between(hi + 1, ~0u);
}

pid_t clinux_fork_memory_writer(struct clinux_memory_write *shared) {
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid != 0) return pid; // the parent (or -1 with errno)
    // The child: dies with the parent, holds only the files it writes and reads.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(120);
    close_all_but(shared->out_fd, shared->parent_fd);
    shared->should_stop = NULL; // the parent stops the child by killing it
    int error = clinux_write_memory(shared);
    if (!error) {
        while (fsync(shared->out_fd) != 0) {
            if (errno != EINTR) {
                error = errno;
                break;
            }
        }
    }
    shared->status = error;
    __atomic_store_n(&shared->done, 1, __ATOMIC_RELEASE);
    _exit(error ? 1 : 0);
}

int clinux_pidfd_open(pid_t pid) { return (int)syscall(SYS_pidfd_open, pid, 0); }
