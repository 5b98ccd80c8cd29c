import WireFormat

/// Counts the field names a coder builds (`CountingCoder` wraps each name it forwards in `note`): a
/// name the inner coder never evaluates is never counted.
public final class NameCounter: @unchecked Sendable {
    public init() {}
    public var built: [String] = []
    public func note(_ name: String) -> String {
        built.append(name)
        return name
    }
}

public struct CountingCoder<Inner: LECoder>: LECoder {
    public var inner: Inner
    public let names: NameCounter
    public var isDecoding: Bool { inner.isDecoding }

    public init(inner: Inner, names: NameCounter) {
        self.inner = inner
        self.names = names
    }

    public mutating func integer<T: FixedWidthInteger>(_ v: inout T, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        let n = names
        try inner.integer(&v, n.note(field()))
    }
    public mutating func bool(_ v: inout Bool, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        let n = names
        try inner.bool(&v, n.note(field()))
    }
    public mutating func raw(_ v: inout [UInt8], count: Int, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        let n = names
        try inner.raw(&v, count: count, n.note(field()))
    }
    public mutating func blob(_ v: inout [UInt8], limit: Int, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        let n = names
        try inner.blob(&v, limit: limit, n.note(field()))
    }
    public mutating func string(_ v: inout String, limit: Int, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        let n = names
        try inner.string(&v, limit: limit, n.note(field()))
    }
    public mutating func count(_ c: inout Int, limit: Int, minimumItemSize: Int, _ field: @autoclosure () -> String) throws(LEDecodeError) {
        let n = names
        try inner.count(&c, limit: limit, minimumItemSize: minimumItemSize, n.note(field()))
    }
    public mutating func require(_ condition: @autoclosure () -> Bool, _ field: @autoclosure () -> String,
                          _ reason: @autoclosure () -> String) throws(LEDecodeError) {
        let n = names
        try inner.require(condition(), n.note(field()), reason())
    }
}
