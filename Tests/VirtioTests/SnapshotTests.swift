import Testing
import TestSupport
import VMMCore
import Virtio
import WireFormat

/// The transport's snapshot payload: round trips, and restores validated against the device and
/// guest memory before anything changes.
@Suite("virtio snapshots")
struct VirtioSnapshotTests {
    static let version = VirtioMMIO.snapshotVersion

    /// A running virtio-blk with some requests done and one pending in the avail ring.
    static func busyBlock(_ store: MemoryBlockStore = MemoryBlockStore()) throws -> VirtioDriver {
        let d = try blockDriver(store, queueSize: 16)
        for s in 0..<5 as Range<UInt64> { _ = d.request(d.blockRequest(type: Blk.typeIn, sector: s, inLengths: [512]).buffers) }
        d.add(d.blockRequest(type: Blk.typeIn, sector: 9, inLengths: [512]).buffers)
        return d
    }

    /// A fresh device for the same model kind and memory.
    static func fresh(like d: VirtioDriver, model: (any VirtioDeviceModel)? = nil) -> VirtioMMIO {
        VirtioMMIO(model: model ?? d.device.model, memory: d.memory, placement: d.device.placement, wiring: VirtioWiringRecorder().wiring)
    }

    /// Encodes `state` as a payload.
    static func payload(_ state: VirtioMMIO.State) -> [UInt8] {
        var s = state
        var w = LEWriter()
        w.encode { c throws(LEDecodeError) in try s.code(&c) }
        return w.bytes
    }

    /// Saves `d`'s device, restores the bytes into a fresh device and checks it saves the same.
    static func expectRoundTrip(_ d: VirtioDriver, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let saved = d.device.saveSnapshot()
        let copy = fresh(like: d)
        try copy.restoreSnapshot(saved, version: version)
        #expect(copy.saveSnapshot() == saved, sourceLocation: sourceLocation)
        #expect(copy.saveState() == d.device.saveState(), sourceLocation: sourceLocation)
    }

    @Test("save → restore into a fresh device → save gives the same bytes (fresh, mid-setup, running, needing a reset)")
    func roundTrip() throws {
        let pristine = try VirtioDriver.make(VirtioRNG(source: PatternEntropy()))
        try Self.expectRoundTrip(pristine)
        let mid = try VirtioDriver.make(EchoModel(queueSizes: [8, 16]))
        mid.addStatus(VirtioMMIO.acknowledge | VirtioMMIO.driver)
        #expect(mid.negotiate(mid.deviceFeatureBits()))
        #expect(mid.setUpQueue(0))
        mid.select(queue: 1)
        mid.write32(VirtioDriver.queueNum, 4)
        try Self.expectRoundTrip(mid)
        let busy = try Self.busyBlock()
        try Self.expectRoundTrip(busy)
        busy.setAvailIndex(200)
        busy.process()
        #expect(busy.status & VirtioMMIO.needsReset != 0)
        try Self.expectRoundTrip(busy)
        let rng = try rngDriver(features: VirtioFeature.version1, queueSize: 2)
        for _ in 0..<3 { _ = rng.request([.writable(rng.allocate(4), 4)]) }
        try Self.expectRoundTrip(rng)
    }

    @Test("a QueueNum above QueueNumMax is ignored, so the state it leaves saves and restores (fuzz-virtqueue found a state whose snapshot was refused)")
    func queueNumAboveMaxIgnored() throws {
        let d = try VirtioDriver.make(EchoModel(queueSizes: [8, 16]))
        d.addStatus(VirtioMMIO.acknowledge | VirtioMMIO.driver)
        #expect(d.negotiate(d.deviceFeatureBits()))
        d.select(queue: 1)
        d.write32(VirtioDriver.queueNum, 4)
        for tooBig: UInt32 in [32, 0xFFFF, 0x1_0000, 0xFFFF_FFFF] {
            d.write32(VirtioDriver.queueNum, tooBig)
            #expect(d.device.saveState().queues[1].size == 4)
        }
        try Self.expectRoundTrip(d)
        // The queue still takes a proper size and runs.
        #expect(d.setUpQueue(0))
        #expect(d.device.saveState().queues[0].size <= 8)
    }

    @Test("after a restore the device serves where it left off, and raises what was pending")
    func keepsServing() throws {
        let store = MemoryBlockStore()
        let d = try Self.busyBlock(store)
        let before = d.device.saveState().queues[0]
        #expect(before.nextAvail == 5 && before.nextUsed == 5)
        d.add(d.blockRequest(type: Blk.typeIn, sector: 1, inLengths: [512]).buffers)
        // An unacknowledged interrupt at snapshot time.
        #expect(d.interruptStatus == 1)
        let saved = d.device.saveSnapshot()
        let recorder = VirtioWiringRecorder()
        let copy = VirtioMMIO(model: VirtioBlock(store: store, id: "drive0"), memory: d.memory, placement: d.device.placement, wiring: recorder.wiring)
        try copy.restoreSnapshot(saved, version: Self.version)
        copy.afterRestore()
        #expect(recorder.interrupts == 1)
        #expect(recorder.notified == [0])
        d.device = copy
        #expect(d.interruptStatus == 1)
        d.process()
        let used = d.collectUsed()
        #expect(used.map(\.length) == [513, 513])
        #expect(d.usedIndex() == 7)
        let req = d.blockRequest(type: Blk.typeIn, sector: 3, inLengths: [512])
        #expect(d.request(req.buffers).map(\.length) == [513])
        #expect(d.bytes(at: req.inBuffers[0].address, count: 512) == Array(store.bytes[1536..<2048]))
        #expect(d.usedIndex() == 8)
    }

    @Test("a state before DRIVER_OK restores without comparing the ring indexes with guest memory")
    func notRunning() throws {
        let d = try Self.busyBlock()
        var state = d.device.saveState()
        state.status = VirtioMMIO.acknowledge | VirtioMMIO.driver | VirtioMMIO.featuresOK
        state.queues[0].nextUsed = 99
        state.queues[0].nextAvail = 1000
        let payload = Self.payload(state)
        let copy = Self.fresh(like: d)
        try copy.restoreSnapshot(payload, version: Self.version)
        #expect(copy.saveSnapshot() == payload)
        // But its rings must still be valid.
        state.queues[0].usedRing = 3
        #expect(throws: LEDecodeError.self) { try copy.restoreSnapshot(Self.payload(state), version: Self.version) }
    }

    struct Rejection: Sendable, CustomStringConvertible {
        let description: String
        /// Damages the saved state (and may change guest memory); returns the payload to restore.
        let damage: @Sendable (VirtioDriver, inout VirtioMMIO.State) -> [UInt8]?
        /// A word the error's text must contain.
        let mentions: String
        init(_ description: String, mentions: String, _ damage: @escaping @Sendable (VirtioDriver, inout VirtioMMIO.State) -> [UInt8]?) {
            self.description = description
            self.mentions = mentions
            self.damage = damage
        }
    }

    static let rejections: [Rejection] = [
        Rejection("a payload of another device with two queues", mentions: "queues") { d, _ in
            let other = VirtioMMIO(model: EchoModel(queueSizes: [8, 8]), memory: d.memory, placement: d.device.placement,
                                   wiring: VirtioWiringRecorder().wiring)
            return other.saveSnapshot()
        },
        Rejection("a queue count of 0", mentions: "queues") { _, s in
            var bytes = payload(s)
            bytes.replaceSubrange(32..<36, with: [0, 0, 0, 0])
            return Array(bytes.prefix(36))
        },
        Rejection("a drive of another size", mentions: "drive") { d, _ in
            VirtioMMIO(model: VirtioBlock(store: MemoryBlockStore(size: 32 << 10), id: "drive0"), memory: d.memory,
                       placement: d.device.placement, wiring: VirtioWiringRecorder().wiring).saveSnapshot()
        },
        Rejection("a read-only drive's state for a writable drive", mentions: "drive") { d, _ in
            VirtioMMIO(model: VirtioBlock(store: MemoryBlockStore(readOnly: true), id: "drive0"), memory: d.memory,
                       placement: d.device.placement, wiring: VirtioWiringRecorder().wiring).saveSnapshot()
        },
        Rejection("offered features that differ", mentions: "drive") { _, s in s.offeredFeatures &= ~VirtioFeature.eventIndex; return nil },
        Rejection("a configuration space that differs", mentions: "drive") { _, s in s.deviceConfig[12] ^= 1; return nil },
        Rejection("unknown status bits", mentions: "status") { _, s in s.status |= 0x10; return nil },
        Rejection("status bit 0x20", mentions: "status") { _, s in s.status |= 0x20; return nil },
        Rejection("unknown interrupt status bits", mentions: "interruptStatus") { _, s in s.interruptStatus |= 4; return nil },
        Rejection("driver features the device does not offer", mentions: "driverFeatures") { _, s in s.driverFeatures |= 1; return nil },
        Rejection("driver features above 32 bits not offered", mentions: "driverFeatures") { _, s in s.driverFeatures |= 1 << 40; return nil },
        Rejection("a queue size above its maximum", mentions: "size") { _, s in s.queues[0].size = 512; return nil },
        Rejection("a ready queue with a size that is not a power of two", mentions: "power of two") { _, s in s.queues[0].size = 12; return nil },
        Rejection("a ready queue whose descriptor table is outside RAM", mentions: "guest RAM") { _, s in s.queues[0].descriptorTable = 1 << 40; return nil },
        Rejection("a ready queue whose used ring is outside RAM", mentions: "guest RAM") { _, s in s.queues[0].usedRing = mib - 8; return nil },
        Rejection("a ready queue whose avail ring is misaligned", mentions: "aligned") { _, s in s.queues[0].availRing += 1; return nil },
        Rejection("eventIndex that does not match the features", mentions: "eventIndex") { _, s in s.queues[0].eventIndex.toggle(); return nil },
        Rejection("nextUsed that is not used.idx in guest memory", mentions: "used.idx") { _, s in s.queues[0].nextUsed &+= 1; return nil },
        Rejection("used.idx in guest memory changed behind the device's back", mentions: "used.idx") { d, _ in
            try! d.memory.write(UInt16(77), at: GuestAddress(d.layout().usedRing + 2))
            return nil
        },
        Rejection("avail.idx in guest memory more than a queue ahead", mentions: "ahead") { d, _ in
            d.setAvailIndex(d.device.saveState().queues[0].nextAvail &+ 17)
            return nil
        },
        Rejection("nextAvail more than a queue behind avail.idx", mentions: "ahead") { _, s in s.queues[0].nextAvail &-= 20; return nil },
        Rejection("a boolean that is not 0 or 1", mentions: "ready") { _, s in
            var bytes = payload(s)
            bytes[36 + 2] = 2
            return bytes
        },
        Rejection("a trailing byte", mentions: "unexpected") { _, s in payload(s) + [0] },
    ]

    @Test("restore rejects a damaged state and leaves the device unchanged", arguments: rejections)
    func rejected(_ r: Rejection) throws {
        let d = try Self.busyBlock()
        // The target: a device of its own in some state, which a rejected restore must not change.
        let target = Self.fresh(like: d)
        try target.restoreSnapshot(d.device.saveSnapshot(), version: Self.version)
        [UInt8]([1, 0, 0, 0]).withUnsafeBytes { target.write(offset: 0x064, data: $0) }
        #expect(target.saveState().interruptStatus == 0)
        let targetBefore = target.saveSnapshot()
        var state = d.device.saveState()
        let payload = r.damage(d, &state) ?? Self.payload(state)
        do {
            try target.restoreSnapshot(payload, version: Self.version)
            Issue.record("restore accepted: \(r)")
        } catch {
            #expect("\(error)".contains(r.mentions), "\(error)")
        }
        #expect(target.saveSnapshot() == targetBefore)
        // A fresh device stays fresh.
        let fresh = Self.fresh(like: d)
        let pristine = fresh.saveSnapshot()
        #expect(throws: LEDecodeError.self) { try fresh.restoreSnapshot(payload, version: Self.version) }
        #expect(fresh.saveSnapshot() == pristine)
    }

    @Test("every truncation of a payload is rejected, and the device is unchanged")
    func truncated() throws {
        let d = try Self.busyBlock()
        let saved = d.device.saveSnapshot()
        #expect(saved.count > 36 + 32)
        let target = Self.fresh(like: d)
        let pristine = target.saveSnapshot()
        for n in 0..<saved.count {
            #expect(throws: LEDecodeError.self, "\(n) bytes") { try target.restoreSnapshot(Array(saved.prefix(n)), version: Self.version) }
            #expect(target.saveSnapshot() == pristine)
        }
        try target.restoreSnapshot(saved, version: Self.version)
        #expect(target.saveSnapshot() == saved)
    }

    @Test("payload versions: 0 is refused, a newer one loads with its extra bytes ignored")
    func versions() throws {
        let d = try Self.busyBlock()
        let saved = d.device.saveSnapshot()
        let target = Self.fresh(like: d)
        #expect(throws: LEDecodeError.self) { try target.restoreSnapshot(saved, version: 0) }
        try target.restoreSnapshot(saved + [1, 2, 3], version: Self.version + 1)
        #expect(target.saveSnapshot() == saved)
    }
}
