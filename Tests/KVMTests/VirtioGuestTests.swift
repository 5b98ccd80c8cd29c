import Foundation
import Glibc
@testable import Machine
import Synchronization
import Testing
import TestSupport
import VMMCore
import VMMSys
import Virtio
import Control

/// virtio-mmio devices on a real vCPU: the guest's QueueNotify write reaches the device's thread
/// through KVM (an ioeventfd), the thread serves the chain off the vCPU, and the guest sees the used
/// ring change in its memory.
@Suite("KVM tiny guests: virtio", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct VirtioGuestTests {
    /// A drive of `sectors` sectors whose sector n is filled with byte n.
    final class PatternStore: BlockStore, @unchecked Sendable {
        let bytes: Mutex<[UInt8]>
        let size: UInt64
        let readOnly = false
        let canDiscard = false
        init(sectors: Int) {
            size = UInt64(sectors) * 512
            bytes = Mutex((0..<sectors).flatMap { [UInt8](repeating: UInt8(truncatingIfNeeded: $0), count: 512) })
        }
        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
            bytes.withLock { b in b.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) } }
            return true
        }
        func write(_ data: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
            bytes.withLock { b in b.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data) }
            return true
        }
        func flush() -> Bool { true }
        func discard(offset: UInt64, length: UInt64) -> Bool { false }
        func writeZeroes(offset: UInt64, length: UInt64, unmap: Bool) -> Bool { false }
    }

    /// The host plays the driver's set-up (what Linux does before DRIVER_OK): queue 0 of 8 entries
    /// with its rings at `rings`, one chain of `buffers` (address, length, writable) made available.
    static func setUp(_ device: VirtioMMIO, memory: GuestMemory, rings: UInt64, buffers: [(UInt64, UInt32, Bool)]) throws {
        func w(_ offset: UInt64, _ value: UInt32) {
            withUnsafeBytes(of: value.littleEndian) { device.write(offset: offset, data: $0) }
        }
        w(0x070, 1); w(0x070, 3)
        w(0x024, 1); w(0x020, 1); w(0x024, 0); w(0x020, 0)       // VERSION_1 only
        w(0x070, 0xB)
        w(0x030, 0); w(0x038, 8)
        w(0x080, UInt32(rings)); w(0x090, UInt32(rings + 0x1000)); w(0x0A0, UInt32(rings + 0x2000))
        w(0x044, 1)
        w(0x070, 0xF)
        for (i, b) in buffers.enumerated() {
            let d = GuestAddress(rings + 16 * UInt64(i))
            try memory.write(b.0, at: d)
            try memory.write(b.1, at: GuestAddress(d.rawValue + 8))
            try memory.write(UInt16((i + 1 < buffers.count ? 1 : 0) | (b.2 ? 2 : 0)), at: GuestAddress(d.rawValue + 12))
            try memory.write(UInt16(i + 1), at: GuestAddress(d.rawValue + 14))
        }
        try memory.write(UInt16(0), at: GuestAddress(rings + 0x1004))    // avail.ring[0] = head 0
        try memory.write(UInt16(1), at: GuestAddress(rings + 0x1002))    // avail.idx = 1
    }

    @Test("a guest's QueueNotify writes make virtio-blk read a sector and virtio-rng fill a buffer, served off the vCPU")
    func blockAndRNG() throws {
        let console = RecordingConsole()
        var config = MachineConfig(memorySize: 16 << 20, console: console)
        let store = PatternStore(sectors: 8)
        config.virtio = [.block(store: store, id: "kvm-test"), .rng]
        let blkRings: UInt64 = 0x200000, rngRings: UInt64 = 0x300000
        var code: [UInt8] = []
        // Kick both devices: mov ebx, window; xor eax, eax; mov [rbx+0x50], eax.
        for n in 0..<2 {
            let window = UInt32(Layout.virtioMMIO + Layout.virtioStride * UInt64(n))
            code += [0xBB] + withUnsafeBytes(of: window.littleEndian, Array.init) + [0x31, 0xC0, 0x89, 0x43, 0x50]
        }
        // Wait for each used.idx to become 1: movzx eax, word [abs]; cmp eax, 1; jne back.
        for rings in [blkRings, rngRings] {
            let used = UInt32(rings + 0x2002)
            code += [0x0F, 0xB7, 0x04, 0x25] + withUnsafeBytes(of: used.littleEndian, Array.init) + [0x83, 0xF8, 0x01, 0x75, 0xF3]
        }
        code += [0x66, 0xBA, 0xF8, 0x03, 0xB0, 0x44, 0xEE]             // out 'D'
        code += [0x66, 0xBA, 0xF9, 0x0C, 0xB0, 0x0F, 0xEE]             // reset through 0xCF9
        let m = try Machine(config, boot: .program64(code: code, loadAddress: 0x100000))
        #expect(m.platform.virtio.map(\.name) == ["virtio-blk0", "virtio-rng1"])
        let header: UInt64 = 0x400000, data: UInt64 = 0x401000, status: UInt64 = 0x402000, random: UInt64 = 0x403000
        try m.memory.write(UInt32(0), at: GuestAddress(header))            // VIRTIO_BLK_T_IN
        try m.memory.write(UInt64(3), at: GuestAddress(header + 8))        // sector 3
        try m.memory.write(UInt8(0xEE), at: GuestAddress(status))
        try Self.setUp(m.platform.virtio[0], memory: m.memory, rings: blkRings,
                       buffers: [(header, 16, false), (data, 512, true), (status, 1, true)])
        try Self.setUp(m.platform.virtio[1], memory: m.memory, rings: rngRings, buffers: [(random, 64, true)])

        #expect(m.run() == .reset("ACPI reset register"))
        #expect(console.output == Array("D".utf8))
        #expect(try m.memory.read(data, count: 512) == [UInt8](repeating: 3, count: 512))
        #expect(try m.memory.read(UInt8.self, at: GuestAddress(status)) == 0)
        #expect(try m.memory.read(UInt32.self, at: GuestAddress(blkRings + 0x2008)) == 513, "used.len: the data and the status byte")
        #expect(try m.memory.read(UInt32.self, at: GuestAddress(rngRings + 0x2008)) == 64)
        let entropy = try m.memory.read(random, count: 64)
        #expect(Set(entropy).count > 16, "64 random bytes: \(entropy)")
        // The used buffers raised each device's interrupt.
        #expect(m.platform.virtio.allSatisfy { $0.saveState().interruptStatus & 1 == 1 })
    }
}

extension VirtioGuestTests {
    /// Kicks both devices and waits for each to use its chain, prints 'D'; then kicks the rng
    /// until its used.idx reaches 2 (a chain the host adds later), prints 'E' and halts.
    static func snapshotProgram(blkRings: UInt64, rngRings: UInt64) -> [UInt8] {
        var code: [UInt8] = []
        for n in 0..<2 {
            let window = UInt32(Layout.virtioMMIO + Layout.virtioStride * UInt64(n))
            code += [0xBB] + withUnsafeBytes(of: window.littleEndian, Array.init) + [0x31, 0xC0, 0x89, 0x43, 0x50]
        }
        for rings in [blkRings, rngRings] {
            let used = UInt32(rings + 0x2002)
            code += [0x0F, 0xB7, 0x04, 0x25] + withUnsafeBytes(of: used.littleEndian, Array.init) + [0x83, 0xF8, 0x01, 0x75, 0xF3]
        }
        code += [0x66, 0xBA, 0xF8, 0x03, 0xB0, 0x44, 0xEE]             // out 'D'
        let used = UInt32(rngRings + 0x2002)
        code += [0x31, 0xC0, 0x89, 0x43, 0x50]                          // 1: kick the rng (rbx is its window)
        code += [0x0F, 0xB7, 0x04, 0x25] + withUnsafeBytes(of: used.littleEndian, Array.init) + [0x83, 0xF8, 0x02, 0x75, 0xEE]
        code += [0x66, 0xBA, 0xF8, 0x03, 0xB0, 0x45, 0xEE]             // out 'E'
        code += [0xFA, 0xF4, 0xEB, 0xFD]                               // cli; 2: hlt; jmp 2b
        return code
    }

    @Test("a snapshot holds the virtio devices between requests: the clone's queues go on where they were, the drive copy is the image, a different drive is refused")
    func snapshotAndRestore() throws {
        let dir = makeTemporaryDirectory("swiftvmm-virtio")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let console = RecordingConsole()
        var config = MachineConfig(memorySize: 16 << 20, console: console)
        let store = PatternStore(sectors: 8)
        config.virtio = [.block(store: store, id: "kvm-test"), .rng]
        let blkRings: UInt64 = 0x200000, rngRings: UInt64 = 0x300000
        let m = try Machine(config, boot: .program64(code: Self.snapshotProgram(blkRings: blkRings, rngRings: rngRings), loadAddress: 0x100000))
        let header: UInt64 = 0x400000, data: UInt64 = 0x401000, status: UInt64 = 0x402000, random: UInt64 = 0x403000
        try m.memory.write(UInt32(0), at: GuestAddress(header))
        try m.memory.write(UInt64(5), at: GuestAddress(header + 8))
        try Self.setUp(m.platform.virtio[0], memory: m.memory, rings: blkRings,
                       buffers: [(header, 16, false), (data, 512, true), (status, 1, true)])
        try Self.setUp(m.platform.virtio[1], memory: m.memory, rings: rngRings, buffers: [(random, 64, true)])
        let wait = SnapshotGuestTests.start(m)
        #expect(SnapshotGuestTests.waitFor(console, bytes: 1))
        let summary = try m.createSnapshot(at: dir + "/snap", copyDrives: true)
        #expect(summary.wasRunning)
        let saved = m.platform.virtio.map { $0.saveSnapshot() }
        m.requestExit(.quit("test"))
        _ = wait()
        #expect(console.output == Array("D".utf8))
        // The drive's copy beside state.bin is the image.
        let copy = try #require(FileManager.default.contents(atPath: dir + "/snap/" + Machine.driveCopyName(0)))
        #expect(Array(copy) == store.bytes.withLock { $0 })

        // A restore needs the same drives: none, or one of another size, is refused.
        #expect(throws: MachineError.self) { try Machine.restore(from: dir + "/snap", options: RestoreOptions(console: RecordingConsole(), generationID: .keep)) }
        var wrong = RestoreOptions(console: RecordingConsole(), generationID: .keep)
        wrong.drives = [(PatternStore(sectors: 16), "kvm-test")]
        do {
            _ = try Machine.restore(from: dir + "/snap", options: wrong)
            Issue.record("a drive of another size was accepted")
        } catch {
            #expect("\(error)".contains("drive differs"), "\(error)")
        }

        let c2 = RecordingConsole()
        var options = RestoreOptions(console: c2, generationID: .keep)
        options.drives = [(PatternStore(sectors: 8), "kvm-test")]
        let clone = try Machine.restore(from: dir + "/snap", options: options)
        #expect(clone.platform.virtio.map { $0.saveSnapshot() } == saved)
        // A second rng chain (descriptor 1, 32 bytes) made available: the clone's guest is kicking.
        let random2: UInt64 = 0x404000
        try clone.memory.write(random2, at: GuestAddress(rngRings + 16))
        try clone.memory.write(UInt32(32), at: GuestAddress(rngRings + 24))
        try clone.memory.write(UInt16(2), at: GuestAddress(rngRings + 28))
        try clone.memory.write(UInt16(1), at: GuestAddress(rngRings + 0x1006))
        try clone.memory.write(UInt16(2), at: GuestAddress(rngRings + 0x1002))
        let waitClone = SnapshotGuestTests.start(clone)
        #expect(SnapshotGuestTests.waitFor(c2, bytes: 1, seconds: 30))
        clone.requestExit(.quit("test"))
        _ = waitClone()
        #expect(c2.output == Array("E".utf8))
        #expect(try clone.memory.read(UInt32.self, at: GuestAddress(rngRings + 0x2004 + 8)) == 1, "used.ring[1].id")
        #expect(try clone.memory.read(UInt32.self, at: GuestAddress(rngRings + 0x2004 + 12)) == 32, "used.ring[1].len")
    }
}

extension VirtioGuestTests {
    final class LoopbackNet: NetBackend, @unchecked Sendable {
        let name = "test"
        let events = try! EventFD()
        var readinessDescriptor: Int32 { events.fd.rawValue }
        func receive(into buffer: UnsafeMutableRawBufferPointer) -> Int? { nil }
        func send(_ frame: UnsafeRawBufferPointer) -> Bool { true }
    }

    @Test("a machine with all four kinds of virtio device snapshots and restores; the network device keeps its MAC")
    func everyKind() throws {
        let dir = makeTemporaryDirectory("swiftvmm-virtio4")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        var config = MachineConfig(memorySize: 16 << 20, console: RecordingConsole())
        config.virtio = [.block(store: PatternStore(sectors: 4), id: ""), .net(backend: LoopbackNet(), mac: [0x52, 0x54, 0, 1, 2, 3]), .rng, .console]
        let m = try Machine(config, boot: .program64(code: [0xF4], loadAddress: 0x100000))
        #expect(m.virtioDevices.map(\.name) == ["virtio-blk0", "virtio-net1", "virtio-rng2", "virtio-con3"])
        #expect(m.networks == [NetInfo(name: "net0", mac: [0x52, 0x54, 0, 1, 2, 3], linkUp: true)])
        #expect(m.setLink("net0", up: false))
        _ = try m.createSnapshot(at: dir + "/snap")
        var options = RestoreOptions(console: RecordingConsole(), generationID: .keep)
        options.drives = [(PatternStore(sectors: 4), "")]
        options.nets = [LoopbackNet()]
        let clone = try Machine.restore(from: dir + "/snap", options: options)
        #expect(clone.virtioDevices.map(\.name) == m.virtioDevices.map(\.name))
        #expect(clone.networks == [NetInfo(name: "net0", mac: [0x52, 0x54, 0, 1, 2, 3], linkUp: false)])
        options.nets = []
        #expect(throws: MachineError.self) { try Machine.restore(from: dir + "/snap", options: options) }
    }
}

extension VirtioGuestTests {
    /// A drive whose reads take `delayMilliseconds`, saying when one has started.
    final class SlowStore: BlockStore, @unchecked Sendable {
        let inner = PatternStore(sectors: 8)
        let started = Atomic<Bool>(false)
        let delayMilliseconds: UInt32
        init(delayMilliseconds: UInt32) { self.delayMilliseconds = delayMilliseconds }
        var size: UInt64 { inner.size }
        let readOnly = false, canDiscard = false
        func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
            started.store(true, ordering: .releasing)
            usleep(delayMilliseconds * 1000)
            return inner.read(into: buffer, at: offset)
        }
        func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) -> Bool { inner.write(bytes, at: offset) }
        func flush() -> Bool { true }
        func discard(offset: UInt64, length: UInt64) -> Bool { false }
        func writeZeroes(offset: UInt64, length: UInt64, unmap: Bool) -> Bool { false }
    }

    @Test("a snapshot taken while a read is in flight waits for it: the snapshot holds its data and its used entry")
    func snapshotWaitsForRequestInFlight() throws {
        let dir = makeTemporaryDirectory("swiftvmm-virtio-inflight")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        var config = MachineConfig(memorySize: 16 << 20, console: RecordingConsole())
        let store = SlowStore(delayMilliseconds: 400)
        config.virtio = [.block(store: store, id: "")]
        let rings: UInt64 = 0x200000
        let window = UInt32(Layout.virtioMMIO)
        // Kick the drive, then spin.
        let code: [UInt8] = [0xBB] + withUnsafeBytes(of: window.littleEndian, Array.init) + [0x31, 0xC0, 0x89, 0x43, 0x50, 0xEB, 0xFE]
        let m = try Machine(config, boot: .program64(code: code, loadAddress: 0x100000))
        let header: UInt64 = 0x400000, data: UInt64 = 0x401000, status: UInt64 = 0x402000
        try m.memory.write(UInt32(0), at: GuestAddress(header))
        try m.memory.write(UInt64(6), at: GuestAddress(header + 8))
        try m.memory.write(UInt8(0xEE), at: GuestAddress(status))
        try Self.setUp(m.virtioDevices[0], memory: m.memory, rings: rings,
                       buffers: [(header, 16, false), (data, 512, true), (status, 1, true)])
        let wait = SnapshotGuestTests.start(m)
        var waited = 0
        while !store.started.load(ordering: .acquiring) && waited < 3000 {
            usleep(1000)
            waited += 1
        }
        let started = store.started.load(ordering: .acquiring)
        #expect(started, "the device never started the read")
        let before = ContinuousClock.now
        _ = try m.createSnapshot(at: dir + "/snap")
        #expect(ContinuousClock.now - before >= .milliseconds(200), "the snapshot did not wait for the read")
        m.requestExit(.quit("test"))
        _ = wait()

        var options = RestoreOptions(console: RecordingConsole(), generationID: .keep)
        options.drives = [(PatternStore(sectors: 8), "")]
        let clone = try Machine.restore(from: dir + "/snap", options: options)
        #expect(try clone.memory.read(UInt16.self, at: GuestAddress(rings + 0x2002)) == 1, "used.idx")
        #expect(try clone.memory.read(UInt32.self, at: GuestAddress(rings + 0x2008)) == 513, "used.len")
        #expect(try clone.memory.read(data, count: 512) == [UInt8](repeating: 6, count: 512))
        #expect(try clone.memory.read(UInt8.self, at: GuestAddress(status)) == 0)
        #expect(clone.virtioDevices[0].saveState().queues[0].nextUsed == 1)
    }
}

extension GuestMemory {
    func read(_ address: UInt64, count: Int) throws -> [UInt8] { try read(GuestAddress(address), count: count) }
}
