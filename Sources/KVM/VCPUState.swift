import WireFormat

/// Everything KVM holds about one x86 vCPU, in Swift types of our own, with an explicit
/// little-endian encoding (for snapshots).
///
/// No C structure is ever copied to the wire: every field is written with its width spelled out, in
/// the order documented on `encode(to:)`, and reserved or padding fields of the kernel structures
/// are not written at all. Two members are kept as raw bytes because their format is defined by the
/// architecture, not by the compiler: the XSAVE area (Intel SDM vol. 1 ch. 13, little-endian, its
/// component offsets those of the host's CPUID leaf 0xD) and the local APIC register page.
///
/// `encode(to:)` does not write `version`: the container that holds the state records it and passes
/// it back to `init(from:version:)`.
public struct VCPUState: Equatable, Sendable {
    /// The layout `encode(to:)` writes.
    public static let version: UInt16 = 1

    /// Decoding limits: a corrupted count or length fails instead of driving a huge allocation.
    public static let maxMSRs = 1024
    public static let maxCPUIDEntries = 512
    public static let maxXCRs = 16
    /// The local APIC register page (KVM_APIC_REG_SIZE).
    public static let lapicSize = 1024
    /// struct kvm_xsave is at least 4 KiB; KVM_CAP_XSAVE2 reports larger sizes with dynamic features (AMX).
    public static let minXSAVESize = 4096
    public static let maxXSAVESize = 1 << 16
    /// kvm_sregs.interrupt_bitmap: 256 vectors in 4 words.
    public static let interruptBitmapWords = 4
    /// kvm_debugregs.db: DR0-DR3.
    public static let debugAddressRegisters = 4

    /// KVM_MP_STATE_* values (linux/kvm.h); only these are accepted when decoding.
    public enum MPState {
        public static let runnable: UInt32 = 0
        public static let uninitialized: UInt32 = 1
        public static let initReceived: UInt32 = 2
        public static let halted: UInt32 = 3
        public static let sipiReceived: UInt32 = 4
        public static let stopped: UInt32 = 5
        public static let checkStop: UInt32 = 6
        public static let operating: UInt32 = 7
        public static let load: UInt32 = 8
        public static let apResetHold: UInt32 = 9
        public static let suspended: UInt32 = 10
        public static let known: ClosedRange<UInt32> = 0...10
    }

    /// kvm_regs.
    public var regs: Registers
    /// kvm_sregs.
    public var sregs: SpecialRegisters
    /// The XSAVE area (kvm_xsave) as KVM returns it; its length is the host's KVM_CAP_XSAVE2 size
    /// (4096 without dynamic features) and must match the restoring host's.
    public var xsave: [UInt8]
    /// kvm_xcrs: the extended control registers (XCR0).
    public var xcrs: [XCR]
    /// kvm_lapic_state: the 1024-byte local APIC register page.
    public var lapic: [UInt8]
    /// Every MSR of KVM_GET_MSR_INDEX_LIST that KVM_GET_MSRS could read, in that list's order.
    public var msrs: [MSREntry]
    /// kvm_mp_state (one of `MPState`).
    public var mpState: UInt32
    /// kvm_vcpu_events.
    public var events: Events
    /// kvm_debugregs.
    public var debugregs: DebugRegisters
    /// KVM_GET_CPUID2: the CPUID the vCPU was given.
    public var cpuid: [CPUIDEntry]

    public init(regs: Registers = Registers(), sregs: SpecialRegisters = SpecialRegisters(),
                xsave: [UInt8] = [UInt8](repeating: 0, count: VCPUState.minXSAVESize), xcrs: [XCR] = [],
                lapic: [UInt8] = [UInt8](repeating: 0, count: VCPUState.lapicSize), msrs: [MSREntry] = [],
                mpState: UInt32 = MPState.runnable, events: Events = Events(),
                debugregs: DebugRegisters = DebugRegisters(), cpuid: [CPUIDEntry] = []) {
        self.regs = regs
        self.sregs = sregs
        self.xsave = xsave
        self.xcrs = xcrs
        self.lapic = lapic
        self.msrs = msrs
        self.mpState = mpState
        self.events = events
        self.debugregs = debugregs
        self.cpuid = cpuid
    }

    // MARK: Members

    /// kvm_regs: the general registers, RIP and RFLAGS.
    public struct Registers: Equatable, Sendable {
        public var rax: UInt64 = 0, rbx: UInt64 = 0, rcx: UInt64 = 0, rdx: UInt64 = 0
        public var rsi: UInt64 = 0, rdi: UInt64 = 0, rsp: UInt64 = 0, rbp: UInt64 = 0
        public var r8: UInt64 = 0, r9: UInt64 = 0, r10: UInt64 = 0, r11: UInt64 = 0
        public var r12: UInt64 = 0, r13: UInt64 = 0, r14: UInt64 = 0, r15: UInt64 = 0
        public var rip: UInt64 = 0, rflags: UInt64 = 0
        public init() {}
    }

    /// kvm_segment (the `padding` byte is not kept).
    public struct Segment: Equatable, Sendable {
        public var base: UInt64 = 0
        public var limit: UInt32 = 0
        public var selector: UInt16 = 0
        public var type: UInt8 = 0
        public var present = false
        public var dpl: UInt8 = 0
        public var db = false
        public var s = false
        public var l = false
        public var g = false
        public var avl = false
        public var unusable = false
        public init() {}
    }

    /// kvm_dtable (GDTR/IDTR; the padding is not kept).
    public struct DescriptorTable: Equatable, Sendable {
        public var base: UInt64 = 0
        public var limit: UInt16 = 0
        public init() {}
    }

    /// kvm_sregs.
    public struct SpecialRegisters: Equatable, Sendable {
        public var cs = Segment(), ds = Segment(), es = Segment(), fs = Segment(), gs = Segment(), ss = Segment()
        public var tr = Segment(), ldt = Segment()
        public var gdt = DescriptorTable(), idt = DescriptorTable()
        public var cr0: UInt64 = 0, cr2: UInt64 = 0, cr3: UInt64 = 0, cr4: UInt64 = 0, cr8: UInt64 = 0
        public var efer: UInt64 = 0
        public var apicBase: UInt64 = 0
        /// The injected-but-not-delivered external interrupt, one bit per vector: exactly
        /// `VCPUState.interruptBitmapWords` words.
        public var interruptBitmap: [UInt64] = [UInt64](repeating: 0, count: VCPUState.interruptBitmapWords)
        public init() {}
    }

    /// One kvm_xcr (the reserved word is not kept).
    public struct XCR: Equatable, Sendable {
        public var index: UInt32
        public var value: UInt64
        public init(index: UInt32, value: UInt64) {
            self.index = index
            self.value = value
        }
    }

    /// One kvm_msr_entry (the reserved word is not kept).
    public struct MSREntry: Equatable, Sendable {
        public var index: UInt32
        public var value: UInt64
        public init(index: UInt32, value: UInt64) {
            self.index = index
            self.value = value
        }
    }

    /// kvm_vcpu_events: exceptions, interrupts, NMIs, SIPI, SMM and triple faults in flight.
    public struct Events: Equatable, Sendable {
        public struct Exception: Equatable, Sendable {
            public var injected = false
            public var nr: UInt8 = 0
            public var hasErrorCode = false
            public var pending = false
            public var errorCode: UInt32 = 0
            public init() {}
        }
        public struct Interrupt: Equatable, Sendable {
            public var injected = false
            public var nr: UInt8 = 0
            public var soft = false
            /// KVM_X86_SHADOW_INT_* bits.
            public var shadow: UInt8 = 0
            public init() {}
        }
        public struct NMI: Equatable, Sendable {
            public var injected = false
            public var pending = false
            public var masked = false
            public init() {}
        }
        public struct SMI: Equatable, Sendable {
            public var smm = false
            public var pending = false
            public var smmInsideNMI = false
            public var latchedInit = false
            public init() {}
        }

        public var exception = Exception()
        public var interrupt = Interrupt()
        public var nmi = NMI()
        public var sipiVector: UInt32 = 0
        /// KVM_VCPUEVENT_VALID_* bits: which parts KVM_SET_VCPU_EVENTS applies.
        public var flags: UInt32 = 0
        public var smi = SMI()
        public var tripleFaultPending = false
        public var exceptionHasPayload = false
        public var exceptionPayload: UInt64 = 0
        public init() {}
    }

    /// kvm_debugregs (the reserved words are not kept).
    public struct DebugRegisters: Equatable, Sendable {
        /// DR0-DR3: exactly `VCPUState.debugAddressRegisters` values.
        public var db: [UInt64] = [UInt64](repeating: 0, count: VCPUState.debugAddressRegisters)
        public var dr6: UInt64 = 0
        public var dr7: UInt64 = 0
        public var flags: UInt64 = 0
        public init() {}
    }
}

// MARK: - Encoding

extension VCPUState {
    /// Writes the state, all integers little-endian, in this order (layout version 1):
    ///
    /// - regs: rax rbx rcx rdx rsi rdi rsp rbp r8…r15 rip rflags (u64 each)
    /// - sregs: cs ds es fs gs ss tr ldt (each: base u64, limit u32, selector u16, type u8,
    ///   present/dpl/db/s/l/g/avl/unusable u8), gdt and idt (base u64, limit u16),
    ///   cr0 cr2 cr3 cr4 cr8 efer apic_base (u64), interrupt_bitmap (u32 count = 4, u64 each)
    /// - xsave: u32 length, bytes
    /// - xcrs: u32 count, then (xcr u32, value u64) each
    /// - lapic: u32 length (= 1024), bytes
    /// - msrs: u32 count, then (index u32, value u64) each
    /// - mp_state: u32
    /// - events: exception (injected u8, nr u8, has_error_code u8, pending u8, error_code u32),
    ///   interrupt (injected, nr, soft, shadow: u8), nmi (injected, pending, masked: u8),
    ///   sipi_vector u32, flags u32, smi (smm, pending, smm_inside_nmi, latched_init: u8),
    ///   triple_fault.pending u8, exception_has_payload u8, exception_payload u64
    /// - debugregs: u32 count = 4, db u64 each, dr6 u64, dr7 u64, flags u64
    /// - cpuid: u32 count, then (function, index, flags, eax, ebx, ecx, edx: u32) each
    ///
    /// Booleans are one byte, 0 or 1.
    public func encode(to w: inout LEWriter) {
        regs.encode(to: &w)
        sregs.encode(to: &w)
        w.blob(xsave)
        w.u32(UInt32(truncatingIfNeeded: xcrs.count))
        for x in xcrs {
            w.u32(x.index)
            w.u64(x.value)
        }
        w.blob(lapic)
        w.u32(UInt32(truncatingIfNeeded: msrs.count))
        for m in msrs {
            w.u32(m.index)
            w.u64(m.value)
        }
        w.u32(mpState)
        events.encode(to: &w)
        debugregs.encode(to: &w)
        w.u32(UInt32(truncatingIfNeeded: cpuid.count))
        for e in cpuid {
            w.u32(e.function)
            w.u32(e.index)
            w.u32(e.flags)
            w.u32(e.eax)
            w.u32(e.ebx)
            w.u32(e.ecx)
            w.u32(e.edx)
        }
    }

    /// Reads what `encode(to:)` wrote for layout `version`, validating counts, lengths, booleans and
    /// the MP state. Errors name the field ("vcpu.regs.rip", "vcpu.msrs count").
    public init(from r: inout LEReader, version: UInt16) throws(LEDecodeError) {
        guard (1...Self.version).contains(version) else {
            throw .invalid(field: "vcpu version", reason: "layout version \(version) is not supported (this build reads versions 1 to \(Self.version))")
        }
        regs = try Registers(from: &r, field: "vcpu.regs")
        sregs = try SpecialRegisters(from: &r, field: "vcpu.sregs")
        xsave = try r.blob("vcpu.xsave", limit: Self.maxXSAVESize)
        guard xsave.count >= Self.minXSAVESize, xsave.count % 4 == 0 else {
            throw .invalid(field: "vcpu.xsave", reason: "length \(xsave.count) is not a multiple of 4 of at least \(Self.minXSAVESize) bytes")
        }
        let xcrCount = try r.count("vcpu.xcrs count", limit: Self.maxXCRs, minimumItemSize: 12)
        xcrs = []
        for i in 0..<xcrCount {
            let index = try r.u32("vcpu.xcrs[\(i)].xcr")
            xcrs.append(XCR(index: index, value: try r.u64("vcpu.xcrs[\(i)].value")))
        }
        lapic = try r.blob("vcpu.lapic", limit: Self.lapicSize)
        guard lapic.count == Self.lapicSize else {
            throw .invalid(field: "vcpu.lapic", reason: "length \(lapic.count) is not \(Self.lapicSize)")
        }
        let msrCount = try r.count("vcpu.msrs count", limit: Self.maxMSRs, minimumItemSize: 12)
        msrs = []
        msrs.reserveCapacity(msrCount)
        for i in 0..<msrCount {
            let index = try r.u32("vcpu.msrs[\(i)].index")
            msrs.append(MSREntry(index: index, value: try r.u64("vcpu.msrs[\(i)].value")))
        }
        mpState = try r.u32("vcpu.mp_state")
        guard MPState.known.contains(mpState) else {
            throw .invalid(field: "vcpu.mp_state", reason: "\(mpState) is not a KVM_MP_STATE value (0-10)")
        }
        events = try Events(from: &r, field: "vcpu.events")
        debugregs = try DebugRegisters(from: &r, field: "vcpu.debugregs")
        let cpuidCount = try r.count("vcpu.cpuid count", limit: Self.maxCPUIDEntries, minimumItemSize: 28)
        cpuid = []
        cpuid.reserveCapacity(cpuidCount)
        for i in 0..<cpuidCount {
            let f = "vcpu.cpuid[\(i)]"
            let function = try r.u32(f + ".function")
            let index = try r.u32(f + ".index")
            let flags = try r.u32(f + ".flags")
            let eax = try r.u32(f + ".eax")
            let ebx = try r.u32(f + ".ebx")
            let ecx = try r.u32(f + ".ecx")
            let edx = try r.u32(f + ".edx")
            cpuid.append(CPUIDEntry(function: function, index: index, flags: flags, eax: eax, ebx: ebx, ecx: ecx, edx: edx))
        }
    }
}

extension VCPUState.Registers {
    /// 18 u64: rax rbx rcx rdx rsi rdi rsp rbp r8 … r15 rip rflags (kvm_regs order).
    public func encode(to w: inout LEWriter) {
        for v in [rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip, rflags] {
            w.u64(v)
        }
    }

    public init(from r: inout LEReader, field p: String) throws(LEDecodeError) {
        rax = try r.u64(p + ".rax")
        rbx = try r.u64(p + ".rbx")
        rcx = try r.u64(p + ".rcx")
        rdx = try r.u64(p + ".rdx")
        rsi = try r.u64(p + ".rsi")
        rdi = try r.u64(p + ".rdi")
        rsp = try r.u64(p + ".rsp")
        rbp = try r.u64(p + ".rbp")
        r8 = try r.u64(p + ".r8")
        r9 = try r.u64(p + ".r9")
        r10 = try r.u64(p + ".r10")
        r11 = try r.u64(p + ".r11")
        r12 = try r.u64(p + ".r12")
        r13 = try r.u64(p + ".r13")
        r14 = try r.u64(p + ".r14")
        r15 = try r.u64(p + ".r15")
        rip = try r.u64(p + ".rip")
        rflags = try r.u64(p + ".rflags")
    }
}

extension VCPUState.Segment {
    /// base u64, limit u32, selector u16, type u8, present u8, dpl u8, db u8, s u8, l u8, g u8,
    /// avl u8, unusable u8 (23 bytes).
    public func encode(to w: inout LEWriter) {
        w.u64(base)
        w.u32(limit)
        w.u16(selector)
        w.u8(type)
        w.bool(present)
        w.u8(dpl)
        w.bool(db)
        w.bool(s)
        w.bool(l)
        w.bool(g)
        w.bool(avl)
        w.bool(unusable)
    }

    public init(from r: inout LEReader, field p: String) throws(LEDecodeError) {
        base = try r.u64(p + ".base")
        limit = try r.u32(p + ".limit")
        selector = try r.u16(p + ".selector")
        type = try r.u8(p + ".type")
        present = try r.bool(p + ".present")
        dpl = try r.u8(p + ".dpl")
        db = try r.bool(p + ".db")
        s = try r.bool(p + ".s")
        l = try r.bool(p + ".l")
        g = try r.bool(p + ".g")
        avl = try r.bool(p + ".avl")
        unusable = try r.bool(p + ".unusable")
    }
}

extension VCPUState.DescriptorTable {
    /// base u64, limit u16.
    public func encode(to w: inout LEWriter) {
        w.u64(base)
        w.u16(limit)
    }

    public init(from r: inout LEReader, field p: String) throws(LEDecodeError) {
        base = try r.u64(p + ".base")
        limit = try r.u16(p + ".limit")
    }
}

extension VCPUState.SpecialRegisters {
    public func encode(to w: inout LEWriter) {
        for s in [cs, ds, es, fs, gs, ss, tr, ldt] { s.encode(to: &w) }
        gdt.encode(to: &w)
        idt.encode(to: &w)
        for v in [cr0, cr2, cr3, cr4, cr8, efer, apicBase] { w.u64(v) }
        w.u32(UInt32(truncatingIfNeeded: interruptBitmap.count))
        for v in interruptBitmap { w.u64(v) }
    }

    public init(from r: inout LEReader, field p: String) throws(LEDecodeError) {
        typealias Segment = VCPUState.Segment
        cs = try Segment(from: &r, field: p + ".cs")
        ds = try Segment(from: &r, field: p + ".ds")
        es = try Segment(from: &r, field: p + ".es")
        fs = try Segment(from: &r, field: p + ".fs")
        gs = try Segment(from: &r, field: p + ".gs")
        ss = try Segment(from: &r, field: p + ".ss")
        tr = try Segment(from: &r, field: p + ".tr")
        ldt = try Segment(from: &r, field: p + ".ldt")
        gdt = try VCPUState.DescriptorTable(from: &r, field: p + ".gdt")
        idt = try VCPUState.DescriptorTable(from: &r, field: p + ".idt")
        cr0 = try r.u64(p + ".cr0")
        cr2 = try r.u64(p + ".cr2")
        cr3 = try r.u64(p + ".cr3")
        cr4 = try r.u64(p + ".cr4")
        cr8 = try r.u64(p + ".cr8")
        efer = try r.u64(p + ".efer")
        apicBase = try r.u64(p + ".apic_base")
        let words = Int(try r.u32(p + ".interrupt_bitmap count"))
        guard words == VCPUState.interruptBitmapWords else {
            throw .invalid(field: p + ".interrupt_bitmap count", reason: "\(words) is not \(VCPUState.interruptBitmapWords)")
        }
        interruptBitmap = []
        for i in 0..<words { interruptBitmap.append(try r.u64(p + ".interrupt_bitmap[\(i)]")) }
    }
}

extension VCPUState.Events {
    public func encode(to w: inout LEWriter) {
        w.bool(exception.injected)
        w.u8(exception.nr)
        w.bool(exception.hasErrorCode)
        w.bool(exception.pending)
        w.u32(exception.errorCode)
        w.bool(interrupt.injected)
        w.u8(interrupt.nr)
        w.bool(interrupt.soft)
        w.u8(interrupt.shadow)
        w.bool(nmi.injected)
        w.bool(nmi.pending)
        w.bool(nmi.masked)
        w.u32(sipiVector)
        w.u32(flags)
        w.bool(smi.smm)
        w.bool(smi.pending)
        w.bool(smi.smmInsideNMI)
        w.bool(smi.latchedInit)
        w.bool(tripleFaultPending)
        w.bool(exceptionHasPayload)
        w.u64(exceptionPayload)
    }

    public init(from r: inout LEReader, field p: String) throws(LEDecodeError) {
        exception.injected = try r.bool(p + ".exception.injected")
        exception.nr = try r.u8(p + ".exception.nr")
        exception.hasErrorCode = try r.bool(p + ".exception.has_error_code")
        exception.pending = try r.bool(p + ".exception.pending")
        exception.errorCode = try r.u32(p + ".exception.error_code")
        interrupt.injected = try r.bool(p + ".interrupt.injected")
        interrupt.nr = try r.u8(p + ".interrupt.nr")
        interrupt.soft = try r.bool(p + ".interrupt.soft")
        interrupt.shadow = try r.u8(p + ".interrupt.shadow")
        nmi.injected = try r.bool(p + ".nmi.injected")
        nmi.pending = try r.bool(p + ".nmi.pending")
        nmi.masked = try r.bool(p + ".nmi.masked")
        sipiVector = try r.u32(p + ".sipi_vector")
        flags = try r.u32(p + ".flags")
        smi.smm = try r.bool(p + ".smi.smm")
        smi.pending = try r.bool(p + ".smi.pending")
        smi.smmInsideNMI = try r.bool(p + ".smi.smm_inside_nmi")
        smi.latchedInit = try r.bool(p + ".smi.latched_init")
        tripleFaultPending = try r.bool(p + ".triple_fault.pending")
        exceptionHasPayload = try r.bool(p + ".exception_has_payload")
        exceptionPayload = try r.u64(p + ".exception_payload")
    }
}

extension VCPUState.DebugRegisters {
    public func encode(to w: inout LEWriter) {
        w.u32(UInt32(truncatingIfNeeded: db.count))
        for v in db { w.u64(v) }
        w.u64(dr6)
        w.u64(dr7)
        w.u64(flags)
    }

    public init(from r: inout LEReader, field p: String) throws(LEDecodeError) {
        let n = Int(try r.u32(p + ".db count"))
        guard n == VCPUState.debugAddressRegisters else {
            throw .invalid(field: p + ".db count", reason: "\(n) is not \(VCPUState.debugAddressRegisters)")
        }
        db = []
        for i in 0..<n { db.append(try r.u64(p + ".db[\(i)]")) }
        dr6 = try r.u64(p + ".dr6")
        dr7 = try r.u64(p + ".dr7")
        flags = try r.u64(p + ".flags")
    }
}
