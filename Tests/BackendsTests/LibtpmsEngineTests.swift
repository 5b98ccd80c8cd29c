import Glibc
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
}
