/// Where each part of a direct Linux boot goes in guest memory, decided before anything is written.
public struct LinuxBootPlan: Equatable, Sendable {
    public var kernelAddress: UInt64
    public var entryPoint: UInt64
    public var bootParamsAddress: UInt64
    public var commandLineAddress: UInt64
    public var initrdAddress: UInt64?
    /// The range the decompressor works in: [decompressStart, decompressStart + init_size).
    public var decompressStart: UInt64
    public var decompressEnd: UInt64

    /// Where an initrd of `size` bytes lies with this plan (nil without one).
    public func initrdRange(size: UInt64?) -> Range<UInt64>? {
        guard let size, let at = initrdAddress else { return nil }
        return at..<(at + size)
    }
}

/// The fixed low-memory addresses a machine gives the loader.
public struct LinuxBootAddresses: Sendable {
    public var kernel: UInt64
    public var bootParams: UInt64
    public var commandLine: UInt64
    public var commandLineLimit: UInt64
    public init(kernel: UInt64, bootParams: UInt64, commandLine: UInt64, commandLineLimit: UInt64) {
        self.kernel = kernel
        self.bootParams = bootParams
        self.commandLine = commandLine
        self.commandLineLimit = commandLineLimit
    }
}

public enum LinuxLoader {
    static func alignUp(_ v: UInt64, _ a: UInt64) -> UInt64 { a <= 1 ? v : (v + a - 1) & ~(a - 1) }

    /// Plans a boot into RAM that is contiguous from 0 to `lowMemoryEnd` (the 32-bit RAM below the
    /// MMIO hole). Checks that the kernel, its decompression area, the command line and the initrd fit
    /// without overlapping.
    public static func plan(image: BzImage, commandLineLength: Int, initrdSize: UInt64?,
                            lowMemoryEnd: UInt64, addresses: LinuxBootAddresses) throws(BootError) -> LinuxBootPlan {
        let maxCmdline = Int(image.commandLineSizeMax)
        guard commandLineLength <= maxCmdline else {
            throw .commandLineTooLong(length: commandLineLength, max: maxCmdline)
        }
        guard UInt64(commandLineLength) + 1 <= addresses.commandLineLimit - addresses.commandLine else {
            throw .commandLineTooLong(length: commandLineLength, max: Int(addresses.commandLineLimit - addresses.commandLine) - 1)
        }
        let kernelSize = UInt64(image.protectedModeKernel.count)
        let kernelEnd = addresses.kernel + kernelSize
        // head_64.S decompresses at max(align_up(load address, kernel_alignment), LOAD_PHYSICAL_ADDR).
        let align = UInt64(max(image.kernelAlignment, 1))
        let start = image.relocatable ? max(alignUp(addresses.kernel, align), image.preferredAddress) : image.preferredAddress
        let end = start + UInt64(image.initSize)
        let needed = max(end, kernelEnd)
        guard needed <= lowMemoryEnd else {
            throw .memoryTooSmall(needed: needed, available: lowMemoryEnd, what: "the kernel (\(kernelSize >> 10) KiB, init_size \(image.initSize >> 10) KiB)")
        }

        var initrdAddress: UInt64?
        if let size = initrdSize, size > 0 {
            // Highest page-aligned spot ending at or below min(initrd_addr_max + 1, end of low RAM).
            let ceiling = min(UInt64(image.initrdAddressMax) + 1, lowMemoryEnd)
            let floor = alignUp(needed, 4096)
            guard ceiling > floor, size <= ceiling - floor else {
                throw .initrdTooLarge(size: size, room: ceiling > floor ? ceiling - floor : 0)
            }
            initrdAddress = (ceiling - size) & ~UInt64(4095)
        }
        return LinuxBootPlan(
            kernelAddress: addresses.kernel, entryPoint: addresses.kernel + 0x200,
            bootParamsAddress: addresses.bootParams, commandLineAddress: addresses.commandLine,
            initrdAddress: initrdAddress, decompressStart: start, decompressEnd: end)
    }
}
