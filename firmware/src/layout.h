/* layout.h: the firmware's fixed addresses and segment selectors (shared by C, assembly and the
 * linker script). See firmware/README.md, "Memory map". */
#ifndef LAYOUT_H
#define LAYOUT_H

#define ROM_BASE        0xFFFF0000      /* the 64 KiB image, read-only */
#define BOOT_CS         0x10            /* Linux boot protocol __BOOT_CS / __BOOT_DS */
#define BOOT_DS         0x18

#define BSS_BASE        0x00001000      /* firmware .bss: 0x1000 .. 0x6FFF */
#define BSS_LIMIT       0x00007000
#define BOOT_PARAMS     0x00007000      /* boot_params ("zero page"), 4 KiB */
#define STACK_TOP       0x00010000      /* stack grows down from here to 0x8000 */
#define DIR_BUF         0x00010000      /* fw_cfg file directory copy, 64 KiB (up to 1023 files) */
#define DIR_BUF_SIZE    0x00010000
#define CMDLINE_ADDR    0x00020000      /* kernel command line, up to 64 KiB */
#define CMDLINE_MAX     0x00010000
#define LOADER_BUF      0x00030000      /* etc/table-loader copy, up to 384 KiB (3072 commands) */
#define LOADER_BUF_SIZE 0x00060000
#define KERNEL_ADDR     0x00100000      /* protected-mode kernel and its 32-bit entry point */
#define FSEG_START      0x000E0000      /* table-loader zone FSEG */
#define FSEG_END        0x00100000

#endif
