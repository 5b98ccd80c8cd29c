import Glibc
import Testing
import TestSupport
import VMMSys
@testable import Backends

/// The swtpm backend against a real swtpm (started per test in a temporary directory; the tests
/// fail, not skip, when swtpm is not installed) and against fakes that answer garbage.
@Suite("swtpm backend", .serialized)
struct SwtpmEngineTests {
    @Test("connect, power on, Startup, GetRandom(16), cancel, power off: swtpm exits")
    func session() throws {
        let swtpm = try SwtpmProcess()
        defer { swtpm.stop() }
        let engine = try SwtpmEngine.connect(socketPath: swtpm.socketPath, commandTimeoutMilliseconds: 20_000)
        #expect(engine.description == "swtpm at \(swtpm.socketPath)")
        #expect(engine.bufferSize == 4096)
        #expect(engine.capabilities.isSuperset(of: .requiredForTPM2) && engine.supportsStateBlobs)
        try engine.powerOn()
        #expect(try engine.execute(TPM2.startupClear, locality: 0) == [0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0])
        let random = try engine.execute(TPM2.getRandom(16), locality: 0)
        #expect(TPM2.responseCode(random) == 0)
        #expect(random.count == 28 && random[2..<6] == [0, 0, 0, 28] && random[10..<12] == [0, 16])
        // Nothing runs: swtpm answers at once; the next control exchange (here CMD_SHUTDOWN) reads it.
        engine.cancel()
        engine.cancel()
        let again = try engine.execute(TPM2.getRandom(16), locality: 0)
        #expect(TPM2.responseCode(again) == 0 && again.count == 28 && again != random)
        // A command the TPM device should never pass on: refused, the engine stays usable.
        #expect(throws: TPMBackendError.self) { try engine.execute([0x80, 0x01, 0, 0, 0, 99, 0, 0, 1, 0x7B, 0, 1], locality: 0) }
        #expect(TPM2.responseCode(try engine.execute(TPM2.getRandom(4), locality: 0)) == 0)

        engine.powerOff()
        let status = swtpm.waitForExit(milliseconds: 5000)
        #expect(status.map(exitedCleanly) == true, "swtpm did not exit cleanly after CMD_SHUTDOWN (wait status \(String(describing: status))): \(swtpm.log)")
        engine.powerOff()
        #expect(throws: TPMBackendError("swtpm at \(swtpm.socketPath): CMD_INIT after CMD_SHUTDOWN: the TPM is powered off")) {
            try engine.powerOn()
        }
        #expect(throws: TPMBackendError("swtpm at \(swtpm.socketPath): a TPM command after CMD_SHUTDOWN: the TPM is powered off")) {
            _ = try engine.execute(TPM2.getRandom(1), locality: 0)
        }
    }

    @Test("a command at another locality goes through CMD_SET_LOCALITY (PCR 20 resets only at locality 2)")
    func localities() throws {
        let swtpm = try SwtpmProcess()
        defer { swtpm.stop() }
        let engine = try SwtpmEngine.connect(socketPath: swtpm.socketPath, commandTimeoutMilliseconds: 20_000)
        try engine.powerOn()
        #expect(TPM2.responseCode(try engine.execute(TPM2.startupClear, locality: 0)) == 0)
        let localityError: UInt32 = 0x907  // TPM_RC_LOCALITY
        #expect(TPM2.responseCode(try engine.execute(TPM2.pcrReset(20), locality: 0)) == localityError)
        #expect(TPM2.responseCode(try engine.execute(TPM2.pcrReset(20), locality: 2)) == 0)
        #expect(TPM2.responseCode(try engine.execute(TPM2.getRandom(8), locality: 2)) == 0)
        #expect(TPM2.responseCode(try engine.execute(TPM2.pcrReset(20), locality: 3)) == localityError)
        #expect(TPM2.responseCode(try engine.execute(TPM2.pcrReset(20), locality: 0)) == localityError)
        #expect(throws: TPMBackendError("swtpm at \(swtpm.socketPath): refused locality 5 (0 to 4): a bug of the TPM device")) {
            _ = try engine.execute(TPM2.getRandom(8), locality: 5)
        }
        #expect(TPM2.responseCode(try engine.execute(TPM2.pcrReset(20), locality: 2)) == 0)
        engine.powerOff()
        #expect(swtpm.waitForExit(milliseconds: 5000).map(exitedCleanly) == true)
    }

    @Test("swtpm killed with SIGKILL while a command is pending: execute throws within seconds, naming swtpm; later calls too")
    func killed() throws {
        let swtpm = try SwtpmProcess()
        defer { swtpm.stop() }
        let engine = try SwtpmEngine.connect(socketPath: swtpm.socketPath, commandTimeoutMilliseconds: 30_000)
        try engine.powerOn()
        #expect(TPM2.responseCode(try engine.execute(TPM2.startupClear, locality: 0)) == 0)
        // Stopped, swtpm cannot answer before the kill, however fast the key pair comes.
        swtpm.signal(SIGSTOP)
        let pid = swtpm.pid
        afterDelay(milliseconds: 300) { kill(pid, SIGKILL) }
        let start = monotonicMilliseconds()
        let error = #expect(throws: TPMBackendError.self) { _ = try engine.execute(TPM2.createPrimaryRSA2048, locality: 0) }
        let elapsed = monotonicMilliseconds() - start
        #expect(elapsed < 3000, "execute took \(elapsed) ms to notice swtpm's death")
        let message = error?.message ?? ""
        #expect(message.hasPrefix("swtpm at \(swtpm.socketPath): swtpm exited or was killed"), "\(message)")
        #expect(message.hasSuffix("restart swtpm and the VM") && !message.contains("\n"), "\(message)")
        let status = swtpm.reap(waiting: true)
        #expect(status.map { $0 & 0x7F } == SIGKILL)
        // Every later command fails the same way, at once; power off neither hangs nor throws.
        if let error {
            #expect(throws: error) { _ = try engine.execute(TPM2.getRandom(1), locality: 1) }
        }
        engine.cancel()
        engine.powerOff()
        #expect(monotonicMilliseconds() - start < 5000)
    }

    @Test("cancel while a slow command runs returns at once (swtpm answers it only afterwards); the next commands work")
    func cancelWhileRunning() throws {
        let swtpm = try SwtpmProcess()
        defer { swtpm.stop() }
        let engine = try SwtpmEngine.connect(socketPath: swtpm.socketPath, commandTimeoutMilliseconds: 60_000)
        try engine.powerOn()
        #expect(TPM2.responseCode(try engine.execute(TPM2.startupClear, locality: 0)) == 0)
        final class Outcome: @unchecked Sendable { var code: UInt32?; var error: TPMBackendError? }
        let outcome = Outcome()
        let worker = try OSThread(name: "test-execute", role: .io) {
            do throws(TPMBackendError) {
                outcome.code = TPM2.responseCode(try engine.execute(TPM2.createPrimaryRSA2048, locality: 0))
            } catch {
                outcome.error = error
            }
        }
        usleep(20_000)
        let start = monotonicMilliseconds()
        engine.cancel()
        #expect(monotonicMilliseconds() - start < 500)
        worker.join()
        #expect(outcome.error == nil)
        // Success (the key pair came first) or TPM_RC_CANCELED.
        #expect(outcome.code == 0 || outcome.code == 0x909, "CreatePrimary: \(String(describing: outcome.code))")
        // The cancel's reply is read before the next control request (CMD_SET_LOCALITY here).
        #expect(TPM2.responseCode(try engine.execute(TPM2.getRandom(8), locality: 1)) == 0)
        #expect(TPM2.responseCode(try engine.execute(TPM2.getRandom(8), locality: 0)) == 0)
        engine.powerOff()
        #expect(swtpm.waitForExit(milliseconds: 5000).map(exitedCleanly) == true)
    }

    @Test("swtpm does not answer within the timeout: execute throws, naming the timeout")
    func timeout() throws {
        let swtpm = try SwtpmProcess()
        defer { swtpm.stop() }
        let engine = try SwtpmEngine.connect(socketPath: swtpm.socketPath, commandTimeoutMilliseconds: 2000)
        try engine.powerOn()
        #expect(TPM2.responseCode(try engine.execute(TPM2.startupClear, locality: 0)) == 0)
        swtpm.signal(SIGSTOP)
        let start = monotonicMilliseconds()
        #expect(throws: TPMBackendError("swtpm at \(swtpm.socketPath): no reply to a TPM command within 2000 ms: 0 bytes of the response came; swtpm hangs or the command is too slow; restart swtpm and the VM")) {
            _ = try engine.execute(TPM2.getRandom(8), locality: 0)
        }
        #expect((1900..<5000).contains(monotonicMilliseconds() - start))
    }

    @Test("state blobs: permanent and volatile out, set back on the stopped TPM, power on: the TPM resumes where it was")
    func stateBlobs() throws {
        let swtpm = try SwtpmProcess()
        defer { swtpm.stop() }
        let engine = try SwtpmEngine.connect(socketPath: swtpm.socketPath, commandTimeoutMilliseconds: 20_000)
        try engine.powerOn()
        #expect(TPM2.responseCode(try engine.execute(TPM2.startupClear, locality: 0)) == 0)
        #expect(TPM2.responseCode(try engine.execute(TPM2.pcrExtend(16, byte: 0x11), locality: 0)) == 0)
        let pcrBefore = try engine.execute(TPM2.pcrRead(16), locality: 0)
        #expect(TPM2.responseCode(pcrBefore) == 0)

        let permanent = try engine.stateBlob(.permanent)
        let volatile = try engine.stateBlob(.volatile)
        #expect(permanent.flags == 0 && permanent.bytes.count > 100)
        #expect(volatile.flags == 0 && volatile.bytes.count > 100)
        // No TPM2_Shutdown(STATE): no savestate blob (TPM_RETRY), which is not an error.
        let savestate = try engine.stateBlob(.savestate)
        #expect(savestate.flags == 0 && savestate.bytes.isEmpty)

        // The PCR moves on; the blobs bring it back.
        #expect(TPM2.responseCode(try engine.execute(TPM2.pcrExtend(16, byte: 0x22), locality: 0)) == 0)
        #expect(try engine.execute(TPM2.pcrRead(16), locality: 0) != pcrBefore)
        try engine.setStateBlob(.permanent, flags: permanent.flags, bytes: permanent.bytes)
        try engine.setStateBlob(.volatile, flags: volatile.flags, bytes: volatile.bytes)
        // Stopped now: a blob cannot be read, a one-line refusal that leaves the channel usable.
        #expect(throws: TPMBackendError("swtpm at \(swtpm.socketPath): CMD_GET_STATEBLOB(permanent) refused (TPM_BAD_ORDINAL): the TPM is not running; power it on first")) {
            _ = try engine.stateBlob(.permanent)
        }
        try engine.powerOn(deletingVolatileState: true)
        // No TPM2_Startup: the volatile state resumed, with the PCR (and its update counter) as saved.
        #expect(try engine.execute(TPM2.pcrRead(16), locality: 0) == pcrBefore)
        #expect(TPM2.responseCode(try engine.execute(TPM2.getRandom(16), locality: 0)) == 0)

        // Too large a blob is refused before anything is sent: the TPM keeps running.
        let huge = [UInt8](repeating: 0, count: SwtpmEngine.stateBlobLimit + 1)
        #expect(throws: TPMBackendError("swtpm at \(swtpm.socketPath): the permanent state blob has 524289 bytes, more than swtpm takes (524288): it cannot be restored into swtpm")) {
            try engine.setStateBlob(.permanent, flags: 0, bytes: huge)
        }
        // A damaged blob is refused by swtpm in good order.
        #expect(throws: TPMBackendError.self) { try engine.setStateBlob(.permanent, flags: 0, bytes: [1, 2, 3, 4]) }
        try engine.setStateBlob(.permanent, flags: permanent.flags, bytes: permanent.bytes)
        try engine.powerOn()
        #expect(TPM2.responseCode(try engine.execute(TPM2.startupClear, locality: 0)) == 0)
        #expect(TPM2.responseCode(try engine.execute(TPM2.getRandom(16), locality: 0)) == 0)
        engine.powerOff()
        #expect(swtpm.waitForExit(milliseconds: 5000).map(exitedCleanly) == true)
    }

    @Test("a missing socket: one line naming the path and how to start swtpm")
    func missingSocket() {
        let directory = makeTemporaryDirectory("swtpm-test")
        defer { _ = runProcess(["rm", "-rf", directory]) }
        let path = directory + "/none.sock"
        #expect(throws: TPMBackendError("swtpm at \(path): cannot connect (No such file or directory): start `swtpm socket --tpm2 --ctrl type=unixio,path=\(path)` first")) {
            _ = try SwtpmEngine.connect(socketPath: path)
        }
    }

    /// A peer's script and the error `connect` must give (after "swtpm at PATH: ").
    struct BadPeer: Sendable, CustomTestStringConvertible {
        let name: String
        let steps: [FakeSwtpm.Step]
        let expected: String
        var timeout: Int32 = 5000
        var testDescription: String { name }
    }

    static let capabilities: [UInt8] = [0, 0, 0, 0, 0, 0, 0xFF, 0xFF]
    static let ok: [UInt8] = [0, 0, 0, 0]
    static let sizes: [UInt8] = [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0x0A, 0xF8, 0, 0, 0x10, 0]
    static let failureResponse: [UInt8] = [0x80, 0x01, 0, 0, 0, 10, 0, 0, 1, 1]
    static let notSwtpm = "check that PATH is the --ctrl socket of `swtpm socket --tpm2`"

    static let badPeers: [BadPeer] = [
        BadPeer(name: "three bytes, then the end", steps: [.control([1, 2, 3])],
                expected: "the peer is not swtpm: CMD_GET_CAPABILITY got 3 bytes (expected 8) and the connection closed: \(notSwtpm)"),
        BadPeer(name: "closes without a word", steps: [.control([])],
                expected: "the peer is not swtpm: CMD_GET_CAPABILITY got 0 bytes (expected 8) and the connection closed: \(notSwtpm)"),
        BadPeer(name: "an HTTP server", steps: [.control(Array("HTTP/1.1 400 Bad Request\r\n\r\n".utf8))],
                expected: "the peer is not swtpm: CMD_GET_CAPABILITY got a reply longer than 8 bytes (28 or more): \(notSwtpm)"),
        BadPeer(name: "says nothing", steps: [.silence(milliseconds: 3000)],
                expected: "no reply to CMD_GET_CAPABILITY within 300 ms: swtpm hangs, or another client holds its control channel (it serves one at a time)",
                timeout: 300),
        BadPeer(name: "too few capabilities", steps: [.control([0, 0, 0, 0, 0, 0, 0, 0x03])],
                expected: "swtpm lacks CMD_GET_TPMESTABLISHED, CMD_SET_LOCALITY, CMD_RESET_TPMESTABLISHED, CMD_STOP, CMD_SET_DATAFD, CMD_SET_BUFFERSIZE (capabilities 0x3): use swtpm 0.2 or later"),
        BadPeer(name: "refuses the data channel", steps: [.control(capabilities), .control([0, 0, 0, 0x1F])],
                expected: "swtpm refused the data channel (TPM_IOERROR): another VMM already uses this swtpm; start one swtpm per VM"),
        BadPeer(name: "a TPM 1.2", steps: [.control(capabilities), .control(ok), .data([0, 0xC4, 0, 0, 0, 10, 0, 0, 0, 0x26])],
                expected: "swtpm emulates a TPM 1.2: start it with --tpm2"),
        BadPeer(name: "a long CMD_STOP reply", steps: [.control(capabilities), .control(ok), .data(failureResponse), .control(ok + ok)],
                expected: "CMD_STOP got a reply longer than 4 bytes (8 or more), not a swtpm reply: restart swtpm"),
        BadPeer(name: "a short CMD_SET_BUFFERSIZE reply",
                steps: [.control(capabilities), .control(ok), .data(failureResponse), .control(ok), .control(Array(sizes.prefix(7)))],
                expected: "CMD_SET_BUFFERSIZE got 7 bytes (expected 16) and the connection closed, not a swtpm reply: restart swtpm"),
        BadPeer(name: "an error reply of odd length",
                steps: [.control(capabilities), .control(ok), .data(failureResponse), .control([0, 0, 0, 9, 0, 0])],
                expected: "CMD_STOP got a reply longer than 4 bytes (6 or more), not a swtpm reply: restart swtpm"),
        BadPeer(name: "an absurd buffer size",
                steps: [.control(capabilities), .control(ok), .data(failureResponse), .control(ok),
                        .control([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 4])],
                expected: "CMD_SET_BUFFERSIZE reported sizes 4096...4, not a usable range: restart swtpm"),
    ]

    @Test("a peer that is not swtpm, or a swtpm that answers garbage: a one-line error naming the path", arguments: badPeers)
    func badPeer(_ peer: BadPeer) throws {
        let directory = makeTemporaryDirectory("swtpm-test")
        defer { _ = runProcess(["rm", "-rf", directory]) }
        let path = directory + "/fake.sock"
        let fake = try FakeSwtpm(path: path, steps: peer.steps)
        let expected = "swtpm at \(path): " + peer.expected.split(separator: "PATH", omittingEmptySubsequences: false).joined(separator: path)
        #expect(throws: TPMBackendError(expected)) {
            _ = try SwtpmEngine.connect(socketPath: path, commandTimeoutMilliseconds: peer.timeout)
        }
        #expect(!expected.contains("\n"))
        fake.finish()
    }

    @Test("a response whose header claims 2 GiB: refused without reading (or allocating) it")
    func lyingResponse() throws {
        let directory = makeTemporaryDirectory("swtpm-test")
        defer { _ = runProcess(["rm", "-rf", directory]) }
        let path = directory + "/fake.sock"
        let fake = try FakeSwtpm(path: path, steps: [
            .control(Self.capabilities), .control(Self.ok), .data(Self.failureResponse), .control(Self.ok),
            .control(Self.sizes), .control(Self.sizes), .control(Self.ok),   // STOP, sizes twice, INIT
            .control(Self.ok), .data([0x80, 0x01, 0x7F, 0xFF, 0xFF, 0xFF, 0, 0, 0, 0]),  // SET_LOCALITY, the lie
        ])
        let engine = try SwtpmEngine.connect(socketPath: path, commandTimeoutMilliseconds: 5000)
        #expect(engine.bufferSize == 4096)
        try engine.powerOn()
        let lie = TPMBackendError("swtpm at \(path): a TPM response announced 2147483647 bytes (10 to 4096): swtpm misbehaves; restart swtpm and the VM")
        #expect(throws: lie) { _ = try engine.execute(TPM2.getRandom(8), locality: 0) }
        #expect(throws: lie) { _ = try engine.execute(TPM2.getRandom(8), locality: 0) }
        fake.finish()
        #expect(fake.requests.codes.withLock { $0 } == [0x01, 0x10, 0x0E, 0x11, 0x11, 0x02, 0x05])
    }
}
