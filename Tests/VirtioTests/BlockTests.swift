import Testing
import TestSupport
import VMMCore
import Virtio

/// virtio-blk requests through the mock driver, over an array store.
@Suite("virtio-blk")
struct BlockTests {
    @Test("read: sectors land in the writable buffers, status OK, used len = data + status")
    func read() throws {
        let store = MemoryBlockStore(size: 64 << 10)
        let d = try blockDriver(store)
        let req = d.blockRequest(type: Blk.typeIn, sector: 3, inLengths: [512, 1024])
        let allowed = req.inBuffers.map { $0.address..<($0.address + UInt64($0.length)) } + [req.status..<(req.status + 1)]
        #expect(d.requestChecked(req.buffers, allowed: allowed) == [Used(id: 0, length: 1537)])
        #expect(d.statusByte(req) == Blk.ok)
        let data = req.inBuffers.flatMap { d.bytes(at: $0.address, count: Int($0.length)) }
        #expect(data == Array(store.bytes[1536..<(1536 + 1536)]))
    }

    @Test("read: the data and the status byte in one writable buffer; the last sector of the drive")
    func readSharedStatusBuffer() throws {
        let store = MemoryBlockStore(size: 8 << 10)
        let d = try blockDriver(store)
        let header = d.put(Blk.header(type: Blk.typeIn, sector: 15))
        let buffer = d.allocate(513)
        #expect(d.request([.readable(header, 16), .writable(buffer, 513)]) == [Used(id: 0, length: 513)])
        #expect(d.bytes(at: buffer, count: 512) == Array(store.bytes[(15 * 512)...]))
        #expect(d.bytes(at: buffer + 512, count: 1) == [Blk.ok])
    }

    @Test("write: the data lands in the store, status OK, used len 1")
    func write() throws {
        let store = MemoryBlockStore(size: 64 << 10)
        let d = try blockDriver(store)
        let payload = (0..<1024).map { UInt8(truncatingIfNeeded: $0 &* 13 &+ 5) }
        let req = d.blockRequest(type: Blk.typeOut, sector: 10, out: [Array(payload[..<512]), Array(payload[512...])])
        var expected = store.bytes
        expected.replaceSubrange(5120..<6144, with: payload)
        #expect(d.request(req.buffers) == [Used(id: 0, length: 1)])
        #expect(d.statusByte(req) == Blk.ok)
        #expect(store.bytes == expected)
    }

    @Test("the header split across descriptors, and data sharing a descriptor with the header's tail")
    func splitHeader() throws {
        let store = MemoryBlockStore(size: 64 << 10)
        let d = try blockDriver(store)
        let payload = [UInt8](repeating: 0x77, count: 512)
        let bytes = Blk.header(type: Blk.typeOut, sector: 4) + payload
        let a = d.put(bytes)
        let status = d.put([Blk.unwritten])
        let buffers: [Buffer] = [.readable(a, 3), .readable(a + 3, 6), .readable(a + 9, 7 + 100), .readable(a + 116, 412), .writable(status, 1)]
        #expect(d.request(buffers) == [Used(id: 0, length: 1)])
        #expect(d.bytes(at: status, count: 1) == [Blk.ok])
        #expect(Array(store.bytes[2048..<2560]) == payload)
        // The same as an indirect chain, reading it back.
        let header = d.put(Blk.header(type: Blk.typeIn, sector: 4))
        let into = d.allocate(512)
        let s2 = d.put([Blk.unwritten])
        #expect(d.request([.readable(header, 8), .readable(header + 8, 8), .writable(into, 100), .writable(into + 100, 412), .writable(s2, 1)],
                          indirect: true).map(\.length) == [513])
        #expect(d.bytes(at: into, count: 512) == payload)
        #expect(d.bytes(at: s2, count: 1) == [Blk.ok])
    }

    @Test("flush calls the store's flush")
    func flush() throws {
        let store = MemoryBlockStore()
        let d = try blockDriver(store)
        let req = d.blockRequest(type: Blk.typeFlush, sector: 0)
        #expect(d.request(req.buffers) == [Used(id: 0, length: 1)])
        #expect(d.statusByte(req) == Blk.ok)
        #expect(store.flushCount == 1)
        _ = d.request(d.blockRequest(type: Blk.typeFlush, sector: 99).buffers)
        #expect(store.flushCount == 2)
    }

    @Test("get-id: 20 bytes NUL-padded; a shorter buffer gets the start; a long ID is cut at 20")
    func getID() throws {
        let d = try blockDriver(id: "disk-7")
        let req = d.blockRequest(type: Blk.typeGetID, sector: 0, inLengths: [20])
        #expect(d.request(req.buffers) == [Used(id: 0, length: 21)])
        #expect(d.statusByte(req) == Blk.ok)
        #expect(d.bytes(at: req.inBuffers[0].address, count: 20) == Array("disk-7".utf8) + [UInt8](repeating: 0, count: 14))
        let short = d.blockRequest(type: Blk.typeGetID, sector: 0, inLengths: [4])
        #expect(d.request(short.buffers).map(\.length) == [5])
        #expect(d.bytes(at: short.inBuffers[0].address, count: 4) == Array("disk".utf8))
        #expect(d.statusByte(short) == Blk.ok)
        let none = d.blockRequest(type: Blk.typeGetID, sector: 0)
        #expect(d.request(none.buffers).map(\.length) == [1])
        #expect(d.statusByte(none) == Blk.ok)
        // A buffer longer than 20 bytes: 20 written, the rest untouched.
        let long = d.blockRequest(type: Blk.typeGetID, sector: 0, inLengths: [32])
        #expect(d.request(long.buffers).map(\.length) == [21])
        #expect(d.bytes(at: long.inBuffers[0].address + 20, count: 12) == [UInt8](repeating: 0xDD, count: 12))

        let d2 = try blockDriver(id: "a-drive-id-longer-than-twenty-bytes")
        let req2 = d2.blockRequest(type: Blk.typeGetID, sector: 0, inLengths: [20])
        _ = d2.request(req2.buffers)
        #expect(d2.bytes(at: req2.inBuffers[0].address, count: 20) == Array("a-drive-id-longer-than-twenty-bytes".utf8.prefix(20)))
    }

    @Test("a read-only drive offers VIRTIO_BLK_F_RO, refuses writes with IOERR, reads and flushes")
    func readOnly() throws {
        let store = MemoryBlockStore(readOnly: true, canDiscard: true)
        let d = try blockDriver(store)
        #expect(d.deviceFeatureBits() & (1 << 5) != 0)
        #expect(d.deviceFeatureBits() & (1 << 13 | 1 << 14) == 0, "no discard or write-zeroes on a read-only drive")
        let original = store.bytes
        let w = d.blockRequest(type: Blk.typeOut, sector: 0, out: [[UInt8](repeating: 1, count: 512)])
        #expect(d.request(w.buffers) == [Used(id: 0, length: 1)])
        #expect(d.statusByte(w) == Blk.ioError)
        // Even if the driver did not accept VIRTIO_BLK_F_RO.
        #expect(d.initialize(features: d.deviceFeatureBits() & ~(1 << 5)))
        let w2 = d.blockRequest(type: Blk.typeOut, sector: 1, out: [[UInt8](repeating: 2, count: 512)])
        _ = d.request(w2.buffers)
        #expect(d.statusByte(w2) == Blk.ioError)
        #expect(store.bytes == original)
        let r = d.blockRequest(type: Blk.typeIn, sector: 0, inLengths: [512])
        _ = d.request(r.buffers)
        #expect(d.statusByte(r) == Blk.ok)
        let f = d.blockRequest(type: Blk.typeFlush, sector: 0)
        _ = d.request(f.buffers)
        #expect(d.statusByte(f) == Blk.ok)
        let z = d.blockRequest(type: Blk.typeWriteZeroes, sector: 0, out: [Blk.range(sector: 0, count: 1, flags: 0)])
        _ = d.request(z.buffers)
        #expect(d.statusByte(z) == Blk.unsupported)
        #expect(store.bytes == original)
        // A writable drive does not offer RO.
        #expect(try blockDriver().deviceFeatureBits() & (1 << 5) == 0)
    }

    static let badRanges: [(UInt32, UInt64, UInt32)] = [
        (Blk.typeIn, 128, 512),             // the first sector past the end (64 KiB drive)
        (Blk.typeIn, 127, 1024),            // runs past the end
        (Blk.typeIn, UInt64.max, 512),
        (Blk.typeIn, 1 << 55, 512),         // sector * 512 overflows
        (Blk.typeIn, 1 << 63, 512),
        (Blk.typeIn, 0, 100),               // not whole sectors
        (Blk.typeIn, 0, 513),
        (Blk.typeOut, 128, 512),
        (Blk.typeOut, 127, 1024),
        (Blk.typeOut, UInt64.max, 512),
        (Blk.typeOut, 1 << 55, 512),
        (Blk.typeOut, 0, 511),
    ]

    @Test("out-of-range, overflowing and partial-sector requests are IOERR and touch neither store nor data", arguments: badRanges)
    func badRange(type: UInt32, sector: UInt64, length: UInt32) throws {
        let store = MemoryBlockStore(size: 64 << 10)
        let d = try blockDriver(store)
        let original = store.bytes
        let req = type == Blk.typeIn
            ? d.blockRequest(type: type, sector: sector, inLengths: [length])
            : d.blockRequest(type: type, sector: sector, out: [[UInt8](repeating: 9, count: Int(length))])
        #expect(d.requestChecked(req.buffers, allowed: [req.status..<(req.status + 1)]) == [Used(id: 0, length: 1)])
        #expect(d.statusByte(req) == Blk.ioError)
        #expect(store.bytes == original)
        #expect(d.status & VirtioMMIO.needsReset == 0)
    }

    @Test("a read of 0 bytes at the capacity is fine; one sector there is not")
    func edgeOfDrive() throws {
        let store = MemoryBlockStore(size: 64 << 10)
        let d = try blockDriver(store)
        let empty = d.blockRequest(type: Blk.typeIn, sector: 128)
        _ = d.request(empty.buffers)
        #expect(d.statusByte(empty) == Blk.ok)
        let last = d.blockRequest(type: Blk.typeIn, sector: 127, inLengths: [512])
        _ = d.request(last.buffers)
        #expect(d.statusByte(last) == Blk.ok)
        // A drive whose size is not whole sectors: the partial tail is not readable.
        let odd = MemoryBlockStore(size: 1000)
        let d2 = try blockDriver(odd)
        #expect(d2.config(0, size: 8) == 1)
        let tail = d2.blockRequest(type: Blk.typeIn, sector: 1, inLengths: [512])
        _ = d2.request(tail.buffers)
        #expect(d2.statusByte(tail) == Blk.ioError)
    }

    @Test("no status byte (no writable buffer) or a short header: used len 0 and nothing written")
    func missingStatus() throws {
        let store = MemoryBlockStore()
        let d = try blockDriver(store)
        let original = store.bytes
        let header = d.put(Blk.header(type: Blk.typeOut, sector: 0))
        let data = d.put([UInt8](repeating: 3, count: 512))
        #expect(d.requestChecked([.readable(header, 16), .readable(data, 512)], allowed: []) == [Used(id: 0, length: 0)])
        #expect(d.requestChecked([.readable(header, 15), .writable(d.allocate(1), 1)], allowed: []).map(\.length) == [0])
        #expect(d.requestChecked([.readable(header, 8), .writable(header + 8, 8), .writable(d.allocate(1), 1)], allowed: []).map(\.length) == [0])
        #expect(d.requestChecked([], allowed: []).map(\.length) == [0])
        #expect(store.bytes == original)
        #expect(store.flushCount == 0)
        #expect(d.status & VirtioMMIO.needsReset == 0)
    }

    @Test("an unknown request type is UNSUPP", arguments: [2 as UInt32, 3, 5, 7, 9, 10, 12, 14, 0x8000_0000, UInt32.max])
    func unknownType(type: UInt32) throws {
        let d = try blockDriver(MemoryBlockStore(canDiscard: true))
        let req = d.blockRequest(type: type, sector: 0, inLengths: [512])
        #expect(d.request(req.buffers).map(\.length) == [1])
        #expect(d.statusByte(req) == Blk.unsupported)
        #expect(d.bytes(at: req.inBuffers[0].address, count: 512) == [UInt8](repeating: 0xDD, count: 512))
    }

    @Test("discard and write-zeroes: one range, UNSUPP without the feature, bad flags UNSUPP, bad ranges IOERR")
    func discardAndWriteZeroes() throws {
        let store = MemoryBlockStore(size: 64 << 10, canDiscard: true)
        let d = try blockDriver(store)
        #expect(d.deviceFeatureBits() & (1 << 13 | 1 << 14) == 1 << 13 | 1 << 14)
        func run(_ type: UInt32, _ ranges: [[UInt8]]) -> UInt8 {
            let req = d.blockRequest(type: type, sector: 0, out: ranges)
            #expect(d.request(req.buffers).map(\.length) == [1])
            return d.statusByte(req)
        }
        #expect(run(Blk.typeDiscard, [Blk.range(sector: 2, count: 3, flags: 0)]) == Blk.ok)
        #expect(store.discards == [1024..<2560])
        #expect(Array(store.bytes[1024..<2560]) == [UInt8](repeating: 0, count: 1536))
        #expect(store.bytes[2560] != 0 || store.bytes[2561] != 0)
        #expect(run(Blk.typeWriteZeroes, [Blk.range(sector: 10, count: 1, flags: 1)]) == Blk.ok)
        #expect(run(Blk.typeWriteZeroes, [Blk.range(sector: 20, count: 2, flags: 0)]) == Blk.ok)
        #expect(store.zeroed.map(\.range) == [5120..<5632, 10240..<11264])
        #expect(store.zeroed.map(\.unmap) == [true, false])
        // Flags: UNMAP on a discard, or any unknown flag, is UNSUPP (virtio 1.2, 5.2.6.2).
        #expect(run(Blk.typeDiscard, [Blk.range(sector: 0, count: 1, flags: 1)]) == Blk.unsupported)
        #expect(run(Blk.typeDiscard, [Blk.range(sector: 0, count: 1, flags: 2)]) == Blk.unsupported)
        #expect(run(Blk.typeWriteZeroes, [Blk.range(sector: 0, count: 1, flags: 3)]) == Blk.unsupported)
        #expect(run(Blk.typeWriteZeroes, [Blk.range(sector: 0, count: 1, flags: 0x8000_0000)]) == Blk.unsupported)
        // Ranges past the end, overflowing, too long, or more than one: IOERR.
        #expect(run(Blk.typeDiscard, [Blk.range(sector: 127, count: 2, flags: 0)]) == Blk.ioError)
        #expect(run(Blk.typeDiscard, [Blk.range(sector: UInt64.max, count: 1, flags: 0)]) == Blk.ioError)
        #expect(run(Blk.typeWriteZeroes, [Blk.range(sector: 1 << 55, count: 1, flags: 0)]) == Blk.ioError)
        #expect(run(Blk.typeWriteZeroes, [Blk.range(sector: 0, count: UInt32.max, flags: 0)]) == Blk.ioError)
        #expect(run(Blk.typeDiscard, [Blk.range(sector: 0, count: (1 << 22) + 1, flags: 0)]) == Blk.ioError)
        #expect(run(Blk.typeDiscard, [Blk.range(sector: 0, count: 1, flags: 0), Blk.range(sector: 4, count: 1, flags: 0)]) == Blk.ioError)
        #expect(run(Blk.typeDiscard, [Array(Blk.range(sector: 0, count: 1, flags: 0).prefix(12))]) == Blk.ioError)
        #expect(run(Blk.typeDiscard, []) == Blk.ioError)
        #expect(store.discards.count == 1 && store.zeroed.count == 2)
        // A range split across descriptors is fine.
        let r = Blk.range(sector: 30, count: 1, flags: 0)
        #expect(run(Blk.typeDiscard, [Array(r.prefix(5)), Array(r.dropFirst(5))]) == Blk.ok)
        #expect(store.discards.last == 15360..<15872)
        // Without the feature: UNSUPP.
        let plain = MemoryBlockStore(canDiscard: false)
        let d2 = try blockDriver(plain)
        for type in [Blk.typeDiscard, Blk.typeWriteZeroes] {
            let req = d2.blockRequest(type: type, sector: 0, out: [Blk.range(sector: 0, count: 1, flags: 0)])
            _ = d2.request(req.buffers)
            #expect(d2.statusByte(req) == Blk.unsupported)
        }
        #expect(plain.discards.isEmpty && plain.zeroed.isEmpty)
    }

    @Test("a store I/O failure is IOERR for read, write, flush, discard and write-zeroes")
    func ioFailure() throws {
        let store = MemoryBlockStore(canDiscard: true)
        let d = try blockDriver(store)
        store.failing = true
        let original = store.bytes
        let requests = [
            d.blockRequest(type: Blk.typeIn, sector: 0, inLengths: [512]),
            d.blockRequest(type: Blk.typeOut, sector: 0, out: [[UInt8](repeating: 1, count: 512)]),
            d.blockRequest(type: Blk.typeFlush, sector: 0),
            d.blockRequest(type: Blk.typeDiscard, sector: 0, out: [Blk.range(sector: 0, count: 1, flags: 0)]),
            d.blockRequest(type: Blk.typeWriteZeroes, sector: 0, out: [Blk.range(sector: 0, count: 1, flags: 0)]),
        ]
        for req in requests {
            #expect(d.request(req.buffers).map(\.length) == [1])
            #expect(d.statusByte(req) == Blk.ioError)
        }
        #expect(store.flushCount == 0)
        #expect(store.bytes == original)
        store.failing = false
        let ok = d.blockRequest(type: Blk.typeIn, sector: 0, inLengths: [512])
        #expect(d.request(ok.buffers).map(\.length) == [513])
        #expect(d.statusByte(ok) == Blk.ok)
    }

    @Test("the status byte is the last writable byte, wherever the driver's buffers end")
    func statusPlacement() throws {
        let store = MemoryBlockStore()
        let d = try blockDriver(store)
        let header = d.put(Blk.header(type: Blk.typeFlush, sector: 0))
        let w = d.allocate(8)
        try d.memory.fill(GuestAddress(w), count: 8, with: 0xDD)
        // A flush with 8 writable bytes: the status goes into the eighth.
        #expect(d.request([.readable(header, 16), .writable(w, 8)]).map(\.length) == [1])
        #expect(d.bytes(at: w, count: 8) == [UInt8](repeating: 0xDD, count: 7) + [Blk.ok])
    }
}
