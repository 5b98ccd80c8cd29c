import ACPI
import Testing

func le16(_ b: [UInt8], _ o: Int) -> UInt16 { UInt16(b[o]) | UInt16(b[o + 1]) << 8 }
func le32(_ b: [UInt8], _ o: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[o + $1]) << (8 * $1) } }
func le64(_ b: [UInt8], _ o: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[o + $1]) << (8 * $1) } }

let testPlatform = ACPIPlatform(
    cpus: 3, sciIRQ: 9, pm1aEventBlock: 0x600, pm1aControlBlock: 0x604, pmTimerBlock: 0x608,
    gpe0Block: 0x620, gpe0BlockLength: 4, resetPort: 0xCF9, resetValue: 0x0F,
    localAPICAddress: 0xFEE0_0000, ioAPICAddress: 0xFEC0_0000, ioAPICID: 0, has8042: true, hasCMOSClock: true)

@Suite("ACPI tables: headers, checksums, field offsets")
struct TablesTests {
    @Test("RSDP v2: signature, both checksums, revision, length, XSDT address")
    func rsdp() {
        let b = ACPITables.rsdp(xsdtAddress: 0xE0040)
        #expect(b.count == 36)
        #expect(Array(b[0..<8]) == Array("RSD PTR ".utf8))
        #expect(ACPIChecksum.sum(b[0..<20]) == 0)
        #expect(ACPIChecksum.sum(b) == 0)
        #expect(b[15] == 2)
        #expect(le32(b, 16) == 0)
        #expect(le32(b, 20) == 36)
        #expect(le64(b, 24) == 0xE0040)
    }

    @Test("FADT: revision 6, 276 bytes, full hardware model with PM1/PM timer/GPE0/reset, X_ fields match")
    func fadt() {
        let b = ACPITables.fadt(testPlatform, facsAddress: 0xE0100, dsdtAddress: 0xE0140).bytes
        #expect(b.count == 276)
        #expect(Array(b[0..<4]) == Array("FACP".utf8))
        #expect(le32(b, 4) == 276)
        #expect(b[8] == 6)
        #expect(ACPIChecksum.sum(b) == 0)
        #expect(le32(b, 36) == 0xE0100 && le64(b, 132) == 0xE0100)   // FIRMWARE_CTRL, X_FIRMWARE_CTRL
        #expect(le32(b, 40) == 0xE0140 && le64(b, 140) == 0xE0140)   // DSDT, X_DSDT
        #expect(le16(b, 46) == 9)                                     // SCI_INT
        #expect(le32(b, 48) == 0 && b[52] == 0 && b[53] == 0)         // SMI_CMD 0: already in ACPI mode
        #expect(le32(b, 56) == 0x600 && le32(b, 64) == 0x604 && le32(b, 76) == 0x608 && le32(b, 80) == 0x620)
        #expect(b[88] == 4 && b[89] == 2 && b[91] == 4 && b[92] == 4)
        let flags = le32(b, 112)
        #expect(flags & ACPITables.fadtHardwareReduced == 0)
        #expect(flags & ACPITables.fadtPowerButton == 0)              // fixed power button present
        #expect(flags & ACPITables.fadtTimerValueExtended != 0)       // 32-bit PM timer
        #expect(flags & ACPITables.fadtResetRegisterSupported != 0)
        #expect(le16(b, 109) & ACPITables.bootArch8042 != 0)
        #expect(le16(b, 109) & ACPITables.bootArchNoCMOSRTC == 0)
        // RESET_REG: I/O, 8 bits, byte access, 0xCF9; RESET_VALUE 0x0F.
        #expect(Array(b[116..<120]) == [1, 8, 0, 1] && le64(b, 120) == 0xCF9 && b[128] == 0x0F)
        // X_ blocks: I/O space, bit width = 8 * the legacy length, same address.
        for (off, addr, len) in [(148, 0x600, 4), (172, 0x604, 2), (208, 0x608, 4), (220, 0x620, 4)] {
            #expect(b[off] == 1 && Int(b[off + 1]) == 8 * len && le64(b, off + 4) == UInt64(addr))
        }
        #expect(le64(b, 160) == 0 && le64(b, 184) == 0)               // no PM1b blocks
    }

    @Test("FACS: 64 bytes, signature, global lock word at 16 starts free")
    func facs() {
        let b = ACPITables.facs()
        #expect(b.count == 64)
        #expect(Array(b[0..<4]) == Array("FACS".utf8))
        #expect(le32(b, 4) == 64)
        #expect(le32(b, 16) == 0)
        #expect(b[32] == 2)
    }

    @Test("MADT: a local APIC per vCPU, the IOAPIC, IRQ0→GSI2, SCI level/high (0x000D), LINT1 NMI")
    func madt() {
        let b = ACPITables.madt(testPlatform).bytes
        #expect(Array(b[0..<4]) == Array("APIC".utf8))
        #expect(Int(le32(b, 4)) == b.count)
        #expect(ACPIChecksum.sum(b) == 0)
        #expect(le32(b, 36) == 0xFEE0_0000)
        #expect(le32(b, 40) & 1 == 1)
        var entries: [[UInt8]] = []
        var o = 44
        while o < b.count {
            let len = Int(b[o + 1])
            #expect(len >= 2)
            if len < 2 { break }
            entries.append(Array(b[o..<(o + len)]))
            o += len
        }
        #expect(o == b.count)
        let lapics = entries.filter { $0[0] == 0 }
        #expect(lapics.count == 3)
        for (i, e) in lapics.enumerated() { #expect(e[2] == UInt8(i) && e[3] == UInt8(i) && le32(e, 4) == 1) }
        let ioapic = entries.first { $0[0] == 1 }
        #expect(ioapic.map { le32($0, 4) } == 0xFEC0_0000)
        #expect(ioapic.map { le32($0, 8) } == 0)
        let overrides = entries.filter { $0[0] == 2 }.map { (irq: $0[3], gsi: le32($0, 4), flags: le16($0, 8)) }
        #expect(overrides.contains { $0.irq == 0 && $0.gsi == 2 && $0.flags == 0 })
        #expect(overrides.contains { $0.irq == 9 && $0.gsi == 9 && $0.flags == 0x000D })
        #expect(entries.contains { $0 == [4, 6, 0xFF, 0, 0, 1] })
    }

    @Test("relocatable blob: every pointer field holds its target's offset, every table has a checksum entry")
    func blob() throws {
        let dsdt = SDT(signature: "DSDT", revision: 2, oemTableID: "T", body: [0x10, 0x05, 0x5C, 0x00])
        let ssdt = SDT(signature: "SSDT", revision: 2, oemTableID: "T", body: [])
        let blob = ACPITableBlob(platform: testPlatform, dsdt: dsdt, ssdts: [ssdt, ssdt])
        #expect(blob.entries.map(\.name) == ["XSDT", "FACP", "FACS", "DSDT", "APIC", "SSDT", "SSDT"])
        let at = Dictionary(blob.entries.map { ($0.offset, $0.name) }, uniquingKeysWith: { a, _ in a })
        let t = blob.tables
        // RSDP → XSDT (an offset into the tables blob), patched by a pointer entry.
        #expect(at[Int(le64(blob.rsdp, 24))] == "XSDT")
        #expect(blob.pointers.contains(ACPITableBlob.Pointer(file: .rsdp, offset: 24, size: 8)))
        let xsdt = try #require(blob.entries.first { $0.name == "XSDT" })
        let targets = stride(from: xsdt.offset + 36, to: xsdt.offset + xsdt.length, by: 8).map { at[Int(le64(t, $0))] }
        #expect(targets == ["FACP", "APIC", "SSDT", "SSDT"])
        let fadt = try #require(blob.entries.first { $0.name == "FACP" })
        #expect(at[Int(le32(t, fadt.offset + 36))] == "FACS" && at[Int(le64(t, fadt.offset + 132))] == "FACS")
        #expect(at[Int(le32(t, fadt.offset + 40))] == "DSDT" && at[Int(le64(t, fadt.offset + 140))] == "DSDT")
        #expect(blob.entries.first { $0.name == "FACS" }!.offset % 64 == 0)
        // 2 + 2 SSDT XSDT entries, 4 FADT fields, the RSDP's XSDT field.
        #expect(blob.pointers.count == 4 + 4 + 1)
        for p in blob.pointers { #expect(p.offset + Int(p.size) <= blob.bytes(of: p.file).count) }
        // Every table but the FACS gets its checksum fixed after patching; the RSDP gets both.
        for e in blob.entries where e.name != "FACS" {
            #expect(blob.checksums.contains(ACPITableBlob.Checksum(file: .tables, offset: e.offset + 9, start: e.offset, length: e.length)))
            #expect(Int(le32(t, e.offset + 4)) == e.length)
        }
        #expect(blob.checksums.contains(ACPITableBlob.Checksum(file: .rsdp, offset: 8, start: 0, length: 20)))
        #expect(blob.checksums.last == ACPITableBlob.Checksum(file: .rsdp, offset: 32, start: 0, length: 36))
        // Tables never overlap.
        for (a, b) in zip(blob.entries, blob.entries.dropFirst()) { #expect(a.offset + a.length <= b.offset) }
    }

    @Test("dump file names number repeated signatures")
    func dumpNames() {
        let set = ACPITableSet(tables: ["RSDP", "XSDT", "SSDT", "SSDT"].map { ACPITableSet.Placed(name: $0, address: 0, bytes: []) })
        #expect(set.dumpFileNames == ["RSDP.dat", "XSDT.dat", "SSDT.dat", "SSDT2.dat"])
    }
}
