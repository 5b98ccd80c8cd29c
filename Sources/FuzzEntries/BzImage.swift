import BootLoader

extension Fuzz {
    /// `fuzz-bzimage`: any bytes as a kernel image, then a boot plan for a few memory sizes. The parser
    /// must either accept the image or throw a `BootError`; a trap is a bug.
    public static func bzImage(_ bytes: [UInt8]) {
        let size = bytes.count
        guard let image = try? BzImage(bytes) else { return }
        for memory: UInt64 in [16 << 20, 256 << 20, 3 << 30] {
            _ = try? LinuxLoader.plan(
                image: image, commandLineLength: size % 5000, initrdSize: UInt64(size) * 1000, lowMemoryEnd: memory,
                addresses: LinuxBootAddresses(kernel: 0x100000, bootParams: 0x7000, commandLine: 0x20000, commandLineLimit: 0x30000))
        }
        var params = BootParams(image: image)
        params.setCommandLine(address: 0x20000)
        _ = params.bytes
    }
}
