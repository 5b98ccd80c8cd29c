import CLinux
import Glibc
import Testing
@testable import Snapshot

/// The writer's temporary directory: its name, the removal of stale ones, cancellation.
@Suite(.serialized) struct SnapshotWriterTemporaryTests {
    func header(for memory: FakeMemory) -> SnapshotHeader {
        SnapshotHeader(created: SnapshotHeader.now(), writerVersion: "test", memorySize: UInt64(memory.total), vcpuCount: 1)
    }

    /// Names up to NAME_MAX work: the temporary directory's name does not grow with the target's.
    @Test(arguments: [227, 255])
    func longDirectoryName(length: Int) throws {
        let tmp = TempDirectory()
        let memory = FakeMemory(sizes: [2 << 20])
        memory.scribble()
        let name = String(repeating: "s", count: length)
        let dir = tmp.path + "/" + name
        let result = try SnapshotWriter.write(directory: dir, header: header(for: memory), sections: sampleSections(), memory: memory.buffers)
        #expect(result.directory == dir)
        #expect(tmp.entries() == [name])
        #expect(listDirectory(dir) == ["memory.bin", "state.bin"])
        let loaded = try SnapshotReader.open(directory: dir)
        #expect(loaded.sections == sampleSections())
        #expect(loaded.header.memoryCRC32C == result.memoryCRC32C)
        let report = SnapshotReader.verify(directory: dir)
        #expect(report.ok, "\(report)")
    }
}
