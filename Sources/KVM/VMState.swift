import WireFormat

/// The VM-wide KVM state: the in-kernel irqchip (two 8259 PICs and the IOAPIC), the i8254 PIT and
/// the kvmclock, in Swift types of our own with an explicit little-endian encoding (for snapshots).
///
/// `encode(to:)` does not write `version`: the container records it and passes it back to
/// `init(from:version:)`.
public struct VMState: Equatable, Sendable {
    /// The layout `encode(to:)` writes.
    public static let version: UInt16 = 1
    /// KVM_IOAPIC_NUM_PINS.
    public static let ioapicPins = 24
    /// The i8254 has three channels.
    public static let pitChannels = 3
    /// A PIT channel's count register is 16 bits, with 0 meaning 65536.
    public static let maxPITCount: UInt32 = 0x10000

    public var picMaster: PICState
    public var picSlave: PICState
    public var ioapic: IOAPICState
    public var pit: PITState
    public var clock: ClockState

    public init(picMaster: PICState = PICState(), picSlave: PICState = PICState(), ioapic: IOAPICState = IOAPICState(),
                pit: PITState = PITState(), clock: ClockState = ClockState()) {
        self.picMaster = picMaster
        self.picSlave = picSlave
        self.ioapic = ioapic
        self.pit = pit
        self.clock = clock
    }

    /// kvm_pic_state: one 8259.
    public struct PICState: Equatable, Sendable {
        public var lastIRR: UInt8 = 0
        public var irr: UInt8 = 0
        public var imr: UInt8 = 0
        public var isr: UInt8 = 0
        public var priorityAdd: UInt8 = 0
        public var irqBase: UInt8 = 0
        public var readRegisterSelect = false
        public var poll = false
        public var specialMask = false
        public var initState: UInt8 = 0
        public var autoEOI = false
        public var rotateOnAutoEOI = false
        public var specialFullyNestedMode = false
        public var init4 = false
        public var elcr: UInt8 = 0
        public var elcrMask: UInt8 = 0
        public init() {}
    }

    /// kvm_ioapic_state (the pad word is not kept).
    public struct IOAPICState: Equatable, Sendable {
        public var baseAddress: UInt64 = 0
        public var ioregsel: UInt32 = 0
        public var id: UInt32 = 0
        public var irr: UInt32 = 0
        /// The redirection table, each entry as its 64-bit register value: exactly `VMState.ioapicPins`.
        public var redirectionTable: [UInt64] = [UInt64](repeating: 0, count: VMState.ioapicPins)
        public init() {}
    }

    /// kvm_pit_channel_state.
    public struct PITChannel: Equatable, Sendable {
        /// 1…65536.
        public var count: UInt32 = 0
        public var latchedCount: UInt16 = 0
        public var countLatched: UInt8 = 0
        public var statusLatched = false
        public var status: UInt8 = 0
        public var readState: UInt8 = 0
        public var writeState: UInt8 = 0
        public var writeLatch: UInt8 = 0
        public var rwMode: UInt8 = 0
        /// 0-5, or 0xFF for a channel never programmed.
        public var mode: UInt8 = 0
        public var bcd = false
        public var gate = false
        /// Host monotonic time (ns) of the last count load. Saved for completeness; KVM_SET_PIT2
        /// ignores it and reloads each channel's count at the time of the restore.
        public var countLoadTime: Int64 = 0
        public init() {}
    }

    /// kvm_pit_state2 (the reserved words are not kept).
    public struct PITState: Equatable, Sendable {
        /// Exactly `VMState.pitChannels`.
        public var channels: [PITChannel] = [PITChannel](repeating: PITChannel(), count: VMState.pitChannels)
        /// KVM_PIT_FLAGS_* bits.
        public var flags: UInt32 = 0
        public init() {}
    }

    /// kvm_clock_data (padding not kept).
    public struct ClockState: Equatable, Sendable {
        /// The kvmclock value in ns.
        public var clock: UInt64 = 0
        /// KVM_CLOCK_* bits KVM reported with it (TSC_STABLE, REALTIME, HOST_TSC).
        public var flags: UInt32 = 0
        /// Host CLOCK_REALTIME (ns) at the read, valid with KVM_CLOCK_REALTIME.
        public var realtime: UInt64 = 0
        /// Host TSC at the read, valid with KVM_CLOCK_HOST_TSC.
        public var hostTSC: UInt64 = 0
        public init() {}
    }
}

// MARK: - Encoding

extension VMState {
    /// Writes the state, all integers little-endian, in this order (layout version 1):
    ///
    /// - pic master, pic slave: last_irr irr imr isr priority_add irq_base read_reg_select poll
    ///   special_mask init_state auto_eoi rotate_on_auto_eoi special_fully_nested_mode init4 elcr
    ///   elcr_mask (u8 each, 16 bytes)
    /// - ioapic: base_address u64, ioregsel u32, id u32, irr u32, u32 count = 24, redirection
    ///   entries u64 each
    /// - pit: u32 count = 3, channels (count u32, latched_count u16, count_latched u8,
    ///   status_latched u8, status u8, read_state u8, write_state u8, write_latch u8, rw_mode u8,
    ///   mode u8, bcd u8, gate u8, count_load_time i64), flags u32
    /// - clock: clock u64, flags u32, realtime u64, host_tsc u64
    ///
    /// Booleans are one byte, 0 or 1.
    public func encode(to w: inout LEWriter) {
        picMaster.encode(to: &w)
        picSlave.encode(to: &w)
        ioapic.encode(to: &w)
        pit.encode(to: &w)
        clock.encode(to: &w)
    }

    /// Reads what `encode(to:)` wrote for layout `version`, validating counts and booleans. Errors
    /// name the field ("vm.pit.channels[1].count").
    public init(from r: inout LEReader, version: UInt16) throws(LEDecodeError) {
        guard (1...Self.version).contains(version) else {
            throw .invalid(field: "vm version", reason: "layout version \(version) is not supported (this build reads versions 1 to \(Self.version))")
        }
        picMaster = try PICState(from: &r, field: "vm.pic.master")
        picSlave = try PICState(from: &r, field: "vm.pic.slave")
        ioapic = try IOAPICState(from: &r, field: "vm.ioapic")
        pit = try PITState(from: &r, field: "vm.pit")
        clock = try ClockState(from: &r, field: "vm.clock")
    }
}

extension VMState.PICState {
    public func encode(to w: inout LEWriter) {
        w.u8(lastIRR)
        w.u8(irr)
        w.u8(imr)
        w.u8(isr)
        w.u8(priorityAdd)
        w.u8(irqBase)
        w.bool(readRegisterSelect)
        w.bool(poll)
        w.bool(specialMask)
        w.u8(initState)
        w.bool(autoEOI)
        w.bool(rotateOnAutoEOI)
        w.bool(specialFullyNestedMode)
        w.bool(init4)
        w.u8(elcr)
        w.u8(elcrMask)
    }

    public init(from r: inout LEReader, field p: String) throws(LEDecodeError) {
        lastIRR = try r.u8(p + ".last_irr")
        irr = try r.u8(p + ".irr")
        imr = try r.u8(p + ".imr")
        isr = try r.u8(p + ".isr")
        priorityAdd = try r.u8(p + ".priority_add")
        irqBase = try r.u8(p + ".irq_base")
        readRegisterSelect = try r.bool(p + ".read_reg_select")
        poll = try r.bool(p + ".poll")
        specialMask = try r.bool(p + ".special_mask")
        initState = try r.u8(p + ".init_state")
        autoEOI = try r.bool(p + ".auto_eoi")
        rotateOnAutoEOI = try r.bool(p + ".rotate_on_auto_eoi")
        specialFullyNestedMode = try r.bool(p + ".special_fully_nested_mode")
        init4 = try r.bool(p + ".init4")
        elcr = try r.u8(p + ".elcr")
        elcrMask = try r.u8(p + ".elcr_mask")
    }
}

extension VMState.IOAPICState {
    public func encode(to w: inout LEWriter) {
        w.u64(baseAddress)
        w.u32(ioregsel)
        w.u32(id)
        w.u32(irr)
        w.u32(UInt32(truncatingIfNeeded: redirectionTable.count))
        for e in redirectionTable { w.u64(e) }
    }

    public init(from r: inout LEReader, field p: String) throws(LEDecodeError) {
        baseAddress = try r.u64(p + ".base_address")
        ioregsel = try r.u32(p + ".ioregsel")
        id = try r.u32(p + ".id")
        irr = try r.u32(p + ".irr")
        let n = Int(try r.u32(p + ".redirtbl count"))
        guard n == VMState.ioapicPins else {
            throw .invalid(field: p + ".redirtbl count", reason: "\(n) is not \(VMState.ioapicPins)")
        }
        redirectionTable = []
        for i in 0..<n { redirectionTable.append(try r.u64(p + ".redirtbl[\(i)]")) }
    }
}

extension VMState.PITChannel {
    public func encode(to w: inout LEWriter) {
        w.u32(count)
        w.u16(latchedCount)
        w.u8(countLatched)
        w.bool(statusLatched)
        w.u8(status)
        w.u8(readState)
        w.u8(writeState)
        w.u8(writeLatch)
        w.u8(rwMode)
        w.u8(mode)
        w.bool(bcd)
        w.bool(gate)
        w.i64(countLoadTime)
    }

    public init(from r: inout LEReader, field p: String) throws(LEDecodeError) {
        count = try r.u32(p + ".count")
        guard count <= VMState.maxPITCount else {
            throw .invalid(field: p + ".count", reason: "\(count) is over 65536")
        }
        latchedCount = try r.u16(p + ".latched_count")
        countLatched = try r.u8(p + ".count_latched")
        statusLatched = try r.bool(p + ".status_latched")
        status = try r.u8(p + ".status")
        readState = try r.u8(p + ".read_state")
        writeState = try r.u8(p + ".write_state")
        writeLatch = try r.u8(p + ".write_latch")
        rwMode = try r.u8(p + ".rw_mode")
        mode = try r.u8(p + ".mode")
        bcd = try r.bool(p + ".bcd")
        gate = try r.bool(p + ".gate")
        countLoadTime = try r.i64(p + ".count_load_time")
    }
}

extension VMState.PITState {
    public func encode(to w: inout LEWriter) {
        w.u32(UInt32(truncatingIfNeeded: channels.count))
        for c in channels { c.encode(to: &w) }
        w.u32(flags)
    }

    public init(from r: inout LEReader, field p: String) throws(LEDecodeError) {
        let n = Int(try r.u32(p + ".channels count"))
        guard n == VMState.pitChannels else {
            throw .invalid(field: p + ".channels count", reason: "\(n) is not \(VMState.pitChannels)")
        }
        channels = []
        for i in 0..<n { channels.append(try VMState.PITChannel(from: &r, field: p + ".channels[\(i)]")) }
        flags = try r.u32(p + ".flags")
    }
}

extension VMState.ClockState {
    public func encode(to w: inout LEWriter) {
        w.u64(clock)
        w.u32(flags)
        w.u64(realtime)
        w.u64(hostTSC)
    }

    public init(from r: inout LEReader, field p: String) throws(LEDecodeError) {
        clock = try r.u64(p + ".clock")
        flags = try r.u32(p + ".flags")
        realtime = try r.u64(p + ".realtime")
        hostTSC = try r.u64(p + ".host_tsc")
    }
}
