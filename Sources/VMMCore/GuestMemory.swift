import VMMSys

/// A guest-physical address.
public struct GuestAddress: RawRepresentable, Hashable, Comparable, Sendable, Codable, CustomStringConvertible {
    public var rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }
    public init(_ value: UInt64) { rawValue = value }
    public static func < (a: GuestAddress, b: GuestAddress) -> Bool { a.rawValue < b.rawValue }
    public var description: String { "0x" + String(rawValue, radix: 16) }
    /// Adds `offset`, returning nil on overflow.
    public func adding(_ offset: UInt64) -> GuestAddress? {
        let (sum, overflow) = rawValue.addingReportingOverflow(offset)
        return overflow ? nil : GuestAddress(sum)
    }
}

/// An access outside guest RAM (or crossing a region boundary).
public struct GuestMemoryError: Error, CustomStringConvertible, Equatable, Sendable {
    public let address: UInt64
    public let length: UInt64
    public init(address: UInt64, length: UInt64) {
        self.address = address
        self.length = length
    }
    public var description: String {
        "guest memory access of \(length) bytes at 0x\(String(address, radix: 16)) is outside guest RAM"
    }
}

/// One contiguous range of guest RAM backed by an anonymous host mapping.
public final class GuestMemoryRegion: @unchecked Sendable {
    public let guestBase: GuestAddress
    public let size: UInt64
    let mapping: MemoryMapping

    init(guestBase: GuestAddress, size: UInt64, file: (fd: Int32, offset: UInt64)? = nil) throws(SysError) {
        self.guestBase = guestBase
        self.size = size
        if let file {
            mapping = try MemoryMapping.privateFile(fd: file.fd, offset: Int(file.offset), size: Int(size))
        } else {
            mapping = try MemoryMapping.anonymous(size: Int(size))
        }
        // Guest memory stays out of core files unless the user asks (`includeInCoreDumps`).
        mapping.includeInCoreDumps(false)
    }

    /// Lets a core file of the process include this region (`--core-dump all`).
    public func includeInCoreDumps() { mapping.includeInCoreDumps(true) }

    /// The region's bytes as the host sees them (for writing a snapshot).
    public var contents: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: mapping.base, count: Int(size)) }

    /// The host address of the region's first byte, for KVM_SET_USER_MEMORY_REGION.
    public var hostBase: UnsafeMutableRawPointer { mapping.base }

    func contains(_ address: UInt64, length: UInt64) -> Bool {
        guard address >= guestBase.rawValue else { return false }
        let offset = address - guestBase.rawValue
        return offset <= size && length <= size - offset
    }
}

/// Guest RAM. Every access is bounds-checked and must lie inside one region.
///
/// Guest memory is shared with running vCPUs and with devices doing DMA: this type does no locking,
/// exactly like the memory of a real machine.
public final class GuestMemory: @unchecked Sendable {
    public let regions: [GuestMemoryRegion]

    /// Allocates RAM for the given (base, size) ranges, which must not overlap. With `file` (a
    /// descriptor open for reading), the RAM is that file mapped private and copy-on-write: the
    /// ranges in address order, one after the other from offset 0 (a snapshot's memory file).
    public init(ranges: [(base: GuestAddress, size: UInt64)], file: Int32? = nil) throws(SysError) {
        let sorted = ranges.sorted { $0.base < $1.base }
        var made: [GuestMemoryRegion] = []
        var fileOffset: UInt64 = 0
        for r in sorted where r.size > 0 {
            if let last = made.last, last.guestBase.rawValue + last.size > r.base.rawValue {
                throw SysError("overlapping guest memory ranges", errno: 22)
            }
            made.append(try GuestMemoryRegion(guestBase: r.base, size: r.size, file: file.map { ($0, fileOffset) }))
            fileOffset += r.size
        }
        regions = made
    }

    /// Total RAM in bytes.
    public var totalSize: UInt64 { regions.reduce(0) { $0 + $1.size } }

    /// Returns a host pointer to `length` bytes at `address`, or throws if they are not all RAM.
    /// The pointer is valid as long as this object lives.
    public func hostPointer(_ address: GuestAddress, length: UInt64) throws(GuestMemoryError) -> UnsafeMutableRawPointer {
        for region in regions where region.contains(address.rawValue, length: length) {
            // SAFETY: `contains` checked [address, address+length) lies inside this region's mapping.
            return region.hostBase + Int(address.rawValue - region.guestBase.rawValue)
        }
        throw GuestMemoryError(address: address.rawValue, length: length)
    }

    /// Whether `length` bytes at `address` are guest RAM.
    public func isRAM(_ address: GuestAddress, length: UInt64) -> Bool {
        regions.contains { $0.contains(address.rawValue, length: length) }
    }

    public func write(_ bytes: some Collection<UInt8>, at address: GuestAddress) throws(GuestMemoryError) {
        let p = try hostPointer(address, length: UInt64(bytes.count))
        // SAFETY: hostPointer validated bytes.count bytes at p.
        UnsafeMutableRawBufferPointer(start: p, count: bytes.count).copyBytes(from: bytes)
    }

    public func write(_ bytes: UnsafeRawBufferPointer, at address: GuestAddress) throws(GuestMemoryError) {
        let p = try hostPointer(address, length: UInt64(bytes.count))
        // SAFETY: hostPointer validated bytes.count bytes at p.
        UnsafeMutableRawBufferPointer(start: p, count: bytes.count).copyMemory(from: bytes)
    }

    public func read(_ address: GuestAddress, count: Int) throws(GuestMemoryError) -> [UInt8] {
        let p = try hostPointer(address, length: UInt64(count))
        // SAFETY: hostPointer validated count bytes at p.
        return Array(UnsafeRawBufferPointer(start: p, count: count))
    }

    public func fill(_ address: GuestAddress, count: Int, with value: UInt8 = 0) throws(GuestMemoryError) {
        let p = try hostPointer(address, length: UInt64(count))
        // SAFETY: hostPointer validated count bytes at p.
        p.initializeMemory(as: UInt8.self, repeating: value, count: count)
    }

    /// Reads a little-endian integer. (Inlinable, like `write`, so the virtqueue code gets it
    /// specialized: unspecialized, every ring and descriptor field was a generic call.)
    @inlinable
    public func read<T: FixedWidthInteger>(_ type: T.Type, at address: GuestAddress) throws(GuestMemoryError) -> T {
        let p = try hostPointer(address, length: UInt64(MemoryLayout<T>.size))
        // SAFETY: hostPointer validated MemoryLayout<T>.size bytes at p; loadUnaligned has no alignment need.
        return T(littleEndian: p.loadUnaligned(as: T.self))
    }

    /// Writes a little-endian integer.
    @inlinable
    public func write<T: FixedWidthInteger>(_ value: T, at address: GuestAddress) throws(GuestMemoryError) {
        let p = try hostPointer(address, length: UInt64(MemoryLayout<T>.size))
        // SAFETY: hostPointer validated MemoryLayout<T>.size bytes at p.
        p.storeBytes(of: value.littleEndian, as: T.self)
    }
}
