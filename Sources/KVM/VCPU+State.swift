import CKVM
import Glibc
import VMMSys

/// Saving and restoring a vCPU's complete KVM state (see `VirtualMachine.saveState()` for the whole
/// sequence, VM included).
extension VCPU {
    /// MSR numbers the restore order depends on.
    public static let msrTSC: UInt32 = 0x10
    public static let msrTSCDeadline: UInt32 = 0x6E0

    /// KVM_GET_MSRS and KVM_SET_MSRS refuse 256 entries or more per call (MAX_IO_MSRS).
    static let msrBatch = 128

    // MARK: Pending exits

    /// Completes the I/O or MMIO exit KVM last reported, without entering the guest again.
    ///
    /// After a KVM_EXIT_IO or KVM_EXIT_MMIO the instruction is only finished (data of an IN or an
    /// MMIO read stored, RIP advanced) by the next KVM_RUN, so state saved in between would be
    /// inconsistent: Documentation/virt/kvm/api.rst (the note on KVM_EXIT_IO and KVM_EXIT_MMIO)
    /// says guest state is consistent only after userspace re-entered KVM_RUN, and that re-entering
    /// with immediate_exit set completes the operation without running further guest code. This sets
    /// `immediate_exit`, calls KVM_RUN — which finishes the pending operation and then returns EINTR
    /// without entering the guest — and clears `immediate_exit` again. With nothing pending it is
    /// harmless: KVM returns EINTR without entering the guest.
    ///
    /// Call it from the thread that handles this vCPU's exits, after that exit's data was handled,
    /// with no KVM_RUN in progress. Completing a string instruction (`rep insb`) can need another
    /// userspace round: KVM then reports a new exit instead of EINTR, which `handleFurtherExit`
    /// must handle as the run loop would (fill the data of a read); this repeats until KVM returns
    /// EINTR. Without a handler such an exit throws `KVMError.invalidState`.
    public func completePendingExit(handleFurtherExit: ((VCPUExit) -> Void)? = nil) throws(KVMError) {
        requestImmediateExit(true)
        defer { requestImmediateExit(false) }
        for _ in 0..<4096 {
            do {
                _ = try fd.ioctl(CKVM_RUN, value: 0, name: "KVM_RUN (completing the pending exit) on vCPU \(id)")
            } catch {
                if error.errno == EINTR { return }
                throw .ioctl(error)
            }
            let exit = currentExit()
            guard let handleFurtherExit else {
                throw .invalidState("vCPU \(id): completing the pending exit needs another userspace round (\(exit)); pass a handler")
            }
            handleFurtherExit(exit)
        }
        throw .invalidState("vCPU \(id): the pending exit did not complete after 4096 rounds")
    }

    // MARK: Save and restore

    /// Reads the vCPU's whole KVM state. Call `completePendingExit()` first if the vCPU has run
    /// since its last exit was handled. `msrIndices`: the MSRs to save (default: every MSR of
    /// KVM_GET_MSR_INDEX_LIST).
    public func saveState(msrIndices: [UInt32]? = nil) throws(KVMError) -> VCPUState {
        try vm.system.requireStateCapabilities()
        // QEMU's order (kvm_arch_get_registers).
        var state = VCPUState()
        state.regs = VCPUState.Registers(try getRegisters())
        state.xsave = try getXSAVE()
        state.xcrs = try getXCRs()
        state.sregs = VCPUState.SpecialRegisters(try getSpecialRegisters())
        let indices: [UInt32]
        if let msrIndices { indices = msrIndices } else { indices = try vm.system.msrIndexList() }
        state.msrs = try getMSRs(indices)
        state.mpState = try getMPState()
        var lapic = try getLAPIC()
        state.lapic = withUnsafeBytes(of: &lapic.regs) { Array($0) }
        state.events = VCPUState.Events(try getVCPUEvents())
        state.debugregs = VCPUState.DebugRegisters(try getDebugRegisters())
        state.cpuid = try getCPUID()
        guard state.msrs.count <= VCPUState.maxMSRs, state.cpuid.count <= VCPUState.maxCPUIDEntries,
              state.xcrs.count <= VCPUState.maxXCRs, state.xsave.count <= VCPUState.maxXSAVESize else {
            throw .invalidState("vCPU \(id) has more state than the snapshot format holds (\(state.msrs.count) MSRs, \(state.cpuid.count) CPUID entries, \(state.xcrs.count) XCRs, \(state.xsave.count) XSAVE bytes)")
        }
        return state
    }

    /// Writes `state` to the vCPU, which may never have run (a vCPU fresh from `createVCPU`).
    ///
    /// The order matters: CPUID first (it decides which XCR0, CR4 and MSR values KVM accepts), then
    /// regs, XSAVE, XCRs, sregs (which also sets the APIC base), the local APIC, the MSRs (the TSC
    /// first, TSC_DEADLINE last: it is relative to the TSC and needs the LAPIC timer mode), the MP
    /// state, the pending events and the debug registers.
    ///
    /// `setCPUID`: set the saved CPUID entries first (the default). Pass false when the caller
    /// already gave the vCPU its CPUID; KVM refuses a different CPUID once a vCPU has run.
    ///
    /// Everything is checked before anything is written; then the first refusal from KVM stops the
    /// restore with an error (an MSR by number), leaving the vCPU partly restored: discard it.
    public func restoreState(_ state: VCPUState, setCPUID: Bool = true) throws(KVMError) {
        try vm.system.requireStateCapabilities()
        try validateForRestore(state)

        if setCPUID && !state.cpuid.isEmpty { try self.setCPUID(state.cpuid) }
        try setRegisters(state.regs.raw)
        try setXSAVE(fittedXSAVE(state.xsave))
        try setXCRs(state.xcrs)
        try setSpecialRegisters(state.sregs.raw)
        var lapic = kvm_lapic_state()
        withUnsafeMutableBytes(of: &lapic.regs) { $0.copyBytes(from: state.lapic) }
        try setLAPIC(lapic)
        let tsc = state.msrs.filter { $0.index == Self.msrTSC }
        let deadline = state.msrs.filter { $0.index == Self.msrTSCDeadline }
        let others = state.msrs.filter { $0.index != Self.msrTSC && $0.index != Self.msrTSCDeadline }
        try restoreMSRs(tsc)
        try restoreMSRs(others)
        try restoreMSRs(deadline)
        try setMPState(state.mpState)
        try setVCPUEvents(state.events.raw)
        try setDebugRegisters(state.debugregs.raw)
    }

    private func validateForRestore(_ state: VCPUState) throws(KVMError) {
        _ = try fittedXSAVE(state.xsave)
        guard state.lapic.count == VCPUState.lapicSize else {
            throw .invalidState("the saved local APIC page of vCPU \(id) is \(state.lapic.count) bytes, not \(VCPUState.lapicSize)")
        }
        guard state.xcrs.count <= VCPUState.maxXCRs else {
            throw .invalidState("vCPU \(id) has \(state.xcrs.count) XCRs, over KVM's \(VCPUState.maxXCRs)")
        }
        guard state.sregs.interruptBitmap.count == VCPUState.interruptBitmapWords else {
            throw .invalidState("the interrupt bitmap of vCPU \(id) has \(state.sregs.interruptBitmap.count) words, not \(VCPUState.interruptBitmapWords)")
        }
        guard state.debugregs.db.count == VCPUState.debugAddressRegisters else {
            throw .invalidState("vCPU \(id) has \(state.debugregs.db.count) debug address registers, not \(VCPUState.debugAddressRegisters)")
        }
        guard VCPUState.MPState.known.contains(state.mpState) else {
            throw .invalidState("vCPU \(id) has MP state \(state.mpState), which is not a KVM_MP_STATE value")
        }
    }

    // MARK: The state ioctls

    /// KVM_GET_FPU: the x87/SSE state in the legacy FXSAVE layout (the XSAVE area holds it too).
    public func getFPU() throws(KVMError) -> kvm_fpu {
        var fpu = kvm_fpu()
        do { _ = try fd.ioctl(CKVM_GET_FPU, &fpu, name: "KVM_GET_FPU") } catch { throw .ioctl(error) }
        return fpu
    }

    /// KVM_GET_CPUID2: the CPUID entries the vCPU was given (empty if none was set).
    public func getCPUID() throws(KVMError) -> [CPUIDEntry] {
        try readCPUID2(fd, request: CKVM_GET_CPUID2, name: "KVM_GET_CPUID2")
    }

    /// Reads the MSRs in `indices` that KVM can read, in that order. KVM_GET_MSRS stops at the
    /// first MSR it cannot read: that one is left out and the rest are read.
    public func getMSRs(_ indices: [UInt32]) throws(KVMError) -> [VCPUState.MSREntry] {
        var result: [VCPUState.MSREntry] = []
        result.reserveCapacity(indices.count)
        var next = 0
        while next < indices.count {
            let batch = indices[next..<min(next + Self.msrBatch, indices.count)].map { VCPUState.MSREntry(index: $0, value: 0) }
            let (done, values) = try msrIoctl(CKVM_GET_MSRS, batch, name: "KVM_GET_MSRS")
            result += values.prefix(done)
            next += done
            if done < batch.count { next += 1 } // skip the MSR KVM could not read
        }
        return result
    }

    /// Sets `msrs` in order; throws `.msrRefused` naming the first MSR KVM does not accept.
    private func restoreMSRs(_ msrs: [VCPUState.MSREntry]) throws(KVMError) {
        var next = 0
        while next < msrs.count {
            let batch = Array(msrs[next..<min(next + Self.msrBatch, msrs.count)])
            let (done, _) = try msrIoctl(CKVM_SET_MSRS, batch, name: "KVM_SET_MSRS")
            if done < batch.count {
                throw .msrRefused(index: batch[done].index, value: batch[done].value, vcpu: id)
            }
            next += done
        }
    }

    /// One KVM_GET_MSRS or KVM_SET_MSRS: returns how many entries KVM processed and the entries
    /// (with the values read, for a get).
    private func msrIoctl(_ request: UInt, _ entries: [VCPUState.MSREntry], name: String) throws(KVMError) -> (Int, [VCPUState.MSREntry]) {
        let header = Int(ckvm_msrs_header_size())
        let bytes = header + entries.count * MemoryLayout<kvm_msr_entry>.stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        raw.assumingMemoryBound(to: kvm_msrs.self).pointee.nmsrs = UInt32(entries.count)
        // SAFETY: the entry array follows the header inside the buffer sized for `entries.count` entries.
        let array = (raw + header).assumingMemoryBound(to: kvm_msr_entry.self)
        for (i, e) in entries.enumerated() {
            array[i] = kvm_msr_entry()
            array[i].index = e.index
            array[i].data = e.value
        }
        let done: Int32
        do { done = try fd.ioctl(request, raw, name: name) } catch { throw .ioctl(error) }
        let n = max(0, min(Int(done), entries.count))
        return (n, (0..<entries.count).map { VCPUState.MSREntry(index: array[$0].index, value: array[$0].data) })
    }

    /// The saved XSAVE area in this host's size. The standard (non-compacted) layout KVM transfers
    /// puts each component at a fixed offset, so an area from a host with fewer features is padded
    /// with zeros (components it lacks stay in their initial state), and one from a host with more
    /// is accepted only when the part this host lacks is all zero (those components unused).
    func fittedXSAVE(_ saved: [UInt8]) throws(KVMError) -> [UInt8] {
        let hostXSAVE = vm.xsaveSize
        if saved.count == hostXSAVE { return saved }
        if saved.count < hostXSAVE { return saved + [UInt8](repeating: 0, count: hostXSAVE - saved.count) }
        guard saved[hostXSAVE...].allSatisfy({ $0 == 0 }) else {
            throw .invalidState("the saved XSAVE area of vCPU \(id) is \(saved.count) bytes and uses state beyond the \(hostXSAVE) bytes this host's KVM transfers (KVM_CAP_XSAVE2): it comes from a host with more XSAVE features")
        }
        return Array(saved[..<hostXSAVE])
    }

    /// KVM_GET_XSAVE, or KVM_GET_XSAVE2 when the host's area is larger than struct kvm_xsave.
    func getXSAVE() throws(KVMError) -> [UInt8] {
        let size = vm.xsaveSize
        let raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        let two = size > Int(ckvm_xsave_size())
        do {
            _ = try fd.ioctl(two ? CKVM_GET_XSAVE2 : CKVM_GET_XSAVE, raw, name: two ? "KVM_GET_XSAVE2" : "KVM_GET_XSAVE")
        } catch { throw .ioctl(error) }
        return Array(UnsafeRawBufferPointer(start: raw, count: size))
    }

    /// KVM_SET_XSAVE; `bytes` must be the host's XSAVE size (checked by the caller): KVM reads that many.
    func setXSAVE(_ bytes: [UInt8]) throws(KVMError) {
        let raw = UnsafeMutableRawPointer.allocate(byteCount: max(bytes.count, 1), alignment: 8)
        defer { raw.deallocate() }
        bytes.withUnsafeBytes { b in
            if let base = b.baseAddress { raw.copyMemory(from: base, byteCount: b.count) }
        }
        do { _ = try fd.ioctl(CKVM_SET_XSAVE, raw, name: "KVM_SET_XSAVE") } catch { throw .ioctl(error) }
    }

    func getXCRs() throws(KVMError) -> [VCPUState.XCR] {
        var xcrs = kvm_xcrs()
        do { _ = try fd.ioctl(CKVM_GET_XCRS, &xcrs, name: "KVM_GET_XCRS") } catch { throw .ioctl(error) }
        let n = min(xcrs.nr_xcrs, ckvm_xcrs_max())
        return withUnsafePointer(to: &xcrs) { p in
            (0..<n).map { i in
                let x = ckvm_xcrs_entry(p, i)
                return VCPUState.XCR(index: x.xcr, value: x.value)
            }
        }
    }

    func setXCRs(_ list: [VCPUState.XCR]) throws(KVMError) {
        var xcrs = kvm_xcrs()
        xcrs.nr_xcrs = UInt32(min(list.count, Int(ckvm_xcrs_max())))
        withUnsafeMutablePointer(to: &xcrs) { p in
            for (i, x) in list.prefix(Int(ckvm_xcrs_max())).enumerated() { ckvm_xcrs_set_entry(p, UInt32(i), x.index, x.value) }
        }
        do { _ = try fd.ioctl(CKVM_SET_XCRS, &xcrs, name: "KVM_SET_XCRS") } catch { throw .ioctl(error) }
    }

    func getMPState() throws(KVMError) -> UInt32 {
        var mp = kvm_mp_state()
        do { _ = try fd.ioctl(CKVM_GET_MP_STATE, &mp, name: "KVM_GET_MP_STATE") } catch { throw .ioctl(error) }
        return mp.mp_state
    }

    func setMPState(_ value: UInt32) throws(KVMError) {
        var mp = kvm_mp_state(mp_state: value)
        do { _ = try fd.ioctl(CKVM_SET_MP_STATE, &mp, name: "KVM_SET_MP_STATE") } catch { throw .ioctl(error) }
    }

    func getVCPUEvents() throws(KVMError) -> kvm_vcpu_events {
        var events = kvm_vcpu_events()
        do { _ = try fd.ioctl(CKVM_GET_VCPU_EVENTS, &events, name: "KVM_GET_VCPU_EVENTS") } catch { throw .ioctl(error) }
        return events
    }

    func setVCPUEvents(_ events: kvm_vcpu_events) throws(KVMError) {
        var e = events
        do { _ = try fd.ioctl(CKVM_SET_VCPU_EVENTS, &e, name: "KVM_SET_VCPU_EVENTS") } catch { throw .ioctl(error) }
    }

    func getDebugRegisters() throws(KVMError) -> kvm_debugregs {
        var d = kvm_debugregs()
        do { _ = try fd.ioctl(CKVM_GET_DEBUGREGS, &d, name: "KVM_GET_DEBUGREGS") } catch { throw .ioctl(error) }
        return d
    }

    func setDebugRegisters(_ regs: kvm_debugregs) throws(KVMError) {
        var d = regs
        do { _ = try fd.ioctl(CKVM_SET_DEBUGREGS, &d, name: "KVM_SET_DEBUGREGS") } catch { throw .ioctl(error) }
    }
}

// MARK: - Conversions from and to the kernel structures

extension VCPUState.Registers {
    init(_ r: kvm_regs) {
        self.init()
        rax = r.rax; rbx = r.rbx; rcx = r.rcx; rdx = r.rdx
        rsi = r.rsi; rdi = r.rdi; rsp = r.rsp; rbp = r.rbp
        r8 = r.r8; r9 = r.r9; r10 = r.r10; r11 = r.r11
        r12 = r.r12; r13 = r.r13; r14 = r.r14; r15 = r.r15
        rip = r.rip; rflags = r.rflags
    }

    var raw: kvm_regs {
        kvm_regs(rax: rax, rbx: rbx, rcx: rcx, rdx: rdx, rsi: rsi, rdi: rdi, rsp: rsp, rbp: rbp,
                 r8: r8, r9: r9, r10: r10, r11: r11, r12: r12, r13: r13, r14: r14, r15: r15,
                 rip: rip, rflags: rflags)
    }
}

extension VCPUState.Segment {
    init(_ k: kvm_segment) {
        self.init()
        base = k.base
        limit = k.limit
        selector = k.selector
        type = k.type
        present = k.present != 0
        dpl = k.dpl
        db = k.db != 0
        s = k.s != 0
        l = k.l != 0
        g = k.g != 0
        avl = k.avl != 0
        unusable = k.unusable != 0
    }

    var raw: kvm_segment {
        var k = kvm_segment()
        k.base = base
        k.limit = limit
        k.selector = selector
        k.type = type
        k.present = present ? 1 : 0
        k.dpl = dpl
        k.db = db ? 1 : 0
        k.s = s ? 1 : 0
        k.l = l ? 1 : 0
        k.g = g ? 1 : 0
        k.avl = avl ? 1 : 0
        k.unusable = unusable ? 1 : 0
        return k
    }
}

extension VCPUState.DescriptorTable {
    init(_ d: kvm_dtable) {
        self.init()
        base = d.base
        limit = d.limit
    }

    var raw: kvm_dtable {
        var d = kvm_dtable()
        d.base = base
        d.limit = limit
        return d
    }
}

extension VCPUState.SpecialRegisters {
    init(_ k: kvm_sregs) {
        self.init()
        typealias Segment = VCPUState.Segment
        cs = Segment(k.cs); ds = Segment(k.ds); es = Segment(k.es); fs = Segment(k.fs)
        gs = Segment(k.gs); ss = Segment(k.ss); tr = Segment(k.tr); ldt = Segment(k.ldt)
        gdt = VCPUState.DescriptorTable(k.gdt)
        idt = VCPUState.DescriptorTable(k.idt)
        cr0 = k.cr0; cr2 = k.cr2; cr3 = k.cr3; cr4 = k.cr4; cr8 = k.cr8
        efer = k.efer
        apicBase = k.apic_base
        var copy = k
        interruptBitmap = (0..<UInt32(VCPUState.interruptBitmapWords)).map { ckvm_sregs_interrupt_bitmap(&copy, $0) }
    }

    /// The kernel structure (the caller checked the interrupt bitmap has 4 words).
    var raw: kvm_sregs {
        var k = kvm_sregs()
        k.cs = cs.raw; k.ds = ds.raw; k.es = es.raw; k.fs = fs.raw
        k.gs = gs.raw; k.ss = ss.raw; k.tr = tr.raw; k.ldt = ldt.raw
        k.gdt = gdt.raw
        k.idt = idt.raw
        k.cr0 = cr0; k.cr2 = cr2; k.cr3 = cr3; k.cr4 = cr4; k.cr8 = cr8
        k.efer = efer
        k.apic_base = apicBase
        for (i, w) in interruptBitmap.prefix(VCPUState.interruptBitmapWords).enumerated() {
            ckvm_sregs_set_interrupt_bitmap(&k, UInt32(i), w)
        }
        return k
    }
}

extension VCPUState.Events {
    init(_ e: kvm_vcpu_events) {
        self.init()
        exception.injected = e.exception.injected != 0
        exception.nr = e.exception.nr
        exception.hasErrorCode = e.exception.has_error_code != 0
        exception.pending = e.exception.pending != 0
        exception.errorCode = e.exception.error_code
        interrupt.injected = e.interrupt.injected != 0
        interrupt.nr = e.interrupt.nr
        interrupt.soft = e.interrupt.soft != 0
        interrupt.shadow = e.interrupt.shadow
        nmi.injected = e.nmi.injected != 0
        nmi.pending = e.nmi.pending != 0
        nmi.masked = e.nmi.masked != 0
        sipiVector = e.sipi_vector
        flags = e.flags
        smi.smm = e.smi.smm != 0
        smi.pending = e.smi.pending != 0
        smi.smmInsideNMI = e.smi.smm_inside_nmi != 0
        smi.latchedInit = e.smi.latched_init != 0
        tripleFaultPending = e.triple_fault.pending != 0
        exceptionHasPayload = e.exception_has_payload != 0
        exceptionPayload = e.exception_payload
    }

    var raw: kvm_vcpu_events {
        var e = kvm_vcpu_events()
        e.exception.injected = exception.injected ? 1 : 0
        e.exception.nr = exception.nr
        e.exception.has_error_code = exception.hasErrorCode ? 1 : 0
        e.exception.pending = exception.pending ? 1 : 0
        e.exception.error_code = exception.errorCode
        e.interrupt.injected = interrupt.injected ? 1 : 0
        e.interrupt.nr = interrupt.nr
        e.interrupt.soft = interrupt.soft ? 1 : 0
        e.interrupt.shadow = interrupt.shadow
        e.nmi.injected = nmi.injected ? 1 : 0
        e.nmi.pending = nmi.pending ? 1 : 0
        e.nmi.masked = nmi.masked ? 1 : 0
        e.sipi_vector = sipiVector
        e.flags = flags
        e.smi.smm = smi.smm ? 1 : 0
        e.smi.pending = smi.pending ? 1 : 0
        e.smi.smm_inside_nmi = smi.smmInsideNMI ? 1 : 0
        e.smi.latched_init = smi.latchedInit ? 1 : 0
        e.triple_fault.pending = tripleFaultPending ? 1 : 0
        e.exception_has_payload = exceptionHasPayload ? 1 : 0
        e.exception_payload = exceptionPayload
        return e
    }
}

extension VCPUState.DebugRegisters {
    init(_ d: kvm_debugregs) {
        self.init()
        var copy = d
        db = (0..<UInt32(VCPUState.debugAddressRegisters)).map { ckvm_debugregs_db(&copy, $0) }
        dr6 = d.dr6
        dr7 = d.dr7
        flags = d.flags
    }

    /// The kernel structure (the caller checked there are 4 address registers).
    var raw: kvm_debugregs {
        var d = kvm_debugregs()
        for (i, v) in db.prefix(VCPUState.debugAddressRegisters).enumerated() { ckvm_debugregs_set_db(&d, UInt32(i), v) }
        d.dr6 = dr6
        d.dr7 = dr7
        d.flags = flags
        return d
    }
}
