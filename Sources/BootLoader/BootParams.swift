/// An e820 memory map entry.
public struct E820Entry: Equatable, Sendable, Codable {
    public enum Kind: UInt32, Sendable, Codable {
        case ram = 1, reserved = 2, acpi = 3, nvs = 4, unusable = 5
    }
    public var address: UInt64
    public var size: UInt64
    public var kind: Kind
    public init(address: UInt64, size: UInt64, kind: Kind) {
        self.address = address
        self.size = size
        self.kind = kind
    }
}

/// Builds the 4096-byte boot_params ("zero page") for the 64-bit boot protocol.
public struct BootParams: Sendable {
    public static let size = 4096
    static let acpiRSDPOffset = 0x070
    static let extRamdiskImageOffset = 0x0C0
    static let extRamdiskSizeOffset = 0x0C4
    static let extCmdLinePtrOffset = 0x0C8
    static let e820EntriesOffset = 0x1E8
    static let vidModeOffset = 0x1FA
    static let typeOfLoaderOffset = 0x210
    static let ramdiskImageOffset = 0x218
    static let ramdiskSizeOffset = 0x21C
    static let cmdLinePtrOffset = 0x228
    static let setupDataOffset = 0x250
    static let e820TableOffset = 0x2D0
    public static let maxE820Entries = 128

    public private(set) var bytes: [UInt8]

    /// Starts from all zeros (see the sentinel pitfall) with the kernel's setup header copied in.
    public init(image: BzImage) {
        bytes = [UInt8](repeating: 0, count: Self.size)
        bytes.replaceSubrange(BzImage.setupSectsOffset..<(BzImage.setupSectsOffset + image.setupHeader.count), with: image.setupHeader)
        set16(0xFFFF, at: Self.vidModeOffset)  // "normal" video mode
        bytes[Self.typeOfLoaderOffset] = 0xFF  // undefined boot loader
    }

    mutating func set16(_ v: UInt16, at o: Int) {
        bytes[o] = UInt8(truncatingIfNeeded: v)
        bytes[o + 1] = UInt8(truncatingIfNeeded: v >> 8)
    }

    mutating func set32(_ v: UInt32, at o: Int) {
        for i in 0..<4 { bytes[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }

    mutating func set64(_ v: UInt64, at o: Int) {
        for i in 0..<8 { bytes[o + i] = UInt8(truncatingIfNeeded: v >> (8 * i)) }
    }

    public mutating func setCommandLine(address: UInt64) {
        set32(UInt32(truncatingIfNeeded: address), at: Self.cmdLinePtrOffset)
        set32(UInt32(truncatingIfNeeded: address >> 32), at: Self.extCmdLinePtrOffset)
    }

    public mutating func setInitrd(address: UInt64, size: UInt64) {
        set32(UInt32(truncatingIfNeeded: address), at: Self.ramdiskImageOffset)
        set32(UInt32(truncatingIfNeeded: address >> 32), at: Self.extRamdiskImageOffset)
        set32(UInt32(truncatingIfNeeded: size), at: Self.ramdiskSizeOffset)
        set32(UInt32(truncatingIfNeeded: size >> 32), at: Self.extRamdiskSizeOffset)
    }

    /// Points `hdr.setup_data` at the first entry of a `SetupData.chain` (protocol 2.09+, which
    /// every bzImage we accept has).
    public mutating func setSetupData(address: UInt64) {
        set64(address, at: Self.setupDataOffset)
    }

    public mutating func setACPIRSDP(address: UInt64) {
        set64(address, at: Self.acpiRSDPOffset)
    }

    /// Writes the e820 table (at most 128 entries fit in the zero page).
    public mutating func setE820(_ entries: [E820Entry]) {
        let n = min(entries.count, Self.maxE820Entries)
        bytes[Self.e820EntriesOffset] = UInt8(n)
        for (i, e) in entries.prefix(n).enumerated() {
            let o = Self.e820TableOffset + i * 20
            set64(e.address, at: o)
            set64(e.size, at: o + 8)
            set32(e.kind.rawValue, at: o + 16)
        }
    }
}
