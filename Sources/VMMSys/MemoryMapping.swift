import Glibc

/// Sole owner of an mmap'ed region; unmaps it in `deinit`.
public struct MemoryMapping: ~Copyable, @unchecked Sendable {
    public let base: UnsafeMutableRawPointer
    public let size: Int

    /// Maps `size` bytes of private anonymous memory, reserved lazily (pages are allocated on first touch).
    public static func anonymous(size: Int) throws(SysError) -> MemoryMapping {
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let p, p != MAP_FAILED else { throw SysError.last("mmap \(size) bytes of anonymous memory") }
        return MemoryMapping(base: p, size: size)
    }

    /// Maps `size` bytes of `fd` from `offset` private and writable: pages are read from the file
    /// when first touched and copied on first write, so the file itself never changes (how a
    /// snapshot's memory file becomes guest RAM without reading it up front).
    public static func privateFile(fd: Int32, offset: Int, size: Int) throws(SysError) -> MemoryMapping {
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, off_t(offset))
        guard let p, p != MAP_FAILED else { throw SysError.last("mmap \(size) bytes of a file at offset \(offset)") }
        return MemoryMapping(base: p, size: size)
    }

    /// Maps `size` bytes of `fd` shared, read-write (used for the kvm_run area of a vCPU).
    public static func shared(fd: borrowing OwnedFD, size: Int) throws(SysError) -> MemoryMapping {
        let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.rawValue, 0)
        guard let p, p != MAP_FAILED else { throw SysError.last("mmap \(size) bytes of a file") }
        return MemoryMapping(base: p, size: size)
    }

    /// Whether a core file of the process includes this memory (`MADV_DODUMP`/`MADV_DONTDUMP`).
    public func includeInCoreDumps(_ include: Bool) {
        _ = madvise(base, size, include ? MADV_DODUMP : MADV_DONTDUMP)
    }

    private init(base: UnsafeMutableRawPointer, size: Int) {
        self.base = base
        self.size = size
    }

    deinit { munmap(base, size) }
}
