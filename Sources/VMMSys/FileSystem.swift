import Glibc

// File-system queries the layers above need, so that they make no system call of their own.

/// What kind of file `path` is (following symlinks), or the errno of a failed stat.
public enum FileKind: Equatable, Sendable {
    case regular, directory, other
}

/// The kind of the file at `path`.
public func fileKind(_ path: String) throws(SysError) -> FileKind {
    var st = stat()
    guard stat(path, &st) == 0 else { throw SysError.last("stat \(path)") }
    return kind(st)
}

/// The kind of the open file `fd`.
public func fileKind(fd: Int32) throws(SysError) -> FileKind {
    var st = stat()
    guard fstat(fd, &st) == 0 else { throw SysError.last("fstat") }
    return kind(st)
}

private func kind(_ st: stat) -> FileKind {
    switch st.st_mode & S_IFMT {
    case S_IFREG: .regular
    case S_IFDIR: .directory
    default: .other
    }
}

/// Whether `path` exists and the process may access it as `mode` (R_OK, W_OK... as for access(2)).
public func isAccessible(_ path: String, _ mode: Int32 = F_OK) -> Bool { access(path, mode) == 0 }

/// Creates directory `path` (mode 0755 less the umask); an existing one is fine.
public func makeDirectory(_ path: String) throws(SysError) {
    if mkdir(path, 0o755) != 0 && errno != EEXIST { throw SysError.last("mkdir \(path)") }
}

/// The path of this process's executable (/proc/self/exe), or "" if it cannot be read.
public func executablePath() -> String {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    return String(decoding: buf.prefix(max(0, n)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// The ranges of `fd` that hold data (SEEK_DATA / SEEK_HOLE), in order; a file system without
/// holes reports the whole file as one range.
public func dataRanges(fd: Int32) -> [(start: UInt64, end: UInt64)] {
    var ranges: [(start: UInt64, end: UInt64)] = []
    var offset: off_t = 0
    while true {
        let data = lseek(fd, offset, 3) // SEEK_DATA (Glibc does not export it without _GNU_SOURCE)
        if data < 0 { break } // ENXIO: no data after offset
        let hole = lseek(fd, data, 4) // SEEK_HOLE
        guard hole > data else { break }
        ranges.append((UInt64(data), UInt64(hole)))
        offset = hole
    }
    return ranges
}

/// This process's page table entries (/proc/self/pagemap) for `pages` 4 KiB pages from the host
/// address `base`: bit 63 present, 62 swapped, 61 file-backed or shared. Nil if they cannot be read.
public func pagemapEntries(base: UnsafeMutableRawPointer, pages: Int) -> [UInt64]? {
    let pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
    guard pagemap >= 0 else { return nil }
    defer { close(pagemap) }
    var entries = [UInt64](repeating: 0, count: pages)
    let bytes = pages * 8
    let at = off_t(UInt(bitPattern: base) / 4096 * 8)
    let n = entries.withUnsafeMutableBytes { pread(pagemap, $0.baseAddress, bytes, at) }
    return n == bytes ? entries : nil
}

/// Writes all of `bytes` to `fd`, waiting for a nonblocking descriptor to take them; gives up when
/// the descriptor fails (its reader went away).
public func writeAllWaiting(fd: Int32, _ bytes: UnsafeRawBufferPointer) {
    var offset = 0
    while offset < bytes.count {
        let n = write(fd, bytes.baseAddress! + offset, bytes.count - offset)
        if n < 0 {
            if errno == EINTR { continue }
            if errno == EAGAIN {
                var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                _ = poll(&p, 1, 1000)
                continue
            }
            return
        }
        offset += n
    }
}

/// Whether descriptor `fd` is open in this process.
public func isOpenDescriptor(_ fd: Int32) -> Bool { fcntl(fd, F_GETFD) >= 0 }

/// Reads what `fd` has now into `buffer` (up to its size), retrying EINTR: the byte count, 0 at end
/// of file, -1 on error.
public func readSome(fd: Int32, into buffer: inout [UInt8]) -> Int {
    while true {
        let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        if n < 0 && errno == EINTR { continue }
        return n
    }
}
