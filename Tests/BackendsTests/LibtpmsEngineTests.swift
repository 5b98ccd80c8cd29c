import Control
import Devices
import QMP
import Foundation
import Glibc
import Snapshot
import Machine
import Sandbox
import Synchronization
import Testing
import TestSupport
import VMMSys
@testable import Backends

/// libtpms in this process, without a guest. One TPM per process: the suite runs serially.
@Suite("libtpms backend", .serialized)
struct LibtpmsEngineTests {
    static let index: UInt32 = 0x0150_0001

    func run(_ engine: LibtpmsEngine, _ command: [UInt8]) throws -> [UInt8] { try engine.execute(command, locality: 0) }

    @Test("Startup, GetRandom, an NV index defined and written; after terminate a new engine on the same file reads it back, one on a fresh file does not")
    func persistence() throws {
        let dir = makeTemporaryDirectory("swiftvmm-libtpms")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let path = dir + "/tpm.state"
        let value = Array("swiftvmm keeps this".utf8)
        do {
            let (store, created) = try TPMStateStore.open(path: path)
            #expect(created)
            let engine = try LibtpmsEngine(store: store)
            defer { engine.powerOff() }
            try engine.powerOn()
            #expect(engine.bufferSize == 4096)
            #expect(TPM2.responseCode(try run(engine, TPM2.startupClear)) == 0)
            let random = try run(engine, TPM2.getRandom(32))
            #expect(TPM2.responseCode(random) == 0 && random.count == 12 + 32)
            #expect(TPM2.responseCode(try run(engine, TPM2.nvDefine(Self.index, size: value.count))) == 0)
            #expect(TPM2.responseCode(try run(engine, TPM2.nvWrite(Self.index, value))) == 0)
            #expect(TPM2.nvReadData(try run(engine, TPM2.nvRead(Self.index, size: value.count))) == value)
        }
        do {
            let (store, created) = try TPMStateStore.open(path: path)
            #expect(!created)
            let engine = try LibtpmsEngine(store: store)
            defer { engine.powerOff() }
            try engine.powerOn()
            #expect(TPM2.responseCode(try run(engine, TPM2.startupClear)) == 0)
            #expect(TPM2.nvReadData(try run(engine, TPM2.nvRead(Self.index, size: value.count))) == value, "the NV index survived")
        }
        do {
            let (store, _) = try TPMStateStore.open(path: dir + "/fresh.state")
            let engine = try LibtpmsEngine(store: store)
            defer { engine.powerOff() }
            try engine.powerOn()
            #expect(TPM2.responseCode(try run(engine, TPM2.startupClear)) == 0)
            #expect(TPM2.responseCode(try run(engine, TPM2.nvRead(Self.index, size: value.count))) == 0x28B, "TPM_RC_HANDLE: a fresh TPM has no index")
        }
    }

    @Test("a second engine in the process is refused while the first holds libtpms")
    func oneAtATime() throws {
        let dir = makeTemporaryDirectory("swiftvmm-libtpms")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let first = try LibtpmsEngine(store: try TPMStateStore.open(path: dir + "/a").store)
        let error = #expect(throws: TPMBackendError.self) { _ = try LibtpmsEngine(store: try TPMStateStore.open(path: dir + "/b").store) }
        #expect(error?.message.contains("already in use") == true)
        first.powerOff()
        let second = try LibtpmsEngine(store: try TPMStateStore.open(path: dir + "/c").store)
        second.powerOff()
    }

    @Test("a damaged permanent state is a one-line error naming the file and the entry; the file is left as it was")
    func damagedState() throws {
        let dir = makeTemporaryDirectory("swiftvmm-libtpms")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let path = dir + "/tpm.state"
        do {
            let engine = try LibtpmsEngine(store: try TPMStateStore.open(path: path).store)
            try engine.powerOn()
            _ = try run(engine, TPM2.startupClear)
            engine.powerOff()
        }
        // Flip a byte inside every written copy of "permall" (both slots' data areas).
        let fd = try OwnedFD.open(path, flags: O_RDWR)
        for slot in 0..<2 {
            let at = UInt64(4096 + slot * ((64 + (1 << 20) + 4095) / 4096 * 4096) + 64 + 100)
            var b: [UInt8] = [0]
            _ = try b.withUnsafeMutableBytes { try fd.readFully(into: $0, at: at) }
            b[0] ^= 0x5A
            try b.withUnsafeBytes { try fd.write($0, at: at) }
        }
        let before = try OwnedFD.open(path, flags: O_RDONLY).readAll(limit: 8 << 20)
        let engine = try LibtpmsEngine(store: try TPMStateStore.open(path: path).store)
        defer { engine.powerOff() }
        let error = #expect(throws: TPMBackendError.self) { try engine.powerOn() }
        let message = error?.message ?? ""
        #expect(message.contains(path) && message.contains("\"permall\"") && message.contains("damaged"), "\(message)")
        #expect(!message.contains("\n"))
        #expect(try OwnedFD.open(path, flags: O_RDONLY).readAll(limit: 8 << 20) == before, "a refused state file is not written")
    }

    // MARK: Snapshots (a tiny guest on the real /dev/kvm; the TPM driven from the host)

    /// A machine whose guest spins, with `backend` as its TPM.
    static func spinningMachine(_ backend: any TPMBackend) throws -> Machine {
        var config = MachineConfig(memorySize: 16 << 20, console: RecordingConsole())
        config.tpm = backend
        return try Machine(config, boot: .program64(code: [0xEB, 0xFE], loadAddress: 0x100000))
    }

    /// Runs `command` through the worker (as the TIS would) and waits for its response.
    static func run(_ worker: TPMWorker, _ command: [UInt8]) -> [UInt8] {
        let box = Mutex<[UInt8]?>(nil)
        worker.submit(command, locality: 0) { r in box.withLock { $0 = r } }
        _ = worker.waitUntilIdle(timeoutMilliseconds: 60_000)
        return box.withLock { $0 } ?? []
    }

    static func worker(state path: String) throws -> TPMWorker {
        try TPMWorker(engine: try LibtpmsEngine(store: try TPMStateStore.open(path: path).store),
                      info: TPMBackendInfo(kind: .builtin, path: path))
    }

    @Test("a snapshot carries the TPM's state: clones restored into new state files read the NV index, write their own values apart, and the original's file is never touched; an existing state file is refused",
          .enabled(if: kvmAvailable(), "needs /dev/kvm"))
    func snapshotClones() throws {
        let dir = makeTemporaryDirectory("swiftvmm-libtpms-snap")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let value = Array("written before the snapshot".utf8)
        do {
            let tpm = try Self.worker(state: dir + "/original.state")
            try tpm.powerOnAndStart()
            let original = try Self.spinningMachine(tpm)
            #expect(TPM2.responseCode(Self.run(tpm, TPM2.nvDefine(Self.index, size: value.count))) == 0)
            #expect(TPM2.responseCode(Self.run(tpm, TPM2.nvWrite(Self.index, value))) == 0)
            #expect(TPM2.responseCode(Self.run(tpm, TPM2.pcrExtend(16, byte: 0xAA))) == 0)
            // What the TPM adds to a snapshot when no command is in flight: its state, taken and encoded.
            // The least of three takes: one take alone also measures the scheduler when the test
            // runs beside others on a loaded machine (a CI run saw 6.5 ms once; the first take is
            // usually 50-60 µs, the next ones less).
            original.pause()
            var takes: [UInt64] = []
            var exported: TPMBackendState?
            for _ in 0..<3 {
                let t = monotonicNanoseconds()
                exported = try tpm.exportState()
                takes.append(monotonicNanoseconds() - t)
            }
            original.resume()
            let added = takes.min()!
            let size = exported.map { $0.permanent.count + $0.volatile.count + $0.saveState.count } ?? 0
            print("TPM state in a snapshot: \(size) bytes, taken in \(takes.map { "\($0 / 1000) µs" }.joined(separator: ", "))")
            #expect(added < 5_000_000, "taking the TPM's state took \(added / 1000) µs")
            let _: SnapshotSummary = try original.createSnapshot(at: dir + "/snap")
            tpm.stop()
        }
        let originalBytes = try OwnedFD.open(dir + "/original.state", flags: O_RDONLY).readAll(limit: 8 << 20)
        let pcrBefore: [UInt8]
        do {
            // Clone 1: its own new file; the NV index and the PCR (volatile state) are there.
            var options = RestoreOptions(console: RecordingConsole(), generationID: .keep)
            let tpm = try Self.worker(state: dir + "/clone1.state")
            options.tpm = tpm
            _ = try Machine.restore(from: dir + "/snap", options: options)
            #expect(TPM2.nvReadData(Self.run(tpm, TPM2.nvRead(Self.index, size: value.count))) == value)
            pcrBefore = Self.run(tpm, TPM2.pcrRead(16))
            #expect(TPM2.responseCode(pcrBefore) == 0, "the TPM runs on from its volatile state (no Startup was sent)")
            #expect(pcrBefore.count > 32 && !pcrBefore.suffix(32).allSatisfy { $0 == 0 }, "PCR 16 holds the extension made before the snapshot")
            #expect(TPM2.responseCode(Self.run(tpm, TPM2.nvWrite(Self.index, Array("clone one's value here......".utf8.prefix(value.count))))) == 0)
            tpm.stop()
        }
        do {
            // Clone 2: also from the snapshot, it sees the snapshot's value, not clone 1's.
            var options = RestoreOptions(console: RecordingConsole(), generationID: .keep)
            let tpm = try Self.worker(state: dir + "/clone2.state")
            options.tpm = tpm
            _ = try Machine.restore(from: dir + "/snap", options: options)
            #expect(TPM2.nvReadData(Self.run(tpm, TPM2.nvRead(Self.index, size: value.count))) == value)
            #expect(Self.run(tpm, TPM2.pcrRead(16)) == pcrBefore, "the PCR extended before the snapshot")
            tpm.stop()
        }
        do {
            // Clone 1's file kept clone 1's value across its own restart.
            let tpm = try Self.worker(state: dir + "/clone1.state")
            try tpm.powerOnAndStart()
            #expect(TPM2.nvReadData(Self.run(tpm, TPM2.nvRead(Self.index, size: value.count))).map { Array($0.prefix(9)) } == Array("clone one".utf8))
            tpm.stop()
        }
        #expect(try OwnedFD.open(dir + "/original.state", flags: O_RDONLY).readAll(limit: 8 << 20) == originalBytes, "restores never write the original's file")
        do {
            // A state file that holds a TPM (here the original's) is refused for a restore.
            var options = RestoreOptions(console: RecordingConsole(), generationID: .keep)
            let tpm = try Self.worker(state: dir + "/original.state")
            options.tpm = tpm
            do {
                _ = try Machine.restore(from: dir + "/snap", options: options)
                Issue.record("a restore into the original's state file went ahead")
            } catch {
                #expect("\(error)".contains("already holds a TPM's state"), "\(error)")
            }
            tpm.stop()
        }
        #expect(try OwnedFD.open(dir + "/original.state", flags: O_RDONLY).readAll(limit: 8 << 20) == originalBytes)
        do {
            // Without --tpm: the state lives in memory (the in-memory factory is asked for a TPM).
            var options = RestoreOptions(console: RecordingConsole(), generationID: .keep)
            let made = Mutex<TPMWorker?>(nil)
            let memory = dir + "/memory.state"
            options.inMemoryTPM = { () throws(TPMStateError) -> any TPMBackend in
                do {
                    let w = try Self.worker(state: memory)
                    made.withLock { $0 = w }
                    return w
                } catch { throw TPMStateError("\(error)") }
            }
            _ = try Machine.restore(from: dir + "/snap", options: options)
            let tpm = try #require(made.withLock { $0 })
            #expect(TPM2.nvReadData(Self.run(tpm, TPM2.nvRead(Self.index, size: value.count))) == value)
            tpm.stop()
        }
    }

    // MARK: The snapshot fixture with a TPM

    /// Tests/Fixtures/snapshots/v1.0-baseline-tpm: the counting guest (4 MiB, one vCPU, ACPI,
    /// baseline CPU) with a builtin TPM whose NV index `index` holds `fixtureValue`, saved while it
    /// ran (format 1.0, `dev.tpm` version 2). It must keep loading in every later version.
    static let fixture = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("Fixtures/snapshots/v1.0-baseline-tpm").path
    static let fixtureValue = Array("the fixture's TPM remembers this".utf8)
    /// inc qword [0x200000]; mov al, [0x200000]; mov dx, 0x3f8; out dx, al; jmp back (as SnapshotGuestTests).
    static let counter: [UInt8] = [0x48, 0xFF, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00, 0x8A, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00,
                                   0x66, 0xBA, 0xF8, 0x03, 0xEE, 0xEB, 0xEA]

    @Test("the TPM fixture restores: its TPM state into a new file (the NV index reads back) and the guest counts on",
          .enabled(if: kvmAvailable(), "needs /dev/kvm"))
    func fixtureRestores() throws {
        let dir = makeTemporaryDirectory("swiftvmm-tpm-fixture")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let snapshot = try SnapshotReader.open(directory: Self.fixture)
        #expect(snapshot.header.formatMajor == 1 && snapshot.header.formatMinor == 0)
        #expect(snapshot.section(named: "dev.tpm")?.version == 2)
        let console = RecordingConsole()
        var options = RestoreOptions(console: console, generationID: .new(VMGenID.randomGUID()))
        let tpm = try Self.worker(state: dir + "/clone.state")
        options.tpm = tpm
        options.workingSet = false // the committed fixture is never written
        let m = try Machine.restore(from: Self.fixture, options: options)
        defer { tpm.stop() }
        #expect(TPM2.nvReadData(Self.run(tpm, TPM2.nvRead(Self.index, size: Self.fixtureValue.count))) == Self.fixtureValue)
        let box = Mutex<MachineExit?>(nil)
        let thread = try OSThread(name: "fixture", role: .io) { box.withLock { $0 = m.run() } }
        for _ in 0..<3000 where console.output.count < 5 { usleep(10_000) }
        m.requestExit(.quit("test"))
        thread.join()
        let out = console.output
        try #require(out.count >= 5)
        #expect((1..<out.count).allSatisfy { out[$0] == out[$0 - 1] &+ 1 }, "counts up: \(out.prefix(10))")
    }

    @Test("under the seccomp filters, as in swiftvmm, a TPM restored from the fixture serves commands that use OpenSSL on its own thread (its lazy set-up, opening its configuration on the first AES use, killed every restored builtin-TPM clone with SIGSYS)",
          .enabled(if: kvmAvailable(), "needs /dev/kvm"))
    func restoredUnderSeccomp() async {
        // A process of its own: OpenSSL must not have been set up by an earlier test, and a filter
        // that kills takes the whole process.
        let result = await #expect(processExitsWith: .exitCode(0), observing: [\.standardErrorContent]) {
            try! Seccomp.enable(.on)
            pinLocalTimeZone()
            let dir = makeTemporaryDirectory("swiftvmm-tpm-seccomp")
            var options = RestoreOptions(console: RecordingConsole(), generationID: .new(VMGenID.randomGUID()))
            let tpm = try! LibtpmsEngineTests.worker(state: dir + "/clone.state")
            options.tpm = tpm
            options.workingSet = false
            let m = try! Machine.restore(from: LibtpmsEngineTests.fixture, options: options)
            // Commands that use OpenSSL: random bytes (its generator), a PCR extend (its digests), a
            // key pair made (its key generation), an object sealed under it (its AES).
            let random = TPM2.responseCode(LibtpmsEngineTests.run(tpm, TPM2.getRandom(16)))
            let extend = TPM2.responseCode(LibtpmsEngineTests.run(tpm, TPM2.pcrExtend(16, byte: 1)))
            let parent = TPM2.createdHandle(LibtpmsEngineTests.run(tpm, TPM2.createPrimaryRSA2048))
            // Sent again (up to 5 more times) while the TPM answers TPM_RC_RETRY.
            var sealed: UInt32 = 0x922
            for _ in 0..<6 where sealed == 0x922 {
                sealed = TPM2.responseCode(LibtpmsEngineTests.run(tpm, TPM2.createSealed(parent: parent ?? 0, [1, 2, 3])))
            }
            let data = TPM2.nvReadData(LibtpmsEngineTests.run(tpm, TPM2.nvRead(LibtpmsEngineTests.index, size: LibtpmsEngineTests.fixtureValue.count)))
            tpm.stop()
            withExtendedLifetime(m) {}
            _ = runProcess(["rm", "-rf", dir])
            // 3: the TPM answered, but with an error or not with the fixture's value.
            exit(random == 0 && extend == 0 && parent != nil && sealed == 0 && data == LibtpmsEngineTests.fixtureValue ? 0 : 3)
        }
        let text = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(!text.contains("seccomp:"), "\(text)")
    }

    @Test("write the TPM fixture (only with SWIFTVMM_WRITE_TPM_FIXTURE=DIR)",
          .enabled(if: ProcessInfo.processInfo.environment["SWIFTVMM_WRITE_TPM_FIXTURE"] != nil, "set SWIFTVMM_WRITE_TPM_FIXTURE=DIR"))
    func writeFixture() throws {
        let target = try #require(ProcessInfo.processInfo.environment["SWIFTVMM_WRITE_TPM_FIXTURE"])
        let dir = makeTemporaryDirectory("swiftvmm-tpm-fixture")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let tpm = try Self.worker(state: dir + "/state")
        try tpm.powerOnAndStart()
        defer { tpm.stop() }
        let console = RecordingConsole()
        var config = MachineConfig(memorySize: 4 << 20, console: console)
        config.cpuModel = .baseline
        config.tpm = tpm
        let m = try Machine(config, boot: .program64(code: Self.counter, loadAddress: 0x100000))
        #expect(TPM2.responseCode(Self.run(tpm, TPM2.nvDefine(Self.index, size: Self.fixtureValue.count))) == 0)
        #expect(TPM2.responseCode(Self.run(tpm, TPM2.nvWrite(Self.index, Self.fixtureValue))) == 0)
        let thread = try OSThread(name: "fixture", role: .io) { _ = m.run() }
        for _ in 0..<3000 where console.output.count < 20 { usleep(10_000) }
        let _: SnapshotSummary = try m.createSnapshot(at: target)
        m.requestExit(.quit("fixture written"))
        thread.join()
    }

    @Test("while the state file's writes stall (600 ms per sync), the guest's TIS exits go on and QMP query-status answers within 100 ms",
          .enabled(if: kvmAvailable(), "needs /dev/kvm"))
    func stalledStateFile() throws {
        let dir = makeTemporaryDirectory("swiftvmm-tpm-stall")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let store = try TPMStateStore.open(path: dir + "/state").store
        let engine = try LibtpmsEngine(store: store)
        let tpm = try TPMWorker(engine: engine, info: TPMBackendInfo(kind: .builtin, path: dir + "/state"))
        try tpm.powerOnAndStart()
        defer { tpm.stop() }
        let data: [UInt8] = Array(1...8)
        #expect(TPM2.responseCode(Self.run(tpm, TPM2.nvDefine(Self.index, size: data.count))) == 0)
        store.syncDelayForTesting = 600_000
        let console = TimestampConsole()
        var config = MachineConfig(memorySize: 16 << 20, console: console)
        config.tpm = tpm
        let m = try Machine(config, boot: .program64(code: TPMGuestPrograms.latency(command: TPM2.nvWrite(Self.index, data), baselineReads: 500),
                                                     loadAddress: 0x100000))
        let session = QMPSession(handler: MachineCommands(machine: m, emit: { _, _ in }), fdSets: FdSets())
        _ = session.receive(Array(#"{"execute": "qmp_capabilities"}"#.utf8))
        let thread = try OSThread(name: "stall-guest", role: .io) { _ = m.run() }
        // Ask query-status over and over while the guest waits for its NV write.
        var slowest: UInt64 = 0, asked = 0
        while console.time(of: 0x44) == nil && asked < 100_000 {
            let t = monotonicNanoseconds()
            let reply = session.receive(Array(#"{"execute": "query-status"}"#.utf8))
            slowest = max(slowest, monotonicNanoseconds() - t)
            #expect(reply.first?["return"]?["status"]?.stringValue == "running")
            asked += 1
            usleep(5000)
        }
        thread.join()
        let g = try #require(console.time(of: 0x47)), d = try #require(console.time(of: 0x44))
        let countBytes = console.bytes(after: 0x44, count: 4)
        let reads = countBytes.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        print("stalled state file: the NV write took \((d - g) / 1_000_000) ms; the guest read STS \(reads) times meanwhile; \(asked) query-status, slowest \(slowest / 1000) µs")
        #expect(d - g >= 550_000_000, "the write waited for the stalled sync")
        #expect(reads > 100, "the guest's TIS exits went on during the stall")
        #expect(slowest < 100_000_000, "query-status took \(slowest / 1_000_000) ms")
        store.syncDelayForTesting = 0
        #expect(TPM2.nvReadData(Self.run(tpm, TPM2.nvRead(Self.index, size: data.count))) == data, "the write landed")
    }
}
