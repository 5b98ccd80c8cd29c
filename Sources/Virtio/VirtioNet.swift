import Synchronization
import VMMCore

/// Where a virtio-net device's frames go and come from (a tap device in the machine, a fake in
/// tests). Ethernet frames without any header of the host's: no offload is offered to the guest,
/// so none has to be passed through.
public protocol NetBackend: AnyObject, Sendable {
    /// Reads one waiting frame into `buffer` without blocking; nil when none waits.
    func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int?
    /// Sends one frame; false when the host dropped it.
    func send(_ frame: UnsafeRawBufferPointer) -> Bool
    /// A descriptor that polls readable when a frame waits (the tap's), for the device's thread.
    var readinessDescriptor: Int32 { get }
    /// "tap0": for query-rx-filter and logs.
    var name: String { get }
    /// False once the host side failed for good (the tap went away): the device's thread then
    /// stops watching it.
    var isUsable: Bool { get }
}

extension NetBackend {
    public var isUsable: Bool { true }
}

/// virtio-net (device ID 1, virtio 1.2, 5.1): a receive and a transmit queue, a MAC address and a
/// link status the host can change (QMP `set_link`). No checksum or segmentation offloads.
///
/// A frame from the host waits in the device until the guest has a receive buffer for it (the
/// device's thread stops watching the host side meanwhile); a frame larger than the buffer is
/// dropped and counted. With the link down, frames in both directions are dropped.
public final class VirtioNet: VirtioDeviceModel {
    public let deviceType: UInt32 = 1
    public let kind = "net"
    public let features: UInt64 = VirtioNet.featureMAC | VirtioNet.featureStatus
        | VirtioFeature.indirectDescriptors | VirtioFeature.eventIndex
    public let queueSizes: [UInt16] = [256, 256]
    public let backend: any NetBackend
    static let featureMAC: UInt64 = 1 << 5, featureStatus: UInt64 = 1 << 16
    /// virtio_net_hdr of VIRTIO_F_VERSION_1 devices (with num_buffers).
    public static let headerSize = 12
    /// The largest frame: 64 KiB plus an Ethernet header, which is what a guest without offloads
    /// never exceeds.
    public static let maxFrame = 65536 + 14
    static let receiveQueue = 0

    private struct State {
        var mac: [UInt8]
        var linkUp = true
        var pending: [UInt8]?
        var received = 0, sent = 0, dropped = 0
    }
    private let state: Mutex<State>
    /// Where a frame from the host is read before it is known to have a buffer (reused: only the
    /// device's thread reads).
    private let scratch = Mutex([UInt8](repeating: 0, count: VirtioNet.maxFrame))

    public init(backend: any NetBackend, mac: [UInt8]) {
        precondition(mac.count == 6)
        self.backend = backend
        state = Mutex(State(mac: mac))
    }

    public var mac: [UInt8] { state.withLock { $0.mac } }
    public var linkUp: Bool { state.withLock { $0.linkUp } }
    /// Frames received for the guest, sent by it, and dropped (no room, link down, host refused).
    public var counters: (received: Int, sent: Int, dropped: Int) { state.withLock { ($0.received, $0.sent, $0.dropped) } }

    /// mac[6], status (VIRTIO_NET_S_LINK_UP), max_virtqueue_pairs, mtu.
    public var configSpace: [UInt8] {
        state.withLock { s in s.mac + [s.linkUp ? 1 : 0, 0, 0, 0, 0, 0] }
    }

    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        let config = configSpace
        for i in data.indices where offset + i < config.count { data[i] = config[offset + i] }
    }

    public func savedConfigProblem(_ saved: [UInt8]) -> String? {
        saved.count == 12 && saved[6] <= 1 ? nil : "the saved network configuration is not 12 bytes with a link status of 0 or 1"
    }

    /// The guest keeps the MAC address it booted with, and the link as it was.
    public func adoptSavedConfig(_ saved: [UInt8]) {
        guard savedConfigProblem(saved) == nil else { return }
        state.withLock {
            $0.mac = Array(saved[0..<6])
            $0.linkUp = saved[6] == 1
        }
    }

    /// Sets the link; returns whether it changed (the transport then tells the guest).
    public func setLink(up: Bool) -> Bool {
        state.withLock { s in
            defer { s.linkUp = up }
            return s.linkUp != up
        }
    }

    /// Whether a frame from the host waits for a receive buffer.
    public var holdsFrame: Bool { state.withLock { $0.pending != nil } }

    public func hasWork(queue: Int) -> Bool {
        guard queue == Self.receiveQueue else { return true }
        if holdsFrame { return true }
        guard backend.isUsable, let frame = scratch.withLock({ buffer -> [UInt8]? in
            guard let n = buffer.withUnsafeMutableBytes({ backend.receive(into: $0) }) else { return nil }
            return Array(buffer[..<n])
        }) else { return false }
        return state.withLock { s in
            guard s.linkUp else {
                s.dropped += 1
                return false
            }
            s.pending = frame
            return true
        }
    }

    public func serve(queue: Int, chain: DescriptorChain, memory: GuestMemory) -> UInt32 {
        if queue == Self.receiveQueue {
            guard let frame = state.withLock({ s -> [UInt8]? in defer { s.pending = nil }; return s.pending }) else { return 0 }
            guard chain.writableLength >= UInt64(Self.headerSize + frame.count) else {
                state.withLock { $0.dropped += 1 }
                return 0
            }
            var header = [UInt8](repeating: 0, count: Self.headerSize)
            header[10] = 1      // num_buffers
            var written = header.withUnsafeBytes { memory.scatter(chain, from: $0) }
            written += frame.withUnsafeBytes { memory.scatter(chain, skip: UInt64(Self.headerSize), from: $0) }
            state.withLock { $0.received += 1 }
            return UInt32(written)
        }
        let length = chain.readableLength
        guard length > UInt64(Self.headerSize), length - UInt64(Self.headerSize) <= UInt64(Self.maxFrame) else {
            state.withLock { $0.dropped += 1 }
            return 0
        }
        let count = Int(length) - Self.headerSize
        let frame = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 8)
        defer { frame.deallocate() }
        let got = memory.gather(chain, skip: UInt64(Self.headerSize), into: frame)
        let sent = linkUp && backend.send(UnsafeRawBufferPointer(rebasing: frame[..<got]))
        state.withLock { if sent { $0.sent += 1 } else { $0.dropped += 1 } }
        return 0
    }

    public func reset() { state.withLock { $0.pending = nil } }
}
