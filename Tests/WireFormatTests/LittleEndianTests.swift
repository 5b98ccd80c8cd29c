import Testing
import WireFormat

@Suite struct LittleEndianTests {
    @Test func fieldsAreLittleEndianAndReadBack() throws {
        var w = LEWriter()
        w.u8(0xAB)
        w.u16(0x1234)
        w.u32(0xDEAD_BEEF)
        w.u64(0x0102_0304_0506_0708)
        w.i32(-2)
        w.bool(true)
        w.blob([9, 8, 7])
        w.fixedString("swiftvmm", width: 12)
        #expect(w.bytes == [0xAB, 0x34, 0x12, 0xEF, 0xBE, 0xAD, 0xDE, 8, 7, 6, 5, 4, 3, 2, 1, 0xFE, 0xFF, 0xFF, 0xFF, 1,
                            3, 0, 0, 0, 9, 8, 7] + Array("swiftvmm".utf8) + [0, 0, 0, 0])
        var r = LEReader(w.bytes)
        #expect(try r.u8("a") == 0xAB)
        #expect(try r.u16("b") == 0x1234)
        #expect(try r.u32("c") == 0xDEAD_BEEF)
        #expect(try r.u64("d") == 0x0102_0304_0506_0708)
        #expect(try r.i32("e") == -2)
        #expect(try r.bool("f") == true)
        #expect(try r.blob("g", limit: 3) == [9, 8, 7])
        #expect(try r.fixedString(12, "h") == "swiftvmm")
        try r.finish()
    }

    @Test func shortInputNamesTheField() {
        var r = LEReader([1, 2, 3])
        #expect(throws: LEDecodeError.truncated(field: "rip", needed: 8, available: 3)) { _ = try r.u64("rip") }
        #expect(r.offset == 0)
    }

    @Test func limitsAndBadValuesAreRejected() {
        var r = LEReader([0xFF, 0xFF, 0xFF, 0x7F])
        #expect(throws: LEDecodeError.invalid(field: "payload", reason: "length 2147483647 is over the limit of 16 bytes")) {
            _ = try r.blob("payload", limit: 16)
        }
        var counts = LEReader([200, 0, 0, 0, 1, 2])
        #expect(throws: LEDecodeError.truncated(field: "entries", needed: 1600, available: 2)) {
            _ = try counts.count("entries", limit: 1000, minimumItemSize: 8)
        }
        var b = LEReader([2])
        #expect(throws: LEDecodeError.invalid(field: "flag", reason: "2 is not a boolean (0 or 1)")) { _ = try b.bool("flag") }
        var s = LEReader([0x61, 0, 0x62, 0])
        #expect(throws: LEDecodeError.invalid(field: "name", reason: "bytes after the terminating NUL")) { _ = try s.fixedString(4, "name") }
        var t = LEReader([1, 2])
        _ = try? t.u8("x")
        #expect(throws: LEDecodeError.trailingBytes(count: 1)) { try t.finish() }
    }

    @Test func patchWritesInPlace() {
        var w = LEWriter()
        w.u32(0)
        w.u8(5)
        w.patchU32(0x0403_0201, at: 0)
        #expect(w.bytes == [1, 2, 3, 4, 5])
    }
}
