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
        var s = self
        w.encode { c throws(LEDecodeError) in try s.code(&c, version: Self.version) }
    }

    /// Reads what `encode(to:)` wrote for layout `version`, validating counts, lengths, booleans and
    /// the MP state. Errors name the field ("vcpu.regs.rip", "vcpu.msrs count").
    public init(from r: inout LEReader, version: UInt16) throws(LEDecodeError) {
        guard (1...Self.version).contains(version) else {
            throw .invalid(field: "vcpu version", reason: "layout version \(version) is not supported (this build reads versions 1 to \(Self.version))")
        }
        var s = VCPUState()
        try r.decode { c throws(LEDecodeError) in try s.code(&c, version: version) }
        self = s
    }

    /// The layout above, for both directions: `encode(to:)` and `init(from:version:)` run it.
    public mutating func code<C: LECoder>(_ c: inout C, version: UInt16) throws(LEDecodeError) {
        try regs.code(&c, field: "vcpu.regs")
        try sregs.code(&c, field: "vcpu.sregs")
        try c.blob(&xsave, limit: Self.maxXSAVESize, "vcpu.xsave")
        try c.require(xsave.count >= Self.minXSAVESize && xsave.count % 4 == 0, "vcpu.xsave",
                      "length \(xsave.count) is not a multiple of 4 of at least \(Self.minXSAVESize) bytes")
        try c.array(&xcrs, limit: Self.maxXCRs, minimumItemSize: 12, "vcpu.xcrs count",
                    blank: { XCR(index: 0, value: 0) }) { c, x, i throws(LEDecodeError) in
            try c.u32(&x.index, "vcpu.xcrs[\(i)].xcr")
            try c.u64(&x.value, "vcpu.xcrs[\(i)].value")
        }
        try c.blob(&lapic, limit: Self.lapicSize, "vcpu.lapic")
        try c.require(lapic.count == Self.lapicSize, "vcpu.lapic", "length \(lapic.count) is not \(Self.lapicSize)")
        try c.array(&msrs, limit: Self.maxMSRs, minimumItemSize: 12, "vcpu.msrs count",
                    blank: { MSREntry(index: 0, value: 0) }) { c, m, i throws(LEDecodeError) in
            try c.u32(&m.index, "vcpu.msrs[\(i)].index")
            try c.u64(&m.value, "vcpu.msrs[\(i)].value")
        }
        try c.u32(&mpState, "vcpu.mp_state")
        try c.require(MPState.known.contains(mpState), "vcpu.mp_state", "\(mpState) is not a KVM_MP_STATE value (0-10)")
        try events.code(&c, field: "vcpu.events")
        try debugregs.code(&c, field: "vcpu.debugregs")
        try c.array(&cpuid, limit: Self.maxCPUIDEntries, minimumItemSize: 28, "vcpu.cpuid count",
                    blank: { CPUIDEntry(function: 0, index: 0, flags: 0, eax: 0, ebx: 0, ecx: 0, edx: 0) }) { c, e, i throws(LEDecodeError) in
            try c.u32(&e.function, "vcpu.cpuid[\(i)].function")
            try c.u32(&e.index, "vcpu.cpuid[\(i)].index")
            try c.u32(&e.flags, "vcpu.cpuid[\(i)].flags")
            try c.u32(&e.eax, "vcpu.cpuid[\(i)].eax")
            try c.u32(&e.ebx, "vcpu.cpuid[\(i)].ebx")
            try c.u32(&e.ecx, "vcpu.cpuid[\(i)].ecx")
            try c.u32(&e.edx, "vcpu.cpuid[\(i)].edx")
        }
    }
}

extension VCPUState.Registers: LECodedMember {
    /// 18 u64: rax rbx rcx rdx rsi rdi rsp rbp r8 … r15 rip rflags (kvm_regs order).
    public mutating func code<C: LECoder>(_ c: inout C, field p: @autoclosure () -> String) throws(LEDecodeError) {
        try c.u64(&rax, p() + ".rax")
        try c.u64(&rbx, p() + ".rbx")
        try c.u64(&rcx, p() + ".rcx")
        try c.u64(&rdx, p() + ".rdx")
        try c.u64(&rsi, p() + ".rsi")
        try c.u64(&rdi, p() + ".rdi")
        try c.u64(&rsp, p() + ".rsp")
        try c.u64(&rbp, p() + ".rbp")
        try c.u64(&r8, p() + ".r8")
        try c.u64(&r9, p() + ".r9")
        try c.u64(&r10, p() + ".r10")
        try c.u64(&r11, p() + ".r11")
        try c.u64(&r12, p() + ".r12")
        try c.u64(&r13, p() + ".r13")
        try c.u64(&r14, p() + ".r14")
        try c.u64(&r15, p() + ".r15")
        try c.u64(&rip, p() + ".rip")
        try c.u64(&rflags, p() + ".rflags")
    }
}

extension VCPUState.Segment: LECodedMember {
    /// base u64, limit u32, selector u16, type u8, present u8, dpl u8, db u8, s u8, l u8, g u8,
    /// avl u8, unusable u8 (23 bytes).
    public mutating func code<C: LECoder>(_ c: inout C, field p: @autoclosure () -> String) throws(LEDecodeError) {
        try c.u64(&base, p() + ".base")
        try c.u32(&limit, p() + ".limit")
        try c.u16(&selector, p() + ".selector")
        try c.u8(&type, p() + ".type")
        try c.bool(&present, p() + ".present")
        try c.u8(&dpl, p() + ".dpl")
        try c.bool(&db, p() + ".db")
        try c.bool(&s, p() + ".s")
        try c.bool(&l, p() + ".l")
        try c.bool(&g, p() + ".g")
        try c.bool(&avl, p() + ".avl")
        try c.bool(&unusable, p() + ".unusable")
    }
}

extension VCPUState.DescriptorTable: LECodedMember {
    /// base u64, limit u16.
    public mutating func code<C: LECoder>(_ c: inout C, field p: @autoclosure () -> String) throws(LEDecodeError) {
        try c.u64(&base, p() + ".base")
        try c.u16(&limit, p() + ".limit")
    }
}

extension VCPUState.SpecialRegisters: LECodedMember {
    /// cs ds es fs gs ss tr ldt, gdt idt, cr0 cr2 cr3 cr4 cr8 efer apic_base (u64), then
    /// interrupt_bitmap (u32 count = 4, u64 each).
    public mutating func code<C: LECoder>(_ c: inout C, field p: @autoclosure () -> String) throws(LEDecodeError) {
        try cs.code(&c, field: p() + ".cs")
        try ds.code(&c, field: p() + ".ds")
        try es.code(&c, field: p() + ".es")
        try fs.code(&c, field: p() + ".fs")
        try gs.code(&c, field: p() + ".gs")
        try ss.code(&c, field: p() + ".ss")
        try tr.code(&c, field: p() + ".tr")
        try ldt.code(&c, field: p() + ".ldt")
        try gdt.code(&c, field: p() + ".gdt")
        try idt.code(&c, field: p() + ".idt")
        try c.u64(&cr0, p() + ".cr0")
        try c.u64(&cr2, p() + ".cr2")
        try c.u64(&cr3, p() + ".cr3")
        try c.u64(&cr4, p() + ".cr4")
        try c.u64(&cr8, p() + ".cr8")
        try c.u64(&efer, p() + ".efer")
        try c.u64(&apicBase, p() + ".apic_base")
        try c.array(&interruptBitmap, exactly: VCPUState.interruptBitmapWords, p() + ".interrupt_bitmap count",
                    blank: { 0 }) { c, v, i throws(LEDecodeError) in
            try c.u64(&v, p() + ".interrupt_bitmap[\(i)]")
        }
    }
}

extension VCPUState.Events: LECodedMember {
    public mutating func code<C: LECoder>(_ c: inout C, field p: @autoclosure () -> String) throws(LEDecodeError) {
        try c.bool(&exception.injected, p() + ".exception.injected")
        try c.u8(&exception.nr, p() + ".exception.nr")
        try c.bool(&exception.hasErrorCode, p() + ".exception.has_error_code")
        try c.bool(&exception.pending, p() + ".exception.pending")
        try c.u32(&exception.errorCode, p() + ".exception.error_code")
        try c.bool(&interrupt.injected, p() + ".interrupt.injected")
        try c.u8(&interrupt.nr, p() + ".interrupt.nr")
        try c.bool(&interrupt.soft, p() + ".interrupt.soft")
        try c.u8(&interrupt.shadow, p() + ".interrupt.shadow")
        try c.bool(&nmi.injected, p() + ".nmi.injected")
        try c.bool(&nmi.pending, p() + ".nmi.pending")
        try c.bool(&nmi.masked, p() + ".nmi.masked")
        try c.u32(&sipiVector, p() + ".sipi_vector")
        try c.u32(&flags, p() + ".flags")
        try c.bool(&smi.smm, p() + ".smi.smm")
        try c.bool(&smi.pending, p() + ".smi.pending")
        try c.bool(&smi.smmInsideNMI, p() + ".smi.smm_inside_nmi")
        try c.bool(&smi.latchedInit, p() + ".smi.latched_init")
        try c.bool(&tripleFaultPending, p() + ".triple_fault.pending")
        try c.bool(&exceptionHasPayload, p() + ".exception_has_payload")
        try c.u64(&exceptionPayload, p() + ".exception_payload")
    }
}

extension VCPUState.DebugRegisters: LECodedMember {
    /// u32 count = 4, db u64 each, dr6 u64, dr7 u64, flags u64.
    public mutating func code<C: LECoder>(_ c: inout C, field p: @autoclosure () -> String) throws(LEDecodeError) {
        try c.array(&db, exactly: VCPUState.debugAddressRegisters, p() + ".db count", blank: { 0 }) { c, v, i throws(LEDecodeError) in
            try c.u64(&v, p() + ".db[\(i)]")
        }
        try c.u64(&dr6, p() + ".dr6")
        try c.u64(&dr7, p() + ".dr7")
        try c.u64(&flags, p() + ".flags")
    }
}
