import Foundation
import Glibc
import Synchronization
import Devices
import KVM
import Machine
import Snapshot
import Testing
import TestSupport
import VMMCore
import VMMSys

/// Whole-machine snapshots of a tiny guest on the real /dev/kvm: save while it runs, restore into
/// new machines (clones), and check that each continues exactly where the original was saved.
@Suite("KVM snapshot and restore", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct SnapshotGuestTests {
    /// Counts in memory at 0x200000 and sends the counter's low byte to COM1 on every step:
    ///
    ///     loop: inc qword [0x200000]
    ///           mov al, [0x200000]
    ///           mov dx, 0x3f8
    ///           out dx, al
    ///           jmp loop
    static let counter: [UInt8] = [0x48, 0xFF, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00,
                                   0x8A, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00,
                                   0x66, 0xBA, 0xF8, 0x03,
                                   0xEE,
                                   0xEB, 0xEA]
    static let counterAddress = GuestAddress(0x200000)

    /// Runs `machine` on a thread; returns a function that waits for the run's end.
    static func start(_ machine: Machine) -> () -> MachineExit {
        let box = ExitBox()
        let thread = try! OSThread(name: "test-machine", role: .io) { box.set(machine.run()) }
        return { thread.join(); return box.value! }
    }

    static func waitFor(_ console: RecordingConsole, bytes: Int, seconds: Int = 60) -> Bool {
        for _ in 0..<(seconds * 100) {
            if console.output.count >= bytes { return true }
            usleep(10_000)
        }
        return false
    }

    /// Checks that `output` counts up by one (mod 256) from `first`.
    static func countsUp(_ output: [UInt8], from first: UInt8) -> Bool {
        for (i, b) in output.enumerated() where b != first &+ UInt8(truncatingIfNeeded: i) { return false }
        return true
    }

    @Test("a running guest is saved, and two clones restored from it both continue from the saved count")
    func saveRunningAndRestoreTwice() throws {
        let dir = makeTemporaryDirectory("swiftvmm-snap")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let console = RecordingConsole()
        let original = try Machine(MachineConfig(memorySize: 16 << 20, console: console),
                                   boot: .program64(code: Self.counter, loadAddress: 0x100000))
        let originalGUID = try #require(original.vmgenid).guid
        let wait = Self.start(original)
        #expect(Self.waitFor(console, bytes: 10))
        let summary = try original.createSnapshot(at: dir + "/snap")
        #expect(summary.wasRunning)
        #expect(!original.isPaused, "a snapshot of a running VM resumes it")
        #expect(Self.waitFor(console, bytes: console.output.count + 5), "the original keeps running after the snapshot")
        original.requestExit(.quit("test"))
        #expect(wait() == .quit("test"))
        #expect(Self.countsUp(console.output, from: 1))

        let stateBefore = try fileIdentity(dir + "/snap/memory.bin")
        // The count as saved, from the memory file (guest RAM from address 0). (Read from the
        // original after the snapshot, it would include the steps the original ran since.)
        let memoryFile = try [UInt8](Data(contentsOf: URL(fileURLWithPath: dir + "/snap/memory.bin")))
        let at = Int(Self.counterAddress.rawValue)
        let saved = memoryFile[at..<at + 8].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
        // The count the snapshot holds: what the original had printed when it was paused.
        let snapshot = try SnapshotReader.open(directory: dir + "/snap")
        #expect(snapshot.header.vcpuCount == 1 && snapshot.header.memorySize == 16 << 20)
        var clones: [(Machine, RecordingConsole, () -> MachineExit)] = []
        for _ in 0..<2 {
            let c = RecordingConsole()
            let m = try Machine.restore(from: dir + "/snap", options: RestoreOptions(console: c, generationID: .new(VMGenID.randomGUID())))
            clones.append((m, c, Self.start(m)))
        }
        var firsts: [UInt8] = []
        for (m, c, wait) in clones {
            #expect(Self.waitFor(c, bytes: 10))
            m.requestExit(.quit("test"))
            #expect(wait() == .quit("test"))
            let out = c.output
            try #require(!out.isEmpty)
            #expect(Self.countsUp(out, from: out[0]), "a clone counts up by one: \(out.prefix(20))")
            firsts.append(out[0])
            #expect(try m.memory.read(UInt64.self, at: Self.counterAddress) >= saved)
            #expect(try #require(m.vmgenid).guid != originalGUID)
        }
        // Both clones start from the same count: the one after the last byte the original printed
        // before the pause, which lies inside what the original printed.
        #expect(firsts[0] == firsts[1])
        #expect(console.output.contains(firsts[0] &- 1))
        #expect(clones[0].0.vmgenid!.guid != clones[1].0.vmgenid!.guid)
        #expect(try fileIdentity(dir + "/snap/memory.bin") == stateBefore, "restores never write the memory file")
        #expect(SnapshotReader.verify(directory: dir + "/snap").ok)
    }

    @Test("a restored clone can be saved and restored again; a paused VM stays paused through a snapshot")
    func secondGeneration() throws {
        // On tmpfs (/dev/shm) where there is one: reading a hole of a file through a private mapping
        // allocates a page there, which is what the known-zero pages avoid.
        let dir = makeTemporaryDirectory("swiftvmm-snap2", in: access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let console = RecordingConsole()
        let original = try Machine(MachineConfig(memorySize: 16 << 20, console: console),
                                   boot: .program64(code: Self.counter, loadAddress: 0x100000))
        let wait = Self.start(original)
        #expect(Self.waitFor(console, bytes: 5))
        original.pause()
        let printed = console.output
        let summary = try original.createSnapshot(at: dir + "/one")
        #expect(!summary.wasRunning && original.isPaused)
        // Pages the guest never touched are neither read nor written.
        #expect(summary.result.memoryBytesRead < 4 << 20, "of 16 MiB, only touched pages are read: \(summary.result.memoryBytesRead)")
        original.requestExit(.quit("test"))
        _ = wait()
        #expect(console.output == printed, "nothing ran while paused")

        let c1 = RecordingConsole()
        let clone = try Machine.restore(from: dir + "/one", options: RestoreOptions(console: c1, generationID: .keep))
        let wait1 = Self.start(clone)
        #expect(Self.waitFor(c1, bytes: 5))
        clone.pause()
        let printed1 = c1.output
        #expect(try original.memory.read(UInt64.self, at: Self.counterAddress) > 0)
        let parentBlocks = try allocatedBlocks(dir + "/one/memory.bin")
        // Pages the clone never wrote are not read: holes of the parent's file stay holes, and 1 MiB
        // chunks it did not write are copied from the parent's file in the kernel with their checksums.
        let second = try clone.createSnapshot(at: dir + "/two").result
        #expect(second.memoryBytesRead < 3 << 20, "read \(second.memoryBytesRead)")
        #expect(second.memoryBytesCopied > 0, "the program's chunk is unchanged and copied")
        #expect(try allocatedBlocks(dir + "/one/memory.bin") == parentBlocks, "the parent's memory file gained no blocks")
        #expect(SnapshotReader.verify(directory: dir + "/two").ok)
        clone.requestExit(.quit("test"))
        _ = wait1()
        #expect(printed1.first == printed.last! &+ 1, "the clone continues right after the original's last byte")

        let c2 = RecordingConsole()
        let grandchild = try Machine.restore(from: dir + "/two", options: RestoreOptions(console: c2, generationID: .keep))
        let wait2 = Self.start(grandchild)
        #expect(Self.waitFor(c2, bytes: 5))
        grandchild.requestExit(.quit("test"))
        _ = wait2()
        #expect(c2.output.first == printed1.last! &+ 1, "the second-generation clone continues after the clone")
        #expect(Self.countsUp(c2.output, from: c2.output[0]))
    }

    @Test("an existing directory is refused and left alone")
    func existingDirectory() throws {
        let dir = makeTemporaryDirectory("swiftvmm-snap3")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let m = try Machine(MachineConfig(memorySize: 16 << 20, console: RecordingConsole()),
                            boot: .program64(code: [0xEB, 0xFE], loadAddress: 0x100000))
        #expect(throws: MachineError.self) { _ = try m.createSnapshot(at: dir) }
        #expect(runProcess(["ls", "-A", dir]).stdout.isEmpty)
    }
}

/// The 512-byte blocks a file has allocated.
func allocatedBlocks(_ path: String) throws -> Int {
    var st = stat()
    try #require(stat(path, &st) == 0)
    return Int(st.st_blocks)
}

/// (size, mtime seconds, mtime nanoseconds) of a file.
func fileIdentity(_ path: String) throws -> [Int] {
    var st = stat()
    try #require(stat(path, &st) == 0)
    return [Int(st.st_size), Int(st.st_mtim.tv_sec), Int(st.st_mtim.tv_nsec)]
}

final class ExitBox: Sendable {
    private let exit = Mutex<MachineExit?>(nil)
    func set(_ e: MachineExit) { exit.withLock { $0 = e } }
    var value: MachineExit? { exit.withLock { $0 } }
}
