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
        thread = try OSThread(name: "fake-swtpm") { [box] in
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

// MARK: - TPM 2.0 commands

enum TPM2 {
    /// TPM2_Startup(SU_CLEAR).
    static let startupClear: [UInt8] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0]

    /// TPM2_GetRandom(count).
    static func getRandom(_ count: UInt16) -> [UInt8] {
        [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, UInt8(count >> 8), UInt8(count & 0xFF)]
    }

    /// The password session of an empty authorisation (TPM_RS_PW), with its u32 size.
    static let passwordAuthorization: [UInt8] = [0, 0, 0, 9, 0x40, 0, 0, 0x09, 0, 0, 0, 0, 0]

    /// TPM2_PCR_Reset(pcr).
    static func pcrReset(_ pcr: UInt8) -> [UInt8] {
        withSize([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x3D, 0, 0, 0, pcr] + passwordAuthorization)
    }

    /// TPM2_PCR_Extend(pcr) with a SHA-256 digest of `byte` repeated.
    static func pcrExtend(_ pcr: UInt8, byte: UInt8) -> [UInt8] {
        withSize([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x82, 0, 0, 0, pcr] + passwordAuthorization
                 + [0, 0, 0, 1, 0x00, 0x0B] + [UInt8](repeating: byte, count: 32))
    }

    /// TPM2_PCR_Read of one PCR (0...23) in the SHA-256 bank.
    static func pcrRead(_ pcr: Int) -> [UInt8] {
        var select: [UInt8] = [0, 0, 0]
        select[pcr / 8] = 1 << (pcr % 8)
        return withSize([0x80, 0x01, 0, 0, 0, 0, 0, 0, 0x01, 0x7E, 0, 0, 0, 1, 0x00, 0x0B, 3] + select)
    }

    /// TPM2_CreatePrimary of an RSA 2048 storage key in the owner hierarchy (slow: a key pair).
    static let createPrimaryRSA2048: [UInt8] = {
        let publicArea: [UInt8] = [0x00, 0x01, 0x00, 0x0B, 0x00, 0x03, 0x00, 0x72, 0, 0,   // RSA, SHA-256, attributes, no policy
                                   0x00, 0x06, 0x00, 0x80, 0x00, 0x43,                   // AES-128-CFB
                                   0x00, 0x10, 0x08, 0x00, 0, 0, 0, 0, 0, 0]             // no scheme, 2048 bits, exponent, unique
        return withSize([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x31, 0x40, 0, 0, 0x01] + passwordAuthorization
                        + [0, 4, 0, 0, 0, 0]                                             // sensitive: no auth, no data
                        + [0, UInt8(publicArea.count)] + publicArea
                        + [0, 0, 0, 0, 0, 0])                                             // outside info, no PCRs
    }()

    static func withSize(_ command: [UInt8]) -> [UInt8] {
        var c = command
        let n = UInt32(c.count)
        c[2] = UInt8(n >> 24); c[3] = UInt8((n >> 16) & 0xFF); c[4] = UInt8((n >> 8) & 0xFF); c[5] = UInt8(n & 0xFF)
        return c
    }

    /// A response's code (0: success).
    static func responseCode(_ response: [UInt8]) -> UInt32 {
        response.count >= 10 ? response[6..<10].reduce(UInt32(0)) { $0 << 8 | UInt32($1) } : 0xFFFF_FFFF
    }
}
