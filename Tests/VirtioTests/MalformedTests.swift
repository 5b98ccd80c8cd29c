import Synchronization
import Testing
import TestSupport
import VMMCore
import Virtio

/// A driver breaking the split-ring rules one way.
struct Hostile: Sendable, CustomStringConvertible {
    let description: String
    /// Lays out the broken chain or ring index and publishes it (queue of 8; RAM is two adjacent
    /// 1 MiB regions at 0).
    let setUp: @Sendable (VirtioDriver) -> Void

    init(_ description: String, _ setUp: @escaping @Sendable (VirtioDriver) -> Void) {
        self.description = description
        self.setUp = setUp
    }

    static let next = VirtioDriver.descNext, write = VirtioDriver.descWrite, indirect = VirtioDriver.descIndirect

    /// One descriptor (0) holding `address`/`length`, published.
    static func buffer(_ name: String, _ address: UInt64, _ length: UInt32, flags: UInt16 = write) -> Hostile {
        Hostile(name) { d in
            d.writeDescriptor(0, address: address, length: length, flags: flags, next: 0)
            d.publish(head: 0)
        }
    }

    /// Descriptor 0 names an indirect table at `table` of `length` bytes (the table's contents from
    /// `fill`, given the table's address), published.
    static func indirectTable(_ name: String, length: UInt32, at table: (@Sendable (VirtioDriver) -> UInt64)? = nil,
                              fill: @escaping @Sendable (VirtioDriver, UInt64) -> Void = { _, _ in }) -> Hostile {
        Hostile(name) { d in
            let address = table?(d) ?? d.allocate(UInt64(max(length, 16)) + 16)
            fill(d, address)
            d.writeDescriptor(0, address: address, length: length, flags: indirect, next: 0)
            d.publish(head: 0)
        }
    }

    static let all: [Hostile] = [
        Hostile("a descriptor that links to itself") { d in
            d.writeDescriptor(0, address: d.allocate(4), length: 4, flags: next | write, next: 0)
            d.publish(head: 0)
        },
        Hostile("a two-descriptor cycle") { d in
            let b = d.allocate(8)
            d.writeDescriptor(0, address: b, length: 4, flags: next, next: 1)
            d.writeDescriptor(1, address: b + 4, length: 4, flags: next, next: 0)
            d.publish(head: 0)
        },
        Hostile("a cycle through the whole table: a chain longer than the queue") { d in
            let b = d.allocate(8)
            for i in 0..<8 as Range<UInt16> { d.writeDescriptor(i, address: b + UInt64(i), length: 1, flags: next | write, next: (i + 1) % 8) }
            d.publish(head: 3)
        },
        Hostile("a loop in the writable part after a readable buffer") { d in
            let b = d.allocate(8)
            d.writeDescriptor(4, address: b, length: 4, flags: next, next: 5)
            d.writeDescriptor(5, address: b + 4, length: 2, flags: next | write, next: 6)
            d.writeDescriptor(6, address: b + 6, length: 2, flags: next | write, next: 5)
            d.publish(head: 4)
        },
        Hostile("a head equal to the queue size") { d in
            d.writeDescriptor(0, address: d.allocate(4), length: 4, flags: write, next: 0)
            d.publish(head: 8)
        },
        Hostile("a head of 0xFFFF") { d in d.publish(head: 0xFFFF) },
        Hostile("a next equal to the queue size") { d in
            d.writeDescriptor(0, address: d.allocate(4), length: 4, flags: next | write, next: 8)
            d.publish(head: 0)
        },
        Hostile("a next of 0xFFFF") { d in
            d.writeDescriptor(2, address: d.allocate(4), length: 4, flags: next, next: 0xFFFF)
            d.publish(head: 2)
        },
        indirectTable("an empty indirect table", length: 0),
        indirectTable("a misaligned indirect table", length: 32, at: { d in d.allocate(64) + 8 }, fill: { d, t in
            d.writeDescriptor(table: t, 0, address: d.allocate(4), length: 4, flags: write, next: 0)
        }),
        indirectTable("an indirect table that is not whole descriptors", length: 24, fill: { d, t in
            d.writeDescriptor(table: t, 0, address: d.allocate(4), length: 4, flags: write, next: 0)
        }),
        indirectTable("an indirect table longer than the queue", length: 16 * 9, fill: { d, t in
            let b = d.allocate(9)
            for i in 0..<9 as Range<UInt16> { d.writeDescriptor(table: t, i, address: b + UInt64(i), length: 1, flags: write | (i < 8 ? next : 0), next: i + 1) }
        }),
        indirectTable("an indirect table naming another indirect table", length: 32, fill: { d, t in
            let inner = d.allocate(32)
            d.writeDescriptor(table: inner, 0, address: d.allocate(4), length: 4, flags: write, next: 0)
            d.writeDescriptor(table: t, 0, address: inner, length: 16, flags: indirect, next: 0)
        }),
        Hostile("a descriptor with both INDIRECT and NEXT") { d in
            let t = d.allocate(16)
            d.writeDescriptor(table: t, 0, address: d.allocate(4), length: 4, flags: write, next: 0)
            d.writeDescriptor(0, address: t, length: 16, flags: indirect | next, next: 1)
            d.writeDescriptor(1, address: d.allocate(4), length: 4, flags: write, next: 0)
            d.publish(head: 0)
        },
        indirectTable("an indirect table outside RAM", length: 32, at: { _ in 3 * mib }),
        indirectTable("an indirect table across the end of RAM", length: 32, at: { _ in 2 * mib - 16 }),
        indirectTable("an indirect table across two RAM regions", length: 32, at: { _ in mib - 16 }),
        indirectTable("an indirect table whose address and length wrap past 2^64", length: 32, at: { _ in 0xFFFF_FFFF_FFFF_FFF0 }),
        indirectTable("a loop inside an indirect table", length: 32, fill: { d, t in
            let b = d.allocate(8)
            d.writeDescriptor(table: t, 0, address: b, length: 4, flags: write | next, next: 1)
            d.writeDescriptor(table: t, 1, address: b + 4, length: 4, flags: write | next, next: 0)
        }),
        indirectTable("a next outside its indirect table", length: 32, fill: { d, t in
            let b = d.allocate(8)
            d.writeDescriptor(table: t, 0, address: b, length: 4, flags: write | next, next: 2)
        }),
        indirectTable("a buffer in an indirect table that wraps past 2^64", length: 16, fill: { d, t in
            d.writeDescriptor(table: t, 0, address: UInt64.max - 3, length: 8, flags: write, next: 0)
        }),
        buffer("a buffer outside RAM", 3 * mib, 16),
        buffer("a zero-length buffer outside RAM", 3 * mib, 0),
        buffer("a buffer across the end of RAM", 2 * mib - 8, 16),
        buffer("a buffer across two RAM regions", mib - 8, 16),
        buffer("a buffer whose address and length wrap past 2^64", 0xFFFF_FFFF_FFFF_FFF0, 0x20),
        buffer("a readable buffer at the top of the address space", UInt64.max, 1, flags: 0),
        buffer("a buffer of 4 GiB - 1", 0, 0xFFFF_FFFF),
        Hostile("a readable buffer after a writable one") { d in
            let b = d.allocate(8)
            d.writeDescriptor(0, address: b, length: 4, flags: write | next, next: 1)
            d.writeDescriptor(1, address: b + 4, length: 4, flags: 0, next: 0)
            d.publish(head: 0)
        },
        Hostile("a readable buffer in an indirect table after a direct writable one") { d in
            let b = d.allocate(8), t = d.allocate(16)
            d.writeDescriptor(table: t, 0, address: b + 4, length: 4, flags: 0, next: 0)
            d.writeDescriptor(0, address: b, length: 4, flags: write | next, next: 1)
            d.writeDescriptor(1, address: t, length: 16, flags: indirect, next: 0)
            d.publish(head: 0)
        },
        Hostile("avail.idx a queue and one ahead of the device") { d in
            d.writeDescriptor(0, address: d.allocate(4), length: 4, flags: write, next: 0)
            for slot in 0..<8 as Range<UInt16> { d.setAvailEntry(slot, head: 0) }
            d.setAvailIndex(d.device.saveState().queues[0].nextAvail &+ 9)
        },
        Hostile("avail.idx behind the device (0xFFFF ahead)") { d in
            d.setAvailIndex(d.device.saveState().queues[0].nextAvail &- 1)
        },
    ]
}

/// Every malformed chain, ring index and ring set-up the issue lists: the device sets
/// DEVICE_NEEDS_RESET with a config-change interrupt (or fails the request), never traps, never
/// writes guest RAM, and works again after the driver resets it.
@Suite("malformed virtqueues")
struct MalformedTests {
    static let models = ["echo", "blk", "rng"]

    static func driver(_ kind: String) throws -> VirtioDriver {
        let model: any VirtioDeviceModel = switch kind {
        case "blk": VirtioBlock(store: MemoryBlockStore(), id: "hostile")
        case "rng": VirtioRNG(source: PatternEntropy())
        default: EchoModel(queueSizes: [8])
        }
        let d = try VirtioDriver.make(model, ranges: [(0, mib), (mib, mib)])
        #expect(d.initialize(queueSizes: [8]))
        return d
    }

    /// A request each model answers with a used entry (a blk read of one sector).
    static func good(_ d: VirtioDriver) -> [Buffer] {
        d.blockRequest(type: Blk.typeIn, sector: 1, inLengths: [512]).buffers
    }

    @Test("a broken chain or avail index: DEVICE_NEEDS_RESET, nothing written, and a reset recovers",
          arguments: Hostile.all, models)
    func hostileChain(_ hostile: Hostile, kind: String) throws {
        let d = try Self.driver(kind)
        let r = d.recorder!
        // One good request first, so that the device's indexes are not at 0.
        #expect(d.request(Self.good(d)).count == 1)
        d.acknowledgeInterrupt()
        let interrupts = r.interrupts
        let usedIndex = d.usedIndex()
        hostile.setUp(d)
        let before = d.ramImage()
        d.process()
        #expect(d.status & VirtioMMIO.needsReset != 0)
        #expect(d.interruptStatus == 2)
        #expect(r.interrupts == interrupts + 1)
        #expect(r.logs.contains { $0.contains("needs a reset") })
        #expect(d.usedIndex() == usedIndex)
        #expect(d.changedAddresses(before, d.ramImage()).isEmpty)
        #expect(!d.device.isRunning)
        // Kicks do nothing more until the driver resets the device (and the interrupt is not repeated).
        d.acknowledgeInterrupt()
        let after = d.ramImage()
        d.process()
        #expect(d.changedAddresses(after, d.ramImage()).isEmpty)
        #expect(r.interrupts == interrupts + 1)
        #expect(d.interruptStatus == 0)
        // The driver may still add FAILED, and then it resets; the device works again.
        d.addStatus(VirtioMMIO.failed)
        #expect(d.status & (VirtioMMIO.needsReset | VirtioMMIO.failed) == VirtioMMIO.needsReset | VirtioMMIO.failed)
        #expect(d.initialize(queueSizes: [8]))
        #expect(d.status == 0xF)
        let again = d.blockRequest(type: Blk.typeIn, sector: 0, inLengths: [512])
        #expect(d.request(again.buffers).count == 1)
    }

    struct BadRings: Sendable, CustomStringConvertible {
        let description: String
        let size: UInt16
        let adjust: @Sendable (VirtioDriver.RingLayout) -> VirtioDriver.RingLayout
        init(_ description: String, size: UInt16 = 8, _ adjust: @escaping @Sendable (VirtioDriver.RingLayout) -> VirtioDriver.RingLayout = { $0 }) {
            self.description = description
            self.size = size
            self.adjust = adjust
        }
    }

    static let badRings: [BadRings] = [
        BadRings("a descriptor table 8-byte aligned") { var l = $0; l.descriptorTable += 8; return l },
        BadRings("an odd driver area") { var l = $0; l.availRing += 1; return l },
        BadRings("a device area 2-byte aligned") { var l = $0; l.usedRing += 2; return l },
        BadRings("a descriptor table outside RAM") { var l = $0; l.descriptorTable = 3 * mib; return l },
        BadRings("a driver area outside RAM") { var l = $0; l.availRing = 3 * mib; return l },
        BadRings("a device area outside RAM") { var l = $0; l.usedRing = 3 * mib; return l },
        BadRings("a descriptor table across the end of RAM") { var l = $0; l.descriptorTable = 2 * mib - 64; return l },
        BadRings("a device area across two RAM regions") { var l = $0; l.usedRing = mib - 32; return l },
        BadRings("a driver area ending past RAM") { var l = $0; l.availRing = 2 * mib - 20; return l },
        BadRings("a descriptor table above 4 GiB") { var l = $0; l.descriptorTable += 1 << 32; return l },
        BadRings("a descriptor table whose end wraps past 2^64") { var l = $0; l.descriptorTable = 0xFFFF_FFFF_FFFF_FFC0; return l },
        BadRings("a device area whose end wraps past 2^64") { var l = $0; l.usedRing = 0xFFFF_FFFF_FFFF_FFFC; return l },
        BadRings("a queue size of 0", size: 0),
        BadRings("a queue size of 3 (not a power of two)", size: 3),
        BadRings("a queue size of 6 (not a power of two)", size: 6),
    ]

    @Test("rings misaligned or outside RAM, or a bad size, at QueueReady: refused, DEVICE_NEEDS_RESET", arguments: badRings)
    func badRingsRefused(_ bad: BadRings) throws {
        let d = try VirtioDriver.make(EchoModel(queueSizes: [8]), ranges: [(0, mib), (mib, mib)])
        let r = d.recorder!
        d.reset()
        d.addStatus(VirtioMMIO.acknowledge | VirtioMMIO.driver)
        #expect(d.negotiate(d.deviceFeatureBits()))
        let layout = bad.adjust(d.allocateRings(size: 8))
        let before = d.ramImage()
        #expect(!d.setUpQueue(0, size: bad.size, layout: layout))
        #expect(!d.queueReady(0))
        #expect(d.status & VirtioMMIO.needsReset != 0)
        #expect(d.interruptStatus == 2)
        #expect(r.interrupts == 1)
        #expect(r.logs.contains { $0.contains("needs a reset") })
        // DRIVER_OK is taken, but the device does not run; a kick serves nothing.
        d.addStatus(VirtioMMIO.driverOK)
        #expect(!d.device.isRunning)
        #expect(!d.device.serve(queue: 0))
        #expect(d.changedAddresses(before, d.ramImage()).isEmpty)
        // A reset and a proper set-up work.
        #expect(d.initialize())
        #expect(d.request([.writable(d.allocate(1), 1)]).count == 1)
    }

    @Test("a broken chain after good ones in the same kick: the good ones are used, then the device stops")
    func brokenAfterGood() throws {
        let (d, model) = try echoDriver()
        let outs = (0..<2).map { _ in d.allocate(1) }
        for out in outs { d.add([.readable(d.put([0x42]), 1), .writable(out, 1)]) }
        d.writeDescriptor(7, address: d.allocate(4), length: 4, flags: VirtioDriver.descNext, next: 7)
        d.publish(head: 7)
        d.add([.writable(d.allocate(1), 1)])
        d.process()
        #expect(d.collectUsed() == [Used(id: 0, length: 1), Used(id: 2, length: 1)])
        #expect(d.status & VirtioMMIO.needsReset != 0)
        #expect(d.interruptStatus == 3)
        #expect(model.served.count == 2)
        #expect(d.recorder!.interrupts == 2)
    }

    @Test("a chain the model cannot answer (no status byte) is used with len 0 and writes nothing")
    func unanswerable() throws {
        let d = try blockDriver()
        let header = d.put(Blk.header(type: Blk.typeIn, sector: 0))
        #expect(d.requestChecked([.readable(header, 16)], allowed: []) == [Used(id: 0, length: 0)])
        #expect(d.status & VirtioMMIO.needsReset == 0)
    }

    @Test("a reset while a chain is being served: the chain is not published and nothing more is written")
    func resetWhileServing() throws {
        let store = MemoryBlockStore()
        let d = try blockDriver(store, queueSize: 8)
        let device = d.device
        store.onIO = { _ in
            let zero = [UInt8](repeating: 0, count: 4)
            zero.withUnsafeBytes { device.write(offset: 0x070, data: $0) }
        }
        let req = d.blockRequest(type: Blk.typeIn, sector: 2, inLengths: [512])
        d.add(req.buffers)
        let before = d.ramImage()
        d.process()
        #expect(d.usedIndex() == 0)
        #expect(d.status == 0)
        #expect(d.interruptStatus == 0)
        #expect(!d.queueReady(0))
        #expect(d.recorder!.interrupts == 0)
        // Only the chain's own writable buffers may have been written (the model was mid-request).
        d.expectOnlyChanged(since: before, allowed: [req.inBuffers[0].address..<(req.inBuffers[0].address + 512), req.status..<(req.status + 1)])
        #expect(d.device.saveState().queues[0].nextAvail == 0)
        store.onIO = nil
        #expect(d.initialize(queueSizes: [8]))
        let again = d.blockRequest(type: Blk.typeIn, sector: 2, inLengths: [512])
        #expect(d.request(again.buffers) == [Used(id: 0, length: 513)])
        #expect(d.bytes(at: again.inBuffers[0].address, count: 512) == Array(store.bytes[1024..<1536]))
    }

    @Test("a reset while the second of two chains is served: the first is used, the second is not")
    func resetWhileServingSecond() throws {
        let store = MemoryBlockStore()
        let d = try blockDriver(store, queueSize: 8)
        let device = d.device
        let reads = Counter()
        store.onIO = { _ in
            guard reads.next() == 2 else { return }
            let zero = [UInt8](repeating: 0, count: 4)
            zero.withUnsafeBytes { device.write(offset: 0x070, data: $0) }
        }
        d.add(d.blockRequest(type: Blk.typeIn, sector: 0, inLengths: [512]).buffers)
        d.add(d.blockRequest(type: Blk.typeIn, sector: 1, inLengths: [512]).buffers)
        d.process()
        #expect(d.usedIndex() == 1)
        #expect(d.usedEntry(0) == Used(id: 0, length: 513))
        #expect(d.status == 0)
        #expect(d.device.saveState().queues[0] == VirtQueue(maxSize: 256))
    }

    @Test("a queue stopped while a chain is being served: the chain is not published")
    func stopWhileServing() throws {
        let store = MemoryBlockStore()
        let d = try blockDriver(store, queueSize: 8)
        let device = d.device
        store.onIO = { _ in
            for (offset, value) in [(UInt64(0x030), UInt32(0)), (0x044, 0)] {
                littleEndian(value).withUnsafeBytes { device.write(offset: offset, data: $0) }
            }
        }
        d.add(d.blockRequest(type: Blk.typeIn, sector: 0, inLengths: [512]).buffers)
        d.process()
        #expect(d.usedIndex() == 0)
        #expect(!d.queueReady(0))
        #expect(d.status == 0xF)
        #expect(d.device.saveState().queues[0].nextAvail == 0)
    }
}
