import Glibc
import VMMSys
import WireFormat

/// The pages of guest memory a restored guest touched first, kept beside a snapshot as
/// `DIR/workingset.bin` so that later restores of it bring them in ahead of the guest.
///
/// The first restore of a snapshot records the pages its guest touched in its first second of running, or until
/// it ended if sooner (`Machine`); each later restore prefetches them on a background thread while
/// its vCPUs start (`swiftvmm restore --no-working-set` does neither).
/// The file is a hint: one that is missing, damaged or for another memory size is ignored (with a
/// log line), never a reason to refuse a restore. Little-endian:
///
/// | Offset | Size | Field                                                          |
/// |-------:|-----:|----------------------------------------------------------------|
/// | 0      | 8    | magic `SWVMWSET`                                               |
/// | 8      | 2    | version (1)                                                    |
/// | 10     | 2    | reserved, zero                                                 |
/// | 12     | 4    | page size (4096)                                               |
/// | 16     | 8    | memory.bin length in bytes                                     |
/// | 24     | 4    | run count N (at most 1,048,576)                                |
/// | 28     | 12×N | runs in ascending order: u64 first page, u32 page count (≥ 1)   |
/// | 28+12N | 4    | CRC32C of every byte before it                                 |
public enum WorkingSet {
    public static let fileName = "workingset.bin"
    static let magic = Array("SWVMWSET".utf8)
    public static let pageSize: UInt64 = 4096
    public static let maxRuns = 1 << 20

    public struct Run: Equatable, Sendable {
        public var firstPage: UInt64
        public var pages: UInt32
        public init(firstPage: UInt64, pages: UInt32) {
            self.firstPage = firstPage
            self.pages = pages
        }
    }

    /// Runs of consecutive pages from per-page flags.
    public static func runs(_ pages: some Sequence<Bool>) -> [Run] {
        var result: [Run] = []
        for (index, present) in pages.enumerated() where present {
            let page = UInt64(index)
            if var last = result.last, last.firstPage + UInt64(last.pages) == page, last.pages < UInt32.max {
                last.pages += 1
                result[result.count - 1] = last
            } else {
                result.append(Run(firstPage: page, pages: 1))
            }
        }
        return result
    }

    /// At most `limit` runs: the shortest gaps between runs are filled until they fit (a working
    /// set a little larger than recorded, rather than a file readers refuse).
    public static func capped(_ runs: [Run], to limit: Int = maxRuns) -> [Run] {
        guard runs.count > max(1, limit) else { return runs }
        var gaps = zip(runs, runs.dropFirst()).map { $1.firstPage - ($0.firstPage + UInt64($0.pages)) }
        gaps.sort()
        let threshold = gaps[runs.count - max(1, limit) - 1]
        var result: [Run] = []
        for run in runs {
            if var last = result.last, run.firstPage - (last.firstPage + UInt64(last.pages)) <= threshold,
               run.firstPage + UInt64(run.pages) - last.firstPage <= UInt64(UInt32.max) {
                last.pages = UInt32(run.firstPage + UInt64(run.pages) - last.firstPage)
                result[result.count - 1] = last
            } else {
                result.append(run)
            }
        }
        return result.count > limit ? capped(result, to: limit) : result
    }

    public static func encode(_ runs: [Run], memoryLength: UInt64) -> [UInt8] {
        var w = LEWriter()
        w.raw(magic)
        w.u16(1)
        w.u16(0)
        w.u32(UInt32(pageSize))
        w.u64(memoryLength)
        w.u32(UInt32(runs.count))
        for run in runs {
            w.u64(run.firstPage)
            w.u32(run.pages)
        }
        var bytes = w.bytes
        let crc = CRC32C.checksum(bytes)
        withUnsafeBytes(of: crc.littleEndian) { bytes.append(contentsOf: $0) }
        return bytes
    }

    /// The runs of a working-set file for a memory.bin of `memoryLength` bytes; throws a one-line
    /// reason for anything else.
    public static func decode(_ bytes: [UInt8], memoryLength: UInt64) throws(LEDecodeError) -> [Run] {
        guard bytes.count >= 32 else { throw .truncated(field: "header", needed: 32, available: bytes.count) }
        let stored = bytes.suffix(4).enumerated().reduce(UInt32(0)) { $0 | UInt32($1.element) << (8 * UInt32($1.offset)) }
        let body = Array(bytes.dropLast(4))
        guard CRC32C.checksum(body) == stored else { throw .invalid(field: "CRC32C", reason: "does not match the contents") }
        var r = LEReader(body)
        guard try r.raw(8, "magic") == magic else { throw .invalid(field: "magic", reason: "not a swiftvmm working-set file") }
        let version = try r.u16("version")
        guard version == 1 else { throw .invalid(field: "version", reason: "\(version) is not 1") }
        _ = try r.u16("reserved")
        let size = try r.u32("page size")
        guard UInt64(size) == pageSize else { throw .invalid(field: "page size", reason: "\(size) is not 4096") }
        let length = try r.u64("memory length")
        guard length == memoryLength else {
            throw .invalid(field: "memory length", reason: "\(length) bytes, but memory.bin has \(memoryLength)")
        }
        let count = Int(try r.u32("run count"))
        guard count <= maxRuns else { throw .invalid(field: "run count", reason: "\(count) is over the limit of \(maxRuns)") }
        guard r.remaining == count * 12 else {
            throw .invalid(field: "runs", reason: "\(r.remaining) bytes for \(count) runs of 12")
        }
        let totalPages = memoryLength / pageSize
        var runs: [Run] = []
        runs.reserveCapacity(count)
        var next: UInt64 = 0
        for i in 0..<count {
            let first = try r.u64("run \(i) first page")
            let pages = try r.u32("run \(i) page count")
            guard pages > 0, first >= next, first <= totalPages, UInt64(pages) <= totalPages - first else {
                throw .invalid(field: "run \(i)", reason: "pages \(first)+\(pages) are not ascending within \(totalPages) pages")
            }
            runs.append(Run(firstPage: first, pages: pages))
            next = first + UInt64(pages)
        }
        return runs
    }

    /// The working set beside the snapshot in `directory`: nil when there is none; throws when the
    /// file is there but unusable (the caller logs it and goes on without).
    public static func load(directory: String, memoryLength: UInt64) throws(SnapshotError) -> [Run]? {
        let path = trimmingTrailingSlashes(directory) + "/" + fileName
        guard isAccessible(path) else { return nil }
        let fd = try SnapshotReader.openRegularFile(path)
        let status = try SnapshotReader.status(fd, path)
        guard status.size <= UInt64(32 + 12 * maxRuns) else {
            throw .invalid(file: fileName, part: "", field: "size", reason: "\(status.size) bytes is over the limit of \(32 + 12 * maxRuns)")
        }
        var bytes = [UInt8](repeating: 0, count: Int(status.size))
        let result: Result<Int, SysError> = bytes.withUnsafeMutableBytes { b in Result { () throws(SysError) in try fd.readFully(into: b, at: 0) } }
        switch result {
        case .success(let n): bytes.removeSubrange(n...)
        case .failure(let error): throw .system(path: path, operation: "read", errno: error.errno)
        }
        do { return try decode(bytes, memoryLength: memoryLength) } catch {
            throw .invalid(file: fileName, part: "", field: "", reason: error.description)
        }
    }

    /// Writes the working set beside the snapshot in `directory`, complete or not at all (an
    /// unnamed file, synced, then linked in: never replacing one that is there). Returns false
    /// when one was already there.
    @discardableResult
    public static func store(_ runs: [Run], directory: String, memoryLength: UInt64) throws(SnapshotError) -> Bool {
        let dir = trimmingTrailingSlashes(directory)
        let bytes = encode(capped(runs), memoryLength: memoryLength)
        do throws(SysError) {
            let fd = try OwnedFD.createUnnamed(inDirectory: dir, mode: 0o644)
            let written: Result<Void, SysError> = bytes.withUnsafeBytes { b in Result { () throws(SysError) in try fd.write(b, at: 0) } }
            try written.get()
            try fd.sync()
            do throws(SysError) { try fd.link(into: dir, name: fileName) } catch {
                if error.errno == EEXIST { return false }
                throw error
            }
            try FileSystem.syncDirectory(dir)
            return true
        } catch {
            throw .system(path: dir + "/" + fileName, operation: error.operation, errno: error.errno)
        }
    }
}
