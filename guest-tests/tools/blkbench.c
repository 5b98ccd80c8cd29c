/*
 * blkbench: block-device and command timing for the test guest (guest-tests/tools/blkbench.c), whose
 * userland is busybox only (its dd prints no time or rate).
 *
 *   blkbench randread DEVICE SECONDS [BLOCK [DEPTH]]
 *       Random reads of BLOCK bytes (default 4096; a multiple of 512) at BLOCK-aligned offsets all
 *       over DEVICE (its size from BLKGETSIZE64), opened O_RDONLY|O_DIRECT, for SECONDS seconds
 *       (CLOCK_MONOTONIC). DEPTH 1 (the default): one pread at a time; DEPTH > 1 (at most 64): that
 *       many reads kept in flight with Linux native AIO (io_submit/io_getevents, raw system calls).
 *       Offsets come from a fixed-seed xorshift generator: the same sequence every run.
 *       Prints `randread block=B depth=D ios=N ms=T iops=X`.
 *   blkbench time COMMAND [ARGS...]
 *       Runs COMMAND (fork + execvp), waits for it, and prints `time ms=T status=S` on stderr after
 *       COMMAND's own output (elapsed CLOCK_MONOTONIC time from just before the fork to its exit).
 *   blkbench rngcheck
 *       Prints /sys/class/misc/hw_random/rng_current (`rng_current=NAME`, or `rng_current=none`).
 *
 * Quiet on purpose (one line per command): every console byte is slow in the nested test host.
 * Exit status: 0 success; 1 an I/O error (an `error=...` is printed); 2 usage; COMMAND's status for
 * `time` (128+N when it died of signal N).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_DEPTH 64

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static int usage(void)
{
    fprintf(stderr, "usage: blkbench randread DEVICE SECONDS [BLOCK [DEPTH]]\n"
                    "       blkbench time COMMAND [ARGS...]\n"
                    "       blkbench rngcheck\n");
    return 2;
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t next_random(void)
{
    uint64_t x = rng_state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    rng_state = x;
    return x;
}

static int parse_positive(const char *s, unsigned long max, unsigned long *out)
{
    char *end;
    errno = 0;
    unsigned long v = strtoul(s, &end, 10);
    if (errno || *end || end == s || v == 0 || v > max) return -1;
    *out = v;
    return 0;
}

static int randread(int argc, char **argv)
{
    unsigned long seconds, block = 4096, depth = 1;
    if (argc < 2 || argc > 4) return usage();
    if (parse_positive(argv[1], 3600, &seconds)) return usage();
    if (argc > 2 && (parse_positive(argv[2], 1 << 20, &block) || block % 512)) return usage();
    if (argc > 3 && parse_positive(argv[3], MAX_DEPTH, &depth)) return usage();
    int fd = open(argv[0], O_RDONLY | O_DIRECT);
    if (fd < 0) { printf("randread error=open:%s\n", strerror(errno)); return 1; }
    uint64_t size = 0;
    if (ioctl(fd, BLKGETSIZE64, &size) < 0) { printf("randread error=BLKGETSIZE64:%s\n", strerror(errno)); return 1; }
    uint64_t blocks = size / block;
    if (blocks == 0) { printf("randread error=device-smaller-than-block\n"); return 1; }
    void *buffers;
    if (posix_memalign(&buffers, 4096, block * depth)) { printf("randread error=no-memory\n"); return 1; }
    memset(buffers, 0, block * depth);

    unsigned long long ios = 0;
    double start = now_ms(), deadline = start + seconds * 1e3, end;
    if (depth == 1) {
        do {
            /* Check the clock every 16 reads: a clock read is cheap next to a read, but not free. */
            for (int i = 0; i < 16; i++) {
                off_t offset = (off_t)(next_random() % blocks) * (off_t)block;
                ssize_t n = pread(fd, buffers, block, offset);
                if (n != (ssize_t)block) {
                    printf("randread error=pread:%s offset=%lld\n", n < 0 ? strerror(errno) : "short", (long long)offset);
                    return 1;
                }
                ios++;
            }
        } while ((end = now_ms()) < deadline);
    } else {
        aio_context_t ctx = 0;
        if (syscall(SYS_io_setup, depth, &ctx) < 0) { printf("randread error=io_setup:%s\n", strerror(errno)); return 1; }
        struct iocb cbs[MAX_DEPTH], *list[MAX_DEPTH];
        struct io_event events[MAX_DEPTH];
        memset(cbs, 0, sizeof cbs);
        for (unsigned long i = 0; i < depth; i++) {
            cbs[i].aio_fildes = (uint32_t)fd;
            cbs[i].aio_lio_opcode = IOCB_CMD_PREAD;
            cbs[i].aio_buf = (uint64_t)(uintptr_t)((char *)buffers + i * block);
            cbs[i].aio_nbytes = block;
            cbs[i].aio_offset = (int64_t)((next_random() % blocks) * block);
            cbs[i].aio_data = i;
            list[i] = &cbs[i];
        }
        if (syscall(SYS_io_submit, ctx, (long)depth, list) != (long)depth) {
            printf("randread error=io_submit:%s\n", strerror(errno)); return 1;
        }
        long inflight = (long)depth;
        int stopping = 0;
        while (inflight > 0) {
            long got = syscall(SYS_io_getevents, ctx, 1L, (long)depth, events, NULL);
            if (got < 0) {
                if (errno == EINTR) continue;
                printf("randread error=io_getevents:%s\n", strerror(errno)); return 1;
            }
            inflight -= got;
            long again = 0;
            for (long i = 0; i < got; i++) {
                if (events[i].res != (int64_t)block) {
                    printf("randread error=aio:%lld\n", (long long)events[i].res); return 1;
                }
                ios++;
                if (!stopping) {
                    struct iocb *cb = &cbs[events[i].data];
                    cb->aio_offset = (int64_t)((next_random() % blocks) * block);
                    list[again++] = cb;
                }
            }
            if (!stopping && now_ms() >= deadline) { stopping = 1; again = 0; }
            if (again > 0) {
                if (syscall(SYS_io_submit, ctx, again, list) != again) {
                    printf("randread error=io_submit:%s\n", strerror(errno)); return 1;
                }
                inflight += again;
            }
        }
        end = now_ms();
        syscall(SYS_io_destroy, ctx);
    }
    double ms = end - start;
    printf("randread block=%lu depth=%lu ios=%llu ms=%.1f iops=%.0f\n", block, depth, ios, ms, ios * 1e3 / ms);
    return 0;
}

static int timed(int argc, char **argv)
{
    if (argc < 1) return usage();
    fflush(stdout);
    double start = now_ms();
    pid_t pid = fork();
    if (pid < 0) { fprintf(stderr, "time error=fork:%s\n", strerror(errno)); return 1; }
    if (pid == 0) {
        execvp(argv[0], argv);
        fprintf(stderr, "time error=exec:%s:%s\n", argv[0], strerror(errno));
        _exit(127);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0) {
        if (errno != EINTR) { fprintf(stderr, "time error=waitpid:%s\n", strerror(errno)); return 1; }
    }
    double ms = now_ms() - start;
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    fprintf(stderr, "time ms=%.1f status=%d\n", ms, code);
    return code;
}

static int rngcheck(void)
{
    char name[64] = "none";
    FILE *f = fopen("/sys/class/misc/hw_random/rng_current", "r");
    if (f) {
        if (!fgets(name, sizeof name, f)) strcpy(name, "none");
        fclose(f);
        name[strcspn(name, "\n")] = 0;
    }
    printf("rng_current=%s\n", name);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) return usage();
    if (!strcmp(argv[1], "randread")) return randread(argc - 2, argv + 2);
    if (!strcmp(argv[1], "time")) return timed(argc - 2, argv + 2);
    if (!strcmp(argv[1], "rngcheck") && argc == 2) return rngcheck();
    return usage();
}
