import BootLoader
import Devices
import Glibc
import KVM
import Machine
import Testing
import TestSupport
import VMMCore
import VMMSys

/// The firmware boot path: a ROM mapped below 4 GiB runs from the reset vector in real mode.
@Suite("KVM tiny guests: firmware boot", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct FirmwareBootTests {
    /// A 4 KiB ROM (real mode, CS.base 0xFFFF0000): the reset vector jumps to the ROM's start (IP 0xF000),
    /// which reads fw_cfg INITRD_SIZE's low byte (sent as a digit) and the first command-line byte,
    /// prints them and "R" on COM1, and resets through 0xCF9.
    static func tinyROM() -> [UInt8] {
        var rom = [UInt8](repeating: 0xF4, count: 4096)
        func select(_ key: UInt16) -> [UInt8] { [0xBA, 0x10, 0x05, 0xB8, UInt8(key & 0xFF), UInt8(key >> 8), 0xEF] }
        let readData: [UInt8] = [0xBA, 0x11, 0x05, 0xEC]           // mov dx, 0x511; in al, dx
        let toCOM1: [UInt8] = [0xBA, 0xF8, 0x03, 0xEE]             // mov dx, 0x3f8; out dx, al
        var code = select(0x000B) + readData + [0x04, 0x30] + toCOM1 // INITRD_SIZE low byte + '0'
        code += select(0x0015) + readData + toCOM1                   // CMDLINE_DATA[0]
        code += [0xB0, 0x52] + toCOM1                                // 'R'
        code += [0xBA, 0xF9, 0x0C, 0xB0, 0x0F, 0xEE, 0xF4]           // out 0xcf9, 0x0f
        rom.replaceSubrange(0..<code.count, with: code)
        rom.replaceSubrange((4096 - 16)..<(4096 - 13), with: [0xE9, 0x0D, 0xF0]) // jmp 0xF000
        return rom
    }

    static func kernel() throws -> BzImage {
        let path = try #require(installedDebianKernel(), "the stock kernel (linux-image-amd64) is needed")
        let fd = open(path, O_RDONLY)
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: 64 << 20)
        let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
        return try BzImage(Array(bytes.prefix(max(0, n))))
    }

    @Test("the vCPU starts at the reset vector of the read-only ROM, and fw_cfg carries kernel, initrd and command line")
    func resetVector() throws {
        let console = RecordingConsole()
        let image = try Self.kernel()
        let m = try Machine(MachineConfig(memorySize: 32 << 20, console: console),
                            boot: .firmware(rom: Self.tinyROM(), kernel: image, initrd: [1, 2, 3], commandLine: "console=ttyS0"))
        #expect(m.acpiTables == nil, "the firmware, not the host, runs the table-loader")
        #expect(m.run() == .reset("ACPI reset register"))
        #expect(console.text == "3cR")
    }

    @Test("a firmware image of the wrong size is refused with a clear error")
    func badROM() throws {
        let image = try Self.kernel()
        for size in [0, 100, 512 << 10] {
            #expect(throws: MachineError.self) {
                try Machine(MachineConfig(memorySize: 32 << 20, console: RecordingConsole()),
                            boot: .firmware(rom: [UInt8](repeating: 0, count: size), kernel: image, initrd: nil, commandLine: ""))
            }
        }
    }

    @Test("a snapshot of a firmware boot keeps the kernel items, even while one is being read")
    func snapshotKeepsBootItems() throws {
        let dir = makeTemporaryDirectory("swiftvmm-fw-snap")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let image = try Self.kernel()
        let m = try Machine(MachineConfig(memorySize: 32 << 20, console: RecordingConsole()),
                            boot: .firmware(rom: Self.tinyROM(), kernel: image, initrd: [1, 2, 3], commandLine: "console=ttyS0"))
        // Select the kernel item and read 3 bytes of it through the I/O ports, as firmware would.
        let ports = m.fwCfg.ports
        withUnsafeBytes(of: FwCfgKeys.kernelData.littleEndian) { ports.write(offset: 0, data: $0) }
        var byte: UInt8 = 0
        for _ in 0..<3 { withUnsafeMutableBytes(of: &byte) { ports.read(offset: 1, data: $0) } }
        _ = try m.createSnapshot(at: dir + "/snap")

        let restored = try Machine.restore(from: dir + "/snap", options: RestoreOptions(console: RecordingConsole(), generationID: .keep))
        #expect(restored.fwCfg.itemData(key: FwCfgKeys.kernelData) == Array(image.protectedModeKernel))
        #expect(restored.fwCfg.itemData(key: FwCfgKeys.initrdData) == [1, 2, 3])
        // The vCPU had not left the reset vector: the restored machine runs the same ROM to its end.
        let console = RecordingConsole()
        let again = try Machine.restore(from: dir + "/snap", options: RestoreOptions(console: console, generationID: .keep))
        #expect(again.run() == .reset("ACPI reset register"))
        #expect(console.text == "3cR")
        // The read continues at the fourth byte of the kernel.
        withUnsafeMutableBytes(of: &byte) { restored.fwCfg.ports.read(offset: 1, data: $0) }
        #expect(byte == image.protectedModeKernel[image.protectedModeKernel.startIndex + 3])
    }
}
