/// One field list per layout: a state type writes a single `code` function that both the writer and
/// the reader run.
///
///     mutating func code<C: LECoder>(_ c: inout C) throws(LEDecodeError) {
///         try c.u64(&rip, "vcpu.regs.rip")
///         try c.bool(&present, "vcpu.sregs.cs.present")
///         try c.array(&msrs, limit: maxMSRs, minimumItemSize: 12, "vcpu.msrs count", blank: MSREntry(index: 0, value: 0)) {
///             c, m, i throws(LEDecodeError) in
///             try c.u32(&m.index, "vcpu.msrs[\(i)].index")
///             try c.u64(&m.value, "vcpu.msrs[\(i)].value")
///         }
///     }
///
/// `LEEncodingCoder` appends each field's current value to an `LEWriter` (and never throws);
/// `LEDecodingCoder` reads each field from an `LEReader` into the variable, validating booleans,
/// counts and lengths exactly as `LEReader` does. The field name is an autoclosure: it is only built
/// when decoding fails, never on success and never when encoding.
///
/// Checks that only make sense on input (a value in range, a length this machine expects) go
/// through `require`, which the encoder skips: the encoder writes whatever state it is given, the
/// decoder refuses what the layout does not allow. Fields that appear in a later layout are coded
/// under `if version >= N` in the state's `code`.
public protocol LECoder {
    /// True for the reader: the variables are outputs; false for the writer: they are inputs.
    var isDecoding: Bool { get }

    /// A fixed-width integer, little-endian.
    mutating func integer<T: FixedWidthInteger>(_ v: inout T, _ field: @autoclosure () -> String) throws(LEDecodeError)
    /// A byte that must be 0 or 1.
    mutating func bool(_ v: inout Bool, _ field: @autoclosure () -> String) throws(LEDecodeError)
    /// Exactly `count` raw bytes, no length prefix (the writer writes `v` as it is).
    mutating func raw(_ v: inout [UInt8], count: Int, _ field: @autoclosure () -> String) throws(LEDecodeError)
    /// A u32 length (at most `limit` when decoding) followed by the bytes (`LEWriter.blob`).
    mutating func blob(_ v: inout [UInt8], limit: Int, _ field: @autoclosure () -> String) throws(LEDecodeError)
    /// A UTF-8 string as a blob (`LEWriter.string`).
    mutating func string(_ v: inout String, limit: Int, _ field: @autoclosure () -> String) throws(LEDecodeError)
    /// A u32 count of following items (`LEReader.count`: at most `limit`, and the rest of the input
    /// must hold `n × minimumItemSize` bytes).
    mutating func count(_ n: inout Int, limit: Int, minimumItemSize: Int, _ field: @autoclosure () -> String) throws(LEDecodeError)
    /// Decoding only: throws `.invalid(field:reason:)` unless `condition` holds. The encoder evaluates
    /// nothing.
    mutating func require(_ condition: @autoclosure () -> Bool, _ field: @autoclosure () -> String,
                          _ reason: @autoclosure () -> String) throws(LEDecodeError)
}

extension LECoder {
    @inlinable public mutating func u8(_ v: inout UInt8, _ field: @autoclosure () -> String) throws(LEDecodeError) { try integer(&v, field()) }
    @inlinable public mutating func u16(_ v: inout UInt16, _ field: @autoclosure () -> String) throws(LEDecodeError) { try integer(&v, field()) }
    @inlinable public mutating func u32(_ v: inout UInt32, _ field: @autoclosure () -> String) throws(LEDecodeError) { try integer(&v, field()) }
    @inlinable public mutating func u64(_ v: inout UInt64, _ field: @autoclosure () -> String) throws(LEDecodeError) { try integer(&v, field()) }
    @inlinable public mutating func i32(_ v: inout Int32, _ field: @autoclosure () -> String) throws(LEDecodeError) { try integer(&v, field()) }
    @inlinable public mutating func i64(_ v: inout Int64, _ field: @autoclosure () -> String) throws(LEDecodeError) { try integer(&v, field()) }

    /// `count` items coded by `element`, in order. The writer codes each of `items` (which must have
    /// `count` of them); the reader replaces `items` with `count` values, each starting as `blank()`.
    /// `element` gets the item's index for its field names.
    public mutating func elements<T>(
        _ items: inout [T], count: Int, blank: () -> T,
        _ element: (inout Self, inout T, Int) throws(LEDecodeError) -> Void
    ) throws(LEDecodeError) {
        if isDecoding {
            var decoded: [T] = []
            decoded.reserveCapacity(count)
            for i in 0..<count {
                var item = blank()
                try element(&self, &item, i)
                decoded.append(item)
            }
            items = decoded
        } else {
            // A copy of each item: writing never changes (and so never copies) the array.
            for i in 0..<count {
                var item = items[i]
                try element(&self, &item, i)
            }
        }
    }

    /// A u32 count (`count(_:limit:minimumItemSize:_:)`, named `countField`) then the items.
    public mutating func array<T>(
        _ items: inout [T], limit: Int, minimumItemSize: Int, _ countField: @autoclosure () -> String,
        blank: () -> T, _ element: (inout Self, inout T, Int) throws(LEDecodeError) -> Void
    ) throws(LEDecodeError) {
        var n = items.count
        try count(&n, limit: limit, minimumItemSize: minimumItemSize, countField())
        try elements(&items, count: n, blank: blank, element)
    }

    /// A u32 count that must be exactly `exactly` ("5 is not 4"), then the items.
    public mutating func array<T>(
        _ items: inout [T], exactly expected: Int, _ countField: @autoclosure () -> String,
        blank: () -> T, _ element: (inout Self, inout T, Int) throws(LEDecodeError) -> Void
    ) throws(LEDecodeError) {
        var n = UInt32(truncatingIfNeeded: items.count)
        try u32(&n, countField())
        try require(Int(n) == expected, countField(), "\(n) is not \(expected)")
        try elements(&items, count: Int(n), blank: blank, element)
    }
}

/// The writer side of `LECoder`: appends every field to `writer`. Never throws.
public struct LEEncodingCoder: LECoder {
    public var writer: LEWriter

    public init(_ writer: LEWriter = LEWriter()) { self.writer = writer }

    public var isDecoding: Bool { false }

    @inlinable public mutating func integer<T: FixedWidthInteger>(_ v: inout T, _ field: @autoclosure () -> String) { writer.integer(v) }
    public mutating func bool(_ v: inout Bool, _ field: @autoclosure () -> String) { writer.bool(v) }
    public mutating func raw(_ v: inout [UInt8], count: Int, _ field: @autoclosure () -> String) { writer.raw(v) }
    public mutating func blob(_ v: inout [UInt8], limit: Int, _ field: @autoclosure () -> String) { writer.blob(v) }
    public mutating func string(_ v: inout String, limit: Int, _ field: @autoclosure () -> String) { writer.string(v) }
    public mutating func count(_ n: inout Int, limit: Int, minimumItemSize: Int, _ field: @autoclosure () -> String) {
        writer.u32(UInt32(truncatingIfNeeded: n))
    }
    public mutating func require(_ condition: @autoclosure () -> Bool, _ field: @autoclosure () -> String,
                                 _ reason: @autoclosure () -> String) {}
}

/// The reader side of `LECoder`: reads every field from `reader`, validating as `LEReader` does.
public struct LEDecodingCoder: LECoder {
    public var reader: LEReader

    public init(_ reader: LEReader) { self.reader = reader }

    public var isDecoding: Bool { true }

    @inlinable
    public mutating func integer<T: FixedWidthInteger>(_ v: inout T, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        v = try reader.integer(field())
    }
    public mutating func bool(_ v: inout Bool, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        v = try reader.bool(field())
    }
    public mutating func raw(_ v: inout [UInt8], count: Int, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        v = try reader.raw(count, field())
    }
    public mutating func blob(_ v: inout [UInt8], limit: Int, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        v = try reader.blob(field(), limit: limit)
    }
    public mutating func string(_ v: inout String, limit: Int, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        v = try reader.string(field(), limit: limit)
    }
    public mutating func count(_ n: inout Int, limit: Int, minimumItemSize: Int, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        n = try reader.count(field(), limit: limit, minimumItemSize: minimumItemSize)
    }
    public mutating func require(_ condition: @autoclosure () -> Bool, _ field: @autoclosure () -> String,
                                 _ reason: @autoclosure () -> String) throws(LEDecodeError) {
        guard condition() else { throw .invalid(field: field(), reason: reason()) }
    }
}

/// A part of a larger state (a register set, a segment) with one `code` function: `field` prefixes the
/// names in its errors ("vcpu.regs" gives "vcpu.regs.rip"). `encode(to:)` and `init(from:field:)`
/// run it on its own (the golden-byte tests use them).
public protocol LECodedMember {
    init()
    mutating func code<C: LECoder>(_ c: inout C, field p: @autoclosure () -> String) throws(LEDecodeError)
}

extension LECodedMember {
    public func encode(to w: inout LEWriter) {
        var s = self
        w.encode { c throws(LEDecodeError) in try s.code(&c, field: "") }
    }

    public init(from r: inout LEReader, field p: String) throws(LEDecodeError) {
        var s = Self()
        try r.decode { c throws(LEDecodeError) in try s.code(&c, field: p) }
        self = s
    }
}

extension LEWriter {
    /// Runs a coding function as the writer, appending to these bytes.
    public mutating func encode(_ body: (inout LEEncodingCoder) throws(LEDecodeError) -> Void) {
        var coder = LEEncodingCoder(self)
        self = LEWriter() // the coder holds the only reference to the bytes while it appends
        do {
            try body(&coder)
        } catch {
            preconditionFailure("LEEncodingCoder does not throw, yet encoding threw \(error)")
        }
        self = coder.writer
    }
}

extension LEReader {
    /// Runs a coding function as the reader, from the current offset; on success the offset is after
    /// the last field it read.
    public mutating func decode<T>(_ body: (inout LEDecodingCoder) throws(LEDecodeError) -> T) throws(LEDecodeError) -> T {
        var coder = LEDecodingCoder(self)
        let value = try body(&coder)
        self = coder.reader
        return value
    }
}
