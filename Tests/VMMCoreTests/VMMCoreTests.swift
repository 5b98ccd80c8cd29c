import Testing
import TestSupport
import VMMCore

@Suite("guest memory")
struct GuestMemoryTests {
    @Test("reads and writes inside regions; every out-of-bounds access throws")
    func bounds() throws {
        let mem = try GuestMemory(ranges: [(GuestAddress(0), 0x10000), (GuestAddress(0x100000), 0x1000)])
        #expect(mem.totalSize == 0x11000)
        try mem.write(UInt32(0xDEAD_BEEF), at: GuestAddress(0xFFFC))
        #expect(try mem.read(UInt32.self, at: GuestAddress(0xFFFC)) == 0xDEAD_BEEF)
        #expect(try mem.read(GuestAddress(0xFFFC), count: 4) == [0xEF, 0xBE, 0xAD, 0xDE])
        #expect(throws: GuestMemoryError(address: 0xFFFD, length: 4)) { try mem.read(UInt32.self, at: GuestAddress(0xFFFD)) }
        #expect(throws: GuestMemoryError(address: 0x10000, length: 1)) { try mem.read(GuestAddress(0x10000), count: 1) }
        #expect(throws: GuestMemoryError(address: 0x100FFF, length: 2)) { try mem.write([1, 2], at: GuestAddress(0x100FFF)) }
        #expect(throws: GuestMemoryError(address: UInt64.max, length: 8)) { try mem.read(UInt64.self, at: GuestAddress(UInt64.max)) }
        #expect(throws: GuestMemoryError(address: 0x100000, length: UInt64.max)) { try mem.hostPointer(GuestAddress(0x100000), length: UInt64.max) }
        #expect(mem.isRAM(GuestAddress(0x100000), length: 0x1000))
        #expect(!mem.isRAM(GuestAddress(0x100000), length: 0x1001))
        try mem.fill(GuestAddress(0x100000), count: 0x1000, with: 0xAB)
        #expect(try mem.read(UInt8.self, at: GuestAddress(0x100FFF)) == 0xAB)
    }

    @Test("overlapping ranges are refused")
    func overlap() {
        #expect(throws: (any Error).self) { try GuestMemory(ranges: [(GuestAddress(0), 0x2000), (GuestAddress(0x1000), 0x1000)]) }
    }

    @Test("GuestAddress addition reports overflow")
    func addressOverflow() {
        #expect(GuestAddress(UInt64.max).adding(1) == nil)
        #expect(GuestAddress(1).adding(1) == GuestAddress(2))
    }
}

@Suite("bus")
struct BusTests {
    final class Echo: BusDevice, @unchecked Sendable {
        var lastWrite: (UInt64, [UInt8])?
        func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
            for i in data.indices { data[i] = UInt8(truncatingIfNeeded: offset) &+ UInt8(i) }
        }
        func write(offset: UInt64, data: UnsafeRawBufferPointer) { lastWrite = (offset, Array(data)) }
    }

    @Test("dispatch by range with offsets; misses read as all-ones")
    func dispatch() throws {
        var h = BusHarness()
        let a = Echo(), b = Echo()
        try h.attach(a, name: "a", at: 0x100, size: 0x10)
        try h.attach(b, name: "b", at: 0x200, size: 0x10)
        #expect(h.read8(0x105) == 5)
        #expect(h.read(0x20E, size: 2) == 0x0F0E)
        #expect(h.readUnanswered(0x110, size: 4) == 0xFFFF_FFFF)
        h.write(0x201, size: 2, value: 0xBEEF)
        #expect(b.lastWrite?.0 == 1 && b.lastWrite?.1 == [0xEF, 0xBE])
        #expect(a.lastWrite == nil)
        #expect(h.bus.write(0x1000, data: UnsafeRawBufferPointer(start: nil, count: 0)) == false)
    }

    @Test("the harness fails a test that touches an address no device answers")
    func harnessRecordsUnansweredAccesses() throws {
        var h = BusHarness()
        let a = Echo()
        try h.attach(a, name: "a", at: 0x100, size: 0x10)
        withKnownIssue("a read nobody answers") { _ = h.read(0x110, size: 4) }
        withKnownIssue("a write nobody answers") { h.write8(0x0FF, 1) }
        #expect(a.lastWrite == nil)
        // Saying that nobody answers is itself checked.
        withKnownIssue("an expected miss that a device answers") { _ = h.readUnanswered(0x100, size: 1) }
        withKnownIssue("an expected dropped write that a device takes") { h.writeUnanswered(0x100, size: 1, value: 7) }
        h.writeUnanswered(0x300, size: 4, value: 7)
        #expect(h.readUnanswered(0x300, size: 2) == 0xFFFF)
    }

    @Test("overlapping or empty ranges are refused with their names")
    func overlap() throws {
        var bus = Bus()
        try bus.insert(Echo(), name: "first", base: 0x100, size: 0x10)
        #expect(throws: BusError.overlap(name: "second", base: 0x10F, size: 1, existing: "first")) {
            try bus.insert(Echo(), name: "second", base: 0x10F, size: 1)
        }
        #expect(throws: BusError.emptyRange(name: "empty")) { try bus.insert(Echo(), name: "empty", base: 0, size: 0) }
        try bus.insert(Echo(), name: "adjacent", base: 0x110, size: 1)
        #expect(bus.entries.map(\.name) == ["first", "adjacent"])
    }
}
