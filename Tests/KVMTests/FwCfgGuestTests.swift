import Devices
import KVM
import Machine
import Testing
import TestSupport
import VMMCore

/// fw_cfg as the guest's qemu_fw_cfg driver reaches it: the I/O ports, through real port I/O exits.
@Suite("KVM tiny guests: fw_cfg", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct FwCfgGuestTests {
    /// Selects `key` (16-bit write to 0x510), then copies `count` data bytes (0x511) to COM1.
    static func copyItem(key: UInt16, count: Int) -> [UInt8] {
        var code: [UInt8] = [0x66, 0xBA, 0x10, 0x05, 0x66, 0xB8, UInt8(key & 0xFF), UInt8(key >> 8), 0x66, 0xEF] // out 0x510, ax
        for _ in 0..<count {
            code += [0x66, 0xBA, 0x11, 0x05, 0xEC]  // mov dx, 0x511; in al, dx
            code += [0x66, 0xBA, 0xF8, 0x03, 0xEE]  // mov dx, 0x3f8; out dx, al
        }
        return code
    }

    @Test("the guest reads the signature and a host-added opt/ file through the ports")
    func signatureAndFile() throws {
        let console = RecordingConsole()
        var config = MachineConfig(memorySize: 16 << 20, console: console)
        config.fwCfgFiles = [(name: "opt/swiftvmm/greeting", data: Array("hello".utf8))]
        // The file's selector is found by the host here; a guest would look it up in the directory.
        let probe = try Machine(config, boot: .program64(code: [0xF4], loadAddress: 0x100000))
        let key = try #require(probe.fwCfg.selector(ofFile: "opt/swiftvmm/greeting"))
        #expect(probe.fwCfg.fileNames.contains("etc/table-loader"))
        #expect(probe.fwCfg.fileNames.contains("etc/acpi/tables") && probe.fwCfg.fileNames.contains("etc/acpi/rsdp"))
        #expect(probe.fwCfg.fileNames.contains("etc/e820"))

        let code = Self.copyItem(key: FwCfg.signatureKey, count: 4) + Self.copyItem(key: key, count: 5)
            + [0x66, 0xBA, 0xF9, 0x0C, 0xB0, 0x0F, 0xEE] // reset through 0xCF9
        let m = try Machine(config, boot: .program64(code: code, loadAddress: 0x100000))
        #expect(m.run() == .reset("ACPI reset register"))
        #expect(console.text == "QEMUhello")
    }

    @Test("etc/e820 matches the boot e820 map, in QEMU's 20-byte format")
    func e820File() throws {
        let m = try Machine(MachineConfig(memorySize: 32 << 20, console: RecordingConsole()),
                            boot: .program64(code: [0xF4], loadAddress: 0x100000))
        let bytes = try #require(m.fwCfg.fileData("etc/e820"))
        let map = m.e820Map()
        #expect(bytes.count == map.count * 20)
        for (i, e) in map.enumerated() {
            let r = Array(bytes[(i * 20)..<(i * 20 + 20)])
            let address = (0..<8).reduce(UInt64(0)) { $0 | UInt64(r[$1]) << (8 * $1) }
            let size = (0..<8).reduce(UInt64(0)) { $0 | UInt64(r[8 + $1]) << (8 * $1) }
            #expect(address == e.address && size == e.size && UInt32(r[16]) == e.kind.rawValue)
        }
    }
}
