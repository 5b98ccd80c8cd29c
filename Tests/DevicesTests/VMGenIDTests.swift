import Devices
import Synchronization
import Testing
import VMMCore
import WireFormat

@Suite("VM generation ID")
struct VMGenIDTests {
    let memory = try! GuestMemory(ranges: [(GuestAddress(0), 1 << 20)])

    final class Counter: Sendable {
        let n = Mutex(0)
        func bump() { n.withLock { $0 += 1 } }
        var value: Int { n.withLock { $0 } }
    }

    @Test("GUID text ↔ guest bytes: the first three fields little-endian, as QEMU writes them")
    func guidByteOrder() throws {
        let g = try #require(VMGenID.parseGUID("12345678-9abc-def0-1234-56789abcdef0"))
        #expect(g == [0x78, 0x56, 0x34, 0x12, 0xBC, 0x9A, 0xF0, 0xDE, 0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC, 0xDE, 0xF0])
        #expect(VMGenID.guidString(g) == "12345678-9abc-def0-1234-56789abcdef0")
        #expect(VMGenID.parseGUID("12345678-9ABC-DEF0-1234-56789ABCDEF0") == g)
        for bad in ["", "12345678", "12345678-9abc-def0-1234-56789abcdef", "1234567g-9abc-def0-1234-56789abcdef0",
                    "123456789-abc-def0-1234-56789abcdef0", "12345678-9abc-def0-1234-56789abcdef0-"] {
            #expect(VMGenID.parseGUID(bad) == nil, "\(bad)")
        }
    }

    @Test("random GUIDs are version 4, RFC 4122 variant, and differ")
    func random() {
        let a = VMGenID.randomGUID(), b = VMGenID.randomGUID()
        #expect(a != b)
        let text = VMGenID.guidString(a)
        #expect(Array(text)[14] == "4")
        #expect("89ab".contains(Array(text)[19]))
    }

    @Test("a change before the guest reported the address is kept, written when it arrives, and not notified")
    func pendingChange() throws {
        let notified = Counter()
        let dev = VMGenID(guid: [UInt8](repeating: 1, count: 16), memory: memory) { notified.bump() }
        #expect(dev.setGUID([UInt8](repeating: 2, count: 16)) == false)
        #expect(notified.value == 0)
        #expect(dev.addressWritten([0x28, 0x10, 0, 0, 0, 0, 0, 0]))
        #expect(dev.address == 0x1028)
        #expect(try memory.read(GuestAddress(0x1028), count: 16) == [UInt8](repeating: 2, count: 16))
        #expect(notified.value == 0)
    }

    @Test("a change after the address is known updates guest memory, then notifies once")
    func change() throws {
        let notified = Counter()
        let dev = VMGenID(guid: [UInt8](repeating: 1, count: 16), memory: memory) { notified.bump() }
        dev.addressWritten([0x28, 0x20, 0, 0, 0, 0, 0, 0])
        #expect(try memory.read(GuestAddress(0x2028), count: 16) == [UInt8](repeating: 1, count: 16))
        #expect(dev.setGUID([UInt8](repeating: 3, count: 16)))
        #expect(try memory.read(GuestAddress(0x2028), count: 16) == [UInt8](repeating: 3, count: 16))
        #expect(notified.value == 1)
    }

    @Test("addresses outside guest RAM, zero or of the wrong size are refused")
    func badAddress() {
        let dev = VMGenID(guid: [UInt8](repeating: 1, count: 16), memory: memory) {}
        #expect(!dev.addressWritten([0, 0, 0, 0, 0, 0, 0, 0]))
        #expect(!dev.addressWritten([0xF8, 0xFF, 0x0F, 0, 0, 0, 0, 0]))          // crosses the end of RAM
        #expect(!dev.addressWritten([0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]))
        #expect(!dev.addressWritten([1, 2, 3]))
        #expect(dev.address == nil)
    }

    @Test("state round trip; restore validates")
    func state() throws {
        let dev = VMGenID(guid: [UInt8](repeating: 1, count: 16), memory: memory) {}
        dev.addressWritten([0x28, 0x30, 0, 0, 0, 0, 0, 0])
        let saved = dev.saveState()
        let other = VMGenID(guid: [UInt8](repeating: 9, count: 16), memory: memory) {}
        try other.restoreState(saved)
        #expect(other.saveState() == saved)
        #expect(throws: LEDecodeError.self) { try other.restoreState(.init(guid: [1], address: 0)) }
        #expect(throws: LEDecodeError.self) { try other.restoreState(.init(guid: saved.guid, address: 1 << 40)) }
    }
}
