import Synchronization
import Testing
import TestSupport
import VMMCore
import Virtio

typealias Buffer = VirtioDriver.Buffer
typealias Used = VirtioDriver.UsedElement

/// A device model for queue tests: `queueSizes` queues; each chain's readable bytes are copied into
/// its writable buffers (as many as fit) and the used len is what was copied.
final class EchoModel: VirtioDeviceModel {
    let deviceType: UInt32 = 3
    let kind = "echo"
    let features: UInt64 = VirtioFeature.indirectDescriptors | VirtioFeature.eventIndex
    let queueSizes: [UInt16]
    private let chains = Mutex<[DescriptorChain]>([])
    private let resets = Mutex(0)

    init(queueSizes: [UInt16] = [8]) { self.queueSizes = queueSizes }

    /// Every chain served, in order.
    var served: [DescriptorChain] { chains.withLock { $0 } }
    var resetCount: Int { resets.withLock { $0 } }

    func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {}
    func reset() { resets.withLock { $0 += 1 } }

    func serve(queue: Int, chain: DescriptorChain, memory: GuestMemory) -> UInt32 {
        chains.withLock { $0.append(chain) }
        var bytes = [UInt8](repeating: 0, count: Int(min(chain.readableLength, 1 << 20)))
        let n = bytes.withUnsafeMutableBytes { memory.gather(chain, into: $0) }
        return UInt32(bytes.prefix(n).withUnsafeBytes { memory.scatter(chain, from: $0) })
    }
}

// virtio-blk request types and status values.
enum Blk {
    static let typeIn: UInt32 = 0, typeOut: UInt32 = 1, typeFlush: UInt32 = 4, typeGetID: UInt32 = 8
    static let typeDiscard: UInt32 = 11, typeWriteZeroes: UInt32 = 13
    static let ok: UInt8 = 0, ioError: UInt8 = 1, unsupported: UInt8 = 2
    /// The byte the tests put into a status buffer before a request (the device overwrites it).
    static let unwritten: UInt8 = 0xEE

    static func header(type: UInt32, sector: UInt64) -> [UInt8] {
        littleEndian(type) + littleEndian(UInt32(0)) + littleEndian(sector)
    }

    /// A discard / write-zeroes range: sector, count, flags.
    static func range(sector: UInt64, count: UInt32, flags: UInt32) -> [UInt8] {
        littleEndian(sector) + littleEndian(count) + littleEndian(flags)
    }
}

func littleEndian<T: FixedWidthInteger>(_ v: T) -> [UInt8] {
    (0..<MemoryLayout<T>.size).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) }
}

/// A virtio-blk request laid out in guest memory by the mock driver.
struct BlockRequest {
    var buffers: [Buffer]
    /// The device-writable data buffers (before the status byte).
    var inBuffers: [(address: UInt64, length: UInt32)]
    var status: UInt64
}

extension VirtioDriver {
    /// A header (type, sector), readable `out` buffers, writable buffers of `inLengths`, then a
    /// one-byte status buffer holding `Blk.unwritten`.
    func blockRequest(type: UInt32, sector: UInt64, out: [[UInt8]] = [], inLengths: [UInt32] = []) -> BlockRequest {
        let header = put(Blk.header(type: type, sector: sector))
        var buffers = [Buffer.readable(header, 16)]
        for o in out { buffers.append(.readable(put(o), UInt32(o.count))) }
        var ins: [(UInt64, UInt32)] = []
        for n in inLengths {
            let a = allocate(UInt64(n))
            try! memory.fill(GuestAddress(a), count: Int(n), with: 0xDD)
            ins.append((a, n))
            buffers.append(.writable(a, n))
        }
        let status = put([Blk.unwritten])
        buffers.append(.writable(status, 1))
        return BlockRequest(buffers: buffers, inBuffers: ins, status: status)
    }

    func statusByte(_ r: BlockRequest) -> UInt8 { bytes(at: r.status, count: 1)[0] }

    /// The guest addresses where RAM differs between two `ramImage()`s.
    func changedAddresses(_ before: [[UInt8]], _ after: [[UInt8]]) -> [UInt64] {
        var changed: [UInt64] = []
        for (r, region) in memory.regions.enumerated() where before[r] != after[r] {
            for i in before[r].indices where before[r][i] != after[r][i] { changed.append(region.guestBase.rawValue + UInt64(i)) }
        }
        return changed
    }

    /// Records an issue for every changed byte of guest RAM outside `allowed`.
    func expectOnlyChanged(since before: [[UInt8]], allowed: [Range<UInt64>], sourceLocation: SourceLocation = #_sourceLocation) {
        let outside = changedAddresses(before, ramImage()).filter { a in !allowed.contains { $0.contains(a) } }
        #expect(outside.isEmpty, "guest RAM changed outside the allowed ranges at \(outside.prefix(8).map { "0x" + String($0, radix: 16) })",
                sourceLocation: sourceLocation)
    }

    /// Adds a chain of `buffers`, then serves it and checks that guest RAM changed only in the used
    /// ring and in `allowed`; returns the used entries.
    func requestChecked(_ buffers: [Buffer], allowed: [Range<UInt64>], queue index: Int = 0, indirect: Bool = false,
                        sourceLocation: SourceLocation = #_sourceLocation) -> [Used] {
        add(buffers, queue: index, indirect: indirect)
        let before = ramImage()
        process(queue: index)
        expectOnlyChanged(since: before, allowed: allowed + [usedArea(queue: index)], sourceLocation: sourceLocation)
        return collectUsed(queue: index)
    }

    /// The used ring of queue `index` (flags, idx, ring, avail_event) as a range.
    func usedArea(queue index: Int = 0) -> Range<UInt64> {
        let l = layout(queue: index)
        return l.usedRing..<(l.usedRing + 6 + 8 * UInt64(size(queue: index)))
    }
}

/// A running virtio-blk over `store` (all offered features unless `features`).
func blockDriver(_ store: MemoryBlockStore = MemoryBlockStore(), id: String = "drive0", features: UInt64? = nil,
                 queueSize: UInt16? = nil) throws -> VirtioDriver {
    let driver = try VirtioDriver.make(VirtioBlock(store: store, id: id))
    #expect(driver.initialize(features: features, queueSizes: queueSize.map { [$0] } ?? []))
    return driver
}

/// A running virtio-rng with a fixed pattern.
func rngDriver(features: UInt64? = nil, queueSize: UInt16? = nil, entropy: PatternEntropy = PatternEntropy()) throws -> VirtioDriver {
    let driver = try VirtioDriver.make(VirtioRNG(source: entropy))
    #expect(driver.initialize(features: features, queueSizes: queueSize.map { [$0] } ?? []))
    return driver
}

/// A running echo device over two adjacent 1 MiB regions of RAM (a buffer must not straddle them).
func echoDriver(queueSizes: [UInt16] = [8], features: UInt64? = nil) throws -> (VirtioDriver, EchoModel) {
    let model = EchoModel(queueSizes: queueSizes)
    let driver = try VirtioDriver.make(model, ranges: [(0, 1 << 20), (1 << 20, 1 << 20)])
    #expect(driver.initialize(features: features))
    return (driver, model)
}

let mib: UInt64 = 1 << 20

/// A count shared with @Sendable closures.
final class Counter: Sendable {
    private let value = Mutex(0)
    /// Adds one; returns the new count.
    func next() -> Int { value.withLock { $0 += 1; return $0 } }
    var count: Int { value.withLock { $0 } }
}
