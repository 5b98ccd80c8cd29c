import KVM
import Testing
import TestSupport
import WireFormat

/// The wire format of `VCPUState` and `VMState`, without /dev/kvm.
@Suite("KVM state encoding")
struct KVMStateEncodingTests {
    /// splitmix64: distinct, non-zero values for every field.
    struct Values {
        var state: UInt64
        init(seed: UInt64) { state = seed }
        mutating func u64() -> UInt64 {
            state &+= 0x9E37_79B9_7F4A_7C15
            var z = state
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return (z ^ (z >> 31)) | 1
        }
        mutating func u32() -> UInt32 { UInt32(truncatingIfNeeded: u64()) | 1 }
        mutating func u16() -> UInt16 { UInt16(truncatingIfNeeded: u64()) | 1 }
        mutating func u8() -> UInt8 { UInt8(truncatingIfNeeded: u64()) | 1 }
        mutating func bytes(_ n: Int) -> [UInt8] { (0..<n).map { _ in UInt8(truncatingIfNeeded: u64() >> 8) } }
    }

    static func segment(_ v: inout Values) -> VCPUState.Segment {
        var s = VCPUState.Segment()
        s.base = v.u64(); s.limit = v.u32(); s.selector = v.u16(); s.type = v.u8(); s.present = true
        s.dpl = v.u8(); s.db = true; s.s = true; s.l = true; s.g = true; s.avl = true; s.unusable = true
        return s
    }

    /// A vCPU state with a non-zero value in every field (every boolean true).
    static func variedVCPU(seed: UInt64 = 1, msrs: Int = 40, cpuid: Int = 12) -> VCPUState {
        var v = Values(seed: seed)
        var r = VCPUState.Registers()
        r.rax = v.u64(); r.rbx = v.u64(); r.rcx = v.u64(); r.rdx = v.u64()
        r.rsi = v.u64(); r.rdi = v.u64(); r.rsp = v.u64(); r.rbp = v.u64()
        r.r8 = v.u64(); r.r9 = v.u64(); r.r10 = v.u64(); r.r11 = v.u64()
        r.r12 = v.u64(); r.r13 = v.u64(); r.r14 = v.u64(); r.r15 = v.u64()
        r.rip = v.u64(); r.rflags = v.u64()
        var s = VCPUState.SpecialRegisters()
        s.cs = segment(&v); s.ds = segment(&v); s.es = segment(&v); s.fs = segment(&v)
        s.gs = segment(&v); s.ss = segment(&v); s.tr = segment(&v); s.ldt = segment(&v)
        s.gdt.base = v.u64(); s.gdt.limit = v.u16(); s.idt.base = v.u64(); s.idt.limit = v.u16()
        s.cr0 = v.u64(); s.cr2 = v.u64(); s.cr3 = v.u64(); s.cr4 = v.u64(); s.cr8 = v.u64()
        s.efer = v.u64(); s.apicBase = v.u64()
        s.interruptBitmap = [v.u64(), v.u64(), v.u64(), v.u64()]
        var e = VCPUState.Events()
        e.exception.injected = true; e.exception.nr = v.u8(); e.exception.hasErrorCode = true
        e.exception.pending = true; e.exception.errorCode = v.u32()
        e.interrupt.injected = true; e.interrupt.nr = v.u8(); e.interrupt.soft = true; e.interrupt.shadow = v.u8()
        e.nmi.injected = true; e.nmi.pending = true; e.nmi.masked = true
        e.sipiVector = v.u32(); e.flags = v.u32()
        e.smi.smm = true; e.smi.pending = true; e.smi.smmInsideNMI = true; e.smi.latchedInit = true
        e.tripleFaultPending = true; e.exceptionHasPayload = true; e.exceptionPayload = v.u64()
        var d = VCPUState.DebugRegisters()
        d.db = [v.u64(), v.u64(), v.u64(), v.u64()]
        d.dr6 = v.u64(); d.dr7 = v.u64(); d.flags = v.u64()
        return VCPUState(
            regs: r, sregs: s, xsave: v.bytes(4096 + 64),
            xcrs: [VCPUState.XCR(index: v.u32(), value: v.u64()), VCPUState.XCR(index: v.u32(), value: v.u64())],
            lapic: v.bytes(1024),
            msrs: (0..<msrs).map { _ in VCPUState.MSREntry(index: v.u32(), value: v.u64()) },
            mpState: VCPUState.MPState.sipiReceived, events: e, debugregs: d,
            cpuid: (0..<cpuid).map { _ in
                CPUIDEntry(function: v.u32(), index: v.u32(), flags: v.u32(), eax: v.u32(), ebx: v.u32(), ecx: v.u32(), edx: v.u32())
            })
    }

    /// A VM state with a non-zero value in every field (every boolean true).
    static func variedVM(seed: UInt64 = 2) -> VMState {
        var v = Values(seed: seed)
        func pic() -> VMState.PICState {
            var p = VMState.PICState()
            p.lastIRR = v.u8(); p.irr = v.u8(); p.imr = v.u8(); p.isr = v.u8(); p.priorityAdd = v.u8(); p.irqBase = v.u8()
            p.readRegisterSelect = true; p.poll = true; p.specialMask = true; p.initState = v.u8()
            p.autoEOI = true; p.rotateOnAutoEOI = true; p.specialFullyNestedMode = true; p.init4 = true
            p.elcr = v.u8(); p.elcrMask = v.u8()
            return p
        }
        var io = VMState.IOAPICState()
        io.baseAddress = v.u64(); io.ioregsel = v.u32(); io.id = v.u32(); io.irr = v.u32()
        io.redirectionTable = (0..<24).map { _ in v.u64() }
        var pit = VMState.PITState()
        pit.channels = (0..<3).map { _ in
            var c = VMState.PITChannel()
            c.count = v.u32() % 0x10000 + 1; c.latchedCount = v.u16(); c.countLatched = v.u8(); c.statusLatched = true
            c.status = v.u8(); c.readState = v.u8(); c.writeState = v.u8(); c.writeLatch = v.u8(); c.rwMode = v.u8()
            c.mode = v.u8(); c.bcd = true; c.gate = true; c.countLoadTime = Int64(bitPattern: v.u64())
            return c
        }
        pit.flags = v.u32()
        var clock = VMState.ClockState()
        clock.clock = v.u64(); clock.flags = v.u32(); clock.realtime = v.u64(); clock.hostTSC = v.u64()
        var state = VMState(picMaster: pic(), picSlave: pic(), ioapic: io, pit: pit, clock: clock)
        state.tscKHz = v.u32()
        state.savedRealtime = v.u64()
        return state
    }

    static func encode(_ s: VCPUState) -> [UInt8] {
        var w = LEWriter()
        s.encode(to: &w)
        return w.bytes
    }

    static func encode(_ s: VMState) -> [UInt8] {
        var w = LEWriter()
        s.encode(to: &w)
        return w.bytes
    }

    static func decodeVCPU(_ bytes: [UInt8], version: UInt16 = VCPUState.version) throws(LEDecodeError) -> VCPUState {
        var r = LEReader(bytes)
        let s = try VCPUState(from: &r, version: version)
        try r.finish()
        return s
    }

    static func decodeVM(_ bytes: [UInt8], version: UInt16 = VMState.version) throws(LEDecodeError) -> VMState {
        var r = LEReader(bytes)
        let s = try VMState(from: &r, version: version)
        try r.finish()
        return s
    }

    /// The field an invalid-value error names (nil when decoding succeeded or failed otherwise).
    static func invalidField(_ body: () throws -> Void) -> String? {
        do { try body() } catch let error as LEDecodeError {
            if case .invalid(let field, _) = error { return field }
        } catch {}
        return nil
    }

    // MARK: Round trips

    @Test("a vCPU state with every field set survives encode → decode → encode byte for byte")
    func vcpuRoundTrip() throws {
        let state = Self.variedVCPU()
        let bytes = Self.encode(state)
        let decoded = try Self.decodeVCPU(bytes)
        #expect(decoded == state)
        #expect(Self.encode(decoded) == bytes)
        // Fixed part + the variable members: nothing else is written (no padding, no pointers).
        let fixed = 18 * 8 + (8 * 23 + 2 * 10 + 7 * 8 + 4 + 4 * 8) + 4 + 4 + 4 + 4 + 4 + 37 + (4 + 4 * 8 + 3 * 8) + 4
        #expect(bytes.count == fixed + state.xsave.count + 12 * state.xcrs.count + 1024 + 12 * state.msrs.count + 28 * state.cpuid.count)
    }

    @Test("a VM state with every field set survives encode → decode → encode byte for byte")
    func vmRoundTrip() throws {
        let state = Self.variedVM()
        let bytes = Self.encode(state)
        let decoded = try Self.decodeVM(bytes)
        #expect(decoded == state)
        #expect(Self.encode(decoded) == bytes)
        #expect(bytes.count == 2 * 16 + (8 + 4 * 3 + 4 + 24 * 8) + (4 + 3 * 24 + 4) + (8 + 4 + 8 + 8) + (4 + 8))
    }

    @Test("layout 2 appends the TSC rate and the host's time of the save: a layout-1 payload reads with neither, and a layout-1 reader skips them")
    func vmLayouts() throws {
        var state = Self.variedVM()
        let v2 = Self.encode(state)
        let v1 = Array(v2.dropLast(12))
        let old = try Self.decodeVM(v1, version: 1)
        #expect(old.tscKHz == 0 && old.savedRealtime == 0)
        state.tscKHz = 0
        state.savedRealtime = 0
        #expect(old == state)
        // A reader of layout 1 given a layout-2 payload (the section's minimum version is 1).
        let read = try VersionedPayload.decode(v2, version: 2, current: 1, oldest: 1, name: "vm") {
            (r: inout LEReader, v: UInt16) throws(LEDecodeError) in try VMState(from: &r, version: v)
        }
        #expect(read == state)
        // Layout 2 cut inside its new fields is refused.
        #expect(throws: LEDecodeError.self) { try Self.decodeVM(Array(v2.dropLast(3))) }
    }

    @Test("states differing in one field encode differently")
    func fieldsMatter() {
        let a = Self.variedVCPU()
        var b = a
        b.events.smi.latchedInit = false
        #expect(Self.encode(a) != Self.encode(b))
        var vm = Self.variedVM()
        let before = Self.encode(vm)
        vm.pit.channels[2].gate = false
        #expect(Self.encode(vm) != before)
    }

    // MARK: Golden bytes

    @Test("golden bytes: kvm_regs is 18 little-endian u64 in kernel order")
    func goldenRegisters() {
        var r = VCPUState.Registers()
        r.rax = 1; r.rbx = 2; r.rcx = 3; r.rdx = 4; r.rsi = 5; r.rdi = 6; r.rsp = 7; r.rbp = 8
        r.r8 = 9; r.r9 = 10; r.r10 = 11; r.r11 = 12; r.r12 = 13; r.r13 = 14; r.r14 = 15; r.r15 = 16
        r.rip = 0x1122_3344_5566_7788
        r.rflags = 0x0000_0000_0024_0202
        var w = LEWriter()
        r.encode(to: &w)
        var expected: [UInt8] = []
        for i in 1...16 { expected += [UInt8(i), 0, 0, 0, 0, 0, 0, 0] }
        expected += [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11]
        expected += [0x02, 0x02, 0x24, 0x00, 0x00, 0x00, 0x00, 0x00]
        #expect(w.bytes == expected)
    }

    @Test("golden bytes: a segment is base, limit, selector, then one byte per attribute")
    func goldenSegment() {
        var s = VCPUState.Segment()
        s.base = 0x1122_3344_5566_7788; s.limit = 0xAABB_CCDD; s.selector = 0x1234; s.type = 0xB
        s.present = true; s.dpl = 3; s.db = false; s.s = true; s.l = true; s.g = true; s.avl = false; s.unusable = false
        var w = LEWriter()
        s.encode(to: &w)
        #expect(w.bytes == [0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, 0xDD, 0xCC, 0xBB, 0xAA, 0x34, 0x12,
                            0x0B, 0x01, 0x03, 0x00, 0x01, 0x01, 0x01, 0x00, 0x00])
    }

    @Test("golden bytes: a PIT channel and the clock")
    func goldenPITAndClock() {
        var c = VMState.PITChannel()
        c.count = 0x10000; c.latchedCount = 0xBEEF; c.countLatched = 3; c.statusLatched = true; c.status = 0x36
        c.readState = 1; c.writeState = 2; c.writeLatch = 0x9C; c.rwMode = 3; c.mode = 0xFF; c.bcd = false; c.gate = true
        c.countLoadTime = -2
        var w = LEWriter()
        c.encode(to: &w)
        #expect(w.bytes == [0x00, 0x00, 0x01, 0x00, 0xEF, 0xBE, 0x03, 0x01, 0x36, 0x01, 0x02, 0x9C, 0x03, 0xFF, 0x00, 0x01,
                            0xFE, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF])
        var k = VMState.ClockState()
        k.clock = 0x0102_0304_0506_0708; k.flags = 6; k.realtime = 9; k.hostTSC = 0xA0
        var w2 = LEWriter()
        k.encode(to: &w2)
        #expect(w2.bytes == [8, 7, 6, 5, 4, 3, 2, 1, 6, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0xA0, 0, 0, 0, 0, 0, 0, 0])
    }

    // MARK: Bad input

    @Test("a vCPU state cut at any byte throws instead of crashing")
    func vcpuTruncated() {
        let bytes = Self.encode(Self.variedVCPU(msrs: 5, cpuid: 3))
        var failures = 0
        for cut in 0..<bytes.count {
            do { _ = try Self.decodeVCPU(Array(bytes[0..<cut])) } catch { failures += 1 }
        }
        #expect(failures == bytes.count)
    }

    @Test("a VM state cut at any byte throws instead of crashing")
    func vmTruncated() {
        let bytes = Self.encode(Self.variedVM())
        for cut in 0..<bytes.count {
            #expect(throws: LEDecodeError.self) { try Self.decodeVM(Array(bytes[0..<cut])) }
        }
    }

    @Test("a truncation error names the field it ended in")
    func truncationNamesField() {
        let bytes = Self.encode(Self.variedVCPU())
        // 16 full registers, then 3 bytes of rip.
        #expect(throws: LEDecodeError.truncated(field: "vcpu.regs.rip", needed: 8, available: 3)) {
            try Self.decodeVCPU(Array(bytes[0..<(16 * 8 + 3)]))
        }
    }

    @Test("counts over the caps are rejected, naming the field")
    func countsCapped() {
        var s = Self.variedVCPU(msrs: VCPUState.maxMSRs + 1)
        #expect(Self.invalidField { _ = try Self.decodeVCPU(Self.encode(s)) } == "vcpu.msrs count")
        s = Self.variedVCPU(msrs: VCPUState.maxMSRs)
        #expect(Self.invalidField { _ = try Self.decodeVCPU(Self.encode(s)) } == nil)
        s = Self.variedVCPU(cpuid: VCPUState.maxCPUIDEntries + 1)
        #expect(Self.invalidField { _ = try Self.decodeVCPU(Self.encode(s)) } == "vcpu.cpuid count")
        s = Self.variedVCPU()
        s.xcrs = (0...VCPUState.maxXCRs).map { VCPUState.XCR(index: UInt32($0), value: 1) }
        #expect(Self.invalidField { _ = try Self.decodeVCPU(Self.encode(s)) } == "vcpu.xcrs count")
    }

    @Test("lengths are exact: the LAPIC page is 1024 bytes, the XSAVE area at least 4096")
    func lengthsExact() {
        var s = Self.variedVCPU()
        s.lapic.removeLast()
        #expect(Self.invalidField { _ = try Self.decodeVCPU(Self.encode(s)) } == "vcpu.lapic")
        s = Self.variedVCPU()
        s.lapic.append(0)
        #expect(Self.invalidField { _ = try Self.decodeVCPU(Self.encode(s)) } == "vcpu.lapic")
        s = Self.variedVCPU()
        s.xsave = [UInt8](repeating: 0, count: 4092)
        #expect(Self.invalidField { _ = try Self.decodeVCPU(Self.encode(s)) } == "vcpu.xsave")
        s.xsave = [UInt8](repeating: 0, count: VCPUState.maxXSAVESize + 4)
        #expect(Self.invalidField { _ = try Self.decodeVCPU(Self.encode(s)) } == "vcpu.xsave")
        s = Self.variedVCPU()
        s.sregs.interruptBitmap.append(0)
        #expect(Self.invalidField { _ = try Self.decodeVCPU(Self.encode(s)) } == "vcpu.sregs.interrupt_bitmap count")
        s = Self.variedVCPU()
        s.debugregs.db = [1, 2, 3]
        #expect(Self.invalidField { _ = try Self.decodeVCPU(Self.encode(s)) } == "vcpu.debugregs.db count")
        var vm = Self.variedVM()
        vm.ioapic.redirectionTable.removeLast()
        #expect(Self.invalidField { _ = try Self.decodeVM(Self.encode(vm)) } == "vm.ioapic.redirtbl count")
        vm = Self.variedVM()
        vm.pit.channels.append(VMState.PITChannel())
        #expect(Self.invalidField { _ = try Self.decodeVM(Self.encode(vm)) } == "vm.pit.channels count")
    }

    @Test("an unknown MP state, a PIT count over 65536 and an unknown layout version are rejected")
    func valuesValidated() {
        var s = Self.variedVCPU()
        s.mpState = 11
        #expect(Self.invalidField { _ = try Self.decodeVCPU(Self.encode(s)) } == "vcpu.mp_state")
        for known in VCPUState.MPState.known {
            s.mpState = known
            #expect(Self.invalidField { _ = try Self.decodeVCPU(Self.encode(s)) } == nil)
        }
        var vm = Self.variedVM()
        vm.pit.channels[1].count = 0x10001
        #expect(Self.invalidField { _ = try Self.decodeVM(Self.encode(vm)) } == "vm.pit.channels[1].count")
        let bytes = Self.encode(Self.variedVCPU())
        #expect(Self.invalidField { _ = try Self.decodeVCPU(bytes, version: 2) } == "vcpu version")
        #expect(Self.invalidField { _ = try Self.decodeVM(Self.encode(Self.variedVM()), version: 0) } == "vm version")
    }

    @Test("booleans must be 0 or 1")
    func booleansStrict() {
        var bytes = Self.encode(Self.variedVCPU())
        // regs (18 × 8), then cs: base 8, limit 4, selector 2, type 1, present.
        bytes[18 * 8 + 15] = 2
        #expect(Self.invalidField { _ = try Self.decodeVCPU(bytes) } == "vcpu.sregs.cs.present")
        var vm = Self.encode(Self.variedVM())
        vm[6] = 0xFF // PIC master read_reg_select
        #expect(Self.invalidField { _ = try Self.decodeVM(vm) } == "vm.pic.master.read_reg_select")
    }

    @Test("trailing bytes after a state are the caller's to reject")
    func trailing() {
        var bytes = Self.encode(Self.variedVM())
        bytes.append(0)
        #expect(throws: LEDecodeError.trailingBytes(count: 1)) { try Self.decodeVM(bytes) }
    }
}

// MARK: - One code function per layout

extension KVMStateEncodingTests {
    /// encode → decode → encode of one member on its own: identical bytes, equal values.
    static func memberRoundTrip<M: LECodedMember & Equatable>(_ member: M, _ field: String,
                                                               sourceLocation: SourceLocation = #_sourceLocation) throws {
        var w = LEWriter()
        member.encode(to: &w)
        var r = LEReader(w.bytes)
        let decoded = try M(from: &r, field: field)
        try r.finish()
        #expect(decoded == member, sourceLocation: sourceLocation)
        var again = LEWriter()
        decoded.encode(to: &again)
        #expect(again.bytes == w.bytes, sourceLocation: sourceLocation)
    }

    @Test("every member of the vCPU and VM states survives encode → decode → encode on its own")
    func memberRoundTrips() throws {
        let s = Self.variedVCPU()
        try Self.memberRoundTrip(s.regs, "regs")
        try Self.memberRoundTrip(s.sregs, "sregs")
        try Self.memberRoundTrip(s.sregs.cs, "cs")
        try Self.memberRoundTrip(s.sregs.gdt, "gdt")
        try Self.memberRoundTrip(s.events, "events")
        try Self.memberRoundTrip(s.debugregs, "debugregs")
        let vm = Self.variedVM()
        try Self.memberRoundTrip(vm.picMaster, "pic")
        try Self.memberRoundTrip(vm.ioapic, "ioapic")
        try Self.memberRoundTrip(vm.pit.channels[1], "channel")
        try Self.memberRoundTrip(vm.pit, "pit")
        try Self.memberRoundTrip(vm.clock, "clock")
        try Self.memberRoundTrip(VCPUState.Registers(), "regs")
        try Self.memberRoundTrip(VMState.PITState(), "pit")
    }

    @Test("a member's errors carry the prefix it is given")
    func memberErrorsArePrefixed() {
        var w = LEWriter()
        Self.variedVCPU().sregs.encode(to: &w)
        var r = LEReader(Array(w.bytes.prefix(23 + 9)))
        #expect(throws: LEDecodeError.truncated(field: "x.ds.limit", needed: 4, available: 1)) {
            _ = try VCPUState.SpecialRegisters(from: &r, field: "x")
        }
    }

    @Test("the code functions build no field name when encoding or when decoding succeeds, only the failing one")
    func fieldNamesAreLazy() throws {
        let names = NameCounter()
        var vcpu = Self.variedVCPU()
        var enc = CountingCoder(inner: LEEncodingCoder(), names: names)
        try vcpu.code(&enc, version: VCPUState.version)
        var vm = Self.variedVM()
        try vm.code(&enc, version: VMState.version)
        #expect(names.built == [])
        var w = LEWriter()
        vcpu.encode(to: &w)
        vm.encode(to: &w)
        #expect(enc.inner.writer.bytes == w.bytes)

        var dec = CountingCoder(inner: LEDecodingCoder(LEReader(w.bytes)), names: names)
        var vcpu2 = VCPUState()
        try vcpu2.code(&dec, version: VCPUState.version)
        var vm2 = VMState()
        try vm2.code(&dec, version: VMState.version)
        try dec.inner.reader.finish()
        #expect(vcpu2 == vcpu)
        #expect(vm2 == vm)
        #expect(names.built == [])

        // A failure builds the name of the field it failed in.
        let vcpuBytes = Self.encode(vcpu)
        var cut = CountingCoder(inner: LEDecodingCoder(LEReader(Array(vcpuBytes.dropLast(4 + 28 * 12 + 3)))), names: names)
        #expect(throws: LEDecodeError.truncated(field: "vcpu.debugregs.flags", needed: 8, available: 5)) {
            try vcpu2.code(&cut, version: VCPUState.version)
        }
        #expect(names.built == ["vcpu.debugregs.flags"])
    }
}
