import Glibc
import Machine
import Testing
import TestSupport

@Suite("HLT", .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
struct HaltTests {
    @Test("a vCPU that halts with interrupts off does not end the VM: KVM's in-kernel APIC keeps it halted until the VM is stopped")
    func haltIsNotPowerOff() throws {
        let console = RecordingConsole()
        // out 0x3f8, 'h'; cli; hlt
        let code: [UInt8] = [0x66, 0xBA, 0xF8, 0x03, 0xB0, 0x68, 0xEE, 0xFA, 0xF4]
        let m = try Machine(MachineConfig(memorySize: 16 << 20, console: console), boot: .program64(code: code, loadAddress: 0x100000))
        afterDelay(milliseconds: 1000) { m.requestExit(.quit("test")) }
        let exit = m.run()
        #expect(console.text == "h")
        #expect(exit == .quit("test"), "a halted vCPU ended the VM: \(exit)")
    }
}
