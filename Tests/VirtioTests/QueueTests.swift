import Testing
import TestSupport
import VMMCore
import Virtio

/// Split virtqueues served through the transport, with the mock driver on the guest's side.
@Suite("virtqueue handling")
struct QueueTests {
    @Test("a chain is served: used entry id and len, the data, and nothing else in RAM changed")
    func serveOne() throws {
        let (d, model) = try echoDriver()
        let input = d.put(Array("hello, virtio".utf8))
        let out1 = d.allocate(5), out2 = d.allocate(64)
        let head = try #require(d.add([.readable(input, 13), .writable(out1, 5), .writable(out2, 64)]))
        let published = d.ramImage()
        d.process()
        #expect(d.collectUsed() == [Used(id: UInt32(head), length: 13)])
        #expect(d.usedIndex() == 1)
        #expect(d.bytes(at: out1, count: 5) == Array("hello".utf8))
        #expect(d.bytes(at: out2, count: 9) == Array(", virtio\0".utf8))
        d.expectOnlyChanged(since: published, allowed: [d.usedArea(), out1..<(out1 + 5), out2..<(out2 + 8)])
        #expect(model.served.count == 1)
        #expect(model.served[0].segments.map(\.length) == [13, 5, 64])
        #expect(d.device.saveState().queues[0].nextAvail == 1)
        #expect(d.device.saveState().queues[0].nextUsed == 1)
        #expect(d.freeDescriptors() == 8)
    }

    @Test("several chains in one kick are used in order; heads are whatever the driver chose")
    func severalChains() throws {
        let (d, _) = try echoDriver()
        var heads: [UInt16] = []
        var outs: [UInt64] = []
        for i in 0..<4 {
            let out = d.allocate(2)
            outs.append(out)
            heads.append(try #require(d.add([.readable(d.put([UInt8(i), UInt8(i + 10)]), 2), .writable(out, 2)])))
        }
        d.process()
        #expect(d.collectUsed() == heads.map { Used(id: UInt32($0), length: 2) })
        for (i, out) in outs.enumerated() { #expect(d.bytes(at: out, count: 2) == [UInt8(i), UInt8(i + 10)]) }
    }

    @Test("a chain as long as the queue is fine; zero-length buffers are skipped")
    func fullLengthChain() throws {
        let (d, model) = try echoDriver()
        let out = d.allocate(8)
        var buffers: [Buffer] = (0..<4).map { .readable(d.put([UInt8($0)]), 1) }
        buffers.append(.readable(0x5000, 0))
        buffers += (0..<3).map { .writable(out + UInt64($0) * 2, 2) }
        #expect(buffers.count == 8)
        #expect(d.request(buffers) == [Used(id: 0, length: 4)])
        #expect(d.status & VirtioMMIO.needsReset == 0)
        #expect(d.bytes(at: out, count: 6) == [0, 1, 2, 3, 0, 0])
        #expect(model.served.last?.segments.count == 7)
    }

    @Test("an interrupt (the wiring's closure) per kick that used buffers, none when nothing was used")
    func interrupts() throws {
        let (d, _) = try echoDriver(features: VirtioFeature.version1 | VirtioFeature.indirectDescriptors)
        let r = d.recorder!
        d.process()
        #expect(r.interrupts == 0)
        d.add([.writable(d.allocate(4), 4)])
        d.add([.writable(d.allocate(4), 4)])
        d.process()
        #expect(r.interrupts == 1)
        #expect(d.interruptStatus == 1)
        d.acknowledgeInterrupt()
        d.add([.writable(d.allocate(4), 4)])
        d.process()
        #expect(r.interrupts == 2)
        #expect(d.collectUsed().count == 3)
        #expect(d.availEvent() == 0, "avail_event is written only with EVENT_IDX")
    }

    @Test("VIRTQ_AVAIL_F_NO_INTERRUPT suppresses the interrupt (without EVENT_IDX)")
    func noInterruptFlag() throws {
        let (d, _) = try echoDriver(features: VirtioFeature.version1)
        let r = d.recorder!
        d.setAvailFlags(VirtioDriver.availNoInterrupt)
        d.add([.writable(d.allocate(4), 4)])
        d.process()
        #expect(d.collectUsed().count == 1)
        #expect(r.interrupts == 0)
        #expect(d.interruptStatus == 0)
        d.setAvailFlags(0)
        d.add([.writable(d.allocate(4), 4)])
        d.process()
        #expect(r.interrupts == 1)
    }

    @Test("EVENT_IDX: used_event decides the interrupt (flags ignored), avail_event asks for the next kick")
    func eventIndex() throws {
        let (d, _) = try echoDriver()
        #expect(d.device.saveState().queues[0].eventIndex)
        let r = d.recorder!
        let out = d.allocate(4)
        // Interrupt when entry 2 is used: one for five chains.
        d.setUsedEvent(2)
        for _ in 0..<5 { d.add([.writable(out, 4)]) }
        d.process()
        #expect(d.collectUsed().count == 5)
        #expect(r.interrupts == 1)
        #expect(d.availEvent() == 5)
        // used_event far ahead: none.
        d.setUsedEvent(100)
        for _ in 0..<2 { d.add([.writable(out, 4)]) }
        d.process()
        #expect(d.collectUsed().count == 2)
        #expect(r.interrupts == 1)
        #expect(d.availEvent() == 7)
        // used_event just behind: none (the driver has seen those).
        d.setUsedEvent(5)
        d.add([.writable(out, 4)])
        d.process()
        #expect(r.interrupts == 1)
        // used_event = the entry about to be used, with NO_INTERRUPT in flags (ignored under EVENT_IDX).
        d.setAvailFlags(VirtioDriver.availNoInterrupt)
        d.setUsedEvent(8)
        d.add([.writable(out, 4)])
        d.process()
        #expect(r.interrupts == 2)
        #expect(d.availEvent() == 9)
        #expect(d.collectUsed().count == 2)
    }

    @Test("EVENT_IDX across the 16-bit wrap of the indexes")
    func eventIndexWrap() throws {
        let (d, _) = try echoDriver(queueSizes: [4])
        let r = d.recorder!
        let out = d.allocate(4)
        // Run the indexes up to 0xFFFE, with used_event always just behind (no interrupts).
        var served = 0
        while served < 0xFFFE {
            d.setUsedEvent(UInt16(truncatingIfNeeded: served &- 1))
            let n = min(3, 0xFFFE - served)
            for _ in 0..<n { d.add([.writable(out, 4)]) }
            d.process()
            served += d.collectUsed().count
        }
        #expect(r.interrupts == 0)
        #expect(d.usedIndex() == 0xFFFE)
        // Entries 0xFFFE, 0xFFFF, 0, 1: ask for entry 0's.
        d.setUsedEvent(0)
        for _ in 0..<4 { d.add([.writable(out, 4)]) }
        d.process()
        #expect(d.collectUsed().count == 4)
        #expect(r.interrupts == 1)
        #expect(d.usedIndex() == 2)
        #expect(d.availEvent() == 2)
    }

    @Test("indirect descriptors: a chain in a table, and direct chains alongside")
    func indirect() throws {
        let (d, model) = try echoDriver()
        let input = d.put(Array(0..<40))
        let outs = (0..<3).map { _ in d.allocate(16) }
        let head = try #require(d.add([.readable(input, 20), .readable(input + 20, 20)] + outs.map { .writable($0, 16) }, indirect: true))
        #expect(d.freeDescriptors() == 7)
        let direct = d.allocate(3)
        d.add([.readable(input, 3), .writable(direct, 3)])
        d.process()
        #expect(d.collectUsed() == [Used(id: UInt32(head), length: 40), Used(id: 1, length: 3)])
        #expect(outs.flatMap { d.bytes(at: $0, count: 16) }.prefix(40) == ArraySlice(0..<40))
        #expect(d.bytes(at: direct, count: 3) == [0, 1, 2])
        #expect(model.served[0].segments.count == 5)
        // An indirect table as long as the queue is allowed.
        let full = d.allocate(8)
        let eight: [Buffer] = (0..<8).map { .writable(full + UInt64($0), 1) }
        #expect(d.request([.readable(input, 8)] + eight.dropFirst(), indirect: true).map(\.length) == [7])
        #expect(d.status & VirtioMMIO.needsReset == 0)
    }

    @Test("direct descriptors before an indirect one are part of the chain")
    func directThenIndirect() throws {
        let (d, model) = try echoDriver()
        let input = d.put([9, 8, 7, 6])
        let out = d.allocate(4)
        let table = d.allocate(32)
        d.writeDescriptor(table: table, 0, address: input + 2, length: 2, flags: VirtioDriver.descNext, next: 1)
        d.writeDescriptor(table: table, 1, address: out, length: 4, flags: VirtioDriver.descWrite, next: 0)
        d.writeDescriptor(3, address: input, length: 2, flags: VirtioDriver.descNext, next: 5)
        d.writeDescriptor(5, address: table, length: 32, flags: VirtioDriver.descIndirect, next: 0)
        d.publish(head: 3)
        d.process()
        #expect(d.collectUsed() == [Used(id: 3, length: 4)])
        #expect(d.bytes(at: out, count: 4) == [9, 8, 7, 6])
        #expect(model.served.last?.segments.map(\.length) == [2, 2, 4])
    }

    @Test("the 16-bit ring indexes wrap: more than 65536 requests through a queue of 4")
    func wraparound() throws {
        let entropy = PatternEntropy([1, 2, 3])
        let d = try rngDriver(features: VirtioFeature.version1, queueSize: 4, entropy: entropy)
        let bufs = (0..<3).map { _ in d.allocate(8) }
        let total = 65536 + 301
        var done = 0
        var bad = 0
        while done < total {
            let n = min(3, total - done)
            var heads: [UInt16] = []
            for i in 0..<n {
                try d.memory.fill(GuestAddress(bufs[i]), count: 8)
                heads.append(try #require(d.add([.writable(bufs[i], UInt32(i + 6))])))
            }
            d.process()
            let used = d.collectUsed()
            if used != zip(heads, 0..<n).map({ Used(id: UInt32($0.0), length: UInt32($0.1 + 6)) }) { bad += 1 }
            if done % 9973 == 0 {
                for i in 0..<n { #expect(d.bytes(at: bufs[i], count: 8) == entropy.expected(i + 6) + [UInt8](repeating: 0, count: 2 - i)) }
            }
            done += n
        }
        #expect(bad == 0)
        let q = d.device.saveState().queues[0]
        #expect(q.nextAvail == UInt16(truncatingIfNeeded: total))
        #expect(q.nextUsed == UInt16(truncatingIfNeeded: total))
        #expect(d.usedIndex() == UInt16(truncatingIfNeeded: total))
        #expect(d.status & VirtioMMIO.needsReset == 0)
    }

    @Test("queues of a multi-queue device are served separately")
    func twoQueues() throws {
        let (d, model) = try echoDriver(queueSizes: [8, 16])
        #expect(d.size(queue: 1) == 16)
        let a = d.allocate(1), b = d.allocate(1)
        d.add([.readable(d.put([0xAA]), 1), .writable(a, 1)], queue: 0)
        d.add([.readable(d.put([0xBB]), 1), .writable(b, 1)], queue: 1)
        d.process(queue: 1)
        #expect(d.collectUsed(queue: 0).isEmpty)
        #expect(d.collectUsed(queue: 1) == [Used(id: 0, length: 1)])
        d.process(queue: 0)
        #expect(d.collectUsed(queue: 0) == [Used(id: 0, length: 1)])
        #expect(d.bytes(at: a, count: 1) == [0xAA] && d.bytes(at: b, count: 1) == [0xBB])
        #expect(model.served.count == 2)
        // Serving a queue that does not exist does nothing.
        #expect(!d.device.serve(queue: 2))
    }

    @Test("the budget: serve returns true while chains may remain")
    func budget() throws {
        let (d, _) = try echoDriver()
        for _ in 0..<5 { d.add([.writable(d.allocate(1), 1)]) }
        d.kick()
        #expect(d.device.serve(queue: 0, budget: 2))
        #expect(d.usedIndex() == 2)
        #expect(d.device.serve(queue: 0, budget: 2))
        #expect(!d.device.serve(queue: 0, budget: 2))
        #expect(d.usedIndex() == 5)
    }

    @Test("nothing is served before DRIVER_OK, after DEVICE_NEEDS_RESET, or on a stopped queue")
    func notServed() throws {
        let d = try VirtioDriver.make(EchoModel())
        d.addStatus(VirtioMMIO.acknowledge | VirtioMMIO.driver)
        #expect(d.negotiate(d.deviceFeatureBits()))
        #expect(d.setUpQueue(0))
        d.add([.writable(d.allocate(1), 1)])
        d.process()
        #expect(d.usedIndex() == 0)
        d.addStatus(VirtioMMIO.driverOK)
        d.process()
        #expect(d.usedIndex() == 1)
        d.stopQueue(0)
        #expect(!d.device.serve(queue: 0))
    }
}
