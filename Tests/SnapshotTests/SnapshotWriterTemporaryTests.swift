import CLinux
import Glibc
import Testing
import Snapshot

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
        #expect(loaded.sections.filter { $0.name != MemoryChunks.name } == sampleSections())
        #expect(loaded.header.memoryCRC32C == result.memoryCRC32C)
        let report = SnapshotReader.verify(directory: dir)
        #expect(report.ok, "\(report)")
    }

    /// A parent directory given through a symlink (as /var/run is one) is followed, and cleaned.
    @Test func parentThroughASymlink() throws {
        let tmp = TempDirectory()
        #expect(mkdir(tmp.path + "/real", 0o700) == 0)
        #expect(symlink("real", tmp.path + "/link") == 0)
        let leftover = stale(pid: pidMax() + 1, start: 1)
        #expect(mkdir(tmp.path + "/real/" + leftover, 0o700) == 0)
        let memory = FakeMemory(sizes: [1 << 20])
        _ = try SnapshotWriter.write(directory: tmp.path + "/link/snap", header: header(for: memory), sections: [], memory: memory.buffers)
        #expect(listDirectory(tmp.path + "/real") == ["snap"])
        #expect(SnapshotReader.verify(directory: tmp.path + "/link/snap").ok)
    }

    /// isCancelled is asked before anything is written, once per 1 MiB of memory and before the
    /// rename; whenever it first says yes, nothing is left: neither the target nor a temporary.
    @Test func cancelledWriteLeavesNothing() throws {
        let memory = FakeMemory(sizes: [8 << 20, 12288, 1 << 20])
        memory.scribble()
        let chunks = 8 + 1 + 1
        var asked = 0
        do {
            let tmp = TempDirectory()
            _ = try SnapshotWriter.write(directory: tmp.path + "/snap", header: header(for: memory), sections: sampleSections(),
                                         memory: memory.buffers, isCancelled: { asked += 1; return false })
            #expect(tmp.entries() == ["snap"])
        }
        #expect(asked == 1 + chunks + 1)
        for n in [0, 1, 4, chunks, chunks + 1] { // the last one: after all the memory, just before the rename
            let tmp = TempDirectory()
            let dir = tmp.path + "/snap"
            var calls = 0
            let error = snapshotError {
                _ = try SnapshotWriter.write(directory: dir, header: header(for: memory), sections: sampleSections(),
                                             memory: memory.buffers, isCancelled: { calls += 1; return calls > n })
            }
            #expect(error == .cancelled(path: dir), "after \(n)")
            #expect(error?.description == "\(dir): snapshot cancelled (the VM is shutting down); nothing was written")
            #expect(calls == n + 1)
            #expect(tmp.entries().isEmpty, "after \(n)")
        }
    }

    /// The temporary name: short, this process's pid and start time (read here independently), and
    /// only exact names parse back.
    @Test func temporaryName() {
        let name = TemporaryName.make()
        #expect(name.count < 80)
        let parsed = TemporaryName(parsing: name)
        #expect(parsed?.pid == getpid())
        #expect(parsed?.startTime == startTime(of: "self"))
        #expect(parsed?.name == name)
        #expect(parsed?.ownerIsGone == false)
        #expect(TemporaryName(parsing: ".swiftvmm-snapshot-tmp.12.345.0123456789abcdef") == TemporaryName(pid: 12, startTime: 345, random: 0x0123_4567_89AB_CDEF))
        for bad in [".swiftvmm-snapshot-tmp.x", ".swiftvmm-snapshot-tmp.12.345.0123456789abcde", ".swiftvmm-snapshot-tmp.12.345.0123456789ABCDEF",
                    ".swiftvmm-snapshot-tmp.012.345.0123456789abcdef", ".swiftvmm-snapshot-tmp.+12.345.0123456789abcdef",
                    ".swiftvmm-snapshot-tmp.0.345.0123456789abcdef", ".swiftvmm-snapshot-tmp.-1.345.0123456789abcdef",
                    ".swiftvmm-snapshot-tmp.12..0123456789abcdef", ".swiftvmm-snapshot-tmp.12.345.0123456789abcdef.x",
                    ".swiftvmm-snapshot-tmp.12.345.0123456789abcdef0", "swiftvmm-snapshot-tmp.12.345.0123456789abcdef",
                    "snap.tmp-12-0123456789abcdef"] {
            #expect(TemporaryName(parsing: bad) == nil, "\(bad)")
        }
    }

    /// Whose leftovers a stale temporary directory is, in the removal test.
    enum DeadOwner: String, CaseIterable, CustomTestStringConvertible {
        case pidAbovePidMax, reapedChild, ownPidEarlierStart, pid1OtherStart
        var testDescription: String { rawValue }

        var name: String {
            let start = startTime(of: "self")!
            switch self {
            case .pidAbovePidMax: return stale(pid: pidMax() + 1, start: start)
            case .reapedChild: return stale(pid: reapedChildPid(), start: start)
            case .ownPidEarlierStart: return stale(pid: getpid(), start: start - 1)
            case .pid1OtherStart: return stale(pid: 1, start: startTime(of: "1")! + 1)
            }
        }
    }

    /// A leftover of a dead writer, full or empty (it died right after mkdir), is removed by the next write.
    @Test(arguments: DeadOwner.allCases)
    func staleTemporaryIsRemoved(owner: DeadOwner) throws {
        let tmp = TempDirectory()
        let full = owner.name
        let empty = owner.name.dropLast(16) + "00000000000000ff"
        #expect(mkdir(tmp.path + "/" + full, 0o700) == 0)
        writeFile(tmp.path + "/" + full + "/memory.bin", [1, 2, 3])
        writeFile(tmp.path + "/" + full + "/state.bin", [4, 5])
        #expect(mkdir(tmp.path + "/" + empty, 0o700) == 0)
        #expect(tmp.entries().count == 2)
        let memory = FakeMemory(sizes: [1 << 20])
        _ = try SnapshotWriter.write(directory: tmp.path + "/snap", header: header(for: memory), sections: [], memory: memory.buffers)
        #expect(tmp.entries() == ["snap"])
    }

    /// Entries that only look like a dead writer's leftovers.
    enum Unproven: String, CaseIterable, CustomTestStringConvertible {
        case ownLiveTemporary, liveOtherProcess, extraFile, symlinkedMemoryFile, subdirectory, fifo, similarName,
             nonCanonicalPid, shortRandom, regularFile, symlinkToDirectory, lockedByALiveWriter
        var testDescription: String { rawValue }
    }

    /// None of these is removed (nor anything inside or behind it), and the write succeeds.
    @Test(arguments: Unproven.allCases)
    func unprovenTemporaryIsKept(kind: Unproven) throws {
        let tmp = TempDirectory()
        let dead = stale(pid: pidMax() + 1, start: 1)
        var name = dead
        var lock: Int32 = -1
        defer { if lock >= 0 { close(lock) } }
        func directory(_ files: [String] = ["memory.bin", "state.bin"]) {
            #expect(mkdir(tmp.path + "/" + name, 0o700) == 0)
            for file in files { writeFile(tmp.path + "/" + name + "/" + file, [7]) }
        }
        switch kind {
        case .ownLiveTemporary:
            name = stale(pid: getpid(), start: startTime(of: "self")!)
            directory()
        case .liveOtherProcess:
            name = stale(pid: 1, start: startTime(of: "1")!)
            directory()
        case .extraFile:
            directory(["memory.bin", "state.bin", "notes"])
        case .symlinkedMemoryFile:
            writeFile(tmp.path + "/precious", [9, 9])
            directory(["state.bin"])
            #expect(symlink("../precious", tmp.path + "/" + name + "/memory.bin") == 0)
        case .subdirectory:
            directory(["state.bin"])
            #expect(mkdir(tmp.path + "/" + name + "/memory.bin", 0o700) == 0)
        case .fifo:
            directory(["state.bin"])
            #expect(mkfifo(tmp.path + "/" + name + "/memory.bin", 0o600) == 0)
        case .similarName:
            name = ".swiftvmm-snapshot-tmp.x"
            directory()
        case .nonCanonicalPid:
            name = ".swiftvmm-snapshot-tmp.0\(pidMax() + 1).1.0123456789abcdef"
            directory()
        case .shortRandom:
            name = String(dead.dropLast())
            directory()
        case .regularFile:
            writeFile(tmp.path + "/" + name, [1])
        case .symlinkToDirectory:
            name = "real"
            directory()
            name = dead
            #expect(symlink("real", tmp.path + "/" + name) == 0)
        case .lockedByALiveWriter: // e.g. a writer in another pid namespace, whose pid means nothing here
            directory()
            lock = open(tmp.path + "/" + name, O_RDONLY | O_DIRECTORY)
            #expect(lock >= 0 && flock(lock, LOCK_EX | LOCK_NB) == 0)
        }
        let before = tree(tmp.path)
        let memory = FakeMemory(sizes: [1 << 20])
        _ = try SnapshotWriter.write(directory: tmp.path + "/snap", header: header(for: memory), sections: [], memory: memory.buffers)
        var after = tree(tmp.path)
        #expect(after.removeValue(forKey: "snap") != nil)
        #expect(after.removeValue(forKey: "snap/memory.bin") != nil)
        #expect(after.removeValue(forKey: "snap/state.bin") != nil)
        #expect(after == before)
    }
}

/// `.swiftvmm-snapshot-tmp.PID.START.0123456789abcdef`
func stale(pid: pid_t, start: UInt64) -> String { ".swiftvmm-snapshot-tmp.\(pid).\(start).0123456789abcdef" }

/// Field 22 of /proc/`pid`/stat, parsed independently of the code under test.
func startTime(of pid: String) -> UInt64? {
    guard let text = String(validating: readProcFile("/proc/\(pid)/stat"), as: UTF8.self),
          let paren = text.lastIndex(of: ")") else { return nil }
    let fields = text[text.index(after: paren)...].split(separator: " ")
    return UInt64(fields[19]) // fields[0] is field 3
}

/// A /proc file (whose stat size is 0), read until end of file.
func readProcFile(_ path: String) -> [UInt8] {
    let fd = open(path, O_RDONLY)
    precondition(fd >= 0, "open \(path)")
    defer { close(fd) }
    var bytes: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = read(fd, &buffer, buffer.count)
        if n < 0 && errno == EINTR { continue }
        precondition(n >= 0, "read \(path)")
        if n == 0 { return bytes }
        bytes += buffer[0..<n]
    }
}

func pidMax() -> pid_t {
    pid_t(String(decoding: readProcFile("/proc/sys/kernel/pid_max"), as: UTF8.self).split(separator: "\n")[0])!
}

/// The pid of a child that exited and was reaped: no process has it (until it is reused).
func reapedChildPid() -> pid_t {
    let pid = fork()
    if pid == 0 { _exit(0) }
    precondition(pid > 0)
    var status: Int32 = 0
    while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
    precondition(kill(pid, 0) != 0 && errno == ESRCH)
    return pid
}

/// Every path under `root` (relative), with what it is: "dir", "link -> TARGET", or the file's
/// bytes (its length when over 64).
func tree(_ root: String, _ prefix: String = "") -> [String: String] {
    var result: [String: String] = [:]
    for name in listDirectory(root + "/" + prefix) {
        let relative = prefix.isEmpty ? name : prefix + "/" + name
        let path = root + "/" + relative
        var st = stat()
        precondition(lstat(path, &st) == 0)
        switch st.st_mode & S_IFMT {
        case S_IFDIR:
            result[relative] = "dir"
            result.merge(tree(root, relative)) { a, _ in a }
        case S_IFLNK:
            var buffer = [CChar](repeating: 0, count: 4096)
            let n = readlink(path, &buffer, buffer.count)
            result[relative] = "link -> " + String(decoding: buffer[0..<max(0, n)].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        case S_IFREG:
            let bytes = readFile(path)
            result[relative] = bytes.count <= 64 ? "\(bytes)" : "\(bytes.count) bytes"
        default:
            result[relative] = "mode \(st.st_mode & S_IFMT)"
        }
    }
    return result
}
