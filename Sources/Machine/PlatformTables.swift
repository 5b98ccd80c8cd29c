import ACPI

/// The ACPI description of this machine: the FADT/MADT platform from `Layout`, and a DSDT with the
/// legacy devices, the S5 sleep type and the `\_GPE` scope. Pure: tests and `--dump-acpi` build the
/// same tables the guest gets, without KVM.
public enum PlatformTables {
    /// SLP_TYP for S5 in `\_S5` and in the PM1 control model.
    public static let s5SleepType: UInt8 = 5

    public static func platform(cpus: Int) -> ACPIPlatform {
        ACPIPlatform(
            cpus: cpus, sciIRQ: UInt8(Layout.sciIRQ),
            pm1aEventBlock: UInt16(Layout.pm1aEvent), pm1aControlBlock: UInt16(Layout.pm1aControl),
            pmTimerBlock: UInt16(Layout.pmTimer), gpe0Block: UInt16(Layout.gpe0), gpe0BlockLength: UInt8(Layout.gpe0Length),
            resetPort: UInt16(Layout.resetRegister), resetValue: Layout.resetValue,
            localAPICAddress: UInt32(Layout.localAPIC), ioAPICAddress: UInt32(Layout.ioAPIC), ioAPICID: 0,
            has8042: true, hasCMOSClock: true)
    }

    /// The DSDT body: COM1, the PS/2 keyboard controller, the CMOS clock, a motherboard-resources
    /// device claiming the ACPI register ports, `\_S5`, and an empty `\_GPE` scope for SSDTs to extend.
    public static func dsdt() -> SDT {
        typealias R = AML.Resource
        func io(_ port: UInt64, _ length: Int) -> [UInt8] {
            R.io(min: UInt16(port), max: UInt16(port), alignment: 1, length: UInt8(length))
        }
        let body: [AML] = [
            .scope("\\_SB", [
                .device("COM1", [
                    .name("_HID", .eisaID("PNP0501")),
                    .name("_UID", .integer(1)),
                    .name("_CRS", .resourceTemplate([io(Layout.com1, 8), R.irqNoFlags([UInt8(Layout.com1IRQ)])])),
                ]),
                .device("PS2K", [
                    .name("_HID", .eisaID("PNP0303")),
                    .name("_CRS", .resourceTemplate([io(Layout.i8042, 1), io(Layout.i8042 + 4, 1),
                                                      R.irqNoFlags([UInt8(Layout.i8042IRQ)])])),
                ]),
                .device("RTC", [
                    .name("_HID", .eisaID("PNP0B00")),
                    .name("_CRS", .resourceTemplate([io(Layout.cmos, 2), R.irqNoFlags([UInt8(Layout.rtcIRQ)])])),
                ]),
                .device("PMRS", [
                    .name("_HID", .eisaID("PNP0C02")),
                    .name("_UID", .integer(1)),
                    .name("_CRS", .resourceTemplate([
                        io(Layout.pm1aEvent, 4), io(Layout.pm1aControl, 2), io(Layout.pmTimer, 4),
                        io(Layout.gpe0, Layout.gpe0Length), io(Layout.resetRegister, 1),
                    ])),
                ]),
            ]),
            .name("\\_S5", .package([.integer(UInt64(s5SleepType)), .integer(UInt64(s5SleepType)), .integer(0), .integer(0)])),
            .scope("\\_GPE", []),
        ]
        return SDT(signature: "DSDT", revision: 2, oemTableID: "SWVMDSDT", body: AML.list(body).bytes)
    }

    /// Every table, placed in the ACPI region of `Layout`.
    public static func build(cpus: Int, ssdts: [SDT] = []) throws(ACPITableSet.Error) -> ACPITableSet {
        try ACPITableSet(platform: platform(cpus: cpus), dsdt: dsdt(), ssdts: ssdts,
                         base: Layout.acpiTables, size: Layout.acpiTablesSize)
    }
}
