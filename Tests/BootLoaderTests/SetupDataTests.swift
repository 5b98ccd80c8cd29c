import BootLoader
import Testing
import TestSupport

private func le(_ b: [UInt8], _ o: Int, _ n: Int) -> UInt64 {
    (0..<n).reduce(0) { $0 | UInt64(b[o + $1]) << (8 * $1) }
}

@Suite("boot_params setup_data (SETUP_DTB)")
struct SetupDataTests {
    let dtb: [UInt8] = [0xD0, 0x0D, 0xFE, 0xED] + (0..<301).map { UInt8(truncatingIfNeeded: $0) }

    @Test("one device tree entry: next 0, type 2, len = the blob's length, the blob after the 16-byte header")
    func single() throws {
        let bytes = try SetupData.chain([SetupDataEntry(type: SetupDataEntry.deviceTree, payload: dtb)], at: 0x30000, limit: 0x9FC00)
        #expect(bytes.count == 16 + dtb.count)
        #expect(le(bytes, 0, 8) == 0)
        #expect(le(bytes, 8, 4) == 2)
        #expect(le(bytes, 12, 4) == UInt64(dtb.count))
        #expect(Array(bytes[16...]) == dtb)
        #expect(SetupData.parse(bytes, at: 0x30000) == [SetupDataEntry(type: 2, payload: dtb)])
    }

    @Test("entries are chained through next, each 8-byte aligned, and read back in order")
    func chained() throws {
        let entries = [SetupDataEntry(type: 9, payload: [1, 2, 3]), SetupDataEntry(type: SetupDataEntry.deviceTree, payload: dtb),
                       SetupDataEntry(type: 7, payload: [])]
        let bytes = try SetupData.chain(entries, at: 0x30000, limit: 0x9FC00)
        let second = le(bytes, 0, 8)
        #expect(second == 0x30000 + 24, "16 + 3 bytes, rounded up to 8")
        let third = le(bytes, Int(second - 0x30000), 8)
        #expect(third % 8 == 0 && third > second)
        #expect(le(bytes, Int(third - 0x30000), 8) == 0)
        #expect(SetupData.parse(bytes, at: 0x30000) == entries)
    }

    @Test("a list that would pass its limit is refused with the sizes")
    func tooLarge() {
        #expect(throws: BootError.setupDataTooLarge(size: 16 + 305, room: 300)) {
            try SetupData.chain([SetupDataEntry(type: 2, payload: dtb)], at: 0x1000, limit: 0x1000 + 300)
        }
        #expect((try? SetupData.chain([SetupDataEntry(type: 2, payload: dtb)], at: 0x1000, limit: 0x1000 + 321)) != nil, "exactly fits")
    }

    @Test("parse refuses a pointer outside the bytes, a length past the end and a loop")
    func parseBounded() throws {
        var bytes = try SetupData.chain([SetupDataEntry(type: 2, payload: [1, 2, 3, 4])], at: 0x1000, limit: 0x2000)
        var outside = bytes
        outside[0] = 0x40 // next = 0x40: below the list
        #expect(SetupData.parse(outside, at: 0x1000) == nil)
        var long = bytes
        long[12] = 5
        #expect(SetupData.parse(long, at: 0x1000) == nil)
        bytes[0] = 0x00; bytes[1] = 0x10 // next = 0x1000: itself
        #expect(SetupData.parse(bytes, at: 0x1000) == nil)
    }

    @Test("boot_params.hdr.setup_data (0x250) points at the list")
    func bootParams() {
        var p = BootParams(image: try! BzImage(syntheticBzImage()))
        #expect(le(p.bytes, 0x250, 8) == 0)
        p.setSetupData(address: 0x1_0003_0000)
        #expect(le(p.bytes, 0x250, 8) == 0x1_0003_0000)
    }
}
