import Glibc
import Synchronization
import VMMCore
import Virtio

extension Fuzz {
    // `fuzz-virtqueue`: a guest's descriptor tables, ring indexes and register writes against a
    // virtio-mmio device (virtio-blk over a small array store, or virtio-rng).

    /// A 16 KiB drive in an array; it can be read-only, offer discard, or fail every I/O.
    final class FuzzBlockStore: BlockStore {
        let bytes: Mutex<[UInt8]>
        let size: UInt64
        let readOnly: Bool
        let canDiscard: Bool
        let failing: Bool

        /// The drive's first contents, made once: building 16 KiB byte by byte for every input was a
        /// fifth of this target's time under the sanitizers.
        static let pattern: [UInt8] = (0..<(16 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 7) }

        init(readOnly: Bool, canDiscard: Bool, failing: Bool) {
            bytes = Mutex(Self.pattern)
            size = UInt64(Self.pattern.count)
            self.readOnly = readOnly
            self.canDiscard = canDiscard
            self.failing = failing
        }

        private func inside(_ offset: UInt64, _ length: UInt64) -> Bool {
            precondition(offset <= size && length <= size - offset, "the block device asked the store for \(length) bytes at \(offset) of \(size)")
            return !failing
        }

        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
            guard inside(offset, UInt64(buffer.count)) else { return false }
            bytes.withLock { b in
                b.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<(Int(offset) + buffer.count)])) }
            }
            return true
        }

        func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
            precondition(!readOnly, "the block device wrote to a read-only store")
            guard inside(offset, UInt64(data.count)) else { return false }
            bytes.withLock { $0.replaceSubrange(Int(offset)..<(Int(offset) + data.count), with: data) }
            return true
        }

        func flush() -> Bool { !failing }

        func discard(offset: UInt64, length: UInt64) -> Bool {
            precondition(canDiscard && !readOnly, "the block device discarded on a store that cannot")
            guard inside(offset, length) else { return false }
            bytes.withLock { for i in Int(offset)..<Int(offset + length) { $0[i] = 0 } }
            return true
        }

        func writeZeroes(offset: UInt64, length: UInt64, unmap: Bool) -> Bool {
            precondition(canDiscard && !readOnly, "the block device wrote zeroes on a store that cannot")
            guard inside(offset, length) else { return false }
            bytes.withLock { for i in Int(offset)..<Int(offset + length) { $0[i] = 0 } }
            return true
        }
    }

    struct FuzzEntropy: EntropySource {
        func fill(_ buffer: UnsafeMutableRawBufferPointer) {
            for i in buffer.indices { buffer[i] = UInt8(truncatingIfNeeded: i) ^ 0xA5 }
        }
    }

    /// Forwards to the real model and checks every chain the transport hands it (in RAM, readable
    /// buffers before writable ones, no longer than two queues' worth of descriptors) and what the
    /// model answers (never more bytes than the chain's writable buffers hold). Records the
    /// writable ranges, the only guest memory a request may change.
    final class CheckedModel: VirtioDeviceModel {
        let inner: any VirtioDeviceModel
        let writable = Mutex<[Range<UInt64>]>([])
        let served = Mutex(0)
        init(_ inner: any VirtioDeviceModel) { self.inner = inner }
        var deviceType: UInt32 { inner.deviceType }
        var kind: String { inner.kind }
        var features: UInt64 { inner.features }
        var queueSizes: [UInt16] { inner.queueSizes }
        func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) { inner.readConfig(offset: offset, into: data) }
        func reset() { inner.reset() }
        var configSpace: [UInt8] { inner.configSpace }
        func hasWork(queue: Int) -> Bool { inner.hasWork(queue: queue) }

        func serve(queue: Int, chain: DescriptorChain, memory: GuestMemory) -> UInt32 {
            precondition(queue >= 0 && queue < queueSizes.count, "a chain of queue \(queue)")
            precondition(Int(chain.head) < Int(queueSizes[queue]), "chain head \(chain.head) beyond the largest queue")
            precondition(chain.segments.count <= 2 * Int(queueSizes[queue]), "a chain of \(chain.segments.count) buffers")
            var seenWritable = false
            for s in chain.segments {
                precondition(memory.isRAM(s.address, length: UInt64(s.length)), "a buffer outside guest RAM: \(s)")
                precondition(!(seenWritable && !s.writable), "a readable buffer after a writable one")
                seenWritable = seenWritable || s.writable
            }
            let n = inner.serve(queue: queue, chain: chain, memory: memory)
            precondition(UInt64(n) <= chain.writableLength, "used len \(n) exceeds the chain's \(chain.writableLength) writable bytes")
            writable.withLock { w in
                for s in chain.writable { w.append(s.address.rawValue..<(s.address.rawValue + UInt64(s.length))) }
            }
            served.withLock { $0 += 1 }
            return n
        }
    }

    // Guest RAM: two adjacent regions (a buffer may not straddle them). The rings, the indirect
    // tables and the data buffers at fixed places.
    static let vqRegions: [(base: UInt64, size: UInt64)] = [(0, 0x10000), (0x10000, 0x1000)]
    static let vqDescriptors: UInt64 = 0x100, vqAvail: UInt64 = 0x200, vqUsed: UInt64 = 0x300
    static let vqIndirect: UInt64 = 0x400, vqData: UInt64 = 0x1400
    // Made once for every input, used under vqLock.
    static let vqLock = Mutex(())
    static let vqMemory = try? GuestMemory(ranges: vqRegions.map { (GuestAddress($0.base), $0.size) })
    nonisolated(unsafe) static let vqBefore = vqRegions.map { UnsafeMutableRawBufferPointer.allocate(byteCount: Int($0.size), alignment: 16) }

    /// Byte 0 configures: bit 0 virtio-rng instead of virtio-blk; bits 1-3 the store read-only,
    /// able to discard, failing; bit 4 EVENT_IDX negotiated; bit 5 an unknown feature asked for too
    /// (the device refuses FEATURES_OK); bits 6-7 the queue size (2, 4, 8 or 16). The device is set
    /// up as Linux does, then the rest is operations, an opcode byte each (low nibble mod 11):
    /// 0 a descriptor (index, address, length, flags, next; bit 7 into the indirect area, bit 4 a raw
    /// 64-bit address, bit 5 a raw 32-bit length), 1 publish a head, 2 avail.idx ← u16, 3 avail.flags
    /// or used_event ← u16, 4 kick and serve, 5 a register write, 6 a register read (bits 4-5: the
    /// size), 7 save → restore round trips (with a damaged and a truncated payload), 8 reset and set
    /// up again, 9 a byte of guest RAM, 10 a well-formed request (type, sector, count, mode).
    ///
    /// Checks, by trapping: chains handed to the model lie in RAM, readable before writable; used
    /// len never exceeds the writable bytes; serving changes guest RAM only in the used ring and in
    /// the served chains' writable buffers; used.idx in RAM is the device's after it publishes; a
    /// ready queue's rings are always valid; a rejected restore changes nothing and an accepted one
    /// saves back to the same bytes. Must never trap otherwise (nor hang).
    public static func virtqueue(_ data: [UInt8]) {
        // The RAM and its copy are shared: one input at a time (tests may run entries in parallel).
        vqLock.withLock { _ in virtqueueOne(data) }
    }

    static func virtqueueOne(_ data: [UInt8]) {
        guard let config = data.first, let memory = vqMemory else { return }
        // Every input starts from zeroed RAM (the same mapping each time: a new one per input, and its
        // page faults, were a tenth of this target's time).
        for region in memory.regions { region.hostBase.initializeMemory(as: UInt8.self, repeating: 0, count: Int(region.size)) }
        let isRNG = config & 1 != 0
        let store = FuzzBlockStore(readOnly: config & 2 != 0, canDiscard: config & 4 != 0, failing: config & 8 != 0)
        func makeModel() -> CheckedModel {
            CheckedModel(isRNG ? VirtioRNG(source: FuzzEntropy()) : VirtioBlock(store: store, id: "fuzz-drive"))
        }
        let wiring = VirtioMMIO.Wiring(interrupt: {}, notify: { _ in })
        let placement = VirtioMMIO.Placement(base: 0xFEB0_0000, gsi: 16, index: 0)
        var device = VirtioMMIO(model: makeModel(), memory: memory, placement: placement, wiring: wiring)
        let size = UInt16(2) << (config >> 6)
        var availIndex: UInt16 = 0

        var input = data.dropFirst()
        func take(_ count: Int) -> UInt64 {
            var v: UInt64 = 0
            for i in 0..<count { v |= UInt64(input.popFirst() ?? 0) << (8 * i) }
            return v
        }
        // Register accesses of 1, 2, 4 or 8 bytes through a stack variable (an array per access was
        // a twelfth of this target's time under AddressSanitizer).
        func write(_ offset: UInt64, _ value: UInt32, size: Int = 4) {
            var v = UInt64(value).littleEndian
            withUnsafeBytes(of: &v) { device.write(offset: offset, data: UnsafeRawBufferPointer(rebasing: $0.prefix(size))) }
        }
        func read(_ offset: UInt64, size: Int = 4) -> UInt32 {
            var v: UInt64 = 0
            withUnsafeMutableBytes(of: &v) { device.read(offset: offset, data: UnsafeMutableRawBufferPointer(rebasing: $0.prefix(size))) }
            return UInt32(truncatingIfNeeded: UInt64(littleEndian: v))
        }
        func poke<T: FixedWidthInteger>(_ value: T, _ address: UInt64) { try? memory.write(value, at: GuestAddress(address)) }
        func descriptor(table: UInt64, _ index: UInt64, _ address: UInt64, _ length: UInt32, _ flags: UInt16, _ next: UInt16) {
            poke(address, table + 16 * index)
            poke(length, table + 16 * index + 8)
            poke(flags, table + 16 * index + 12)
            poke(next, table + 16 * index + 14)
        }
        func setUp() {
            write(0x070, 0)
            write(0x070, 1)
            write(0x070, 3)
            var features = VirtioFeature.version1 | VirtioFeature.indirectDescriptors
            if config & 0x10 != 0 { features |= VirtioFeature.eventIndex }
            if config & 0x20 != 0 { features |= 1 << 0 }
            write(0x024, 1)
            write(0x020, UInt32(truncatingIfNeeded: features >> 32))
            write(0x024, 0)
            write(0x020, UInt32(truncatingIfNeeded: features))
            write(0x070, 0xB)
            write(0x030, 0)
            write(0x038, UInt32(size))
            write(0x080, UInt32(vqDescriptors))
            write(0x090, UInt32(vqAvail))
            write(0x0A0, UInt32(vqUsed))
            for a in stride(from: vqDescriptors, to: vqIndirect, by: 8) { poke(UInt64(0), a) }
            availIndex = 0
            write(0x044, 1)
            write(0x070, read(0x070) | 4)
        }
        func publish(_ head: UInt16) {
            poke(head, vqAvail + 4 + 2 * UInt64(availIndex % size))
            availIndex &+= 1
            poke(availIndex, vqAvail + 2)
        }
        // Guest RAM as it was before a kick, in buffers made once (a new copy per kick, allocated and
        // freed under AddressSanitizer, was most of this target's time).
        let before = vqBefore
        func keepImage() {
            for (r, region) in memory.regions.enumerated() { before[r].copyMemory(from: region.contents) }
        }
        func checkInvariants() {
            let s = device.saveState()
            precondition(s.status & ~0xCF == 0, "status 0x\(String(s.status, radix: 16)) has unknown bits")
            precondition(s.interruptStatus & ~3 == 0, "interrupt status \(s.interruptStatus)")
            for q in s.queues {
                precondition(q.size <= q.maxSize, "queue size \(q.size) over \(q.maxSize)")
                if q.ready { precondition(q.problem(in: memory) == nil, "a ready queue with bad rings: \(q.problem(in: memory) ?? "")") }
            }
        }

        setUp()
        while let op = input.popFirst() {
            switch (op & 0x0F) % 11 {
            case 0:
                let index = take(1)
                let table = op & 0x80 != 0 ? vqIndirect : vqDescriptors
                let slot = op & 0x80 != 0 ? index : index % UInt64(size)
                let address = op & 0x10 != 0 ? take(8) : vqData + take(2)
                let length = op & 0x20 != 0 ? UInt32(truncatingIfNeeded: take(4)) : UInt32(take(1)) * 8
                let flags = UInt16(take(1))
                let next = UInt16(take(1))
                descriptor(table: table, slot, address, length, flags, next)
            case 1:
                publish(UInt16(truncatingIfNeeded: op & 0x10 != 0 ? take(2) : take(1)))
            case 2:
                availIndex = UInt16(truncatingIfNeeded: take(2))
                poke(availIndex, vqAvail + 2)
            case 3:
                let which = take(1), value = UInt16(truncatingIfNeeded: take(2))
                poke(value, which & 1 == 0 ? vqAvail : vqAvail + 4 + 2 * UInt64(size))
            case 4:
                let budget = 1 + Int(take(1) % 8)
                // The device's own model (a restore may have replaced the device).
                guard let model = device.model as? CheckedModel else { preconditionFailure("the device's model is not the checked one") }
                keepImage()
                let start = device.saveState()
                model.writable.withLock { $0 = [] }
                let servedBefore = model.served.withLock { $0 }
                write(0x050, UInt32(op >> 4 & 1))
                var rounds = 0
                while device.serve(queue: 0, budget: budget) && rounds < 4 { rounds += 1 }
                let end = device.saveState()
                var allowed = model.writable.withLock { $0 }
                let q = start.queues[0]
                if q.ready { allowed.append(q.usedRing..<(q.usedRing + 6 + 8 * UInt64(q.size))) }
                for (r, region) in memory.regions.enumerated() {
                    let now = region.contents, old = UnsafeRawBufferPointer(before[r])
                    guard memcmp(old.baseAddress!, now.baseAddress!, now.count) != 0 else { continue }
                    // 256-byte pieces compared at once; the bytes of a piece that differs one by one.
                    for start in stride(from: 0, to: now.count, by: 256) {
                        let n = min(256, now.count - start)
                        guard memcmp(old.baseAddress! + start, now.baseAddress! + start, n) != 0 else { continue }
                        for i in start..<(start + n) where old[i] != now[i] {
                            let address = region.guestBase.rawValue + UInt64(i)
                            precondition(allowed.contains { $0.contains(address) }, "serving changed guest RAM at 0x\(String(address, radix: 16))")
                        }
                    }
                }
                if model.served.withLock({ $0 }) > servedBefore, end.queues[0].nextUsed != q.nextUsed {
                    let usedIndex = try? memory.read(UInt16.self, at: GuestAddress(end.queues[0].usedRing + 2))
                    precondition(usedIndex == end.queues[0].nextUsed, "used.idx in RAM is not what the device published")
                }
            case 5:
                let offset = take(2) & 0x1FF
                write(offset, UInt32(truncatingIfNeeded: take(4)), size: [1, 2, 4, 8][Int(op >> 4) & 3])
            case 6:
                _ = read(take(2) & 0x1FF, size: [1, 2, 4, 8][Int(op >> 4) & 3])
            case 7:
                let saved = device.saveSnapshot()
                let fresh = VirtioMMIO(model: makeModel(), memory: memory, placement: placement, wiring: wiring)
                let pristine = fresh.saveSnapshot()
                do {
                    try fresh.restoreSnapshot(saved, version: VirtioMMIO.snapshotVersion)
                    precondition(fresh.saveSnapshot() == saved, "save → restore → save changed the bytes")
                } catch {
                    precondition(fresh.saveSnapshot() == pristine, "a rejected restore changed the device")
                }
                // A damaged payload into the device itself: all or nothing.
                var damaged = saved
                if !damaged.isEmpty {
                    let at = Int(take(1)) % damaged.count
                    damaged[at] ^= UInt8(truncatingIfNeeded: take(1)) | 1
                }
                do {
                    try device.restoreSnapshot(damaged, version: VirtioMMIO.snapshotVersion)
                    precondition(device.saveSnapshot() == damaged, "an accepted payload does not save back to itself")
                } catch {
                    precondition(device.saveSnapshot() == saved, "a rejected restore changed the device")
                }
                let cut = Array(saved.prefix(Int(take(1)) % max(saved.count, 1)))
                let current = device.saveSnapshot()
                do {
                    try fresh.restoreSnapshot(cut, version: VirtioMMIO.snapshotVersion)
                    preconditionFailure("a truncated payload of \(cut.count) bytes was accepted")
                } catch {}
                precondition(device.saveSnapshot() == current)
                if op & 0x10 != 0, (try? fresh.restoreSnapshot(current, version: VirtioMMIO.snapshotVersion)) != nil {
                    // Go on with the restored copy (the driver's avail index is the device's view).
                    device = fresh
                }
            case 8:
                setUp()
            case 9:
                poke(UInt8(truncatingIfNeeded: take(1)), take(2) & 0xFFFF)
            default:
                let kind = take(1), sector = take(1), count = take(1), mode = take(1)
                let indirect = mode & 1 != 0
                var buffers: [(UInt64, UInt32, Bool)] = []
                if isRNG {
                    for i in 0...(count % 4) { buffers.append((vqData + 0x200 * i, UInt32(sector + 1) * 8, true)) }
                } else {
                    let type: UInt32 = [0, 1, 4, 8, 11, 13, 7][Int(kind % 7)]
                    poke(type, vqData)
                    poke(UInt32(0), vqData + 4)
                    poke(sector, vqData + 8)
                    if mode & 2 != 0 {
                        buffers += [(vqData, 4, false), (vqData + 4, 12, false)]
                    } else {
                        buffers.append((vqData, 16, false))
                    }
                    if type == 11 || type == 13 {
                        poke(sector, vqData + 0x10)
                        poke(UInt32(count), vqData + 0x18)
                        poke(UInt32(mode >> 4), vqData + 0x1C)
                        buffers.append((vqData + 0x10, 16, false))
                    } else {
                        let writable = type != 1
                        for i in 0..<(count % 4) { buffers.append((vqData + 0x400 + 0x200 * i, 512, writable)) }
                    }
                    if mode & 4 != 0 { buffers.append((vqData + 0x300, 20, true)) }
                    buffers.append((vqData + 0x3FF, 1, true))
                }
                let table = indirect || buffers.count > Int(size) ? vqIndirect : vqDescriptors
                for (i, b) in buffers.enumerated() {
                    let last = i == buffers.count - 1
                    descriptor(table: table, UInt64(i), b.0, b.1, (b.2 ? 2 : 0) | (last ? 0 : 1), last ? 0 : UInt16(i + 1))
                }
                if table == vqIndirect { descriptor(table: vqDescriptors, 0, vqIndirect, UInt32(16 * buffers.count), 4, 0) }
                publish(0)
            }
            checkInvariants()
        }
    }
}
