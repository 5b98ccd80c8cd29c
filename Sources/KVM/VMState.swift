import WireFormat

/// The VM-wide KVM state: the in-kernel irqchip (two 8259 PICs and the IOAPIC), the i8254 PIT and
/// the kvmclock, in Swift types of our own with an explicit little-endian encoding (for snapshots).
///
/// `encode(to:)` does not write `version`: the container records it and passes it back to
/// `init(from:version:)`.
public struct VMState: Equatable, Sendable {
    /// The layout `encode(to:)` writes.
    public static let version: UInt16 = 2
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
    /// The vCPUs' TSC rate in kHz when saved (0: not recorded, a layout-1 snapshot).
    public var tscKHz: UInt32 = 0
    /// The host's CLOCK_REALTIME in ns when the clock was read (0: not recorded, layout 1): what
    /// `--clock host` counts the time the snapshot spent on disk from.
    public var savedRealtime: UInt64 = 0

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
    /// - layout 2 appends: tsc_khz u32, saved_realtime u64 (host CLOCK_REALTIME ns at the save)
    ///
    /// Booleans are one byte, 0 or 1.
    public func encode(to w: inout LEWriter) {
        var s = self
        w.encode { c throws(LEDecodeError) in try s.code(&c, version: Self.version) }
    }

    /// Reads what `encode(to:)` wrote for layout `version`, validating counts and booleans. Errors
    /// name the field ("vm.pit.channels[1].count").
    public init(from r: inout LEReader, version: UInt16) throws(LEDecodeError) {
        guard (1...Self.version).contains(version) else {
            throw .invalid(field: "vm version", reason: "layout version \(version) is not supported (this build reads versions 1 to \(Self.version))")
        }
        var s = VMState()
        try r.decode { c throws(LEDecodeError) in try s.code(&c, version: version) }
        self = s
    }

    /// The layout above, for both directions: `encode(to:)` and `init(from:version:)` run it.
    public mutating func code<C: LECoder>(_ c: inout C, version: UInt16) throws(LEDecodeError) {
        try picMaster.code(&c, field: "vm.pic.master")
        try picSlave.code(&c, field: "vm.pic.slave")
        try ioapic.code(&c, field: "vm.ioapic")
        try pit.code(&c, field: "vm.pit")
        try clock.code(&c, field: "vm.clock")
        if version >= 2 {
            try c.u32(&tscKHz, "vm.tsc_khz")
            try c.u64(&savedRealtime, "vm.saved_realtime")
        }
    }
}

extension VMState.PICState: LECodedMember {
    public mutating func code<C: LECoder>(_ c: inout C, field p: @autoclosure () -> String) throws(LEDecodeError) {
        try c.u8(&lastIRR, p() + ".last_irr")
        try c.u8(&irr, p() + ".irr")
        try c.u8(&imr, p() + ".imr")
        try c.u8(&isr, p() + ".isr")
        try c.u8(&priorityAdd, p() + ".priority_add")
        try c.u8(&irqBase, p() + ".irq_base")
        try c.bool(&readRegisterSelect, p() + ".read_reg_select")
        try c.bool(&poll, p() + ".poll")
        try c.bool(&specialMask, p() + ".special_mask")
        try c.u8(&initState, p() + ".init_state")
        try c.bool(&autoEOI, p() + ".auto_eoi")
        try c.bool(&rotateOnAutoEOI, p() + ".rotate_on_auto_eoi")
        try c.bool(&specialFullyNestedMode, p() + ".special_fully_nested_mode")
        try c.bool(&init4, p() + ".init4")
        try c.u8(&elcr, p() + ".elcr")
        try c.u8(&elcrMask, p() + ".elcr_mask")
    }
}

extension VMState.IOAPICState: LECodedMember {
    public mutating func code<C: LECoder>(_ c: inout C, field p: @autoclosure () -> String) throws(LEDecodeError) {
        try c.u64(&baseAddress, p() + ".base_address")
        try c.u32(&ioregsel, p() + ".ioregsel")
        try c.u32(&id, p() + ".id")
        try c.u32(&irr, p() + ".irr")
        try c.array(&redirectionTable, exactly: VMState.ioapicPins, p() + ".redirtbl count", blank: { 0 }) {
            c, e, i throws(LEDecodeError) in
            try c.u64(&e, p() + ".redirtbl[\(i)]")
        }
    }
}

extension VMState.PITChannel: LECodedMember {
    public mutating func code<C: LECoder>(_ c: inout C, field p: @autoclosure () -> String) throws(LEDecodeError) {
        try c.u32(&count, p() + ".count")
        try c.require(count <= VMState.maxPITCount, p() + ".count", "\(count) is over 65536")
        try c.u16(&latchedCount, p() + ".latched_count")
        try c.u8(&countLatched, p() + ".count_latched")
        try c.bool(&statusLatched, p() + ".status_latched")
        try c.u8(&status, p() + ".status")
        try c.u8(&readState, p() + ".read_state")
        try c.u8(&writeState, p() + ".write_state")
        try c.u8(&writeLatch, p() + ".write_latch")
        try c.u8(&rwMode, p() + ".rw_mode")
        try c.u8(&mode, p() + ".mode")
        try c.bool(&bcd, p() + ".bcd")
        try c.bool(&gate, p() + ".gate")
        try c.i64(&countLoadTime, p() + ".count_load_time")
    }
}

extension VMState.PITState: LECodedMember {
    public mutating func code<C: LECoder>(_ c: inout C, field p: @autoclosure () -> String) throws(LEDecodeError) {
        try c.array(&channels, exactly: VMState.pitChannels, p() + ".channels count", blank: { VMState.PITChannel() }) {
            c, channel, i throws(LEDecodeError) in
            try channel.code(&c, field: p() + ".channels[\(i)]")
        }
        try c.u32(&flags, p() + ".flags")
    }
}

extension VMState.ClockState: LECodedMember {
    public mutating func code<C: LECoder>(_ c: inout C, field p: @autoclosure () -> String) throws(LEDecodeError) {
        try c.u64(&clock, p() + ".clock")
        try c.u32(&flags, p() + ".flags")
        try c.u64(&realtime, p() + ".realtime")
        try c.u64(&hostTSC, p() + ".host_tsc")
    }
}
