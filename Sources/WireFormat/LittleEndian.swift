/// Explicit little-endian encoding for everything SwiftVMM writes to disk (snapshots) or reads back.
///
/// Nothing is ever memcpy'ed from a host structure: each field is written with its width and byte
/// order spelled out, so the bytes do not depend on the compiler, the host's pointer size or padding.
/// Readers are bounded and throw, naming the field, instead of trapping on short or bad input.

/// `value`'s bytes, least significant first.
public func littleEndianBytes<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    (0..<MemoryLayout<T>.size).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
}

/// Appends little-endian fields to a byte array.
public struct LEWriter: Sendable {
    public private(set) var bytes: [UInt8]

    public init(capacity: Int = 0) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    public var count: Int { bytes.count }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { integer(v) }
    public mutating func u32(_ v: UInt32) { integer(v) }
    public mutating func u64(_ v: UInt64) { integer(v) }
    public mutating func i32(_ v: Int32) { integer(v) }
    public mutating func i64(_ v: Int64) { integer(v) }
    public mutating func bool(_ v: Bool) { bytes.append(v ? 1 : 0) }

    @inlinable
    public mutating func integer<T: FixedWidthInteger>(_ v: T) {
        // Inlinable, so callers in other modules get it specialized: unspecialized, every generic
        // shift was a witness-table call, and that was most of a device state's encoding.
        let size = MemoryLayout<T>.size
        if size <= 8 {
            appendLittleEndian(UInt64(truncatingIfNeeded: v), size: size)
        } else {
            raw(littleEndianBytes(v))
        }
    }

    /// The low `size` bytes of `x`, least significant first.
    @usableFromInline
    mutating func appendLittleEndian(_ x: UInt64, size: Int) {
        precondition(size >= 0 && size <= 8)
        withUnsafeBytes(of: x.littleEndian) { bytes.append(contentsOf: UnsafeRawBufferPointer(rebasing: $0.prefix(size))) }
    }

    /// Raw bytes, no length prefix (for fixed-size fields and formats defined elsewhere, such as
    /// the XSAVE area or the local APIC register page).
    public mutating func raw(_ b: some Sequence<UInt8>) { bytes.append(contentsOf: b) }

    /// A u32 length followed by the bytes.
    public mutating func blob(_ b: some Collection<UInt8>) {
        u32(UInt32(b.count))
        bytes.append(contentsOf: b)
    }

    /// A UTF-8 string as a blob.
    public mutating func string(_ s: String) { blob(Array(s.utf8)) }

    /// `s` as exactly `width` bytes: UTF-8, truncated, NUL-padded.
    public mutating func fixedString(_ s: String, width: Int) {
        let utf8 = Array(s.utf8.prefix(width))
        bytes.append(contentsOf: utf8)
        bytes.append(contentsOf: repeatElement(0, count: width - utf8.count))
    }

    /// Overwrites a u32 at `offset` (for lengths and checksums known only at the end).
    public mutating func patchU32(_ v: UInt32, at offset: Int) {
        precondition(offset >= 0 && offset + 4 <= bytes.count, "patch outside the written bytes")
        for i in 0..<4 { bytes[offset + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) }
    }
}

/// Why decoding stopped: the field is named so that a user sees which part of a file is bad.
public enum LEDecodeError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The input ended inside `field`.
    case truncated(field: String, needed: Int, available: Int)
    /// `field` holds a value this reader does not accept.
    case invalid(field: String, reason: String)
    /// Bytes were left over after the last field.
    case trailingBytes(count: Int)

    public var description: String {
        switch self {
        case .truncated(let field, let needed, let available):
            return "\(field): truncated (needs \(needed) bytes, \(available) left)"
        case .invalid(let field, let reason):
            return "\(field): \(reason)"
        case .trailingBytes(let count):
            return "\(count) unexpected bytes after the last field"
        }
    }
}

/// Reads little-endian fields from a byte buffer, never past its end.
///
/// Field names are autoclosures: a name such as `"vcpu.msrs[\(i)].value"` is only built when the
/// read fails.
public struct LEReader: Sendable {
    public let bytes: [UInt8]
    public private(set) var offset: Int

    public init(_ bytes: [UInt8]) {
        self.bytes = bytes
        offset = 0
    }

    public init(_ bytes: ArraySlice<UInt8>) { self.init(Array(bytes)) }

    public var remaining: Int { bytes.count - offset }
    public var isAtEnd: Bool { offset == bytes.count }

    public mutating func u8(_ field: @autoclosure () -> String) throws(LEDecodeError) -> UInt8 { try integer(field()) }
    public mutating func u16(_ field: @autoclosure () -> String) throws(LEDecodeError) -> UInt16 { try integer(field()) }
    public mutating func u32(_ field: @autoclosure () -> String) throws(LEDecodeError) -> UInt32 { try integer(field()) }
    public mutating func u64(_ field: @autoclosure () -> String) throws(LEDecodeError) -> UInt64 { try integer(field()) }
    public mutating func i32(_ field: @autoclosure () -> String) throws(LEDecodeError) -> Int32 { try integer(field()) }
    public mutating func i64(_ field: @autoclosure () -> String) throws(LEDecodeError) -> Int64 { try integer(field()) }

    /// A byte that must be 0 or 1.
    public mutating func bool(_ field: @autoclosure () -> String) throws(LEDecodeError) -> Bool {
        switch try u8(field()) {
        case 0: return false
        case 1: return true
        case let v: throw .invalid(field: field(), reason: "\(v) is not a boolean (0 or 1)")
        }
    }

    @inlinable
    public mutating func integer<T: FixedWidthInteger>(_ field: @autoclosure () -> String) throws(LEDecodeError) -> T {
        // Inlinable and concrete inside, as LEWriter.integer.
        let size = MemoryLayout<T>.size
        if size <= 8 { return T(truncatingIfNeeded: try takeLittleEndian(size, field())) }
        let b = try raw(size, field())
        var v = T.zero
        for i in 0..<size { v |= T(truncatingIfNeeded: b[i]) << (8 * i) }
        return v
    }

    /// The next `size` (at most 8) bytes as a little-endian number.
    @usableFromInline
    mutating func takeLittleEndian(_ size: Int, _ field: @autoclosure () -> String) throws(LEDecodeError) -> UInt64 {
        precondition(size >= 0 && size <= 8)
        try need(size, field())
        var x: UInt64 = 0
        withUnsafeMutableBytes(of: &x) { out in
            bytes.withUnsafeBytes { out.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[offset..<(offset + size)])) }
        }
        offset += size
        return UInt64(littleEndian: x)
    }

    /// Exactly `count` raw bytes.
    public mutating func raw(_ count: Int, _ field: @autoclosure () -> String) throws(LEDecodeError) -> [UInt8] {
        guard count >= 0 else { throw .invalid(field: field(), reason: "negative length") }
        try need(count, field())
        defer { offset += count }
        return Array(bytes[offset..<(offset + count)])
    }

    /// A u32 length (at most `limit`) followed by that many bytes.
    public mutating func blob(_ field: @autoclosure () -> String, limit: Int) throws(LEDecodeError) -> [UInt8] {
        let length = Int(try u32(field() + " length"))
        guard length <= limit else {
            throw .invalid(field: field(), reason: "length \(length) is over the limit of \(limit) bytes")
        }
        return try raw(length, field())
    }

    /// A blob that must be valid UTF-8.
    public mutating func string(_ field: @autoclosure () -> String, limit: Int) throws(LEDecodeError) -> String {
        let b = try blob(field(), limit: limit)
        guard let s = String(validating: b, as: UTF8.self) else { throw .invalid(field: field(), reason: "not valid UTF-8") }
        return s
    }

    /// A NUL-padded fixed-width UTF-8 string.
    public mutating func fixedString(_ width: Int, _ field: @autoclosure () -> String) throws(LEDecodeError) -> String {
        let b = try raw(width, field())
        let text = b.prefix { $0 != 0 }
        guard b.dropFirst(text.count).allSatisfy({ $0 == 0 }) else {
            throw .invalid(field: field(), reason: "bytes after the terminating NUL")
        }
        guard let s = String(validating: text, as: UTF8.self) else { throw .invalid(field: field(), reason: "not valid UTF-8") }
        return s
    }

    /// A count (u32) of following items, each at least `minimumItemSize` bytes, capped at `limit`:
    /// a corrupted count fails here instead of driving a huge allocation or loop.
    public mutating func count(_ field: @autoclosure () -> String, limit: Int, minimumItemSize: Int = 1) throws(LEDecodeError) -> Int {
        let n = Int(try u32(field()))
        guard n <= limit else { throw .invalid(field: field(), reason: "\(n) is over the limit of \(limit)") }
        guard n * max(minimumItemSize, 0) <= remaining else {
            throw .truncated(field: field(), needed: n * minimumItemSize, available: remaining)
        }
        return n
    }

    /// Skips `count` bytes.
    public mutating func skip(_ count: Int, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        guard count >= 0 else { throw .invalid(field: field(), reason: "negative length") }
        try need(count, field())
        offset += count
    }

    /// Throws if any bytes are left.
    public func finish() throws(LEDecodeError) {
        if remaining != 0 { throw .trailingBytes(count: remaining) }
    }

    private func need(_ n: Int, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        guard n <= remaining else { throw .truncated(field: field(), needed: n, available: remaining) }
    }
}
