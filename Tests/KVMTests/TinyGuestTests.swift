import Glibc
import Devices
import KVM
import Machine
import Testing
import TestSupport
import VMMCore

/// Hand-assembled 64-bit guest programs run on the real /dev/kvm (kvm_pvm included: they are tiny).
/// Each gets the exact long-mode CPU state a Linux kernel gets.
@Suite("KVM tiny guests", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct TinyGuestTests {
    /// `mov dx, port` / `mov al, byte` / `out dx, al` for each byte.
    static func serialWrite(_ text: String, port: UInt16 = 0x3F8) -> [UInt8] {
        var code: [UInt8] = [0x66, 0xBA, UInt8(port & 0xFF), UInt8(port >> 8)] // mov dx, port
        for b in text.utf8 { code += [0xB0, b, 0xEE] }                          // mov al, b; out dx, al
        return code
    }
    /// `mov al, 0xFE` / `out 0x64, al`: pulse the reset line through the i8042.
    static let i8042Reset: [UInt8] = [0xB0, 0xFE, 0xE6, 0x64]
    static let hlt: [UInt8] = [0xF4]

    static func machine(_ code: [UInt8], console: RecordingConsole, cpus: Int = 1) throws -> Machine {
        try Machine(MachineConfig(memorySize: 16 << 20, cpus: cpus,
                                  console: console), boot: .program64(code: code, loadAddress: 0x100000))
    }

    @Test("a program writes to COM1 and resets through the i8042")
    func serialThenReset() throws {
        let console = RecordingConsole()
        let m = try Self.machine(Self.serialWrite("hello from the guest\n") + Self.i8042Reset + Self.hlt, console: console)
        let exit = m.run()
        #expect(console.text == "hello from the guest\n")
        #expect(exit == .reset("keyboard controller reset"))
        #expect(exit.exitStatus == 0)
    }

    @Test("a triple fault ends the VM as a guest crash (status 3) with the vCPU's registers, not a clean exit or a hang")
    func tripleFault() throws {
        let console = RecordingConsole()
        // ud2 with an empty IDT: #UD → #DF → triple fault.
        let m = try Self.machine(Self.serialWrite("x") + [0x0F, 0x0B], console: console)
        let exit = m.run()
        #expect(console.text == "x")
        let how = exit.detail
        guard exit.cause == .guestPanic else {
            Issue.record("a triple fault ended the VM as \(exit), not as a guest crash")
            return
        }
        #expect(how.hasPrefix("triple fault on vCPU 0\n"))
        #expect(how.contains("rip=0x"), "no register dump in \(how)")
        #expect(exit.exitStatus == 3)
        #expect(exit.summary.hasPrefix("guest crashed (triple fault on vCPU 0"))
    }

    @Test("the guest reads back the UART scratch register and the CMOS clock's status")
    func readsDevices() throws {
        let console = RecordingConsole()
        // Write 0x5A to the scratch register (0x3FF), read it back and send it to THR;
        // read CMOS register 0x0D (battery good: 0x80) and send it too.
        var code: [UInt8] = [0x66, 0xBA, 0xFF, 0x03, 0xB0, 0x5A, 0xEE, 0xB0, 0x00, 0xEC] // out 0x3ff,0x5a; in al,dx
        code += [0x66, 0xBA, 0xF8, 0x03, 0xEE]                                            // out 0x3f8, al
        code += [0xB0, 0x0D, 0xE6, 0x70, 0xE4, 0x71, 0xEE]                                // out 0x70,0x0d; in al,0x71; out dx,al
        code += Self.i8042Reset
        let m = try Self.machine(code, console: console)
        _ = m.run()
        #expect(console.output == [0x5A, 0x80])
    }

    @Test("an access to an unknown port reads all-ones and does not stop the guest")
    func unknownPort() throws {
        let console = RecordingConsole()
        // in al, 0xE9 (nothing there) → 0xFF → out to COM1.
        let code: [UInt8] = [0xE4, 0xE9, 0x66, 0xBA, 0xF8, 0x03, 0xEE] + Self.i8042Reset
        let m = try Self.machine(code, console: console)
        let exit = m.run()
        #expect(console.output == [0xFF])
        #expect(exit.exitStatus == 0)
    }

    @Test("requestExit stops a guest spinning in a loop")
    func stopSpinningGuest() throws {
        let console = RecordingConsole()
        let m = try Self.machine([0xEB, 0xFE], console: console) // jmp $
        afterDelay(milliseconds: 200) { m.requestExit(.poweredOff("test")) }
        #expect(m.run() == .poweredOff("test"))
    }
}

@Suite("KVM tiny guests: pause and resume", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct PauseResumeTests {
    final class Readings: @unchecked Sendable {
        var values: [UInt64] = []
        var pausedSeen = false
    }

    @Test("pause stops a counting guest (its counter stays still), resume lets it count again")
    func pauseResume() throws {
        // loop: inc qword [0x5000]; jmp loop
        let code: [UInt8] = [0x48, 0xFF, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, 0xEB, 0xF6]
        let m = try TinyGuestTests.machine(code, console: RecordingConsole(), cpus: 2)
        let r = Readings()
        @Sendable func counter() -> UInt64 {
            let b = (try? m.memory.read(GuestAddress(0x5000), count: 8)) ?? []
            return b.enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        }
        afterDelay(milliseconds: 300) {
            m.pause()
            r.pausedSeen = m.isPaused
            r.values.append(counter())
            usleep(200_000)
            r.values.append(counter())
            m.resume()
            usleep(300_000)
            r.values.append(counter())
            m.requestExit(.poweredOff("test"))
        }
        #expect(m.run() == .poweredOff("test"))
        #expect(r.pausedSeen)
        try #require(r.values.count == 3)
        #expect(r.values[0] > 0, "the guest ran before the pause")
        #expect(r.values[1] == r.values[0], "the counter moved while paused")
        #expect(r.values[2] > r.values[1], "the guest did not run again after resume")
    }

    @Test("a machine that ends while paused does not hang")
    func endWhilePaused() throws {
        let m = try TinyGuestTests.machine([0xEB, 0xFE], console: RecordingConsole())
        afterDelay(milliseconds: 200) {
            m.pause()
            m.requestExit(.poweredOff("test"))
        }
        #expect(m.run() == .poweredOff("test"))
    }
}
