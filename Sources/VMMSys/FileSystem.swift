import Glibc

// File-system queries the layers above need, so that they make no system call of their own.

/// Whether `path` exists and the process may access it as `mode` (R_OK, W_OK... as for access(2)).
public func isAccessible(_ path: String, _ mode: Int32 = F_OK) -> Bool { access(path, mode) == 0 }

/// The path of this process's executable (/proc/self/exe), or "" if it cannot be read.
public func executablePath() -> String {
    var buf = [CChar](repeating: 0, count: 4096)
    let n = readlink("/proc/self/exe", &buf, buf.count - 1)
    return String(decoding: buf.prefix(max(0, n)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

/// This process's page table entries (/proc/self/pagemap) for `pages` 4 KiB pages from the host
/// address `base`: bit 63 present, 62 swapped, 61 file-backed or shared. Nil if they cannot be read.
public func pagemapEntries(base: UnsafeMutableRawPointer, pages: Int) -> [UInt64]? {
    let pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
    guard pagemap >= 0 else { return nil }
    defer { close(pagemap) }
    var entries = [UInt64](repeating: 0, count: pages)
    let first = UInt(bitPattern: base) / 4096
    // In pieces: one read of a large region's entries would pass the kernel's per-read limit.
    let piece = 1 << 16
    for start in stride(from: 0, to: pages, by: piece) {
        let count = min(piece, pages - start)
        let n = entries.withUnsafeMutableBytes { pread(pagemap, $0.baseAddress! + start * 8, count * 8, off_t((first + UInt(start)) * 8)) }
        if n != count * 8 { return nil }
    }
    return entries
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
