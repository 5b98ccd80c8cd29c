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
    /// Bytes of memory.bin actually written: its non-zero 4 KiB pages.
    public var memoryBytesWritten: UInt64
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
/// temporary directory; the target never exists half written.
public enum SnapshotWriter {
    /// Size of the pages memory.bin skips when they are all zero.
    public static let pageSize = 4096
    /// Guest memory is checksummed and scanned in pieces of this size (kept in cache between the two).
    static let chunkSize = 1 << 20

    /// Writes `DIR/state.bin` (the header and sections) and `DIR/memory.bin` (the `memory` regions
    /// concatenated in order, sparse: all-zero 4 KiB pages are not written). `header.memorySize`
    /// must equal the regions' total; the memory length and CRC32C fields are filled in here.
    /// `directory` must not exist; its parent must.
    ///
    /// `knownZero(region, offset)` may say that the 4 KiB page at `offset` of region `region` is
    /// zero without it being read (a page of a copy-on-write file mapping that the guest never
    /// wrote and that is a hole in the file): such pages are neither read nor written.
    public static func write(
        directory: String, header: SnapshotHeader, sections: [SnapshotSection], memory: [UnsafeRawBufferPointer],
        knownZero: ((_ region: Int, _ offset: Int) -> Bool)? = nil
    ) throws(SnapshotError) -> SnapshotWriteResult {
        try write(directory: directory, header: header, sections: sections, memory: memory, knownZero: knownZero, failingAt: nil)
    }

    /// Points where tests make a write fail, to check that nothing is left behind.
    enum Step: Sendable { case memoryWritten, stateWritten, beforeRename }

    static func write(
        directory: String, header: SnapshotHeader, sections: [SnapshotSection], memory: [UnsafeRawBufferPointer],
        knownZero: ((_ region: Int, _ offset: Int) -> Bool)? = nil, failingAt injected: Step?
    ) throws(SnapshotError) -> SnapshotWriteResult {
        let clock = ContinuousClock()
        let start = clock.now
        let dir = trimmingTrailingSlashes(directory)
        guard !dir.isEmpty else { throw .invalid(file: directory, part: "", field: "path", reason: "is empty") }
        let parent = parentDirectory(of: dir)

        // Check everything before touching the disk.
        var st = stat()
        if lstat(dir, &st) == 0 { throw .alreadyExists(path: dir) }
        if errno != ENOENT { throw .system(path: dir, operation: "stat", errno: errno) }
        if stat(parent, &st) != 0 {
            if errno == ENOENT || errno == ENOTDIR { throw .noParentDirectory(path: dir, parent: parent) }
            throw .system(path: parent, operation: "stat", errno: errno)
        }
        if st.st_mode & S_IFMT != S_IFDIR { throw .noParentDirectory(path: dir, parent: parent) }
        let total = memory.reduce(UInt64(0)) { $0 + UInt64($1.count) }
        guard total == header.memorySize else {
            throw .invalid(file: SnapshotFormat.memoryFile, part: "", field: "length",
                           reason: "the memory regions hold \(total) bytes but the header's guest memory size is \(header.memorySize)")
        }
        var header = header
        header.memoryFileLength = total
        header.memoryCRC32C = 0
        _ = try SnapshotFormat.encodeState(header: header, sections: sections)

        let temp = joinPath(parent, TemporaryName.make())
        if mkdir(temp, 0o700) != 0 { throw .system(path: temp, operation: "mkdir", errno: errno) }
        let memoryPath = temp + "/" + SnapshotFormat.memoryFile
        let statePath = temp + "/" + SnapshotFormat.stateFile
        do throws(SnapshotError) {
            func inject(_ step: Step) throws(SnapshotError) {
                if injected == step { throw .system(path: temp, operation: "write (injected failure)", errno: EIO) }
            }
            let memoryFD = try create(memoryPath)
            let (crc, written) = try writeSparse(memory, to: memoryFD, path: memoryPath, knownZero: knownZero)
            if ftruncate(memoryFD.rawValue, off_t(total)) != 0 {
                throw .system(path: memoryPath, operation: "ftruncate", errno: errno)
            }
            try sync(memoryFD, memoryPath)
            try inject(.memoryWritten)

            header.memoryCRC32C = crc
            let state = try SnapshotFormat.encodeState(header: header, sections: sections)
            let stateFD = try create(statePath)
            let writeError: Int32 = state.withUnsafeBytes { buffer in
                var done = 0
                while done < buffer.count {
                    let n = Glibc.write(stateFD.rawValue, buffer.baseAddress! + done, buffer.count - done)
                    if n < 0 && errno == EINTR { continue }
                    if n <= 0 { return n < 0 ? errno : EIO }
                    done += n
                }
                return 0
            }
            if writeError != 0 { throw .system(path: statePath, operation: "write", errno: writeError) }
            try sync(stateFD, statePath)
            try inject(.stateWritten)

            let diskBytes = try allocatedBytes(memoryFD, memoryPath) + allocatedBytes(stateFD, statePath)
            try syncDirectory(temp)
            try inject(.beforeRename)
            if clinux_rename_noreplace(temp, dir) != 0 {
                let code = errno
                if code == EEXIST || code == ENOTEMPTY { throw .alreadyExists(path: dir) }
                if code != EINVAL && code != ENOSYS { throw .system(path: dir, operation: "rename", errno: code) }
                // The file system cannot refuse to replace: check, then a plain rename.
                if lstat(dir, &st) == 0 { throw .alreadyExists(path: dir) }
                if rename(temp, dir) != 0 { throw .system(path: dir, operation: "rename", errno: errno) }
            }
            do {
                try syncDirectory(parent)
            } catch {
                // All or nothing: without a durable rename the caller gets an error and no snapshot.
                removeSnapshotDirectory(dir)
                throw error
            }
            return SnapshotWriteResult(
                directory: dir, stateBytes: UInt64(state.count), memoryBytes: total, memoryBytesWritten: written,
                diskBytes: diskBytes, memoryCRC32C: crc, duration: clock.now - start)
        } catch {
            removeSnapshotDirectory(temp)
            throw error
        }
    }

    /// Writes the non-zero pages of the regions at their offsets in the file and returns the
    /// CRC32C of the whole content (zero pages included) and the bytes written.
    static func writeSparse(_ regions: [UnsafeRawBufferPointer], to fd: borrowing OwnedFD, path: String,
                            knownZero: ((Int, Int) -> Bool)? = nil) throws(SnapshotError) -> (UInt32, UInt64) {
        var crc: UInt32 = 0
        var written: UInt64 = 0
        var fileOffset: UInt64 = 0
        let zeroPage = UnsafeMutableRawPointer.allocate(byteCount: pageSize, alignment: pageSize)
        defer { zeroPage.deallocate() }
        zeroPage.initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)
        for (index, region) in regions.enumerated() {
            defer { fileOffset += UInt64(region.count) }
            guard let base = region.baseAddress else { continue }
            var position = 0
            while position < region.count {
                let length = min(chunkSize, region.count - position)
                let chunk = base + position
                var page = 0
                var runStart: Int? = nil
                while page <= length {
                    let pageLength = min(pageSize, length - page)
                    var zero = page == length
                    if !zero {
                        if pageLength == pageSize, let knownZero, knownZero(index, position + page) {
                            zero = true
                            crc = CRC32C.update(crc, UnsafeRawBufferPointer(start: zeroPage, count: pageSize))
                        } else {
                            crc = CRC32C.update(crc, UnsafeRawBufferPointer(start: chunk + page, count: pageLength))
                            zero = clinux_all_zero(chunk + page, pageLength) != 0
                        }
                    }
                    if zero, let runStartOffset = runStart {
                        try pwriteAll(fd, chunk + runStartOffset, page - runStartOffset,
                                      at: fileOffset + UInt64(position + runStartOffset), path: path)
                        written += UInt64(page - runStartOffset)
                        runStart = nil
                    } else if !zero && runStart == nil {
                        runStart = page
                    }
                    if page == length { break }
                    page += pageLength
                }
                position += length
            }
        }
        return (crc, written)
    }

    static func pwriteAll(_ fd: borrowing OwnedFD, _ p: UnsafeRawPointer, _ count: Int, at offset: UInt64, path: String) throws(SnapshotError) {
        var done = 0
        while done < count {
            let n = pwrite(fd.rawValue, p + done, count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw .system(path: path, operation: "write", errno: errno)
            }
            if n == 0 { throw .system(path: path, operation: "write", errno: EIO) }
            done += n
        }
    }

    static func create(_ path: String) throws(SnapshotError) -> OwnedFD {
        do {
            return try OwnedFD.open(path, flags: O_WRONLY | O_CREAT | O_EXCL, mode: 0o600)
        } catch {
            throw .system(path: path, operation: "create", errno: error.errno)
        }
    }

    static func sync(_ fd: borrowing OwnedFD, _ path: String) throws(SnapshotError) {
        while fsync(fd.rawValue) != 0 {
            if errno != EINTR { throw .system(path: path, operation: "fsync", errno: errno) }
        }
    }

    static func syncDirectory(_ path: String) throws(SnapshotError) {
        let fd: OwnedFD
        do {
            fd = try OwnedFD.open(path, flags: O_RDONLY | O_DIRECTORY)
        } catch {
            throw .system(path: path, operation: "open", errno: error.errno)
        }
        try sync(fd, path)
    }

    static func allocatedBytes(_ fd: borrowing OwnedFD, _ path: String) throws(SnapshotError) -> UInt64 {
        var st = stat()
        if fstat(fd.rawValue, &st) != 0 { throw .system(path: path, operation: "fstat", errno: errno) }
        return UInt64(max(0, st.st_blocks)) * 512
    }

    /// Best-effort removal of a directory this writer created (only its two files are expected).
    static func removeSnapshotDirectory(_ path: String) {
        unlink(path + "/" + SnapshotFormat.stateFile)
        unlink(path + "/" + SnapshotFormat.memoryFile)
        rmdir(path)
    }
}

/// The name of a writer's temporary directory, in the same parent as the snapshot directory:
/// `.swiftvmm-snapshot-tmp.<pid>.<start time>.<16 hex digits>`, short whatever the target's length.
/// The pid and the process start time (field 22 of /proc/PID/stat, clock ticks since boot)
/// together identify the writing process even when pids are reused.
struct TemporaryName: Equatable, Sendable {
    static let prefix = ".swiftvmm-snapshot-tmp."

    var pid: pid_t
    var startTime: UInt64
    var random: UInt64

    var name: String {
        let hex = String(random, radix: 16)
        return "\(Self.prefix)\(pid).\(startTime).\(String(repeating: "0", count: 16 - hex.count))\(hex)"
    }

    /// A fresh name for this process.
    static func make() -> String {
        TemporaryName(pid: getpid(), startTime: ownStartTime ?? 0, random: UInt64.random(in: 0...UInt64.max)).name
    }

    /// This process's start time; nil when /proc cannot be read.
    static let ownStartTime: UInt64? = processStartTime("self")

    /// Field 22 (starttime) of /proc/`pid`/stat, or nil.
    static func processStartTime(_ pid: String) -> UInt64? {
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
