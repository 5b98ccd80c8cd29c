import Synchronization
import VMMCore
import Virtio

/// What a virtio-mmio device asks of the machine, recorded: interrupts raised, queue kicks that
/// reached the `notify` closure, and the complaints it logged.
public final class VirtioWiringRecorder: Sendable {
    private struct Record {
        var interrupts = 0
        var notified: [Int] = []
        var logs: [String] = []
    }
    private let record = Mutex(Record())

    public init() {}

    /// Wiring whose closures count into this recorder.
    public var wiring: VirtioMMIO.Wiring {
        VirtioMMIO.Wiring(interrupt: { [self] in record.withLock { $0.interrupts += 1 } },
                          notify: { [self] q in record.withLock { $0.notified.append(q) } },
                          log: { [self] line in record.withLock { $0.logs.append(line) } })
    }

    /// How many times the device raised its interrupt.
    public var interrupts: Int { record.withLock { $0.interrupts } }
    /// The queue index of every `notify` call, in order.
    public var notified: [Int] { record.withLock { $0.notified } }
    /// Every line the device logged.
    public var logs: [String] { record.withLock { $0.logs } }

    public func clear() { record.withLock { $0 = Record() } }
}

/// A mock virtio driver: plays the guest's side of a `VirtioMMIO` in unit tests, through the
/// device's register window (`BusDevice` reads and writes at the offsets a guest uses) and guest
/// memory. It does what Linux 6.1's virtio_mmio and virtio_ring do (`initialize`: reset,
/// ACKNOWLEDGE, DRIVER, features, FEATURES_OK read back, each queue's set-up, DRIVER_OK), lays out
/// split rings, adds chains of direct or indirect descriptors, kicks, and collects used entries.
/// For hostile tests it also writes raw descriptors, ring entries and ring indexes of the caller's
/// choice.
///
/// Guest memory for rings, tables and buffers comes from a bump allocator over `allocationRange`.
/// The driver serves the queues itself (`process`) by calling the device's `serve(queue:)`, which
/// is what the machine's device thread does after a kick.
public final class VirtioDriver {
    /// The device under test (replaceable: a test restoring a snapshot into a fresh device goes on
    /// with the same driver and memory).
    public var device: VirtioMMIO
    public let memory: GuestMemory
    /// The recorder of the device's wiring, when `make` built the device.
    public let recorder: VirtioWiringRecorder?

    // Register offsets (virtio-mmio version 2).
    public static let magicValue: UInt64 = 0x000, version: UInt64 = 0x004, deviceID: UInt64 = 0x008, vendorID: UInt64 = 0x00C
    public static let deviceFeatures: UInt64 = 0x010, deviceFeaturesSel: UInt64 = 0x014
    public static let driverFeatures: UInt64 = 0x020, driverFeaturesSel: UInt64 = 0x024
    public static let queueSel: UInt64 = 0x030, queueNumMax: UInt64 = 0x034, queueNum: UInt64 = 0x038
    public static let queueReady: UInt64 = 0x044, queueNotify: UInt64 = 0x050
    public static let interruptStatus: UInt64 = 0x060, interruptACK: UInt64 = 0x064, status: UInt64 = 0x070
    public static let queueDescLow: UInt64 = 0x080, queueDescHigh: UInt64 = 0x084
    public static let queueDriverLow: UInt64 = 0x090, queueDriverHigh: UInt64 = 0x094
    public static let queueDeviceLow: UInt64 = 0x0A0, queueDeviceHigh: UInt64 = 0x0A4
    public static let shmSel: UInt64 = 0x0AC, shmLenLow: UInt64 = 0x0B0, shmLenHigh: UInt64 = 0x0B4
    public static let shmBaseLow: UInt64 = 0x0B8, shmBaseHigh: UInt64 = 0x0BC
    public static let configGeneration: UInt64 = 0x0FC, config: UInt64 = 0x100

    // Descriptor and ring flags.
    public static let descNext: UInt16 = 1, descWrite: UInt16 = 2, descIndirect: UInt16 = 4
    public static let availNoInterrupt: UInt16 = 1

    /// A buffer of a chain: `length` bytes at `address`, read or written by the device.
    public struct Buffer: Equatable, Sendable {
        public var address: UInt64
        public var length: UInt32
        public var writable: Bool
        public init(address: UInt64, length: UInt32, writable: Bool) {
            self.address = address
            self.length = length
            self.writable = writable
        }
        public static func readable(_ address: UInt64, _ length: UInt32) -> Buffer { Buffer(address: address, length: length, writable: false) }
        public static func writable(_ address: UInt64, _ length: UInt32) -> Buffer { Buffer(address: address, length: length, writable: true) }
    }

    /// One used-ring element.
    public struct UsedElement: Equatable, Sendable, CustomStringConvertible {
        public var id: UInt32
        public var length: UInt32
        public init(id: UInt32, length: UInt32) {
            self.id = id
            self.length = length
        }
        public var description: String { "(id \(id), len \(length))" }
    }

    /// Where a queue's three areas are.
    public struct RingLayout: Equatable, Sendable {
        public var descriptorTable: UInt64
        public var availRing: UInt64
        public var usedRing: UInt64
        public init(descriptorTable: UInt64, availRing: UInt64, usedRing: UInt64) {
            self.descriptorTable = descriptorTable
            self.availRing = availRing
            self.usedRing = usedRing
        }
    }

    /// The driver's view of one queue it set up.
    public struct DriverQueue {
        public let size: UInt16
        public let layout: RingLayout
        /// The avail.idx the driver last published.
        public var availIndex: UInt16 = 0
        /// The used.idx up to which the driver has collected entries.
        public var lastUsed: UInt16 = 0
        var free: [UInt16]
        /// The direct descriptors of each chain in flight, by head.
        var inFlight: [UInt16: [UInt16]] = [:]
        /// A reusable indirect table per head: (address, capacity in descriptors).
        var indirectTables: [UInt16: (UInt64, Int)] = [:]

        init(size: UInt16, layout: RingLayout) {
            self.size = size
            self.layout = layout
            free = Array((0..<size).reversed())
        }
        /// Descriptors not in a chain in flight.
        public var freeCount: Int { free.count }
    }

    /// The queues set up, by index.
    public private(set) var queues: [Int: DriverQueue] = [:]
    /// The features the driver wrote (whether or not the device took them).
    public private(set) var driverFeatures: UInt64 = 0
    private var cursor: UInt64
    public let allocationRange: Range<UInt64>

    /// A driver for `device` over `memory`, allocating its rings and buffers from `allocationRange`
    /// (which must be guest RAM).
    public init(device: VirtioMMIO, memory: GuestMemory, allocationRange: Range<UInt64>, recorder: VirtioWiringRecorder? = nil) {
        self.device = device
        self.memory = memory
        self.allocationRange = allocationRange
        self.recorder = recorder
        cursor = allocationRange.lowerBound
    }

    /// Builds guest RAM (`ranges`, (base, size) pairs; default 1 MiB at 0), a device for `model`
    /// whose wiring a new `VirtioWiringRecorder` records, and a driver allocating from the first
    /// range after its first page.
    public static func make(_ model: any VirtioDeviceModel, ranges: [(base: UInt64, size: UInt64)] = [(0, 1 << 20)],
                            placement: VirtioMMIO.Placement = .init(base: 0xFEB0_0000, gsi: 16, index: 0)) throws -> VirtioDriver {
        let memory = try GuestMemory(ranges: ranges.map { (GuestAddress($0.base), $0.size) })
        let recorder = VirtioWiringRecorder()
        let device = VirtioMMIO(model: model, memory: memory, placement: placement, wiring: recorder.wiring)
        let first = ranges.min { $0.base < $1.base }!
        return VirtioDriver(device: device, memory: memory, allocationRange: (first.base + 0x1000)..<(first.base + first.size),
                            recorder: recorder)
    }

    // MARK: Registers

    /// A read of `size` bytes at `offset` in the window, little-endian.
    public func read(_ offset: UInt64, size: Int) -> UInt64 {
        var buffer = [UInt8](repeating: 0xEE, count: size)
        buffer.withUnsafeMutableBytes { device.read(offset: offset, data: $0) }
        return buffer.enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * $1.offset) }
    }

    /// A write of the low `size` bytes of `value` at `offset` in the window.
    public func write(_ offset: UInt64, size: Int, _ value: UInt64) {
        let buffer = (0..<size).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
        buffer.withUnsafeBytes { device.write(offset: offset, data: $0) }
    }

    public func read32(_ offset: UInt64) -> UInt32 { UInt32(truncatingIfNeeded: read(offset, size: 4)) }
    public func write32(_ offset: UInt64, _ value: UInt32) { write(offset, size: 4, UInt64(value)) }

    /// The Status register.
    public var status: UInt32 { read32(Self.status) }
    /// Status ← `value` (0 resets the device).
    public func writeStatus(_ value: UInt32) { write32(Self.status, value) }
    /// Status |= `bits`, a read-modify-write (Linux's `virtio_add_status`).
    public func addStatus(_ bits: UInt32) { writeStatus(status | bits) }

    public var interruptStatus: UInt32 { read32(Self.interruptStatus) }

    /// What Linux's `vm_interrupt` does: reads InterruptStatus and acknowledges exactly that.
    @discardableResult
    public func acknowledgeInterrupt() -> UInt32 {
        let pending = interruptStatus
        if pending != 0 { write32(Self.interruptACK, pending) }
        return pending
    }

    /// The 64 device feature bits, high word first (as Linux reads them).
    public func deviceFeatureBits() -> UInt64 {
        write32(Self.deviceFeaturesSel, 1)
        let high = UInt64(read32(Self.deviceFeatures))
        write32(Self.deviceFeaturesSel, 0)
        return high << 32 | UInt64(read32(Self.deviceFeatures))
    }

    /// Writes the 64 driver feature bits, high word first (as Linux does).
    public func writeDriverFeatures(_ features: UInt64) {
        driverFeatures = features
        write32(Self.driverFeaturesSel, 1)
        write32(Self.driverFeatures, UInt32(truncatingIfNeeded: features >> 32))
        write32(Self.driverFeaturesSel, 0)
        write32(Self.driverFeatures, UInt32(truncatingIfNeeded: features))
    }

    /// A configuration-space read of `size` bytes at `offset` from the start of the config space.
    public func config(_ offset: UInt64, size: Int) -> UInt64 { read(Self.config + offset, size: size) }

    /// Selects queue `index` (QueueSel).
    public func select(queue index: Int) { write32(Self.queueSel, UInt32(truncatingIfNeeded: index)) }

    /// QueueReady of queue `index` read back.
    public func queueReady(_ index: Int) -> Bool {
        select(queue: index)
        return read32(Self.queueReady) != 0
    }

    /// QueueNumMax of queue `index`.
    public func queueNumMax(_ index: Int) -> UInt32 {
        select(queue: index)
        return read32(Self.queueNumMax)
    }

    // MARK: The Linux 6.1 sequence

    /// Magic, Version, DeviceID and VendorID, as the probe reads them.
    public func probe() -> (magic: UInt32, version: UInt32, deviceID: UInt32, vendorID: UInt32) {
        (read32(Self.magicValue), read32(Self.version), read32(Self.deviceID), read32(Self.vendorID))
    }

    /// Status ← 0, and forgets the queues.
    public func reset() {
        writeStatus(0)
        queues = [:]
    }

    /// Writes `features`, sets FEATURES_OK and reads it back: whether the device kept it (Linux
    /// adds FAILED when it did not: "device refuses features").
    @discardableResult
    public func negotiate(_ features: UInt64) -> Bool {
        writeDriverFeatures(features)
        addStatus(VirtioMMIO.featuresOK)
        guard status & VirtioMMIO.featuresOK != 0 else {
            addStatus(VirtioMMIO.failed)
            return false
        }
        return true
    }

    /// Sets up queue `index` as Linux does: QueueSel, QueueReady must read 0, QueueNumMax non-zero,
    /// rings (at `layout`, or allocated here), QueueNum ← `size` (default QueueNumMax), the three
    /// addresses, QueueReady ← 1. Returns whether QueueReady then reads back 1 (a device that
    /// refuses the rings sets DEVICE_NEEDS_RESET instead).
    @discardableResult
    public func setUpQueue(_ index: Int, size: UInt16? = nil, layout: RingLayout? = nil) -> Bool {
        select(queue: index)
        guard read32(Self.queueReady) == 0 else { return false }
        let max = read32(Self.queueNumMax)
        guard max != 0 else { return false }
        let n = size ?? UInt16(truncatingIfNeeded: max)
        let layout = layout ?? allocateRings(size: n)
        write32(Self.queueNum, UInt32(n))
        writeAddresses(layout)
        write32(Self.queueReady, 1)
        let ready = read32(Self.queueReady) != 0
        if ready { queues[index] = DriverQueue(size: n, layout: layout) }
        return ready
    }

    /// Writes the three ring addresses of the selected queue (low then high words).
    public func writeAddresses(_ layout: RingLayout) {
        write32(Self.queueDescLow, UInt32(truncatingIfNeeded: layout.descriptorTable))
        write32(Self.queueDescHigh, UInt32(truncatingIfNeeded: layout.descriptorTable >> 32))
        write32(Self.queueDriverLow, UInt32(truncatingIfNeeded: layout.availRing))
        write32(Self.queueDriverHigh, UInt32(truncatingIfNeeded: layout.availRing >> 32))
        write32(Self.queueDeviceLow, UInt32(truncatingIfNeeded: layout.usedRing))
        write32(Self.queueDeviceHigh, UInt32(truncatingIfNeeded: layout.usedRing >> 32))
    }

    /// Allocates and zeroes a queue of `size`: the table 16-aligned, the avail ring 2-aligned and
    /// the used ring 4-aligned (each on its own here: 16-aligned).
    public func allocateRings(size: UInt16) -> RingLayout {
        let n = UInt64(size)
        return RingLayout(descriptorTable: allocate(16 * n), availRing: allocate(6 + 2 * n), usedRing: allocate(6 + 8 * n))
    }

    /// QueueReady ← 0 for queue `index` (Linux's teardown); the driver forgets the queue.
    public func stopQueue(_ index: Int) {
        select(queue: index)
        write32(Self.queueReady, 0)
        queues[index] = nil
    }

    /// The whole sequence: probe, reset, ACKNOWLEDGE, DRIVER, features (`features`, or every
    /// feature the device offers), FEATURES_OK, each of the device's queues (sizes from
    /// `queueSizes` where given), DRIVER_OK. Returns whether every step was accepted.
    @discardableResult
    public func initialize(features: UInt64? = nil, queueSizes: [UInt16] = []) -> Bool {
        let id = probe()
        guard id.magic == VirtioMMIO.magic, id.version == 2, id.deviceID != 0 else { return false }
        reset()
        addStatus(VirtioMMIO.acknowledge)
        addStatus(VirtioMMIO.driver)
        let offered = deviceFeatureBits()
        guard negotiate(features ?? offered) else { return false }
        var index = 0
        while queueNumMax(index) != 0 {
            guard setUpQueue(index, size: index < queueSizes.count ? queueSizes[index] : nil) else { return false }
            index += 1
        }
        addStatus(VirtioMMIO.driverOK)
        return status & VirtioMMIO.driverOK != 0
    }

    // MARK: Guest memory

    /// `length` bytes of guest RAM from the allocation range, zeroed.
    public func allocate(_ length: UInt64, alignment: UInt64 = 16) -> UInt64 {
        let start = (cursor + alignment - 1) / alignment * alignment
        precondition(start + length <= allocationRange.upperBound, "the mock driver ran out of guest memory")
        cursor = start + length
        try! memory.fill(GuestAddress(start), count: Int(length))
        return start
    }

    /// Copies `bytes` into newly allocated guest RAM; returns its address.
    public func put(_ bytes: [UInt8], alignment: UInt64 = 16) -> UInt64 {
        let address = allocate(UInt64(bytes.count), alignment: alignment)
        try! memory.write(bytes, at: GuestAddress(address))
        return address
    }

    /// `count` bytes of guest RAM at `address`.
    public func bytes(at address: UInt64, count: Int) -> [UInt8] {
        try! memory.read(GuestAddress(address), count: count)
    }

    /// Every byte of guest RAM, region by region (to compare before and after).
    public func ramImage() -> [[UInt8]] {
        memory.regions.map { Array($0.contents) }
    }

    // MARK: Chains

    private func queue(_ index: Int) -> DriverQueue {
        guard let q = queues[index] else { preconditionFailure("queue \(index) was not set up by the mock driver") }
        return q
    }

    /// The layout of queue `index` as set up.
    public func layout(queue index: Int = 0) -> RingLayout { queue(index).layout }
    /// The size of queue `index` as set up.
    public func size(queue index: Int = 0) -> UInt16 { queue(index).size }
    /// How many descriptors of queue `index` are free.
    public func freeDescriptors(queue index: Int = 0) -> Int { queue(index).freeCount }

    /// Adds a chain of `buffers` (in order; a well-formed chain puts the readable ones first) to
    /// queue `index` and publishes it: with `indirect`, one descriptor naming a table that holds
    /// them; otherwise one descriptor each, linked by NEXT. Returns the head, or nil when the queue
    /// has too few free descriptors.
    @discardableResult
    public func add(_ buffers: [Buffer], queue index: Int = 0, indirect: Bool = false) -> UInt16? {
        var q = queue(index)
        let needed = indirect ? 1 : max(buffers.count, 1)
        guard q.free.count >= needed else { return nil }
        let taken = Array(q.free.suffix(needed).reversed())
        q.free.removeLast(needed)
        let head = taken[0]
        q.inFlight[head] = taken
        if indirect {
            let table: UInt64
            if let known = q.indirectTables[head], known.1 >= buffers.count {
                table = known.0
            } else {
                table = allocate(16 * UInt64(max(buffers.count, 1)))
                q.indirectTables[head] = (table, max(buffers.count, 1))
            }
            for (i, b) in buffers.enumerated() {
                let last = i == buffers.count - 1
                writeDescriptor(table: table, UInt16(i), address: b.address, length: b.length,
                                flags: (b.writable ? Self.descWrite : 0) | (last ? 0 : Self.descNext), next: last ? 0 : UInt16(i + 1))
            }
            writeDescriptor(table: q.layout.descriptorTable, head, address: table, length: UInt32(16 * buffers.count),
                            flags: Self.descIndirect, next: 0)
        } else if buffers.isEmpty {
            writeDescriptor(table: q.layout.descriptorTable, head, address: 0, length: 0, flags: 0, next: 0)
        } else {
            for (i, b) in buffers.enumerated() {
                let last = i == buffers.count - 1
                writeDescriptor(table: q.layout.descriptorTable, taken[i], address: b.address, length: b.length,
                                flags: (b.writable ? Self.descWrite : 0) | (last ? 0 : Self.descNext), next: last ? 0 : taken[i + 1])
            }
        }
        queues[index] = q
        publish(head: head, queue: index)
        return head
    }

    /// Writes descriptor `index` of queue `queue`'s table.
    public func writeDescriptor(queue index: Int = 0, _ descriptor: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16) {
        writeDescriptor(table: queue(index).layout.descriptorTable, descriptor, address: address, length: length, flags: flags, next: next)
    }

    /// Writes descriptor `index` of the table at `table` (a queue's or an indirect one).
    public func writeDescriptor(table: UInt64, _ index: UInt16, address: UInt64, length: UInt32, flags: UInt16, next: UInt16) {
        let base = GuestAddress(table + 16 * UInt64(index))
        try! memory.write(address, at: base)
        try! memory.write(length, at: GuestAddress(base.rawValue + 8))
        try! memory.write(flags, at: GuestAddress(base.rawValue + 12))
        try! memory.write(next, at: GuestAddress(base.rawValue + 14))
    }

    /// Makes `head` available: avail.ring[idx % size] ← head, then avail.idx ← idx + 1.
    public func publish(head: UInt16, queue index: Int = 0) {
        var q = queue(index)
        let slot = q.layout.availRing + 4 + 2 * UInt64(q.availIndex % q.size)
        try! memory.write(head, at: GuestAddress(slot))
        q.availIndex &+= 1
        queues[index] = q
        try! memory.write(q.availIndex, at: GuestAddress(q.layout.availRing + 2))
    }

    /// Writes avail.ring[`slot`] without publishing it.
    public func setAvailEntry(_ slot: UInt16, head: UInt16, queue index: Int = 0) {
        let q = queue(index)
        try! memory.write(head, at: GuestAddress(q.layout.availRing + 4 + 2 * UInt64(slot % q.size)))
    }

    /// avail.idx ← `value` (and the driver's own count with it).
    public func setAvailIndex(_ value: UInt16, queue index: Int = 0) {
        var q = queue(index)
        q.availIndex = value
        queues[index] = q
        try! memory.write(value, at: GuestAddress(q.layout.availRing + 2))
    }

    /// avail.flags ← `flags` (VIRTQ_AVAIL_F_NO_INTERRUPT: `availNoInterrupt`).
    public func setAvailFlags(_ flags: UInt16, queue index: Int = 0) {
        try! memory.write(flags, at: GuestAddress(queue(index).layout.availRing))
    }

    /// avail.used_event ← `value` (EVENT_IDX: interrupt when the device uses entry `value`).
    public func setUsedEvent(_ value: UInt16, queue index: Int = 0) {
        let q = queue(index)
        try! memory.write(value, at: GuestAddress(q.layout.availRing + 4 + 2 * UInt64(q.size)))
    }

    /// used.idx as the device left it.
    public func usedIndex(queue index: Int = 0) -> UInt16 {
        try! memory.read(UInt16.self, at: GuestAddress(queue(index).layout.usedRing + 2))
    }

    /// used.flags as the device left it.
    public func usedFlags(queue index: Int = 0) -> UInt16 {
        try! memory.read(UInt16.self, at: GuestAddress(queue(index).layout.usedRing))
    }

    /// used.avail_event (EVENT_IDX: the avail index the device wants a kick for).
    public func availEvent(queue index: Int = 0) -> UInt16 {
        let q = queue(index)
        return try! memory.read(UInt16.self, at: GuestAddress(q.layout.usedRing + 4 + 8 * UInt64(q.size)))
    }

    /// used.ring[`slot` % size].
    public func usedEntry(_ slot: UInt16, queue index: Int = 0) -> UsedElement {
        let q = queue(index)
        let base = q.layout.usedRing + 4 + 8 * UInt64(slot % q.size)
        return UsedElement(id: try! memory.read(UInt32.self, at: GuestAddress(base)),
                           length: try! memory.read(UInt32.self, at: GuestAddress(base + 4)))
    }

    /// The used entries the device added since the last call, in order; their chains' descriptors
    /// become free again.
    public func collectUsed(queue index: Int = 0) -> [UsedElement] {
        var q = queue(index)
        let end = usedIndex(queue: index)
        var entries: [UsedElement] = []
        while q.lastUsed != end {
            let e = usedEntry(q.lastUsed, queue: index)
            entries.append(e)
            if e.id <= UInt32(UInt16.max), let chain = q.inFlight.removeValue(forKey: UInt16(e.id)) { q.free += chain }
            q.lastUsed &+= 1
        }
        queues[index] = q
        return entries
    }

    /// QueueNotify ← `index` (what a guest's kick is).
    public func kick(queue index: Int = 0) {
        write32(Self.queueNotify, UInt32(truncatingIfNeeded: index))
    }

    /// Kicks queue `index` and serves it until the device has nothing left (the device thread's
    /// work, done here synchronously).
    public func process(queue index: Int = 0) {
        kick(queue: index)
        while device.serve(queue: index) {}
    }

    /// Adds `buffers`, processes the queue and returns the used entries that came back.
    public func request(_ buffers: [Buffer], queue index: Int = 0, indirect: Bool = false) -> [UsedElement] {
        add(buffers, queue: index, indirect: indirect)
        process(queue: index)
        return collectUsed(queue: index)
    }
}

/// A `BlockStore` over an array, for tests: it can be read-only, offer discard, fail every I/O,
/// and it counts flushes and records discards and write-zeroes. `onIO` runs before each operation
/// (outside the store's lock), so a test can act in the middle of a request.
public final class MemoryBlockStore: BlockStore {
    private struct State {
        var bytes: [UInt8]
        var failing = false
        var flushes = 0
        var discards: [Range<UInt64>] = []
        var zeroed: [(range: Range<UInt64>, unmap: Bool)] = []
        var onIO: (@Sendable (String) -> Void)?
    }
    private let state: Mutex<State>
    public let size: UInt64
    public let readOnly: Bool
    public let canDiscard: Bool

    /// A store of `bytes` (default: `size` bytes where byte i is `i % 251`).
    public init(size: Int = 64 << 10, bytes: [UInt8]? = nil, readOnly: Bool = false, canDiscard: Bool = false) {
        let content = bytes ?? (0..<size).map { UInt8($0 % 251) }
        state = Mutex(State(bytes: content))
        self.size = UInt64(content.count)
        self.readOnly = readOnly
        self.canDiscard = canDiscard
    }

    /// The store's content.
    public var bytes: [UInt8] {
        get { state.withLock { $0.bytes } }
        set { state.withLock { $0.bytes = newValue } }
    }
    /// While true every operation fails (the host's I/O error).
    public var failing: Bool {
        get { state.withLock { $0.failing } }
        set { state.withLock { $0.failing = newValue } }
    }
    /// How many flushes succeeded.
    public var flushCount: Int { state.withLock { $0.flushes } }
    /// Byte ranges discarded, in order.
    public var discards: [Range<UInt64>] { state.withLock { $0.discards } }
    /// Byte ranges zeroed, in order, with their unmap flag.
    public var zeroed: [(range: Range<UInt64>, unmap: Bool)] { state.withLock { $0.zeroed } }
    /// Runs before every operation with its name ("read", "write", "flush", "discard", "writeZeroes").
    public var onIO: (@Sendable (String) -> Void)? {
        get { state.withLock { $0.onIO } }
        set { state.withLock { $0.onIO = newValue } }
    }

    private func begin(_ what: String) -> Bool {
        state.withLock { $0.onIO }?(what)
        return !state.withLock { $0.failing }
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        guard begin("read") else { return false }
        return state.withLock { s in
            guard offset <= UInt64(s.bytes.count), UInt64(buffer.count) <= UInt64(s.bytes.count) - offset else { return false }
            s.bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<(Int(offset) + buffer.count)])) }
            return true
        }
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
        guard begin("write") else { return false }
        return state.withLock { s in
            guard !readOnly, offset <= UInt64(s.bytes.count), UInt64(bytes.count) <= UInt64(s.bytes.count) - offset else { return false }
            s.bytes.replaceSubrange(Int(offset)..<(Int(offset) + bytes.count), with: bytes)
            return true
        }
    }

    public func flush() -> Bool {
        guard begin("flush") else { return false }
        state.withLock { $0.flushes += 1 }
        return true
    }

    public func discard(offset: UInt64, length: UInt64) -> Bool {
        guard begin("discard") else { return false }
        return state.withLock { s in
            guard offset <= UInt64(s.bytes.count), length <= UInt64(s.bytes.count) - offset else { return false }
            s.discards.append(offset..<(offset + length))
            for i in Int(offset)..<Int(offset + length) { s.bytes[i] = 0 }
            return true
        }
    }

    public func writeZeroes(offset: UInt64, length: UInt64, unmap: Bool) -> Bool {
        guard begin("writeZeroes") else { return false }
        return state.withLock { s in
            guard offset <= UInt64(s.bytes.count), length <= UInt64(s.bytes.count) - offset else { return false }
            s.zeroed.append((offset..<(offset + length), unmap))
            for i in Int(offset)..<Int(offset + length) { s.bytes[i] = 0 }
            return true
        }
    }
}

/// An `EntropySource` that fills every buffer with `pattern` repeated from its first byte.
public struct PatternEntropy: EntropySource {
    public let pattern: [UInt8]
    public init(_ pattern: [UInt8] = [0x5A, 0xC3, 0x0F, 0x96, 0x11]) {
        precondition(!pattern.isEmpty)
        self.pattern = pattern
    }
    public func fill(_ buffer: UnsafeMutableRawBufferPointer) {
        for i in buffer.indices { buffer[i] = pattern[i % pattern.count] }
    }
    /// What `fill` puts into `count` bytes.
    public func expected(_ count: Int) -> [UInt8] { (0..<count).map { pattern[$0 % pattern.count] } }
}
