import Glibc
import Logging
import Synchronization
import VMMSys
import Virtio

/// Why a drive image cannot be used: one line naming the file.
public struct BlockStoreError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// A raw drive image (a regular file) behind virtio-blk: positioned reads and writes, fsync for
/// flushes, hole punching for discard and write-zeroes where the file system has it.
///
/// The image is locked while the VM runs (`flock`: exclusive for a writable drive, shared for a
/// read-only one), so two VMs cannot both open one image writable, nor one write what another
/// reads. The lock goes with the descriptor, at exit or death.
public final class FileBlockStore: BlockStore, @unchecked Sendable {
    private let fd: OwnedFD
    public let path: String
    public let size: UInt64
    public let readOnly: Bool
    public let canDiscard = true
    private let logger: Logger
    private let failures = Mutex(0)

    /// Takes `fd` (open read-write, or read-only for `readOnly`), checks it is a regular file and
    /// locks it.
    public static func open(fd: consuming OwnedFD, path: String, readOnly: Bool,
                            logger: Logger = Logger(label: "swiftvmm.drive")) throws(BlockStoreError) -> FileBlockStore {
        let status: FileStatus
        do { status = try fd.status() } catch { throw BlockStoreError("cannot use the drive image \(path): \(error)") }
        guard status.kind == .regular else { throw BlockStoreError("the drive image \(path) is not a regular file") }
        guard status.size >= VirtioBlock.sectorSize else {
            throw BlockStoreError("the drive image \(path) is \(status.size) bytes, smaller than one 512-byte sector")
        }
        do {
            if readOnly { try fd.lockSharedNow() } else { try fd.lockExclusiveNow() }
        } catch where error.errno == EWOULDBLOCK {
            throw BlockStoreError("the drive image \(path) is locked: another VM (or another --drive of this one) uses it\(readOnly ? " writable" : "")")
        } catch {
            throw BlockStoreError("cannot lock the drive image \(path): \(error)")
        }
        return FileBlockStore(fd: fd, path: path, size: status.size, readOnly: readOnly, logger: logger)
    }

    private init(fd: consuming OwnedFD, path: String, size: UInt64, readOnly: Bool, logger: Logger) {
        self.fd = fd
        self.path = path
        self.size = size
        self.readOnly = readOnly
        self.logger = logger
    }

    public func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool {
        do {
            let n = try fd.readFully(into: buffer, at: offset)
            // A file shortened under the VM reads as zeroes past its end.
            if n < buffer.count { UnsafeMutableRawBufferPointer(rebasing: buffer[n...]).initializeMemory(as: UInt8.self, repeating: 0) }
            return true
        } catch { return failed("read of \(buffer.count) bytes at \(offset)", error) }
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) -> Bool {
        guard !readOnly else { return false }
        do { try fd.write(bytes, at: offset) } catch { return failed("write of \(bytes.count) bytes at \(offset)", error) }
        return true
    }

    /// One `preadv` for a request's segments; past the file's end they read as zeroes.
    public func read(into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) -> Bool {
        do {
            var n = try fd.readFully(into: buffers, at: offset)
            // A file shortened under the VM reads as zeroes past its end.
            for b in buffers {
                if n < b.count { UnsafeMutableRawBufferPointer(rebasing: b[n...]).initializeMemory(as: UInt8.self, repeating: 0) }
                n = max(0, n - b.count)
            }
            return true
        } catch { return failed("read of \(buffers.count) buffers at \(offset)", error) }
    }

    /// One `pwritev` for a request's segments.
    public func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) -> Bool {
        guard !readOnly else { return false }
        do { try fd.write(buffers, at: offset) } catch { return failed("write of \(buffers.count) buffers at \(offset)", error) }
        return true
    }

    public func flush() -> Bool {
        guard !readOnly else { return true }
        do { try fd.sync() } catch { return failed("fsync", error) }
        return true
    }

    public func discard(offset: UInt64, length: UInt64) -> Bool {
        guard !readOnly else { return false }
        do { try fd.punchHole(offset: offset, length: length) } catch where error.errno == EOPNOTSUPP {
            // Discard is a hint: a file system without holes keeps the data.
        } catch { return failed("discard of \(length) bytes at \(offset)", error) }
        return true
    }

    public func writeZeroes(offset: UInt64, length: UInt64, unmap: Bool) -> Bool {
        guard !readOnly else { return false }
        do {
            if unmap { try fd.punchHole(offset: offset, length: length) } else { try fd.zeroRange(offset: offset, length: length) }
            return true
        } catch where error.errno == EOPNOTSUPP {
            // Written out where the file system has neither.
            let zeroes = [UInt8](repeating: 0, count: Int(min(length, 1 << 20)))
            var done: UInt64 = 0
            while done < length {
                let n = Int(min(UInt64(zeroes.count), length - done))
                let result = zeroes.withUnsafeBytes { b -> Result<Void, SysError> in
                    do throws(SysError) { try fd.write(UnsafeRawBufferPointer(rebasing: b[..<n]), at: offset + done) } catch { return .failure(error) }
                    return .success(())
                }
                if case .failure(let error) = result { return failed("write of zeroes at \(offset + done)", error) }
                done += UInt64(n)
            }
            return true
        } catch { return failed("write-zeroes of \(length) bytes at \(offset)", error) }
    }

    /// A reflink of the image where the file system can (instant), else a copy in the kernel.
    public func copyImage(into destination: borrowing OwnedFD) throws(SysError) {
        try destination.copyContents(of: fd.rawValue, length: size)
    }

    /// Logs a failed host I/O (the first ten, then every thousandth) and reports it.
    private func failed(_ what: String, _ error: SysError) -> Bool {
        let n = failures.withLock { n -> Int in
            n += 1
            return n
        }
        if n <= 10 || n % 1000 == 0 {
            logger.warning("drive \(path): \(what) failed: \(error) (the guest gets an I/O error; \(n) so far)")
        }
        return false
    }
}
