import CLinux
import Glibc

/// What writing guest memory into a file did (`MemoryImage`).
public struct MemoryImageResult: Equatable, Sendable {
    /// CRC32C of the whole file, zero pages included.
    public var crc: UInt32
    /// CRC32C of each `MemoryImage.chunkSize` piece of the file, in order (the last may be shorter).
    public var chunkCRCs: [UInt32]
    /// Bytes written from memory, bytes copied in the kernel from the parent's file, bytes of
    /// memory read, and pages neither read nor written.
    public var bytesWritten: UInt64, bytesCopied: UInt64, bytesRead: UInt64, pagesSkipped: UInt64
}

/// A restored VM's memory file, mapped copy-on-write under its memory, and that file's chunk
/// checksums (from its snapshot): pages the guest never wrote are copied from it, not read.
public struct MemoryImageParent: Sendable {
    public var fd: Int32
    public var chunkCRCs: [UInt32]?
    public init(fd: Int32, chunkCRCs: [UInt32]?) {
        self.fd = fd
        self.chunkCRCs = chunkCRCs
    }
}

/// Writes guest memory (the regions one after the other) into a file that already has its final
/// length, reading only pages that may hold data (`clinux_write_memory` in Sources/CLinux/memwrite.c).
public enum MemoryImage {
    public static let chunkSize = Int(CLINUX_MEMORY_CHUNK)

    public static func chunkCount(length: UInt64) -> Int {
        Int(length / UInt64(chunkSize) + (length % UInt64(chunkSize) == 0 ? 0 : 1))
    }

    /// In this process; `shouldStop` is asked before each chunk (true: stops with ECANCELED).
    public static func write(_ regions: [UnsafeRawBufferPointer], to fd: Int32, parent: MemoryImageParent?,
                             shouldStop: () -> Bool) throws(SysError) -> MemoryImageResult {
        let request = try MemoryWriteRequest(regions, to: fd, parent: parent)
        let status: Int32 = withoutActuallyEscaping(shouldStop) { (stop: @escaping () -> Bool) -> Int32 in
            var box = stop
            return withUnsafeMutablePointer(to: &box) { (context: UnsafeMutablePointer<() -> Bool>) -> Int32 in
                request.w.pointee.should_stop = { context in
                    context!.assumingMemoryBound(to: (() -> Bool).self).pointee() ? 1 : 0
                }
                request.w.pointee.context = UnsafeMutableRawPointer(context)
                defer { request.w.pointee.should_stop = nil; request.w.pointee.context = nil }
                return clinux_write_memory(request.w)
            }
        }
        if status != 0 { throw SysError("write memory", errno: status) }
        return request.result()
    }

    /// The same in a child process (fork): it writes memory as it is now while this process goes on
    /// (the guest may run: its writes are copy-on-write), and fsyncs the file. Wait for it with
    /// `ForkedMemoryWriter.wait`.
    public static func startForked(_ regions: [UnsafeRawBufferPointer], to fd: Int32,
                                   parent: MemoryImageParent?) throws(SysError) -> ForkedMemoryWriter {
        let request = try MemoryWriteRequest(regions, to: fd, parent: parent)
        let pid = clinux_fork_memory_writer(request.w)
        guard pid > 0 else { throw SysError.last("fork a memory writer") }
        return ForkedMemoryWriter(request, pid: pid)
    }
}

/// One memory write laid out for `clinux_write_memory`: the request and the chunk checksums it
/// fills in a MAP_SHARED mapping (so that a forked writer's results reach this process), the
/// regions and the parent's checksums beside it (a child reads its copy of them).
final class MemoryWriteRequest {
    let w: UnsafeMutablePointer<clinux_memory_write>
    private let area: UnsafeMutableRawPointer
    private let areaSize: Int
    private let chunkCount: Int
    private let regions: UnsafeMutableBufferPointer<clinux_memory_region>
    private let parentCRCs: UnsafeMutableBufferPointer<UInt32>

    init(_ regions: [UnsafeRawBufferPointer], to fd: Int32, parent: MemoryImageParent?) throws(SysError) {
        let total = regions.reduce(UInt64(0)) { $0 + UInt64($1.count) }
        chunkCount = MemoryImage.chunkCount(length: total)
        let header = (MemoryLayout<clinux_memory_write>.size + 63) & ~63
        areaSize = (header + chunkCount * 4 + 4095) & ~4095
        guard let p = mmap(nil, areaSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0), p != MAP_FAILED else {
            throw SysError.last("mmap a shared result area")
        }
        area = p
        self.regions = .allocate(capacity: max(1, regions.count))
        for (i, r) in regions.enumerated() {
            self.regions[i] = clinux_memory_region(base: r.baseAddress?.assumingMemoryBound(to: UInt8.self), size: UInt64(r.count))
        }
        let crcs = parent?.chunkCRCs ?? []
        parentCRCs = .allocate(capacity: max(1, crcs.count))
        _ = parentCRCs.initialize(from: crcs)
        w = area.bindMemory(to: clinux_memory_write.self, capacity: 1)
        w.pointee = clinux_memory_write()
        w.pointee.regions = UnsafePointer(self.regions.baseAddress)
        w.pointee.region_count = Int32(regions.count)
        w.pointee.out_fd = fd
        w.pointee.parent_fd = parent?.fd ?? -1
        w.pointee.parent_chunk_crcs = parent?.chunkCRCs == nil ? nil : UnsafePointer(parentCRCs.baseAddress)
        w.pointee.parent_chunk_count = UInt64(crcs.count)
        w.pointee.chunk_crcs = (area + header).bindMemory(to: UInt32.self, capacity: max(1, chunkCount))
    }

    /// What the writer reported (once it has finished).
    func result() -> MemoryImageResult {
        MemoryImageResult(crc: w.pointee.crc, chunkCRCs: Array(UnsafeBufferPointer(start: w.pointee.chunk_crcs, count: chunkCount)),
                          bytesWritten: w.pointee.bytes_written, bytesCopied: w.pointee.bytes_copied,
                          bytesRead: w.pointee.bytes_read, pagesSkipped: w.pointee.pages_skipped)
    }

    deinit {
        munmap(area, areaSize)
        regions.deallocate()
        parentCRCs.deallocate()
    }
}

/// A child process writing guest memory (`MemoryImage.startForked`). Its results come back through
/// a shared mapping; the child is killed and reaped if this is released before it finished.
public final class ForkedMemoryWriter: @unchecked Sendable {
    private let request: MemoryWriteRequest
    private var pid: pid_t
    private let pidfd: Int32

    init(_ request: MemoryWriteRequest, pid: pid_t) {
        self.request = request
        self.pid = pid
        pidfd = clinux_pidfd_open(pid)
    }

    /// Waits until the child has written and synced the file, asking `shouldStop` every 50 ms
    /// (true: the child is killed, and this throws ECANCELED).
    public func wait(shouldStop: () -> Bool) throws(SysError) -> MemoryImageResult {
        while pid > 0 {
            if shouldStop() {
                kill(pid, SIGKILL)
                reap()
                throw SysError("write memory", errno: ECANCELED)
            }
            if pidfd >= 0 {
                var p = pollfd(fd: pidfd, events: Int16(POLLIN), revents: 0)
                _ = poll(&p, 1, 50)
            } else {
                usleep(2000)
            }
            var status: Int32 = 0
            let r = waitpid(pid, &status, WNOHANG)
            if r == pid || (r < 0 && errno == ECHILD) { pid = 0 }
        }
        let w = request.w.pointee
        guard w.done == 1 else { throw SysError("write memory in a child process (it died)", errno: EIO) }
        if w.status != 0 { throw SysError("write memory", errno: w.status) }
        return request.result()
    }

    private func reap() {
        guard pid > 0 else { return }
        var status: Int32 = 0
        while waitpid(pid, &status, 0) < 0 && errno == EINTR {}
        pid = 0
    }

    deinit {
        if pid > 0 { kill(pid, SIGKILL) }
        reap() // before the request's memory goes
        if pidfd >= 0 { close(pidfd) }
    }
}
