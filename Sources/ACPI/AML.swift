/// One encoded ACPI Machine Language term, or a list of terms, as raw bytes (ACPI 6.x chapter 20).
///
/// Terms are built with the static constructors below and nest freely: a `scope` body is a list of
/// terms, a `store` operand is a term. The encoder emits what iasl emits for the equivalent ASL
/// (shortest integers, no constant folding, names as written): see the iasl cross-check tests.
public struct AML: Sendable, Equatable {
    /// The encoded term(s).
    public var bytes: [UInt8]

    /// Wraps bytes that are already AML.
    public init(bytes: [UInt8]) {
        self.bytes = bytes
    }
}

// MARK: - Data objects

extension AML {
    /// An integer in its shortest form: ZeroOp, OneOp, OnesOp (all 64 bits set), or a Byte, Word,
    /// DWord or QWord constant.
    public static func integer(_ v: UInt64) -> AML {
        var b: [UInt8]
        switch v {
        case 0: b = [0x00]                                 // ZeroOp
        case 1: b = [0x01]                                 // OneOp
        case .max: b = [0xFF]                              // OnesOp
        case ...0xFF: b = [0x0A, UInt8(v)]                 // BytePrefix
        case ...0xFFFF: b = [0x0B]; b.appendLE(UInt16(v))  // WordPrefix
        case ...0xFFFF_FFFF: b = [0x0C]; b.appendLE(UInt32(v)) // DWordPrefix
        default: b = [0x0E]; b.appendLE(v)                 // QWordPrefix
        }
        return AML(bytes: b)
    }

    /// A DWord constant even for small values (DWordPrefix + 4 bytes): a field a loader patches later
    /// with ADD_POINTER needs all four bytes.
    public static func dword(_ v: UInt32) -> AML {
        var b: [UInt8] = [0x0C]
        b.appendLE(v)
        return AML(bytes: b)
    }

    /// A String constant: StringPrefix, the ASCII characters, NUL. `s` must be ASCII without NUL.
    public static func string(_ s: String) -> AML {
        precondition(s.utf8.allSatisfy { (0x01...0x7F).contains($0) }, "AML strings are ASCII 0x01-0x7F: \(s)")
        return AML(bytes: [0x0D] + Array(s.utf8) + [0x00])
    }

    /// `Buffer () { data }`: BufferOp PkgLength BufferSize ByteList.
    public static func buffer(_ data: [UInt8]) -> AML {
        packaged([0x11], integer(UInt64(data.count)).bytes + data)
    }

    /// `Package () { elements }`: PackageOp PkgLength NumElements PackageElementList (at most 255).
    public static func package(_ elements: [AML]) -> AML {
        precondition(elements.count <= 255, "a Package holds at most 255 elements (VarPackage is not supported)")
        return packaged([0x12], [UInt8(elements.count)] + joined(elements))
    }

    /// `EISAID ("PNP0501")`: the compressed EISA id ("UUUXXXX": three letters A-Z, four hex digits)
    /// as an integer. Like iasl, the shortest integer form: a DWord unless the product number is 0000.
    public static func eisaID(_ id: String) -> AML {
        let c = Array(id.utf8)
        precondition(c.count == 7 && c[0..<3].allSatisfy { (0x41...0x5A).contains($0) }
                     && c[3...].allSatisfy { hexValue($0) != nil }, "EISA ids look like PNP0A03: \(id)")
        let letters = c[0..<3].reduce(UInt32(0)) { $0 << 5 | UInt32($1 - 0x40) }
        let product = c[3...].reduce(UInt32(0)) { $0 << 4 | UInt32(hexValue($1)!) }
        // Big-endian bit order (letters, then product number) stored as a little-endian DWord.
        return integer(UInt64((letters << 16 | product).byteSwapped))
    }

    private static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case 0x30...0x39: c - 0x30
        case 0x41...0x46: c - 0x41 + 10
        case 0x61...0x66: c - 0x61 + 10
        default: nil
        }
    }
}

// MARK: - Names

extension AML {
    /// A NameString: an optional root (`\`) or parent (`^`...) prefix, then dot-separated NameSegs
    /// of 1-4 characters (A-Z, 0-9, `_`, not starting with a digit), each padded with `_`.
    /// One segment is written as is, two with DualNamePrefix, more with MultiNamePrefix; no segment
    /// (`"\\"`, `"^"`, `""`) is NullName.
    public static func nameString(_ path: String) -> AML {
        var b = [UInt8]()
        var rest = Substring(path)
        if rest.first == "\\" {
            b.append(0x5C)                                  // RootChar
            rest.removeFirst()
        } else {
            while rest.first == "^" {
                b.append(0x5E)                              // ParentPrefixChar
                rest.removeFirst()
            }
        }
        let segs = rest.isEmpty ? [] : rest.split(separator: ".", omittingEmptySubsequences: false).map(nameSeg)
        switch segs.count {
        case 0: b.append(0x00)                              // NullName
        case 1: b += segs[0]
        case 2: b += [0x2E] + segs[0] + segs[1]             // DualNamePrefix
        default:
            precondition(segs.count <= 255, "a NamePath has at most 255 segments")
            b += [0x2F, UInt8(segs.count)] + segs.joined()  // MultiNamePrefix SegCount
        }
        return AML(bytes: b)
    }

    /// A NameSeg: exactly 4 bytes, `seg` padded with `_`.
    private static func nameSeg<S: StringProtocol>(_ seg: S) -> [UInt8] {
        let c = Array(seg.utf8)
        let lead: (UInt8) -> Bool = { (0x41...0x5A).contains($0) || $0 == 0x5F }
        precondition((1...4).contains(c.count) && lead(c[0]) && c.allSatisfy { lead($0) || (0x30...0x39).contains($0) },
                     "a NameSeg is 1-4 characters A-Z, 0-9, _ not starting with a digit: \(seg)")
        return c + [UInt8](repeating: 0x5F, count: 4 - c.count)
    }

    /// A name used as a term: a reference to an object, or a call of a method without arguments.
    public static func path(_ p: String) -> AML { nameString(p) }

    /// A method invocation: the method's NameString followed by its arguments.
    public static func call(_ p: String, _ args: [AML]) -> AML {
        AML(bytes: nameString(p).bytes + joined(args))
    }

    /// NullName as a Target: the result is not stored.
    public static let nullName = AML(bytes: [0x00])

    /// `ArgN`, N in 0...6.
    public static func arg(_ n: Int) -> AML {
        precondition((0...6).contains(n), "methods have Arg0-Arg6")
        return AML(bytes: [0x68 + UInt8(n)])
    }

    /// `LocalN`, N in 0...7.
    public static func local(_ n: Int) -> AML {
        precondition((0...7).contains(n), "methods have Local0-Local7")
        return AML(bytes: [0x60 + UInt8(n)])
    }

    /// The terms one after the other.
    public static func list(_ terms: [AML]) -> AML { AML(bytes: joined(terms)) }

    private static func joined(_ terms: [AML]) -> [UInt8] { terms.flatMap(\.bytes) }
}

// MARK: - Named objects

extension AML {
    /// `Name (path, value)`.
    public static func name(_ path: String, _ value: AML) -> AML {
        AML(bytes: [0x08] + nameString(path).bytes + value.bytes)
    }

    /// `Scope (path) { body }`.
    public static func scope(_ path: String, _ body: [AML]) -> AML {
        packaged([0x10], nameString(path).bytes + joined(body))
    }

    /// `Device (path) { body }`.
    public static func device(_ path: String, _ body: [AML]) -> AML {
        packaged([0x5B, 0x82], nameString(path).bytes + joined(body))
    }

    /// `Method (path, args, Serialized/NotSerialized, syncLevel) { body }`: 0-7 arguments,
    /// sync level 0-15.
    public static func method(_ path: String, args: Int = 0, serialized: Bool = false, syncLevel: Int = 0,
                              _ body: [AML]) -> AML {
        precondition((0...7).contains(args), "methods take 0-7 arguments")
        precondition((0...15).contains(syncLevel), "sync levels are 0-15")
        let flags = UInt8(args) | (serialized ? 0x08 : 0) | UInt8(syncLevel) << 4
        return packaged([0x14], nameString(path).bytes + [flags] + joined(body))
    }

    /// The address space of an OperationRegion.
    public enum RegionSpace: UInt8, Sendable {
        case systemMemory = 0, systemIO = 1, pciConfig = 2, embeddedControl = 3, smbus = 4, systemCMOS = 5,
             pciBarTarget = 6
    }

    /// `OperationRegion (path, space, offset, length)`.
    public static func operationRegion(_ path: String, space: RegionSpace, offset: AML, length: AML) -> AML {
        AML(bytes: [0x5B, 0x80] + nameString(path).bytes + [space.rawValue] + offset.bytes + length.bytes)
    }

    /// The AccessType of a Field.
    public enum FieldAccess: UInt8, Sendable { case any = 0, byte = 1, word = 2, dword = 3, qword = 4, buffer = 5 }

    /// The UpdateRule of a Field.
    public enum FieldUpdate: UInt8, Sendable { case preserve = 0, writeAsOnes = 1, writeAsZeros = 2 }

    /// One entry of a Field list.
    public enum FieldUnit: Sendable, Equatable {
        /// `NAME, bits`: a NamedField (the name is one NameSeg).
        case named(String, bits: Int)
        /// `, bits` (what `Offset ()` compiles to): a ReservedField skipping `bits` bits.
        case reserved(bits: Int)
    }

    /// `Field (region, access, Lock/NoLock, update) { units }`.
    public static func field(_ region: String, access: FieldAccess, lock: Bool = false, update: FieldUpdate = .preserve,
                             _ units: [FieldUnit]) -> AML {
        let flags = access.rawValue | (lock ? 0x10 : 0) | update.rawValue << 5
        var list = [UInt8]()
        for unit in units {
            switch unit {
            case .named(let name, let bits): list += nameSeg(name) + fieldLength(bits)
            case .reserved(let bits): list += [0x00] + fieldLength(bits)
            }
        }
        return packaged([0x5B, 0x81], nameString(region).bytes + [flags] + list)
    }
}

// MARK: - Statements and expressions

extension AML {
    /// `If (predicate) { body }`.
    public static func ifThen(_ predicate: AML, _ body: [AML]) -> AML {
        packaged([0xA0], predicate.bytes + joined(body))
    }

    /// `Else { body }`, placed right after an `ifThen`.
    public static func elseDo(_ body: [AML]) -> AML { packaged([0xA1], joined(body)) }

    /// `While (predicate) { body }`.
    public static func whileDo(_ predicate: AML, _ body: [AML]) -> AML {
        packaged([0xA2], predicate.bytes + joined(body))
    }

    /// `Return (v)`.
    public static func returnValue(_ v: AML) -> AML { op(0xA4, v) }

    /// `Notify (target, value)`.
    public static func notify(_ target: AML, _ value: AML) -> AML { op(0x86, target, value) }

    /// `Store (value, target)`.
    public static func store(_ value: AML, _ target: AML) -> AML { op(0x70, value, target) }

    /// `Add (a, b, target)`.
    public static func add(_ a: AML, _ b: AML, _ target: AML = .nullName) -> AML { op(0x72, a, b, target) }

    /// `Subtract (a, b, target)`.
    public static func subtract(_ a: AML, _ b: AML, _ target: AML = .nullName) -> AML { op(0x74, a, b, target) }

    /// `And (a, b, target)`.
    public static func and(_ a: AML, _ b: AML, _ target: AML = .nullName) -> AML { op(0x7B, a, b, target) }

    /// `Or (a, b, target)`.
    public static func or(_ a: AML, _ b: AML, _ target: AML = .nullName) -> AML { op(0x7D, a, b, target) }

    /// `ShiftLeft (a, b, target)`.
    public static func shiftLeft(_ a: AML, _ b: AML, _ target: AML = .nullName) -> AML { op(0x79, a, b, target) }

    /// `ShiftRight (a, b, target)`.
    public static func shiftRight(_ a: AML, _ b: AML, _ target: AML = .nullName) -> AML { op(0x7A, a, b, target) }

    /// `LEqual (a, b)`.
    public static func lEqual(_ a: AML, _ b: AML) -> AML { op(0x93, a, b) }

    /// `LLess (a, b)`.
    public static func lLess(_ a: AML, _ b: AML) -> AML { op(0x95, a, b) }

    /// `LGreater (a, b)`.
    public static func lGreater(_ a: AML, _ b: AML) -> AML { op(0x94, a, b) }

    /// `LNot (a)`.
    public static func lNot(_ a: AML) -> AML { op(0x92, a) }

    /// `LAnd (a, b)`.
    public static func lAnd(_ a: AML, _ b: AML) -> AML { op(0x90, a, b) }

    /// `LOr (a, b)`.
    public static func lOr(_ a: AML, _ b: AML) -> AML { op(0x91, a, b) }

    /// `SizeOf (a)`.
    public static func sizeOf(_ a: AML) -> AML { op(0x87, a) }

    /// `Index (obj, i, target)`.
    public static func index(_ obj: AML, _ i: AML, _ target: AML = .nullName) -> AML { op(0x88, obj, i, target) }

    /// `DerefOf (a)`.
    public static func derefOf(_ a: AML) -> AML { op(0x83, a) }

    /// An opcode followed by its operands.
    private static func op(_ opcode: UInt8, _ operands: AML...) -> AML {
        AML(bytes: [opcode] + joined(operands))
    }
}

// MARK: - Package lengths

extension AML {
    /// The PkgLength in front of `content` bytes: the encoded total counts the 1-4 PkgLength bytes
    /// themselves. Totals above 2^28 - 1 cannot be encoded.
    public static func pkgLength(_ content: Int) -> [UInt8] {
        precondition(content >= 0 && content <= maxLength(encodedIn: 4) - 4, "AML package too large: \(content) bytes")
        let size = (1...4).first { content + $0 <= maxLength(encodedIn: $0) }!
        return encodeLength(content + size, size: size)
    }

    /// The bit length of a field unit: PkgLength's encoding, but of `bits` alone.
    private static func fieldLength(_ bits: Int) -> [UInt8] {
        precondition(bits >= 0 && bits <= maxLength(encodedIn: 4), "field units are 0 to 2^28 - 1 bits: \(bits)")
        return encodeLength(bits, size: (1...4).first { bits <= maxLength(encodedIn: $0) }!)
    }

    /// 6 bits in a lone lead byte; with 1-3 more bytes, 4 bits in the lead byte and 8 in each other.
    private static func maxLength(encodedIn size: Int) -> Int {
        size == 1 ? 0x3F : 1 << (4 + 8 * (size - 1)) - 1
    }

    /// Lead byte: bits 7-6 the count of following bytes, then the low bits; the rest little-endian.
    private static func encodeLength(_ value: Int, size: Int) -> [UInt8] {
        if size == 1 { return [UInt8(value)] }
        return [UInt8((size - 1) << 6 | value & 0x0F)]
            + (0..<size - 1).map { UInt8(truncatingIfNeeded: value >> (4 + 8 * $0)) }
    }

    /// `opcode PkgLength content`.
    private static func packaged(_ opcode: [UInt8], _ content: [UInt8]) -> AML {
        AML(bytes: opcode + pkgLength(content.count) + content)
    }
}
