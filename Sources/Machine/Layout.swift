/// Every fixed guest-physical address, port and interrupt line of the x86 machine. Nothing else in
/// the code base hard-codes one.
public enum Layout {
    // Low memory (below 1 MiB).
    public static let gdt: UInt64 = 0x500
    public static let idt: UInt64 = 0x600
    public static let bootParams: UInt64 = 0x7000
    public static let bootStack: UInt64 = 0x8FF0
    /// PML4 at +0, PDPT at +0x1000, then one page directory per GiB.
    public static let pageTables: UInt64 = 0x9000
    public static let identityMappedGiB = 4
    public static let commandLine: UInt64 = 0x20000
    public static let commandLineLimit: UInt64 = 0x30000
    /// boot_params' setup_data list (the device tree of `--dtb`): after the command line, up to the
    /// end of usable low RAM (the kernel keeps setup_data; its early code avoids it).
    public static let setupData: UInt64 = 0x30000
    public static let setupDataLimit: UInt64 = lowRAMEnd
    /// End of usable low RAM: the EBDA and the legacy video/ROM area lie above.
    public static let lowRAMEnd: UInt64 = 0x9FC00
    public static let ebda: UInt64 = 0x9FC00
    /// The ACPI tables: RSDP first (inside the 0xE0000-0xFFFFF range the kernel scans), e820 type ACPI.
    public static let acpiTables: UInt64 = 0xE0000
    public static let acpiTablesSize: UInt64 = 0x10000
    /// The BIOS area after the ACPI tables, reserved in e820.
    public static let biosArea: UInt64 = 0xF0000
    /// The VM generation ID page (fw_cfg `etc/vmgenid_guid`) on a direct boot: reserved (not RAM, not
    /// ACPI, as the vmgenid spec requires), cacheable, page-aligned; the GUID is at +40.
    public static let vmgenidPage: UInt64 = 0xF0000
    public static let highMemory: UInt64 = 0x100000
    /// Where the protected-mode kernel of a bzImage is loaded (the conventional code32_start).
    public static let kernel: UInt64 = 0x100000

    // The 32-bit MMIO hole and what the in-kernel devices need inside it.
    public static let mmioHoleStart: UInt64 = 0xC000_0000
    public static let fourGiB: UInt64 = 1 << 32
    /// fw_cfg's MMIO window (the same registers as its I/O ports; see `FwCfg`).
    public static let fwCfgMMIO: UInt64 = 0xFEF0_0000
    /// virtio-mmio register windows: device n at virtioMMIO + n × virtioStride (QEMU microvm's spacing).
    public static let virtioMMIO: UInt64 = 0xFEB0_0000
    public static let virtioStride: UInt64 = 0x200
    public static let ioAPIC: UInt64 = 0xFEC0_0000
    /// The TPM's TIS registers (five 4 KiB localities), where PC firmware and guests expect them.
    public static let tpmTIS: UInt64 = 0xFED4_0000
    public static let localAPIC: UInt64 = 0xFEE0_0000
    public static let identityMap: UInt64 = 0xFFFB_C000
    /// Firmware is mapped read-only so that it ends at 4 GiB (the reset vector is at 0xFFFFFFF0); it
    /// may be up to 256 KiB, which keeps it clear of the TSS pages.
    public static let firmwareMaxSize: UInt64 = 256 << 10
    public static let tss: UInt64 = 0xFFFB_D000

    // Port I/O.
    public static let com1: UInt64 = 0x3F8
    public static let i8042: UInt64 = 0x60        // data at 0x60, status/command at 0x64
    public static let cmos: UInt64 = 0x70
    /// fw_cfg: selector 0x510, data 0x511, DMA address 0x514-0x51B.
    public static let fwCfgPorts: UInt64 = 0x510
    /// ACPI fixed hardware (the FADT points here): PM1a event (4 bytes), PM1a control (2), the PM
    /// timer (4), GPE0 (status bytes then enable bytes), and the reset register at 0xCF9 like a PC chipset.
    public static let pm1aEvent: UInt64 = 0x600
    public static let pm1aControl: UInt64 = 0x604
    public static let pmTimer: UInt64 = 0x608
    public static let gpe0: UInt64 = 0x620
    public static let gpe0Length = 4
    public static let resetRegister: UInt64 = 0xCF9
    public static let resetValue: UInt8 = 0x0F
    /// Ports Linux probes that have no device here; they read as 0xFF and ignore writes, quietly.
    public static let quietPorts: [(name: String, base: UInt64, size: UInt64)] = [
        ("post-code", 0x80, 1),
        ("com2", 0x2F8, 8), ("com3", 0x3E8, 8), ("com4", 0x2E8, 8),
        ("lpt", 0x378, 3), ("vga", 0x3C0, 0x20),
        // PCI configuration mechanism #1 around the reset register: reads as all-ones, "no PCI".
        ("pci-conf-address", 0xCF8, 1), ("pci-conf-rest", 0xCFA, 6),
        ("dma-page", 0x81, 0xF), ("fpu", 0xF0, 0x10), ("game", 0x201, 1),
    ]

    // Interrupt lines (GSIs on the in-kernel IOAPIC; ISA IRQs 0-15 are the same numbers).
    public static let i8042IRQ: UInt32 = 1
    public static let com1IRQ: UInt32 = 4
    public static let rtcIRQ: UInt32 = 8
    /// The ACPI SCI: level-triggered, active high (MADT override flags 0x000D).
    public static let sciIRQ: UInt32 = 9
    /// virtio device n interrupts on GSI virtioFirstGSI + n (edge, active high): the IOAPIC pins
    /// above the ISA range, one per device, so at most `maxVirtioDevices`.
    public static let virtioFirstGSI: UInt32 = 16
    public static let maxVirtioDevices = 8

    /// Guest RAM ranges for `size` bytes: below the 32-bit MMIO hole, the rest from 4 GiB up.
    public static func ramRanges(size: UInt64) -> [(base: UInt64, size: UInt64)] {
        if size <= mmioHoleStart { return [(0, size)] }
        return [(0, mmioHoleStart), (fourGiB, size - mmioHoleStart)]
    }
}
