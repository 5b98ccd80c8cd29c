import Devices
import Glibc
import Synchronization
import Testing
import VMMCore
import VMMSys
@testable import Backends

/// An engine that answers each command with its own bytes reversed after `delay`, or fails.
final class SlowEngine: TPMEngine, @unchecked Sendable {
    let description = "slow test engine"
    let bufferSize = 4096
    let delayMilliseconds: UInt32
    let failing: Bool
    let executed = Mutex<[[UInt8]]>([])
    let powerOffs = Mutex(0)

    init(delayMilliseconds: UInt32, failing: Bool = false) {
        self.delayMilliseconds = delayMilliseconds
        self.failing = failing
    }

    func powerOn() throws(TPMBackendError) {}
    func execute(_ command: [UInt8], locality: UInt8) throws(TPMBackendError) -> [UInt8] {
        usleep(delayMilliseconds * 1000)
        executed.withLock { $0.append(command) }
        if failing { throw TPMBackendError("engine failure for the test") }
        // A valid response: header with its size, then the command's code as payload.
        return [0x80, 0x01, 0, 0, 0, 14, 0, 0, 0, 0] + Array(command[6..<10])
    }
    func cancel() {}
    func exportState() throws(TPMBackendError) -> TPMBackendState { TPMBackendState(format: .libtpms, permanent: [1], volatile: [], saveState: []) }
    func powerOn(from state: TPMBackendState) throws(TPMBackendError) {}
    func powerOff() { powerOffs.withLock { $0 += 1 } }
}

final class Responses: Sendable {
    let list = Mutex<[[UInt8]]>([])
    func add(_ r: [UInt8]) { list.withLock { $0.append(r) } }
    var all: [[UInt8]] { list.withLock { $0 } }
}

@Suite("TPM worker thread")
struct TPMWorkerTests {
    static func command(_ code: UInt8) -> [UInt8] { [0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, code] }
    let info = TPMBackendInfo(kind: .builtin, path: "/test")

    @Test("the worker remembers its longest command (code and backend time) for its summary line")
    func slowestCommand() throws {
        final class Uneven: TPMEngine, @unchecked Sendable {
            let description = "uneven test engine"
            let bufferSize = 4096
            func powerOn() throws(TPMBackendError) {}
            func execute(_ command: [UInt8], locality: UInt8) throws(TPMBackendError) -> [UInt8] {
                usleep(command[9] == 0x31 ? 120_000 : 5_000)
                return [0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0]
            }
            func cancel() {}
            func exportState() throws(TPMBackendError) -> TPMBackendState { TPMBackendState(format: .libtpms, permanent: [1], volatile: [], saveState: []) }
            func powerOn(from state: TPMBackendState) throws(TPMBackendError) {}
            func powerOff() {}
        }
        let worker = try TPMWorker(engine: Uneven(), info: info)
        #expect(worker.slowestCommand == nil)
        try worker.start()
        defer { worker.stop() }
        for code in [0x7A, 0x31, 0x7B] as [UInt8] { worker.submit(Self.command(code), locality: 0) { _ in } }
        #expect(worker.waitUntilIdle(timeoutMilliseconds: 5000))
        let slowest = try #require(worker.slowestCommand)
        #expect(slowest.code == 0x131)
        #expect(slowest.nanoseconds >= 100_000_000)
        #expect(TPMTIS.codeField([0x80, 0x01, 0, 0, 0, 9, 0, 0, 1]) == nil, "a command shorter than its header has no code")
    }

    @Test("submit returns at once while the engine works; responses come back in order; waitUntilIdle waits for delivery")
    func ordering() throws {
        let engine = SlowEngine(delayMilliseconds: 150)
        let worker = try TPMWorker(engine: engine, info: info)
        try worker.start()
        defer { worker.stop() }
        let responses = Responses()
        let start = monotonicNanoseconds()
        for code in [0x44, 0x7B, 0x43] as [UInt8] { worker.submit(Self.command(code), locality: 0) { responses.add($0) } }
        #expect(monotonicNanoseconds() - start < 20_000_000, "three submits took more than 20 ms")
        #expect(!worker.isIdle)
        #expect(!worker.waitUntilIdle(timeoutMilliseconds: 50), "not idle after 50 ms of a 450 ms queue")
        #expect(worker.waitUntilIdle(timeoutMilliseconds: 5000))
        #expect(responses.all.map { $0.last } == [0x44, 0x7B, 0x43])
    }

    @Test("an engine that fails gives the guest TPM_RC_FAILURE, command after command")
    func failures() throws {
        let worker = try TPMWorker(engine: SlowEngine(delayMilliseconds: 0, failing: true), info: info)
        try worker.start()
        defer { worker.stop() }
        let responses = Responses()
        for _ in 0..<3 { worker.submit(Self.command(0x7B), locality: 0) { responses.add($0) } }
        #expect(worker.waitUntilIdle(timeoutMilliseconds: 5000))
        #expect(responses.all == Array(repeating: TPMTIS.errorResponse(TPMTIS.rcFailure), count: 3))
    }

    @Test("stop answers queued commands with TPM_RC_FAILURE, powers the engine off once, and later submits fail at once")
    func stop() throws {
        let engine = SlowEngine(delayMilliseconds: 200)
        let worker = try TPMWorker(engine: engine, info: info)
        try worker.start()
        let responses = Responses()
        for _ in 0..<3 { worker.submit(Self.command(0x7B), locality: 0) { responses.add($0) } }
        usleep(50_000)
        worker.stop()
        worker.stop()
        #expect(engine.powerOffs.withLock { $0 } == 1)
        #expect(responses.all.count == 3, "every command answered: \(responses.all.count)")
        #expect(responses.all.filter { $0 == TPMTIS.errorResponse(TPMTIS.rcFailure) }.count >= 2)
        worker.submit(Self.command(0x7B), locality: 0) { responses.add($0) }
        #expect(responses.all.count == 4)
    }

    @Test("while a command runs for 300 ms, every TIS register access answers in well under a millisecond")
    func registerLatencyDuringCommand() throws {
        let worker = try TPMWorker(engine: SlowEngine(delayMilliseconds: 300), info: info)
        try worker.start()
        defer { worker.stop() }
        let tis = TPMTIS(backend: worker, placement: .init(base: 0))
        func write(_ offset: UInt64, _ value: UInt8) { [value].withUnsafeBytes { tis.write(offset: offset, data: $0) } }
        func readSTS() -> UInt32 {
            var v: UInt32 = 0
            withUnsafeMutableBytes(of: &v) { tis.read(offset: 0x18, data: $0) }
            return v
        }
        write(0x000, 0x02)
        write(0x018, 0x40)
        for b in Self.command(0x7B) { write(0x024, b) }
        let goStart = monotonicNanoseconds()
        write(0x018, 0x20)
        let goTime = monotonicNanoseconds() - goStart
        var worst: UInt64 = 0, reads = 0
        while tis.commandInFlight {
            let t = monotonicNanoseconds()
            _ = readSTS()
            worst = max(worst, monotonicNanoseconds() - t)
            reads += 1
            usleep(1000)
        }
        let elapsed = monotonicNanoseconds() - goStart
        #expect(elapsed >= 290_000_000, "the command ran its 300 ms")
        #expect(goTime < 5_000_000, "tpmGo took \(goTime / 1000) µs")
        #expect(reads > 50)
        #expect(worst < 2_000_000, "the slowest STS read during the command took \(worst / 1000) µs")
        #expect(readSTS() & 0x90 == 0x90, "then dataAvail")
        print("TIS register access during a 300 ms command: \(reads) STS reads, slowest \(worst / 1000) µs; tpmGo \(goTime / 1000) µs")
    }
}
