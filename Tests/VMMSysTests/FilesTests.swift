import Glibc
import Testing
import VMMSys

/// The durable-writing primitives Snapshot uses: each does what its name says and fails with the
/// errno a caller maps to its own message.
@Suite("VMMSys files")
struct FilesTests {
    @Test("create exclusive, positioned writes and reads, truncate, fsync, status")
    func writeAndRead() throws {
        let tmp = TempDir()
        defer { withExtendedLifetime(tmp) {} }  // Swift may end a value's life at its last use
        let path = tmp.path + "/f"
        let fd = try OwnedFD.createExclusive(path)
        #expect(throws: SysError("open \(path)", errno: EEXIST)) { _ = try OwnedFD.createExclusive(path) }
        try ([1, 2, 3] as [UInt8]).withUnsafeBytes { try fd.write($0, at: 8192) }
        try fd.truncate(to: 16384)
        try fd.sync()
        let st = try fd.status()
        #expect(st.kind == .regular && st.size == 16384)
        #expect(try FileStatus.of(path) == st)

        let reader = try OwnedFD.open(path, flags: O_RDONLY)
        var buffer = [UInt8](repeating: 0xEE, count: 8)
        let n = try buffer.withUnsafeMutableBytes { try reader.readFully(into: $0, at: 8190) }
        #expect(n == 8 && buffer == [0, 0, 1, 2, 3, 0, 0, 0])
        // At the end of the file, a short count.
        let tail = try buffer.withUnsafeMutableBytes { try reader.readFully(into: $0, at: 16380) }
        #expect(tail == 4)
        #expect(try buffer.withUnsafeMutableBytes { try reader.read(into: $0, at: 20000) } == 0)
        // Writing to a read-only descriptor fails with EBADF, named.
        #expect(throws: SysError("pwrite", errno: EBADF)) { try ([9] as [UInt8]).withUnsafeBytes { try reader.write($0, at: 0) } }
    }

    @Test("mkdir, rename without replacing, directory fsync, relative removal")
    func directories() throws {
        let tmp = TempDir()
        defer { withExtendedLifetime(tmp) {} }  // Swift may end a value's life at its last use
        let a = tmp.path + "/a", b = tmp.path + "/b"
        try FileSystem.makeDirectory(a)
        #expect(throws: SysError("mkdir", errno: EEXIST)) { try FileSystem.makeDirectory(a) }
        try FileSystem.makeDirectory(b)
        _ = try OwnedFD.createExclusive(b + "/x")
        #expect(throws: SysError("rename", errno: EEXIST)) { try FileSystem.renameNoReplace(a, to: b) }
        try FileSystem.renameNoReplace(a, to: tmp.path + "/c")
        #expect(throws: SysError("lstat", errno: ENOENT)) { _ = try FileStatus.of(a, followingSymlinks: false) }
        try FileSystem.syncDirectory(tmp.path)

        let parent = try OwnedFD.openDirectory(tmp.path)
        #expect(Set(parent.directoryEntries()) == ["b", "c"])
        #expect(try parent.status(at: "c").kind == .directory)
        #expect(throws: SysError("unlinkat", errno: ENOTEMPTY)) { try parent.remove(at: "b", directory: true) }
        let bFD = try parent.openDirectory(at: "b")
        try bFD.lockExclusiveNow()
        #expect(throws: SysError("flock", errno: EWOULDBLOCK)) { try OwnedFD.openDirectory(b).lockExclusiveNow() }
        try bFD.remove(at: "x")
        try parent.remove(at: "b", directory: true)
        try FileSystem.removeDirectory(tmp.path + "/c")
        #expect(parent.directoryEntries().isEmpty)

        // A symlink is not followed where the caller says so.
        symlink("/tmp", tmp.path + "/link")
        #expect(try FileStatus.of(tmp.path + "/link", followingSymlinks: false).kind == .symlink)
        #expect(throws: SysError("openat link", errno: ENOTDIR)) { _ = try parent.openDirectory(at: "link") }
        #expect(throws: SysError("open \(tmp.path)/link", errno: ENOTDIR)) {
            _ = try OwnedFD.openDirectory(tmp.path + "/link", followingSymlinks: false)
        }
        try FileSystem.removeFile(tmp.path + "/link")
    }

    @Test("writeAtomically: a new file, an existing one replaced whole; a failure leaves the target as it was and no temporary file")
    func writeAtomically() throws {
        let tmp = TempDir()
        defer { withExtendedLifetime(tmp) {} }  // Swift may end a value's life at its last use
        let path = tmp.path + "/tree.dtb"
        func contents(_ p: String) throws -> [UInt8] { try OwnedFD.open(p, flags: O_RDONLY).readAll(limit: 1 << 20) }
        try FileSystem.writeAtomically([1, 2, 3], to: path)
        #expect(try contents(path) == [1, 2, 3])
        #expect(try FileStatus.of(path).kind == .regular)
        try FileSystem.writeAtomically([UInt8](repeating: 7, count: 10_000), to: path)
        #expect(try contents(path) == [UInt8](repeating: 7, count: 10_000))
        try FileSystem.makeDirectory(tmp.path + "/dir")
        #expect(throws: SysError("rename", errno: EISDIR)) { try FileSystem.writeAtomically([9], to: tmp.path + "/dir") }
        #expect(throws: SysError("create a file in \(tmp.path)/missing", errno: ENOENT)) {
            try FileSystem.writeAtomically([9], to: tmp.path + "/missing/tree.dtb")
        }
        #expect(try OwnedFD.openDirectory(tmp.path).directoryEntries().sorted() == ["dir", "tree.dtb"], "no temporary file left")
        #expect(try contents(path).count == 10_000)
    }
}
