import CLinux
import Glibc

// Files and directories for durable writing (snapshots): exclusive creation, positioned reads and
// writes, fsync of files and directories, rename without replacing, and removal relative to a
// directory descriptor. Each function retries EINTR and throws `SysError` naming the system call;
// callers that report their own operation names use the error's `errno`.

/// What `stat` says of a file, in the terms the callers use.
public struct FileStatus: Equatable, Sendable {
    public enum Kind: Equatable, Sendable { case regular, directory, symlink, other }
    public var kind: Kind
    /// Length in bytes.
    public var size: UInt64
    /// Space allocated on disk (st_blocks * 512): smaller than `size` for a sparse file.
    public var allocatedBytes: UInt64
    public var device: UInt64
    public var inode: UInt64

    init(_ st: stat) {
        switch st.st_mode & S_IFMT {
        case S_IFREG: kind = .regular
        case S_IFDIR: kind = .directory
        case S_IFLNK: kind = .symlink
        default: kind = .other
        }
        size = UInt64(max(0, st.st_size))
        allocatedBytes = UInt64(max(0, st.st_blocks)) * 512
        device = UInt64(st.st_dev)
        inode = UInt64(st.st_ino)
    }

    /// `fstat(fd)`.
    public static func of(fd: Int32) throws(SysError) -> FileStatus {
        var st = stat()
        _ = try retryingEINTR("fstat") { fstat(fd, &st) }
        return FileStatus(st)
    }

    /// `stat(path)`, or `lstat(path)` when `followingSymlinks` is false.
    public static func of(_ path: String, followingSymlinks: Bool = true) throws(SysError) -> FileStatus {
        var st = stat()
        _ = try retryingEINTR(followingSymlinks ? "stat" : "lstat") { followingSymlinks ? stat(path, &st) : lstat(path, &st) }
        return FileStatus(st)
    }
}

extension OwnedFD {
    /// Creates `path`, which must not exist (O_CREAT | O_EXCL), for writing.
    public static func createExclusive(_ path: String, mode: UInt32 = 0o600) throws(SysError) -> OwnedFD {
        try open(path, flags: O_WRONLY | O_CREAT | O_EXCL, mode: mode)
    }

    /// Opens a directory (to fsync it, lock it or work relative to it); `followingSymlinks: false`
    /// refuses a symlink (ENOTDIR).
    public static func openDirectory(_ path: String, followingSymlinks: Bool = true) throws(SysError) -> OwnedFD {
        try open(path, flags: O_RDONLY | O_DIRECTORY | (followingSymlinks ? 0 : O_NOFOLLOW))
    }

    /// `fstat`.
    public func status() throws(SysError) -> FileStatus { try FileStatus.of(fd: rawValue) }

    /// One `pread` of up to `buffer.count` bytes at `offset`; returns the count (0 at end of file).
    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SysError) -> Int {
        guard let base = buffer.baseAddress, buffer.count > 0 else { return 0 }
        while true {
            let n = pread(rawValue, base, buffer.count, off_t(offset))
            if n >= 0 { return n }
            if Glibc.errno != EINTR { throw SysError.last("pread") }
        }
    }

    /// Fills `buffer` from `offset` on, stopping early only at end of file; returns the count read.
    public func readFully(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) throws(SysError) -> Int {
        var done = 0
        while done < buffer.count {
            let n = try read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[done...]), at: offset + UInt64(done))
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Writes all of `bytes` at `offset` (`pwrite`, retrying short writes); a write that makes no
    /// progress fails with EIO.
    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) throws(SysError) {
        guard let base = bytes.baseAddress else { return }
        var done = 0
        while done < bytes.count {
            let n = pwrite(rawValue, base + done, bytes.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                throw SysError.last("pwrite")
            }
            if n == 0 { throw SysError("pwrite", errno: EIO) }
            done += n
        }
    }

    /// Fills `buffers`, one after the other, from `offset` on with `preadv` (at most 1024 buffers,
    /// IOV_MAX, a call; short reads resumed), stopping early only at end of file; returns the count read.
    public func readFully(into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) throws(SysError) -> Int {
        var iov = buffers.map { iovec(iov_base: $0.baseAddress, iov_len: $0.count) }
        var index = 0, done = 0
        while index < iov.count {
            if iov[index].iov_len == 0 { index += 1; continue }
            let count = Int32(min(iov.count - index, 1024))
            let n = iov.withUnsafeMutableBufferPointer { preadv(rawValue, $0.baseAddress! + index, count, off_t(offset) + off_t(done)) }
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                throw SysError.last("preadv")
            }
            if n == 0 { break }
            done += n
            Self.advance(&iov, &index, by: n)
        }
        return done
    }

    /// Writes all of `buffers`, one after the other, from `offset` on with `pwritev` (at most 1024
    /// buffers a call; short writes resumed); a write that makes no progress fails with EIO.
    public func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) throws(SysError) {
        var iov = buffers.map { iovec(iov_base: UnsafeMutableRawPointer(mutating: $0.baseAddress), iov_len: $0.count) }
        var index = 0, done = 0
        while index < iov.count {
            if iov[index].iov_len == 0 { index += 1; continue }
            let count = Int32(min(iov.count - index, 1024))
            let n = iov.withUnsafeMutableBufferPointer { pwritev(rawValue, $0.baseAddress! + index, count, off_t(offset) + off_t(done)) }
            if n < 0 {
                if Glibc.errno == EINTR { continue }
                throw SysError.last("pwritev")
            }
            if n == 0 { throw SysError("pwritev", errno: EIO) }
            done += n
            Self.advance(&iov, &index, by: n)
        }
    }

    /// Drops `count` transferred bytes from the front of `iov[index...]`.
    private static func advance(_ iov: inout [iovec], _ index: inout Int, by count: Int) {
        var left = count
        while left > 0 && index < iov.count {
            if left >= iov[index].iov_len {
                left -= iov[index].iov_len
                index += 1
            } else {
                iov[index].iov_base += left
                iov[index].iov_len -= left
                left = 0
            }
        }
    }

    /// Sets the file's length (`ftruncate`).
    public func truncate(to length: UInt64) throws(SysError) {
        _ = try retryingEINTR("ftruncate") { ftruncate(rawValue, off_t(length)) }
    }

    /// `fsync`: the file's data and metadata (for a directory: its entries) are on disk.
    public func sync() throws(SysError) {
        _ = try retryingEINTR("fsync") { fsync(rawValue) }
    }

    /// Takes an exclusive `flock` without waiting; EWOULDBLOCK when another descriptor holds one.
    public func lockExclusiveNow() throws(SysError) {
        _ = try retryingEINTR("flock") { flock(rawValue, LOCK_EX | LOCK_NB) }
    }

    /// Takes a shared `flock` without waiting; EWOULDBLOCK when another descriptor holds an
    /// exclusive one.
    public func lockSharedNow() throws(SysError) {
        _ = try retryingEINTR("flock") { flock(rawValue, LOCK_SH | LOCK_NB) }
    }

    /// Deallocates `length` bytes at `offset` (they read as zeroes; the file keeps its size):
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)`. EOPNOTSUPP where the file system cannot.
    public func punchHole(offset: UInt64, length: UInt64) throws(SysError) {
        _ = try retryingEINTR("fallocate") { clinux_fallocate(rawValue, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, Int64(offset), Int64(length)) }
    }

    /// Makes `length` bytes at `offset` read as zeroes, allocated: `fallocate(ZERO_RANGE | KEEP_SIZE)`.
    /// EOPNOTSUPP where the file system cannot.
    public func zeroRange(offset: UInt64, length: UInt64) throws(SysError) {
        _ = try retryingEINTR("fallocate") { clinux_fallocate(rawValue, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, Int64(offset), Int64(length)) }
    }

    /// Makes this (empty) file a copy of the first `length` bytes of `source`: a reflink where the
    /// file system shares blocks (instant, no space), else copy_file_range in the kernel, else
    /// reads and writes.
    public func copyContents(of source: Int32, length: UInt64) throws(SysError) {
        if clinux_clone_file(rawValue, source) == 0 {
            try truncate(to: length)
            return
        }
        var done: UInt64 = 0
        var buffer: UnsafeMutableRawBufferPointer?
        defer { buffer?.deallocate() }
        while done < length {
            if let buffer {
                let want = Int(min(UInt64(buffer.count), length - done))
                let got = try Self.readAt(source, into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<want]), offset: done)
                if got == 0 { break }
                try write(UnsafeRawBufferPointer(rebasing: buffer[..<got]), at: done)
                done += UInt64(got)
                continue
            }
            let n = clinux_copy_file_range(source, Int64(done), rawValue, Int64(done), min(length - done, 1 << 30))
            if n > 0 { done += UInt64(n); continue }
            if n == 0 { break }   // the source ended early: the rest stays a hole (zeroes)
            let code = Glibc.errno
            if code == EINTR { continue }
            guard code == EXDEV || code == EINVAL || code == EOPNOTSUPP || code == ENOSYS else {
                throw SysError("copy_file_range", errno: code)
            }
            buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        }
        try truncate(to: length)
    }

    /// One `pread` on a descriptor this process does not own here.
    static func readAt(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, offset: UInt64) throws(SysError) -> Int {
        while true {
            let n = pread(fd, buffer.baseAddress, buffer.count, off_t(offset))
            if n >= 0 { return n }
            if Glibc.errno != EINTR { throw SysError.last("pread") }
        }
    }

    /// `fdatasync`: the file's data (and the metadata needed to read it) are on disk.
    public func syncData() throws(SysError) {
        _ = try retryingEINTR("fdatasync") { fdatasync(rawValue) }
    }

    // MARK: Relative to this directory

    /// Opens `name` in this directory, never following a symlink (O_NOFOLLOW).
    public func openDirectory(at name: String) throws(SysError) -> OwnedFD {
        let fd = try retryingEINTR("openat \(name)") { openat(rawValue, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC) }
        return OwnedFD(adopting: fd)
    }

    /// `fstatat` of `name` in this directory, not following a symlink.
    public func status(at name: String) throws(SysError) -> FileStatus {
        var st = stat()
        _ = try retryingEINTR("fstatat") { fstatat(rawValue, name, &st, AT_SYMLINK_NOFOLLOW) }
        return FileStatus(st)
    }

    /// Removes the file `name` of this directory (`unlinkat`), or the empty directory `name`
    /// when `directory` is true (AT_REMOVEDIR).
    public func remove(at name: String, directory: Bool = false) throws(SysError) {
        _ = try retryingEINTR("unlinkat") { unlinkat(rawValue, name, directory ? AT_REMOVEDIR : 0) }
    }

    /// The names in this directory (without . and ..); empty if it cannot be read.
    public func directoryEntries() -> [String] {
        let raw = openat(rawValue, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard raw >= 0 else { return [] }
        guard let dir = fdopendir(raw) else {
            close(raw)
            return []
        }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { bytes in
                String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
}

/// Path operations on directories and names.
public enum FileSystem {
    /// `mkdir`.
    public static func makeDirectory(_ path: String, mode: UInt32 = 0o700) throws(SysError) {
        _ = try retryingEINTR("mkdir") { mkdir(path, mode_t(mode)) }
    }

    /// `rmdir` (the directory must be empty).
    public static func removeDirectory(_ path: String) throws(SysError) {
        _ = try retryingEINTR("rmdir") { rmdir(path) }
    }

    /// `unlink`.
    public static func removeFile(_ path: String) throws(SysError) {
        _ = try retryingEINTR("unlink") { unlink(path) }
    }

    /// fsyncs the directory `path` (makes a rename or creation in it durable).
    public static func syncDirectory(_ path: String) throws(SysError) {
        try OwnedFD.openDirectory(path).sync()
    }

    /// `rename`: `to` is replaced if it exists (atomically, in one file system).
    public static func rename(_ from: String, to: String) throws(SysError) {
        _ = try retryingEINTR("rename") { Glibc.rename(from, to) }
    }

    /// Writes `bytes` as the file `path`, complete or not at all: a new file in the same directory
    /// under a temporary name (created exclusively, `mode`), written, fsynced, renamed over `path`
    /// (an existing file is replaced), then the directory fsynced. On a failure the temporary file
    /// is removed and `path` is as it was (the error names the step: open, write, fsync, rename).
    public static func writeAtomically(_ bytes: [UInt8], to path: String, mode: UInt32 = 0o644) throws(SysError) {
        let slash = path.lastIndex(of: "/")
        let directory = slash.map { $0 == path.startIndex ? "/" : String(path[..<$0]) } ?? "."
        let name = slash.map { String(path[path.index(after: $0)...]) } ?? path
        guard !name.isEmpty else { throw SysError("open \(path)", errno: EISDIR) }
        let temporary = (directory == "/" ? "" : directory) + "/.\(name).\(getpid()).\(UInt32.random(in: 0...UInt32.max)).tmp"
        let fd = try createTemporary(temporary, in: directory, mode: mode)
        do throws(SysError) {
            let written: Result<Void, SysError> = bytes.withUnsafeBytes { b in Result { () throws(SysError) in try fd.write(b, at: 0) } }
            try written.get()
            try fd.sync()
            try rename(temporary, to: path)
        } catch {
            try? removeFile(temporary)
            throw error
        }
        try syncDirectory(directory)
    }

    /// Creates the temporary file `path` of `writeAtomically`; the error names the directory.
    private static func createTemporary(_ path: String, in directory: String, mode: UInt32) throws(SysError) -> OwnedFD {
        do { return try OwnedFD.createExclusive(path, mode: mode) } catch {
            throw SysError("create a file in \(directory)", errno: error.errno)
        }
    }

    /// Renames `from` to `to` only if `to` does not exist: EEXIST or ENOTEMPTY when it does.
    /// Atomic (renameat2 RENAME_NOREPLACE) where the file system supports it; elsewhere (EINVAL,
    /// ENOSYS) it checks that `to` is absent (lstat), then renames.
    public static func renameNoReplace(_ from: String, to: String) throws(SysError) {
        if clinux_rename_noreplace(from, to) == 0 { return }
        let code = Glibc.errno
        guard code == EINVAL || code == ENOSYS else { throw SysError("rename", errno: code) }
        var st = stat()
        if lstat(to, &st) == 0 { throw SysError("rename", errno: EEXIST) }
        _ = try retryingEINTR("rename") { Glibc.rename(from, to) }
    }
}

extension OwnedFD {
    /// An unnamed regular file in directory `directory` (O_TMPFILE), to be given its name with
    /// `link(into:name:)` once complete: a file that never exists half written, with no temporary
    /// name for a crash to leave behind.
    public static func createUnnamed(inDirectory directory: String, mode: UInt32 = 0o600) throws(SysError) -> OwnedFD {
        let tmpfile: Int32 = 0o20_200_000 // O_TMPFILE (__O_TMPFILE | O_DIRECTORY); Glibc does not export it
        let fd = clinux_open(directory, tmpfile | O_RDWR | O_CLOEXEC, mode)
        guard fd >= 0 else { throw SysError.last("open an unnamed file in \(directory)") }
        return OwnedFD(adopting: fd)
    }

    /// Gives this unnamed file (`createUnnamed`) the name `name` in `directory`; EEXIST when the
    /// name is taken (it is never replaced).
    public func link(into directory: String, name: String) throws(SysError) {
        let source = "/proc/self/fd/\(rawValue)"
        let target = directory + "/" + name
        guard linkat(AT_FDCWD, source, AT_FDCWD, target, AT_SYMLINK_FOLLOW) == 0 else {
            throw SysError.last("link \(target)")
        }
    }
}

/// Brings `length` bytes of a mapping at `base` into the page tables ahead of use
/// (MADV_POPULATE_READ, Linux 5.14), or at least into the page cache (MADV_WILLNEED) where that is
/// not available. Returns 0, or the errno of the last attempt.
public func prefetchMapping(_ base: UnsafeMutableRawPointer, length: Int) -> Int32 {
    let populateRead: Int32 = 22
    if madvise(base, length, populateRead) == 0 { return 0 }
    let first = errno
    guard first == EINVAL else { return first } // EFAULT/ENOMEM: part of it cannot be read
    return madvise(base, length, MADV_WILLNEED) == 0 ? 0 : errno
}

// MARK: tap devices

extension OwnedFD {
    /// /dev/net/tun attached to the existing tap device `name` (non-blocking). ENODEV when no device
    /// of that name exists (a tap is not created: it is the host administrator's to set up),
    /// EMEDIUMTYPE when it is not a tun/tap device.
    public static func attachTap(name: String) throws(SysError) -> OwnedFD {
        guard !name.isEmpty, name.utf8.count < 16, !name.contains("/"), name != ".", name != ".." else {
            throw SysError("tap \(name)", errno: EINVAL)
        }
        guard isAccessible("/sys/class/net/\(name)/tun_flags") else {
            // EMEDIUMTYPE: a network device of another kind (lo, eth0).
            throw SysError("tap \(name)", errno: isAccessible("/sys/class/net/\(name)") ? EMEDIUMTYPE : ENODEV)
        }
        let fd = clinux_tap_attach(name)
        guard fd >= 0 else { throw SysError("TUNSETIFF \(name)", errno: -fd) }
        return OwnedFD(adopting: fd)
    }

    /// Whether this descriptor is attached to a tap device (not a tun, not anything else).
    public var isTap: Bool {
        let flags = clinux_tap_flags(rawValue)
        return flags >= 0 && Int32(flags) & Int32(IFF_TAP) != 0
    }

    /// Sets O_NONBLOCK.
    public func setNonBlocking() throws(SysError) {
        let flags = try retryingEINTR("fcntl F_GETFL") { fcntl(rawValue, F_GETFL) }
        _ = try retryingEINTR("fcntl F_SETFL") { fcntl(rawValue, F_SETFL, flags | O_NONBLOCK) }
    }

    /// One `read` without waiting: the count, or nil when nothing is there (EAGAIN).
    public func readNow(into buffer: UnsafeMutableRawBufferPointer) throws(SysError) -> Int? {
        while true {
            let n = Glibc.read(rawValue, buffer.baseAddress, buffer.count)
            if n >= 0 { return n }
            let code = Glibc.errno
            if code == EINTR { continue }
            if code == EAGAIN || code == EWOULDBLOCK { return nil }
            throw SysError("read", errno: code)
        }
    }

    /// One `write` of all of `bytes` without waiting: false when it would block (EAGAIN) or was short.
    public func writeNow(_ bytes: UnsafeRawBufferPointer) throws(SysError) -> Bool {
        while true {
            let n = Glibc.write(rawValue, bytes.baseAddress, bytes.count)
            if n >= 0 { return n == bytes.count }
            let code = Glibc.errno
            if code == EINTR { continue }
            if code == EAGAIN || code == EWOULDBLOCK { return false }
            throw SysError("write", errno: code)
        }
    }
}
