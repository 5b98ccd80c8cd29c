import CKVM
import Glibc
import VMMSys

/// Saving and restoring the VM-wide KVM state: irqchip, PIT and kvmclock.
///
/// The whole sequence for a snapshot:
/// 1. stop every vCPU thread outside KVM_RUN, then call `VCPU.completePendingExit()` on each;
/// 2. `VirtualMachine.saveState()` and `VCPU.saveState()` for each vCPU (and copy guest memory).
///
/// And to restore, into a new VM that has its memory, irqchip (`createIRQChip()`) and PIT
/// (`createPIT2()`) and fresh vCPUs:
/// 1. `VCPU.restoreState(_:)` for each vCPU;
/// 2. `VirtualMachine.restoreState(_:)` last, as QEMU does: the kvmclock counts on from the moment
///    it is set, so setting it just before the guest resumes keeps the gap smallest, and the IOAPIC
///    rebuilds its RTC EOI tracking from the local APICs already restored.
extension VirtualMachine {
    /// KVM_CHECK_EXTENSION on the VM fd (some capabilities, such as KVM_CAP_XSAVE2, are answered per
    /// VM); falls back to the system fd on kernels without KVM_CAP_CHECK_EXTENSION_VM.
    public func check(_ capability: Int32) -> Int32 {
        if system.check(CKVM_CAP_CHECK_EXTENSION_VM) > 0 {
            return (try? fd.ioctl(CKVM_CHECK_EXTENSION, value: UInt(capability), name: "KVM_CHECK_EXTENSION (VM)")) ?? 0
        }
        return system.check(capability)
    }

    /// The size of a vCPU's XSAVE area as KVM_GET_XSAVE2 and KVM_SET_XSAVE transfer it: the value
    /// of KVM_CAP_XSAVE2, or 4096 (struct kvm_xsave) when KVM does not report one.
    public var xsaveSize: Int {
        max(Int(check(CKVM_CAP_XSAVE2)), Int(ckvm_xsave_size()))
    }

    /// Whether KVM can run a vCPU's TSC at a rate other than the host's (KVM_CAP_TSC_CONTROL).
    public var canScaleTSC: Bool { check(CKVM_CAP_TSC_CONTROL) > 0 }

    /// Reads the irqchip, PIT and kvmclock state. The VM must have its in-kernel irqchip and PIT2.
    public func saveState() throws(KVMError) -> VMState {
        try system.requireStateCapabilities()
        var state = VMState()
        var master = try getIRQChip(UInt32(KVM_IRQCHIP_PIC_MASTER), name: "PIC master")
        state.picMaster = withUnsafeMutablePointer(to: &master) { VMState.PICState(ckvm_irqchip_pic($0).pointee) }
        var slave = try getIRQChip(UInt32(KVM_IRQCHIP_PIC_SLAVE), name: "PIC slave")
        state.picSlave = withUnsafeMutablePointer(to: &slave) { VMState.PICState(ckvm_irqchip_pic($0).pointee) }
        var ioapic = try getIRQChip(UInt32(KVM_IRQCHIP_IOAPIC), name: "IOAPIC")
        state.ioapic = withUnsafeMutablePointer(to: &ioapic) { VMState.IOAPICState(ckvm_irqchip_ioapic($0)) }

        var pit = kvm_pit_state2()
        do { _ = try fd.ioctl(CKVM_GET_PIT2, &pit, name: "KVM_GET_PIT2 (does the VM have its in-kernel PIT?)") } catch { throw .ioctl(error) }
        state.pit = VMState.PITState(pit)

        var clock = kvm_clock_data()
        do { _ = try fd.ioctl(CKVM_GET_CLOCK, &clock, name: "KVM_GET_CLOCK") } catch { throw .ioctl(error) }
        state.clock = VMState.ClockState(clock: clock.clock, flags: clock.flags, realtime: clock.realtime, hostTSC: clock.host_tsc)
        state.savedRealtime = realtimeNanoseconds()
        return state
    }

    /// Writes the irqchip, PIT and kvmclock state (restore vCPUs first; see above).
    ///
    /// The clock is set to the saved value with flags 0: the guest's kvmclock continues from where it
    /// was saved, not advanced by the time the snapshot spent on disk (KVM_CLOCK_REALTIME would add
    /// the host wall-clock time since the save, which suits live migration, not a snapshot resumed
    /// days later — the guest's NTP or a host-side notice fixes its wall clock instead). The PIT
    /// channels are reloaded at the time of the restore (KVM ignores `countLoadTime`).
    ///
    /// `advance`: nanoseconds added to the saved kvmclock (`--clock host`: the time the snapshot
    /// spent on disk, so that the guest's wall clock, which is its boot time plus kvmclock, reads the
    /// host's time again; its monotonic clock then jumps by as much).
    public func restoreState(_ state: VMState, advance: UInt64 = 0) throws(KVMError) {
        try system.requireStateCapabilities()
        guard state.ioapic.redirectionTable.count == VMState.ioapicPins else {
            throw .invalidState("the IOAPIC has \(state.ioapic.redirectionTable.count) redirection entries, not \(VMState.ioapicPins)")
        }
        guard state.pit.channels.count == VMState.pitChannels else {
            throw .invalidState("the PIT has \(state.pit.channels.count) channels, not \(VMState.pitChannels)")
        }

        var master = kvm_irqchip()
        master.chip_id = UInt32(KVM_IRQCHIP_PIC_MASTER)
        withUnsafeMutablePointer(to: &master) { ckvm_irqchip_pic($0).pointee = state.picMaster.raw }
        try setIRQChip(&master, name: "PIC master")
        var slave = kvm_irqchip()
        slave.chip_id = UInt32(KVM_IRQCHIP_PIC_SLAVE)
        withUnsafeMutablePointer(to: &slave) { ckvm_irqchip_pic($0).pointee = state.picSlave.raw }
        try setIRQChip(&slave, name: "PIC slave")
        var ioapic = kvm_irqchip()
        ioapic.chip_id = UInt32(KVM_IRQCHIP_IOAPIC)
        withUnsafeMutablePointer(to: &ioapic) { state.ioapic.store(into: ckvm_irqchip_ioapic($0)) }
        try setIRQChip(&ioapic, name: "IOAPIC")

        var pit = state.pit.raw
        do { _ = try fd.ioctl(CKVM_SET_PIT2, &pit, name: "KVM_SET_PIT2 (does the VM have its in-kernel PIT?)") } catch { throw .ioctl(error) }

        var clock = kvm_clock_data()
        clock.clock = state.clock.clock &+ advance
        clock.flags = 0
        do { _ = try fd.ioctl(CKVM_SET_CLOCK, &clock, name: "KVM_SET_CLOCK") } catch { throw .ioctl(error) }
    }

    private func getIRQChip(_ id: UInt32, name: String) throws(KVMError) -> kvm_irqchip {
        var chip = kvm_irqchip()
        chip.chip_id = id
        do {
            _ = try fd.ioctl(CKVM_GET_IRQCHIP, &chip, name: "KVM_GET_IRQCHIP \(name) (does the VM have its in-kernel irqchip?)")
        } catch { throw .ioctl(error) }
        return chip
    }

    private func setIRQChip(_ chip: inout kvm_irqchip, name: String) throws(KVMError) {
        do {
            _ = try fd.ioctl(CKVM_SET_IRQCHIP, &chip, name: "KVM_SET_IRQCHIP \(name) (does the VM have its in-kernel irqchip?)")
        } catch { throw .ioctl(error) }
    }
}

// MARK: - Conversions from and to the kernel structures

extension VMState.PICState {
    init(_ p: kvm_pic_state) {
        self.init()
        lastIRR = p.last_irr
        irr = p.irr
        imr = p.imr
        isr = p.isr
        priorityAdd = p.priority_add
        irqBase = p.irq_base
        readRegisterSelect = p.read_reg_select != 0
        poll = p.poll != 0
        specialMask = p.special_mask != 0
        initState = p.init_state
        autoEOI = p.auto_eoi != 0
        rotateOnAutoEOI = p.rotate_on_auto_eoi != 0
        specialFullyNestedMode = p.special_fully_nested_mode != 0
        init4 = p.init4 != 0
        elcr = p.elcr
        elcrMask = p.elcr_mask
    }

    var raw: kvm_pic_state {
        var p = kvm_pic_state()
        p.last_irr = lastIRR
        p.irr = irr
        p.imr = imr
        p.isr = isr
        p.priority_add = priorityAdd
        p.irq_base = irqBase
        p.read_reg_select = readRegisterSelect ? 1 : 0
        p.poll = poll ? 1 : 0
        p.special_mask = specialMask ? 1 : 0
        p.init_state = initState
        p.auto_eoi = autoEOI ? 1 : 0
        p.rotate_on_auto_eoi = rotateOnAutoEOI ? 1 : 0
        p.special_fully_nested_mode = specialFullyNestedMode ? 1 : 0
        p.init4 = init4 ? 1 : 0
        p.elcr = elcr
        p.elcr_mask = elcrMask
        return p
    }
}

extension VMState.IOAPICState {
    init(_ s: UnsafePointer<kvm_ioapic_state>) {
        self.init()
        baseAddress = s.pointee.base_address
        ioregsel = s.pointee.ioregsel
        id = s.pointee.id
        irr = s.pointee.irr
        redirectionTable = (0..<ckvm_ioapic_pins()).map { ckvm_ioapic_redirection(s, $0) }
    }

    /// Fills `s` (the caller checked the table has `VMState.ioapicPins` entries).
    func store(into s: UnsafeMutablePointer<kvm_ioapic_state>) {
        s.pointee.base_address = baseAddress
        s.pointee.ioregsel = ioregsel
        s.pointee.id = id
        s.pointee.irr = irr
        s.pointee.pad = 0
        for (i, e) in redirectionTable.prefix(Int(ckvm_ioapic_pins())).enumerated() {
            ckvm_ioapic_set_redirection(s, UInt32(i), e)
        }
    }
}

extension VMState.PITChannel {
    init(_ c: kvm_pit_channel_state) {
        self.init()
        count = c.count
        latchedCount = c.latched_count
        countLatched = c.count_latched
        statusLatched = c.status_latched != 0
        status = c.status
        readState = c.read_state
        writeState = c.write_state
        writeLatch = c.write_latch
        rwMode = c.rw_mode
        mode = c.mode
        bcd = c.bcd != 0
        gate = c.gate != 0
        countLoadTime = c.count_load_time
    }

    var raw: kvm_pit_channel_state {
        var c = kvm_pit_channel_state()
        c.count = count
        c.latched_count = latchedCount
        c.count_latched = countLatched
        c.status_latched = statusLatched ? 1 : 0
        c.status = status
        c.read_state = readState
        c.write_state = writeState
        c.write_latch = writeLatch
        c.rw_mode = rwMode
        c.mode = mode
        c.bcd = bcd ? 1 : 0
        c.gate = gate ? 1 : 0
        c.count_load_time = countLoadTime
        return c
    }
}

extension VMState.PITState {
    init(_ s: kvm_pit_state2) {
        self.init()
        channels = [VMState.PITChannel(s.channels.0), VMState.PITChannel(s.channels.1), VMState.PITChannel(s.channels.2)]
        flags = s.flags
    }

    /// The kernel structure (the caller checked there are `VMState.pitChannels` channels).
    var raw: kvm_pit_state2 {
        var s = kvm_pit_state2()
        s.channels = (channels[0].raw, channels[1].raw, channels[2].raw)
        s.flags = flags
        return s
    }
}

extension VMState.ClockState {
    init(clock: UInt64, flags: UInt32, realtime: UInt64, hostTSC: UInt64) {
        self.init()
        self.clock = clock
        self.flags = flags
        self.realtime = realtime
        self.hostTSC = hostTSC
    }
}
