import ACPI
import Testing

// Expected bytes are derived by hand from ACPI 6.x chapter 20 (and section 6.4 for resource
// descriptors); the equivalent ASL is in the comment above each expectation.

@Suite("AML data objects")
struct AMLDataTests {
    @Test("integers take the shortest encoding")
    func integers() {
        #expect(AML.integer(0).bytes == [0x00])                               // Zero
        #expect(AML.integer(1).bytes == [0x01])                               // One
        #expect(AML.integer(2).bytes == [0x0A, 0x02])                         // 0x02
        #expect(AML.integer(0xFF).bytes == [0x0A, 0xFF])                      // 0xFF
        #expect(AML.integer(0x100).bytes == [0x0B, 0x00, 0x01])               // 0x0100
        #expect(AML.integer(0xFFFF).bytes == [0x0B, 0xFF, 0xFF])              // 0xFFFF
        #expect(AML.integer(0x1_0000).bytes == [0x0C, 0x00, 0x00, 0x01, 0x00]) // 0x00010000
        #expect(AML.integer(0xFFFF_FFFF).bytes == [0x0C, 0xFF, 0xFF, 0xFF, 0xFF]) // 0xFFFFFFFF
        // 0x0000000100000000
        #expect(AML.integer(0x1_0000_0000).bytes == [0x0E, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00])
        // 0x0102030405060708
        #expect(AML.integer(0x0102_0304_0506_0708).bytes == [0x0E, 0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01])
        // 0xFFFFFFFFFFFFFFFE
        #expect(AML.integer(UInt64.max - 1).bytes == [0x0E, 0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
        #expect(AML.integer(UInt64.max).bytes == [0xFF])                      // Ones
    }

    @Test("strings are StringPrefix, ASCII, NUL")
    func strings() {
        #expect(AML.string("").bytes == [0x0D, 0x00])                         // ""
        #expect(AML.string("Hi!").bytes == [0x0D, 0x48, 0x69, 0x21, 0x00])    // "Hi!"
        #expect(AML.string("\u{7F}\u{01}").bytes == [0x0D, 0x7F, 0x01, 0x00]) // the ends of the ASCII range
    }

    @Test("buffers carry their size as an integer")
    func buffers() {
        // Buffer () { }
        #expect(AML.buffer([]).bytes == [0x11, 0x02, 0x00])
        // Buffer () { 0xAA }
        #expect(AML.buffer([0xAA]).bytes == [0x11, 0x03, 0x01, 0xAA])
        // Buffer () { 0x01, 0x02, 0x03 }
        #expect(AML.buffer([1, 2, 3]).bytes == [0x11, 0x06, 0x0A, 0x03, 0x01, 0x02, 0x03])
    }

    @Test("packages count their elements")
    func packages() {
        // Package () { }
        #expect(AML.package([]).bytes == [0x12, 0x02, 0x00])
        // Name (_S5, Package () { 5, 5, 0, 0 })
        let s5 = AML.name("_S5", .package([.integer(5), .integer(5), .integer(0), .integer(0)]))
        #expect(s5.bytes == [0x08, 0x5F, 0x53, 0x35, 0x5F, 0x12, 0x08, 0x04, 0x0A, 0x05, 0x0A, 0x05, 0x00, 0x00])
        // Package () { "A", Package () { One } }
        #expect(AML.package([.string("A"), .package([.integer(1)])]).bytes
                == [0x12, 0x09, 0x02, 0x0D, 0x41, 0x00, 0x12, 0x03, 0x01, 0x01])
        // 255 elements, the most NumElements can count: Package () { Zero, Zero, ... }
        let full = AML.package(Array(repeating: .integer(0), count: 255))
        #expect(full.bytes[0..<4] == [0x12, 0x42, 0x10, 0xFF])  // content 256 -> total 258 = 0x102
        #expect(full.bytes.count == 259)
    }

    @Test("EISA ids compress three letters and four hex digits")
    func eisaIDs() {
        // EisaId ("PNP0501") == 0x0105D041
        #expect(AML.eisaID("PNP0501").bytes == [0x0C, 0x41, 0xD0, 0x05, 0x01])
        // EisaId ("PNP0A03") == 0x030AD041, hex digits in either case
        #expect(AML.eisaID("PNP0A03").bytes == [0x0C, 0x41, 0xD0, 0x0A, 0x03])
        #expect(AML.eisaID("PNP0a03") == AML.eisaID("PNP0A03"))
        // EisaId ("QEM0002"): Q=0x11 E=0x05 M=0x0D -> 0x44, 0xAD
        #expect(AML.eisaID("QEM0002").bytes == [0x0C, 0x44, 0xAD, 0x00, 0x02])
        // EisaId ("ZZZFFFF"): Z=0x1A -> 0x6B, 0x5A
        #expect(AML.eisaID("ZZZFFFF").bytes == [0x0C, 0x6B, 0x5A, 0xFF, 0xFF])
        // EisaId ("PNP0000") == 0x0000D041, which iasl emits as a Word like any other integer
        #expect(AML.eisaID("PNP0000").bytes == [0x0B, 0x41, 0xD0])
    }
}

@Suite("AML names")
struct AMLNameTests {
    @Test("a single NameSeg is padded to four characters")
    func segments() {
        #expect(AML.nameString("_S5").bytes == [0x5F, 0x53, 0x35, 0x5F])     // _S5_
        #expect(AML.nameString("A").bytes == [0x41, 0x5F, 0x5F, 0x5F])       // A___
        #expect(AML.nameString("COM1").bytes == [0x43, 0x4F, 0x4D, 0x31])    // COM1
    }

    @Test("root and parent prefixes")
    func prefixes() {
        #expect(AML.nameString("\\").bytes == [0x5C, 0x00])                  // \ (root, NullName)
        #expect(AML.nameString("\\_SB").bytes == [0x5C, 0x5F, 0x53, 0x42, 0x5F]) // \_SB
        #expect(AML.nameString("^FOO").bytes == [0x5E, 0x46, 0x4F, 0x4F, 0x5F])  // ^FOO
        #expect(AML.nameString("^^FOO").bytes == [0x5E, 0x5E, 0x46, 0x4F, 0x4F, 0x5F]) // ^^FOO
        #expect(AML.nameString("").bytes == [0x00])                          // NullName
    }

    @Test("two segments take DualNamePrefix, more take MultiNamePrefix")
    func multiSegment() {
        // \_SB.VGEN
        #expect(AML.nameString("\\_SB.VGEN").bytes
                == [0x5C, 0x2E, 0x5F, 0x53, 0x42, 0x5F, 0x56, 0x47, 0x45, 0x4E])
        // ^PCI0.FOO
        #expect(AML.nameString("^PCI0.FOO").bytes
                == [0x5E, 0x2E, 0x50, 0x43, 0x49, 0x30, 0x46, 0x4F, 0x4F, 0x5F])
        // \_SB.PCI0.S08
        #expect(AML.nameString("\\_SB.PCI0.S08").bytes
                == [0x5C, 0x2F, 0x03, 0x5F, 0x53, 0x42, 0x5F, 0x50, 0x43, 0x49, 0x30, 0x53, 0x30, 0x38, 0x5F])
        // A.B.C.D (relative, four segments)
        #expect(AML.nameString("A.B.C.D").bytes
                == [0x2F, 0x04] + [0x41, 0x42, 0x43, 0x44].flatMap { [$0, 0x5F, 0x5F, 0x5F] })
    }

    @Test("path and call are NameStrings used as terms")
    func pathAndCall() {
        // \_SB.PCI0 (a reference)
        #expect(AML.path("\\_SB.PCI0") == AML.nameString("\\_SB.PCI0"))
        // M2 (One, Local0)
        #expect(AML.call("M2", [.integer(1), .local(0)]).bytes == [0x4D, 0x32, 0x5F, 0x5F, 0x01, 0x60])
        // \_SB.INIT ()
        #expect(AML.call("\\_SB.INIT", []).bytes == [0x5C, 0x2E, 0x5F, 0x53, 0x42, 0x5F, 0x49, 0x4E, 0x49, 0x54])
    }

    @Test("ArgN, LocalN, NullName and lists")
    func argsLocalsNull() {
        #expect((0...6).map { AML.arg($0).bytes } == [[0x68], [0x69], [0x6A], [0x6B], [0x6C], [0x6D], [0x6E]])
        #expect((0...7).map { AML.local($0).bytes }
                == [[0x60], [0x61], [0x62], [0x63], [0x64], [0x65], [0x66], [0x67]])
        #expect(AML.nullName.bytes == [0x00])
        // Store (Arg0, Local0)  Return (Local0)
        #expect(AML.list([.store(.arg(0), .local(0)), .returnValue(.local(0))]).bytes == [0x70, 0x68, 0x60, 0xA4, 0x60])
        #expect(AML.list([]).bytes == [])
    }
}

@Suite("AML named objects")
struct AMLNamedObjectTests {
    @Test("Name")
    func name() {
        // Name (_HID, EisaId ("PNP0501"))
        #expect(AML.name("_HID", .eisaID("PNP0501")).bytes == [0x08, 0x5F, 0x48, 0x49, 0x44, 0x0C, 0x41, 0xD0, 0x05, 0x01])
        // Name (\_SB.FOO, "x")
        #expect(AML.name("\\_SB.FOO", .string("x")).bytes
                == [0x08, 0x5C, 0x2E, 0x5F, 0x53, 0x42, 0x5F, 0x46, 0x4F, 0x4F, 0x5F, 0x0D, 0x78, 0x00])
    }

    @Test("Scope")
    func scope() {
        // Scope (\_SB) { Name (X, One) }
        #expect(AML.scope("\\_SB", [.name("X", .integer(1))]).bytes
                == [0x10, 0x0C, 0x5C, 0x5F, 0x53, 0x42, 0x5F, 0x08, 0x58, 0x5F, 0x5F, 0x5F, 0x01])
        // Scope (\) { }
        #expect(AML.scope("\\", []).bytes == [0x10, 0x03, 0x5C, 0x00])
    }

    @Test("Device")
    func device() {
        // Device (COM1) { Name (_HID, EisaId ("PNP0501")) Name (_UID, One) }
        let com1 = AML.device("COM1", [.name("_HID", .eisaID("PNP0501")), .name("_UID", .integer(1))])
        #expect(com1.bytes == [0x5B, 0x82, 0x15, 0x43, 0x4F, 0x4D, 0x31,
                               0x08, 0x5F, 0x48, 0x49, 0x44, 0x0C, 0x41, 0xD0, 0x05, 0x01,
                               0x08, 0x5F, 0x55, 0x49, 0x44, 0x01])
    }

    @Test("Method flags: ArgCount, SerializeFlag, SyncLevel")
    func method() {
        // Method (_STA, 0, NotSerialized) { Return (0x0F) }
        #expect(AML.method("_STA", [.returnValue(.integer(0x0F))]).bytes
                == [0x14, 0x09, 0x5F, 0x53, 0x54, 0x41, 0x00, 0xA4, 0x0A, 0x0F])
        // Method (M2, 3, Serialized, 5) { Return (Arg2) }
        #expect(AML.method("M2", args: 3, serialized: true, syncLevel: 5, [.returnValue(.arg(2))]).bytes
                == [0x14, 0x08, 0x4D, 0x32, 0x5F, 0x5F, 0x5B, 0xA4, 0x6A])
        // Method (MAX, 7, Serialized, 15) { }
        #expect(AML.method("MAX", args: 7, serialized: true, syncLevel: 15, []).bytes
                == [0x14, 0x06, 0x4D, 0x41, 0x58, 0x5F, 0xFF])
        // Method (_EJ0, 1, NotSerialized) { }
        #expect(AML.method("_EJ0", args: 1, []).bytes == [0x14, 0x06, 0x5F, 0x45, 0x4A, 0x30, 0x01])
    }

    @Test("OperationRegion")
    func operationRegion() {
        // OperationRegion (FWCF, SystemIO, 0x0510, 0x0C)
        #expect(AML.operationRegion("FWCF", space: .systemIO, offset: .integer(0x510), length: .integer(0x0C)).bytes
                == [0x5B, 0x80, 0x46, 0x57, 0x43, 0x46, 0x01, 0x0B, 0x10, 0x05, 0x0A, 0x0C])
        // OperationRegion (VREG, SystemMemory, 0xFEB00000, 0x1000)
        #expect(AML.operationRegion("VREG", space: .systemMemory, offset: .integer(0xFEB0_0000),
                                    length: .integer(0x1000)).bytes
                == [0x5B, 0x80, 0x56, 0x52, 0x45, 0x47, 0x00, 0x0C, 0x00, 0x00, 0xB0, 0xFE, 0x0B, 0x00, 0x10])
        // OperationRegion (PCFG, PCI_Config, Arg0, 0x100): every space byte
        let spaces: [AML.RegionSpace] = [.systemMemory, .systemIO, .pciConfig, .embeddedControl, .smbus, .systemCMOS,
                                         .pciBarTarget]
        #expect(spaces.map { AML.operationRegion("R", space: $0, offset: .arg(0), length: .integer(1)).bytes[6] }
                == [0, 1, 2, 3, 4, 5, 6])
    }

    @Test("Field flags and field units")
    func field() {
        // Field (FWCF, WordAcc, Lock, WriteAsOnes) { SEL, 16, , 16, DATA, 8 }
        let fwcf = AML.field("FWCF", access: .word, lock: true, update: .writeAsOnes,
                             [.named("SEL", bits: 16), .reserved(bits: 16), .named("DATA", bits: 8)])
        #expect(fwcf.bytes == [0x5B, 0x81, 0x12, 0x46, 0x57, 0x43, 0x46, 0x32,
                               0x53, 0x45, 0x4C, 0x5F, 0x10, 0x00, 0x10, 0x44, 0x41, 0x54, 0x41, 0x08])
        // Field (VREG, DWordAcc, NoLock, Preserve) { CTRL, 32, Offset (0x10), BIG, 4096 }
        // Offset (0x10) skips 128 - 32 = 96 bits (0x60: two length bytes); 4096 bits take three.
        let vreg = AML.field("VREG", access: .dword, [.named("CTRL", bits: 32), .reserved(bits: 96),
                                                       .named("BIG", bits: 4096)])
        #expect(vreg.bytes == [0x5B, 0x81, 0x15, 0x56, 0x52, 0x45, 0x47, 0x03,
                               0x43, 0x54, 0x52, 0x4C, 0x20, 0x00, 0x40, 0x06, 0x42, 0x49, 0x47, 0x5F, 0x80, 0x00, 0x01])
        // Field (R, AnyAcc, NoLock, Preserve) { A, 63, B, 64 }: bit lengths are not PkgLengths (no self count)
        #expect(AML.field("R", access: .any, [.named("A", bits: 63), .named("B", bits: 64)]).bytes
                == [0x5B, 0x81, 0x11, 0x52, 0x5F, 0x5F, 0x5F, 0x00,
                    0x41, 0x5F, 0x5F, 0x5F, 0x3F, 0x42, 0x5F, 0x5F, 0x5F, 0x40, 0x04])
        // Field (R, BufferAcc, NoLock, WriteAsZeros) { }; QWordAcc and ByteAcc with Lock
        #expect(AML.field("R", access: .buffer, update: .writeAsZeros, []).bytes[7] == 0x45)
        #expect(AML.field("R", access: .qword, lock: true, []).bytes[7] == 0x14)
        #expect(AML.field("R", access: .byte, lock: true, update: .writeAsZeros, []).bytes[7] == 0x51)
    }
}

@Suite("AML statements and expressions")
struct AMLStatementTests {
    @Test("If, Else, While")
    func control() {
        // If (LEqual (Arg0, One)) { Return (One) }
        #expect(AML.ifThen(.lEqual(.arg(0), .integer(1)), [.returnValue(.integer(1))]).bytes
                == [0xA0, 0x06, 0x93, 0x68, 0x01, 0xA4, 0x01])
        // Else { Return (Zero) }
        #expect(AML.elseDo([.returnValue(.integer(0))]).bytes == [0xA1, 0x03, 0xA4, 0x00])
        // While (LLess (Local0, 0x10)) { Add (Local0, One, Local0) }
        #expect(AML.whileDo(.lLess(.local(0), .integer(0x10)), [.add(.local(0), .integer(1), .local(0))]).bytes
                == [0xA2, 0x09, 0x95, 0x60, 0x0A, 0x10, 0x72, 0x60, 0x01, 0x60])
    }

    @Test("Return, Notify, Store")
    func statements() {
        #expect(AML.returnValue(.local(1)).bytes == [0xA4, 0x61])               // Return (Local1)
        // Notify (\_SB.COM1, 0x80)
        #expect(AML.notify(.path("\\_SB.COM1"), .integer(0x80)).bytes
                == [0x86, 0x5C, 0x2E, 0x5F, 0x53, 0x42, 0x5F, 0x43, 0x4F, 0x4D, 0x31, 0x0A, 0x80])
        // Notify (^S08, One)
        #expect(AML.notify(.path("^S08"), .integer(1)).bytes == [0x86, 0x5E, 0x53, 0x30, 0x38, 0x5F, 0x01])
        // Store (0x1234, Local0)
        #expect(AML.store(.integer(0x1234), .local(0)).bytes == [0x70, 0x0B, 0x34, 0x12, 0x60])
        // Store (Arg0, FSEL)
        #expect(AML.store(.arg(0), .path("FSEL")).bytes == [0x70, 0x68, 0x46, 0x53, 0x45, 0x4C])
    }

    @Test("arithmetic with and without a target")
    func arithmetic() {
        #expect(AML.add(.arg(0), .integer(4)).bytes == [0x72, 0x68, 0x0A, 0x04, 0x00])              // Add (Arg0, 4)
        #expect(AML.add(.arg(0), .integer(4), .local(2)).bytes == [0x72, 0x68, 0x0A, 0x04, 0x62])   // Add (Arg0, 4, Local2)
        #expect(AML.subtract(.local(0), .integer(1), .local(0)).bytes == [0x74, 0x60, 0x01, 0x60])  // Subtract (Local0, One, Local0)
        #expect(AML.and(.arg(0), .integer(0xFF), .local(1)).bytes == [0x7B, 0x68, 0x0A, 0xFF, 0x61]) // And (Arg0, 0xFF, Local1)
        #expect(AML.or(.local(0), .integer(0x100), .local(0)).bytes == [0x7D, 0x60, 0x0B, 0x00, 0x01, 0x60]) // Or (Local0, 0x0100, Local0)
        #expect(AML.shiftLeft(.integer(1), .arg(1), .local(3)).bytes == [0x79, 0x01, 0x69, 0x63])   // ShiftLeft (One, Arg1, Local3)
        #expect(AML.shiftRight(.arg(0), .integer(8)).bytes == [0x7A, 0x68, 0x0A, 0x08, 0x00])       // ShiftRight (Arg0, 8)
        // Store (ShiftRight (Arg0, 0x08), Local3)
        #expect(AML.store(.shiftRight(.arg(0), .integer(8)), .local(3)).bytes
                == [0x70, 0x7A, 0x68, 0x0A, 0x08, 0x00, 0x63])
    }

    @Test("logical operators")
    func logical() {
        #expect(AML.lEqual(.arg(0), .integer(0)).bytes == [0x93, 0x68, 0x00])          // LEqual (Arg0, Zero)
        #expect(AML.lLess(.local(0), .arg(1)).bytes == [0x95, 0x60, 0x69])             // LLess (Local0, Arg1)
        #expect(AML.lGreater(.arg(0), .integer(0x0F)).bytes == [0x94, 0x68, 0x0A, 0x0F]) // LGreater (Arg0, 0x0F)
        #expect(AML.lNot(.arg(0)).bytes == [0x92, 0x68])                               // LNot (Arg0)
        #expect(AML.lAnd(.arg(0), .arg(1)).bytes == [0x90, 0x68, 0x69])                // LAnd (Arg0, Arg1)
        #expect(AML.lOr(.local(0), .integer(1)).bytes == [0x91, 0x60, 0x01])           // LOr (Local0, One)
        // LAnd (LEqual (Arg0, One), LNot (Arg1))
        #expect(AML.lAnd(.lEqual(.arg(0), .integer(1)), .lNot(.arg(1))).bytes == [0x90, 0x93, 0x68, 0x01, 0x92, 0x69])
    }

    @Test("SizeOf, Index, DerefOf")
    func objects() {
        #expect(AML.sizeOf(.arg(0)).bytes == [0x87, 0x68])                             // SizeOf (Arg0)
        #expect(AML.index(.arg(0), .integer(2)).bytes == [0x88, 0x68, 0x0A, 0x02, 0x00]) // Index (Arg0, 2)
        // Index (PKG0, Local0, Local1)
        #expect(AML.index(.path("PKG0"), .local(0), .local(1)).bytes == [0x88, 0x50, 0x4B, 0x47, 0x30, 0x60, 0x61])
        // DerefOf (Index (Arg0, One))
        #expect(AML.derefOf(.index(.arg(0), .integer(1))).bytes == [0x83, 0x88, 0x68, 0x01, 0x00])
    }
}

@Suite("AML resource templates")
struct AMLResourceTests {
    @Test("ResourceTemplate is a Buffer ending in an End Tag")
    func template() {
        // ResourceTemplate () { }
        #expect(AML.resourceTemplate([]).bytes == [0x11, 0x05, 0x0A, 0x02, 0x79, 0x00])
        // ResourceTemplate () { IO (Decode16, 0x03F8, 0x03F8, 0x00, 0x08) IRQNoFlags () {4} }
        let com1 = AML.resourceTemplate([AML.Resource.io(min: 0x3F8, max: 0x3F8, alignment: 0, length: 8),
                                         AML.Resource.irqNoFlags([4])])
        #expect(com1.bytes == [0x11, 0x10, 0x0A, 0x0D,
                               0x47, 0x01, 0xF8, 0x03, 0xF8, 0x03, 0x00, 0x08,
                               0x22, 0x10, 0x00,
                               0x79, 0x00])
    }

    @Test("IO")
    func io() {
        // IO (Decode10, 0x0060, 0x0064, 0x04, 0x01)
        #expect(AML.Resource.io(min: 0x60, max: 0x64, alignment: 4, length: 1, decode16: false)
                == [0x47, 0x00, 0x60, 0x00, 0x64, 0x00, 0x04, 0x01])
        // IO (Decode16, 0xFFFF, 0xFFFF, 0xFF, 0xFF)
        #expect(AML.Resource.io(min: 0xFFFF, max: 0xFFFF, alignment: 0xFF, length: 0xFF)
                == [0x47, 0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
    }

    @Test("IRQNoFlags")
    func irqNoFlags() {
        #expect(AML.Resource.irqNoFlags([4]) == [0x22, 0x10, 0x00])            // IRQNoFlags () {4}
        #expect(AML.Resource.irqNoFlags([0, 8, 15]) == [0x22, 0x01, 0x81])     // IRQNoFlags () {0, 8, 15}
        #expect(AML.Resource.irqNoFlags([]) == [0x22, 0x00, 0x00])             // IRQNoFlags () {}
    }

    @Test("Memory32Fixed")
    func memory32Fixed() {
        // Memory32Fixed (ReadWrite, 0xFEB00000, 0x00001000)
        #expect(AML.Resource.memory32Fixed(writable: true, base: 0xFEB0_0000, length: 0x1000)
                == [0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0xB0, 0xFE, 0x00, 0x10, 0x00, 0x00])
        // Memory32Fixed (ReadOnly, 0xFFFFFFFF, 0xFFFFFFFF)
        #expect(AML.Resource.memory32Fixed(writable: false, base: .max, length: .max)
                == [0x86, 0x09, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
    }

    @Test("Interrupt: flags and interrupt list")
    func interrupt() {
        // Interrupt (ResourceConsumer, Level, ActiveHigh, Exclusive, ,, ) {5}
        #expect(AML.Resource.interrupt(levelTriggered: true, activeLow: false, shared: false, [5])
                == [0x89, 0x06, 0x00, 0x01, 0x01, 0x05, 0x00, 0x00, 0x00])
        // Interrupt (ResourceConsumer, Edge, ActiveLow, SharedAndWake, ,, ) {16, 0x12345678}
        #expect(AML.Resource.interrupt(levelTriggered: false, activeLow: true, shared: true, wakeCapable: true,
                                       [16, 0x1234_5678])
                == [0x89, 0x0A, 0x00, 0x1F, 0x02, 0x10, 0x00, 0x00, 0x00, 0x78, 0x56, 0x34, 0x12])
        // Interrupt (ResourceProducer, Level, ActiveLow, Shared, ,, ) {40}
        #expect(AML.Resource.interrupt(consumer: false, levelTriggered: true, activeLow: true, shared: true, [40])
                == [0x89, 0x06, 0x00, 0x0C, 0x01, 0x28, 0x00, 0x00, 0x00])
        // 255 interrupts: length 2 + 4 * 255 = 1022 = 0x03FE
        let many = AML.Resource.interrupt(levelTriggered: true, activeLow: false, shared: false,
                                          Array(repeating: .max, count: 255))
        #expect(many.count == 3 + 1022 && many[0..<5] == [0x89, 0xFE, 0x03, 0x01, 0xFF])
    }

    @Test("DWordMemory and QWordMemory")
    func addressSpace() {
        // DWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,
        //              0x00000000, 0xC0000000, 0xDFFFFFFF, 0x00000000, 0x20000000)
        #expect(AML.Resource.dwordMemory(min: 0xC000_0000, max: 0xDFFF_FFFF, length: 0x2000_0000)
                == [0x87, 0x17, 0x00, 0x00, 0x0D, 0x01,
                    0x00, 0x00, 0x00, 0x00,  0x00, 0x00, 0x00, 0xC0,  0xFF, 0xFF, 0xFF, 0xDF,
                    0x00, 0x00, 0x00, 0x00,  0x00, 0x00, 0x00, 0x20])
        // DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Cacheable, ReadOnly, 0, 0x1000, 0x1FFF, 0, 0x1000)
        #expect(AML.Resource.dwordMemory(consumer: false, writable: false, caching: .cacheable,
                                         min: 0x1000, max: 0x1FFF, length: 0x1000)[3..<6] == [0x00, 0x0C, 0x02])
        // DWordMemory (..., WriteCombining, ReadWrite, ...)
        #expect(AML.Resource.dwordMemory(caching: .writeCombining, min: 0, max: 0, length: 1)[5] == 0x05)
        // QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, Prefetchable, ReadWrite,
        //              0x0, 0x8000000000, 0xFFFFFFFFFF, 0x0, 0x8000000000)
        #expect(AML.Resource.qwordMemory(consumer: false, caching: .prefetchable,
                                         min: 0x80_0000_0000, max: 0xFF_FFFF_FFFF, length: 0x80_0000_0000)
                == [0x8A, 0x2B, 0x00, 0x00, 0x0C, 0x07,
                    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                    0x00, 0x00, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00,
                    0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00,
                    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
                    0x00, 0x00, 0x00, 0x00, 0x80, 0x00, 0x00, 0x00])
    }
}

@Suite("AML PkgLength")
struct AMLPkgLengthTests {
    @Test("the encoded total counts the PkgLength bytes themselves", arguments: [
        (0, [0x01]),
        (1, [0x02]),
        (62, [0x3F]),                          // total 63: the largest one-byte length
        (63, [0x41, 0x04]),                    // total 65 = 0x041 (64 would need 2 bytes too)
        (64, [0x42, 0x04]),                    // total 66 = 0x042
        (300, [0x4E, 0x12]),                   // total 302 = 0x12E
        (4093, [0x4F, 0xFF]),                  // total 4095 = 0xFFF: the largest two-byte length
        (4094, [0x81, 0x00, 0x01]),            // total 4097 = 0x01001
        (4095, [0x82, 0x00, 0x01]),            // total 4098
        (4096, [0x83, 0x00, 0x01]),            // total 4099
        (1_048_572, [0x8F, 0xFF, 0xFF]),       // total 0xFFFFF: the largest three-byte length
        (1_048_573, [0xC1, 0x00, 0x00, 0x01]), // total 0x100001
        (1_048_574, [0xC2, 0x00, 0x00, 0x01]),
        (1_048_575, [0xC3, 0x00, 0x00, 0x01]),
        (1_048_576, [0xC4, 0x00, 0x00, 0x01]),
        ((1 << 28) - 5, [0xCF, 0xFF, 0xFF, 0xFF]), // total 2^28 - 1: the largest encodable
    ] as [(Int, [UInt8])])
    func pkgLength(content: Int, expected: [UInt8]) {
        #expect(AML.pkgLength(content) == expected)
    }

    @Test("a Buffer whose PkgLength needs three bytes")
    func bigBuffer() {
        // Buffer () { 5000 bytes }: size 0x0B 0x88 0x13, content 5003, total 5006 = 0x0138E
        let data = (0..<5000).map { UInt8(truncatingIfNeeded: $0) }
        let b = AML.buffer(data).bytes
        #expect(b[0..<7] == [0x11, 0x8E, 0x38, 0x01, 0x0B, 0x88, 0x13])
        #expect(Array(b[7...]) == data)
    }

    @Test("a Buffer whose PkgLength needs four bytes")
    func hugeBuffer() {
        // Buffer (1048570) { ... }: size 0x0C 0xFA 0xFF 0x0F 0x00, content 1048575, total 1048579 = 0x100003
        let b = AML.buffer([UInt8](repeating: 0xA5, count: 1_048_570)).bytes
        #expect(b[0..<10] == [0x11, 0xC3, 0x00, 0x00, 0x01, 0x0C, 0xFA, 0xFF, 0x0F, 0x00])
        #expect(b.count == 1 + 1_048_579)
    }

    @Test("a Scope whose PkgLength needs three bytes, around a Buffer exactly at the two-byte limit")
    func bigScope() {
        // Scope (\_SB) { Name (BUF, Buffer () { 4090 bytes }) }
        // Buffer: size 0x0B 0xFA 0x0F, content 4093, total 4095 -> 0x4F 0xFF; 4096 bytes with its opcode.
        // Name: 5 + 4096 = 4101. Scope content: 5 + 4101 = 4106, total 4109 = 0x0100D.
        let s = AML.scope("\\_SB", [.name("BUF", .buffer([UInt8](repeating: 0, count: 4090)))]).bytes
        #expect(s[0..<9] == [0x10, 0x8D, 0x00, 0x01, 0x5C, 0x5F, 0x53, 0x42, 0x5F])
        #expect(s[9..<17] == [0x08, 0x42, 0x55, 0x46, 0x5F, 0x11, 0x4F, 0xFF])
        #expect(s[17..<20] == [0x0B, 0xFA, 0x0F])
        #expect(s.count == 1 + 4109)
    }
}

@Suite("AML preconditions")
struct AMLPreconditionTests {
    @Test("programmer errors stop the process")
    func preconditions() async {
        await #expect(processExitsWith: .failure) { _ = AML.nameString("TOOLONG") }
        await #expect(processExitsWith: .failure) { _ = AML.nameString("1ABC") }
        await #expect(processExitsWith: .failure) { _ = AML.nameString("_sb") }
        await #expect(processExitsWith: .failure) { _ = AML.string("é") }
        await #expect(processExitsWith: .failure) { _ = AML.eisaID("PNP050") }
        await #expect(processExitsWith: .failure) { _ = AML.arg(7) }
        await #expect(processExitsWith: .failure) { _ = AML.method("M", args: 8, []) }
        await #expect(processExitsWith: .failure) { _ = AML.Resource.irqNoFlags([16]) }
        await #expect(processExitsWith: .failure) { _ = AML.pkgLength((1 << 28) - 4) }
    }
}
