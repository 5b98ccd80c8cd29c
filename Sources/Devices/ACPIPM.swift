import ACPI
import Synchronization
import VMMCore
import WireFormat

/// The ACPI fixed hardware of a full (not hardware-reduced) PC platform: the PM1a event and control
/// blocks, the PM timer, GPE0 and the reset register, with the SCI they raise.
///
/// One model owns all the state; each register block is a `Block` view that the machine inserts at the
/// I/O port the FADT names. The SCI is level-triggered: its line is high while an enabled PM1 status
/// bit (TMR, GBL, PWRBTN, SLPBTN, RTC) or an enabled GPE status bit is set, and it is driven only
/// when that level changes. Power-off, reset and unsupported sleep requests go to injected closures,
/// which are called after the state lock is released, so they may call back into the model.
/// `InterruptLine.setLevel` and `now` are called with the lock held, so that level changes and timer
/// readings keep their order across vCPUs; neither may call back into the model.
///
/// A GPE the host raises (`raiseGPE`) is remembered, with the time of the raise and a caller's tag,
/// until the guest clears its status bit (writes 1 to it while it is set): that clear is the guest's
/// acknowledgement, reported to the GPE's `onGuestAcknowledgement` handler after the lock is released
/// (a guest's write of 1 to a status bit that is not set acknowledges nothing).
public final class ACPIPowerManagement: Sendable {
    // MARK: Register layout, for the FADT and the DSDT.

    /// PM1_EVT_LEN: PM1_STS (16 bits) then PM1_EN (16 bits).
    public static let pm1EventLength = 4
    /// PM1_CNT_LEN.
    public static let pm1ControlLength = 2
    /// PM_TMR_LEN. The counter is 32 bits wide: the FADT must set TMR_VAL_EXT (flags bit 8).
    public static let pmTimerLength = 4
    /// The reset register is one byte (RESET_REG bit width 8).
    public static let resetRegisterLength = 1
    /// The PM timer's rate in Hz.
    public static let pmTimerFrequency: UInt64 = 3_579_545

    /// PM1_STS bits (write 1 to clear).
    public static let timerStatus: UInt16 = 1 << 0
    public static let busMasterStatus: UInt16 = 1 << 4
    public static let globalStatus: UInt16 = 1 << 5
    public static let pwrbtnStatus: UInt16 = 1 << 8
    public static let slpbtnStatus: UInt16 = 1 << 9
    public static let rtcStatus: UInt16 = 1 << 10
    public static let pciexpWakeStatus: UInt16 = 1 << 14
    public static let wakeStatus: UInt16 = 1 << 15
    /// Every PM1_STS bit: what Linux writes to clear them all (0xC731).
    public static let fixedStatusMask: UInt16 = timerStatus | busMasterStatus | globalStatus | pwrbtnStatus
        | slpbtnStatus | rtcStatus | pciexpWakeStatus | wakeStatus
    /// The PM1_STS bits that raise the SCI while their PM1_EN bit is set (0x0721).
    public static let sciStatusMask: UInt16 = timerStatus | globalStatus | pwrbtnStatus | slpbtnStatus | rtcStatus

    /// PM1_EN bits.
    public static let timerEnable: UInt16 = 1 << 0
    public static let globalEnable: UInt16 = 1 << 5
    public static let pwrbtnEnable: UInt16 = 1 << 8
    public static let slpbtnEnable: UInt16 = 1 << 9
    public static let rtcEnable: UInt16 = 1 << 10
    public static let pciexpWakeDisable: UInt16 = 1 << 14
    /// Every PM1_EN bit; the others read 0 (0x4721).
    public static let fixedEnableMask: UInt16 = timerEnable | globalEnable | pwrbtnEnable | slpbtnEnable
        | rtcEnable | pciexpWakeDisable

    /// PM1_CNT bits. SCI_EN always reads 1; GBL_RLS and SLP_EN are write-only.
    public static let sciEnable: UInt16 = 1 << 0
    public static let busMasterReload: UInt16 = 1 << 1
    public static let globalRelease: UInt16 = 1 << 2
    public static let slpTypShift = 10
    public static let slpTypMask: UInt16 = 7 << 10
    public static let slpEnable: UInt16 = 1 << 13
    /// The PM1_CNT bits that keep what is written: BM_RLD, reserved bit 9 and SLP_TYP.
    public static let controlStoredMask: UInt16 = busMasterReload | 1 << 9 | slpTypMask

    /// Reset register bit 2 ("reset CPU"): writing it resets the machine; it never reads back.
    public static let resetCPU: UInt8 = 0x04
    /// The RESET_VALUE to advertise in the FADT (a full reset, like QEMU's q35).
    public static let resetValue: UInt8 = 0x0F

    // MARK: State

    /// Everything a snapshot must carry.
    ///
    /// Snapshot payload, version 1 (little-endian):
    ///
    ///     u16 PM1_STS (bits of `fixedStatusMask` only)
    ///     u16 PM1_EN (bits of `fixedEnableMask` only)
    ///     u16 PM1_CNT stored bits (`controlStoredMask` only; SCI_EN is implied)
    ///     u8  reset register (never with `resetCPU`)
    ///     u32 PM timer value (TMR_VAL) at the save; a restore continues counting from it
    ///     u32 GPE register length n (must be this machine's `gpeBlockLength / 2`)
    ///     n bytes GPE0_STS, then n bytes GPE0_EN
    public struct State: Codable, Equatable, Sendable {
        public static let version = 1
        /// PM1_STS (only bits of `fixedStatusMask`).
        public var pm1Status: UInt16 = 0
        /// PM1_EN (only bits of `fixedEnableMask`).
        public var pm1Enable: UInt16 = 0
        /// The stored PM1_CNT bits (`controlStoredMask`); SCI_EN is implied.
        public var pm1Control: UInt16 = 0
        /// GPE0_STS, `gpeBlockLength / 2` bytes.
        public var gpeStatus: [UInt8]
        /// GPE0_EN, `gpeBlockLength / 2` bytes.
        public var gpeEnable: [UInt8]
        /// The reset register as it reads (never with `resetCPU` set).
        public var resetControl: UInt8 = 0
        /// The PM timer's value (TMR_VAL) when the state was saved; a restore continues from it.
        public var pmTimer: UInt32 = 0

        init(gpeBlockLength: Int) {
            gpeStatus = [UInt8](repeating: 0, count: gpeBlockLength / 2)
            gpeEnable = gpeStatus
        }

        /// The level the SCI must have.
        var sciPending: Bool {
            pm1Status & pm1Enable & ACPIPowerManagement.sciStatusMask != 0
                || zip(gpeStatus, gpeEnable).contains { $0 & $1 != 0 }
        }
    }

    /// The register blocks, each a `Block` bus device.
    public enum BlockKind: Sendable {
        case pm1Event, pm1Control, pmTimer, gpe0, resetRegister
    }

    /// One register block as a bus device, to insert at its I/O port with `length` bytes.
    /// Accesses of any size at any offset are split into bytes; bytes past the block read 0xFF and
    /// ignore writes.
    public final class Block: BusDevice {
        public let kind: BlockKind
        let model: ACPIPowerManagement

        init(_ model: ACPIPowerManagement, _ kind: BlockKind) {
            self.model = model
            self.kind = kind
        }

        /// The block's size in bytes: its FADT length and its bus range.
        public var length: Int { model.length(of: kind) }

        public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
            model.read(kind, offset: offset, data: data)
        }

        public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
            model.write(kind, offset: offset, data: data)
        }
    }

    /// What a write asks of the machine, acted on after the lock is released.
    private enum Effect {
        case none, powerOff, reset, unsupportedSleep(UInt8)
    }

    /// The guest cleared the status bit of a GPE the host raised: which GPE, the tag of the raise
    /// (the largest tag among the raises since the guest last cleared it; 0 when the raiser gave
    /// none) and the time from the latest of those raises to the clear.
    public struct GPEAcknowledgement: Sendable, Equatable {
        public var gpe: Int
        public var tag: UInt64
        public var latencyNanoseconds: UInt64
        public init(gpe: Int, tag: UInt64, latencyNanoseconds: UInt64) {
            self.gpe = gpe
            self.tag = tag
            self.latencyNanoseconds = latencyNanoseconds
        }
    }

    /// A host raise of a GPE that the guest has not cleared yet.
    private struct Raise {
        var tag: UInt64
        /// `now()` at the raise.
        var at: UInt64
    }

    private struct Live {
        /// The registers; `pmTimer` is the timer's value at `timerEpoch`.
        var registers: State
        var timerEpoch: UInt64
        /// The level last driven on the SCI line.
        var sciLevel = false
        /// The GPEs the host raised whose status bit the guest has not cleared since (runtime only:
        /// not in a snapshot; a restore starts with none).
        var raises: [Int: Raise] = [:]

        func timerValue(at now: UInt64) -> UInt32 {
            let elapsed = now >= timerEpoch ? now - timerEpoch : 0
            // elapsed · f / 10⁹ in 128 bits; the quotient is below `elapsed`, so it fits in 64.
            let ticks = UInt64(1_000_000_000).dividingFullWidth(
                elapsed.multipliedFullWidth(by: ACPIPowerManagement.pmTimerFrequency)).quotient
            return UInt32(truncatingIfNeeded: UInt64(registers.pmTimer) &+ ticks)
        }
    }

    /// GPE0_BLK_LEN: GPE0_STS then GPE0_EN, each half as long.
    public let gpeBlockLength: Int
    /// The SLP_TYP value of `\_S5`: a write of it with SLP_EN powers the machine off.
    public let s5SleepType: UInt8
    private let live: Mutex<Live>
    private let sci: any InterruptLine
    private let now: @Sendable () -> UInt64
    private let onPowerOff: @Sendable () -> Void
    private let onReset: @Sendable () -> Void
    private let onUnsupportedSleep: @Sendable (UInt8) -> Void
    /// Per GPE, who hears of the guest's acknowledgements (`onGuestAcknowledgement`).
    private let acknowledgementHandlers = Mutex<[Int: @Sendable (GPEAcknowledgement) -> Void]>([:])

    /// Where the machine puts the register blocks (the FADT points the guest at the same ports).
    public struct Placement: Sendable {
        public var pm1aEvent: UInt64
        public var pm1aControl: UInt64
        public var pmTimer: UInt64
        public var gpe0: UInt64
        public var resetRegister: UInt64
        public init(pm1aEvent: UInt64, pm1aControl: UInt64, pmTimer: UInt64, gpe0: UInt64, resetRegister: UInt64) {
            self.pm1aEvent = pm1aEvent
            self.pm1aControl = pm1aControl
            self.pmTimer = pmTimer
            self.gpe0 = gpe0
            self.resetRegister = resetRegister
        }
    }
    /// Nil for registers on no bus (unit tests).
    public let placement: Placement?

    /// - Parameters:
    ///   - gpeBlockLength: GPE0_BLK_LEN, even, 2...254.
    ///   - s5SleepType: SLP_TYPa of `\_S5`, 0...7.
    ///   - sci: the SCI line (the machine's IRQ 9, level-triggered, active high).
    ///   - now: a monotonic clock in nanoseconds; the PM timer counts from its value at creation.
    ///   - onPowerOff: called when the guest enters S5.
    ///   - onReset: called when the guest writes the reset register with `resetCPU` set.
    ///   - onUnsupportedSleep: called with SLP_TYP when the guest asks for any other sleep state,
    ///     which is otherwise ignored.
    public init(
        gpeBlockLength: Int = 4,
        s5SleepType: UInt8 = 5,
        sci: any InterruptLine,
        now: @escaping @Sendable () -> UInt64,
        onPowerOff: @escaping @Sendable () -> Void,
        onReset: @escaping @Sendable () -> Void,
        onUnsupportedSleep: @escaping @Sendable (UInt8) -> Void = { _ in },
        placement: Placement? = nil
    ) {
        precondition((2...254).contains(gpeBlockLength) && gpeBlockLength % 2 == 0,
                     "GPE0_BLK_LEN must be even and between 2 and 254, not \(gpeBlockLength)")
        precondition(s5SleepType <= 7, "SLP_TYP is 3 bits, not \(s5SleepType)")
        self.gpeBlockLength = gpeBlockLength
        self.s5SleepType = s5SleepType
        self.sci = sci
        self.now = now
        self.onPowerOff = onPowerOff
        self.onReset = onReset
        self.onUnsupportedSleep = onUnsupportedSleep
        self.placement = placement
        live = Mutex(Live(registers: State(gpeBlockLength: gpeBlockLength), timerEpoch: now()))
    }

    // MARK: Bus views

    /// PM1a_EVT_BLK: PM1_STS at +0, PM1_EN at +2.
    public var pm1Event: Block { Block(self, .pm1Event) }
    /// PM1a_CNT_BLK.
    public var pm1Control: Block { Block(self, .pm1Control) }
    /// PM_TMR_BLK (read-only).
    public var pmTimer: Block { Block(self, .pmTimer) }
    /// GPE0_BLK: GPE0_STS bytes, then GPE0_EN bytes.
    public var gpe0: Block { Block(self, .gpe0) }
    /// The reset register (the machine puts it at port 0xCF9).
    public var resetRegister: Block { Block(self, .resetRegister) }

    // MARK: Host side

    /// The number of GPEs: 0 ..< gpeCount can be raised.
    public var gpeCount: Int { gpeBlockLength / 2 * 8 }

    /// Sets GPE0_STS bit `n`, asserting the SCI if the GPE is enabled. Returns false (and does
    /// nothing) if there is no such GPE.
    ///
    /// The raise is remembered until the guest clears the bit, which then reports a
    /// `GPEAcknowledgement` with `tag` to the GPE's `onGuestAcknowledgement` handler. Raises while the
    /// bit is still set fold into one acknowledgement: it carries the largest tag, and its latency
    /// counts from the latest raise.
    @discardableResult
    public func raiseGPE(_ n: Int, tag: UInt64 = 0) -> Bool {
        guard (0..<gpeCount).contains(n) else { return false }
        live.withLock { live in
            let at = now()
            live.registers.gpeStatus[n / 8] |= 1 << (n % 8)
            live.raises[n] = Raise(tag: max(live.raises[n]?.tag ?? 0, tag), at: at)
            drive(&live, always: false)
        }
        return true
    }

    /// Sets (or, with nil, removes) who hears of the guest clearing GPE `n`'s status bit after a
    /// host raise. The handler runs on the thread of the guest's write (a vCPU thread), after the
    /// model's lock is released: it must not block or do host I/O, only record and hand on.
    public func onGuestAcknowledgement(gpe n: Int, _ handler: (@Sendable (GPEAcknowledgement) -> Void)?) {
        acknowledgementHandlers.withLock { $0[n] = handler }
    }

    /// Presses the fixed power button: sets PWRBTN_STS, asserting the SCI if PWRBTN_EN is set.
    public func pressPowerButton() {
        update { $0.pm1Status |= Self.pwrbtnStatus }
    }

    /// PM1_STS.
    public var pm1Status: UInt16 { live.withLock { $0.registers.pm1Status } }
    /// PM1_EN.
    public var pm1Enable: UInt16 { live.withLock { $0.registers.pm1Enable } }
    /// GPE0_STS byte `byte` (GPEs 8·byte ... 8·byte+7); 0 if there is no such byte.
    public func gpeStatus(byte: Int) -> UInt8 { live.withLock { $0.registers.gpeStatus[safe: byte] } }
    /// GPE0_EN byte `byte`; 0 if there is no such byte.
    public func gpeEnable(byte: Int) -> UInt8 { live.withLock { $0.registers.gpeEnable[safe: byte] } }
    /// The level last driven on the SCI line.
    public var sciLevel: Bool { live.withLock { $0.sciLevel } }

    // MARK: Snapshots

    /// The registers, with the PM timer's current value.
    public func saveState() -> State {
        live.withLock { live in
            var s = live.registers
            s.pmTimer = live.timerValue(at: now())
            return s
        }
    }

    /// Replaces the registers with a saved state after checking that this machine's hardware could
    /// hold it (nothing changes on error). The PM timer continues from the saved value. The SCI is
    /// left alone: `redriveInterrupt()` drives it to the restored level once the interrupt controller
    /// is back.
    public func restoreState(_ s: State) throws(LEDecodeError) {
        let half = gpeBlockLength / 2
        guard s.gpeStatus.count == half else {
            throw Self.invalid("GPE0_STS", "\(s.gpeStatus.count) bytes, this machine's GPE0 block has \(half) per register")
        }
        guard s.gpeEnable.count == half else {
            throw Self.invalid("GPE0_EN", "\(s.gpeEnable.count) bytes, this machine's GPE0 block has \(half) per register")
        }
        func bits(_ value: UInt16, _ allowed: UInt16, _ register: String) throws(LEDecodeError) {
            guard value & ~allowed == 0 else {
                throw Self.invalid(register, "\(hex(value)) has bits \(hex(value & ~allowed)), which the hardware cannot hold")
            }
        }
        try bits(s.pm1Status, Self.fixedStatusMask, "PM1_STS")
        try bits(s.pm1Enable, Self.fixedEnableMask, "PM1_EN")
        try bits(s.pm1Control, Self.controlStoredMask, "PM1_CNT")
        try bits(UInt16(s.resetControl), UInt16(~Self.resetCPU), "reset register")
        live.withLock { live in
            live.registers = s
            live.timerEpoch = now()
            live.raises = [:]
        }
    }

    /// Drives the SCI to the level the registers call for, whatever level it was last given (after
    /// a restore: see `PlatformDevice.afterRestore`).
    public func redriveInterrupt() {
        live.withLock { drive(&$0, always: true) }
    }

    // MARK: Guest accesses

    func length(of kind: BlockKind) -> Int {
        switch kind {
        case .pm1Event: Self.pm1EventLength
        case .pm1Control: Self.pm1ControlLength
        case .pmTimer: Self.pmTimerLength
        case .gpe0: gpeBlockLength
        case .resetRegister: Self.resetRegisterLength
        }
    }

    /// Calls `body(byte in the block, byte in the access)` for each byte of an access that falls
    /// inside a block of `length` bytes.
    private static func forEachByte(offset: UInt64, count: Int, length: Int, _ body: (Int, Int) -> Void) {
        guard offset < UInt64(length) else { return }
        let start = Int(offset)
        for i in 0..<min(count, length - start) { body(start + i, i) }
    }

    func read(_ kind: BlockKind, offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        for i in data.indices { data[i] = 0xFF }
        let length = length(of: kind)
        live.withLock { live in
            let s = live.registers
            let half = gpeBlockLength / 2
            // The fixed-size blocks as one little-endian word; GPE0 is read byte by byte.
            let word: UInt32 = switch kind {
            case .pm1Event: UInt32(s.pm1Status) | UInt32(s.pm1Enable) << 16
            case .pm1Control: UInt32(s.pm1Control | Self.sciEnable)
            case .pmTimer: live.timerValue(at: now()) // under the lock: monotonic across vCPUs
            case .resetRegister: UInt32(s.resetControl)
            case .gpe0: 0
            }
            Self.forEachByte(offset: offset, count: data.count, length: length) { reg, i in
                if kind == .gpe0 {
                    data[i] = reg < half ? s.gpeStatus[reg] : s.gpeEnable[reg - half]
                } else {
                    data[i] = UInt8(truncatingIfNeeded: word >> (8 * reg))
                }
            }
        }
    }

    func write(_ kind: BlockKind, offset: UInt64, data: UnsafeRawBufferPointer) {
        let length = length(of: kind)
        var acknowledged: [GPEAcknowledgement] = []
        let effect: Effect = live.withLock { live in
            var effect = Effect.none
            let half = gpeBlockLength / 2
            switch kind {
            case .pm1Event:
                Self.forEachByte(offset: offset, count: data.count, length: length) { reg, i in
                    let shift = UInt16(8 * (reg % 2))
                    let bits = UInt16(data[i]) << shift
                    if reg < 2 {
                        live.registers.pm1Status &= ~bits
                    } else {
                        let lane: UInt16 = 0xFF << shift
                        live.registers.pm1Enable = live.registers.pm1Enable & ~lane | bits & Self.fixedEnableMask
                    }
                }
            case .pm1Control:
                // Merge the written bytes into the register as it reads, then act on the whole value.
                var value = live.registers.pm1Control | Self.sciEnable
                var written = false
                Self.forEachByte(offset: offset, count: data.count, length: length) { reg, i in
                    let shift = UInt16(8 * reg)
                    value = value & ~(0xFF << shift) | UInt16(data[i]) << shift
                    written = true
                }
                if written { effect = writeControl(value, &live.registers) }
            case .gpe0:
                Self.forEachByte(offset: offset, count: data.count, length: length) { reg, i in
                    if reg < half {
                        let cleared = live.registers.gpeStatus[reg] & data[i]
                        live.registers.gpeStatus[reg] &= ~data[i]
                        for bit in 0..<8 where cleared & 1 << bit != 0 {
                            let n = reg * 8 + bit
                            guard let raise = live.raises.removeValue(forKey: n) else { continue }
                            let at = now()
                            acknowledged.append(GPEAcknowledgement(gpe: n, tag: raise.tag,
                                                                   latencyNanoseconds: at >= raise.at ? at - raise.at : 0))
                        }
                    } else {
                        live.registers.gpeEnable[reg - half] = data[i]
                    }
                }
            case .resetRegister:
                Self.forEachByte(offset: offset, count: data.count, length: length) { _, i in
                    live.registers.resetControl = data[i] & ~Self.resetCPU
                    if data[i] & Self.resetCPU != 0 { effect = .reset }
                }
            case .pmTimer:
                break // read-only
            }
            drive(&live, always: false)
            return effect
        }
        for ack in acknowledged {
            acknowledgementHandlers.withLock { $0[ack.gpe] }?(ack)
        }
        switch effect {
        case .none: break
        case .powerOff: onPowerOff()
        case .reset: onReset()
        case .unsupportedSleep(let type): onUnsupportedSleep(type)
        }
    }

    /// A whole-register write of PM1_CNT: keeps the stored bits and handles SLP_EN.
    private func writeControl(_ value: UInt16, _ s: inout State) -> Effect {
        s.pm1Control = value & Self.controlStoredMask
        guard value & Self.slpEnable != 0 else { return .none }
        let type = UInt8((value & Self.slpTypMask) >> Self.slpTypShift)
        return type == s5SleepType ? .powerOff : .unsupportedSleep(type)
    }

    /// Applies a host-side event and updates the SCI.
    private func update(_ body: (inout State) -> Void) {
        live.withLock { live in
            body(&live.registers)
            drive(&live, always: false)
        }
    }

    /// Drives the SCI line to the level the registers call for, if it changed (or `always`).
    private func drive(_ live: inout Live, always: Bool) {
        let level = live.registers.sciPending
        guard always || level != live.sciLevel else { return }
        live.sciLevel = level
        sci.setLevel(level)
    }
}

extension ACPIPowerManagement: SnapshotDevice {
    public static let snapshotName = "acpi"
    public static let snapshotVersion = UInt16(State.version)
    public static let oldestSnapshotVersion: UInt16 = 1

    public func saveSnapshot() -> [UInt8] {
        var s = saveState()
        var w = LEWriter(capacity: 15 + 2 * s.gpeStatus.count)
        w.encode { c throws(LEDecodeError) in try s.code(&c, version: Self.snapshotVersion, gpeRegisterLength: gpeBlockLength / 2) }
        return w.bytes
    }

    public func restoreSnapshot(_ payload: [UInt8], version: UInt16) throws(LEDecodeError) {
        let s = try Self.decodeSnapshot(payload, version: version) { r, v throws(LEDecodeError) in
            var s = State(gpeBlockLength: gpeBlockLength)
            try r.decode { c throws(LEDecodeError) in try s.code(&c, version: v, gpeRegisterLength: gpeBlockLength / 2) }
            return s
        }
        try restoreState(s)
    }
}

extension ACPIPowerManagement.State {
    /// The payload layout (see `State`), for both directions: `saveSnapshot` and `restoreSnapshot`
    /// run it. `half` is this machine's GPE register length (`gpeBlockLength / 2`), which the payload's
    /// must equal.
    public mutating func code<C: LECoder>(_ c: inout C, version: UInt16, gpeRegisterLength half: Int) throws(LEDecodeError) {
        try c.u16(&pm1Status, "acpi.PM1_STS")
        try c.u16(&pm1Enable, "acpi.PM1_EN")
        try c.u16(&pm1Control, "acpi.PM1_CNT")
        try c.u8(&resetControl, "acpi.reset register")
        try c.u32(&pmTimer, "acpi.PM_TMR")
        var length = UInt32(truncatingIfNeeded: gpeStatus.count)
        try c.u32(&length, "acpi.GPE0 length")
        try c.require(length == half, "acpi.GPE0 length", "\(length) bytes per register, this machine's GPE0 block has \(half)")
        try c.raw(&gpeStatus, count: half, "acpi.GPE0_STS")
        try c.raw(&gpeEnable, count: half, "acpi.GPE0_EN")
    }
}

extension Array where Element == UInt8 {
    fileprivate subscript(safe index: Int) -> UInt8 { indices.contains(index) ? self[index] : 0 }
}

extension ACPIPowerManagement: PlatformDevice {
    public var busRegions: [BusRegion] {
        guard let p = placement else { return [] }
        return [
            .pio("acpi-pm1a-evt", p.pm1aEvent, UInt64(Self.pm1EventLength), pm1Event),
            .pio("acpi-pm1a-cnt", p.pm1aControl, UInt64(Self.pm1ControlLength), pm1Control),
            .pio("acpi-pm-tmr", p.pmTimer, UInt64(Self.pmTimerLength), pmTimer),
            .pio("acpi-gpe0", p.gpe0, UInt64(gpeBlockLength), gpe0),
            .pio("reset-control", p.resetRegister, 1, resetRegister),
        ]
    }

    public var snapshotSection: (name: String, device: any SnapshotDevice)? { ("dev.acpi-pm", self) }

    /// A motherboard-resources device (PNP0C02) claiming the register blocks, so that no driver
    /// takes their ports. (The FADT describes the blocks themselves.)
    public var dsdtAML: [AML] {
        guard let p = placement else { return [] }
        return [.device("PMRS", [
            .name("_HID", .eisaID("PNP0C02")),
            .name("_UID", .integer(1)),
            .name("_CRS", .resourceTemplate([
                AML.Resource.ports(p.pm1aEvent, Self.pm1EventLength), AML.Resource.ports(p.pm1aControl, Self.pm1ControlLength),
                AML.Resource.ports(p.pmTimer, Self.pmTimerLength), AML.Resource.ports(p.gpe0, gpeBlockLength),
                AML.Resource.ports(p.resetRegister, 1),
            ])),
        ])]
    }

    // No device-tree node: these are ACPI's fixed-hardware registers, which only the FADT describes
    // and only an ACPI guest uses.

    public func afterRestore() { redriveInterrupt() }
}
