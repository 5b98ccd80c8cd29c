/*
 * entry.S: SwiftVMM firmware entry.
 *
 * The vCPU starts in the x86 reset state: real mode, CS.base = 0xFFFF0000, IP = 0xFFF0, so the first
 * instruction is fetched from 0xFFFFFFF0 (the last 16 bytes of the 64 KiB image, section .resetvector).
 * The image is mapped read-only: nothing here writes to it. The GDT lives in the image with the
 * "accessed" bits preset, so loading a segment register never makes the CPU write to the descriptor.
 *
 * Flow: reset vector -> entry16 (record the TSC, load the GDT, CR0.PE=1 with caches enabled, far jump)
 * -> entry32 (flat data segments, stack in low RAM, zero .bss, call fw_main(tsc_lo, tsc_hi)).
 */
#include "layout.h"

/* ---------------------------------------------------------------- 16-bit part */
    .section .text16, "ax"
    .code16
    .globl entry16
entry16:
    rdtsc                               /* earliest timestamp; kept in EDI:ESI until the stack exists */
    movl    %eax, %esi
    movl    %edx, %edi
    /* The displacement is 16 bits: the linker resolves gdt_desc (0xFFFFxxxx) to its low half, which
       is its offset from CS.base = 0xFFFF0000. */
    lgdtl   %cs:gdt_desc
    movl    %cr0, %eax
    andl    $0x9fffffff, %eax           /* CD = NW = 0: caches on (reset value has both set) */
    orl     $1, %eax                    /* PE */
    movl    %eax, %cr0
    ljmpl   $BOOT_CS, $entry32          /* 66 EA: 32-bit offset into the flat code segment */

    .balign 8
gdt:
    .quad   0                           /* 0x00 null */
    .quad   0                           /* 0x08 unused */
    .quad   0x00cf9b000000ffff          /* 0x10 __BOOT_CS: base 0, limit 4 GiB, 32-bit, exec/read, accessed */
    .quad   0x00cf93000000ffff          /* 0x18 __BOOT_DS: base 0, limit 4 GiB, read/write, accessed */
gdt_end:
gdt_desc:
    .word   gdt_end - gdt - 1
    .long   gdt

/* ---------------------------------------------------------------- 32-bit part */
    .section .text.entry32, "ax"
    .code32
entry32:
    movl    $BOOT_DS, %eax
    movl    %eax, %ds
    movl    %eax, %es
    movl    %eax, %ss
    movl    %eax, %fs
    movl    %eax, %gs
    movl    $STACK_TOP, %esp
    pushl   %edi                        /* fw_main(tsc_lo, tsc_hi) */
    pushl   %esi
    cld
    movl    $__bss_start, %edi
    movl    $__bss_end, %ecx
    subl    %edi, %ecx
    xorl    %eax, %eax
    rep stosb
    call    fw_main
1:  cli
    hlt
    jmp     1b

/* ---------------------------------------------------------------- reset vector (0xFFFFFFF0) */
    .section .resetvector, "ax"
    .code16
    .globl reset_vector
reset_vector:
    cli
    cld
    jmp     entry16                     /* near jump within CS (base 0xFFFF0000) */
    .balign 16, 0xf4                    /* pad with HLT to exactly 16 bytes */
