/// A Generic Address Structure (ACPI 6.x §5.2.3.2): 12 bytes.
public struct GenericAddress: Sendable, Equatable {
    public enum Space: UInt8, Sendable { case systemMemory = 0, systemIO = 1 }
    public var space: Space
    public var bitWidth: UInt8
    public var bitOffset: UInt8 = 0
    /// 0 undefined (legacy), 1 byte, 2 word, 3 dword, 4 qword.
    public var accessSize: UInt8
    public var address: UInt64

    public init(space: Space, bitWidth: UInt8, bitOffset: UInt8 = 0, accessSize: UInt8, address: UInt64) {
        self.space = space
        self.bitWidth = bitWidth
        self.bitOffset = bitOffset
        self.accessSize = accessSize
        self.address = address
    }

    /// An I/O port block of `length` bytes as the FADT's X_ fields describe one.
    public static func io(_ port: UInt16, length: UInt8, accessSize: UInt8 = 0) -> GenericAddress {
        GenericAddress(space: .systemIO, bitWidth: length &* 8, accessSize: accessSize, address: UInt64(port))
    }

    public var bytes: [UInt8] {
        var b: [UInt8] = [space.rawValue, bitWidth, bitOffset, accessSize]
        b.appendLE(address)
        return b
    }
}

/// What the FADT and MADT describe: the fixed-hardware register blocks, the SCI and the interrupt
/// controllers. The machine fills it from its layout; nothing here hard-codes an address.
public struct ACPIPlatform: Sendable, Equatable {
    public var cpus: Int
    public var sciIRQ: UInt8
    public var pm1aEventBlock: UInt16
    public var pm1aControlBlock: UInt16
    public var pmTimerBlock: UInt16
    public var gpe0Block: UInt16
    public var gpe0BlockLength: UInt8
    public var resetPort: UInt16
    public var resetValue: UInt8
    public var localAPICAddress: UInt32
    public var ioAPICAddress: UInt32
    public var ioAPICID: UInt8
    /// The PC has an i8042 keyboard controller and a CMOS real-time clock.
    public var has8042: Bool
    public var hasCMOSClock: Bool

    public init(cpus: Int, sciIRQ: UInt8, pm1aEventBlock: UInt16, pm1aControlBlock: UInt16, pmTimerBlock: UInt16,
                gpe0Block: UInt16, gpe0BlockLength: UInt8, resetPort: UInt16, resetValue: UInt8,
                localAPICAddress: UInt32, ioAPICAddress: UInt32, ioAPICID: UInt8, has8042: Bool, hasCMOSClock: Bool) {
        self.cpus = cpus
        self.sciIRQ = sciIRQ
        self.pm1aEventBlock = pm1aEventBlock
        self.pm1aControlBlock = pm1aControlBlock
        self.pmTimerBlock = pmTimerBlock
        self.gpe0Block = gpe0Block
        self.gpe0BlockLength = gpe0BlockLength
        self.resetPort = resetPort
        self.resetValue = resetValue
        self.localAPICAddress = localAPICAddress
        self.ioAPICAddress = ioAPICAddress
        self.ioAPICID = ioAPICID
        self.has8042 = has8042
        self.hasCMOSClock = hasCMOSClock
    }
}

/// Builders for the fixed-layout tables. Offsets follow ACPI 6.x §5.2; the FADT is revision 6 (276 bytes).
public enum ACPITables {
    public static let fadtLength = 276
    public static let facsLength = 64
    public static let rsdpLength = 36

    /// RSDP revision 2 pointing at the XSDT (no RSDT). Both checksums set.
    public static func rsdp(xsdtAddress: UInt64) -> [UInt8] {
        var b = Array("RSD PTR ".utf8)
        b.append(0)                      // checksum over the first 20 bytes
        b += SDT.oemID
        b.append(2)                      // revision
        b.appendLE(UInt32(0))            // RSDT address: none
        b.appendLE(UInt32(rsdpLength))
        b.appendLE(xsdtAddress)
        b += [0, 0, 0, 0]                // extended checksum, reserved[3]
        b[8] = ACPIChecksum.complement(b[0..<20])
        b[32] = ACPIChecksum.complement(b)
        return b
    }

    public static func xsdt(entries: [UInt64]) -> SDT {
        var body: [UInt8] = []
        for e in entries { body.appendLE(e) }
        return SDT(signature: "XSDT", revision: 1, oemTableID: "SWVMXSDT", body: body)
    }

    /// FACS: 64 bytes, no checksum; the global lock lives here (ACPICA needs one, see §0 #4 of the notes).
    public static func facs() -> [UInt8] {
        var b = Array("FACS".utf8)
        b.appendLE(UInt32(facsLength))
        b += [UInt8](repeating: 0, count: facsLength - 8) // hardware signature, waking vectors, lock, flags: 0
        b[32] = 2                                           // version
        return b
    }

    // FADT flag bits.
    public static let fadtWBINVD: UInt32 = 1 << 0
    public static let fadtProcC1: UInt32 = 1 << 2
    public static let fadtPowerButton: UInt32 = 1 << 4    // set = NO fixed power button
    public static let fadtSleepButton: UInt32 = 1 << 5    // set = no fixed sleep button
    public static let fadtRTCS4: UInt32 = 1 << 7
    public static let fadtTimerValueExtended: UInt32 = 1 << 8
    public static let fadtResetRegisterSupported: UInt32 = 1 << 10
    public static let fadtHardwareReduced: UInt32 = 1 << 20
    // IA-PC boot architecture flags.
    public static let bootArchLegacyDevices: UInt16 = 1 << 0
    public static let bootArch8042: UInt16 = 1 << 1
    public static let bootArchNoVGA: UInt16 = 1 << 2
    public static let bootArchNoCMOSRTC: UInt16 = 1 << 5

    /// FADT revision 6.0 for a full fixed-hardware platform (not hardware-reduced): SCI, PM1a event
    /// and control blocks, 32-bit PM timer, GPE0, reset register, fixed power button; SMI_CMD = 0 so
    /// the guest finds the platform already in ACPI mode.
    public static func fadt(_ p: ACPIPlatform, facsAddress: UInt64, dsdtAddress: UInt64) -> SDT {
        var b = [UInt8](repeating: 0, count: fadtLength - SDT.headerSize)
        func put<T: FixedWidthInteger>(_ v: T, at offset: Int) {
            Swift.withUnsafeBytes(of: v.littleEndian) { raw in
                for (i, byte) in raw.enumerated() { b[offset - SDT.headerSize + i] = byte }
            }
        }
        func put(_ g: GenericAddress, at offset: Int) {
            for (i, byte) in g.bytes.enumerated() { b[offset - SDT.headerSize + i] = byte }
        }
        put(UInt32(truncatingIfNeeded: facsAddress), at: 36)
        put(UInt32(truncatingIfNeeded: dsdtAddress), at: 40)
        put(UInt16(p.sciIRQ), at: 46)
        put(UInt32(p.pm1aEventBlock), at: 56)
        put(UInt32(p.pm1aControlBlock), at: 64)
        put(UInt32(p.pmTimerBlock), at: 76)
        put(UInt32(p.gpe0Block), at: 80)
        put(UInt8(4), at: 88)                 // PM1_EVT_LEN
        put(UInt8(2), at: 89)                 // PM1_CNT_LEN
        put(UInt8(4), at: 91)                 // PM_TMR_LEN
        put(p.gpe0BlockLength, at: 92)
        put(UInt16(101), at: 96)              // P_LVL2_LAT > 100: no C2
        put(UInt16(1001), at: 98)             // P_LVL3_LAT > 1000: no C3
        var bootArch = bootArchLegacyDevices | bootArchNoVGA
        if p.has8042 { bootArch |= bootArch8042 }
        if !p.hasCMOSClock { bootArch |= bootArchNoCMOSRTC }
        put(bootArch, at: 109)
        put(fadtWBINVD | fadtProcC1 | fadtSleepButton | fadtRTCS4 | fadtTimerValueExtended | fadtResetRegisterSupported,
            at: 112)
        put(GenericAddress.io(p.resetPort, length: 1, accessSize: 1), at: 116)
        put(p.resetValue, at: 128)
        put(facsAddress, at: 132)             // X_FIRMWARE_CTRL
        put(dsdtAddress, at: 140)             // X_DSDT
        put(GenericAddress.io(p.pm1aEventBlock, length: 4), at: 148)
        put(GenericAddress.io(p.pm1aControlBlock, length: 2), at: 172)
        put(GenericAddress.io(p.pmTimerBlock, length: 4), at: 208)
        put(GenericAddress.io(p.gpe0Block, length: p.gpe0BlockLength), at: 220)
        return SDT(signature: "FACP", revision: 6, oemTableID: "SWVMFACP", body: b)
    }

    // MADT flags for interrupt source overrides: polarity bits 1:0, trigger mode bits 3:2.
    public static let isoConforming: UInt16 = 0
    public static let isoActiveHighLevel: UInt16 = 0x000D

    /// MADT: one enabled local APIC per vCPU (APIC ID = processor UID = vCPU index), the IOAPIC at
    /// GSI base 0, IRQ 0 → GSI 2 (the PIT), the SCI as level/active-high, LINT1 = NMI on every CPU.
    public static func madt(_ p: ACPIPlatform) -> SDT {
        var b: [UInt8] = []
        b.appendLE(p.localAPICAddress)
        b.appendLE(UInt32(1))                                  // PCAT_COMPAT: dual 8259s present
        for cpu in 0..<p.cpus {
            b += [0, 8, UInt8(truncatingIfNeeded: cpu), UInt8(truncatingIfNeeded: cpu)]
            b.appendLE(UInt32(1))                              // enabled
        }
        b += [1, 12, p.ioAPICID, 0]
        b.appendLE(p.ioAPICAddress)
        b.appendLE(UInt32(0))                                  // GSI base
        for (irq, gsi, flags) in [(UInt8(0), UInt32(2), isoConforming), (p.sciIRQ, UInt32(p.sciIRQ), isoActiveHighLevel)] {
            b += [2, 10, 0, irq]
            b.appendLE(gsi)
            b.appendLE(flags)
        }
        b += [4, 6, 0xFF, 0, 0, 1]                            // local APIC NMI: all processors, LINT1
        return SDT(signature: "APIC", revision: 3, oemTableID: "SWVMAPIC", body: b)
    }
}
