import VMMCore
import VMMSys
import WireFormat

/// A drive's bytes on the host (a raw image file in the machine, an array in tests). Each call
/// does its I/O at once, on the device's serving thread; false means the host I/O failed (the
/// store logs why) and the guest gets VIRTIO_BLK_S_IOERR.
public protocol BlockStore: AnyObject, Sendable {
    /// The drive's size in bytes (a whole number of 512-byte sectors is what the guest sees).
    var size: UInt64 { get }
    var readOnly: Bool { get }
    /// Whether `discard` and `writeZeroes` can be offered (the file system punches holes).
    var canDiscard: Bool { get }
    func read(into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Bool
    func write(_ bytes: UnsafeRawBufferPointer, at offset: UInt64) -> Bool
    /// Makes every completed write durable (fsync).
    func flush() -> Bool
    /// Deallocates the range (it reads as zeroes afterwards).
    func discard(offset: UInt64, length: UInt64) -> Bool
    /// Makes the range read as zeroes; `unmap`: it may be deallocated.
    func writeZeroes(offset: UInt64, length: UInt64, unmap: Bool) -> Bool
    /// Writes the whole drive into `destination` (an empty file), for a snapshot that keeps a copy
    /// of its drives; on the caller's thread, with the device's thread held.
    func copyImage(into destination: borrowing OwnedFD) throws(SysError)
    /// The image's path, for `query-block` ("" when it has none).
    var path: String { get }
    /// Reads into `buffers`, one after the other, from `offset` on (a request's segments: one
    /// vectored read where the store can; by default one `read` per buffer).
    func read(into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) -> Bool
    /// Writes `buffers`, one after the other, from `offset` on (by default one `write` per buffer).
    func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) -> Bool
}

extension BlockStore {
    public var path: String { "" }

    public func read(into buffers: [UnsafeMutableRawBufferPointer], at offset: UInt64) -> Bool {
        var at = offset
        for b in buffers {
            guard read(into: b, at: at) else { return false }
            at += UInt64(b.count)
        }
        return true
    }

    public func write(_ buffers: [UnsafeRawBufferPointer], at offset: UInt64) -> Bool {
        var at = offset
        for b in buffers {
            guard write(b, at: at) else { return false }
            at += UInt64(b.count)
        }
        return true
    }

    /// Reads and writes 1 MiB at a time (a store with a file behind it does better).
    public func copyImage(into destination: borrowing OwnedFD) throws(SysError) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 4096)
        defer { buffer.deallocate() }
        var offset: UInt64 = 0
        while offset < size {
            let n = Int(min(UInt64(buffer.count), size - offset))
            guard read(into: UnsafeMutableRawBufferPointer(rebasing: buffer[..<n]), at: offset) else {
                throw SysError("read of the drive at \(offset)", errno: 5)
            }
            try destination.write(UnsafeRawBufferPointer(rebasing: buffer[..<n]), at: offset)
            offset += UInt64(n)
        }
    }
}

/// virtio-blk (device ID 2, virtio 1.2, 5.2): one request queue; reads, writes, flushes (which
/// really fsync), the drive's ID, discard and write-zeroes when the store can, read-only drives
/// (VIRTIO_BLK_F_RO, and writes refused with IOERR whatever the guest does).
///
/// Requests are untrusted: a header or status byte that does not fit the chain fails the request
/// without touching memory; sectors beyond the drive, lengths that are not whole sectors or whose
/// sum overflows, and unknown types are answered with IOERR or UNSUPP.
public final class VirtioBlock: VirtioDeviceModel {
    public let deviceType: UInt32 = 2
    public let kind = "blk"
    public let queueSizes: [UInt16] = [256]
    public let features: UInt64
    public let store: any BlockStore
    /// The ID GET_ID returns (at most 20 bytes, NUL-padded).
    public let id: [UInt8]
    let config: [UInt8]

    public static let sectorSize: UInt64 = 512
    static let featureSegMax: UInt64 = 1 << 2, featureRO: UInt64 = 1 << 5, featureBlkSize: UInt64 = 1 << 6
    static let featureFlush: UInt64 = 1 << 9, featureDiscard: UInt64 = 1 << 13, featureWriteZeroes: UInt64 = 1 << 14
    static let typeIn: UInt32 = 0, typeOut: UInt32 = 1, typeFlush: UInt32 = 4, typeGetID: UInt32 = 8
    static let typeDiscard: UInt32 = 11, typeWriteZeroes: UInt32 = 13
    static let statusOK: UInt8 = 0, statusIOError: UInt8 = 1, statusUnsupported: UInt8 = 2
    /// Discard and write-zeroes: one range per request, up to 2 GiB.
    static let maxRangeSectors: UInt32 = 1 << 22

    public init(store: any BlockStore, id: String) {
        self.store = store
        self.id = Array(id.utf8.prefix(20))
        var f = Self.featureSegMax | Self.featureBlkSize | Self.featureFlush
            | VirtioFeature.indirectDescriptors | VirtioFeature.eventIndex
        if store.readOnly { f |= Self.featureRO }
        if store.canDiscard && !store.readOnly { f |= Self.featureDiscard | Self.featureWriteZeroes }
        features = f
        var w = LEWriter(capacity: 60)
        w.u64(store.size / Self.sectorSize)     // capacity
        w.u32(0)                                 // size_max (not offered)
        w.u32(UInt32(queueSizes[0]) - 2)         // seg_max: the chain also holds the header and status
        w.u32(0)                                 // geometry
        w.u32(UInt32(Self.sectorSize))           // blk_size
        w.u64(0)                                 // topology
        w.u8(0); w.u8(0)                         // writeback, unused
        w.u16(1)                                 // num_queues
        w.u32(Self.maxRangeSectors); w.u32(1); w.u32(1)   // max_discard_sectors, max_discard_seg, discard_sector_alignment
        w.u32(Self.maxRangeSectors); w.u32(1)             // max_write_zeroes_sectors, max_write_zeroes_seg
        w.u8(1); w.u8(0); w.u8(0); w.u8(0)                // write_zeroes_may_unmap, unused
        config = w.bytes
    }

    public var configSpace: [UInt8] { config }

    public func readConfig(offset: Int, into data: UnsafeMutableRawBufferPointer) {
        for i in data.indices where offset + i < config.count { data[i] = config[offset + i] }
    }

    public func serve(queue: Int, chain: DescriptorChain, memory: GuestMemory) -> UInt32 {
        var header = [UInt8](repeating: 0, count: 16)
        let got = header.withUnsafeMutableBytes { memory.gather(chain, into: $0) }
        let writable = chain.writableLength
        // Without a whole header and a status byte there is nothing to answer with.
        guard got == 16, writable >= 1 else { return 0 }
        let type = UInt32(littleEndian: header.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) })
        let sector = UInt64(littleEndian: header.withUnsafeBytes { $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self) })
        let dataIn = writable - 1                     // device-writable bytes before the status byte
        let dataOut = chain.readableLength - 16       // driver's bytes after the header
        var written: UInt64 = 0
        let status: UInt8
        switch type {
        case Self.typeIn:
            if let range = range(sector: sector, length: dataIn) {
                let target = buffers(chain.writable, skip: 0, length: dataIn, memory)
                status = target.map { store.read(into: $0, at: range) } == true ? Self.statusOK : Self.statusIOError
                written = status == Self.statusOK ? dataIn : 0
            } else {
                status = Self.statusIOError
            }
        case Self.typeOut:
            if !store.readOnly, let range = range(sector: sector, length: dataOut) {
                let source = buffers(chain.readable, skip: 16, length: dataOut, memory)?.map { UnsafeRawBufferPointer($0) }
                status = source.map { store.write($0, at: range) } == true ? Self.statusOK : Self.statusIOError
            } else {
                status = Self.statusIOError
            }
        case Self.typeFlush:
            status = store.readOnly || store.flush() ? Self.statusOK : Self.statusIOError
        case Self.typeGetID:
            var id = self.id + [UInt8](repeating: 0, count: 20 - self.id.count)
            id = Array(id.prefix(Int(min(dataIn, 20))))
            written = UInt64(id.withUnsafeBytes { memory.scatter(chain, from: $0) })
            status = Self.statusOK
        case Self.typeDiscard, Self.typeWriteZeroes:
            if features & Self.featureDiscard == 0 {
                status = Self.statusUnsupported
            } else {
                status = ranges(type: type, chain: chain, length: dataOut, memory)
            }
        default:
            status = Self.statusUnsupported
        }
        var s = status
        // The status byte is the last device-writable byte.
        let placed = withUnsafeBytes(of: &s) { memory.scatter(chain, skip: writable - 1, from: $0) }
        return UInt32(truncatingIfNeeded: written + UInt64(placed))
    }

    /// The byte offset of `length` bytes at `sector`, if they are whole sectors inside the drive.
    private func range(sector: UInt64, length: UInt64) -> UInt64? {
        guard length % Self.sectorSize == 0, sector <= store.size / Self.sectorSize else { return nil }
        let offset = sector * Self.sectorSize
        guard length <= store.size - offset else { return nil }
        return offset
    }

    /// The host memory of `length` bytes of `segments` after `skip`, one buffer per segment (what
    /// one vectored read or write takes); nil when a segment is not guest RAM or they hold fewer bytes.
    private func buffers(_ segments: ArraySlice<DescriptorSegment>, skip: UInt64, length: UInt64,
                         _ memory: GuestMemory) -> [UnsafeMutableRawBufferPointer]? {
        var skip = skip, done: UInt64 = 0
        var out: [UnsafeMutableRawBufferPointer] = []
        out.reserveCapacity(segments.count)
        for s in segments where done < length {
            if skip >= UInt64(s.length) { skip -= UInt64(s.length); continue }
            let n = min(UInt64(s.length) - skip, length - done)
            guard let p = try? memory.hostPointer(GuestAddress(s.address.rawValue + skip), length: n) else { return nil }
            // SAFETY: hostPointer validated n bytes of guest RAM at p.
            out.append(UnsafeMutableRawBufferPointer(start: p, count: Int(n)))
            done += n
            skip = 0
        }
        return done == length ? out : nil
    }

    /// Discard or write-zeroes: the one 16-byte range (sector, count, flags) the request carries.
    /// Unknown flags, and UNMAP on a discard, are UNSUPP (virtio 1.2, 5.2.6.2); anything else wrong is IOERR.
    private func ranges(type: UInt32, chain: DescriptorChain, length: UInt64, _ memory: GuestMemory) -> UInt8 {
        guard length == 16 else { return Self.statusIOError }
        var raw = [UInt8](repeating: 0, count: 16)
        guard raw.withUnsafeMutableBytes({ memory.gather(chain, skip: 16, into: $0) }) == 16 else { return Self.statusIOError }
        var r = LEReader(raw)
        guard let sector = try? r.u64("sector"), let count = try? r.u32("count"), let flags = try? r.u32("flags") else { return Self.statusIOError }
        let unmap = flags & 1 != 0
        guard flags & ~1 == 0, type == Self.typeWriteZeroes || !unmap else { return Self.statusUnsupported }
        guard count <= Self.maxRangeSectors,
              let offset = range(sector: sector, length: UInt64(count) * Self.sectorSize) else { return Self.statusIOError }
        let bytes = UInt64(count) * Self.sectorSize
        let done = type == Self.typeDiscard ? store.discard(offset: offset, length: bytes)
            : store.writeZeroes(offset: offset, length: bytes, unmap: unmap)
        return done ? Self.statusOK : Self.statusIOError
    }
}
