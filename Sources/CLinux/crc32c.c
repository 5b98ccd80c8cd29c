// CRC32C (Castagnoli, reflected polynomial 0x82F63B78) for snapshot files, and a zero-page test.
//
// Two implementations give the same results: the SSE4.2 crc32 instruction (three independent
// streams per block, merged with a carry-less multiply done in software, so the instruction's
// latency is hidden) and a portable slicing-by-8 table. clinux_crc32c picks the faster one at run
// time (see crc32c_choice).

#include "clinux.h"

#include <string.h>
#include <time.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

#define CRC32C_POLY 0x82F63B78u

// Eight 256-entry tables for slicing-by-8, built once on first use.
static uint32_t crc32c_table[8][256];
static pthread_once_t crc32c_table_once = PTHREAD_ONCE_INIT;

static void crc32c_build_table(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ CRC32C_POLY : c >> 1;
        crc32c_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = crc32c_table[0][i];
        for (int t = 1; t < 8; t++) {
            c = crc32c_table[0][c & 0xFF] ^ (c >> 8);
            crc32c_table[t][i] = c;
        }
    }
}

// Runs the bare register (no pre- or post-inversion) over the bytes.
static uint32_t crc32c_sw_register(uint32_t c, const unsigned char *p, size_t n) {
    pthread_once(&crc32c_table_once, crc32c_build_table);
    while (n > 0 && ((uintptr_t)p & 7) != 0) {
        c = crc32c_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
        n--;
    }
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
        v = __builtin_bswap64(v); // the table math below takes the bytes as a little-endian word
#endif
        uint32_t lo = (uint32_t)v ^ c;
        uint32_t hi = (uint32_t)(v >> 32);
        c = crc32c_table[7][lo & 0xFF] ^ crc32c_table[6][(lo >> 8) & 0xFF] ^
            crc32c_table[5][(lo >> 16) & 0xFF] ^ crc32c_table[4][lo >> 24] ^
            crc32c_table[3][hi & 0xFF] ^ crc32c_table[2][(hi >> 8) & 0xFF] ^
            crc32c_table[1][(hi >> 16) & 0xFF] ^ crc32c_table[0][hi >> 24];
        p += 8;
        n -= 8;
    }
    while (n > 0) {
        c = crc32c_table[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
        n--;
    }
    return c;
}

uint32_t clinux_crc32c_sw(uint32_t crc, const void *p, size_t n) {
    return ~crc32c_sw_register(~crc, (const unsigned char *)p, n);
}

// a * b modulo the CRC polynomial, both in the reflected representation (x^0 is bit 31).
static uint32_t crc32c_multiply(uint32_t a, uint32_t b) {
    uint32_t product = 0;
    for (uint32_t m = 1u << 31; m != 0; m >>= 1) {
        if (a & m) product ^= b;
        b = (b & 1) ? (b >> 1) ^ CRC32C_POLY : b >> 1;
    }
    return product;
}

// x^(8 * bytes) modulo the polynomial: multiplying a register by it is the same as running the
// register over that many zero bytes.
static uint32_t crc32c_shift_constant(uint64_t bytes) {
    uint32_t result = 1u << 31; // x^0
    uint32_t square = 1u << 30; // x^1, squared below to x^(2^k)
    unsigned __int128 bits = (unsigned __int128)bytes * 8;
    while (bits != 0) {
        if (bits & 1) result = crc32c_multiply(result, square);
        square = crc32c_multiply(square, square);
        bits >>= 1;
    }
    return result;
}

// The checksum of the bytes before followed by `n` zero bytes, without touching them: running the
// register over zero bytes multiplies it by x^(8n).
uint32_t clinux_crc32c_zeros(uint32_t crc, uint64_t n) {
    if (n == 0) return crc;
    return ~crc32c_multiply(crc32c_shift_constant(n), ~crc);
}

// The checksum of A followed by B from crc(A), crc(B) and B's length (the register is linear; the
// pre- and post-inversions cancel, as in zlib's crc32_combine).
uint32_t clinux_crc32c_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b) {
    return crc32c_multiply(crc32c_shift_constant(length_b), crc_a) ^ crc_b;
}

#if defined(__x86_64__)

// Bytes per stream in one interleaved block; the block is three times this.
#define CRC32C_STREAM 8192

static uint32_t crc32c_shift_1;
static uint32_t crc32c_shift_2;
static pthread_once_t crc32c_shift_once = PTHREAD_ONCE_INIT;

static void crc32c_build_shifts(void) {
    crc32c_shift_1 = crc32c_shift_constant(CRC32C_STREAM);
    crc32c_shift_2 = crc32c_shift_constant(2 * CRC32C_STREAM);
}

__attribute__((target("sse4.2")))
static uint64_t crc32c_hw_run(uint64_t c, const unsigned char *p, size_t n) {
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = _mm_crc32_u64(c, v);
        p += 8;
        n -= 8;
    }
    while (n > 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    return c;
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hw_register(uint32_t crc, const unsigned char *p, size_t n) {
    uint64_t c = crc;
    while (n > 0 && ((uintptr_t)p & 7) != 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        n--;
    }
    if (n >= 3 * CRC32C_STREAM) {
        pthread_once(&crc32c_shift_once, crc32c_build_shifts);
        while (n >= 3 * CRC32C_STREAM) {
            // Three independent registers over consecutive thirds of the block. The second and
            // third start at zero; by linearity the register over the whole block is
            // c0 * x^(16 * STREAM) ^ c1 * x^(8 * STREAM) ^ c2.
            uint64_t c0 = c, c1 = 0, c2 = 0;
            const unsigned char *p1 = p + CRC32C_STREAM, *p2 = p + 2 * CRC32C_STREAM;
            for (size_t i = 0; i < CRC32C_STREAM; i += 8) {
                uint64_t v0, v1, v2;
                memcpy(&v0, p + i, 8);
                memcpy(&v1, p1 + i, 8);
                memcpy(&v2, p2 + i, 8);
                c0 = _mm_crc32_u64(c0, v0);
                c1 = _mm_crc32_u64(c1, v1);
                c2 = _mm_crc32_u64(c2, v2);
            }
            c = crc32c_multiply(crc32c_shift_2, (uint32_t)c0) ^ crc32c_multiply(crc32c_shift_1, (uint32_t)c1) ^
                (uint32_t)c2;
            p += 3 * CRC32C_STREAM;
            n -= 3 * CRC32C_STREAM;
        }
    }
    return (uint32_t)crc32c_hw_run(c, p, n);
}

int clinux_crc32c_hw_available(void) { return __builtin_cpu_supports("sse4.2") ? 1 : 0; }

uint32_t clinux_crc32c_hw(uint32_t crc, const void *p, size_t n) {
    if (!clinux_crc32c_hw_available()) return clinux_crc32c_sw(crc, p, n);
    return ~crc32c_hw_register(~crc, (const unsigned char *)p, n);
}

// Which one clinux_crc32c runs: 0 not measured yet, 1 the instruction, 2 the table. A real CPU runs
// the instruction ~8 times as fast as the table; under an emulator it can be the other way round
// (QEMU 7.2's TCG emulates crc32 bit by bit: in the test host the table ran 3.7 times as fast). The
// first call of at least 4 KiB times both over its own bytes (the best of three runs each) and keeps
// the table only when it was faster by a fifth or more (64 KiB per run; in a VMM in the test host
// the table took 318 µs to the instruction's 611). No lock: threads that race here, or a forked
// child, measure alike, and both give the same checksums.
static int crc32c_choice;

static uint64_t crc32c_nanoseconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int crc32c_measure(const unsigned char *p, size_t n) {
    // 64 KiB per timed run (the bytes again and again), so that reading the clock, which can be a
    // slow system call (an emulated clock source, a seccomp filter to run), does not decide.
    size_t m = n > 65536 ? 65536 : n, reps = (65536 + m - 1) / m;
    uint64_t best_hw = UINT64_MAX, best_sw = UINT64_MAX;
    volatile uint32_t sink = 0; // the results must be computed
    for (int i = 0; i < 3; i++) {
        uint64_t t0 = crc32c_nanoseconds();
        for (size_t r = 0; r < reps; r++) sink ^= crc32c_hw_register((uint32_t)r, p, m);
        uint64_t t1 = crc32c_nanoseconds();
        for (size_t r = 0; r < reps; r++) sink ^= clinux_crc32c_sw((uint32_t)r, p, m);
        uint64_t t2 = crc32c_nanoseconds();
        if (t1 - t0 < best_hw) best_hw = t1 - t0;
        if (t2 - t1 < best_sw) best_sw = t2 - t1;
    }
    (void)sink;
    return 5 * best_sw < 4 * best_hw ? 2 : 1;
}

uint32_t clinux_crc32c(uint32_t crc, const void *p, size_t n) {
    if (!clinux_crc32c_hw_available()) return clinux_crc32c_sw(crc, p, n);
    int choice = __atomic_load_n(&crc32c_choice, __ATOMIC_RELAXED);
    if (choice == 0) {
        if (n < 4096) return clinux_crc32c_hw(crc, p, n);
        choice = crc32c_measure((const unsigned char *)p, n);
        __atomic_store_n(&crc32c_choice, choice, __ATOMIC_RELAXED);
    }
    return choice == 2 ? clinux_crc32c_sw(crc, p, n) : clinux_crc32c_hw(crc, p, n);
}

int clinux_crc32c_choice(void) { return __atomic_load_n(&crc32c_choice, __ATOMIC_RELAXED); }

#else

int clinux_crc32c_hw_available(void) { return 0; }
uint32_t clinux_crc32c_hw(uint32_t crc, const void *p, size_t n) { return clinux_crc32c_sw(crc, p, n); }
uint32_t clinux_crc32c(uint32_t crc, const void *p, size_t n) { return clinux_crc32c_sw(crc, p, n); }
int clinux_crc32c_choice(void) { return 2; }

#endif

int clinux_all_zero(const void *p, size_t n) {
    const unsigned char *b = (const unsigned char *)p;
    if (n < 16) {
        for (size_t i = 0; i < n; i++)
            if (b[i] != 0) return 0;
        return 1;
    }
    // The first 16 bytes are zero and every byte equals the one 16 before it: all zero.
    static const unsigned char zero[16];
    return memcmp(b, zero, 16) == 0 && memcmp(b, b + 16, n - 16) == 0;
}
