/// A system description table: the 36-byte ACPI header (signature, length, revision, checksum, OEM
/// fields) followed by the table body. Pure values; `bytes` has a correct length and checksum.
public struct SDT: Sendable, Equatable {
    public static let headerSize = 36
    public static let oemID: [UInt8] = Array("SWVMM ".utf8)          // 6 bytes
    public static let creatorID: [UInt8] = Array("SWFT".utf8)         // 4 bytes
    public static let creatorRevision: UInt32 = 1

    public var signature: String
    public var revision: UInt8
    /// 8 bytes, padded with spaces.
    public var oemTableID: String
    public var oemRevision: UInt32
    public var body: [UInt8]

    public init(signature: String, revision: UInt8, oemTableID: String, oemRevision: UInt32 = 1, body: [UInt8]) {
        precondition(signature.utf8.count == 4, "ACPI table signatures are 4 characters")
        precondition(oemTableID.utf8.count <= 8, "OEM table IDs are at most 8 characters")
        self.signature = signature
        self.revision = revision
        self.oemTableID = oemTableID
        self.oemRevision = oemRevision
        self.body = body
    }

    public var length: Int { SDT.headerSize + body.count }

    /// Header and body with the checksum byte set so that all bytes sum to 0 (mod 256).
    public var bytes: [UInt8] {
        var b = [UInt8]()
        b.reserveCapacity(length)
        b += Array(signature.utf8)
        b.appendLE(UInt32(length))
        b.append(revision)
        b.append(0) // checksum, below
        b += SDT.oemID
        b += Array(oemTableID.utf8) + [UInt8](repeating: 0x20, count: 8 - oemTableID.utf8.count)
        b.appendLE(oemRevision)
        b += SDT.creatorID
        b.appendLE(SDT.creatorRevision)
        b += body
        b[9] = ACPIChecksum.complement(b)
        return b
    }
}

public enum ACPIChecksum {
    /// The byte that makes `bytes` (with that byte counted as 0) sum to zero mod 256.
    public static func complement<C: Collection>(_ bytes: C) -> UInt8 where C.Element == UInt8 {
        0 &- sum(bytes)
    }

    public static func sum<C: Collection>(_ bytes: C) -> UInt8 where C.Element == UInt8 {
        bytes.reduce(0, &+)
    }
}

extension Array where Element == UInt8 {
    /// Appends `value` in little-endian byte order.

    mutating func appendLE<T: FixedWidthInteger>(_ value: T) {
        Swift.withUnsafeBytes(of: value.littleEndian) { append(contentsOf: $0) }
    }
}
