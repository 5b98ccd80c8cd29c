import Glibc
import Synchronization
import VMMCore
import VMMSys

/// Guest console output to a host file descriptor (stdout for the CLI), written by a thread of its
/// own: a vCPU never waits for the host reader. Bytes go into a bounded buffer that the "console"
/// thread writes out as fast as the descriptor takes them; while the buffer is nearly full,
/// `isReady` is false (the UART then reports its transmitter busy, so a guest that waits for it
/// slows down to the reader's pace), and bytes that do not fit are dropped and counted.
public final class FileDescriptorConsole: ConsoleOutput, @unchecked Sendable {
    /// Room a UART needs to take a FIFO burst (16 bytes) whole, with margin.
    static let readyRoom = 256

    private struct Buffer {
        var bytes: [UInt8] = []
        /// Bytes of `bytes` already written out.
        var head = 0
        var dropped = 0
        var notReady = false
        var onReady: (@Sendable () -> Void)?
        /// Bytes accepted and bytes written out so far (for `drain`).
        var accepted = 0
        var written = 0
        var count: Int { bytes.count - head }
    }

    public let fd: Int32
    public let capacity: Int
    private let buffer = Mutex(Buffer())
    private let wake: EventFD
    private let done: EventFD

    /// Writes to `fd` (which stays the caller's: it is not closed) from a new "console" thread.
    /// `capacity`: the most bytes waiting for the reader.
    public init(fd: Int32, capacity: Int = 1 << 16) throws(SysError) {
        self.fd = fd
        self.capacity = max(capacity, Self.readyRoom * 2)
        wake = try EventFD()
        done = try EventFD()
        _ = try OSThread(name: "console", role: .io) { [self] in run() }
    }

    /// Bytes dropped because the buffer was full.
    public var droppedBytes: Int { buffer.withLock { $0.dropped } }

    public func write(_ bytes: UnsafeRawBufferPointer) {
        guard !bytes.isEmpty else { return }
        buffer.withLock { b in
            let room = capacity - b.count
            let taken = min(room, bytes.count)
            b.bytes.append(contentsOf: bytes.prefix(taken))
            b.accepted += taken
            b.dropped += bytes.count - taken
            if capacity - b.count < Self.readyRoom { b.notReady = true }
        }
        wake.signal()
    }

    public var isReady: Bool { buffer.withLock { capacity - $0.count >= Self.readyRoom } }

    public func onReady(_ ready: @escaping @Sendable () -> Void) {
        buffer.withLock { $0.onReady = ready }
    }

    public func drain(timeoutMilliseconds: Int32) {
        let target = buffer.withLock { $0.accepted }
        let deadline = monotonicMilliseconds() + Int64(timeoutMilliseconds)
        while buffer.withLock({ $0.written < target }) {
            let left = deadline - monotonicMilliseconds()
            if left <= 0 { return }
            done.wait(timeoutMilliseconds: Int32(min(left, 100)))
        }
    }

    /// The console thread: waits for bytes, writes them out (waiting for the reader as long as it
    /// takes), and tells the UART when there is room again.
    private func run() {
        var chunk: [UInt8] = []
        while true {
            chunk.removeAll(keepingCapacity: true)
            buffer.withLock { b in
                chunk.append(contentsOf: b.bytes[b.head...])
            }
            if chunk.isEmpty {
                wake.wait()
                continue
            }
            chunk.withUnsafeBytes { writeAll(fd: fd, $0) }
            let ready: (@Sendable () -> Void)? = buffer.withLock { b in
                b.head += chunk.count
                b.written += chunk.count
                if b.head >= 1 << 16 || b.head == b.bytes.count {
                    b.bytes.removeFirst(b.head)
                    b.head = 0
                }
                guard b.notReady, capacity - b.count >= Self.readyRoom else { return nil }
                b.notReady = false
                return b.onReady
            }
            ready?()
            done.signal()
        }
    }
}
