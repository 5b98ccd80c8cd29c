/*
 * tpm2cmd: a tiny TPM 2.0 client for the test guest (guest-tests/tools/tpm2cmd.c).
 *
 * Sends hand-built TPM 2.0 commands through /dev/tpmrm0 (the kernel's resource manager; -d: the raw
 * /dev/tpm0; -D PATH: any device; -S PATH: the data socket of `swtpm socket --server type=unixio,path=PATH
 * --flags startup-clear`, for trying the tool on a machine without a TPM) and prints one line per command, `NAME rc=0xRRR key=value ...`,
 * with `err=NAME` added for a non-zero response code. Quiet on purpose: every console byte is slow in
 * the nested test host.
 *
 *   tpm2cmd [-d | -D DEVICE] getrandom N          N random bytes (several commands if needed)
 *   tpm2cmd ... getcap                            GetCapability(TPM_PROPERTIES): family, manufacturer...
 *   tpm2cmd ... nvdefine INDEX SIZE               NV_DefineSpace, owner auth (empty password), OWNERREAD|OWNERWRITE
 *   tpm2cmd ... nvwrite INDEX HEXDATA             NV_Write at offset 0 (chunks of 512 bytes)
 *   tpm2cmd ... nvread INDEX SIZE                 NV_Read from offset 0
 *   tpm2cmd ... nvundefine INDEX                  NV_UndefineSpace
 *   tpm2cmd ... createprimary                     RSA 2048 storage key in the owner hierarchy, then FlushContext
 *   tpm2cmd ... bench getrandom COUNT BYTES       COUNT GetRandom commands of BYTES each; elapsed ms
 *   tpm2cmd ... bench createprimary COUNT         COUNT CreatePrimary (unique = 1..COUNT: COUNT different
 *                                                 keys) + FlushContext; elapsed ms
 *   tpm2cmd ... bench nvwrite COUNT BYTES         (re)defines the index 0x01500002 of BYTES (1..512) bytes,
 *                                                 COUNT NV_Write of BYTES bytes each (different data each
 *                                                 time); elapsed ms of the writes; NV_Read of the index
 *                                                 must give the last data written (verify=ok); then
 *                                                 NV_UndefineSpace
 *   tpm2cmd ... loop createprimary [STOPFILE]     CreatePrimary (the owner's empty-unique RSA 2048 key) +
 *                                                 FlushContext over and over, one line per iteration:
 *                                                 `loop i=N rc=0x000 key=HEX8` (the modulus's first 4
 *                                                 bytes); ends with exit status 1 at the first non-zero
 *                                                 response code (`loop i=N rc=0x... step=... err=...`), or
 *                                                 with `loop stopped after=N` and status 0 before an
 *                                                 iteration when the file STOPFILE exists
 *
 * Exit status: 0 every response code was 0; 1 a TPM response code was not 0; 2 usage;
 * 3 the device could not be used or a response was malformed (an `error=...` is printed).
 * Every response's size field is checked against the bytes read before anything in it is used, and
 * every field is read through a bounds-checked reader.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* TPM 2.0 constants (TPM 2.0 Library, Part 2: Structures). */
#define ST_NO_SESSIONS 0x8001
#define ST_SESSIONS 0x8002
#define CC_NV_UNDEFINE_SPACE 0x122
#define CC_NV_DEFINE_SPACE 0x12A
#define CC_CREATE_PRIMARY 0x131
#define CC_NV_WRITE 0x137
#define CC_NV_READ 0x14E
#define CC_FLUSH_CONTEXT 0x165
#define CC_GET_CAPABILITY 0x17A
#define CC_GET_RANDOM 0x17B
#define RH_OWNER 0x40000001u
#define RS_PW 0x40000009u
#define CAP_TPM_PROPERTIES 6
#define PT_FIXED 0x100
#define ALG_RSA 0x0001
#define ALG_SHA256 0x000B
#define ALG_AES 0x0006
#define ALG_NULL 0x0010
#define ALG_CFB 0x0043
#define NV_OWNERWRITE (1u << 1)
#define NV_OWNERREAD (1u << 17)
/* fixedTPM | fixedParent | sensitiveDataOrigin | userWithAuth | noDA | restricted | decrypt */
#define OBJ_STORAGE_KEY ((1u << 1) | (1u << 4) | (1u << 5) | (1u << 6) | (1u << 10) | (1u << 16) | (1u << 17))

#define BUF_MAX 4096
#define NV_CHUNK 512
#define NV_MAX 2048

enum { EXIT_OK = 0, EXIT_RC = 1, EXIT_USAGE = 2, EXIT_IO = 3 };

static const char *device = "/dev/tpmrm0";
static const char *socket_path; /* -S: a swtpm data socket instead of a device */
static int tpm_fd = -1;
static int any_rc; /* a command answered with a non-zero response code */

static void die_io(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    printf("%s error=", cmd);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
    exit(EXIT_IO);
}

/* ---- building commands ------------------------------------------------------------------------ */

struct wr {
    uint8_t b[BUF_MAX];
    size_t n;
    int overflow;
};

static void put(struct wr *w, const void *p, size_t len)
{
    if (w->overflow || len > sizeof w->b - w->n) {
        w->overflow = 1;
        return;
    }
    memcpy(w->b + w->n, p, len);
    w->n += len;
}
static void put8(struct wr *w, uint8_t v) { put(w, &v, 1); }
static void put16(struct wr *w, uint16_t v)
{
    uint8_t b[2] = {v >> 8, v & 0xff};
    put(w, b, 2);
}
static void put32(struct wr *w, uint32_t v)
{
    uint8_t b[4] = {v >> 24, (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff};
    put(w, b, 4);
}
static void put_tpm2b(struct wr *w, const uint8_t *p, uint16_t len)
{
    put16(w, len);
    put(w, p, len);
}

/* A header whose size field is filled in by finish(). */
static void begin(struct wr *w, uint16_t tag, uint32_t cc)
{
    w->n = 0;
    w->overflow = 0;
    put16(w, tag);
    put32(w, 0);
    put32(w, cc);
}

/* The authorization area of one password session with an empty password (for TPM_RH_OWNER). */
static void put_pw_session(struct wr *w)
{
    put32(w, 4 + 2 + 1 + 2); /* authorizationSize */
    put32(w, RS_PW);
    put16(w, 0);             /* nonceCaller: empty */
    put8(w, 0);              /* sessionAttributes */
    put16(w, 0);             /* hmac: the empty password */
}

/* ---- reading responses ------------------------------------------------------------------------ */

struct rd {
    const uint8_t *p;
    size_t len, pos;
    int bad; /* a read went past the end */
};

static int need(struct rd *r, size_t n)
{
    if (r->bad || n > r->len - r->pos) {
        r->bad = 1;
        return 0;
    }
    return 1;
}
static uint8_t get8(struct rd *r)
{
    if (!need(r, 1))
        return 0;
    return r->p[r->pos++];
}
static uint16_t get16(struct rd *r)
{
    if (!need(r, 2))
        return 0;
    uint16_t v = (uint16_t)(r->p[r->pos] << 8 | r->p[r->pos + 1]);
    r->pos += 2;
    return v;
}
static uint32_t get32(struct rd *r)
{
    if (!need(r, 4))
        return 0;
    const uint8_t *q = r->p + r->pos;
    r->pos += 4;
    return (uint32_t)q[0] << 24 | (uint32_t)q[1] << 16 | (uint32_t)q[2] << 8 | q[3];
}
/* A TPM2B: returns a pointer to its bytes and their count, or NULL (r->bad) if it overruns. */
static const uint8_t *get_tpm2b(struct rd *r, uint16_t *len)
{
    *len = get16(r);
    if (!need(r, *len))
        return NULL;
    const uint8_t *p = r->p + r->pos;
    r->pos += *len;
    return p;
}
/* A sub-reader over the next n bytes (for a sized structure). */
static struct rd sub(struct rd *r, size_t n)
{
    struct rd s = {r->p, 0, 0, 1};
    if (need(r, n)) {
        s.p = r->p + r->pos;
        s.len = n;
        s.bad = 0;
        r->pos += n;
    }
    return s;
}

/* ---- response codes ----------------------------------------------------------------------------- */

struct rcname {
    uint32_t rc;
    const char *name;
};
static const struct rcname rc_names[] = {
    {0x100, "INITIALIZE"}, {0x101, "FAILURE"}, {0x103, "SEQUENCE"}, {0x120, "DISABLED"},
    {0x121, "EXCLUSIVE"}, {0x124, "AUTH_TYPE"}, {0x125, "AUTH_MISSING"}, {0x126, "POLICY"},
    {0x12E, "TOO_MANY_CONTEXTS"}, {0x12F, "AUTH_UNAVAILABLE"}, {0x130, "REBOOT"}, {0x142, "COMMAND_SIZE"},
    {0x143, "COMMAND_CODE"}, {0x144, "AUTHSIZE"}, {0x145, "AUTH_CONTEXT"}, {0x146, "NV_RANGE"},
    {0x147, "NV_SIZE"}, {0x148, "NV_LOCKED"}, {0x149, "NV_AUTHORIZATION"}, {0x14A, "NV_UNINITIALIZED"},
    {0x14B, "NV_SPACE"}, {0x14C, "NV_DEFINED"}, {0x150, "BAD_CONTEXT"}, {0x153, "NEEDS_TEST"},
    {0x081, "ASYMMETRIC"}, {0x082, "ATTRIBUTES"}, {0x083, "HASH"}, {0x084, "VALUE"}, {0x085, "HIERARCHY"},
    {0x087, "KEY_SIZE"}, {0x089, "MODE"}, {0x08A, "TYPE"}, {0x08B, "HANDLE"}, {0x08D, "RANGE"},
    {0x08E, "AUTH_FAIL"}, {0x092, "SCHEME"}, {0x095, "SIZE"}, {0x096, "SYMMETRIC"}, {0x097, "TAG"},
    {0x09A, "INSUFFICIENT"}, {0x09C, "KEY"}, {0x0A1, "RESERVED_BITS"}, {0x0A2, "BAD_AUTH"},
    {0x902, "OBJECT_MEMORY"}, {0x903, "SESSION_MEMORY"}, {0x904, "MEMORY"}, {0x907, "LOCALITY"},
    {0x909, "CANCELED"}, {0x90A, "TESTING"}, {0x920, "NV_RATE"}, {0x921, "LOCKOUT"}, {0x922, "RETRY"},
    {0x923, "NV_UNAVAILABLE"},
};

/* " err=NAME" for a response code (format-one codes get +H/+P/+S and the handle/parameter/session number). */
static const char *rc_text(uint32_t rc)
{
    static char s[64];
    uint32_t base = rc, n = 0;
    char where = 0;
    if (rc == 0)
        return "";
    if (rc & 0x80) { /* format one: bits 5:0 error, 6 parameter, 11:8 number */
        base = 0x80 | (rc & 0x3F);
        n = (rc >> 8) & 0xF;
        if (rc & 0x40)
            where = 'P';
        else if (n >= 8)
            where = 'S', n -= 8;
        else if (n > 0)
            where = 'H';
    }
    const char *name = NULL;
    for (size_t i = 0; i < sizeof rc_names / sizeof rc_names[0]; i++)
        if (rc_names[i].rc == base)
            name = rc_names[i].name;
    if (!name)
        snprintf(s, sizeof s, " err=UNKNOWN");
    else if (where)
        snprintf(s, sizeof s, " err=%s+%c%u", name, where, n);
    else
        snprintf(s, sizeof s, " err=%s", name);
    return s;
}

/* ---- the transport ------------------------------------------------------------------------------ */

static void open_device(void)
{
    if (socket_path) {
        struct sockaddr_un sa = {.sun_family = AF_UNIX};
        if (strlen(socket_path) >= sizeof sa.sun_path)
            die_io("open", "socket-path-too-long");
        strcpy(sa.sun_path, socket_path);
        tpm_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (tpm_fd < 0 || connect(tpm_fd, (struct sockaddr *)&sa, sizeof sa) < 0)
            die_io("open", "%s:%s", socket_path, strerror(errno));
        return;
    }
    tpm_fd = open(device, O_RDWR | O_CLOEXEC);
    if (tpm_fd < 0)
        die_io("open", "%s:%s", device, strerror(errno));
}

/*
 * Sends the command in w (its size field set here) and reads the whole response into resp.
 * Returns the response code; *r reads the response after its 10-byte header. A response whose size
 * field is not the number of bytes received, or shorter than a header, ends the program.
 */
static uint32_t transact(const char *cmd, struct wr *w, uint8_t *resp, struct rd *r)
{
    if (w->overflow)
        die_io(cmd, "command-too-large");
    w->b[2] = (uint8_t)(w->n >> 24);
    w->b[3] = (uint8_t)(w->n >> 16);
    w->b[4] = (uint8_t)(w->n >> 8);
    w->b[5] = (uint8_t)w->n;

    size_t off = 0;
    while (off < w->n) {
        ssize_t k = write(tpm_fd, w->b + off, w->n - off);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            die_io(cmd, "write:%s", k < 0 ? strerror(errno) : "short");
        off += (size_t)k;
    }

    /* The driver hands back the whole response; read until the header's size is reached anyway. */
    size_t got = 0, want = 10;
    while (got < want) {
        ssize_t k = read(tpm_fd, resp + got, BUF_MAX - got);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            die_io(cmd, "read:%s", strerror(errno));
        if (k == 0)
            die_io(cmd, "short-response:%zu-bytes", got);
        got += (size_t)k;
        if (want == 10 && got >= 10) {
            uint32_t size = (uint32_t)resp[2] << 24 | (uint32_t)resp[3] << 16 | (uint32_t)resp[4] << 8 | resp[5];
            if (size < 10 || size > BUF_MAX)
                die_io(cmd, "bad-response-size:%u", size);
            want = size;
        }
    }
    if (got != want)
        die_io(cmd, "response-size-mismatch:field=%zu,read=%zu", want, got);

    struct rd h = {resp, got, 0, 0};
    uint16_t tag = get16(&h);
    (void)get32(&h);
    uint32_t rc = get32(&h);
    if (tag != ST_NO_SESSIONS && tag != ST_SESSIONS)
        die_io(cmd, "bad-response-tag:0x%04x", tag);
    *r = h;
    if (rc != 0)
        any_rc = 1;
    return rc;
}

/* After the handles of a response with sessions: a reader over exactly the parameter area. */
static struct rd params_of(const char *cmd, struct rd *r, uint16_t tag_sent)
{
    if (tag_sent != ST_SESSIONS)
        return sub(r, r->len - r->pos);
    uint32_t psize = get32(r);
    struct rd p = sub(r, psize);
    if (p.bad)
        die_io(cmd, "bad-parameter-size:%u", psize);
    return p;
}

static void print_hex(const uint8_t *p, size_t n)
{
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        putchar(digits[p[i] >> 4]);
        putchar(digits[p[i] & 15]);
    }
}

/* ---- the commands ----------------------------------------------------------------------------- */

static uint8_t resp_buf[BUF_MAX];

/* GetRandom until n bytes are in out (a TPM gives at most a digest's size per command). */
static uint32_t get_random(uint8_t *out, size_t n, unsigned *commands)
{
    struct wr w;
    struct rd r;
    size_t have = 0;
    while (have < n) {
        size_t ask = n - have > 64 ? 64 : n - have;
        begin(&w, ST_NO_SESSIONS, CC_GET_RANDOM);
        put16(&w, (uint16_t)ask);
        uint32_t rc = transact("getrandom", &w, resp_buf, &r);
        (*commands)++;
        if (rc)
            return rc;
        uint16_t len;
        const uint8_t *p = get_tpm2b(&r, &len);
        if (!p || len > ask || len == 0)
            die_io("getrandom", "bad-random-bytes:%u-of-%zu", p ? len : 0, ask);
        memcpy(out + have, p, len);
        have += len;
    }
    return 0;
}

static int cmd_getrandom(size_t n)
{
    uint8_t out[BUF_MAX];
    unsigned commands = 0;
    uint32_t rc = get_random(out, n, &commands);
    printf("getrandom rc=0x%03x", rc);
    if (rc == 0) {
        printf(" bytes=%zu commands=%u hex=", n, commands);
        print_hex(out, n);
    }
    printf("%s\n", rc_text(rc));
    return rc ? EXIT_RC : EXIT_OK;
}

/* A 4-byte property value as text: printable characters kept, trailing blanks/NULs dropped, other bytes '_'. */
static void print_chars(uint32_t v)
{
    char s[5];
    int n = 0;
    for (int i = 0; i < 4; i++) {
        char c = (char)(v >> (24 - 8 * i));
        s[n++] = (c > ' ' && c < 127) ? c : (c == ' ' || c == 0) ? ' ' : '_';
    }
    while (n > 0 && s[n - 1] == ' ')
        n--;
    for (int i = 0; i < n; i++)
        putchar(s[i] == ' ' ? '_' : s[i]);
}

static int cmd_getcap(void)
{
    struct wr w;
    struct rd r;
    begin(&w, ST_NO_SESSIONS, CC_GET_CAPABILITY);
    put32(&w, CAP_TPM_PROPERTIES);
    put32(&w, PT_FIXED);
    put32(&w, 13); /* FAMILY_INDICATOR .. FIRMWARE_VERSION_2 */
    uint32_t rc = transact("getcap", &w, resp_buf, &r);
    if (rc) {
        printf("getcap rc=0x%03x%s\n", rc, rc_text(rc));
        return EXIT_RC;
    }
    (void)get8(&r); /* moreData */
    uint32_t cap = get32(&r), count = get32(&r);
    if (r.bad || cap != CAP_TPM_PROPERTIES || count > 64)
        die_io("getcap", "bad-capability-data:cap=%u,count=%u", cap, count);
    uint32_t v[13] = {0};
    int seen[13] = {0};
    for (uint32_t i = 0; i < count; i++) {
        uint32_t prop = get32(&r), val = get32(&r);
        if (r.bad)
            die_io("getcap", "truncated-property-list:%u-of-%u", i, count);
        if (prop >= PT_FIXED && prop < PT_FIXED + 13)
            v[prop - PT_FIXED] = val, seen[prop - PT_FIXED] = 1;
    }
    if (!seen[0] || !seen[5])
        die_io("getcap", "no-family-or-manufacturer");
    printf("getcap rc=0x000 family=");
    print_chars(v[0]);
    printf(" manufacturer=");
    print_chars(v[5]);
    printf(" mfr=0x%08x vendor=", v[5]);
    for (int i = 6; i <= 9; i++)
        if (seen[i])
            print_chars(v[i]);
    printf(" revision=%u.%02u year=%u firmware=0x%08x.%08x\n", v[2] / 100, v[2] % 100, v[4], v[11], v[12]);
    return EXIT_OK;
}

static int cmd_nvdefine(uint32_t index, uint16_t size)
{
    struct wr w;
    struct rd r;
    begin(&w, ST_SESSIONS, CC_NV_DEFINE_SPACE);
    put32(&w, RH_OWNER);
    put_pw_session(&w);
    put16(&w, 0); /* auth: empty */
    put16(&w, 4 + 2 + 4 + 2 + 2); /* TPM2B_NV_PUBLIC */
    put32(&w, index);
    put16(&w, ALG_SHA256);
    put32(&w, NV_OWNERWRITE | NV_OWNERREAD); /* an ordinary index (TPM_NT 0) */
    put16(&w, 0); /* authPolicy: empty */
    put16(&w, size);
    uint32_t rc = transact("nvdefine", &w, resp_buf, &r);
    printf("nvdefine rc=0x%03x index=0x%08x size=%u%s\n", rc, index, size, rc_text(rc));
    return rc ? EXIT_RC : EXIT_OK;
}

static int cmd_nvundefine(uint32_t index)
{
    struct wr w;
    struct rd r;
    begin(&w, ST_SESSIONS, CC_NV_UNDEFINE_SPACE);
    put32(&w, RH_OWNER);
    put32(&w, index);
    put_pw_session(&w);
    uint32_t rc = transact("nvundefine", &w, resp_buf, &r);
    printf("nvundefine rc=0x%03x index=0x%08x%s\n", rc, index, rc_text(rc));
    return rc ? EXIT_RC : EXIT_OK;
}

static int cmd_nvwrite(uint32_t index, const uint8_t *data, size_t n)
{
    struct wr w;
    struct rd r;
    uint32_t rc = 0;
    size_t off = 0; /* bytes written */
    unsigned commands = 0;
    do {
        size_t chunk = n - off > NV_CHUNK ? NV_CHUNK : n - off;
        begin(&w, ST_SESSIONS, CC_NV_WRITE);
        put32(&w, RH_OWNER); /* authHandle: the owner (TPMA_NV_OWNERWRITE) */
        put32(&w, index);
        put_pw_session(&w);
        put_tpm2b(&w, data + off, (uint16_t)chunk);
        put16(&w, (uint16_t)off);
        rc = transact("nvwrite", &w, resp_buf, &r);
        commands++;
        if (rc == 0)
            off += chunk;
    } while (rc == 0 && off < n);
    printf("nvwrite rc=0x%03x index=0x%08x bytes=%zu commands=%u%s\n", rc, index, off, commands, rc_text(rc));
    return rc ? EXIT_RC : EXIT_OK;
}

static int cmd_nvread(uint32_t index, size_t n)
{
    struct wr w;
    struct rd r;
    uint8_t out[NV_MAX];
    uint32_t rc = 0;
    size_t off = 0;
    unsigned commands = 0;
    do {
        size_t chunk = n - off > NV_CHUNK ? NV_CHUNK : n - off;
        begin(&w, ST_SESSIONS, CC_NV_READ);
        put32(&w, RH_OWNER); /* authHandle: the owner (TPMA_NV_OWNERREAD) */
        put32(&w, index);
        put_pw_session(&w);
        put16(&w, (uint16_t)chunk);
        put16(&w, (uint16_t)off);
        rc = transact("nvread", &w, resp_buf, &r);
        commands++;
        if (rc)
            break;
        struct rd p = params_of("nvread", &r, ST_SESSIONS);
        uint16_t len;
        const uint8_t *d = get_tpm2b(&p, &len);
        if (!d || len != chunk)
            die_io("nvread", "bad-data-size:%u-expected-%zu", d ? len : 0, chunk);
        memcpy(out + off, d, len);
        off += chunk;
    } while (off < n);
    printf("nvread rc=0x%03x index=0x%08x", rc, index);
    if (rc == 0) {
        printf(" bytes=%zu commands=%u hex=", n, commands);
        print_hex(out, n);
    }
    printf("%s\n", rc_text(rc));
    return rc ? EXIT_RC : EXIT_OK;
}

struct primary {
    uint32_t handle;
    uint16_t keybits, modulus_len;
    uint8_t modulus_head[16];
};

/*
 * CreatePrimary of an RSA 2048 restricted decryption (storage) key, AES-128-CFB, under the owner.
 * variant 0: the empty unique field (the same key for the same owner seed: the e2e test compares it
 * across boots); variant n > 0: unique = n (4 bytes), which derives a different key from the same seed.
 */
static uint32_t create_primary(struct primary *out, uint32_t variant)
{
    struct wr w;
    struct rd r;
    begin(&w, ST_SESSIONS, CC_CREATE_PRIMARY);
    put32(&w, RH_OWNER);
    put_pw_session(&w);
    put16(&w, 4);  /* TPM2B_SENSITIVE_CREATE */
    put16(&w, 0);  /*   userAuth */
    put16(&w, 0);  /*   data */
    put16(&w, 2 + 2 + 4 + 2 + (2 + 2 + 2) + 2 + 2 + 4 + 2 + (variant ? 4 : 0)); /* TPM2B_PUBLIC */
    put16(&w, ALG_RSA);
    put16(&w, ALG_SHA256);
    put32(&w, OBJ_STORAGE_KEY);
    put16(&w, 0);  /* authPolicy */
    put16(&w, ALG_AES); /* symmetric */
    put16(&w, 128);
    put16(&w, ALG_CFB);
    put16(&w, ALG_NULL); /* scheme */
    put16(&w, 2048);     /* keyBits */
    put32(&w, 0);        /* exponent: the default 65537 */
    if (variant) {       /* unique */
        put16(&w, 4);
        put32(&w, variant);
    } else {
        put16(&w, 0);
    }
    put16(&w, 0);        /* outsideInfo */
    put32(&w, 0);        /* creationPCR: no selections */
    uint32_t rc = transact("createprimary", &w, resp_buf, &r);
    if (rc)
        return rc;
    memset(out, 0, sizeof *out);
    out->handle = get32(&r);
    struct rd p = params_of("createprimary", &r, ST_SESSIONS);
    uint16_t publen = get16(&p);
    struct rd pub = sub(&p, publen);
    uint16_t type = get16(&pub);
    (void)get16(&pub);   /* nameAlg */
    (void)get32(&pub);   /* objectAttributes */
    uint16_t n;
    (void)get_tpm2b(&pub, &n); /* authPolicy */
    if (get16(&pub) != ALG_NULL) { /* symmetric: keyBits, mode */
        (void)get16(&pub);
        (void)get16(&pub);
    }
    if (get16(&pub) != ALG_NULL) /* scheme: hashAlg */
        (void)get16(&pub);
    out->keybits = get16(&pub);
    (void)get32(&pub); /* exponent */
    const uint8_t *mod = get_tpm2b(&pub, &out->modulus_len);
    if (r.bad || p.bad || pub.bad || !mod || type != ALG_RSA || out->modulus_len < sizeof out->modulus_head)
        die_io("createprimary", "malformed-outPublic:type=0x%04x,size=%u", type, publen);
    memcpy(out->modulus_head, mod, sizeof out->modulus_head);
    return 0;
}

static uint32_t flush_context(uint32_t handle)
{
    struct wr w;
    struct rd r;
    begin(&w, ST_NO_SESSIONS, CC_FLUSH_CONTEXT);
    put32(&w, handle);
    return transact("flushcontext", &w, resp_buf, &r);
}

static int cmd_createprimary(void)
{
    struct primary k;
    uint32_t rc = create_primary(&k, 0);
    printf("createprimary rc=0x%03x", rc);
    if (rc == 0) {
        uint32_t frc = flush_context(k.handle);
        printf(" handle=0x%08x keybits=%u modulus_bytes=%u modulus_head=", k.handle, k.keybits, k.modulus_len);
        print_hex(k.modulus_head, sizeof k.modulus_head);
        printf(" flush_rc=0x%03x%s\n", frc, rc_text(frc));
        return frc ? EXIT_RC : EXIT_OK;
    }
    printf("%s\n", rc_text(rc));
    return EXIT_RC;
}

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static int cmd_bench(const char *what, unsigned count, size_t bytes)
{
    uint8_t out[BUF_MAX];
    unsigned commands = 0, done = 0;
    uint32_t rc = 0;
    double t0 = now_ms();
    if (strcmp(what, "getrandom") == 0) {
        for (; done < count && rc == 0; done++)
            rc = get_random(out, bytes, &commands);
    } else {
        struct primary k;
        /* A different key each time: the search for RSA primes takes a seed-dependent time, and
         * the owner seed differs between TPM states; COUNT keys average that out. */
        for (; done < count && rc == 0; done++) {
            rc = create_primary(&k, done + 1);
            commands++;
            if (rc == 0) {
                rc = flush_context(k.handle);
                commands++;
            }
        }
    }
    double ms = now_ms() - t0;
    printf("bench %s rc=0x%03x count=%u", what, rc, rc ? done - 1 : done);
    if (strcmp(what, "getrandom") == 0)
        printf(" bytes=%zu", bytes);
    printf(" commands=%u ms=%.3f", commands, ms);
    if (rc == 0 && count > 0)
        printf(" per_op_ms=%.3f", ms / count);
    printf("%s\n", rc_text(rc));
    return rc ? EXIT_RC : EXIT_OK;
}

/* One NV_Write of n (<= NV_CHUNK) bytes at offset off, owner authorization. */
static uint32_t nv_write_once(uint32_t index, const uint8_t *data, size_t n, uint16_t off)
{
    struct wr w;
    struct rd r;
    begin(&w, ST_SESSIONS, CC_NV_WRITE);
    put32(&w, RH_OWNER);
    put32(&w, index);
    put_pw_session(&w);
    put_tpm2b(&w, data, (uint16_t)n);
    put16(&w, off);
    return transact("nvwrite", &w, resp_buf, &r);
}

/* One NV_Read of n (<= NV_CHUNK) bytes from offset 0 into out. */
static uint32_t nv_read_once(uint32_t index, uint8_t *out, size_t n)
{
    struct wr w;
    struct rd r;
    begin(&w, ST_SESSIONS, CC_NV_READ);
    put32(&w, RH_OWNER);
    put32(&w, index);
    put_pw_session(&w);
    put16(&w, (uint16_t)n);
    put16(&w, 0);
    uint32_t rc = transact("nvread", &w, resp_buf, &r);
    if (rc)
        return rc;
    struct rd p = params_of("nvread", &r, ST_SESSIONS);
    uint16_t len;
    const uint8_t *d = get_tpm2b(&p, &len);
    if (!d || len != n)
        die_io("nvread", "bad-data-size:%u-expected-%zu", d ? len : 0, n);
    memcpy(out, d, n);
    return 0;
}

static uint32_t nv_define_quiet(uint32_t index, uint16_t size)
{
    struct wr w;
    struct rd r;
    begin(&w, ST_SESSIONS, CC_NV_DEFINE_SPACE);
    put32(&w, RH_OWNER);
    put_pw_session(&w);
    put16(&w, 0);
    put16(&w, 4 + 2 + 4 + 2 + 2);
    put32(&w, index);
    put16(&w, ALG_SHA256);
    put32(&w, NV_OWNERWRITE | NV_OWNERREAD);
    put16(&w, 0);
    put16(&w, size);
    return transact("nvdefine", &w, resp_buf, &r);
}

static uint32_t nv_undefine_quiet(uint32_t index)
{
    struct wr w;
    struct rd r;
    begin(&w, ST_SESSIONS, CC_NV_UNDEFINE_SPACE);
    put32(&w, RH_OWNER);
    put32(&w, index);
    put_pw_session(&w);
    return transact("nvundefine", &w, resp_buf, &r);
}

#define BENCH_NV_INDEX 0x01500002u
#define RC_NV_DEFINED 0x14Cu

/* bench nvwrite: COUNT NV_Writes of BYTES bytes to a fresh index; the last one read back. */
static int cmd_bench_nvwrite(unsigned count, size_t bytes)
{
    uint8_t data[NV_CHUNK], back[NV_CHUNK];
    const char *step = "define";
    uint32_t rc = nv_define_quiet(BENCH_NV_INDEX, (uint16_t)bytes);
    if (rc == RC_NV_DEFINED) { /* left over from an earlier run: start from a fresh index */
        rc = nv_undefine_quiet(BENCH_NV_INDEX);
        if (rc == 0)
            rc = nv_define_quiet(BENCH_NV_INDEX, (uint16_t)bytes);
    }
    unsigned done = 0;
    double ms = 0;
    const char *verify = "-";
    if (rc == 0) {
        step = "write";
        double t0 = now_ms();
        for (; done < count; done++) {
            for (size_t k = 0; k < bytes; k++)
                data[k] = (uint8_t)(done * 131u + k * 7u + (done >> 8));
            rc = nv_write_once(BENCH_NV_INDEX, data, bytes, 0);
            if (rc)
                break;
        }
        ms = now_ms() - t0;
    }
    if (rc == 0) {
        step = "read";
        rc = nv_read_once(BENCH_NV_INDEX, back, bytes);
        if (rc == 0)
            verify = memcmp(back, data, bytes) == 0 ? "ok" : "mismatch";
    }
    uint32_t urc = nv_undefine_quiet(BENCH_NV_INDEX);
    printf("bench nvwrite rc=0x%03x count=%u bytes=%zu commands=%u ms=%.3f", rc, done, bytes, done, ms);
    if (rc == 0 && count > 0)
        printf(" per_op_ms=%.3f", ms / count);
    printf(" verify=%s undefine_rc=0x%03x", verify, urc);
    if (rc)
        printf(" step=%s%s", step, rc_text(rc));
    putchar('\n');
    if (rc || urc)
        return EXIT_RC;
    return strcmp(verify, "ok") == 0 ? EXIT_OK : EXIT_RC;
}

/* loop createprimary: see the header comment. */
static int cmd_loop_createprimary(const char *stopfile)
{
    for (unsigned long i = 1;; i++) {
        if (stopfile && access(stopfile, F_OK) == 0) {
            printf("loop stopped after=%lu\n", i - 1);
            return EXIT_OK;
        }
        struct primary k;
        uint32_t rc = create_primary(&k, 0);
        const char *step = "createprimary";
        if (rc == 0) {
            step = "flush";
            rc = flush_context(k.handle);
        }
        if (rc) {
            printf("loop i=%lu rc=0x%03x step=%s%s\n", i, rc, step, rc_text(rc));
            return EXIT_RC;
        }
        printf("loop i=%lu rc=0x000 key=", i);
        print_hex(k.modulus_head, 4);
        putchar('\n');
    }
}

/* ---- arguments -------------------------------------------------------------------------------- */

static int usage(void)
{
    fprintf(stderr,
            "usage: tpm2cmd [-d | -D DEVICE | -S SOCKET] COMMAND ...\n"
            "  getrandom N | getcap | nvdefine INDEX SIZE | nvwrite INDEX HEXDATA | nvread INDEX SIZE |\n"
            "  nvundefine INDEX | createprimary | bench getrandom COUNT BYTES | bench createprimary COUNT |\n"
            "  bench nvwrite COUNT BYTES | loop createprimary [STOPFILE]\n"
            "  (default device /dev/tpmrm0; -d: /dev/tpm0; -S: a swtpm --server type=unixio socket)\n");
    return EXIT_USAGE;
}

/* A whole number in [lo, hi] (decimal or 0x hex), or -1. */
static long long number(const char *s, long long lo, long long hi)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 0);
    if (errno || end == s || *end || v < lo || v > hi)
        return -1;
    return v;
}

static long long nv_index(const char *s)
{
    long long v = number(s, 0x01000000, 0x01FFFFFF);
    if (v < 0)
        fprintf(stderr, "tpm2cmd: %s is not an NV index (0x01000000..0x01ffffff)\n", s);
    return v;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int main(int argc, char **argv)
{
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (strcmp(argv[i], "-d") == 0)
            device = "/dev/tpm0";
        else if (strcmp(argv[i], "-D") == 0 && i + 1 < argc)
            device = argv[++i];
        else if (strcmp(argv[i], "-S") == 0 && i + 1 < argc)
            socket_path = argv[++i];
        else
            return usage();
    }
    if (i >= argc)
        return usage();
    const char *cmd = argv[i];
    char **a = argv + i + 1;
    int na = argc - i - 1;
    setvbuf(stdout, NULL, _IOLBF, 0);

    if (strcmp(cmd, "getrandom") == 0 && na == 1) {
        long long n = number(a[0], 1, BUF_MAX);
        if (n < 0)
            return usage();
        open_device();
        return cmd_getrandom((size_t)n);
    }
    if (strcmp(cmd, "getcap") == 0 && na == 0) {
        open_device();
        return cmd_getcap();
    }
    if (strcmp(cmd, "nvdefine") == 0 && na == 2) {
        long long idx = nv_index(a[0]), size = number(a[1], 1, NV_MAX);
        if (idx < 0 || size < 0)
            return usage();
        open_device();
        return cmd_nvdefine((uint32_t)idx, (uint16_t)size);
    }
    if (strcmp(cmd, "nvundefine") == 0 && na == 1) {
        long long idx = nv_index(a[0]);
        if (idx < 0)
            return usage();
        open_device();
        return cmd_nvundefine((uint32_t)idx);
    }
    if (strcmp(cmd, "nvwrite") == 0 && na == 2) {
        long long idx = nv_index(a[0]);
        size_t len = strlen(a[1]);
        uint8_t data[NV_MAX];
        if (idx < 0 || len == 0 || len % 2 || len / 2 > NV_MAX) {
            fprintf(stderr, "tpm2cmd: nvwrite needs 1..%d bytes as an even number of hex digits\n", NV_MAX);
            return EXIT_USAGE;
        }
        for (size_t k = 0; k < len / 2; k++) {
            int hi = hexval(a[1][2 * k]), lo = hexval(a[1][2 * k + 1]);
            if (hi < 0 || lo < 0) {
                fprintf(stderr, "tpm2cmd: %s is not hex\n", a[1]);
                return EXIT_USAGE;
            }
            data[k] = (uint8_t)(hi << 4 | lo);
        }
        open_device();
        return cmd_nvwrite((uint32_t)idx, data, len / 2);
    }
    if (strcmp(cmd, "nvread") == 0 && na == 2) {
        long long idx = nv_index(a[0]), size = number(a[1], 1, NV_MAX);
        if (idx < 0 || size < 0)
            return usage();
        open_device();
        return cmd_nvread((uint32_t)idx, (size_t)size);
    }
    if (strcmp(cmd, "createprimary") == 0 && na == 0) {
        open_device();
        return cmd_createprimary();
    }
    if (strcmp(cmd, "bench") == 0 && na >= 2) {
        long long count = number(a[1], 1, 1000000);
        if (count < 0)
            return usage();
        if (strcmp(a[0], "getrandom") == 0 && na == 3) {
            long long bytes = number(a[2], 1, BUF_MAX);
            if (bytes < 0)
                return usage();
            open_device();
            return cmd_bench("getrandom", (unsigned)count, (size_t)bytes);
        }
        if (strcmp(a[0], "createprimary") == 0 && na == 2) {
            open_device();
            return cmd_bench("createprimary", (unsigned)count, 0);
        }
        if (strcmp(a[0], "nvwrite") == 0 && na == 3) {
            long long bytes = number(a[2], 1, NV_CHUNK);
            if (bytes < 0)
                return usage();
            open_device();
            return cmd_bench_nvwrite((unsigned)count, (size_t)bytes);
        }
    }
    if (strcmp(cmd, "loop") == 0 && (na == 1 || na == 2) && strcmp(a[0], "createprimary") == 0) {
        open_device();
        return cmd_loop_createprimary(na == 2 ? a[1] : NULL);
    }
    return usage();
}
