import Glibc
import Synchronization
import Testing
import TestSupport
import VMMSys

/// A listener that plays swtpm (or something else) on the control socket: for each step it
/// reads one request, from the control connection or from the data channel it was handed, and
/// writes the canned reply; then it closes everything. Runs on its own thread.
final class FakeSwtpm: @unchecked Sendable {
    enum Step: Sendable {
        /// Read a control request, answer `reply` (nothing when empty).
        case control([UInt8])
        /// Read a TPM command on the data channel, answer `reply`.
        case data([UInt8])
        /// Read a control request and do not answer; hold the connection for `milliseconds`.
        case silence(milliseconds: Int)
    }

    let path: String
    /// The control requests' command codes, in order.
    final class Requests: Sendable {
        let codes = Mutex<[UInt32]>([])
    }
    let requests = Requests()
    private let listener: ListenerBox
    private var thread: OSThread?

    private final class ListenerBox: @unchecked Sendable {
        let listener: UnixListener
        init(_ listener: consuming UnixListener) { self.listener = listener }
    }

    init(path: String, steps: [Step]) throws {
        self.path = path
        listener = ListenerBox(try UnixListener(path: path, description: "fake swtpm socket", temporaryPrefix: ".fake-"))
        let box = listener
        let requests = self.requests
        thread = try OSThread(name: "fake-swtpm", role: .io) { [box] in
            FakeSwtpm.serve(box.listener, steps: steps, requests: requests)
        }
    }

    /// Waits for the script's end.
    func finish() {
        thread?.join()
        thread = nil
    }

    deinit {
        finish()
        listener.listener.removeSocketFile()
    }

    private static func serve(_ listener: borrowing UnixListener, steps: [Step], requests: Requests) {
        guard waitReadable(listener.fd, milliseconds: 10_000), let connection = try? listener.accept() else { return }
        var dataFD: Int32 = -1
        defer { if dataFD >= 0 { closeDescriptor(dataFD) } }
        var buffer = [UInt8](repeating: 0, count: 65536)
        for step in steps {
            switch step {
            case .control, .silence:
                guard waitReadable(connection.fd, milliseconds: 10_000) else { return }
                let got = buffer.withUnsafeMutableBytes { try? connection.receive(into: $0) }
                guard case .data(let n, let descriptors) = got else { return }
                if n >= 4 {
                    let code = buffer.prefix(4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
                    requests.codes.withLock { $0.append(code) }
                }
                if let fd = descriptors.first, dataFD < 0 {
                    dataFD = fd
                    closeDescriptors(descriptors.dropFirst())
                } else {
                    closeDescriptors(descriptors)
                }
                if case .silence(let milliseconds) = step {
                    usleep(UInt32(milliseconds) * 1000)
                    return
                }
                if case .control(let reply) = step, !reply.isEmpty {
                    _ = reply.withUnsafeBytes { try? connection.sendAll($0, timeoutMilliseconds: 5000) }
                }
            case .data(let reply):
                // The data channel is blocking (swtpm's end of the pair).
                guard dataFD >= 0, buffer.withUnsafeMutableBytes({ read(dataFD, $0.baseAddress, $0.count) }) > 0 else { return }
                _ = reply.withUnsafeBytes { write(dataFD, $0.baseAddress, $0.count) }
            }
        }
    }

    private static func waitReadable(_ fd: borrowing OwnedFD, milliseconds: Int32) -> Bool {
        var set = PollSet()
        set.add(fd, .readable)
        return (try? set.wait(timeoutMilliseconds: milliseconds))?.first?.isEmpty == false
    }
}
