import BootLoader
import CKVM
import KVM

/// Puts a vCPU into the state the Linux 64-bit boot protocol (and our test programs) expect.
enum VCPUSetup {
    // MSR numbers.
    static let msrTSC: UInt32 = 0x10
    static let msrSysenterCS: UInt32 = 0x174
    static let msrSysenterESP: UInt32 = 0x175
    static let msrSysenterEIP: UInt32 = 0x176
    static let msrMiscEnable: UInt32 = 0x1A0
    static let msrMTRRDefType: UInt32 = 0x2FF
    static let msrSTAR: UInt32 = 0xC000_0081
    static let msrLSTAR: UInt32 = 0xC000_0082
    static let msrCSTAR: UInt32 = 0xC000_0083
    static let msrSyscallMask: UInt32 = 0xC000_0084
    static let msrKernelGSBase: UInt32 = 0xC000_0102

    /// MSRs every vCPU starts with: fast strings on, MTRRs enabled with write-back default, syscall MSRs clear.
    static let bootMSRs: [(index: UInt32, value: UInt64)] = [
        (msrSysenterCS, 0), (msrSysenterESP, 0), (msrSysenterEIP, 0),
        (msrSTAR, 0), (msrCSTAR, 0), (msrKernelGSBase, 0), (msrSyscallMask, 0), (msrLSTAR, 0),
        (msrMiscEnable, 1),                  // fast string operations
        (msrMTRRDefType, (1 << 11) | 6),     // MTRRs enabled, default type write-back
    ]

    static func kvmSegment(_ s: X86Setup.Segment) -> kvm_segment {
        var k = kvm_segment()
        k.base = s.base
        k.limit = s.limit
        k.selector = s.selector
        k.type = s.type
        k.present = s.present
        k.dpl = s.dpl
        k.db = s.db
        k.s = s.s
        k.l = s.l
        k.g = s.g
        k.avl = s.avl
        k.unusable = s.present == 0 ? 1 : 0
        return k
    }

    /// Long mode with paging through `Layout.pageTables` and the boot GDT.
    static func setLongMode(_ vcpu: VCPU) throws(KVMError) {
        var sregs = try vcpu.getSpecialRegisters()
        let gdt = X86Setup.bootGDT
        let code = kvmSegment(X86Setup.segment(descriptor: gdt[2], selector: X86Setup.codeSelector))
        let data = kvmSegment(X86Setup.segment(descriptor: gdt[3], selector: X86Setup.dataSelector))
        let tss = kvmSegment(X86Setup.segment(descriptor: gdt[4], selector: X86Setup.tssSelector))
        sregs.gdt.base = Layout.gdt
        sregs.gdt.limit = UInt16(gdt.count * 8 - 1)
        sregs.idt.base = Layout.idt
        sregs.idt.limit = 0
        sregs.cs = code
        sregs.ds = data
        sregs.es = data
        sregs.fs = data
        sregs.gs = data
        sregs.ss = data
        sregs.tr = tss
        sregs.cr0 = X86Setup.cr0PE | X86Setup.cr0ET | X86Setup.cr0PG
        sregs.cr3 = Layout.pageTables
        sregs.cr4 = X86Setup.cr4PAE
        sregs.efer = X86Setup.eferLME | X86Setup.eferLMA
        try vcpu.setSpecialRegisters(sregs)
    }

    /// General registers for the entry point: interrupts off, RSI = boot_params.
    static func setEntryRegisters(_ vcpu: VCPU, rip: UInt64, rsi: UInt64) throws(KVMError) {
        var regs = kvm_regs()
        regs.rflags = 0x2
        regs.rip = rip
        regs.rsi = rsi
        regs.rsp = Layout.bootStack
        regs.rbp = Layout.bootStack
        try vcpu.setRegisters(regs)
    }

    static func setFPU(_ vcpu: VCPU) throws(KVMError) {
        var fpu = kvm_fpu()
        fpu.fcw = 0x37F
        fpu.mxcsr = 0x1F80
        try vcpu.setFPU(fpu)
    }

    /// LINT0 as ExtINT (the 8259 PIC's output) and LINT1 as NMI, as a PC BIOS leaves them.
    static func setLocalAPIC(_ vcpu: VCPU) throws(KVMError) {
        var lapic = try vcpu.getLAPIC()
        withUnsafeMutableBytes(of: &lapic.regs) { regs in
            func update(_ offset: Int, mode: UInt32) {
                var v = regs.loadUnaligned(fromByteOffset: offset, as: UInt32.self)
                v = (v & ~0x700) | (mode << 8)
                regs.storeBytes(of: v, toByteOffset: offset, as: UInt32.self)
            }
            update(0x350, mode: 7) // LVT LINT0: ExtINT
            update(0x360, mode: 4) // LVT LINT1: NMI
        }
        try vcpu.setLAPIC(lapic)
    }
}
