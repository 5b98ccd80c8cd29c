import VMMSys
import WireFormat

/// The optional section `memory.chunks`: the CRC32C of each 1 MiB chunk of memory.bin, so that a
/// snapshot of a VM restored from this one can keep the checksums of chunks its guest never wrote,
/// and `verify` can name a damaged chunk. Layout 1: u32 chunk size, u32 count, then count u32s
/// (the last chunk may be shorter than the chunk size). Readers that do not know it skip it.
public enum MemoryChunks {
    public static let name = "memory.chunks"
    public static let version: UInt16 = 1

    static func section(_ crcs: [UInt32]) -> SnapshotSection {
        var w = LEWriter()
        w.u32(UInt32(MemoryImage.chunkSize))
        w.u32(UInt32(crcs.count))
        for crc in crcs { w.u32(crc) }
        return SnapshotSection(name: name, version: version, minimumVersion: version, required: false, payload: w.bytes)
    }

    /// The chunk checksums of a snapshot whose memory.bin is `memoryLength` bytes, or nil when it
    /// has none (or uses another chunk size, which this reader cannot use); a section that does not
    /// fit memory.bin is refused.
    public static func decode(_ sections: [SnapshotSection], memoryLength: UInt64) throws(SnapshotError) -> [UInt32]? {
        guard let section = sections.first(where: { $0.name == name }) else { return nil }
        guard section.minimumVersion <= version else { return nil } // a newer layout: ignore the hint
        return try section.load(SectionSupport(current: version)) { (r: inout LEReader, _: UInt16) throws(LEDecodeError) -> [UInt32]? in
            let size = try r.u32("chunk size")
            let count = try r.u32("count")
            guard size == UInt32(MemoryImage.chunkSize) else {
                r = LEReader([]) // another chunk size: not usable here, and not an error
                return nil
            }
            let expected = MemoryImage.chunkCount(length: memoryLength)
            guard Int(count) == expected else {
                throw LEDecodeError.invalid(field: "count", reason: "\(count) chunks, but memory.bin has \(expected)")
            }
            guard r.remaining >= expected * 4 else {
                throw LEDecodeError.truncated(field: "chunk CRC32Cs", needed: expected * 4, available: r.remaining)
            }
            var crcs: [UInt32] = []
            crcs.reserveCapacity(expected)
            for _ in 0..<expected { crcs.append(try r.u32("chunk CRC32C")) }
            return crcs
        }
    }
}
