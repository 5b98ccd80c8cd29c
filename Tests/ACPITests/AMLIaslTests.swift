import ACPI
import Devices
import Foundation
import Testing

/// Debian's ACPICA compiler (package acpica-tools; 20200925 on Debian 12).
private let iaslPath = "/usr/bin/iasl"

/// Checks the encoder against iasl, the reference ASL compiler: the same table written in ASL and
/// built with `AML` must give the same bytes, and iasl must disassemble and recompile our bytes
/// unchanged. Skipped (reported as such) where iasl is not installed.
@Suite("AML against iasl", .enabled(if: FileManager.default.isExecutableFile(atPath: iaslPath),
                                    "needs iasl: apt-get install acpica-tools"))
struct AMLIaslTests {
    /// iasl flags for byte-exact comparison, from `iasl -h`:
    /// -on  no named reference optimization: iasl would otherwise shorten references such as
    ///      `\_SB.PCI0.FOO` to the shortest path that resolves from the current scope; we emit names as written.
    /// -of  no constant folding: iasl would otherwise evaluate operators with constant operands
    ///      (`Add (1, 2)` becomes `0x03`); we emit the operators.
    /// Integer optimization stays on (-oi would turn it off): like `AML.integer`, iasl then emits
    /// Zero/One/Ones and the shortest prefix. -oa would turn off all three.
    static let compileFlags = ["-on", "-of"]

    @Test("iasl compiles the ASL to exactly the encoder's bytes")
    func compile() throws {
        try withTemporaryDirectory { dir in
            let source = dir.appendingPathComponent("xcheck.asl")
            try Data(CrossCheck.asl.utf8).write(to: source)
            let out = try runIasl(Self.compileFlags + ["-p", dir.appendingPathComponent("xcheck").path, source.path])
            #expect(out.status == 0 && out.text.contains("Compilation successful"), "\(out.text)")
            let aml = try [UInt8](Data(contentsOf: dir.appendingPathComponent("xcheck.aml")))
            #expect(Array(aml.prefix(4)) == Array("SSDT".utf8))
            expectSameBytes(Array(aml.dropFirst(SDT.headerSize)), CrossCheck.aml.bytes)
        }
    }

    /// The VM generation ID SSDT, written in ASL exactly as VMGenIDTable documents it (and as QEMU's
    /// docs/specs/vmgenid.txt describes the device): iasl's bytes are the golden bytes.
    static let vmgenidASL = """
    DefinitionBlock ("", "SSDT", 1, "SWVMM ", "VMGENID", 1) {
        Name (VGIA, 0x12345678)
        Scope (\\_SB) {
            Device (VGEN) {
                Name (_HID, "QEMUVGID")
                Name (_CID, "VM_Gen_Counter")
                Name (_DDN, "VM_Gen_Counter")
                Method (_STA, 0) { If (LEqual (VGIA, Zero)) { Return (Zero) } Return (0x0F) }
                Method (ADDR, 0) {
                    Store (Package (2) { Zero, Zero }, Local0)
                    Store (Add (VGIA, 0x28), Index (Local0, Zero))
                    Store (Zero, Index (Local0, One))
                    Return (Local0)
                }
            }
        }
        Method (\\_GPE._E05) { Notify (\\_SB.VGEN, 0x80) }
    }
    """

    @Test("the VMGENID SSDT is byte for byte what iasl makes of its ASL, with VGIA where the loader patches it")
    func vmgenidSSDT() throws {
        try withTemporaryDirectory { dir in
            let source = dir.appendingPathComponent("vmgenid.asl")
            try Data(Self.vmgenidASL.utf8).write(to: source)
            // VGIA is declared with a placeholder so that iasl keeps a DWordConst (the 4 bytes the
            // loader's ADD_POINTER patches; a literal 0 would become the one-byte Zero). iasl also
            // rejects QEMU's _HID "QEMUVGID" (not hex after the vendor prefix; QEMU does not compile
            // ASL): -f builds the AML anyway, and that must be the only error.
            let out = try runIasl(Self.compileFlags + ["-f", "-p", dir.appendingPathComponent("vmgenid").path, source.path])
            #expect(out.text.contains("Compilation successful. 1 Errors, 0 Warnings"), "\(out.text)")
            #expect(out.text.contains("Error    6035") && out.text.contains("_HID suffix must be all hex digits"), "\(out.text)")
            var aml = try [UInt8](Data(contentsOf: dir.appendingPathComponent("vmgenid.aml")))
            let at = VMGenIDTable.vgiaOffset
            #expect(Array(aml[at..<(at + 4)]) == [0x78, 0x56, 0x34, 0x12], "the placeholder sits at vgiaOffset")
            aml.replaceSubrange(at..<(at + 4), with: [0, 0, 0, 0])
            let ours = VMGenIDTable.ssdt().bytes
            // The header: same signature, length, revision, OEM and table IDs and OEM revision; the
            // creator fields name the compiler, so they differ.
            #expect(Array(aml[0..<24]) != [] && Array(aml[0..<4]) == Array(ours[0..<4]))
            #expect(Array(aml[4..<8]) == Array(ours[4..<8]), "length")
            #expect(aml[8] == ours[8], "revision")
            // OEM ID and table ID (iasl pads a short table ID with NULs, SDT with spaces), OEM revision.
            #expect(Array(aml[10..<23]) == Array(ours[10..<23]) && Array(aml[24..<28]) == Array(ours[24..<28]))
            expectSameBytes(Array(ours.dropFirst(SDT.headerSize)), Array(aml.dropFirst(SDT.headerSize)))
            // VGIA's value is the DWordConst right after `Name (VGIA,`.
            #expect(Array(aml[(at - 6)..<at]) == [0x08] + Array("VGIA".utf8) + [0x0C])
            #expect(Array(ours[at..<(at + 4)]) == [0, 0, 0, 0])
            #expect(ours.reduce(UInt8(0), &+) == 0, "checksum")
        }
    }

    @Test("iasl disassembles the encoder's DSDT cleanly and recompiles it to the same bytes")
    func disassemble() throws {
        try withTemporaryDirectory { dir in
            let table = SDT(signature: "DSDT", revision: 2, oemTableID: "TEST", body: CrossCheck.aml.bytes).bytes
            let binary = dir.appendingPathComponent("dsdt.dat")
            try Data(table).write(to: binary)
            // -dl: legacy ASL (no C-style operators), so that each opcode comes back as written.
            let dis = try runIasl(["-dl", "-p", dir.appendingPathComponent("dsdt").path, binary.path])
            // iasl -d exits 0 even on malformed AML (it drops unknown opcodes and clips overlong
            // packages without a word), so read its words, then check the round trip below.
            #expect(dis.status == 0 && dis.text.contains("Disassembly completed"), "\(dis.text)")
            let dsl = try String(contentsOf: dir.appendingPathComponent("dsdt.dsl"), encoding: .utf8)
            for word in ["error", "warning", "unresolved", "unknown"] {
                #expect(!dis.text.lowercased().contains(word), "iasl -d said \(word): \(dis.text)")
                #expect(!dsl.lowercased().contains(word), "the disassembly mentions \(word): \(dsl)")
            }
            let re = try runIasl(Self.compileFlags + ["-p", dir.appendingPathComponent("again").path,
                                                      dir.appendingPathComponent("dsdt.dsl").path])
            #expect(re.status == 0 && re.text.contains("Compilation successful. 0 Errors"), "\(re.text)")
            let again = try [UInt8](Data(contentsOf: dir.appendingPathComponent("again.aml")))
            expectSameBytes(Array(again.dropFirst(SDT.headerSize)), CrossCheck.aml.bytes)
        }
    }
}

/// One table in both languages. Each ASL construct below has its twin, in the same order, in `aml`.
private enum CrossCheck {
    /// 5000 bytes: the Buffer needs a three-byte PkgLength, so does the Scope around it.
    static let big = (0..<5000).map { UInt8(truncatingIfNeeded: $0 &* 7) }

    static let asl = """
        DefinitionBlock ("", "SSDT", 2, "SWVMM ", "TEST", 1)
        {
            Name (INTS, Package () {
                Zero, One, 0x02, 0xFF, 0x0100, 0xFFFF, 0x00010000, 0xFFFFFFFF,
                0x0000000100000000, 0xFFFFFFFFFFFFFFFE, 0xFFFFFFFFFFFFFFFF,
                EisaId ("PNP0000"), EisaId ("PNP0A03")
            })
            Name (STRS, Package () { "", "SwiftVMM 1.0" })
            Name (BUFS, Package () { Buffer () { }, Buffer () { 0xAA }, Buffer () { 0x01, 0x02, 0x03 }, Package () { } })
            Name (_S5, Package () { 0x05, 0x05, Zero, Zero })
            OperationRegion (FWR, SystemIO, 0x0510, 0x0C)
            Field (FWR, WordAcc, Lock, WriteAsOnes) { FSEL, 16, , 16, FDAT, 8 }
            OperationRegion (VREG, SystemMemory, 0xFEB00000, 0x1000)
            Field (VREG, DWordAcc, NoLock, Preserve) { CTRL, 32, Offset (0x10), BIG, 4096 }
            Scope (\\)
            {
                Name (ROOT, One)
            }
            Scope (\\_SB)
            {
                Device (COM1)
                {
                    Name (_HID, EisaId ("PNP0501"))
                    Name (_UID, One)
                    Name (_CRS, ResourceTemplate () {
                        IO (Decode16, 0x03F8, 0x03F8, 0x00, 0x08)
                        IRQNoFlags () {4}
                    })
                }
                Device (VR00)
                {
                    Name (_HID, "LNRO0005")
                    Name (_UID, Zero)
                    Name (_CRS, ResourceTemplate () {
                        Memory32Fixed (ReadWrite, 0xD0000000, 0x00000200)
                        Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive, ,, ) {5}
                    })
                }
                Device (PCI0)
                {
                    Name (_HID, EisaId ("PNP0A08"))
                    Name (_CID, EisaId ("PNP0A03"))
                    Name (_CRS, ResourceTemplate () {
                        IO (Decode10, 0x0060, 0x0064, 0x04, 0x01)
                        IRQNoFlags () {0, 8, 15}
                        Memory32Fixed (ReadOnly, 0xFEC00000, 0x00001000)
                        Interrupt (ResourceProducer, Level, ActiveLow, Shared, ,, ) {16, 0x12345678}
                        Interrupt (ResourceConsumer, Level, ActiveHigh, ExclusiveAndWake, ,, ) {9}
                        DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
                            0x00000000, 0xC0000000, 0xDFFFFFFF, 0x00000000, 0x20000000)
                        QWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, Prefetchable, ReadOnly,
                            0x0, 0x8000000000, 0xFFFFFFFFFF, 0x0, 0x8000000000)
                    })
                    Device (S08)
                    {
                        Name (_ADR, 0x00010000)
                    }
                }
                Name (BIGB, Buffer () { \(big.map { "0x" + String($0, radix: 16) }.joined(separator: ", ")) })
            }
            Scope (\\_SB.PCI0)
            {
                Name (_UID, Zero)
            }
            Scope (\\_SB.PCI0.S08)
            {
                Method (_EJ0, 1, NotSerialized)
                {
                    Notify (^^^COM1, 0x03)
                    Notify (^^S08, One)
                }
                Method (CALC, 2, Serialized, 3)
                {
                    Store (0x1234, Local0)
                    While (LLess (Local0, 0x10))
                    {
                        Add (Local0, One, Local0)
                    }
                    If (LAnd (LEqual (Arg0, One), LNot (Arg1)))
                    {
                        Return (One)
                    }
                    Else
                    {
                        Subtract (Local0, One, Local0)
                    }
                    If (LOr (LGreater (Arg0, 0x0F), LLess (Arg1, Zero)))
                    {
                        Or (Local0, 0x0100, Local0)
                    }
                    And (Arg0, 0xFF, Local1)
                    ShiftLeft (One, Arg1, Local2)
                    Store (ShiftRight (Arg0, 0x08), Local3)
                    Store (SizeOf (\\STRS), Local4)
                    Store (DerefOf (Index (\\INTS, Local1)), Local5)
                    Index (\\INTS, One, Local6)
                    Store (Local2, \\FSEL)
                    \\_SB.PCI0.S08._EJ0 (Arg0)
                    Return (Add (Add (Local3, Local4), Add (Local5, DerefOf (Local6))))
                }
            }
        }
        """

    static let aml = AML.list([
        .name("INTS", .package(([0, 1, 2, 0xFF, 0x100, 0xFFFF, 0x1_0000, 0xFFFF_FFFF, 0x1_0000_0000, .max - 1, .max] as [UInt64])
                                   .map(AML.integer) + [.eisaID("PNP0000"), .eisaID("PNP0A03")])),
        .name("STRS", .package([.string(""), .string("SwiftVMM 1.0")])),
        .name("BUFS", .package([.buffer([]), .buffer([0xAA]), .buffer([1, 2, 3]), .package([])])),
        .name("_S5", .package([.integer(5), .integer(5), .integer(0), .integer(0)])),
        .operationRegion("FWR", space: .systemIO, offset: .integer(0x510), length: .integer(0x0C)),
        .field("FWR", access: .word, lock: true, update: .writeAsOnes,
               [.named("FSEL", bits: 16), .reserved(bits: 16), .named("FDAT", bits: 8)]),
        .operationRegion("VREG", space: .systemMemory, offset: .integer(0xFEB0_0000), length: .integer(0x1000)),
        .field("VREG", access: .dword, [.named("CTRL", bits: 32), .reserved(bits: 96), .named("BIG", bits: 4096)]),
        .scope("\\", [.name("ROOT", .integer(1))]),
        .scope("\\_SB", [
            .device("COM1", [
                .name("_HID", .eisaID("PNP0501")),
                .name("_UID", .integer(1)),
                .name("_CRS", .resourceTemplate([
                    AML.Resource.io(min: 0x3F8, max: 0x3F8, alignment: 0, length: 8),
                    AML.Resource.irqNoFlags([4]),
                ])),
            ]),
            .device("VR00", [
                .name("_HID", .string("LNRO0005")),
                .name("_UID", .integer(0)),
                .name("_CRS", .resourceTemplate([
                    AML.Resource.memory32Fixed(writable: true, base: 0xD000_0000, length: 0x200),
                    AML.Resource.interrupt(levelTriggered: false, activeLow: false, shared: false, [5]),
                ])),
            ]),
            .device("PCI0", [
                .name("_HID", .eisaID("PNP0A08")),
                .name("_CID", .eisaID("PNP0A03")),
                .name("_CRS", .resourceTemplate([
                    AML.Resource.io(min: 0x60, max: 0x64, alignment: 4, length: 1, decode16: false),
                    AML.Resource.irqNoFlags([0, 8, 15]),
                    AML.Resource.memory32Fixed(writable: false, base: 0xFEC0_0000, length: 0x1000),
                    AML.Resource.interrupt(consumer: false, levelTriggered: true, activeLow: true, shared: true,
                                           [16, 0x1234_5678]),
                    AML.Resource.interrupt(levelTriggered: true, activeLow: false, shared: false, wakeCapable: true, [9]),
                    AML.Resource.dwordMemory(consumer: false, min: 0xC000_0000, max: 0xDFFF_FFFF, length: 0x2000_0000),
                    AML.Resource.qwordMemory(writable: false, caching: .prefetchable,
                                             min: 0x80_0000_0000, max: 0xFF_FFFF_FFFF, length: 0x80_0000_0000),
                ])),
                .device("S08", [.name("_ADR", .integer(0x1_0000))]),
            ]),
            .name("BIGB", .buffer(big)),
        ]),
        .scope("\\_SB.PCI0", [.name("_UID", .integer(0))]),
        .scope("\\_SB.PCI0.S08", [
            .method("_EJ0", args: 1, [
                .notify(.path("^^^COM1"), .integer(3)),
                .notify(.path("^^S08"), .integer(1)),
            ]),
            .method("CALC", args: 2, serialized: true, syncLevel: 3, [
                .store(.integer(0x1234), .local(0)),
                .whileDo(.lLess(.local(0), .integer(0x10)), [.add(.local(0), .integer(1), .local(0))]),
                .ifThen(.lAnd(.lEqual(.arg(0), .integer(1)), .lNot(.arg(1))), [.returnValue(.integer(1))]),
                .elseDo([.subtract(.local(0), .integer(1), .local(0))]),
                .ifThen(.lOr(.lGreater(.arg(0), .integer(0x0F)), .lLess(.arg(1), .integer(0))),
                        [.or(.local(0), .integer(0x100), .local(0))]),
                .and(.arg(0), .integer(0xFF), .local(1)),
                .shiftLeft(.integer(1), .arg(1), .local(2)),
                .store(.shiftRight(.arg(0), .integer(8)), .local(3)),
                .store(.sizeOf(.path("\\STRS")), .local(4)),
                .store(.derefOf(.index(.path("\\INTS"), .local(1))), .local(5)),
                .index(.path("\\INTS"), .integer(1), .local(6)),
                .store(.local(2), .path("\\FSEL")),
                .call("\\_SB.PCI0.S08._EJ0", [.arg(0)]),
                .returnValue(.add(.add(.local(3), .local(4)), .add(.local(5), .derefOf(.local(6))))),
            ]),
        ]),
    ])
}

/// Compares two byte strings and, if they differ, reports where.
private func expectSameBytes(_ actual: [UInt8], _ expected: [UInt8], sourceLocation: SourceLocation = #_sourceLocation) {
    guard actual != expected else { return }
    let at = zip(actual, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset
        ?? min(actual.count, expected.count)
    let hex: ([UInt8]) -> String = { b in
        b[at..<min(b.count, at + 16)].map { String($0, radix: 16) }.joined(separator: " ")
    }
    Issue.record("""
        \(actual.count) bytes, expected \(expected.count); first difference at body offset \(at): \
        [\(hex(actual))] instead of [\(hex(expected))]
        """, sourceLocation: sourceLocation)
}

/// Runs iasl and returns its exit status and everything it printed.
private func runIasl(_ arguments: [String]) throws -> (status: Int32, text: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: iaslPath)
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    let output = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: output, as: UTF8.self))
}

private func withTemporaryDirectory(_ body: (URL) throws -> Void) throws {
    let dir = FileManager.default.temporaryDirectory.appendingPathComponent("aml-iasl-\(UUID().uuidString)")
    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
    defer { try? FileManager.default.removeItem(at: dir) }
    try body(dir)
}
