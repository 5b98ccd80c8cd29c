import ACPI
import DeviceTree
import Devices
import Synchronization
import VMMCore
import WireFormat

/// What a virtio device type adds to the transport: its ID, features, queues, configuration space,
/// and how it serves one descriptor chain. The model does its host I/O through a protocol of its own
/// (a block store, an entropy source), always on the thread that serves its queues, never on a vCPU.
public protocol VirtioDeviceModel: AnyObject, Sendable {
    /// The virtio device ID (1 net, 2 block, 3 console, 4 entropy).
    var deviceType: UInt32 { get }
    /// "blk", "rng": in section names, thread names and logs.
    var kind: String { get }
    /// The features it offers (VIRTIO_F_VERSION_1 is added by the transport).
    var features: UInt64 { get }
    /// Each queue's largest size (QueueNumMax).
    var queueSizes: [UInt16] { get }
    /// Reads the configuration space at `offset` (1, 2, 4 or 8 bytes; beyond its end reads 0).
    func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer)
    /// Serves one chain of queue `queue`; returns the bytes it wrote into the chain's writable buffers.
    func serve(queue: Int, chain: DescriptorChain, memory: GuestMemory) -> UInt32
    /// Called on the transport's reset, with its lock held: drops per-driver state.
    func reset()
    /// The configuration space as the guest reads it (a snapshot records it: a restore must give
    /// the guest the same device, e.g. a drive of the same size and mode).
    var configSpace: [UInt8] { get }
    /// Whether queue `queue` has something to do with a chain now (a receive queue without data
    /// to deliver leaves the guest's buffers where they are).
    func hasWork(queue: Int) -> Bool
    /// Why a snapshot's configuration space (`configSpace` as saved) cannot be this device's (nil:
    /// it can); by default it must be the same bytes.
    func savedConfigProblem(_ saved: [UInt8]) -> String?
    /// Takes over what the guest already knows from the saved configuration (a MAC address).
    func adoptSavedConfig(_ saved: [UInt8])
}

extension VirtioDeviceModel {
    public func reset() {}
    public var configSpace: [UInt8] { [] }
    public func hasWork(queue: Int) -> Bool { true }
    public func savedConfigProblem(_ saved: [UInt8]) -> String? {
        saved == configSpace ? nil : "the device's configuration differs from the snapshot's"
    }
    public func adoptSavedConfig(_ saved: [UInt8]) {}
}

/// Feature bits the transport knows.
public enum VirtioFeature {
    public static let indirectDescriptors: UInt64 = 1 << 28
    public static let eventIndex: UInt64 = 1 << 29
    public static let version1: UInt64 = 1 << 32
}

/// A virtio device behind the virtio-mmio transport, version 2 ("modern"; virtio 1.2, 4.2): the
/// register window the guest programs, the feature and status handshake, the queues' set-up, the
/// interrupt status, and the device's state for snapshots. It finds the guest through an ACPI
/// `LNRO0005` device with the window and an edge-triggered, active-high interrupt (what Linux's
/// virtio_mmio module binds to on x86).
///
/// Threads: vCPUs read and write registers (taking the lock briefly, never waiting for I/O); one
/// thread per device (the machine's) serves the queues with `serve(queue:)` when the guest's
/// QueueNotify kicks it, does the model's I/O outside the lock, and publishes each used entry under
/// the lock only if the queue was not reset meanwhile.
public final class VirtioMMIO: Sendable {
    public struct Placement: Sendable {
        public var base: UInt64
        public var gsi: UInt32
        /// The device's index among the machine's virtio devices (its `_UID` and `VRnn` name).
        public var index: Int
        public init(base: UInt64, gsi: UInt32, index: Int) {
            self.base = base
            self.gsi = gsi
            self.index = index
        }
    }

    /// How the device reaches the rest of the machine.
    public struct Wiring: Sendable {
        /// Raises the device's interrupt (an edge on its GSI).
        public var interrupt: @Sendable () -> Void
        /// Wakes the thread serving queue N (QueueNotify when no ioeventfd took the write).
        public var notify: @Sendable (Int) -> Void
        /// A one-line complaint about the driver (a broken queue, a refused status).
        public var log: @Sendable (String) -> Void
        public init(interrupt: @escaping @Sendable () -> Void, notify: @escaping @Sendable (Int) -> Void,
                    log: @escaping @Sendable (String) -> Void = { _ in }) {
            self.interrupt = interrupt
            self.notify = notify
            self.log = log
        }
    }

    public static let windowSize: UInt64 = 0x200
    public static let magic: UInt32 = 0x7472_6976
    /// "SVMM" (the vendor ID is free-form; Linux ignores it).
    public static let vendorID: UInt32 = 0x4D4D_5653
    /// The QueueNotify register's offset (where an ioeventfd can take the guest's kicks).
    public static let queueNotifyOffset: UInt64 = 0x050

    // Status bits.
    public static let acknowledge: UInt32 = 1, driver: UInt32 = 2, driverOK: UInt32 = 4, featuresOK: UInt32 = 8
    public static let needsReset: UInt32 = 0x40, failed: UInt32 = 0x80
    static let interruptUsedBuffer: UInt32 = 1, interruptConfig: UInt32 = 2

    public let model: any VirtioDeviceModel
    public let placement: Placement
    let memory: GuestMemory
    let wiring: Wiring
    let offered: UInt64
    private let state: Mutex<State>

    /// The transport's registers and the queues: a snapshot's payload, field by field.
    public struct State: Equatable, Sendable {
        public static let version: UInt16 = 1
        public var status: UInt32 = 0
        public var deviceFeaturesSel: UInt32 = 0
        public var driverFeaturesSel: UInt32 = 0
        public var driverFeatures: UInt64 = 0
        public var queueSel: UInt32 = 0
        public var interruptStatus: UInt32 = 0
        public var configGeneration: UInt32 = 0
        public var queues: [VirtQueue]
        /// What the device offers and its configuration space: saved so that a restore can check
        /// it gives the guest the same device (not restored: they come from the device).
        public var offeredFeatures: UInt64 = 0
        public var deviceConfig: [UInt8] = []
        /// Per queue, bumped by a device reset and by the queue's stop (not saved): a chain served
        /// across one is not published (a stop of another queue leaves it alone).
        var epochs: [UInt64]

        init(queueSizes: [UInt16]) {
            queues = queueSizes.map { VirtQueue(maxSize: $0) }
            epochs = queueSizes.map { _ in 0 }
        }

        public static func == (a: State, b: State) -> Bool {
            a.status == b.status && a.deviceFeaturesSel == b.deviceFeaturesSel && a.driverFeaturesSel == b.driverFeaturesSel
                && a.driverFeatures == b.driverFeatures && a.queueSel == b.queueSel && a.interruptStatus == b.interruptStatus
                && a.configGeneration == b.configGeneration && a.queues == b.queues
                && a.offeredFeatures == b.offeredFeatures && a.deviceConfig == b.deviceConfig
        }
    }

    public init(model: any VirtioDeviceModel, memory: GuestMemory, placement: Placement, wiring: Wiring) {
        self.model = model
        self.memory = memory
        self.placement = placement
        self.wiring = wiring
        offered = model.features | VirtioFeature.version1
        state = Mutex(State(queueSizes: model.queueSizes))
        state.withLock {
            $0.offeredFeatures = offered
            $0.deviceConfig = model.configSpace
        }
    }

    /// "virtio-blk0" style name: the bus map's, the thread's and the logs'.
    public var name: String { "virtio-\(model.kind)\(placement.index)" }

    public func saveState() -> State {
        let config = model.configSpace
        return state.withLock { s in
            s.deviceConfig = config
            return s
        }
    }

    /// Whether the driver has the device running (DRIVER_OK, not needing a reset).
    public var isRunning: Bool {
        state.withLock { $0.status & Self.driverOK != 0 && $0.status & Self.needsReset == 0 }
    }

    // MARK: Serving the queues (the device's thread)

    /// Serves every chain queue `index` has available, up to `budget` of them; returns whether
    /// chains may remain (the budget ran out), so the caller comes back after checking whether it
    /// should stop. Raises the interrupt if the driver wants one for what was used.
    @discardableResult
    public func serve(queue index: Int, budget: Int = 256) -> Bool {
        guard let (start, epoch) = state.withLock({ s -> (VirtQueue, UInt64)? in
            guard index >= 0, index < s.queues.count, s.status & Self.driverOK != 0, s.status & Self.needsReset == 0,
                  s.queues[index].ready else { return nil }
            return (s.queues[index], s.epochs[index])
        }) else { return false }
        var queue = start
        var interrupt = false
        var served = 0
        defer {
            if interrupt {
                state.withLock { $0.interruptStatus |= Self.interruptUsedBuffer }
                wiring.interrupt()
            }
        }
        while served < budget, model.hasWork(queue: index) {
            let chain: DescriptorChain?
            do {
                chain = try queue.pop(memory)
                if chain == nil {
                    // Ask for the next kick, then look once more: the driver may have added one
                    // before it saw the request.
                    try queue.requestNotification(memory)
                    if try queue.pending(in: memory) == 0 { return false }
                    continue
                }
            } catch {
                fail(queue: index, epoch: epoch, error)
                return false
            }
            guard let chain else { continue }
            let written = model.serve(queue: index, chain: chain, memory: memory)
            served += 1
            let published: Result<Bool, VirtQueueError>? = state.withLock { s in
                guard s.epochs[index] == epoch, s.queues[index].ready else { return nil }
                s.queues[index].nextAvail = queue.nextAvail
                do throws(VirtQueueError) {
                    let wants = try s.queues[index].push(head: chain.head, written: written, memory)
                    queue = s.queues[index]
                    return .success(wants)
                } catch {
                    return .failure(error)
                }
            }
            switch published {
            case nil: return false      // reset or stopped while the chain was served: dropped
            case .success(let wants)?: interrupt = interrupt || wants
            case .failure(let error)?:
                fail(queue: index, epoch: epoch, error)
                return false
            }
        }
        // The budget ran out (chains may remain), or the model has nothing more for the queue.
        return served >= budget
    }

    /// The device's configuration changed (a link went down): a new ConfigGeneration and a
    /// configuration-change interrupt.
    public func configChanged() {
        state.withLock {
            $0.configGeneration &+= 1
            $0.interruptStatus |= Self.interruptConfig
            $0.deviceConfig = model.configSpace
        }
        wiring.interrupt()
    }

    /// Wakes the thread that serves queue `index` (the device has something for it, e.g. input).
    public func kick(queue index: Int) { wiring.notify(index) }

    /// Puts the device into DEVICE_NEEDS_RESET (a config-change interrupt tells the driver) because
    /// queue `index` broke a rule.
    private func fail(queue index: Int, epoch: UInt64, _ error: VirtQueueError) {
        let changed = state.withLock { s -> Bool in
            guard s.epochs[index] == epoch, s.status & Self.needsReset == 0 else { return false }
            s.status |= Self.needsReset
            s.interruptStatus |= Self.interruptConfig
            return true
        }
        guard changed else { return }
        wiring.log("\(name): queue \(index): \(error.message); the device needs a reset")
        wiring.interrupt()
    }

    // MARK: Registers (vCPU threads)

    func readRegister(_ offset: UInt64) -> UInt32 {
        state.withLock { s in
            switch offset {
            case 0x000: return Self.magic
            case 0x004: return 2
            case 0x008: return model.deviceType
            case 0x00C: return Self.vendorID
            case 0x010:
                switch s.deviceFeaturesSel {
                case 0: return UInt32(truncatingIfNeeded: offered)
                case 1: return UInt32(truncatingIfNeeded: offered >> 32)
                default: return 0
                }
            case 0x034: return selectedQueue(s).map { UInt32($0.maxSize) } ?? 0
            case 0x044: return selectedQueue(s).map { $0.ready ? 1 : 0 } ?? 0
            case 0x060: return s.interruptStatus
            case 0x070: return s.status
            case 0x0B0, 0x0B4: return 0xFFFF_FFFF  // no shared-memory regions
            case 0x0FC: return s.configGeneration
            default: return 0
            }
        }
    }

    private func selectedQueue(_ s: State) -> VirtQueue? {
        Int(s.queueSel) < s.queues.count ? s.queues[Int(s.queueSel)] : nil
    }

    func writeRegister(_ offset: UInt64, _ value: UInt32) {
        var notifyQueue: Int?
        var raise = false
        var complaint: String?
        state.withLock { s in
            let q = Int(s.queueSel)
            let queueWritable = q < s.queues.count && !s.queues[q].ready
            switch offset {
            case 0x014: s.deviceFeaturesSel = value
            case 0x020:
                // Features are fixed once FEATURES_OK is set.
                guard s.status & Self.featuresOK == 0 else { return }
                switch s.driverFeaturesSel {
                case 0: s.driverFeatures = (s.driverFeatures & ~0xFFFF_FFFF) | UInt64(value)
                case 1: s.driverFeatures = (s.driverFeatures & 0xFFFF_FFFF) | (UInt64(value) << 32)
                default: break
                }
            case 0x024: s.driverFeaturesSel = value
            case 0x030: s.queueSel = value
            case 0x038:
                // A size above QueueNumMax is ignored (the driver must not write one; QEMU ignores it
                // too): the state never holds one, so every state a guest can reach saves and
                // restores (the restore refuses such a size). Other bad sizes wait for QueueReady.
                if queueWritable, value <= UInt32(s.queues[q].maxSize) { s.queues[q].size = UInt16(value) }
            case 0x044: complaint = setQueueReady(&s, queue: q, value != 0, raise: &raise)
            case 0x050: notifyQueue = Int(value)
            case 0x064: s.interruptStatus &= ~value
            case 0x070: complaint = setStatus(&s, value, raise: &raise)
            case 0x080: if queueWritable { s.queues[q].descriptorTable = low(s.queues[q].descriptorTable, value) }
            case 0x084: if queueWritable { s.queues[q].descriptorTable = high(s.queues[q].descriptorTable, value) }
            case 0x090: if queueWritable { s.queues[q].availRing = low(s.queues[q].availRing, value) }
            case 0x094: if queueWritable { s.queues[q].availRing = high(s.queues[q].availRing, value) }
            case 0x0A0: if queueWritable { s.queues[q].usedRing = low(s.queues[q].usedRing, value) }
            case 0x0A4: if queueWritable { s.queues[q].usedRing = high(s.queues[q].usedRing, value) }
            default: break
            }
        }
        if let complaint { wiring.log("\(name): \(complaint)") }
        if raise { wiring.interrupt() }
        if let notifyQueue, notifyQueue >= 0, notifyQueue < model.queueSizes.count { wiring.notify(notifyQueue) }
    }

    private func low(_ old: UInt64, _ value: UInt32) -> UInt64 { (old & ~0xFFFF_FFFF) | UInt64(value) }
    private func high(_ old: UInt64, _ value: UInt32) -> UInt64 { (old & 0xFFFF_FFFF) | (UInt64(value) << 32) }

    private func setQueueReady(_ s: inout State, queue q: Int, _ ready: Bool, raise: inout Bool) -> String? {
        guard q < s.queues.count else { return nil }
        guard ready else {
            if s.queues[q].ready { s.epochs[q] &+= 1 }
            // Stopping keeps the addresses the driver wrote (it reads QueueReady back as 0).
            s.queues[q].ready = false
            return nil
        }
        guard !s.queues[q].ready else { return nil }
        if let problem = s.queues[q].problem(in: memory) {
            s.status |= Self.needsReset
            s.interruptStatus |= Self.interruptConfig
            raise = true
            return "queue \(q): \(problem); the device needs a reset"
        }
        s.queues[q].eventIndex = s.driverFeatures & VirtioFeature.eventIndex != 0
        s.queues[q].nextAvail = 0
        s.queues[q].nextUsed = 0
        s.queues[q].ready = true
        return nil
    }

    private func setStatus(_ s: inout State, _ value: UInt32, raise: inout Bool) -> String? {
        if value == 0 {
            reset(&s)
            return nil
        }
        // The driver only ever adds bits (a read-modify-write); anything else is ignored.
        guard value & s.status == s.status else { return "status 0x\(String(value, radix: 16)) clears bits of 0x\(String(s.status, radix: 16)); ignored" }
        var new = value & (Self.acknowledge | Self.driver | Self.driverOK | Self.featuresOK | Self.failed) | (s.status & Self.needsReset)
        if new & Self.featuresOK != 0 && s.status & Self.featuresOK == 0 {
            let unknown = s.driverFeatures & ~offered
            if unknown != 0 || s.driverFeatures & VirtioFeature.version1 == 0 {
                new &= ~Self.featuresOK  // the driver reads FEATURES_OK back as clear: "device refuses features"
            }
        }
        if new & Self.driverOK != 0 && new & Self.featuresOK == 0 {
            new &= ~Self.driverOK
        }
        if new & Self.driverOK != 0 && s.status & Self.driverOK == 0 {
            // The features are final: every queue follows them (a queue made ready before
            // FEATURES_OK, out of order, too).
            let eventIndex = s.driverFeatures & VirtioFeature.eventIndex != 0
            for q in s.queues.indices { s.queues[q].eventIndex = eventIndex }
        }
        s.status = new
        return nil
    }

    private func reset(_ s: inout State) {
        let epochs = s.epochs
        s = State(queueSizes: model.queueSizes)
        s.epochs = epochs.map { $0 &+ 1 }
        s.offeredFeatures = offered
        s.deviceConfig = model.configSpace
        model.reset()
    }
}

extension VirtioMMIO: BusDevice {
    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        if offset >= 0x100 {
            for i in data.indices { data[i] = 0 }
            model.readConfig(offset: Int(offset - 0x100), into: data)
            return
        }
        // Registers are 32-bit and aligned; any other access reads as 0.
        guard data.count == 4, offset % 4 == 0 else {
            for i in data.indices { data[i] = 0 }
            return
        }
        data.storeBytes(of: readRegister(offset).littleEndian, as: UInt32.self)
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        // The configuration spaces of blk and rng are read-only to the driver (writeback is not offered).
        guard offset < 0x100, data.count == 4, offset % 4 == 0 else { return }
        writeRegister(offset, UInt32(littleEndian: data.loadUnaligned(as: UInt32.self)))
    }
}

extension VirtioMMIO: PlatformDevice {
    public var busRegions: [BusRegion] { [.mmio(name, placement.base, Self.windowSize, self)] }

    public var snapshotSection: (name: String, device: any SnapshotDevice)? { ("dev.\(name)", self) }

    /// `Device (VRnn)` with `_HID "LNRO0005"`, its window and its edge-triggered, active-high,
    /// exclusive interrupt (an Extended Interrupt descriptor, whose trigger Linux takes as it is).
    public var dsdtAML: [AML] {
        [.device(String(format2: placement.index), [
            .name("_HID", .string("LNRO0005")),
            .name("_UID", .integer(UInt64(placement.index))),
            .name("_CCA", .integer(1)),
            .name("_CRS", .resourceTemplate([
                AML.Resource.memory32Fixed(writable: true, base: UInt32(placement.base), length: UInt32(Self.windowSize)),
                AML.Resource.interrupt(levelTriggered: false, activeLow: false, shared: false, [placement.gsi]),
            ])),
        ])]
    }

    /// `virtio,mmio` with its window and its edge-triggered interrupt; DMA coherent (`_CCA` 1 in the DSDT).
    public var deviceTreeNodes: [DeviceTreeNode] {
        [DeviceTreeNode("virtio", properties: [
            .compatible("virtio,mmio"), .reg(.memory(placement.base, Self.windowSize)), .interrupts(.edge(placement.gsi)),
            .flag("dma-coherent"),
        ])]
    }

    /// An interrupt the guest had not acknowledged when the snapshot was taken is raised again.
    public func afterRestore() {
        let (pending, running) = state.withLock { ($0.interruptStatus != 0, $0.status & Self.driverOK != 0) }
        if pending { wiring.interrupt() }
        if running { for q in model.queueSizes.indices { wiring.notify(q) } }
    }
}

extension String {
    /// "VR00"... "VR99": an ACPI name for virtio device `n`.
    init(format2 n: Int) {
        let d = n % 100
        self = "VR" + String(d / 10) + String(d % 10)
    }
}

extension VirtioMMIO: SnapshotDevice {
    public static let snapshotName = "virtio"
    public static let snapshotVersion = State.version
    public static let oldestSnapshotVersion: UInt16 = 1

    public func saveSnapshot() -> [UInt8] {
        var s = saveState()
        var w = LEWriter(capacity: 64 + 48 * s.queues.count)
        w.encode { c throws(LEDecodeError) in try s.code(&c) }
        return w.bytes
    }

    /// Validates the saved transport against this device (its queues) and guest memory (every
    /// running queue's rings in RAM, used.idx in memory as the device left it, avail.idx at most a
    /// queue ahead) before anything changes.
    public func restoreSnapshot(_ payload: [UInt8], version: UInt16) throws(LEDecodeError) {
        let sizes = model.queueSizes
        var s = try Self.decodeSnapshot(payload, version: version) { r, _ throws(LEDecodeError) in
            var s = State(queueSizes: sizes)
            try r.decode { c throws(LEDecodeError) in try s.code(&c) }
            return s
        }
        let field = "\(name)"
        guard s.queues.count == sizes.count else {
            throw .invalid(field: "\(field).queues", reason: "\(s.queues.count) queues saved, this device has \(sizes.count)")
        }
        guard s.status & ~(Self.acknowledge | Self.driver | Self.driverOK | Self.featuresOK | Self.needsReset | Self.failed) == 0 else {
            throw .invalid(field: "\(field).status", reason: "unknown bits in 0x\(String(s.status, radix: 16))")
        }
        guard s.offeredFeatures == offered else {
            throw .invalid(field: "\(field).device", reason: model.deviceType == 2
                ? "the drive differs from the snapshot's (read-only against writable, or discard support): give the same kind of drive"
                : "the device offers other features than the snapshot's")
        }
        if let problem = model.savedConfigProblem(s.deviceConfig) {
            throw .invalid(field: "\(field).device", reason: model.deviceType == 2
                ? "the drive differs from the snapshot's (its size): give a drive of the same size"
                : problem)
        }
        guard s.driverFeatures & ~offered == 0 else {
            throw .invalid(field: "\(field).driverFeatures", reason: "0x\(String(s.driverFeatures, radix: 16)) has features this device does not offer")
        }
        let running = s.status & Self.driverOK != 0 && s.status & Self.needsReset == 0
        for (i, q) in s.queues.enumerated() {
            guard q.size <= q.maxSize else { throw .invalid(field: "\(field).queue[\(i)].size", reason: "\(q.size) exceeds \(q.maxSize)") }
            guard q.ready else { continue }
            if let problem = q.problem(in: memory) { throw .invalid(field: "\(field).queue[\(i)]", reason: problem) }
            guard running else { continue }
            // From DRIVER_OK on, every ready queue follows the negotiated features (before it, the
            // flag waits for DRIVER_OK to be set from them).
            guard q.eventIndex == (s.driverFeatures & VirtioFeature.eventIndex != 0) else {
                throw .invalid(field: "\(field).queue[\(i)].eventIndex", reason: "does not match the driver's features")
            }
            let usedIndex = (try? memory.read(UInt16.self, at: GuestAddress(q.usedRing + 2))) ?? 0
            guard usedIndex == q.nextUsed else {
                throw .invalid(field: "\(field).queue[\(i)].nextUsed", reason: "\(q.nextUsed), but used.idx in guest memory is \(usedIndex)")
            }
            do { _ = try q.pending(in: memory) } catch {
                throw .invalid(field: "\(field).queue[\(i)].nextAvail", reason: error.message)
            }
        }
        model.adoptSavedConfig(s.deviceConfig)
        state.withLock { current in
            s.epochs = current.epochs.map { $0 &+ 1 }
            current = s
        }
    }
}

extension VirtioMMIO.State {
    /// The payload: the transport registers, then per queue its set-up and the device's indexes.
    public mutating func code<C: LECoder>(_ c: inout C) throws(LEDecodeError) {
        try c.u32(&status, "virtio.status")
        try c.u32(&deviceFeaturesSel, "virtio.deviceFeaturesSel")
        try c.u32(&driverFeaturesSel, "virtio.driverFeaturesSel")
        try c.u64(&driverFeatures, "virtio.driverFeatures")
        try c.u32(&queueSel, "virtio.queueSel")
        try c.u32(&interruptStatus, "virtio.interruptStatus")
        try c.require(interruptStatus & ~3 == 0, "virtio.interruptStatus", "unknown bits in \(interruptStatus)")
        try c.u32(&configGeneration, "virtio.configGeneration")
        var count = queues.count
        try c.count(&count, limit: 64, minimumItemSize: 31, "virtio.queues count")
        try c.require(count == queues.count, "virtio.queues count", "\(count) queues, the device has \(queues.count)")
        for i in queues.indices {
            try c.u16(&queues[i].size, "virtio.queue[\(i)].size")
            try c.bool(&queues[i].ready, "virtio.queue[\(i)].ready")
            try c.bool(&queues[i].eventIndex, "virtio.queue[\(i)].eventIndex")
            try c.u64(&queues[i].descriptorTable, "virtio.queue[\(i)].descriptorTable")
            try c.u64(&queues[i].availRing, "virtio.queue[\(i)].availRing")
            try c.u64(&queues[i].usedRing, "virtio.queue[\(i)].usedRing")
            try c.u16(&queues[i].nextAvail, "virtio.queue[\(i)].nextAvail")
            try c.u16(&queues[i].nextUsed, "virtio.queue[\(i)].nextUsed")
        }
        try c.u64(&offeredFeatures, "virtio.offeredFeatures")
        try c.blob(&deviceConfig, limit: 256, "virtio.deviceConfig")
    }
}
