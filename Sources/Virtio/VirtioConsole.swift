import Synchronization
import VMMCore

/// virtio-console (device ID 3, virtio 1.2, 5.3) with one port and no optional features: the guest's
/// hvc0. Queue 0 (receiveq) takes the host's input, queue 1 (transmitq) carries the guest's output
/// to the machine's console.
///
/// Input waits in a bounded buffer until the guest has made a receive buffer available; the
/// device's thread only takes a receive chain when there is input for it (`hasWork`), so the
/// guest's empty buffers stay with the device. Output is written to the console as it comes (a
/// console that cannot keep up drops, as for the UART's host side).
public final class VirtioConsole: VirtioDeviceModel {
    public let deviceType: UInt32 = 3
    /// "con": section names are at most 16 characters (`dev.virtio-con0`).
    public let kind = "con"
    public let features: UInt64 = VirtioFeature.indirectDescriptors | VirtioFeature.eventIndex
    public let queueSizes: [UInt16] = [64, 64]
    /// cols, rows, max_nr_ports, emerg_wr: read only with features this device does not offer.
    public var configSpace: [UInt8] { [UInt8](repeating: 0, count: 12) }
    /// The most input held for the guest; `enqueueInput` takes no more.
    public static let inputLimit = 64 << 10
    /// The most output taken from one chain.
    public static let outputLimit = 64 << 10
    static let receiveQueue = 0, transmitQueue = 1

    let output: any ConsoleOutput
    private let input = Mutex<[UInt8]>([])
    private let wake = Mutex<(@Sendable () -> Void)?>(nil)

    public init(output: any ConsoleOutput) { self.output = output }

    /// Sets what wakes the device's thread for queue 0 when input arrives (the transport's kick).
    public func onInput(_ wake: @escaping @Sendable () -> Void) { self.wake.withLock { $0 = wake } }

    /// Takes as much of `bytes` as fits for the guest; returns how many (the caller retries the rest).
    public func enqueueInput(_ bytes: some Collection<UInt8>) -> Int {
        let taken = input.withLock { buffer -> Int in
            let n = min(bytes.count, Self.inputLimit - buffer.count)
            buffer += bytes.prefix(n)
            return n
        }
        if taken > 0 { wake.withLock { $0 }?() }
        return taken
    }

    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {}

    public func hasWork(queue: Int) -> Bool {
        queue != Self.receiveQueue || input.withLock { !$0.isEmpty }
    }

    public func serve(queue: Int, chain: DescriptorChain, memory: GuestMemory) -> UInt32 {
        if queue == Self.receiveQueue {
            return input.withLock { buffer -> UInt32 in
                let n = buffer.withUnsafeBytes { memory.scatter(chain, from: $0) }
                buffer.removeFirst(n)
                return UInt32(n)
            }
        }
        let length = Int(min(chain.readableLength, UInt64(Self.outputLimit)))
        let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: max(length, 1), alignment: 1)
        defer { bytes.deallocate() }
        let n = memory.gather(chain, into: UnsafeMutableRawBufferPointer(rebasing: bytes[..<length]))
        output.write(UnsafeRawBufferPointer(rebasing: bytes[..<n]))
        return 0
    }

    public func reset() { input.withLock { $0.removeAll() } }
}
