import Testing
import TestSupport
import VMMCore
import Virtio

/// The virtio-mmio version 2 register window, through the mock driver's register accesses (the
/// offsets Linux's virtio_mmio uses).
@Suite("virtio-mmio transport registers")
struct TransportTests {
    typealias D = VirtioDriver

    @Test("magic, version, device and vendor IDs")
    func identity() throws {
        let blk = try VirtioDriver.make(VirtioBlock(store: MemoryBlockStore(), id: "x"))
        let id = blk.probe()
        #expect(id.magic == 0x7472_6976)
        #expect(id.version == 2)
        #expect(id.deviceID == 2)
        #expect(id.vendorID == VirtioMMIO.vendorID)
        let rng = try VirtioDriver.make(VirtioRNG(source: PatternEntropy()))
        #expect(rng.probe().deviceID == 4)
        #expect(rng.probe().magic == VirtioMMIO.magic)
    }

    @Test("device features: slice 0 the low word, slice 1 holds VERSION_1 in bit 0, other slices 0")
    func featureSlices() throws {
        let d = try VirtioDriver.make(VirtioBlock(store: MemoryBlockStore(), id: "x"))
        d.write32(D.deviceFeaturesSel, 1)
        #expect(d.read32(D.deviceFeatures) == 1)
        d.write32(D.deviceFeaturesSel, 0)
        let low = d.read32(D.deviceFeatures)
        // seg_max (2), blk_size (6), flush (9), INDIRECT_DESC (28), EVENT_IDX (29).
        #expect(low == 1 << 2 | 1 << 6 | 1 << 9 | 1 << 28 | 1 << 29)
        for sel: UInt32 in [2, 3, 0xFFFF_FFFF] {
            d.write32(D.deviceFeaturesSel, sel)
            #expect(d.read32(D.deviceFeatures) == 0)
        }
        #expect(d.deviceFeatureBits() == VirtioFeature.version1 | UInt64(low))
    }

    @Test("FEATURES_OK is refused for features not offered or without VERSION_1, and kept otherwise")
    func featuresOK() throws {
        let d = try VirtioDriver.make(VirtioBlock(store: MemoryBlockStore(), id: "x"))
        let offered = d.deviceFeatureBits()
        for bad in [offered | 1 << 0, offered | 1 << 33, offered & ~VirtioFeature.version1, 0, UInt64.max] {
            d.reset()
            d.addStatus(VirtioMMIO.acknowledge)
            d.addStatus(VirtioMMIO.driver)
            d.writeDriverFeatures(bad)
            d.addStatus(VirtioMMIO.featuresOK)
            #expect(d.status == VirtioMMIO.acknowledge | VirtioMMIO.driver, "features 0x\(String(bad, radix: 16))")
            // DRIVER_OK without FEATURES_OK is not taken either.
            d.addStatus(VirtioMMIO.driverOK)
            #expect(d.status & VirtioMMIO.driverOK == 0)
            #expect(!d.device.isRunning)
        }
        d.reset()
        d.addStatus(VirtioMMIO.acknowledge | VirtioMMIO.driver)
        #expect(d.negotiate(VirtioFeature.version1))
        #expect(d.status == 0xB)
        // Once FEATURES_OK is set, the driver's features are fixed.
        d.writeDriverFeatures(offered)
        #expect(d.device.saveState().driverFeatures == VirtioFeature.version1)
        // A subset of the offer is fine.
        d.reset()
        d.addStatus(VirtioMMIO.acknowledge | VirtioMMIO.driver)
        #expect(d.negotiate(offered & ~VirtioFeature.eventIndex))
    }

    @Test("DRIVER_OK without FEATURES_OK is not accepted; with it the device runs")
    func driverOK() throws {
        let d = try VirtioDriver.make(VirtioRNG(source: PatternEntropy()))
        d.writeStatus(VirtioMMIO.acknowledge | VirtioMMIO.driver | VirtioMMIO.driverOK)
        #expect(d.status == VirtioMMIO.acknowledge | VirtioMMIO.driver)
        #expect(!d.device.isRunning)
        #expect(d.initialize())
        #expect(d.status == 0xF)
        #expect(d.device.isRunning)
    }

    @Test("a status write that clears bits is ignored; FAILED is taken; NEEDS_RESET cannot be written")
    func statusOnlyGrows() throws {
        let d = try VirtioDriver.make(VirtioRNG(source: PatternEntropy()))
        #expect(d.initialize())
        for v: UInt32 in [0x3, 0x1, 0x7, 0x8, 0x80] {
            d.writeStatus(v)
            #expect(d.status == 0xF, "status write 0x\(String(v, radix: 16))")
        }
        #expect(d.recorder!.logs.contains { $0.contains("clears bits") })
        d.writeStatus(0xF | 0x40 | 0x30)
        #expect(d.status == 0xF)
        d.addStatus(VirtioMMIO.failed)
        #expect(d.status == 0x8F)
    }

    @Test("reset (status 0) clears the status, features, queues and interrupt status")
    func reset() throws {
        let model = EchoModel()
        let d = try VirtioDriver.make(model)
        let pristine = d.device.saveState()
        #expect(d.initialize())
        let data = d.put([1, 2, 3, 4])
        let out = d.allocate(4)
        #expect(d.request([.readable(data, 4), .writable(out, 4)]) == [Used(id: 0, length: 4)])
        #expect(d.interruptStatus == 1)
        d.write32(D.queueSel, 0)
        #expect(d.read32(D.queueReady) == 1)
        d.writeStatus(0)
        #expect(d.status == 0)
        #expect(d.interruptStatus == 0)
        #expect(!d.queueReady(0))
        #expect(d.device.saveState() == pristine)
        #expect(model.resetCount >= 1)
        // And the driver can start over.
        #expect(d.initialize())
        #expect(d.request([.readable(data, 4), .writable(out, 4)]) == [Used(id: 0, length: 4)])
    }

    @Test("QueueNumMax is 0 for a queue that does not exist, and its other registers do nothing")
    func absentQueue() throws {
        let d = try VirtioDriver.make(EchoModel(queueSizes: [8, 16]))
        #expect(d.queueNumMax(0) == 8)
        #expect(d.queueNumMax(1) == 16)
        let before = d.device.saveState()
        for q: UInt32 in [2, 3, 0xFFFF_FFFF] {
            d.write32(D.queueSel, q)
            #expect(d.read32(D.queueNumMax) == 0)
            #expect(d.read32(D.queueReady) == 0)
            d.write32(D.queueNum, 4)
            d.write32(D.queueDescLow, 0x1000)
            d.write32(D.queueReady, 1)
            #expect(d.read32(D.queueReady) == 0)
        }
        var after = d.device.saveState()
        after.queueSel = before.queueSel
        #expect(after == before)
        #expect(d.status & VirtioMMIO.needsReset == 0)
    }

    @Test("QueueReady reads back 1 once set up and 0 after a stop; the addresses stay")
    func queueReady() throws {
        let d = try VirtioDriver.make(EchoModel(queueSizes: [8, 16]))
        d.addStatus(VirtioMMIO.acknowledge | VirtioMMIO.driver)
        #expect(d.negotiate(d.deviceFeatureBits()))
        #expect(!d.queueReady(0))
        #expect(d.setUpQueue(0))
        #expect(d.setUpQueue(1, size: 4))
        #expect(d.queueReady(0) && d.queueReady(1))
        let layout = d.layout(queue: 1)
        d.stopQueue(1)
        #expect(!d.queueReady(1))
        #expect(d.queueReady(0))
        let q = d.device.saveState().queues[1]
        #expect(q.descriptorTable == layout.descriptorTable && q.availRing == layout.availRing && q.usedRing == layout.usedRing)
        #expect(q.size == 4)
        // Set up again, it starts from index 0.
        #expect(d.setUpQueue(1, size: 4, layout: layout))
        #expect(d.device.saveState().queues[1].nextAvail == 0)
    }

    @Test("queue size and address writes are ignored while the queue is ready")
    func addressesFixedWhileReady() throws {
        let d = try VirtioDriver.make(EchoModel())
        #expect(d.initialize())
        let before = d.device.saveState().queues[0]
        d.select(queue: 0)
        for offset in [D.queueDescLow, D.queueDescHigh, D.queueDriverLow, D.queueDriverHigh, D.queueDeviceLow, D.queueDeviceHigh] {
            d.write32(offset, 0x1234_5000)
        }
        d.write32(D.queueNum, 2)
        #expect(d.device.saveState().queues[0] == before)
        // It still serves.
        let out = d.allocate(2)
        #expect(d.request([.readable(d.put([7, 8]), 2), .writable(out, 2)]).count == 1)
        #expect(d.bytes(at: out, count: 2) == [7, 8])
    }

    @Test("InterruptStatus: bit 0 after a used buffer, bit 1 on DEVICE_NEEDS_RESET; InterruptACK clears what it names")
    func interruptStatus() throws {
        let (d, _) = try echoDriver()
        #expect(d.interruptStatus == 0)
        _ = d.request([.writable(d.allocate(4), 4)])
        #expect(d.interruptStatus == 1)
        d.write32(D.interruptACK, 2)
        #expect(d.interruptStatus == 1)
        #expect(d.acknowledgeInterrupt() == 1)
        #expect(d.interruptStatus == 0)
        // A broken queue: the config-change bit.
        d.setAvailIndex(100)
        d.process()
        #expect(d.interruptStatus == 2)
        #expect(d.status & VirtioMMIO.needsReset != 0)
        d.write32(D.interruptACK, 0xFFFF_FFFF)
        #expect(d.interruptStatus == 0)
        #expect(d.status & VirtioMMIO.needsReset != 0)
    }

    @Test("ConfigGeneration is stable (the configuration spaces never change)")
    func configGeneration() throws {
        let d = try blockDriver()
        let g = d.read32(D.configGeneration)
        _ = d.config(0, size: 4)
        #expect(d.read32(D.configGeneration) == g)
        #expect(d.device.saveState().configGeneration == g)
    }

    @Test("virtio-blk configuration space: capacity, seg_max, blk_size at 1, 2, 4 and 8 bytes; beyond its end reads 0")
    func blockConfig() throws {
        let capacity: UInt64 = 0x12_3456_789A
        let d = try VirtioDriver.make(VirtioBlock(store: SizedStore(size: capacity * 512 + 100), id: "x"))
        #expect(d.config(0, size: 8) == capacity)
        #expect(d.config(0, size: 4) == capacity & 0xFFFF_FFFF)
        #expect(d.config(4, size: 4) == capacity >> 32)
        #expect(d.config(0, size: 2) == capacity & 0xFFFF)
        for i in 0..<8 { #expect(d.config(UInt64(i), size: 1) == (capacity >> (8 * UInt64(i))) & 0xFF) }
        #expect(d.config(8, size: 4) == 0)             // size_max: not offered
        #expect(d.config(12, size: 4) == 254)          // seg_max
        #expect(d.config(12, size: 2) == 254)
        #expect(d.config(12, size: 1) == 254)
        #expect(d.config(13, size: 1) == 0)
        #expect(d.config(20, size: 4) == 512)          // blk_size
        #expect(d.config(20, size: 2) == 512)
        #expect(d.config(21, size: 1) == 2)
        #expect(d.config(34, size: 2) == 1)            // num_queues
        #expect(d.config(36, size: 4) == 1 << 22)      // max_discard_sectors
        #expect(d.config(56, size: 1) == 1)            // write_zeroes_may_unmap
        #expect(d.config(58, size: 4) == 0)            // straddles the end
        #expect(d.config(60, size: 4) == 0)
        #expect(d.config(0xFC, size: 4) == 0)
        // Writes to the configuration space are ignored.
        d.write(D.config, size: 4, 0xFFFF_FFFF)
        #expect(d.config(0, size: 8) == capacity)
        // virtio-rng has no configuration space.
        let rng = try VirtioDriver.make(VirtioRNG(source: PatternEntropy()))
        #expect(rng.config(0, size: 8) == 0)
    }

    @Test("SHMLen reads all-ones (no shared-memory regions), SHMBase 0")
    func sharedMemory() throws {
        let d = try VirtioDriver.make(VirtioRNG(source: PatternEntropy()))
        for sel: UInt32 in [0, 1, 7] {
            d.write32(D.shmSel, sel)
            #expect(d.read32(D.shmLenLow) == 0xFFFF_FFFF)
            #expect(d.read32(D.shmLenHigh) == 0xFFFF_FFFF)
            #expect(d.read32(D.shmBaseLow) == 0)
            #expect(d.read32(D.shmBaseHigh) == 0)
        }
    }

    @Test("unaligned and odd-size register accesses read 0 and are ignored; write-only and unknown registers read 0")
    func oddAccesses() throws {
        let d = try VirtioDriver.make(VirtioBlock(store: MemoryBlockStore(), id: "x"))
        for (offset, size) in [(0 as UInt64, 1), (0, 2), (0, 8), (1, 4), (2, 4), (3, 1), (0x70, 2), (0x72, 2), (0x0FD, 1)] {
            #expect(d.read(offset, size: size) == 0, "read of \(size) at \(offset)")
        }
        #expect(d.read(0, size: 4) == UInt64(VirtioMMIO.magic))
        for offset: UInt64 in [0x014, 0x020, 0x024, 0x030, 0x038, 0x050, 0x064, 0x080, 0x0A4, 0x0AC, 0x0C0, 0x0F8] {
            #expect(d.read32(offset) == 0, "register 0x\(String(offset, radix: 16))")
        }
        let before = d.device.saveState()
        d.write(D.status, size: 1, 1)
        d.write(D.status, size: 2, 1)
        d.write(D.status, size: 8, 1)
        d.write(D.status + 1, size: 4, 1)
        d.write(D.status + 2, size: 4, 1)
        d.write(D.deviceFeaturesSel + 1, size: 4, 1)
        d.write(D.queueSel, size: 2, 5)
        d.write(0x0C0, size: 4, 0xFFFF_FFFF)          // not a register
        d.write(0x000, size: 4, 0)                    // read-only
        d.write(0x034, size: 4, 0)
        #expect(d.device.saveState() == before)
        #expect(d.status == 0)
    }

    @Test("QueueNotify calls the notify closure only for queues that exist, whatever the status")
    func notify() throws {
        let d = try VirtioDriver.make(EchoModel(queueSizes: [8, 16]))
        let r = d.recorder!
        d.kick(queue: 0)
        for v: UInt32 in [2, 3, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF] { d.write32(D.queueNotify, v) }
        d.kick(queue: 1)
        d.write(D.queueNotify, size: 2, 0)            // not a 32-bit access
        d.write(D.queueNotify + 2, size: 4, 0)
        #expect(r.notified == [0, 1])
        #expect(d.initialize())
        r.clear()
        d.kick(queue: 1)
        d.write32(D.queueNotify, 2)
        #expect(r.notified == [1])
    }

    @Test("the DSDT device: LNRO0005 with its window and interrupt, and the bus region")
    func platform() throws {
        let d = try VirtioDriver.make(VirtioRNG(source: PatternEntropy()), placement: .init(base: 0xFEB0_0400, gsi: 18, index: 2))
        #expect(d.device.name == "virtio-rng2")
        #expect(d.device.busRegions.count == 1)
        #expect(d.device.busRegions[0].base == 0xFEB0_0400 && d.device.busRegions[0].size == 0x200)
        #expect(d.device.snapshotSection?.name == "dev.virtio-rng2")
        #expect(!d.device.dsdtAML.isEmpty)
    }
}

/// A store that only has a size (reads give zeroes), for configuration-space tests of big drives.
final class SizedStore: BlockStore {
    let size: UInt64
    let readOnly = false
    let canDiscard = false
    init(size: UInt64) { self.size = size }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        for i in buffer.indices { buffer[i] = 0 }
        return true
    }
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) -> Bool { true }
    func flush() -> Bool { true }
    func discard(offset: UInt64, length: UInt64) -> Bool { true }
    func writeZeroes(offset: UInt64, length: UInt64, unmap: Bool) -> Bool { true }
}
