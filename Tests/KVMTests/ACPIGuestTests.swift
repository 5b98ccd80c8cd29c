import Glibc
import ACPI
import Devices
import KVM
import Machine
import Synchronization
import Testing
import TestSupport
import VMMCore
import VMMSys

/// Tiny guests that drive the ACPI fixed hardware the way Linux does, through real port I/O exits.
@Suite("KVM tiny guests: ACPI fixed hardware", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct ACPIGuestTests {
    /// `mov dx, port` / `mov ax, value` / `out dx, ax`.
    static func out16(_ port: UInt16, _ value: UInt16) -> [UInt8] {
        [0x66, 0xBA, UInt8(port & 0xFF), UInt8(port >> 8), 0x66, 0xB8, UInt8(value & 0xFF), UInt8(value >> 8), 0x66, 0xEF]
    }
    /// `mov dx, port` / `mov al, value` / `out dx, al`.
    static func out8(_ port: UInt16, _ value: UInt8) -> [UInt8] {
        [0x66, 0xBA, UInt8(port & 0xFF), UInt8(port >> 8), 0xB0, value, 0xEE]
    }
    static let jmpSelf: [UInt8] = [0xEB, 0xFE]

    @Test("S5 through PM1a_CNT (SLP_TYP, then SLP_TYP|SLP_EN, as ACPICA writes it) powers off with status 0")
    func s5PowerOff() throws {
        let typ = UInt16(PlatformTables.s5SleepType) << 10
        let code = TinyGuestTests.serialWrite("s5\n") + Self.out16(0x604, typ) + Self.out16(0x604, typ | 1 << 13) + Self.jmpSelf
        let console = RecordingConsole()
        let m = try TinyGuestTests.machine(code, console: console)
        let exit = m.run()
        #expect(console.text == "s5\n")
        #expect(exit == .poweredOff("ACPI S5"))
        #expect(exit.exitStatus == 0)
    }

    @Test("the FADT reset register (0x0F to port 0xCF9) ends the VM as a reset")
    func resetRegister() throws {
        let m = try TinyGuestTests.machine(Self.out8(0xCF9, 0x0F) + Self.jmpSelf, console: RecordingConsole())
        #expect(m.run() == .reset("ACPI reset register"))
    }

    @Test("a host power-button press shows up in PM1_STS for a guest that enabled PWRBTN_EN")
    func powerButton() throws {
        // PM1_EN.PWRBTN_EN = 1; loop: in ax, 0x600; test ax, 0x100; jz loop; then print "P" and S5.
        var code = Self.out16(0x602, 0x0100)
        code += [0x66, 0xBA, 0x00, 0x06]                 // mov dx, 0x600
        code += [0x66, 0xED, 0x66, 0xA9, 0x00, 0x01, 0x74, 0xF8] // loop: in ax, dx; test ax, 0x100; jz loop
        code += Self.out16(0x600, 0x0100)                // clear PWRBTN_STS (write 1)
        code += TinyGuestTests.serialWrite("P")
        let typ = UInt16(PlatformTables.s5SleepType) << 10
        code += Self.out16(0x604, typ | 1 << 13) + Self.jmpSelf
        let console = RecordingConsole()
        let m = try TinyGuestTests.machine(code, console: console)
        afterDelay(milliseconds: 300) { m.pressPowerButton() }
        let exit = m.run()
        #expect(console.text == "P")
        #expect(exit == .poweredOff("ACPI S5"))
        #expect(m.acpi.pm1Status & 0x0100 == 0, "the guest cleared PWRBTN_STS")
    }

    @Test("the PM timer counts up between two guest reads")
    func pmTimer() throws {
        // Read the timer, spin a little, read it again; send "1" to COM1 if the second reading is larger.
        var code: [UInt8] = [0x66, 0xBA, 0x08, 0x06, 0xED, 0x89, 0xC3]          // mov dx,0x608; in eax,dx; mov ebx,eax
        code += [0xB9, 0x00, 0x00, 0x01, 0x00, 0xE2, 0xFE]                      // mov ecx,0x10000; loop $
        code += [0xED, 0x39, 0xD8, 0x0F, 0x97, 0xC0, 0x04, 0x30]                // in eax,dx; cmp eax,ebx; seta al; add al,'0'
        code += [0x66, 0xBA, 0xF8, 0x03, 0xEE]                                   // mov dx,0x3f8; out dx,al
        code += Self.out8(0xCF9, 0x0F) + Self.jmpSelf
        let console = RecordingConsole()
        let m = try TinyGuestTests.machine(code, console: console)
        _ = m.run()
        #expect(console.text == "1")
    }

    @Test("32 vCPUs: the machine creates them all and the MADT lists 32 enabled local APICs with distinct IDs")
    func thirtyTwoCPUs() throws {
        let m = try Machine(MachineConfig(memorySize: 64 << 20, cpus: 32, console: RecordingConsole()),
                            boot: .program64(code: Self.jmpSelf, loadAddress: 0x100000))
        let madt = try #require(m.acpiTables?.tables.first { $0.name == "APIC" }).bytes
        var ids: [UInt8] = []
        var o = 44
        while o + 1 < madt.count, madt[o + 1] >= 2 {
            if madt[o] == 0, madt[o + 4] & 1 == 1 { ids.append(madt[o + 3]) }
            o += Int(madt[o + 1])
        }
        #expect(ids == (0..<32).map(UInt8.init))
    }

    @Test("vmgenid on a direct boot: the host loader places the GUID page, a change writes memory then raises GPE 5")
    func vmgenid() throws {
        var config = MachineConfig(memorySize: 16 << 20, console: RecordingConsole())
        let first = try #require(VMGenID.parseGUID("11111111-2222-3333-4444-555555555555"))
        config.vmGenerationID = first
        let m = try Machine(config, boot: .program64(code: Self.jmpSelf, loadAddress: 0x100000))
        let dev = try #require(m.vmgenid)
        let address = try #require(dev.address, "WRITE_POINTER reported the GUID address through etc/vmgenid_addr")
        #expect(address == 0xF0028)
        #expect(try m.memory.read(GuestAddress(address), count: 16) == first)
        // The VGIA field of the loaded SSDT points at the page (address - 40).
        let ssdt = try #require(m.acpiTables?.tables.first { $0.name == "SSDT" }).bytes
        let vgia = (0..<4).reduce(UInt32(0)) { $0 | UInt32(ssdt[VMGenIDTable.vgiaOffset + $1]) << (8 * $1) }
        #expect(UInt64(vgia) + 40 == address)
        #expect(ACPIChecksum.sum(ssdt) == 0)
        #expect(m.acpi.gpeStatus(byte: 0) & 0x20 == 0)
        let second = VMGenID.randomGUID()
        #expect(m.setGenerationID(second))
        #expect(try m.memory.read(GuestAddress(address), count: 16) == second)
        #expect(m.acpi.gpeStatus(byte: 0) & 0x20 != 0, "GPE 5 status set")
        #expect(m.generationIDChange == .pending, "pending until the guest clears GPE 5")
    }

    /// A guest OSPM reduced to its GPE handling: poll GPE0_STS, write 1 to clear bit 5, print 'A'
    /// to COM1, forever.
    static let clearsGPE5: [UInt8] = {
        var code: [UInt8] = [0x66, 0xBA, 0x20, 0x06]             // top: mov dx, 0x620 (GPE0_STS)
        code += [0xEC, 0xA8, 0x20, 0x74, 0xFB]                   // poll: in al, dx; test al, 0x20; jz poll
        code += [0xB0, 0x20, 0xEE]                               // mov al, 0x20; out dx, al (write 1 to clear)
        code += TinyGuestTests.serialWrite("A")                  // mov dx, 0x3F8; mov al, 'A'; out dx, al
        code += [0xEB, UInt8(bitPattern: Int8(-(code.count + 2)))] // jmp top
        return code
    }()

    /// Runs `m` on its own thread; the result ends the run and waits for it.
    static func start(_ m: Machine) throws -> () -> Void {
        let run = try OSThread(name: "test-machine", role: .io) { _ = m.run() }
        return {
            m.requestExit(.quit("test"))
            run.join()
        }
    }

    /// Waits up to 5 s for `condition`.
    static func waitUntil(_ condition: () -> Bool) -> Bool {
        for _ in 0..<1000 where !condition() { usleep(5_000) }
        return condition()
    }

    @Test("vmgenid acknowledgement: a guest that polls GPE0_STS and clears bit 5 acknowledges each change once, the latest of several")
    func vmgenidAcknowledged() throws {
        let code = Self.clearsGPE5
        #expect(Layout.gpe0 == 0x620)
        let console = RecordingConsole()
        let m = try TinyGuestTests.machine(code, console: console)
        #expect(m.generationIDChange == .unchanged)
        let acks = Mutex<[VMGenID.Acknowledgement]>([])
        m.onGenerationIDAcknowledged { ack in acks.withLock { $0.append(ack) } }
        let run = try OSThread(name: "test-machine", role: .io) { _ = m.run() }
        defer {
            m.requestExit(.quit("test"))
            run.join()
        }
        func waitFor(_ n: Int) -> Bool {
            for _ in 0..<1000 where acks.withLock({ $0.count }) < n { usleep(5_000) }
            return acks.withLock { $0.count } == n
        }
        let g1 = VMGenID.randomGUID(), g2 = VMGenID.randomGUID(), g3 = VMGenID.randomGUID()
        #expect(m.setGenerationID(g1))
        #expect(waitFor(1))
        #expect(console.text == "A")
        #expect(m.generationIDChange == acks.withLock { $0.first.map { .acknowledged($0) } })
        // Two changes while the vCPU is parked: the guest's one clear acknowledges the latest.
        m.pause()
        #expect(m.setGenerationID(g2))
        #expect(m.setGenerationID(g3))
        usleep(30_000)
        #expect(m.generationIDChange == .pending)
        m.resume()
        #expect(waitFor(2))
        usleep(100_000) // no further acknowledgement comes
        let all = acks.withLock { $0 }
        #expect(all.map(\.guid) == [g1, g3])
        #expect(all.count == 2 && all[1].latencyNanoseconds >= 30_000_000, "the pause counts in the latency")
        #expect(console.text == "AA", "the guest cleared GPE 5 twice")
        #expect(m.generationIDChange == .acknowledged(all[1]))
    }

    @Test("vmgenid: a guest that never clears GPE 5 gives no acknowledgement, and the change stays pending")
    func vmgenidNeverAcknowledged() throws {
        let m = try TinyGuestTests.machine(Self.jmpSelf, console: RecordingConsole())
        let acks = Mutex(0)
        m.onGenerationIDAcknowledged { _ in acks.withLock { $0 += 1 } }
        let run = try OSThread(name: "test-machine", role: .io) { _ = m.run() }
        defer {
            m.requestExit(.quit("test"))
            run.join()
        }
        #expect(m.setGenerationID(VMGenID.randomGUID()))
        usleep(200_000)
        #expect(acks.withLock { $0 } == 0)
        #expect(m.generationIDChange == .pending)
    }

    @Test("vmgenid acknowledgement across a snapshot: the restore's new GUID is acknowledged once; with the GUID kept, a change pending at the save is pending again")
    func vmgenidAcknowledgedAfterRestore() throws {
        let dir = makeTemporaryDirectory("swiftvmm-genid-ack")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let original = try TinyGuestTests.machine(Self.clearsGPE5, console: RecordingConsole())
        let stop = try Self.start(original)
        #expect(original.setGenerationID(VMGenID.randomGUID()))
        #expect(Self.waitUntil { if case .acknowledged = original.generationIDChange { true } else { false } })
        _ = try original.createSnapshot(at: dir + "/settled") // nothing pending
        original.pause()
        let pendingGUID = VMGenID.randomGUID()
        #expect(original.setGenerationID(pendingGUID))
        _ = try original.createSnapshot(at: dir + "/pending") // GPE 5 set, not yet cleared
        stop()

        final class Acks: Sendable {
            let list = Mutex<[VMGenID.Acknowledgement]>([])
            func withLock<R>(_ body: (inout [VMGenID.Acknowledgement]) -> R) -> R { list.withLock { body(&$0) } }
        }
        func restore(_ name: String, _ generationID: RestoreOptions.GenerationID) throws -> (Machine, Acks) {
            let m = try Machine.restore(from: dir + "/" + name, options: RestoreOptions(console: RecordingConsole(), generationID: generationID))
            let acks = Acks()
            m.onGenerationIDAcknowledged { ack in acks.withLock { $0.append(ack) } }
            return (m, acks)
        }
        // A new GUID: one acknowledgement, for it (the pending change of the save is superseded).
        let newGUID = VMGenID.randomGUID()
        let (clone, cloneAcks) = try restore("pending", .new(newGUID))
        #expect(clone.generationIDChange == .pending)
        let stopClone = try Self.start(clone)
        #expect(Self.waitUntil { cloneAcks.withLock { $0.count } == 1 })
        usleep(100_000)
        stopClone()
        #expect(cloneAcks.withLock { $0.map(\.guid) } == [newGUID])
        // Keeping the GUID: the change pending at the save is pending again, and acknowledged once.
        let (kept, keptAcks) = try restore("pending", .keep)
        #expect(kept.generationIDChange == .pending)
        let stopKept = try Self.start(kept)
        #expect(Self.waitUntil { keptAcks.withLock { $0.count } == 1 })
        usleep(100_000)
        stopKept()
        #expect(keptAcks.withLock { $0.map(\.guid) } == [pendingGUID])
        // Keeping the GUID of a snapshot with nothing pending: nothing to acknowledge.
        let (settled, settledAcks) = try restore("settled", .keep)
        #expect(settled.generationIDChange == .unchanged)
        let stopSettled = try Self.start(settled)
        usleep(100_000)
        stopSettled()
        #expect(settledAcks.withLock { $0.isEmpty })
    }

    @Test("without ACPI there is no RSDP in guest memory, and a second vCPU is refused")
    func noACPI() throws {
        let m = try Machine(MachineConfig(memorySize: 16 << 20, console: RecordingConsole(), acpi: false),
                            boot: .program64(code: Self.jmpSelf, loadAddress: 0x100000))
        #expect(m.acpiTables == nil)
        #expect(try m.memory.read(GuestAddress(0xE0000), count: 8) == [UInt8](repeating: 0, count: 8))
        #expect(throws: MachineError.self) {
            try Machine(MachineConfig(memorySize: 16 << 20, cpus: 2, console: RecordingConsole(), acpi: false),
                        boot: .program64(code: Self.jmpSelf, loadAddress: 0x100000))
        }
    }

    @Test("the ACPI tables are in guest memory where the RSDP says, inside the e820 ACPI range")
    func tablesInMemory() throws {
        let m = try TinyGuestTests.machine(Self.jmpSelf, console: RecordingConsole(), cpus: 2)
        let tables = try #require(m.acpiTables)
        let rsdp = tables.rsdpAddress
        #expect(try m.memory.read(GuestAddress(rsdp), count: 8) == Array("RSD PTR ".utf8))
        let acpiRanges = m.e820Map().filter { $0.kind == .acpi }
        for t in tables.tables {
            #expect(try m.memory.read(GuestAddress(t.address), count: t.bytes.count) == t.bytes, "\(t.name) in guest memory")
            #expect(acpiRanges.contains { $0.address <= t.address && t.address + UInt64(t.bytes.count) <= $0.address + $0.size })
        }
    }
}
