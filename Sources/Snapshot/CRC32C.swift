import CLinux

/// CRC32C (Castagnoli), the checksum of every part of a snapshot. Computed in C with the SSE4.2
/// crc32 instruction when the CPU has it (guest memory is hundreds of MiB), else with a table.
///
/// `update` continues a checksum: `update(checksum(a), b) == checksum(a + b)`.
public enum CRC32C {
    public static func update(_ crc: UInt32, _ buffer: UnsafeRawBufferPointer) -> UInt32 {
        guard let base = buffer.baseAddress, !buffer.isEmpty else { return crc }
        return clinux_crc32c(crc, base, buffer.count)
    }

    public static func update(_ crc: UInt32, _ bytes: ArraySlice<UInt8>) -> UInt32 {
        bytes.withUnsafeBytes { update(crc, $0) }
    }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBytes { update(0, $0) }
    }

    public static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt32 { update(0, bytes) }

    public static func checksum(_ buffer: UnsafeRawBufferPointer) -> UInt32 { update(0, buffer) }
}
