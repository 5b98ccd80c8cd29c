/*
 * main.c: SwiftVMM firmware, 32-bit protected mode part.
 *
 * Reads everything it needs from QEMU-compatible fw_cfg (I/O ports 0x510/0x511, DMA at 0x514), runs
 * the ACPI linker/loader script etc/table-loader, builds boot_params and enters Linux through the
 * 32-bit boot protocol. See firmware/README.md for the contract with the VMM.
 *
 * Console output: exactly one line on success, plus one line per error ("swiftvmm-fw: ...").
 */
#include "layout.h"

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned long uptr;

_Static_assert(sizeof(u32) == 4 && sizeof(u64) == 8 && sizeof(uptr) == 4, "built with -m32");

/* ------------------------------------------------------------------------------------------------ */
/* Freestanding helpers (gcc may emit calls to these)                                               */

void *memcpy(void *d, const void *s, uptr n)
{
    u8 *dp = d;
    const u8 *sp = s;
    while (n--)
        *dp++ = *sp++;
    return d;
}

void *memset(void *d, int c, uptr n)
{
    u8 *dp = d;
    while (n--)
        *dp++ = (u8)c;
    return d;
}

void *memmove(void *d, const void *s, uptr n)
{
    u8 *dp = d;
    const u8 *sp = s;
    if (dp < sp)
        return memcpy(d, s, n);
    while (n--)
        dp[n] = sp[n];
    return d;
}

int memcmp(const void *a, const void *b, uptr n)
{
    const u8 *ap = a, *bp = b;
    for (; n; n--, ap++, bp++)
        if (*ap != *bp)
            return *ap - *bp;
    return 0;
}

/* Compares two NUL-terminated names of at most `max` bytes (fw_cfg and loader names: 56 bytes). */
static int name_eq(const char *a, const char *b, u32 max)
{
    for (u32 i = 0; i < max; i++) {
        if (a[i] != b[i])
            return 0;
        if (!a[i])
            return 1;
    }
    return 1;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
    return v;
}
static inline void insb(u16 port, void *dst, u32 n)
{
    __asm__ volatile("rep insb" : "+D"(dst), "+c"(n) : "d"(port) : "memory");
}
static inline u64 rdtsc(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 *a, u32 *b, u32 *c, u32 *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}
static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}
static inline void wrmsr(u32 msr, u64 v)
{
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}
static inline u16 rd16(const u8 *p) { return (u16)(p[0] | p[1] << 8); }
static inline u32 rd32(const u8 *p) { return rd16(p) | (u32)rd16(p + 2) << 16; }
static inline u64 rd64(const u8 *p) { return rd32(p) | (u64)rd32(p + 4) << 32; }
static inline u32 bswap32(u32 v) { return __builtin_bswap32(v); }
static inline u16 bswap16(u16 v) { return __builtin_bswap16(v); }

static __attribute__((noreturn)) void halt(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* 64-by-32-bit division without libgcc (there is no 32-bit libgcc in a plain amd64 toolchain). */
static u64 div64(u64 n, u32 d, u32 *rem)
{
    u32 hi = (u32)(n >> 32), lo = (u32)n, qhi = hi / d, r = hi % d, qlo;
    __asm__("divl %4" : "=a"(qlo), "=d"(r) : "a"(lo), "d"(r), "rm"(d));
    if (rem)
        *rem = r;
    return ((u64)qhi << 32) | qlo;
}

/* ------------------------------------------------------------------------------------------------ */
/* COM1: write bytes to THR; the VMM's UART (and QEMU's) is always ready.                           */

#define COM1 0x3F8

static void puts(const char *s)
{
    while (*s)
        outb(COM1, (u8)*s++);
}

static void putdec(u64 v)
{
    char buf[24];
    int i = sizeof buf;
    buf[--i] = 0;
    do {
        u32 r;
        v = div64(v, 10, &r);
        buf[--i] = (char)('0' + r);
    } while (v);
    puts(&buf[i]);
}

static void puthex(u64 v)
{
    char buf[20];
    int i = sizeof buf;
    buf[--i] = 0;
    do {
        buf[--i] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    buf[--i] = 'x';
    buf[--i] = '0';
    puts(&buf[i]);
}

/* Prints a file name from a loader entry or the directory (at most 56 bytes). */
static void putname(const char *name)
{
    char buf[57];
    memcpy(buf, name, 56);
    buf[56] = 0;
    puts(buf);
}

static __attribute__((noreturn)) void fatal(const char *msg)
{
    puts("swiftvmm-fw: fatal: ");
    puts(msg);
    puts("\n");
    halt();
}

/* ------------------------------------------------------------------------------------------------ */
/* fw_cfg                                                                                           */

#define FW_CFG_PORT_SEL  0x510
#define FW_CFG_PORT_DATA 0x511
#define FW_CFG_PORT_DMA  0x514 /* high 32 bits BE at 0x514, low 32 bits BE at 0x518 (starts) */

#define FW_CFG_SIGNATURE    0x0000
#define FW_CFG_ID           0x0001
#define FW_CFG_KERNEL_SIZE  0x0008
#define FW_CFG_INITRD_SIZE  0x000B
#define FW_CFG_KERNEL_DATA  0x0011
#define FW_CFG_INITRD_DATA  0x0012
#define FW_CFG_CMDLINE_SIZE 0x0014
#define FW_CFG_CMDLINE_DATA 0x0015
#define FW_CFG_SETUP_SIZE   0x0017
#define FW_CFG_SETUP_DATA   0x0018
#define FW_CFG_FILE_DIR     0x0019

#define FW_CFG_VERSION_DMA 0x02

#define DMA_CTL_ERROR  0x01
#define DMA_CTL_READ   0x02
#define DMA_CTL_SKIP   0x04
#define DMA_CTL_SELECT 0x08
#define DMA_CTL_WRITE  0x10

struct fw_cfg_dma {
    u32 control; /* all BE */
    u32 length;
    u64 address;
} __attribute__((packed));

struct fw_cfg_file {
    u32 size; /* BE */
    u16 select; /* BE */
    u16 reserved;
    char name[56];
} __attribute__((packed));
_Static_assert(sizeof(struct fw_cfg_file) == 64, "fw_cfg directory entry");

static int fw_dma;

/* One DMA transfer; returns 0 on success, -1 if the device set ERROR. The descriptor is on the
 * stack (RAM). QEMU and the SwiftVMM device complete synchronously; the loop is for others. */
static int fw_cfg_dma(u32 control, void *buf, u32 len)
{
    volatile struct fw_cfg_dma d;
    d.control = bswap32(control);
    d.length = bswap32(len);
    d.address = (u64)bswap32((u32)(uptr)buf) << 32; /* BE u64 of a 32-bit address */
    /* The high half of the DMA address register is 0 at rest (QEMU and SwiftVMM clear the register
     * when a transfer starts) and the descriptor is below 4 GiB: writing the low half alone saves a
     * VM exit per transfer. */
    outl(FW_CFG_PORT_DMA + 4, bswap32((u32)(uptr)&d));
    u32 c;
    while ((c = bswap32(d.control)) & ~(u32)DMA_CTL_ERROR)
        __asm__ volatile("pause" ::: "memory");
    return (c & DMA_CTL_ERROR) ? -1 : 0;
}

/* Reads `len` bytes from offset 0 of item `key` to `dst`. */
static void fw_read(u16 key, void *dst, u32 len)
{
    if (fw_dma) {
        if (fw_cfg_dma(((u32)key << 16) | DMA_CTL_SELECT | DMA_CTL_READ, dst, len) == 0)
            return;
        puts("swiftvmm-fw: fw_cfg DMA read failed, item ");
        puthex(key);
        puts("\n");
        memset(dst, 0, len);
        return;
    }
    outw(FW_CFG_PORT_SEL, key);
    insb(FW_CFG_PORT_DATA, dst, len);
}

static u32 fw_read32(u16 key)
{
    u32 v = 0;
    fw_read(key, &v, 4);
    return v; /* legacy numeric items are little-endian */
}

/* Writes `len` bytes at offset `off` of item `key` (DMA only): one SELECT|WRITE descriptor when the
 * offset is 0, else SELECT|SKIP then WRITE, as SeaBIOS does. Returns 0 on success. */
static int fw_write(u16 key, u32 off, void *src, u32 len)
{
    if (!fw_dma)
        return -1;
    u32 sel = ((u32)key << 16) | DMA_CTL_SELECT;
    if (off == 0)
        return fw_cfg_dma(sel | DMA_CTL_WRITE, src, len);
    if (fw_cfg_dma(sel | DMA_CTL_SKIP, 0, off) != 0)
        return -1;
    return fw_cfg_dma(DMA_CTL_WRITE, src, len);
}

static u32 dir_count;
#define dir_entries ((const struct fw_cfg_file *)(DIR_BUF + 4))
#define DIR_MAX ((DIR_BUF_SIZE - 4) / sizeof(struct fw_cfg_file))

static void fw_read_dir(void)
{
    u32 be_count = 0;
    fw_read(FW_CFG_FILE_DIR, &be_count, 4);
    dir_count = bswap32(be_count);
    if (dir_count > DIR_MAX) {
        puts("swiftvmm-fw: fw_cfg directory truncated to ");
        putdec(DIR_MAX);
        puts(" files\n");
        dir_count = DIR_MAX;
    }
    fw_read(FW_CFG_FILE_DIR, (void *)DIR_BUF, 4 + dir_count * sizeof(struct fw_cfg_file));
}

/* Looks a file up by name; returns its directory entry or 0. */
static const struct fw_cfg_file *fw_find(const char *name)
{
    for (u32 i = 0; i < dir_count; i++)
        if (name_eq(dir_entries[i].name, name, 56))
            return &dir_entries[i];
    return 0;
}

/* ------------------------------------------------------------------------------------------------ */
/* e820                                                                                             */

struct e820_entry {
    u64 addr;
    u64 size;
    u32 type;
} __attribute__((packed));
_Static_assert(sizeof(struct e820_entry) == 20, "e820 entry");

#define E820_MAX 128
#define E820_RAM 1
#define E820_RESERVED 2

static struct e820_entry e820[E820_MAX];
static u32 e820_n;

/* Marks [start, end) as `type` where the map says RAM, splitting entries as needed. */
static void e820_mark(u64 start, u64 end, u32 type)
{
    struct e820_entry out[E820_MAX];
    u32 m = 0, lost = 0;
#define PUSH(a, s, t)                                                                              \
    do {                                                                                           \
        if (m < E820_MAX)                                                                          \
            out[m++] = (struct e820_entry){(a), (s), (t)};                                         \
        else                                                                                       \
            lost = 1;                                                                              \
    } while (0)
    for (u32 i = 0; i < e820_n; i++) {
        u64 s = e820[i].addr, x = e820[i].addr + e820[i].size;
        if (e820[i].type != E820_RAM || x <= start || s >= end) {
            PUSH(e820[i].addr, e820[i].size, e820[i].type);
            continue;
        }
        u64 ms = s > start ? s : start, me = x < end ? x : end;
        if (s < ms)
            PUSH(s, ms - s, E820_RAM);
        PUSH(ms, me - ms, type);
        if (me < x)
            PUSH(me, x - me, E820_RAM);
    }
#undef PUSH
    if (lost)
        puts("swiftvmm-fw: e820 table full, entries dropped\n");
    memcpy(e820, out, m * sizeof out[0]);
    e820_n = m;
}

/* ------------------------------------------------------------------------------------------------ */
/* etc/table-loader (QEMU hw/acpi/bios-linker-loader.c)                                             */

#define LOADER_FILESZ 56
#define CMD_ALLOCATE 1
#define CMD_ADD_POINTER 2
#define CMD_ADD_CHECKSUM 3
#define CMD_WRITE_POINTER 4
#define ZONE_HIGH 1
#define ZONE_FSEG 2

struct loader_entry {
    u32 command;
    union {
        struct {
            char file[LOADER_FILESZ];
            u32 align;
            u8 zone;
        } __attribute__((packed)) alloc;
        struct {
            char dest_file[LOADER_FILESZ];
            char src_file[LOADER_FILESZ];
            u32 offset;
            u8 size;
        } __attribute__((packed)) pointer;
        struct {
            char file[LOADER_FILESZ];
            u32 offset;
            u32 start;
            u32 length;
        } __attribute__((packed)) cksum;
        struct {
            char dest_file[LOADER_FILESZ];
            char src_file[LOADER_FILESZ];
            u32 dst_offset;
            u32 src_offset;
            u8 size;
        } __attribute__((packed)) wr_pointer;
        u8 pad[124];
    };
} __attribute__((packed));
_Static_assert(sizeof(struct loader_entry) == 128, "table-loader entry");
_Static_assert(__builtin_offsetof(struct loader_entry, alloc.zone) == 64, "zone");
_Static_assert(__builtin_offsetof(struct loader_entry, pointer.size) == 120, "pointer size");
_Static_assert(__builtin_offsetof(struct loader_entry, cksum.length) == 68, "checksum length");
_Static_assert(__builtin_offsetof(struct loader_entry, wr_pointer.size) == 124, "write pointer size");

#define MAX_ALLOCS 64
struct allocation {
    char name[LOADER_FILESZ];
    u32 addr;
    u32 size;
    u8 zone;
};
static struct allocation allocs[MAX_ALLOCS];
static u32 nallocs;

static u32 high_top;   /* end of the HIGH zone's RAM range (exclusive) */
static u32 high_ptr;   /* HIGH bump pointer: lowest allocated address so far (allocations grow down) */
static u32 high_floor; /* HIGH allocations stay at or above this */
static u32 fseg_ptr = 0; /* FSEG bump pointer (grows up); 0 until the first FSEG allocation */
static int loader_ok;    /* the script ran to its end without an error */

static const struct allocation *find_alloc(const char *name)
{
    for (u32 i = 0; i < nallocs; i++)
        if (name_eq(allocs[i].name, name, LOADER_FILESZ))
            return &allocs[i];
    return 0;
}

static int loader_error(const char *what, const char *name)
{
    puts("swiftvmm-fw: table-loader: ");
    puts(what);
    if (name) {
        puts(" \"");
        putname(name);
        puts("\"");
    }
    puts("; ACPI tables not loaded\n");
    return -1;
}

static int is_valid_size(u8 size) { return size == 1 || size == 2 || size == 4 || size == 8; }

/* The FSEG zone must be RAM. SwiftVMM has plain RAM there. QEMU's pc and q35 (with a 64 KiB -bios)
 * show their read-only BIOS alias at 0xF0000-0xFFFFF until the host bridge's PAM registers route
 * the range to RAM. A write-and-read-back in each 64 KiB half (no VM exit where it is RAM) tells. */
static int byte_writable(volatile u8 *p)
{
    u8 old = *p;
    *p = 0x5A;
    int ok = *p == 0x5A;
    *p = 0xA5;
    ok = ok && *p == 0xA5;
    *p = old;
    return ok;
}

static int fseg_writable(void)
{
    return byte_writable((volatile u8 *)FSEG_START) && byte_writable((volatile u8 *)(FSEG_END - 16));
}

/* PCI configuration mechanism #1 (used for QEMU's chipsets only). */
static u32 pci_read32(u32 bdf, u32 reg)
{
    u32 v;
    outl(0xCF8, 0x80000000u | (bdf << 8) | (reg & 0xFC));
    __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"((u16)0xCFC));
    return v;
}

static void pci_write8(u32 bdf, u32 reg, u8 v)
{
    outl(0xCF8, 0x80000000u | (bdf << 8) | (reg & 0xFC));
    outb((u16)(0xCFC + (reg & 3)), v);
}

static void pci_write32(u32 bdf, u32 reg, u32 v)
{
    outl(0xCF8, 0x80000000u | (bdf << 8) | (reg & 0xFC));
    outl(0xCFC, v);
}

#define BDF(b, d, f) (((b) << 8) | ((d) << 3) | (f))
#define ACPI_PM_BASE 0x600 /* SeaBIOS's choice; QEMU's FADT reports whatever is programmed */

/* Only when the FSEG is not RAM, i.e. under QEMU's pc (i440FX + PIIX4) or q35 (MCH + ICH9): route
 * 0xE0000-0xFFFFF to RAM (PAM) and give the ACPI PM block its I/O base, which QEMU's FADT reports
 * (done before the ACPI blobs are first selected, when QEMU builds them). SwiftVMM has no PCI and
 * never gets here. */
static void qemu_chipset_init(void)
{
    u32 host = pci_read32(BDF(0, 0, 0), 0), pam;
    if (host == 0x12378086) { /* i440FX; PIIX4 PM at 00:01.3 */
        pam = 0x59;
        if (pci_read32(BDF(0, 1, 3), 0) == 0x71138086) {
            pci_write32(BDF(0, 1, 3), 0x40, ACPI_PM_BASE | 1); /* PMBA */
            pci_write8(BDF(0, 1, 3), 0x80, 0x01);              /* PMREGMISC: PM I/O space on */
        }
    } else if (host == 0x29C08086) { /* Q35 MCH; ICH9 LPC at 00:1f.0 */
        pam = 0x90;
        if (pci_read32(BDF(0, 0x1F, 0), 0) == 0x29188086) {
            pci_write32(BDF(0, 0x1F, 0), 0x40, ACPI_PM_BASE | 1); /* PMBASE */
            pci_write8(BDF(0, 0x1F, 0), 0x44, 0x80);              /* ACPI_CNTL: ACPI_EN */
        }
    } else {
        return;
    }
    /* PAM0 bits 5:4 = 0xF0000-0xFFFFF; PAM5 and PAM6 = 0xE0000-0xEFFFF; 3 = read/write DRAM. */
    pci_write8(BDF(0, 0, 0), pam, 0x30);
    pci_write8(BDF(0, 0, 0), pam + 5, 0x33);
    pci_write8(BDF(0, 0, 0), pam + 6, 0x33);
}

static int loader_allocate(const struct loader_entry *e)
{
    const struct fw_cfg_file *f = fw_find(e->alloc.file);
    if (!f)
        return loader_error("ALLOCATE of unknown file", e->alloc.file);
    if (find_alloc(e->alloc.file))
        return loader_error("file allocated twice", e->alloc.file);
    if (nallocs == MAX_ALLOCS)
        return loader_error("too many allocations", 0);
    u32 size = bswap32(f->size), align = e->alloc.align;
    if (align == 0)
        align = 1;
    if (align & (align - 1))
        return loader_error("alignment not a power of two for", e->alloc.file);
    u32 addr;
    if (e->alloc.zone == ZONE_HIGH) {
        if (size > high_ptr - high_floor)
            return loader_error("no room in the HIGH zone for", e->alloc.file);
        addr = (high_ptr - size) & ~(align - 1);
        if (addr < high_floor)
            return loader_error("no room in the HIGH zone for", e->alloc.file);
        high_ptr = addr;
    } else if (e->alloc.zone == ZONE_FSEG) {
        if (fseg_ptr == 0) {
            if (!fseg_writable())
                return loader_error("0xE0000-0xFFFFF is not writable RAM, cannot place", e->alloc.file);
            fseg_ptr = FSEG_START;
        }
        addr = (fseg_ptr + align - 1) & ~(align - 1);
        if (addr < fseg_ptr || addr > FSEG_END || size > FSEG_END - addr)
            return loader_error("no room in the FSEG zone for", e->alloc.file);
        fseg_ptr = addr + size;
    } else {
        return loader_error("unknown allocation zone for", e->alloc.file);
    }
    struct allocation *a = &allocs[nallocs++];
    memcpy(a->name, e->alloc.file, LOADER_FILESZ);
    a->addr = addr;
    a->size = size;
    a->zone = e->alloc.zone;
    fw_read(bswap16(f->select), (void *)(uptr)addr, size);
    return 0;
}

static int loader_add_pointer(const struct loader_entry *e)
{
    const struct allocation *d = find_alloc(e->pointer.dest_file);
    const struct allocation *s = find_alloc(e->pointer.src_file);
    if (!d)
        return loader_error("ADD_POINTER into unallocated file", e->pointer.dest_file);
    if (!s)
        return loader_error("ADD_POINTER to unallocated file", e->pointer.src_file);
    u32 off = e->pointer.offset, size = e->pointer.size;
    if (!is_valid_size(e->pointer.size) || off > d->size || size > d->size - off)
        return loader_error("ADD_POINTER out of range in", e->pointer.dest_file);
    u8 *p = (u8 *)(uptr)(d->addr + off);
    u64 v = 0;
    memcpy(&v, p, size); /* little-endian host */
    v += s->addr;
    memcpy(p, &v, size);
    return 0;
}

static int loader_add_checksum(const struct loader_entry *e)
{
    const struct allocation *a = find_alloc(e->cksum.file);
    if (!a)
        return loader_error("ADD_CHECKSUM of unallocated file", e->cksum.file);
    u32 off = e->cksum.offset, start = e->cksum.start, len = e->cksum.length;
    if (off >= a->size || start > a->size || len > a->size - start)
        return loader_error("ADD_CHECKSUM out of range in", e->cksum.file);
    u8 *base = (u8 *)(uptr)a->addr, sum = 0;
    for (u32 i = 0; i < len; i++)
        sum += base[start + i];
    base[off] -= sum;
    return 0;
}

static int loader_write_pointer(const struct loader_entry *e)
{
    const struct fw_cfg_file *f = fw_find(e->wr_pointer.dest_file);
    const struct allocation *s = find_alloc(e->wr_pointer.src_file);
    if (!f)
        return loader_error("WRITE_POINTER into unknown file", e->wr_pointer.dest_file);
    if (!s)
        return loader_error("WRITE_POINTER to unallocated file", e->wr_pointer.src_file);
    u32 fsize = bswap32(f->size), off = e->wr_pointer.dst_offset, size = e->wr_pointer.size;
    if (!is_valid_size(e->wr_pointer.size) || off > fsize || size > fsize - off ||
        e->wr_pointer.src_offset >= s->size)
        return loader_error("WRITE_POINTER out of range in", e->wr_pointer.dest_file);
    u64 v = (u64)s->addr + e->wr_pointer.src_offset;
    if (size < 8 && (v >> (size * 8)) != 0)
        return loader_error("WRITE_POINTER value does not fit in", e->wr_pointer.dest_file);
    if (!fw_dma)
        return loader_error("WRITE_POINTER needs fw_cfg DMA, for", e->wr_pointer.dest_file);
    if (fw_write(bswap16(f->select), off, &v, size) != 0)
        return loader_error("fw_cfg rejected WRITE_POINTER into", e->wr_pointer.dest_file);
    return 0;
}

static void run_table_loader(void)
{
    const struct fw_cfg_file *f = fw_find("etc/table-loader");
    if (!f)
        return; /* no ACPI tables offered: nothing to do */
    u32 size = bswap32(f->size);
    if (size > LOADER_BUF_SIZE) {
        loader_error("script too large", 0);
        return;
    }
    fw_read(bswap16(f->select), (void *)LOADER_BUF, size);
    const struct loader_entry *e = (const struct loader_entry *)LOADER_BUF;
    for (u32 n = size / sizeof *e; n; n--, e++) {
        int r = 0;
        switch (e->command) {
        case CMD_ALLOCATE: r = loader_allocate(e); break;
        case CMD_ADD_POINTER: r = loader_add_pointer(e); break;
        case CMD_ADD_CHECKSUM: r = loader_add_checksum(e); break;
        case CMD_WRITE_POINTER: r = loader_write_pointer(e); break;
        default: break; /* unknown commands (and QEMU's zero padding) are skipped */
        }
        if (r)
            return;
    }
    loader_ok = 1;
}

/* ------------------------------------------------------------------------------------------------ */
/* Linux boot                                                                                       */

#define BP(off, type) (*(volatile type *)(uptr)(BOOT_PARAMS + (off)))
#define BP_ACPI_RSDP_ADDR 0x070
#define BP_E820_ENTRIES   0x1E8
#define BP_SETUP_SECTS    0x1F1
#define BP_BOOT_FLAG      0x1FE
#define BP_JUMP           0x200
#define BP_HEADER         0x202
#define BP_VERSION        0x206
#define BP_TYPE_OF_LOADER 0x210
#define BP_LOADFLAGS      0x211
#define BP_CODE32_START   0x214
#define BP_RAMDISK_IMAGE  0x218
#define BP_RAMDISK_SIZE   0x21C
#define BP_HEAP_END_PTR   0x224
#define BP_CMD_LINE_PTR   0x228
#define BP_INITRD_MAX     0x22C
#define BP_KERNEL_ALIGN   0x230
#define BP_RELOCATABLE    0x234
#define BP_CMDLINE_SIZE   0x238
#define BP_PREF_ADDRESS   0x258
#define BP_INIT_SIZE      0x260
#define BP_E820_TABLE     0x2D0

#define LOADED_HIGH  0x01
#define CAN_USE_HEAP 0x80

static void __attribute__((noreturn)) enter_linux(u32 entry)
{
    /* 32-bit boot protocol: flat __BOOT_CS/__BOOT_DS (already loaded), paging and interrupts off,
     * ESI = boot_params, EBP = EDI = EBX = 0. */
    __asm__ volatile("xorl %%ebp, %%ebp\n\t"
                     "xorl %%edi, %%edi\n\t"
                     "xorl %%ebx, %%ebx\n\t"
                     "cli\n\t"
                     "jmp *%0"
                     :
                     : "a"(entry), "S"(BOOT_PARAMS)
                     : "memory");
    __builtin_unreachable();
}

static u64 tsc_start;

void __attribute__((noreturn, used)) fw_main(u32 tsc_lo, u32 tsc_hi)
{
    tsc_start = ((u64)tsc_hi << 32) | tsc_lo;
    u32 a, b, c, d;

    /* MTRRs: the reset state has them disabled (all memory uncached on real hardware, and Linux then
     * disables PAT). Enable them with a write-back default type, as the VMM's direct boot does. */
    cpuid(1, &a, &b, &c, &d);
    int hypervisor = (c >> 31) & 1;
    if ((d & (1u << 12)) && !(rdmsr(0x2FF) & (1u << 11)))
        wrmsr(0x2FF, (1u << 11) | 6);

    /* (3) fw_cfg signature and features. */
    u32 sig = 0;
    outw(FW_CFG_PORT_SEL, FW_CFG_SIGNATURE);
    insb(FW_CFG_PORT_DATA, &sig, 4);
    if (sig != 0x554D4551) /* "QEMU" */
        fatal("no fw_cfg device (signature is not \"QEMU\")");
    u32 id = 0;
    outw(FW_CFG_PORT_SEL, FW_CFG_ID);
    insb(FW_CFG_PORT_DATA, &id, 4);
    fw_dma = (id & FW_CFG_VERSION_DMA) != 0;
    fw_read_dir();

    u32 kernel_size = fw_read32(FW_CFG_KERNEL_SIZE);
    u32 setup_size = fw_read32(FW_CFG_SETUP_SIZE);
    if (kernel_size == 0 || setup_size < 0x203)
        fatal("no kernel in fw_cfg (KERNEL_SIZE/SETUP_SIZE)");

    /* The setup header, read now: it tells how much memory the kernel occupies while it starts. */
    u8 setup[0x400];
    u32 setup_read = setup_size < sizeof setup ? setup_size : sizeof setup;
    fw_read(FW_CFG_SETUP_DATA, setup, setup_read);
    if (setup[0x1FE] != 0x55 || setup[0x1FF] != 0xAA || memcmp(&setup[BP_HEADER], "HdrS", 4) != 0)
        fatal("SETUP_DATA has no Linux setup header (HdrS)");
    u32 hdr_end = 0x202 + setup[0x201];
    if (hdr_end > setup_read)
        hdr_end = setup_read;
    u16 version = rd16(setup + BP_VERSION);
    if (version < 0x0202 || !(setup[BP_LOADFLAGS] & LOADED_HIGH))
        fatal("kernel is not a bzImage with boot protocol 2.02 or later");
    /* Busy while Linux starts: the loaded image, then (protocol 2.10+) the decompression buffer
     * [max(align_up(load address, kernel_alignment) if relocatable, pref_address), + init_size),
     * as startup_32 computes it. ACPI tables and the initrd go above both. */
    u32 kernel_end = KERNEL_ADDR + kernel_size;
    u64 busy_end = kernel_end;
    if (version >= 0x020A && hdr_end >= 0x264) {
        u32 align = rd32(setup + BP_KERNEL_ALIGN), init_size = rd32(setup + BP_INIT_SIZE);
        u64 out = KERNEL_ADDR, pref = rd64(setup + BP_PREF_ADDRESS);
        if (setup[BP_RELOCATABLE] && align && !(align & (align - 1)))
            out = (out + align - 1) & ~(u64)(align - 1);
        else
            out = pref;
        if (out < pref)
            out = pref;
        if (out + init_size > busy_end)
            busy_end = out + init_size;
    }

    /* (4) memory map. */
    const struct fw_cfg_file *fe = fw_find("etc/e820");
    if (!fe)
        fatal("no etc/e820 in fw_cfg");
    u32 esize = bswap32(fe->size);
    e820_n = esize / sizeof(struct e820_entry);
    if (e820_n > E820_MAX) {
        puts("swiftvmm-fw: etc/e820 truncated to 128 entries\n");
        e820_n = E820_MAX;
    }
    fw_read(bswap16(fe->select), e820, e820_n * sizeof(struct e820_entry));

    /* The HIGH zone: the top of the highest RAM range below 4 GiB. */
    u64 best_start = 0, best_end = 0;
    for (u32 i = 0; i < e820_n; i++) {
        if (e820[i].type != E820_RAM || e820[i].addr >= 0x100000000ull || e820[i].size == 0)
            continue;
        u64 end = e820[i].addr + e820[i].size;
        if (end > 0x100000000ull)
            end = 0x100000000ull;
        if (end > best_end) {
            best_start = e820[i].addr;
            best_end = end;
        }
    }
    if (best_end < (u64)kernel_end)
        fatal("not enough RAM above 1 MiB for the kernel");
    high_top = (u32)(best_end & ~0xFFFull); /* page-aligned; best_end may be 4 GiB (wraps to 0) */
    if (best_end == 0x100000000ull)
        high_top = 0xFFFFF000u;
    high_ptr = high_top;
    u64 floor = best_start > busy_end ? best_start : busy_end;
    high_floor = floor < high_top ? (u32)floor : high_top; /* no room at all: allocations fail */

    /* (5) ACPI tables. */
    if (!fseg_writable())
        qemu_chipset_init();
    run_table_loader();
    if (!loader_ok) {
        /* Half-patched tables must not be found: hand no RSDP over and wipe what went to the FSEG. */
        for (u32 i = 0; i < nallocs; i++)
            if (allocs[i].zone == ZONE_FSEG)
                memset((void *)(uptr)allocs[i].addr, 0, allocs[i].size);
    }
    /* Everything from the lowest HIGH allocation (rounded down to a page) up is the firmware's. */
    high_ptr &= ~0xFFFu;

    /* (6) boot_params. */
    u8 *bp = (u8 *)BOOT_PARAMS;
    memset(bp, 0, 4096);
    memcpy(bp + 0x1F1, setup + 0x1F1, hdr_end - 0x1F1);

    BP(BP_TYPE_OF_LOADER, u8) = 0xFF;
    BP(BP_LOADFLAGS, u8) |= CAN_USE_HEAP;
    BP(BP_HEAP_END_PTR, u16) = 0xFE00; /* as QEMU: command line at +0x10000 from a 0x10000 setup */
    BP(BP_CODE32_START, u32) = KERNEL_ADDR;
    BP(BP_CMD_LINE_PTR, u32) = CMDLINE_ADDR;
    BP(BP_RAMDISK_IMAGE, u32) = 0; /* whatever the header carried (QEMU fills these in) */
    BP(BP_RAMDISK_SIZE, u32) = 0;

    /* Initrd: the highest page-aligned place in e820 RAM that ends at or below
     * min(initrd_addr_max + 1, the firmware's HIGH allocations) and starts above what the kernel
     * occupies while it starts. */
    u32 initrd_size = fw_read32(FW_CFG_INITRD_SIZE), initrd_addr = 0;
    if (initrd_size) {
        u64 cap = version >= 0x0203 ? (u64)BP(BP_INITRD_MAX, u32) + 1 : 0x38000000ull;
        if (cap > high_ptr)
            cap = high_ptr;
        for (u32 i = 0; i < e820_n; i++) {
            if (e820[i].type != E820_RAM)
                continue;
            u64 s = e820[i].addr, x = s + e820[i].size;
            if (x > cap)
                x = cap;
            if (x <= s || x - s < initrd_size)
                continue;
            u64 start = (x - initrd_size) & ~0xFFFull;
            if (start >= s && start >= busy_end && start > initrd_addr)
                initrd_addr = (u32)start;
        }
        if (initrd_addr) {
            BP(BP_RAMDISK_IMAGE, u32) = initrd_addr;
            BP(BP_RAMDISK_SIZE, u32) = initrd_size;
        } else {
            puts("swiftvmm-fw: no room for the initrd (");
            putdec(initrd_size);
            puts(" bytes) in RAM between ");
            puthex(busy_end);
            puts(" and ");
            puthex(cap);
            puts(", booting without it\n");
        }
    }

    /* e820: the firmware's HIGH block and the FSEG become reserved. */
    if (high_ptr < high_top)
        e820_mark(high_ptr, high_top, E820_RESERVED);
    if (fseg_ptr)
        e820_mark(FSEG_START, FSEG_END, E820_RESERVED);
    memcpy(bp + BP_E820_TABLE, e820, e820_n * sizeof(struct e820_entry));
    BP(BP_E820_ENTRIES, u8) = (u8)e820_n;

    if (loader_ok) {
        const struct allocation *rsdp = find_alloc("etc/acpi/rsdp");
        if (rsdp)
            BP(BP_ACPI_RSDP_ADDR, u64) = rsdp->addr;
    }

    /* (7) kernel, initrd, command line. */
    fw_read(FW_CFG_KERNEL_DATA, (void *)KERNEL_ADDR, kernel_size);
    if (initrd_addr)
        fw_read(FW_CFG_INITRD_DATA, (void *)(uptr)initrd_addr, initrd_size);
    u32 cmdline_size = fw_read32(FW_CFG_CMDLINE_SIZE);
    char *cmdline = (char *)CMDLINE_ADDR;
    if (cmdline_size > CMDLINE_MAX)
        cmdline_size = CMDLINE_MAX;
    if (cmdline_size)
        fw_read(FW_CFG_CMDLINE_DATA, cmdline, cmdline_size);
    cmdline[cmdline_size ? cmdline_size - 1 : 0] = 0;

    /* (8) the one console line. */
    u64 cycles = rdtsc() - tsc_start;
    u32 khz = 0;
    if (hypervisor) {
        cpuid(0x40000000, &a, &b, &c, &d);
        if (a >= 0x40000010 && a < 0x50000000) {
            cpuid(0x40000010, &a, &b, &c, &d);
            khz = a;
        }
    }
    puts("swiftvmm-fw: tables loaded, booting Linux after ");
    if (khz) {
        u32 rem;
        u64 us = div64(cycles, khz, &rem) * 1000;
        putdec(us + div64((u64)rem * 1000, khz, 0));
        puts(" us\n");
    } else {
        putdec(cycles);
        puts(" TSC cycles\n");
    }

    /* (9) Linux. */
    enter_linux(KERNEL_ADDR);
}
