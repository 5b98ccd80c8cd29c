/// Why a kernel image or boot configuration was refused. Each case names the offending value.
public enum BootError: Error, CustomStringConvertible, Equatable, Sendable {
    case tooSmall(size: Int)
    case badBootFlag(UInt16)
    case notBzImage(magic: UInt32)
    case protocolTooOld(version: UInt16)
    case not64Bit
    case notLoadedHigh
    case truncated(expected: Int, actual: Int)
    case absurdField(name: String, value: UInt64)
    case commandLineTooLong(length: Int, max: Int)
    case memoryTooSmall(needed: UInt64, available: UInt64, what: String)
    case initrdTooLarge(size: UInt64, room: UInt64)
    /// The setup_data list (a device tree) does not fit its region of low memory.
    case setupDataTooLarge(size: UInt64, room: UInt64)

    public var description: String {
        switch self {
        case .tooSmall(let size):
            return "not a bzImage: the file is \(size) bytes, smaller than a boot sector and setup header"
        case .badBootFlag(let flag):
            return "not a bzImage: boot flag is 0x\(String(flag, radix: 16)), expected 0xaa55"
        case .notBzImage(let magic):
            return "not a bzImage: header magic is 0x\(String(magic, radix: 16)), expected \"HdrS\" (0x53726448)"
        case .protocolTooOld(let v):
            return "kernel boot protocol \(v >> 8).\(String(format2: v & 0xFF)) is too old: swiftvmm needs 2.12 or later (64-bit entry point)"
        case .not64Bit:
            return "the kernel has no 64-bit entry point (XLF_KERNEL_64 not set); build it for x86_64"
        case .notLoadedHigh:
            return "the kernel is a zImage, not a bzImage (LOADED_HIGH not set)"
        case .truncated(let expected, let actual):
            return "the kernel image is truncated: its header describes \(expected) bytes but the file has \(actual)"
        case .absurdField(let name, let value):
            return "the kernel header field \(name) has an impossible value (0x\(String(value, radix: 16)))"
        case .commandLineTooLong(let length, let max):
            return "the kernel command line is \(length) bytes; this kernel accepts at most \(max)"
        case .memoryTooSmall(let needed, let available, let what):
            return "guest memory too small: \(what) needs \(needed >> 20) MiB of low memory, only \(available >> 20) MiB available; raise --memory"
        case .initrdTooLarge(let size, let room):
            return "the initrd (\(size >> 10) KiB) does not fit in guest memory (\(room >> 10) KiB free above the kernel); raise --memory"
        case .setupDataTooLarge(let size, let room):
            return "the boot's setup_data (the device tree) needs \(size) bytes, more than the \(room) bytes of low memory set aside for it"
        }
    }
}

extension String {
    /// Two-digit decimal, for protocol minor versions.
    init(format2 value: UInt16) {
        self = value < 10 ? "0\(value)" : "\(value)"
    }
}

/// A parsed Linux x86 bzImage (boot protocol, `Documentation/x86/boot.rst`).
///
/// Parsing never traps: every offset and size is checked against the file.
public struct BzImage: Sendable {
    // Setup header offsets (from the start of the file / of boot_params).
    static let setupSectsOffset = 0x1F1
    static let bootFlagOffset = 0x1FE
    static let jumpOffset = 0x200
    static let headerMagicOffset = 0x202
    static let versionOffset = 0x206
    static let loadflagsOffset = 0x211
    static let initrdAddrMaxOffset = 0x22C
    static let kernelAlignmentOffset = 0x230
    static let relocatableOffset = 0x234
    static let xloadflagsOffset = 0x236
    static let cmdlineSizeOffset = 0x238
    static let prefAddressOffset = 0x258
    static let initSizeOffset = 0x260
    /// boot_params holds the setup header up to here (the next field, edd_mbr_sig_buffer, is at 0x290).
    static let headerLimit = 0x290

    public static let minimumProtocol: UInt16 = 0x020C
    static let magic: UInt32 = 0x5372_6448 // "HdrS"

    public let protocolVersion: UInt16
    public let setupSectors: Int
    public let loadFlags: UInt8
    public let xloadFlags: UInt16
    public let relocatable: Bool
    public let kernelAlignment: UInt32
    public let initrdAddressMax: UInt32
    public let commandLineSizeMax: UInt32
    public let preferredAddress: UInt64
    public let initSize: UInt32
    /// The setup header bytes from 0x1F1, to copy into boot_params at the same offset.
    public let setupHeader: [UInt8]
    /// The protected-mode kernel (everything after the real-mode setup sectors).
    public let protectedModeKernel: ArraySlice<UInt8>
    /// The boot sector, setup header and real-mode setup code: the (setup_sects + 1) * 512 bytes
    /// before the protected-mode kernel (what firmware gets as fw_cfg SETUP_DATA).
    public let setupCode: ArraySlice<UInt8>

    public init(_ bytes: [UInt8]) throws(BootError) {
        guard bytes.count >= Self.headerLimit else { throw .tooSmall(size: bytes.count) }
        func u8(_ o: Int) -> UInt8 { bytes[o] }
        func u16(_ o: Int) -> UInt16 { UInt16(bytes[o]) | UInt16(bytes[o + 1]) << 8 }
        func u32(_ o: Int) -> UInt32 { UInt32(u16(o)) | UInt32(u16(o + 2)) << 16 }
        func u64(_ o: Int) -> UInt64 { UInt64(u32(o)) | UInt64(u32(o + 4)) << 32 }

        let bootFlag = u16(Self.bootFlagOffset)
        guard bootFlag == 0xAA55 else { throw .badBootFlag(bootFlag) }
        let magic = u32(Self.headerMagicOffset)
        guard magic == Self.magic else { throw .notBzImage(magic: magic) }
        let version = u16(Self.versionOffset)
        guard version >= Self.minimumProtocol else { throw .protocolTooOld(version: version) }

        protocolVersion = version
        loadFlags = u8(Self.loadflagsOffset)
        guard loadFlags & 0x01 != 0 else { throw .notLoadedHigh }
        xloadFlags = u16(Self.xloadflagsOffset)
        guard xloadFlags & 0x01 != 0 else { throw .not64Bit }

        var sects = Int(u8(Self.setupSectsOffset))
        if sects == 0 { sects = 4 }
        setupSectors = sects
        let pmOffset = (sects + 1) * 512
        guard pmOffset < bytes.count else { throw .truncated(expected: pmOffset + 1, actual: bytes.count) }

        kernelAlignment = u32(Self.kernelAlignmentOffset)
        guard kernelAlignment == 0 || kernelAlignment.nonzeroBitCount == 1, kernelAlignment <= 1 << 30 else {
            throw .absurdField(name: "kernel_alignment", value: UInt64(kernelAlignment))
        }
        relocatable = u8(Self.relocatableOffset) != 0
        initrdAddressMax = u32(Self.initrdAddrMaxOffset)
        commandLineSizeMax = version >= 0x0206 ? u32(Self.cmdlineSizeOffset) : 255
        guard commandLineSizeMax <= 1 << 20 else {
            throw .absurdField(name: "cmdline_size", value: UInt64(commandLineSizeMax))
        }
        preferredAddress = u64(Self.prefAddressOffset)
        guard preferredAddress >= 0x100000, preferredAddress < 1 << 46 else {
            throw .absurdField(name: "pref_address", value: preferredAddress)
        }
        initSize = u32(Self.initSizeOffset)
        // init_size covers the decompressed kernel plus its working space: a real one is tens of MiB.
        guard initSize > 0, initSize <= 1 << 30 else { throw .absurdField(name: "init_size", value: UInt64(initSize)) }

        // The header runs from 0x1F1 to 0x202 + the jump's displacement byte at 0x201.
        let headerEnd = min(0x202 + Int(u8(0x201)), Self.headerLimit)
        setupHeader = Array(bytes[Self.setupSectsOffset..<headerEnd])
        protectedModeKernel = bytes[pmOffset...]
        setupCode = bytes[..<pmOffset]
    }
}
