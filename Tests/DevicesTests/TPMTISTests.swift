import ACPI
import Devices
import Synchronization
import Testing
import TestSupport
import VMMCore
import WireFormat

/// A backend that records what it is handed and answers only when the test says so (so a test can
/// look at the TIS while a command is in flight).
final class ManualTPMBackend: TPMBackend, Sendable {
    struct Submitted {
        var command: [UInt8]
        var locality: UInt8
        var complete: @Sendable ([UInt8]) -> Void
    }

    let bufferSize: Int
    let info = TPMBackendInfo(kind: .builtin, path: "/test")
    private let submitted = Mutex<[Submitted]>([])
    private let cancels = Mutex(0)

    init(bufferSize: Int = 4096) { self.bufferSize = bufferSize }

    func submit(_ command: [UInt8], locality: UInt8, complete: @escaping @Sendable ([UInt8]) -> Void) {
        submitted.withLock { $0.append(Submitted(command: command, locality: locality, complete: complete)) }
    }

    func cancel() { cancels.withLock { $0 += 1 } }
    func waitUntilIdle(timeoutMilliseconds: Int) -> Bool { true }

    var commands: [Submitted] { submitted.withLock { $0 } }
    var cancelCount: Int { cancels.withLock { $0 } }

    /// Answers the oldest command not answered yet.
    func answer(_ response: [UInt8]) {
        let next = submitted.withLock { $0.isEmpty ? nil : $0.removeFirst() }
        next?.complete(response)
    }
}

@Suite("TPM TIS front end")
struct TPMTISTests {
    static let base: UInt64 = 0xFED4_0000
    let backend = ManualTPMBackend()
    let tis: TPMTIS
    var bus = BusHarness()

    init() throws {
        tis = TPMTIS(backend: backend, placement: .init(base: Self.base))
        try bus.attach(tis, at: Self.base, size: TPMTIS.windowSize)
    }

    // Register addresses of locality `l`.
    func access(_ l: UInt64) -> UInt64 { Self.base + l * 0x1000 }
    func sts(_ l: UInt64) -> UInt64 { Self.base + l * 0x1000 + 0x18 }
    func fifo(_ l: UInt64) -> UInt64 { Self.base + l * 0x1000 + 0x24 }
    func xfifo(_ l: UInt64) -> UInt64 { Self.base + l * 0x1000 + 0x80 }

    /// TPM2_GetRandom(16): tag 0x8001, size 12, command code 0x17B, bytesRequested 16.
    static let getRandom: [UInt8] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 16]
    static let randomResponse: [UInt8] = [0x80, 0x01, 0, 0, 0, 28, 0, 0, 0, 0, 0, 16] + (1...16).map { UInt8($0) }

    func status(_ l: UInt64 = 0) -> UInt32 { UInt32(bus.read(sts(l), size: 4)) }
    func burst(_ l: UInt64 = 0) -> Int { Int(status(l) >> 8 & 0xFFFF) }

    func requestLocality(_ l: UInt64) { bus.write8(access(l), 0x02) }
    func commandReady(_ l: UInt64 = 0) { bus.write(sts(l), size: 4, value: 0x40) }
    func go(_ l: UInt64 = 0) { bus.write(sts(l), size: 4, value: 0x20) }

    /// Writes `bytes` one at a time, as Linux does, checking Expect and stsValid after each.
    func send(_ bytes: [UInt8], locality l: UInt64 = 0) {
        for (i, b) in bytes.enumerated() {
            bus.write8(fifo(l), b)
            let s = status(l)
            #expect(s & 0x80 != 0, "stsValid after byte \(i)")
            if i < bytes.count - 1 { #expect(s & 0x08 != 0, "Expect after byte \(i) of \(bytes.count)") }
        }
    }

    func readResponse(_ l: UInt64 = 0) -> [UInt8] {
        var out: [UInt8] = []
        while status(l) & 0x10 != 0 {
            let n = min(burst(l), 4)
            #expect(n > 0)
            let v = bus.read(fifo(l), size: n)
            out += (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) }
            if out.count > 5000 { break }
        }
        return out
    }

    @Test("probe: IDs, capabilities and a valid ACCESS answer without a locality; STS and FIFO of an inactive locality read as ones")
    func probe() {
        #expect(bus.read(Self.base + 0xF00, size: 4) == 0x0001_1014)
        #expect(bus.read8(Self.base + 0xF04) == 1)
        #expect(bus.read(Self.base + 0x14, size: 4) == 0x3000_0697)
        #expect(bus.read(Self.base + 0x30, size: 4) == 0x0000_2100)
        #expect(bus.read8(access(0)) == 0x81, "tpmRegValidSts and 'not established', no active locality")
        #expect(status() == 0xFFFF_FFFF)
        #expect(bus.read8(fifo(0)) == 0xFF)
        #expect(bus.read(Self.base + 0x0C, size: 4) == 0, "no interrupt vector")
    }

    @Test("locality: request, pending request seen by the owner, relinquish hands over to the highest requester")
    func localityRequest() {
        requestLocality(0)
        #expect(bus.read8(access(0)) == 0xA1, "active, valid, no request bit left")
        requestLocality(2)
        requestLocality(1)
        #expect(bus.read8(access(0)) & 0x04 != 0, "locality 0 sees a pending request")
        #expect(bus.read8(access(2)) & 0x22 == 0x02, "locality 2 requested, not active")
        bus.write8(access(1), 0x20) // locality 1 withdraws its request (it is not the owner)
        #expect(bus.read8(access(1)) & 0x02 == 0)
        bus.write8(access(0), 0x20) // relinquish
        #expect(bus.read8(access(0)) & 0x20 == 0)
        #expect(bus.read8(access(2)) & 0x22 == 0x20, "locality 2 active, its request consumed")
        bus.write8(access(2), 0x20)
        #expect((0..<5).allSatisfy { bus.read8(access(UInt64($0))) & 0x20 == 0 }, "no locality active")
    }

    @Test("seize: a higher locality takes over and the loser sees beenSeized until it clears it; a lower one cannot")
    func seize() {
        requestLocality(1)
        bus.write8(access(0), 0x08)
        #expect(bus.read8(access(1)) & 0x20 != 0, "a lower locality's seize is ignored")
        bus.write8(access(3), 0x08)
        #expect(bus.read8(access(3)) & 0x20 != 0)
        #expect(bus.read8(access(1)) & 0x30 == 0x10, "locality 1 lost it and was seized")
        bus.write8(access(1), 0x10)
        #expect(bus.read8(access(1)) & 0x10 == 0)
    }

    @Test("a command written byte by byte, tpmGo, the response read in bursts, responseRetry, and commandReady")
    func commandCycle() throws {
        requestLocality(0)
        #expect(status() & 0x40 == 0, "idle until commandReady")
        commandReady()
        #expect(status() & 0xFF == 0x40)
        #expect(burst() == 4096)
        #expect(bus.read8(sts(0) + 1) == 0xFF, "a one-byte read of the burst count is capped")
        #expect(status() >> 26 & 3 == 1, "TPM family 2.0")
        send(Self.getRandom)
        #expect(status() & 0xFF == 0x80, "complete: stsValid, no Expect")
        #expect(burst() == 4096 - 12)
        go()
        let sent = try #require(backend.commands.first)
        #expect(sent.command == Self.getRandom)
        #expect(sent.locality == 0)
        #expect(tis.commandInFlight)
        #expect(status() & 0x10 == 0, "no data while the command runs")
        #expect(bus.read8(fifo(0)) == 0xFF, "nothing to read while it runs")
        backend.answer(Self.randomResponse)
        #expect(!tis.commandInFlight)
        #expect(status() & 0x90 == 0x90)
        #expect(burst() == Self.randomResponse.count)
        let first = readResponse()
        #expect(first == Self.randomResponse)
        #expect(status() & 0xFF == 0x80, "all read: stsValid only")
        bus.write(sts(0), size: 4, value: 0x02) // responseRetry
        // The XDATA_FIFO alias reads the same bytes, with 1-, 2- and 4-byte accesses.
        var again: [UInt8] = []
        var size = 1
        while status() & 0x10 != 0, again.count < 100 {
            let n = min(size, burst())
            let v = bus.read(xfifo(0) + 0x10, size: n)
            again += (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) }
            size = size == 4 ? 1 : size * 2
        }
        #expect(again == Self.randomResponse)
        commandReady()
        #expect(status() & 0xFF == 0x40, "ready for the next command")
        #expect(burst() == 4096)
    }

    @Test("a 4-byte FIFO write delivers four command bytes; a 2-byte STS write at +1 changes nothing")
    func wideFIFOWrites() throws {
        requestLocality(0)
        commandReady()
        for chunk in stride(from: 0, to: 12, by: 4) {
            let v = Self.getRandom[chunk..<chunk + 4].enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
            bus.write(fifo(0), size: 4, value: v)
        }
        bus.write(sts(0) + 1, size: 2, value: 0xFFFF)
        #expect(backend.commands.isEmpty)
        go()
        #expect(try #require(backend.commands.first).command == Self.getRandom)
    }

    @Test("commandReady aborts a command being received, and one in flight (its response is dropped)")
    func abort() throws {
        requestLocality(0)
        commandReady()
        send(Array(Self.getRandom.prefix(7)))
        #expect(status() & 0x08 != 0)
        commandReady()
        #expect(status() & 0xFF == 0x40)
        #expect(burst() == 4096, "the buffer is empty again")
        send(Self.getRandom)
        go()
        commandReady()
        #expect(tis.commandInFlight, "still in flight until the backend answers")
        backend.answer(Self.randomResponse)
        #expect(!tis.commandInFlight)
        #expect(status() & 0xFF == 0x40, "ready, and the dropped response is not readable")
        #expect(bus.read8(fifo(0)) == 0xFF)
        // commandCancel reaches the backend while a command runs.
        send(Self.getRandom)
        go()
        bus.write(sts(0), size: 4, value: 1 << 24)
        #expect(backend.cancelCount == 1)
        backend.answer(Self.randomResponse)
        #expect(readResponse() == Self.randomResponse)
    }

    @Test("writes from a locality that is not active, and every write to locality 4, are ignored")
    func wrongLocality() {
        requestLocality(0)
        commandReady()
        bus.write8(fifo(1), 0x80)
        bus.write(sts(1), size: 4, value: 0x40)
        #expect(burst() == 4096, "locality 1's FIFO write went nowhere")
        bus.write8(access(4), 0x08)
        #expect(bus.read8(access(0)) & 0x20 != 0, "locality 4 cannot seize")
        bus.write(Self.base + 0x1008, size: 4, value: 0x8000_0087)
        #expect(bus.read(Self.base + 0x1008, size: 4) == 0x08, "INT_ENABLE of an inactive locality unchanged")
        bus.write(Self.base + 0x0008, size: 4, value: 0x8000_0087)
        #expect(bus.read(Self.base + 0x0008, size: 4) == 0x8000_0087)
        #expect(backend.commands.isEmpty)
    }

    @Test("a command larger than the buffer: the extra bytes are dropped, Expect clears, and tpmGo gets TPM_RC_COMMAND_SIZE without the backend")
    func oversizedCommand() {
        requestLocality(0)
        commandReady()
        var big: [UInt8] = [0x80, 0x01, 0, 0, 0x13, 0x88, 0, 0, 0x01, 0x7B] // claims 5000 bytes
        big += [UInt8](repeating: 0xAB, count: 4097 - big.count)
        for b in big { bus.write8(fifo(0), b) }
        #expect(status() & 0x88 == 0x80, "stsValid, Expect cleared")
        go()
        #expect(backend.commands.isEmpty)
        #expect(readResponse() == TPMTIS.errorResponse(TPMTIS.rcCommandSize))
    }

    @Test("headers that lie about the size: under 10 bytes, or fewer than were written, get TPM_RC_COMMAND_SIZE")
    func lyingHeaders() {
        requestLocality(0)
        for (command, what) in [([0x80, 0x01, 0, 0, 0, 8, 0, 0] as [UInt8], "size 8"),
                                ([0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 16, 0xEE, 0xEE], "size 12, 14 written"),
                                ([0x80, 0x01, 0, 0, 0, 0], "size 0")] {
            commandReady()
            for b in command { bus.write8(fifo(0), b) }
            #expect(status() & 0x08 == 0, "\(what): Expect is clear once the size is reached")
            go()
            #expect(readResponse() == TPMTIS.errorResponse(TPMTIS.rcCommandSize), "\(what)")
        }
        // A header claiming more than was written keeps Expect set, and tpmGo does nothing.
        commandReady()
        for b in Self.getRandom.prefix(11) { bus.write8(fifo(0), b) }
        go()
        #expect(status() & 0x08 != 0)
        #expect(backend.commands.isEmpty)
        #expect(!tis.commandInFlight)
        // tpmGo after five bytes (no size yet) does nothing either.
        commandReady()
        for b in Self.getRandom.prefix(5) { bus.write8(fifo(0), b) }
        go()
        #expect(!tis.commandInFlight)
    }

    @Test("a backend response larger than the buffer, or lying about its size, reaches the guest as TPM_RC_FAILURE")
    func badResponses() {
        let small = ManualTPMBackend(bufferSize: 64)
        let tis = TPMTIS(backend: small, placement: .init(base: Self.base))
        var bus = BusHarness()
        try? bus.attach(tis, at: Self.base, size: TPMTIS.windowSize)
        bus.write8(access(0), 0x02)
        for response in [[0x80, 0x01, 0, 0, 0, 100] + [UInt8](repeating: 0, count: 94), // 100 > 64
                         [0x80, 0x01, 0, 0, 0, 30, 0, 0, 0, 0], // says 30, has 10
                         [0x80, 0x01, 0, 0], // no header
                         []] as [[UInt8]] {
            bus.write(sts(0), size: 4, value: 0x40)
            for b in Self.getRandom { bus.write8(fifo(0), b) }
            bus.write(sts(0), size: 4, value: 0x20)
            small.answer(response)
            var got: [UInt8] = []
            while bus.read(sts(0), size: 4) & 0x10 != 0, got.count < 200 { got.append(bus.read8(fifo(0))) }
            #expect(got == TPMTIS.errorResponse(TPMTIS.rcFailure), "response of \(response.count) bytes")
        }
        #expect(tis.bufferSize == 64)
    }

    @Test("relinquishing the locality mid-command drops the command; the next owner starts from idle")
    func localityChangeDropsCommand() {
        requestLocality(0)
        commandReady()
        send(Array(Self.getRandom.prefix(6)))
        bus.write8(access(0), 0x20)
        requestLocality(1)
        #expect(status(1) & 0xFF == 0x00, "idle: commandReady clear")
        commandReady(1)
        #expect(burst(1) == 4096)
        send(Self.getRandom, locality: 1)
        go(1)
        #expect(backend.commands.first?.locality == 1)
    }

    @Test("snapshot: save → restore → save gives the same bytes; the golden layout; a command in flight is never restored")
    func snapshot() throws {
        requestLocality(0)
        commandReady()
        send(Self.getRandom)
        go()
        backend.answer(Self.randomResponse)
        _ = bus.read(fifo(0), size: 4)
        let saved = tis.saveSnapshot()
        let other = TPMTIS(backend: ManualTPMBackend(), placement: .init(base: Self.base))
        try other.restoreSnapshot(saved, version: TPMTIS.snapshotVersion)
        #expect(other.saveSnapshot() == saved)
        #expect(other.saveState() == tis.saveState())
        // Golden bytes: locality 0 active, no requests/seizes, completion, no flags, buffer 4096,
        // INT_ENABLE 8 ×5, INT_STATUS 0 ×5, offset 4, then the response as a length-prefixed blob.
        var golden: [UInt8] = [0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x10, 0x00, 0x00]
        for _ in 0..<5 { golden += [8, 0, 0, 0] }
        for _ in 0..<5 { golden += [0, 0, 0, 0] }
        golden += [4, 0, 0, 0, 28, 0, 0, 0] + Self.randomResponse
        // Version 2: no TPM state attached (0).
        #expect(saved == golden + [0])
        // The version-1 layout (no byte for the TPM's state) still loads.
        let v1 = TPMTIS(backend: ManualTPMBackend(), placement: .init(base: Self.base))
        try v1.restoreSnapshot(golden, version: 1)
        #expect(v1.saveSnapshot() == saved)
        // With the TPM's state attached, the blobs follow; a restore hands them over once.
        tis.attachBackendState(TPMBackendState(format: .libtpms, permanent: [7, 7], volatile: [], saveState: [9]))
        let withState = tis.saveSnapshot()
        #expect(withState == golden + [1, 1, 2, 0, 0, 0, 7, 7, 0, 0, 0, 0, 1, 0, 0, 0, 9])
        tis.attachBackendState(nil)
        try v1.restoreSnapshot(withState, version: 2)
        #expect(v1.takeRestoredBackendState() == TPMBackendState(format: .libtpms, permanent: [7, 7], volatile: [], saveState: [9]))
        #expect(v1.takeRestoredBackendState() == nil)
        #expect(try TPMTIS.savedBackendStateFormat(withState, version: 2) == .libtpms)
        #expect(try TPMTIS.savedBackendStateFormat(saved, version: 2) == nil)
        var noPermanent = golden + [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        var badFormat = withState
        badFormat[golden.count + 1] = 3
        #expect(throws: LEDecodeError.self, "format 3") { try v1.restoreSnapshot(badFormat, version: 2) }
        #expect(throws: LEDecodeError.self, "a TPM state without its permanent part") { try v1.restoreSnapshot(noPermanent, version: 2) }
        noPermanent[golden.count] = 2
        #expect(throws: LEDecodeError.self, "hasBackendState 2") { try v1.restoreSnapshot(noPermanent, version: 2) }

        // In flight: the payload says execution, and restore refuses it.
        var inFlight = golden + [0]
        inFlight[3] = 3
        #expect(throws: LEDecodeError.self) { try other.restoreSnapshot(inFlight, version: 2) }
        #expect(other.saveSnapshot() == saved, "a refused payload changes nothing")
        // Other corruptions: locality 7, unknown flags, a response that contradicts its header,
        // a buffer over the TIS's, a truncated payload.
        for (offset, value) in [(0, UInt8(7)), (4, 0x80), (1, 0x20), (2, 0x40), (golden.count - 28 + 5, 99)] {
            var bad = golden
            bad[offset] = value
            #expect(throws: LEDecodeError.self, "byte \(offset) = \(value)") { try other.restoreSnapshot(bad, version: 1) }
            #expect(throws: LEDecodeError.self, "byte \(offset) = \(value)") { try other.restoreSnapshot(bad + [0], version: 2) }
        }
        for n in [0, 1, 8, 60, golden.count - 1, golden.count] {
            #expect(throws: LEDecodeError.self, "truncated to \(n)") { try other.restoreSnapshot(Array(golden.prefix(n)), version: 2) }
        }
        let small = TPMTIS(backend: ManualTPMBackend(bufferSize: 16), placement: .init(base: Self.base))
        #expect(throws: LEDecodeError.self, "a 28-byte response into a 16-byte buffer") {
            try small.restoreSnapshot(saved, version: 1)
        }
        // The restored TIS goes on reading where the saved one was.
        var bus2 = BusHarness()
        try bus2.attach(other, at: Self.base, size: TPMTIS.windowSize)
        #expect(bus2.read(fifo(0), size: 4) == 0x0000_1C00, "bytes 4-7 of the response (0, 28, 0, 0)")
    }

    @Test("a response for a command from before a restore is dropped")
    func staleResponseAfterRestore() throws {
        requestLocality(0)
        commandReady()
        let idle = tis.saveSnapshot()
        send(Self.getRandom)
        go()
        try tis.restoreSnapshot(idle, version: TPMTIS.snapshotVersion)
        backend.answer(Self.randomResponse)
        #expect(status() & 0xFF == 0x40, "still ready: the late response did not land")
    }

    @Test("ACPI: MSFT0101 with its 20 KiB window and no interrupt; a 76-byte TPM2 table with start method 6")
    func acpi() {
        let aml = AML.list(tis.dsdtAML).bytes
        #expect(aml.contains(subsequence: Array("MSFT0101".utf8)))
        // Memory32Fixed: tag 0x86, length 9, read-write, base, length.
        #expect(aml.contains(subsequence: [0x86, 0x09, 0x00, 0x01, 0x00, 0x00, 0xD4, 0xFE, 0x00, 0x50, 0x00, 0x00]))
        #expect(!aml.contains(subsequence: [0x22]) || !aml.contains(subsequence: [0x89, 0x06]), "no IRQ descriptor")
        let table = TPMTIS.tpm2Table().bytes
        #expect(table.count == 76)
        #expect(Array(table[0..<4]) == Array("TPM2".utf8))
        #expect(table[8] == 4, "revision 4")
        #expect(table[48] == 6, "start method: TIS over MMIO")
        #expect(table.reduce(UInt8(0), &+) == 0, "checksum")
        #expect(table[64..<76].allSatisfy { $0 == 0 }, "no event log")
    }
}

extension Array where Element == UInt8 {
    func contains(subsequence s: [UInt8]) -> Bool {
        guard s.count <= count else { return false }
        return (0...(count - s.count)).contains { Array(self[$0..<$0 + s.count]) == s }
    }
}
