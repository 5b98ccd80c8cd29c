import BootLoader
import WireFormat

/// fw_cfg's numeric item keys that this machine provides (QEMU's `FW_CFG_*`).
public enum FwCfgKeys {
    public static let cpuCount: UInt16 = 0x0005
    public static let kernelSize: UInt16 = 0x0008
    public static let initrdSize: UInt16 = 0x000B
    public static let kernelData: UInt16 = 0x0011
    public static let initrdData: UInt16 = 0x0012
    public static let commandLineSize: UInt16 = 0x0014
    public static let commandLineData: UInt16 = 0x0015
    public static let setupSize: UInt16 = 0x0017
    public static let setupData: UInt16 = 0x0018
}

/// A byte count as fw_cfg's 32-bit little-endian size items carry it.
func le32Bytes(_ v: Int) -> [UInt8] { littleEndianBytes(UInt32(truncatingIfNeeded: v)) }

extension E820Entry {
    /// QEMU's `etc/e820` entry: u64 address, u64 length, u32 type, little-endian.
    var fwCfgBytes: [UInt8] {
        var w = LEWriter(capacity: 20)
        w.u64(address)
        w.u64(size)
        w.u32(kind.rawValue)
        return w.bytes
    }
}

/// The 16-byte `etc/vmcoreinfo` record: le16 host_format, le16 guest_format, le32 size, le64 paddr.
public struct VMCoreInfo: Equatable, Sendable, CustomStringConvertible {
    public static let formatELF: UInt16 = 1
    /// What the host puts in the file first: it understands the ELF note format.
    public static let hostAnnouncement: [UInt8] = [UInt8(formatELF), 0] + [UInt8](repeating: 0, count: 14)

    public var hostFormat: UInt16
    public var guestFormat: UInt16
    public var size: UInt32
    public var physicalAddress: UInt64

    public init(_ bytes: [UInt8]) {
        func le(_ o: Int, _ n: Int) -> UInt64 {
            (0..<n).reduce(UInt64(0)) { $0 | UInt64(o + $1 < bytes.count ? bytes[o + $1] : 0) << (8 * UInt64($1)) }
        }
        hostFormat = UInt16(le(0, 2))
        guestFormat = UInt16(le(2, 2))
        size = UInt32(le(4, 4))
        physicalAddress = le(8, 8)
    }

    public var description: String {
        "guest format \(guestFormat)\(guestFormat == VMCoreInfo.formatELF ? " (ELF note)" : ""), \(size) bytes at 0x\(String(physicalAddress, radix: 16))"
    }
}
