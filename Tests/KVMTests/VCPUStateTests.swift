import CKVM
import Glibc
import KVM
import Machine
import Testing
import TestSupport
import VMMCore
import WireFormat

/// A bare VM for state tests, built with the KVM layer alone: RAM, the in-kernel irqchip and PIT,
/// one vCPU with the host's CPUID and, optionally, in 64-bit mode at `StateTestVM.code`.
final class StateTestVM {
    static let memorySize: UInt64 = 4 << 20
    static let gdt: UInt64 = 0x500
    static let code: UInt64 = 0x1000
    static let pml4: UInt64 = 0x2000
    static let counter: UInt64 = 0x5000
    static let stack: UInt64 = 0x8000
    /// The port the counting guest reads from.
    static let port: UInt16 = 0x81

    /// loop: inc rbx; inc qword [0x5000]; in al, 0x81; jmp loop. Every turn counts in a register and
    /// in memory, then exits for port input. (Only instructions KVM's emulator knows: on kvm_pvm it
    /// runs the guest.)
    static let countingGuest: [UInt8] = [
        0x48, 0xFF, 0xC3,                               // loop: inc rbx
        0x48, 0xFF, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, // inc qword [0x5000]
        0xE4, 0x81,                                     // in al, 0x81
        0xEB, 0xF1,                                     // jmp loop
    ]
    /// The `jmp` after `in`: where RIP is once an input exit is complete.
    static let afterInput: UInt64 = code + 13
    /// What `setUp` puts in XMM0-XMM15.
    static func xmmPattern(_ n: Int) -> [UInt8] { (0..<16).map { UInt8(truncatingIfNeeded: n * 15 + $0 + 1) } }

    let kvm: KVMSystem
    let vm: VirtualMachine
    let memory: GuestMemory
    let vcpu: VCPU

    /// `setUp`: give the vCPU the host's CPUID and put it in 64-bit mode at `code` (otherwise it
    /// stays exactly as KVM created it).
    init(setUp: Bool) throws {
        kvm = try KVMSystem()
        try kvm.requireCapabilities()
        vm = try kvm.createVM()
        try vm.setTSSAddress(0xFFFB_D000)
        try vm.setIdentityMapAddress(0xFFFB_C000)
        try vm.createIRQChip()
        try vm.createPIT2()
        memory = try GuestMemory(ranges: [(GuestAddress(0), Self.memorySize)])
        try vm.setUserMemoryRegion(guestAddress: 0, size: Self.memorySize, hostAddress: memory.regions[0].hostBase)
        vcpu = try vm.createVCPU(id: 0)
        if setUp { try setUpLongMode() }
    }

    private func setUpLongMode() throws {
        try vcpu.setCPUID(kvm.supportedCPUID())
        // GDT: null, 64-bit code (0x08), data (0x10).
        let gdt: [UInt64] = [0, 0x00AF_9B00_0000_FFFF, 0x00CF_9300_0000_FFFF]
        for (i, d) in gdt.enumerated() { try memory.write(le(d), at: GuestAddress(Self.gdt + UInt64(i) * 8)) }
        // PML4 → PDPT → one page directory of 2 MiB pages: the first GiB identity-mapped.
        try memory.write(le(Self.pml4 + 0x1000 | 3), at: GuestAddress(Self.pml4))
        try memory.write(le(Self.pml4 + 0x2000 | 3), at: GuestAddress(Self.pml4 + 0x1000))
        for i in 0..<512 {
            try memory.write(le(UInt64(i) << 21 | 0x83), at: GuestAddress(Self.pml4 + 0x2000 + UInt64(i) * 8))
        }
        try memory.write(Self.countingGuest, at: GuestAddress(Self.code))

        var s = try vcpu.getSpecialRegisters()
        var code = kvm_segment()
        code.limit = 0xFFFFF; code.selector = 0x08; code.type = 0xB; code.present = 1; code.s = 1; code.l = 1; code.g = 1
        var data = kvm_segment()
        data.limit = 0xFFFFF; data.selector = 0x10; data.type = 0x3; data.present = 1; data.s = 1; data.db = 1; data.g = 1
        var tss = kvm_segment()
        tss.limit = 0x67; tss.type = 0xB; tss.present = 1
        s.cs = code
        s.ds = data; s.es = data; s.fs = data; s.gs = data; s.ss = data
        s.tr = tss
        s.gdt.base = Self.gdt
        s.gdt.limit = UInt16(gdt.count * 8 - 1)
        s.cr0 = 0x8000_0033            // PG NE ET MP PE
        s.cr3 = Self.pml4
        s.cr4 = 0x620                  // OSXMMEXCPT OSFXSR PAE
        s.efer = 0x500                 // LMA LME
        try vcpu.setSpecialRegisters(s)
        var r = kvm_regs()
        r.rip = Self.code
        r.rsp = Self.stack
        r.rflags = 2
        try vcpu.setRegisters(r)
        // SSE registers through the XSAVE area (KVM_SET_FPU leaves XSTATE_BV alone, so KVM_GET_XSAVE
        // would report them in their init state): XMMn at 160 + 16n, XSTATE_BV at 512, bit 1 = SSE.
        var state = try vcpu.saveState()
        for n in 0..<16 { state.xsave.replaceSubrange((160 + 16 * n)..<(176 + 16 * n), with: Self.xmmPattern(n)) }
        state.xsave[512] |= 0x2
        try vcpu.restoreState(state, setCPUID: false)
    }

    /// /sys/module/kvm/parameters/`name`, trimmed (nil if unreadable).
    static func kvmParameter(_ name: String) -> String? {
        guard let f = fopen("/sys/module/kvm/parameters/\(name)", "r") else { return nil }
        defer { fclose(f) }
        var buffer = [CChar](repeating: 0, count: 64)
        guard fgets(&buffer, Int32(buffer.count), f) != nil else { return nil }
        return String(decoding: buffer.prefix { $0 != 0 && $0 != 10 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    private func le(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) } }

    func counter() throws -> UInt64 {
        let b = try memory.read(GuestAddress(Self.counter), count: 8)
        return b.enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
    }

    /// Copies all of `other`'s RAM into this VM's.
    func copyMemory(from other: StateTestVM) {
        memory.regions[0].hostBase.copyMemory(from: other.memory.regions[0].hostBase, byteCount: Int(Self.memorySize))
    }

    /// Runs the counting guest through `exits` port-input exits, answering each with `value(n)`
    /// (n counting from `first`), and leaves the last exit pending. Returns the exits seen that
    /// were not port input (none when all is well).
    func runInputs(_ exits: Int, first: Int = 1, value: (Int) -> UInt8) throws -> [String] {
        var n = first
        var unexpected: [String] = []
        var rounds = 0
        while n < first + exits && rounds < exits * 4 + 16 {
            rounds += 1
            switch try vcpu.run() {
            case .io(let port, let size, let isWrite, _, let data) where port == Self.port && size == 1 && !isWrite:
                data[0] = value(n)
                n += 1
            case .interrupted:
                continue
            case let other:
                unexpected.append("\(other)\n\(vcpu.registerDump())")
                return unexpected
            }
        }
        return unexpected
    }
}

/// `VCPU.saveState()` / `restoreState(_:)` and the VM's on the real /dev/kvm.
@Suite("KVM vCPU and VM state", .enabled(if: kvmAvailable(), "needs /dev/kvm"))
struct VCPUStateTests {
    /// Through the wire format, as a snapshot would.
    static func roundTrip(_ s: VCPUState) throws -> VCPUState {
        var w = LEWriter()
        s.encode(to: &w)
        var r = LEReader(w.bytes)
        let decoded = try VCPUState(from: &r, version: VCPUState.version)
        try r.finish()
        return decoded
    }

    static func roundTrip(_ s: VMState) throws -> VMState {
        var w = LEWriter()
        s.encode(to: &w)
        var r = LEReader(w.bytes)
        let decoded = try VMState(from: &r, version: VMState.version)
        try r.finish()
        return decoded
    }

    /// XMMn in an XSAVE area (legacy region: XMM0 at offset 160).
    static func xmm(_ n: Int, _ xsave: [UInt8]) -> [UInt8] { Array(xsave[(160 + 16 * n)..<(176 + 16 * n)]) }

    /// The value of MSR `index` in `s`.
    static func msr(_ s: VCPUState, _ index: UInt32) -> UInt64? { s.msrs.first { $0.index == index }?.value }

    /// Expects `restored` to equal `saved` except for the time-dependent TSC, which must lie in
    /// [saved, saved + `tscSlack`].
    static func expectSameVCPU(_ restored: VCPUState, _ saved: VCPUState, tscSlack: UInt64,
                               sourceLocation: SourceLocation = #_sourceLocation) {
        var a = restored
        var b = saved
        if let t1 = msr(a, VCPU.msrTSC), let t0 = msr(b, VCPU.msrTSC) {
            #expect(t1 >= t0 && t1 - t0 <= tscSlack, "TSC \(t0) → \(t1)", sourceLocation: sourceLocation)
        } else {
            Issue.record("the TSC MSR was not saved", sourceLocation: sourceLocation)
        }
        a.msrs.removeAll { $0.index == VCPU.msrTSC }
        b.msrs.removeAll { $0.index == VCPU.msrTSC }
        #expect(a.regs == b.regs, sourceLocation: sourceLocation)
        #expect(a.sregs == b.sregs, sourceLocation: sourceLocation)
        #expect(a.xsave == b.xsave, sourceLocation: sourceLocation)
        #expect(a.xcrs == b.xcrs, sourceLocation: sourceLocation)
        #expect(a.lapic == b.lapic, "LAPIC registers differ at \((0..<a.lapic.count).filter { a.lapic[$0] != b.lapic[$0] }.map { String($0, radix: 16) })", sourceLocation: sourceLocation)
        let differing = zip(a.msrs, b.msrs).filter { $0 != $1 }.map { "0x\(String($0.index, radix: 16)): \($1.value) → \($0.value)" }
        #expect(a.msrs.map(\.index) == b.msrs.map(\.index), sourceLocation: sourceLocation)
        #expect(differing.isEmpty, "MSRs differ: \(differing)", sourceLocation: sourceLocation)
        #expect(a.mpState == b.mpState, sourceLocation: sourceLocation)
        #expect(a.events == b.events, sourceLocation: sourceLocation)
        #expect(a.debugregs == b.debugregs, sourceLocation: sourceLocation)
        #expect(a.cpuid == b.cpuid, sourceLocation: sourceLocation)
    }

    /// Expects `restored` to equal `saved` except for the kvmclock, which must lie in [saved, saved +
    /// `clockSlack` ns], and the PIT's count load times, which KVM sets at the restore.
    static func expectSameVM(_ restored: VMState, _ saved: VMState, clockSlack: UInt64,
                             sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(restored.picMaster == saved.picMaster, sourceLocation: sourceLocation)
        #expect(restored.picSlave == saved.picSlave, sourceLocation: sourceLocation)
        #expect(restored.ioapic == saved.ioapic, sourceLocation: sourceLocation)
        var p1 = restored.pit
        var p0 = saved.pit
        for i in 0..<VMState.pitChannels {
            p1.channels[i].countLoadTime = 0
            p0.channels[i].countLoadTime = 0
        }
        #expect(p1 == p0, sourceLocation: sourceLocation)
        let c1 = restored.clock.clock
        let c0 = saved.clock.clock
        #expect(c1 >= c0 && c1 - c0 <= clockSlack, "kvmclock \(c0) → \(c1)", sourceLocation: sourceLocation)
    }

    /// TSC ticks in `seconds` on this host (generous when the frequency is unknown).
    static func tscTicks(_ vcpu: VCPU, seconds: UInt64) -> UInt64 {
        let khz = UInt64((try? vcpu.tscKHz()) ?? 0)
        return (khz > 0 ? khz : 10_000_000) * 1000 * seconds
    }

    @Test("a counting guest saved after an input exit continues in a new VM from exactly that point")
    func continuesInNewVM() throws {
        let first = try StateTestVM(setUp: true)
        let inputValue: (Int) -> UInt8 = { UInt8(truncatingIfNeeded: 0x40 + $0) }
        let saveAt = 20
        let problems = try first.runInputs(saveAt, value: inputValue)
        #expect(problems.isEmpty, "\(problems)")
        // The 20th IN is pending: its data is in kvm_run, not yet in AL (which still holds the 19th).
        let pending = try first.vcpu.saveState()
        #expect(pending.regs.rax & 0xFF == UInt64(inputValue(saveAt - 1)))
        try first.vcpu.completePendingExit()
        let vcpuState = try first.vcpu.saveState()
        let vmState = try first.vm.saveState()
        #expect(vcpuState.regs.rbx == UInt64(saveAt))
        #expect(vcpuState.regs.rax & 0xFF == UInt64(inputValue(saveAt)), "the pending IN was not completed")
        #expect(vcpuState.regs.rip == StateTestVM.afterInput)
        #expect(Self.xmm(15, vcpuState.xsave) == StateTestVM.xmmPattern(15))
        #expect(try first.counter() == UInt64(saveAt))
        #expect(vcpuState.mpState == VCPUState.MPState.runnable)
        #expect(vcpuState.xsave.count == first.vm.xsaveSize)
        #expect(vmState.ioapic.baseAddress == 0xFEC0_0000)

        let second = try StateTestVM(setUp: false)
        second.copyMemory(from: first)
        try second.vcpu.restoreState(try Self.roundTrip(vcpuState))
        try second.vm.restoreState(try Self.roundTrip(vmState))
        Self.expectSameVCPU(try second.vcpu.saveState(), vcpuState, tscSlack: Self.tscTicks(second.vcpu, seconds: 30))
        Self.expectSameVM(try second.vm.saveState(), vmState, clockSlack: 30_000_000_000)

        let more = 10
        #expect(try second.runInputs(more, first: saveAt + 1, value: inputValue).isEmpty)
        try second.vcpu.completePendingExit()
        let after = try second.vcpu.saveState()
        #expect(after.regs.rbx == UInt64(saveAt + more), "the register count did not continue")
        #expect(try second.counter() == UInt64(saveAt + more), "the memory count did not continue")
        #expect((0..<16).allSatisfy { Self.xmm($0, after.xsave) == StateTestVM.xmmPattern($0) }, "the SSE registers were lost")
        #expect(after.regs.rax & 0xFF == UInt64(inputValue(saveAt + more)))
        #expect(after.regs.rip == StateTestVM.afterInput)
        // The first VM never ran again: its memory still holds the count at the save.
        #expect(try first.counter() == UInt64(saveAt))
    }

    @Test("save → restore into a fresh vCPU → save gives the same state, apart from the TSC and kvmclock")
    func saveRestoreSave() throws {
        let source = try StateTestVM(setUp: true)
        // Make more of the state non-default before saving: syscall MSRs and debug address registers.
        try source.vcpu.setMSRs([(0xC000_0081, 0x0023_0010_0000_0000), (0xC000_0082, 0xFFFF_FFFF_8100_0000),
                                 (0xC000_0102, 0xFFFF_8880_0000_0000)])
        var saved = try source.vcpu.saveState()
        saved.debugregs.db = [0x1000, 0x2000, 0x3000, 0x4000]
        try source.vcpu.restoreState(saved, setCPUID: false)
        let before = try source.vcpu.saveState()
        #expect(before.debugregs.db == [0x1000, 0x2000, 0x3000, 0x4000])
        #expect(Self.msr(before, 0xC000_0082) == 0xFFFF_FFFF_8100_0000)
        #expect(before.msrs.count > 10, "only \(before.msrs.count) MSRs saved")
        #expect(before.msrs.contains { $0.index == VCPU.msrTSC })
        #expect(!before.cpuid.isEmpty)
        #expect(before.xcrs.contains { $0.index == 0 }, "XCR0 missing")
        #expect(Self.xmm(3, before.xsave) == StateTestVM.xmmPattern(3))
        // And non-default irqchip and PIT state: IOAPIC pin 4 unmasked on vector 0x30, the master
        // PIC at vector 0x20 with only IRQ 2 unmasked, PIT channel 0 in mode 2 at about 100 Hz.
        var vmState = try source.vm.saveState()
        vmState.ioapic.redirectionTable[4] = 0x30
        vmState.picMaster.irqBase = 0x20
        vmState.picMaster.imr = 0xFB
        vmState.picMaster.init4 = true
        vmState.pit.channels[0].mode = 2
        vmState.pit.channels[0].rwMode = 3
        vmState.pit.channels[0].count = 11932
        try source.vm.restoreState(vmState)
        let vmBefore = try source.vm.saveState()
        #expect(vmBefore.ioapic.redirectionTable[4] == 0x30)
        #expect(vmBefore.picMaster.imr == 0xFB && vmBefore.picMaster.init4)
        #expect(vmBefore.pit.channels[0].mode == 2 && vmBefore.pit.channels[0].count == 11932)

        let target = try StateTestVM(setUp: false)
        try target.vcpu.restoreState(try Self.roundTrip(before))
        try target.vm.restoreState(try Self.roundTrip(vmBefore))
        Self.expectSameVCPU(try target.vcpu.saveState(), before, tscSlack: Self.tscTicks(target.vcpu, seconds: 30))
        Self.expectSameVM(try target.vm.saveState(), vmBefore, clockSlack: 30_000_000_000)
    }

    @Test("MSRs KVM cannot read are left out and the ones after them still read")
    func unreadableMSRSkipped() throws {
        let t = try StateTestVM(setUp: true)
        let bogus: UInt32 = 0xDEAD_0000 // in no MSR range
        let read = try t.vcpu.getMSRs([VCPU.msrTSC, bogus, 0x174, 0xC000_0082])
        #expect(read.map(\.index).filter { $0 != bogus } == [VCPU.msrTSC, 0x174, 0xC000_0082])
        // With kvm.ignore_msrs=Y the bogus one reads as 0 instead of failing.
        if StateTestVM.kvmParameter("ignore_msrs") != "Y" { #expect(!read.contains { $0.index == bogus }) }
    }

    @Test("an MSR KVM refuses stops the restore with an error naming it",
          .enabled(if: StateTestVM.kvmParameter("ignore_msrs") != "Y", "kvm.ignore_msrs=Y accepts any MSR"))
    func refusedMSRNamed() throws {
        let t = try StateTestVM(setUp: true)
        var s = try t.vcpu.saveState()
        s.msrs.append(VCPUState.MSREntry(index: 0xDEAD_0000, value: 1))
        do {
            try t.vcpu.restoreState(s, setCPUID: false)
            Issue.record("the restore accepted MSR 0xdead0000")
        } catch {
            guard case .msrRefused(let index, let value, let vcpu) = error else {
                Issue.record("unexpected error \(error)")
                return
            }
            #expect(index == 0xDEAD_0000 && value == 1 && vcpu == 0)
            #expect("\(error)".contains("0xdead0000"))
        }
    }

    @Test("completing a pending exit on a vCPU with none pending does nothing")
    func completeWithNothingPending() throws {
        let t = try StateTestVM(setUp: true)
        let before = try t.vcpu.saveState()
        try t.vcpu.completePendingExit()
        let after = try t.vcpu.saveState()
        #expect(after.regs == before.regs)
        #expect(after.regs.rip == StateTestVM.code)
        // And the vCPU still runs normally afterwards (immediate_exit was cleared).
        #expect(try t.runInputs(1, value: { _ in 7 }).isEmpty)
    }

    @Test("an XSAVE area using state this host lacks, or a short LAPIC page, is refused before anything is written")
    func refusesMismatchedState() throws {
        let t = try StateTestVM(setUp: true)
        var s = try t.vcpu.saveState()
        let good = s
        s.xsave += [UInt8](repeating: 0, count: 63) + [1]
        #expect(throws: KVMError.self) { try t.vcpu.restoreState(s) }
        s = good
        s.lapic.removeLast()
        #expect(throws: KVMError.self) { try t.vcpu.restoreState(s) }
        #expect(try t.vcpu.saveState().regs == good.regs)
    }

    @Test("an XSAVE area from a host with fewer features is padded, one with unused extra components is cut")
    func fitsXSAVESizes() throws {
        let t = try StateTestVM(setUp: true)
        let good = try t.vcpu.saveState()
        var longer = good
        longer.xsave += [UInt8](repeating: 0, count: 256)
        try t.vcpu.restoreState(longer)
        #expect(try t.vcpu.saveState().xsave == good.xsave)
        var shorter = good
        // The legacy region and header (576 bytes) hold everything this test's guest uses.
        shorter.xsave = Array(good.xsave.prefix(576))
        try t.vcpu.restoreState(shorter)
        let after = try t.vcpu.saveState().xsave
        #expect(after.count == good.xsave.count)
        #expect(Array(after.prefix(512)) == Array(good.xsave.prefix(512)))
    }
}
