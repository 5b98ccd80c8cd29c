import Foundation
import Glibc
import Devices
import KVM
import Machine
import Snapshot
import Testing
import TestSupport
import VMMSys

/// A restored machine runs from its snapshot's memory file (mapped copy-on-write): a change to that
/// file under it stops the VM, and no snapshot is taken of memory that is no longer what was saved.
@Suite("the memory file of a restored VM changing under it", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct MemoryFileChangeTests {
    /// Writes one byte at `offset` of `path` (a page the counting guest never touches).
    static func poke(_ path: String, at offset: off_t) throws {
        let fd = open(path, O_WRONLY)
        try #require(fd >= 0)
        var b: UInt8 = 0x77
        #expect(pwrite(fd, &b, 1, offset) == 1)
        close(fd)
    }

    @Test("a write to memory.bin while the clone runs stops it with an error naming the file")
    func writeStopsVM() throws {
        let (parent, dir) = try SectionVersionTests.counterSnapshot()
        defer { _ = runProcess(["rm", "-rf", parent]) }
        let console = RecordingConsole()
        let m = try Machine.restore(from: dir, options: RestoreOptions(console: console, generationID: .keep))
        let wait = SnapshotGuestTests.start(m)
        #expect(SnapshotGuestTests.waitFor(console, bytes: 5))
        #expect(m.memoryFileProblem() == nil)
        usleep(50_000)
        try Self.poke(dir + "/memory.bin", at: 8 << 20)
        let started = monotonicMilliseconds()
        let exit = wait()
        #expect(monotonicMilliseconds() - started < 3000, "noticed within the 1 s check (and some slack)")
        let why = exit.detail
        guard exit.cause == .hostError else {
            Issue.record("the clone went on as \(exit)")
            return
        }
        #expect(why.contains("the memory file \(dir)/memory.bin this VM was restored from changed under it"), "\(why)")
        #expect(exit.exitStatus == 1)
    }

    @Test("a truncated memory.bin stops the clone")
    func truncateStopsVM() throws {
        let (parent, dir) = try SectionVersionTests.counterSnapshot()
        defer { _ = runProcess(["rm", "-rf", parent]) }
        let console = RecordingConsole()
        let m = try Machine.restore(from: dir, options: RestoreOptions(console: console, generationID: .keep))
        let wait = SnapshotGuestTests.start(m)
        #expect(SnapshotGuestTests.waitFor(console, bytes: 5))
        usleep(50_000)
        #expect(truncate(dir + "/memory.bin", 4 << 20) == 0)
        let exit = wait()
        guard exit.cause == .hostError else {
            Issue.record("the clone went on as \(exit)")
            return
        }
    }

    @Test("snapshot-create of a clone whose memory file changed is refused, and writes nothing")
    func snapshotRefused() throws {
        let (parent, dir) = try SectionVersionTests.counterSnapshot()
        defer { _ = runProcess(["rm", "-rf", parent]) }
        let console = RecordingConsole()
        let m = try Machine.restore(from: dir, options: RestoreOptions(console: console, generationID: .keep))
        let wait = SnapshotGuestTests.start(m)
        #expect(SnapshotGuestTests.waitFor(console, bytes: 5))
        usleep(50_000)
        try Self.poke(dir + "/memory.bin", at: 8 << 20)
        do {
            _ = try m.createSnapshot(at: parent + "/second")
            Issue.record("a snapshot was taken from a changed memory file")
        } catch {
            #expect("\(error)".contains("changed under it"), "\(error)")
        }
        m.requestExit(.quit("test"))
        _ = wait()
        let entries = try FileManager.default.contentsOfDirectory(atPath: parent)
        #expect(entries == ["snap"], "\(entries)")
    }
}
