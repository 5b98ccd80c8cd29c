import Backends
import Devices
import Glibc
import Machine
import Synchronization
import Testing
import TestSupport
import VMMCore
import VMMSys

let TPMTIS_failure: [UInt8] = [0x80, 0x01, 0, 0, 0, 10, 0, 0, 0x01, 0x01]

/// The TPM's TIS as a guest reaches it: MMIO exits at 0xFED40000 on a real vCPU, with a backend that
/// answers from its own thread while the guest polls STS.
@Suite("KVM tiny guests: TPM TIS", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct TPMGuestTests {
    /// Answers each command after `delayMilliseconds` on a thread of its own, with a response that
    /// carries the command's code.
    final class ThreadedBackend: TPMBackend, @unchecked Sendable {
        let bufferSize = 4096
        let info = TPMBackendInfo(kind: .builtin, path: "/test")
        let received = Mutex<[[UInt8]]>([])
        let threads = Mutex<[OSThread]>([])
        let delayMilliseconds: UInt32
        init(delayMilliseconds: UInt32) { self.delayMilliseconds = delayMilliseconds }

        let pending = Atomic<Int>(0)

        func submit(_ command: [UInt8], locality: UInt8, complete: @escaping @Sendable ([UInt8]) -> Void) {
            received.withLock { $0.append(command) }
            pending.add(1, ordering: .sequentiallyConsistent)
            let delay = delayMilliseconds
            let t = try! OSThread(name: "test-tpm", role: .io) { [self] in
                usleep(delay * 1000)
                complete([0x80, 0x01, 0, 0, 0, 16, 0, 0, 0, 0, 0xCA, 0xFE] + Array(command[8..<12]))
                pending.subtract(1, ordering: .sequentiallyConsistent)
            }
            threads.withLock { $0.append(t) }
        }
        func cancel() {}
        let resumedWith = Mutex<[TPMBackendState?]>([])
        func exportState() throws(TPMStateError) -> TPMBackendState {
            TPMBackendState(format: .libtpms, permanent: [1, 2, 3], volatile: [4], saveState: [])
        }
        func resume(from state: TPMBackendState?) throws(TPMStateError) { resumedWith.withLock { $0.append(state) } }
        func waitUntilIdle(timeoutMilliseconds: Int) -> Bool {
            for _ in 0..<timeoutMilliseconds where pending.load(ordering: .sequentiallyConsistent) > 0 { usleep(1000) }
            return pending.load(ordering: .sequentiallyConsistent) == 0
        }
        func joinAll() { for t in threads.withLock({ $0 }) { t.join() } }
    }

    /// Requests locality 0, sends `command` byte by byte, tpmGo, polls STS for dataAvail, copies
    /// `responseBytes` FIFO bytes to COM1, then resets through 0xCF9.
    static func program(command: [UInt8], responseBytes: Int) -> [UInt8] {
        var code: [UInt8] = [0xBB, 0x00, 0x00, 0xD4, 0xFE]          // mov ebx, 0xFED40000
        code += [0xC6, 0x03, 0x02]                                     // mov byte [rbx], 2 (requestUse)
        code += [0xC7, 0x43, 0x18, 0x40, 0, 0, 0]                      // mov dword [rbx+0x18], 0x40 (commandReady)
        for b in command { code += [0xC6, 0x43, 0x24, b] }             // mov byte [rbx+0x24], b
        code += [0xC7, 0x43, 0x18, 0x20, 0, 0, 0]                      // tpmGo
        code += [0x8B, 0x43, 0x18, 0xA8, 0x10, 0x74, 0xF9]             // 1: mov eax,[rbx+0x18]; test al,0x10; jz 1b
        for _ in 0..<responseBytes {
            code += [0x8A, 0x43, 0x24, 0x66, 0xBA, 0xF8, 0x03, 0xEE]   // mov al,[rbx+0x24]; mov dx,0x3f8; out dx,al
        }
        code += [0x66, 0xBA, 0xF9, 0x0C, 0xB0, 0x0F, 0xEE]             // reset through 0xCF9
        return code
    }

    @Test("a guest sends a command through the FIFO, polls STS while the backend works on its thread, and reads the response")
    func commandThroughMMIO() throws {
        let backend = ThreadedBackend(delayMilliseconds: 100)
        let console = RecordingConsole()
        var config = MachineConfig(memorySize: 16 << 20, console: console)
        config.tpm = backend
        let command: [UInt8] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 16] // TPM2_GetRandom(16)
        let m = try Machine(config, boot: .program64(code: Self.program(command: command, responseBytes: 16), loadAddress: 0x100000))
        #expect(m.tpm != nil)
        #expect(m.run() == .reset("ACPI reset register"))
        backend.joinAll()
        #expect(backend.received.withLock { $0 } == [command])
        #expect(console.output == [0x80, 0x01, 0, 0, 0, 16, 0, 0, 0, 0, 0xCA, 0xFE, 0x01, 0x7B, 0, 16])
    }

    @Test("a tiny guest talks to a real swtpm through the TIS: TPM2_Startup, then TPM2_GetRandom returns 8 bytes")
    func realSwtpm() throws {
        let swtpm = try SwtpmProcess()
        defer { swtpm.stop() }
        let engine = try SwtpmEngine.connect(socketPath: swtpm.socketPath)
        try engine.powerOn()
        let worker = try TPMWorker(engine: engine, info: TPMBackendInfo(kind: .emulator, path: swtpm.socketPath))
        try worker.start()
        let console = RecordingConsole()
        var config = MachineConfig(memorySize: 16 << 20, console: console)
        config.tpm = worker
        let startup: [UInt8] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0]
        let getRandom: [UInt8] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 8]
        // Startup's 10-byte response, then the guest relinquishes nothing and sends GetRandom on the
        // same locality: commandReady again, then the 20-byte response (header, size 8, 8 bytes).
        var code = Array(Self.program(command: startup, responseBytes: 10).dropLast(7))
        code += Array(Self.program(command: getRandom, responseBytes: 20).dropFirst(8))
        let m = try Machine(config, boot: .program64(code: code, loadAddress: 0x100000))
        #expect(m.run() == .reset("ACPI reset register"))
        worker.stop()
        let out = console.output
        try #require(out.count == 30, "console: \(out)")
        #expect(Array(out[0..<10]) == [0x80, 0x01, 0, 0, 0, 10, 0, 0, 0, 0], "TPM2_Startup: rc 0")
        #expect(Array(out[10..<22]) == [0x80, 0x01, 0, 0, 0, 20, 0, 0, 0, 0, 0, 8], "GetRandom: rc 0, 8 bytes")
        #expect(swtpm.waitForExit(milliseconds: 5000).map(exitedCleanly) == true, "CMD_SHUTDOWN at stop ends swtpm")
    }

    @Test("an STS read while swtpm creates an RSA key costs what it costs with no command running (the exit never waits for the command)")
    func exitLatencyDuringCommand() throws {
        let swtpm = try SwtpmProcess()
        defer { swtpm.stop() }
        let worker = try Self.startedWorker(swtpm)
        defer { worker.stop() }
        let console = TimestampConsole()
        var config = MachineConfig(memorySize: 16 << 20, console: console)
        config.tpm = worker
        let baseline: UInt32 = 2000
        let m = try Machine(config, boot: .program64(code: TPMGuestPrograms.latency(command: TPM2.createPrimaryRSA2048, baselineReads: baseline),
                                                     loadAddress: 0x100000))
        #expect(m.run() == .reset("ACPI reset register"))
        let s = try #require(console.time(of: 0x53)), a = try #require(console.time(of: 0x41))
        let g = try #require(console.time(of: 0x47)), d = try #require(console.time(of: 0x44))
        let countBytes = console.bytes(after: 0x44, count: 4)
        try #require(countBytes.count == 4)
        let count = countBytes.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        let idleExit = Double(a - s) / Double(baseline) / 1000
        let busyExit = Double(d - g) / Double(max(count, 1)) / 1000
        print("TIS STS read (a vCPU exit): \(String(format: "%.1f", idleExit)) µs with no command, \(String(format: "%.1f", busyExit)) µs while TPM2_CreatePrimary ran (\(count) reads in \((d - g) / 1_000_000) ms)")
        #expect(count >= 5, "the guest polled while the command ran")
        #expect(busyExit < idleExit * 3 + 50, "an exit during the command took \(busyExit) µs against \(idleExit) µs idle")
    }

    @Test("swtpm killed while the guest's command runs: the guest reads TPM_RC_FAILURE, the VM goes on to its end")
    func swtpmDiesMidCommand() throws {
        let swtpm = try SwtpmProcess()
        defer { swtpm.stop() }
        let worker = try Self.startedWorker(swtpm)
        defer { worker.stop() }
        let console = RecordingConsole()
        var config = MachineConfig(memorySize: 16 << 20, console: console)
        config.tpm = worker
        // swtpm is stopped, so the command cannot finish before it is killed.
        swtpm.signal(SIGSTOP)
        let m = try Machine(config, boot: .program64(code: Self.program(command: TPM2.createPrimaryRSA2048, responseBytes: 10),
                                                     loadAddress: 0x100000))
        let pid = swtpm.pid
        let killer = try OSThread(name: "kill-swtpm", role: .io) {
            usleep(300_000)
            kill(pid, SIGKILL)
        }
        let started = monotonicNanoseconds()
        #expect(m.run() == .reset("ACPI reset register"))
        killer.join()
        #expect(monotonicNanoseconds() - started < 10_000_000_000, "no hang")
        #expect(console.output == TPMTIS_failure, "the guest's response: \(console.output)")
    }

    /// A TPM worker on `swtpm`: connected, powered on and started up (TPM2_Startup), its thread running.
    static func startedWorker(_ swtpm: SwtpmProcess) throws -> TPMWorker {
        let worker = try TPMWorker(engine: try SwtpmEngine.connect(socketPath: swtpm.socketPath),
                                   info: TPMBackendInfo(kind: .emulator, path: swtpm.socketPath))
        try worker.powerOnAndStart()
        return worker
    }

    /// Runs `command` through the worker (as the TIS would) and waits for its response.
    static func run(_ worker: TPMWorker, _ command: [UInt8]) -> [UInt8] {
        let box = Mutex<[UInt8]?>(nil)
        worker.submit(command, locality: 0) { r in box.withLock { $0 = r } }
        _ = worker.waitUntilIdle(timeoutMilliseconds: 60_000)
        return box.withLock { $0 } ?? []
    }

    @Test("swtpm: a snapshot carries its state blobs, and a fresh swtpm for the clone continues from them (NV index, PCR)")
    func swtpmSnapshot() throws {
        let dir = makeTemporaryDirectory("swiftvmm-swtpm-snap")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let index: UInt32 = 0x0150_0002
        let value = Array("swtpm state in a snapshot".utf8)
        let pcr: [UInt8]
        do {
            let swtpm = try SwtpmProcess()
            defer { swtpm.stop() }
            let worker = try Self.startedWorker(swtpm)
            var config = MachineConfig(memorySize: 16 << 20, console: RecordingConsole())
            config.tpm = worker
            let original = try Machine(config, boot: .program64(code: [0xEB, 0xFE], loadAddress: 0x100000))
            #expect(TPM2.responseCode(Self.run(worker, TPM2.nvDefine(index, size: value.count))) == 0)
            #expect(TPM2.responseCode(Self.run(worker, TPM2.nvWrite(index, value))) == 0)
            #expect(TPM2.responseCode(Self.run(worker, TPM2.pcrExtend(16, byte: 0x5A))) == 0)
            pcr = Self.run(worker, TPM2.pcrRead(16))
            _ = try original.createSnapshot(at: dir + "/snap")
            worker.stop()
        }
        let swtpm = try SwtpmProcess()
        defer { swtpm.stop() }
        let worker = try TPMWorker(engine: try SwtpmEngine.connect(socketPath: swtpm.socketPath),
                                   info: TPMBackendInfo(kind: .emulator, path: swtpm.socketPath))
        var options = RestoreOptions(console: RecordingConsole(), generationID: .keep)
        options.tpm = worker
        _ = try Machine.restore(from: dir + "/snap", options: options)
        #expect(TPM2.nvReadData(Self.run(worker, TPM2.nvRead(index, size: value.count))) == value)
        #expect(Self.run(worker, TPM2.pcrRead(16)) == pcr, "the clone's PCR 16 as the original had it")
        worker.stop()
    }

    @Test("snapshot-create during a command waits for its response; the clone reads it from the TIS without running the command again")
    func snapshotDrainsCommandInFlight() throws {
        let dir = makeTemporaryDirectory("swiftvmm-tpm-snap")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let backend = ThreadedBackend(delayMilliseconds: 400)
        let console = RecordingConsole()
        var config = MachineConfig(memorySize: 16 << 20, console: console)
        config.tpm = backend
        let command: [UInt8] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 16]
        let expected: [UInt8] = [0x80, 0x01, 0, 0, 0, 16, 0, 0, 0, 0, 0xCA, 0xFE, 0x01, 0x7B, 0, 16]
        let original = try Machine(config, boot: .program64(code: Self.program(command: command, responseBytes: 16), loadAddress: 0x100000))
        let wait = SnapshotGuestTests.start(original)
        for _ in 0..<2000 where backend.received.withLock({ $0.isEmpty }) { usleep(1000) }
        #expect(original.tpm?.commandInFlight == true, "the snapshot starts while the command runs")
        let started = monotonicNanoseconds()
        _ = try original.createSnapshot(at: dir + "/snap")
        #expect(monotonicNanoseconds() - started >= 200_000_000, "the snapshot waited for the response")
        #expect(wait() == .reset("ACPI reset register"))
        backend.joinAll()
        #expect(console.output == expected)

        // The clone: its TIS holds the response; the guest reads it and resets, and the clone's
        // backend never sees a command.
        let cloneBackend = ThreadedBackend(delayMilliseconds: 0)
        let cloneConsole = RecordingConsole()
        var options = RestoreOptions(console: cloneConsole, generationID: .keep)
        options.tpm = cloneBackend
        let clone = try Machine.restore(from: dir + "/snap", options: options)
        #expect(clone.tpm?.commandInFlight == false)
        #expect(cloneBackend.resumedWith.withLock { $0 } == [TPMBackendState(format: .libtpms, permanent: [1, 2, 3], volatile: [4], saveState: [])],
                "the clone's backend resumed from the state the original's exported")
        #expect(clone.run() == .reset("ACPI reset register"))
        #expect(cloneBackend.received.withLock { $0 }.isEmpty)
        // The original was paused while it polled STS (the snapshot waited for the response), so the
        // clone reads the whole response.
        #expect(cloneConsole.output == expected, "the clone prints the response: \(cloneConsole.output)")

        // A snapshot with a TPM needs --tpm; one without refuses it.
        #expect(throws: MachineError.self) {
            _ = try Machine.restore(from: dir + "/snap", options: RestoreOptions(console: RecordingConsole(), generationID: .keep))
        }
        let plain = try Machine(MachineConfig(memorySize: 16 << 20, console: RecordingConsole()),
                                boot: .program64(code: [0xEB, 0xFE], loadAddress: 0x100000))
        _ = try plain.createSnapshot(at: dir + "/plain")
        var withTPM = RestoreOptions(console: RecordingConsole(), generationID: .keep)
        withTPM.tpm = ThreadedBackend(delayMilliseconds: 0)
        do {
            _ = try Machine.restore(from: dir + "/plain", options: withTPM)
            Issue.record("a snapshot without a TPM restored with --tpm")
        } catch {
            #expect("\(error)".contains("has no TPM"))
        }
    }

    @Test("a TPM command that outlasts the snapshot's wait: the snapshot fails cleanly, nothing is written, and the VM runs on")
    func drainTimeout() throws {
        let dir = makeTemporaryDirectory("swiftvmm-tpm-busy")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let backend = ThreadedBackend(delayMilliseconds: 2000)
        let console = RecordingConsole()
        var config = MachineConfig(memorySize: 16 << 20, console: console)
        config.tpm = backend
        config.tpmDrainTimeoutMilliseconds = 200
        let command: [UInt8] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 16]
        let m = try Machine(config, boot: .program64(code: Self.program(command: command, responseBytes: 16), loadAddress: 0x100000))
        let wait = SnapshotGuestTests.start(m)
        for _ in 0..<2000 where backend.received.withLock({ $0.isEmpty }) { usleep(1000) }
        do {
            let _: SnapshotSummary = try m.createSnapshot(at: dir + "/snap")
            Issue.record("a snapshot was written while the TPM command ran")
        } catch {
            #expect("\(error)".contains("did not finish within 0.2 s, so no snapshot was written"), "\(error)")
        }
        #expect(!isAccessible(dir + "/snap"))
        #expect(!m.isPaused, "the VM runs on")
        #expect(wait() == .reset("ACPI reset register"), "the guest got its response and finished")
        backend.joinAll()
        #expect(console.output.count == 16)
    }

    @Test("the DSDT of a machine with a TPM has MSFT0101 and the XSDT lists a TPM2 table; without --tpm neither")
    func acpiTables() throws {
        var config = MachineConfig(memorySize: 16 << 20, console: RecordingConsole())
        let without = try Machine(config, boot: .program64(code: [0xF4], loadAddress: 0x100000))
        let names = without.acpiTables?.tables.map(\.name) ?? []
        #expect(!names.isEmpty && !names.contains("TPM2"))
        config.tpm = ThreadedBackend(delayMilliseconds: 0)
        let with = try Machine(config, boot: .program64(code: [0xF4], loadAddress: 0x100000))
        let tables = try #require(with.acpiTables?.tables)
        #expect(tables.map(\.name).contains("TPM2"))
        let dsdt = try #require(tables.first { $0.name == "DSDT" })
        #expect(String(decoding: dsdt.bytes, as: UTF8.self).contains("MSFT0101"))
        let noACPI = MachineConfig(memorySize: 16 << 20, console: RecordingConsole(), acpi: false)
        var bad = noACPI
        bad.tpm = ThreadedBackend(delayMilliseconds: 0)
        #expect(throws: MachineError.self) { try Machine(bad, boot: .program64(code: [0xF4], loadAddress: 0x100000)) }
    }
}
