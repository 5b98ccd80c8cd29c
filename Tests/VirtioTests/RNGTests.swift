import Testing
import TestSupport
import VMMCore
import Virtio

@Suite("virtio-rng")
struct RNGTests {
    @Test("fills every writable buffer from the entropy source; used len is the bytes filled")
    func fills() throws {
        let entropy = PatternEntropy([0x10, 0x20, 0x30])
        let d = try rngDriver(entropy: entropy)
        let a = d.allocate(16), b = d.allocate(5)
        #expect(d.requestChecked([.writable(a, 16), .writable(b, 5)], allowed: [a..<(a + 16), b..<(b + 5)]) == [Used(id: 0, length: 21)])
        #expect(d.bytes(at: a, count: 16) == entropy.expected(16))
        #expect(d.bytes(at: b, count: 5) == entropy.expected(5))
        // Through an indirect table too.
        let c = d.allocate(64)
        #expect(d.request([.writable(c, 64)], indirect: true).map(\.length) == [64])
        #expect(d.bytes(at: c, count: 64) == entropy.expected(64))
    }

    @Test("readable buffers are ignored (and left alone); a chain without writable buffers gets len 0")
    func readableIgnored() throws {
        let d = try rngDriver()
        let r = d.put([1, 2, 3, 4])
        let w = d.allocate(8)
        #expect(d.requestChecked([.readable(r, 4), .writable(w, 8)], allowed: [w..<(w + 8)]).map(\.length) == [8])
        #expect(d.bytes(at: r, count: 4) == [1, 2, 3, 4])
        #expect(d.requestChecked([.readable(r, 4)], allowed: []).map(\.length) == [0])
    }

    @Test("at most 64 KiB per request: the rest of the buffers is left alone")
    func cap() throws {
        let entropy = PatternEntropy([7, 8, 9, 10, 11, 12, 13])
        let d = try rngDriver(entropy: entropy)
        let bufs = (0..<3).map { _ in d.allocate(40 << 10) }
        for b in bufs { try d.memory.fill(GuestAddress(b), count: 40 << 10, with: 0xEE) }
        let used = d.requestChecked(bufs.map { .writable($0, 40 << 10) }, allowed: [bufs[0]..<(bufs[0] + (40 << 10)), bufs[1]..<(bufs[1] + (24 << 10))])
        #expect(used.map(\.length) == [65536])
        #expect(d.bytes(at: bufs[0], count: 40 << 10) == entropy.expected(40 << 10))
        #expect(d.bytes(at: bufs[1], count: 24 << 10) == entropy.expected(24 << 10))
        #expect(d.bytes(at: bufs[1] + (24 << 10), count: 16 << 10) == [UInt8](repeating: 0xEE, count: 16 << 10))
        #expect(d.bytes(at: bufs[2], count: 40 << 10) == [UInt8](repeating: 0xEE, count: 40 << 10))
        // Exactly 64 KiB in one buffer.
        let big = d.allocate(64 << 10)
        #expect(d.request([.writable(big, 64 << 10)]).map(\.length) == [65536])
    }
}
