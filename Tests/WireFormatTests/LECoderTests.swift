import Testing
import TestSupport
import WireFormat

/// A layout using every coder operation, with a field added in version 2.
struct Sample: Equatable {
    var a: UInt8 = 0, b: UInt16 = 0, c: UInt32 = 0, d: UInt64 = 0, e: Int32 = 0, f: Int64 = 0
    var flag = false
    var fixed: [UInt8] = [0, 0, 0]
    var blob: [UInt8] = []
    var name = ""
    var pairs: [(UInt32, Bool)] = []
    var four: [UInt16] = [0, 0, 0, 0]
    var added: UInt32 = 0

    static func == (l: Sample, r: Sample) -> Bool {
        l.a == r.a && l.b == r.b && l.c == r.c && l.d == r.d && l.e == r.e && l.f == r.f && l.flag == r.flag
            && l.fixed == r.fixed && l.blob == r.blob && l.name == r.name && l.four == r.four && l.added == r.added
            && l.pairs.map(\.0) == r.pairs.map(\.0) && l.pairs.map(\.1) == r.pairs.map(\.1)
    }

    mutating func code<C: LECoder>(_ co: inout C, version: UInt16, prefix p: @autoclosure () -> String) throws(LEDecodeError) {
        try co.u8(&a, p() + ".a")
        try co.u16(&b, p() + ".b")
        try co.u32(&c, p() + ".c")
        try co.require(c != 0xBAD, p() + ".c", "bad")
        try co.u64(&d, p() + ".d")
        try co.i32(&e, p() + ".e")
        try co.i64(&f, p() + ".f")
        try co.bool(&flag, p() + ".flag")
        try co.raw(&fixed, count: 3, p() + ".fixed")
        try co.blob(&blob, limit: 8, p() + ".blob")
        try co.string(&name, limit: 16, p() + ".name")
        try co.array(&pairs, limit: 4, minimumItemSize: 5, p() + ".pairs count", blank: { (0, false) }) {
            co, pair, i throws(LEDecodeError) in
            try co.u32(&pair.0, p() + ".pairs[\(i)].value")
            try co.bool(&pair.1, p() + ".pairs[\(i)].flag")
        }
        try co.array(&four, exactly: 4, p() + ".four count", blank: { 0 }) { co, v, i throws(LEDecodeError) in
            try co.u16(&v, p() + ".four[\(i)]")
        }
        if version >= 2 { try co.u32(&added, p() + ".added") }
    }

    static let full: Sample = {
        var s = Sample()
        s.a = 0xAB; s.b = 0x1234; s.c = 0xDEAD_BEEF; s.d = 0x0102_0304_0506_0708; s.e = -2; s.f = -3
        s.flag = true; s.fixed = [7, 8, 9]; s.blob = [1, 2]; s.name = "fw"
        s.pairs = [(5, true), (6, false)]; s.four = [1, 2, 3, 0xFFFF]; s.added = 42
        return s
    }()

    /// The same layout written by hand with `LEWriter`.
    static func handWritten(_ s: Sample, version: UInt16) -> [UInt8] {
        var w = LEWriter()
        w.u8(s.a); w.u16(s.b); w.u32(s.c); w.u64(s.d); w.i32(s.e); w.i64(s.f); w.bool(s.flag)
        w.raw(s.fixed); w.blob(s.blob); w.string(s.name)
        w.u32(UInt32(s.pairs.count))
        for (v, f) in s.pairs { w.u32(v); w.bool(f) }
        w.u32(UInt32(s.four.count))
        for v in s.four { w.u16(v) }
        if version >= 2 { w.u32(s.added) }
        return w.bytes
    }
}

@Suite struct LECoderTests {
    static func encode(_ s: Sample, version: UInt16, names: NameCounter = NameCounter()) -> [UInt8] {
        var copy = s
        var c = CountingCoder(inner: LEEncodingCoder(), names: names)
        try! copy.code(&c, version: version, prefix: "sample")
        return c.inner.writer.bytes
    }

    static func decode(_ bytes: [UInt8], version: UInt16, names: NameCounter = NameCounter()) throws(LEDecodeError) -> Sample {
        var s = Sample()
        var c = CountingCoder(inner: LEDecodingCoder(LEReader(bytes)), names: names)
        try s.code(&c, version: version, prefix: "sample")
        try c.inner.reader.finish()
        return s
    }

    @Test("one code function writes what LEWriter writes and reads it back, for each version")
    func roundTrip() throws {
        for version: UInt16 in [1, 2] {
            let bytes = Self.encode(Sample.full, version: version)
            #expect(bytes == Sample.handWritten(Sample.full, version: version))
            var expected = Sample.full
            if version < 2 { expected.added = 0 }
            let decoded = try Self.decode(bytes, version: version)
            #expect(decoded == expected)
            #expect(Self.encode(decoded, version: version) == bytes)
        }
    }

    @Test("LEWriter.encode and LEReader.decode run a code function at the current position")
    func writerAndReaderEntryPoints() throws {
        var w = LEWriter()
        w.u8(0x77)
        var s = Sample.full
        w.encode { c throws(LEDecodeError) in try s.code(&c, version: 2, prefix: "s") }
        w.u8(0x66)
        #expect(w.bytes == [0x77] + Sample.handWritten(Sample.full, version: 2) + [0x66])
        var r = LEReader(w.bytes)
        #expect(try r.u8("head") == 0x77)
        var d = Sample()
        try r.decode { c throws(LEDecodeError) in try d.code(&c, version: 2, prefix: "s") }
        #expect(d == Sample.full)
        #expect(try r.u8("tail") == 0x66)
        try r.finish()
    }

    @Test("no field name is built when encoding or when decoding succeeds")
    func namesAreLazy() throws {
        let names = NameCounter()
        let bytes = Self.encode(Sample.full, version: 2, names: names)
        _ = try Self.decode(bytes, version: 2, names: names)
        #expect(names.built == [])
    }

    @Test("a failure builds the failing field's name (once per use) and reports what LEReader reports")
    func failuresNameTheField() {
        let bytes = Self.encode(Sample.full, version: 2)
        let names = NameCounter()
        #expect(throws: LEDecodeError.truncated(field: "sample.four[3]", needed: 2, available: 1)) {
            // Cut inside the last u16 of `four` (`added` follows it).
            _ = try Self.decode(Array(bytes.prefix(bytes.count - 4 - 1)), version: 2, names: names)
        }
        #expect(names.built == ["sample.four[3]"])

        var bad = Sample.full
        bad.c = 0xBAD
        #expect(throws: LEDecodeError.invalid(field: "sample.c", reason: "bad")) {
            _ = try Self.decode(Self.encode(bad, version: 1), version: 1)
        }
        var flag = Self.encode(Sample.full, version: 1)
        flag[1 + 2 + 4 + 8 + 4 + 8] = 2
        #expect(throws: LEDecodeError.invalid(field: "sample.flag", reason: "2 is not a boolean (0 or 1)")) {
            _ = try Self.decode(flag, version: 1)
        }
        bad = Sample.full
        bad.pairs = Array(repeating: (1, true), count: 5)
        #expect(throws: LEDecodeError.invalid(field: "sample.pairs count", reason: "5 is over the limit of 4")) {
            _ = try Self.decode(Self.encode(bad, version: 1), version: 1)
        }
        bad = Sample.full
        bad.four.append(9)
        #expect(throws: LEDecodeError.invalid(field: "sample.four count", reason: "5 is not 4")) {
            _ = try Self.decode(Self.encode(bad, version: 1), version: 1)
        }
        bad = Sample.full
        bad.blob = Array(repeating: 1, count: 9)
        #expect(throws: LEDecodeError.invalid(field: "sample.blob", reason: "length 9 is over the limit of 8 bytes")) {
            _ = try Self.decode(Self.encode(bad, version: 1), version: 1)
        }
    }

    @Test("LEReader builds a field name only when a read fails")
    func readerNamesAreLazy() throws {
        let names = NameCounter()
        var r = LEReader([1, 0, 0, 0, 0, 5])
        #expect(try r.u32(names.note("a")) == 1)
        #expect(try r.bool(names.note("b")) == false)
        #expect(names.built == [])
        #expect(throws: LEDecodeError.invalid(field: "c", reason: "5 is not a boolean (0 or 1)")) { _ = try r.bool(names.note("c")) }
        #expect(names.built.contains("c"))
    }
}
