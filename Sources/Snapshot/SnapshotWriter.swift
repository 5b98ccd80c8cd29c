import CLinux
import Glibc
import VMMSys

/// What writing a snapshot produced.
public struct SnapshotWriteResult: Equatable, Sendable {
    /// The snapshot directory (as given, without trailing slashes).
    public var directory: String
    /// Length of state.bin.
    public var stateBytes: UInt64
    /// Length of memory.bin (the guest memory size).
    public var memoryBytes: UInt64
    /// Bytes of memory.bin written from guest memory: its non-zero 4 KiB pages (those not copied).
    public var memoryBytesWritten: UInt64
    /// Bytes of memory.bin copied in the kernel from a restored VM's parent snapshot (pages the
    /// guest never wrote since the restore), and bytes of guest memory read.
    public var memoryBytesCopied: UInt64 = 0, memoryBytesRead: UInt64 = 0
    /// Space both files take on disk (allocated blocks; smaller than the lengths when sparse).
    public var diskBytes: UInt64
    /// CRC32C of all of memory.bin, as recorded in the header.
    public var memoryCRC32C: UInt32
    /// Wall time of the whole write, fsyncs included.
    public var duration: Duration
}

/// Writes snapshot directories durably: everything goes to a temporary directory in the same parent
/// (named by `TemporaryName`, whatever the target's length), both files and the directory are
/// fsynced, the directory is renamed into place and its parent is fsynced. A failure removes the
/// temporary directory, and so does a cancellation; the target never exists half written.
public enum SnapshotWriter {
    /// Size of the pages memory.bin skips when they are all zero.
    public static let pageSize = 4096

    /// Writes `DIR/state.bin` (the header and sections) and `DIR/memory.bin` (the `memory` regions
    /// concatenated in order, sparse: all-zero 4 KiB pages are not written). `header.memorySize`
    /// must equal the regions' total; the memory length and CRC32C fields are filled in here.
    /// `directory` must not exist; its parent must. Before writing, stale temporary directories that
    /// dead writers left in the same parent are removed (`removeStaleTemporaries`, best effort).
    ///
    /// Memory is written by `MemoryImage`: pages the guest never touched (/proc/self/pagemap) are
    /// neither read nor written, and zero pages are checked but not checksummed byte by byte. With
    /// `parent` (a restored VM: its memory file, mapped copy-on-write under `memory`, and that
    /// snapshot's chunk checksums), 1 MiB chunks the guest has not written since the restore are
    /// copied from the parent's file in the kernel and keep its checksums. The chunk checksums go
    /// into state.bin as the optional section `memory.chunks` (`MemoryChunks`).
    ///
    /// With `live`, memory is written by a child process (fork) that sees it as it is at the call,
    /// and `live()` runs right after the fork: the caller resumes the guest there, and the guest's
    /// writes from then on are copy-on-write and do not reach the snapshot.
    ///
    /// `isCancelled()` is asked before anything is written, before each 1 MiB piece of memory (every
    /// 50 ms while a child writes it) and
    /// before the final rename. Once it returns true, the temporary directory is removed and
    /// `SnapshotError.cancelled(path:)` is thrown: `directory` is not created. (Once renamed, the
    /// snapshot is complete and is no longer cancelled.) It is called on the writing thread.
    ///
    /// `extraFiles` are written into the directory first (so, for a live snapshot, while the guest
    /// is still paused), each synced, and arrive with the rest or not at all (drive copies).
    public static func write(
        directory: String, header: SnapshotHeader, sections: [SnapshotSection], memory: [UnsafeRawBufferPointer],
        parent: MemoryImageParent? = nil, live: (() -> Void)? = nil, isCancelled: (() -> Bool)? = nil,
        extraFiles: [SnapshotExtraFile] = []
    ) throws(SnapshotError) -> SnapshotWriteResult {
        try write(directory: directory, header: header, sections: sections, memory: memory, parent: parent, live: live,
                  isCancelled: isCancelled, extraFiles: extraFiles, afterStep: { _ in })
    }

    /// The points of a write after which `afterStep` runs (tests throw there to check that a failure
    /// at that point leaves nothing behind).
    package enum Step: Sendable { case memoryWritten, stateWritten, beforeRename }

    /// `write` with `afterStep(step)` called at each `Step`; what it throws fails the write as a
    /// system error would.
    package static func write(
        directory: String, header: SnapshotHeader, sections: [SnapshotSection], memory: [UnsafeRawBufferPointer],
        parent memoryParent: MemoryImageParent? = nil, live: (() -> Void)? = nil, isCancelled: (() -> Bool)? = nil,
        extraFiles: [SnapshotExtraFile] = [], afterStep: (Step) throws(SnapshotError) -> Void
    ) throws(SnapshotError) -> SnapshotWriteResult {
        let clock = ContinuousClock()
        let start = clock.now
        let dir = trimmingTrailingSlashes(directory)
        guard !dir.isEmpty else { throw .invalid(file: directory, part: "", field: "path", reason: "is empty") }
        let parent = parentDirectory(of: dir)

        // Check everything before touching the disk.
        let existing: FileStatus?
        do {
            existing = try FileStatus.of(dir, followingSymlinks: false)
        } catch {
            if error.errno != ENOENT { throw .system(path: dir, operation: "stat", errno: error.errno) }
            existing = nil
        }
        if existing != nil { throw .alreadyExists(path: dir) }
        let parentStatus: FileStatus
        do {
            parentStatus = try FileStatus.of(parent)
        } catch {
            if error.errno == ENOENT || error.errno == ENOTDIR { throw .noParentDirectory(path: dir, parent: parent) }
            throw .system(path: parent, operation: "stat", errno: error.errno)
        }
        if parentStatus.kind != .directory { throw .noParentDirectory(path: dir, parent: parent) }
        let total = memory.reduce(UInt64(0)) { $0 + UInt64($1.count) }
        for (i, region) in memory.enumerated() where region.count % pageSize != 0 {
            throw .invalid(file: SnapshotFormat.memoryFile, part: "", field: "region \(i)",
                           reason: "\(region.count) bytes is not a whole number of 4 KiB pages")
        }
        guard total == header.memorySize else {
            throw .invalid(file: SnapshotFormat.memoryFile, part: "", field: "length",
                           reason: "the memory regions hold \(total) bytes but the header's guest memory size is \(header.memorySize)")
        }
        var header = header
        header.memoryFileLength = total
        header.memoryCRC32C = 0
        _ = try SnapshotFormat.encodeState(header: header, sections: sections)
        func checkCancelled() throws(SnapshotError) {
            if let isCancelled, isCancelled() { throw .cancelled(path: dir) }
        }
        try checkCancelled()

        // Best effort: leftovers of writers that died mid-write (complete or absent, temporaries included).
        _ = removeStaleTemporaries(in: parent)

        let temp = joinPath(parent, TemporaryName.make())
        try system(temp, "mkdir") { () throws(SysError) in try FileSystem.makeDirectory(temp, mode: 0o700) }
        let memoryPath = temp + "/" + SnapshotFormat.memoryFile
        let statePath = temp + "/" + SnapshotFormat.stateFile
        do throws(SnapshotError) {
            // Held until the end: tells a cleaner that this temporary directory is in use even when
            // it cannot see this process (another pid namespace).
            let tempFD = try openDirectory(temp, followingSymlinks: false)
            try system(temp, "flock") { () throws(SysError) in try tempFD.lockExclusiveNow() }
            var extraBytes: UInt64 = 0
            for file in extraFiles {
                guard SnapshotExtraFile.isValidName(file.name) else {
                    throw .invalid(file: file.name, part: "", field: "name", reason: "is not a plain file name beside state.bin")
                }
                let path = temp + "/" + file.name
                let fd = try create(path)
                try system(path, "write") { () throws(SysError) in try file.write(fd) }
                try sync(fd, path)
                extraBytes += try allocatedBytes(fd, path)
                try checkCancelled()
            }
            let memoryFD = try create(memoryPath)
            try system(memoryPath, "ftruncate") { () throws(SysError) in try memoryFD.truncate(to: total) }
            let image: MemoryImageResult
            let stop = { isCancelled?() ?? false }
            do throws(SysError) {
                if let live {
                    // A child process writes memory as it is at this instant; the guest may run on.
                    let child = try MemoryImage.startForked(memory, to: memoryFD.rawValue, parent: memoryParent)
                    live()
                    image = try child.wait(shouldStop: stop)
                } else {
                    image = try MemoryImage.write(memory, to: memoryFD.rawValue, parent: memoryParent, shouldStop: stop)
                }
            } catch {
                if error.errno == ECANCELED { throw .cancelled(path: dir) }
                throw .system(path: memoryPath, operation: "write", errno: error.errno)
            }
            if live == nil { try sync(memoryFD, memoryPath) } // the child synced its writes
            try afterStep(.memoryWritten)

            header.memoryCRC32C = image.crc
            let state = try SnapshotFormat.encodeState(header: header, sections: sections + [MemoryChunks.section(image.chunkCRCs)])
            let stateFD = try create(statePath)
            let stateWrite: SysError? = state.withUnsafeBytes { buffer in
                do throws(SysError) { try stateFD.write(buffer, at: 0) } catch { return error }
                return nil
            }
            if let stateWrite { throw .system(path: statePath, operation: "write", errno: stateWrite.errno) }
            try sync(stateFD, statePath)
            try afterStep(.stateWritten)

            let diskBytes = try allocatedBytes(memoryFD, memoryPath) + allocatedBytes(stateFD, statePath) + extraBytes
            try sync(tempFD, temp)
            try afterStep(.beforeRename)
            try checkCancelled()
            do {
                try FileSystem.renameNoReplace(temp, to: dir)
            } catch {
                if error.errno == EEXIST || error.errno == ENOTEMPTY { throw .alreadyExists(path: dir) }
                throw .system(path: dir, operation: "rename", errno: error.errno)
            }
            do {
                try syncDirectory(parent)
            } catch {
                // All or nothing: without a durable rename the caller gets an error and no snapshot.
                removeSnapshotDirectory(dir)
                throw error
            }
            return SnapshotWriteResult(
                directory: dir, stateBytes: UInt64(state.count), memoryBytes: total, memoryBytesWritten: image.bytesWritten,
                memoryBytesCopied: image.bytesCopied, memoryBytesRead: image.bytesRead,
                diskBytes: diskBytes, memoryCRC32C: image.crc, duration: clock.now - start)
        } catch {
            removeSnapshotDirectory(temp)
            throw error
        }
    }

    /// Runs a VMMSys call, reporting its failure as `path: operation failed: ...`.
    static func system<T: ~Copyable>(_ path: String, _ operation: String, _ body: () throws(SysError) -> T) throws(SnapshotError) -> T {
        do {
            return try body()
        } catch {
            throw .system(path: path, operation: operation, errno: error.errno)
        }
    }

    static func pwriteAll(_ fd: borrowing OwnedFD, _ p: UnsafeRawPointer, _ count: Int, at offset: UInt64, path: String) throws(SnapshotError) {
        try system(path, "write") { () throws(SysError) in try fd.write(UnsafeRawBufferPointer(start: p, count: count), at: offset) }
    }

    static func create(_ path: String) throws(SnapshotError) -> OwnedFD {
        try system(path, "create") { () throws(SysError) in try OwnedFD.createExclusive(path, mode: 0o600) }
    }

    static func sync(_ fd: borrowing OwnedFD, _ path: String) throws(SnapshotError) {
        try system(path, "fsync") { () throws(SysError) in try fd.sync() }
    }

    static func syncDirectory(_ path: String) throws(SnapshotError) {
        try sync(openDirectory(path), path)
    }

    /// Opens a directory to fsync, lock or read it; `followingSymlinks: false` refuses a symlink
    /// (ENOTDIR) where a directory this writer created is expected.
    static func openDirectory(_ path: String, followingSymlinks: Bool = true) throws(SnapshotError) -> OwnedFD {
        try system(path, "open") { () throws(SysError) in try OwnedFD.openDirectory(path, followingSymlinks: followingSymlinks) }
    }

    /// Removes the temporary directories in `parent` that writers which are provably gone left
    /// behind, and returns their names. A directory is removed only when all of this holds:
    ///
    /// * its name is exactly a `TemporaryName` (canonical numbers, 16 lowercase hex digits);
    /// * its pid and start time do not identify a live process (`TemporaryName.ownerIsGone`);
    /// * it is a directory itself, not a symlink to one, and nobody holds its `flock` (a live
    ///   writer does, even one in another pid namespace);
    /// * it holds nothing but regular files named state.bin and/or memory.bin.
    ///
    /// Everything else is left alone. Nothing is followed: every call is relative to the parent's
    /// or the directory's descriptor, with O_NOFOLLOW / AT_SYMLINK_NOFOLLOW. Failures are ignored.
    @discardableResult
    static func removeStaleTemporaries(in parent: String) -> [String] {
        guard let parentFD = try? openDirectory(parent) else { return [] }
        var removed: [String] = []
        for name in directoryEntries(parentFD) where removeIfStale(name, in: parentFD) {
            removed.append(name)
        }
        return removed
    }

    static func removeIfStale(_ name: String, in parentFD: borrowing OwnedFD) -> Bool {
        guard let owner = TemporaryName(parsing: name), owner.ownerIsGone,
              let before = try? parentFD.status(at: name), before.kind == .directory,
              let dirFD = try? parentFD.openDirectory(at: name) else { return false }
        guard let opened = try? dirFD.status(), opened.device == before.device, opened.inode == before.inode,
              (try? dirFD.lockExclusiveNow()) != nil else { return false }
        let entries = dirFD.directoryEntries()
        for entry in entries {
            guard entry == SnapshotFormat.stateFile || entry == SnapshotFormat.memoryFile,
                  (try? dirFD.status(at: entry))?.kind == .regular else { return false }
        }
        for entry in entries {
            do {
                try dirFD.remove(at: entry)
            } catch {
                if error.errno != ENOENT { return false }
            }
        }
        // Fails (ENOTEMPTY) if something appeared meanwhile: then it stays.
        return (try? parentFD.remove(at: name, directory: true)) != nil
    }

    /// The names in the directory open as `fd` (without . and ..); empty if it cannot be read.
    static func directoryEntries(_ fd: borrowing OwnedFD) -> [String] {
        fd.directoryEntries()
    }

    static func allocatedBytes(_ fd: borrowing OwnedFD, _ path: String) throws(SnapshotError) -> UInt64 {
        try system(path, "fstat") { () throws(SysError) in try fd.status() }.allocatedBytes
    }

    /// Best-effort removal of a directory this writer created (only its two files are expected).
    static func removeSnapshotDirectory(_ path: String) {
        try? FileSystem.removeFile(path + "/" + SnapshotFormat.stateFile)
        try? FileSystem.removeFile(path + "/" + SnapshotFormat.memoryFile)
        try? FileSystem.removeDirectory(path)
    }
}

/// The name of a writer's temporary directory, in the same parent as the snapshot directory:
/// `.swiftvmm-snapshot-tmp.<pid>.<start time>.<16 hex digits>`, short whatever the target's length.
/// The pid and the process start time (field 22 of /proc/PID/stat, clock ticks since boot)
/// together identify the writing process even when pids are reused.
package struct TemporaryName: Equatable, Sendable {
    package static let prefix = ".swiftvmm-snapshot-tmp."

    package var pid: pid_t
    package var startTime: UInt64
    package var random: UInt64

    package init(pid: pid_t, startTime: UInt64, random: UInt64) {
        self.pid = pid
        self.startTime = startTime
        self.random = random
    }

    package var name: String {
        let hex = String(random, radix: 16)
        return "\(Self.prefix)\(pid).\(startTime).\(String(repeating: "0", count: 16 - hex.count))\(hex)"
    }

    /// A fresh name for this process.
    package static func make() -> String {
        TemporaryName(pid: getpid(), startTime: ownStartTime ?? 0, random: UInt64.random(in: 0...UInt64.max)).name
    }

    /// Parses a name `name` would produce; nil for anything else, non-canonical numbers included.
    package init?(parsing name: String) {
        guard name.hasPrefix(Self.prefix) else { return nil }
        let parts = name.dropFirst(Self.prefix.count).split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3,
              let pid = pid_t(parts[0]), pid > 0, String(pid) == parts[0],
              let startTime = UInt64(parts[1]), String(startTime) == parts[1],
              parts[2].utf8.count == 16,
              parts[2].utf8.allSatisfy({ (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }),
              let random = UInt64(parts[2], radix: 16) else { return nil }
        self.init(pid: pid, startTime: startTime, random: random)
    }

    /// True only when the process that made this name is provably gone: its pid does not exist
    /// (ESRCH), or the process with that pid started at another time (the pid was reused). False
    /// whenever that cannot be told (no /proc, a race with the process exiting).
    package var ownerIsGone: Bool {
        if pid == getpid() {
            guard let own = Self.ownStartTime else { return false }
            return own != startTime
        }
        if kill(pid, 0) == 0 || errno == EPERM {
            guard let actual = Self.processStartTime(String(pid)) else { return false }
            return actual != startTime
        }
        return errno == ESRCH
    }

    /// This process's start time; nil when /proc cannot be read.
    package static let ownStartTime: UInt64? = processStartTime("self")

    /// Field 22 (starttime) of /proc/`pid`/stat, or nil.
    package static func processStartTime(_ pid: String) -> UInt64? {
        guard let fd = try? OwnedFD.open("/proc/\(pid)/stat", flags: O_RDONLY),
              let bytes = try? fd.readAll(limit: 64 << 10) else { return nil }
        // Field 2 (comm) is in parentheses and may hold spaces or parentheses: count from the last ')'.
        guard let end = bytes.lastIndex(of: UInt8(ascii: ")")) else { return nil }
        let fields = bytes[(end + 1)...].split(separator: UInt8(ascii: " "))
        guard fields.count > 19 else { return nil } // fields[0] is field 3 (state)
        return UInt64(String(decoding: fields[19], as: UTF8.self))
    }
}

func joinPath(_ parent: String, _ name: String) -> String {
    parent.hasSuffix("/") ? parent + name : parent + "/" + name
}

func trimmingTrailingSlashes(_ path: String) -> String {
    var p = Substring(path)
    while p.count > 1 && p.hasSuffix("/") { p = p.dropLast() }
    return String(p)
}

func parentDirectory(of path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return "." }
    let parent = String(path[..<slash])
    return parent.isEmpty ? "/" : parent
}

/// A file a snapshot keeps beside state.bin and memory.bin (a copy of a drive): written by `write`
/// into the new, still temporary snapshot directory.
public struct SnapshotExtraFile {
    public var name: String
    public var write: (borrowing OwnedFD) throws(SysError) -> Void
    public init(name: String, write: @escaping (borrowing OwnedFD) throws(SysError) -> Void) {
        self.name = name
        self.write = write
    }

    /// A name without a slash, not "." or "..", not one of the snapshot's own files.
    static func isValidName(_ name: String) -> Bool {
        !name.isEmpty && !name.contains("/") && name != "." && name != ".." && !name.utf8.contains(0)
            && name != SnapshotFormat.stateFile && name != SnapshotFormat.memoryFile && name != WorkingSet.fileName
    }
}
