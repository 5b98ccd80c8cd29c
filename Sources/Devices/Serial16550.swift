import ACPI
import DeviceTree
import Synchronization
import VMMCore
import WireFormat

/// A 16550A UART (the PC's COM1 at 0x3F8, IRQ 4), enough for Linux's 8250 driver: THR/RBR, IER, IIR/FCR,
/// LCR, MCR (with loopback, which the driver's autoconfig uses), LSR, MSR, scratch and the divisor latch.
/// Transmitted bytes go to a `ConsoleOutput` at once; while it is not ready (its host reader is behind)
/// the transmitter reports busy (LSR THRE/TEMT clear, no THRE interrupt) until it is ready again.
/// Received bytes come from `enqueueInput`.
public final class Serial16550: BusDevice {
    /// The register file and FIFOs: everything a snapshot needs.
    ///
    /// Snapshot payload, version 1 (little-endian):
    ///
    ///     u8   IER (bits 0-3 only)        u8   LCR
    ///     u8   MCR (bits 0-4 only)        u8   SCR
    ///     u8   DLL                        u8   DLM
    ///     bool FIFOs enabled (FCR bit 0)  bool THRE interrupt pending (not yet acknowledged)
    ///     bool overrun (LSR.OE still to report)
    ///     u32  receive FIFO count (at most `inputCapacity`), then the bytes, oldest first
    public struct State: Codable, Equatable, Sendable {
        public static let version = 1
        public var ier: UInt8 = 0
        public var lcr: UInt8 = 0
        public var mcr: UInt8 = 0
        public var scratch: UInt8 = 0
        public var divisorLow: UInt8 = 0x0C // 9600 baud, like a PC BIOS leaves it
        public var divisorHigh: UInt8 = 0
        public var fifoEnabled = false
        public var thrInterruptPending = false
        public var overrun = false
        public var rx: [UInt8] = []
        public init() {}
    }

    /// Host input beyond this many bytes is dropped (a real UART would overrun far earlier).
    public static let inputCapacity = 4096

    // Register offsets.
    static let rbrThr: UInt64 = 0, ier: UInt64 = 1, iirFcr: UInt64 = 2, lcr: UInt64 = 3
    static let mcr: UInt64 = 4, lsr: UInt64 = 5, msr: UInt64 = 6, scr: UInt64 = 7

    // Bits.
    static let lcrDLAB: UInt8 = 0x80
    static let ierRDA: UInt8 = 0x01, ierTHRE: UInt8 = 0x02, ierRLS: UInt8 = 0x04
    static let mcrLoop: UInt8 = 0x10
    static let lsrDR: UInt8 = 0x01, lsrOE: UInt8 = 0x02, lsrTHRE: UInt8 = 0x20, lsrTEMT: UInt8 = 0x40
    static let iirNone: UInt8 = 0x01, iirTHRE: UInt8 = 0x02, iirRDA: UInt8 = 0x04, iirRLS: UInt8 = 0x06

    private let state: Mutex<State>
    private let output: any ConsoleOutput
    private let irq: any InterruptLine
    private let irqLevel = Mutex(false)

    /// Where the machine puts the UART: its 8 ports and its ISA interrupt (COM1: 0x3F8, IRQ 4).
    public typealias Placement = PortPlacement
    /// Nil for a UART on no bus (unit tests).
    public let placement: Placement?

    public init(output: any ConsoleOutput, irq: any InterruptLine, placement: Placement? = nil) {
        self.output = output
        self.irq = irq
        self.placement = placement
        self.state = Mutex(State())
        output.onReady { [weak self] in self?.transmitterReady() }
    }

    /// The console took what was waiting: the transmitter is empty again (a THRE interrupt, if
    /// enabled). Called by the console's writer thread.
    func transmitterReady() {
        state.withLock { s in
            s.thrInterruptPending = true
            updateInterrupt(s)
        }
    }

    /// The registers and the receive FIFO.
    public func saveState() -> State { state.withLock { $0 } }

    /// Replaces the registers and the receive FIFO with `s` after checking that this UART could
    /// hold them (nothing changes on error). The IRQ line is left alone: `redriveInterrupt()`.
    public func restoreState(_ s: State) throws(LEDecodeError) {
        try Self.validate(s)
        state.withLock { $0 = s }
    }

    /// Drives the IRQ line to the level the registers imply, whatever level it was last given
    /// (after a restore: see `PlatformDevice.afterRestore`).
    public func redriveInterrupt() {
        state.withLock { updateInterrupt($0, always: true) }
    }

    static func validate(_ s: State) throws(LEDecodeError) {
        guard s.ier & ~0x0F == 0 else { throw invalid("ier", "\(hex(s.ier)) has bits 4-7 set, which always read 0") }
        guard s.mcr & ~0x1F == 0 else { throw invalid("mcr", "\(hex(s.mcr)) has bits 5-7 set, which always read 0") }
        guard s.rx.count <= inputCapacity else {
            throw invalid("fifo count", "\(s.rx.count) bytes is over the capacity of \(inputCapacity)")
        }
    }

    /// Queues bytes typed on the host console. Returns how many were accepted; the caller keeps the
    /// rest and offers them again later (host input is flow-controlled, never counted as an overrun).
    @discardableResult
    public func enqueueInput(_ bytes: some Collection<UInt8>) -> Int {
        state.withLock { s in
            let room = max(0, Self.inputCapacity - s.rx.count)
            let accepted = min(room, bytes.count)
            s.rx.append(contentsOf: bytes.prefix(accepted))
            updateInterrupt(s)
            return accepted
        }
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        guard !data.isEmpty else { return }
        let value: UInt8 = state.withLock { s in
            let v = readRegister(offset, &s)
            updateInterrupt(s)
            return v
        }
        data[0] = value
        for i in 1..<data.count { data[i] = 0 }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard let value = data.first else { return }
        var transmitted: UInt8?
        state.withLock { s in
            transmitted = writeRegister(offset, value, &s)
            updateInterrupt(s)
        }
        if let byte = transmitted {
            withUnsafeBytes(of: byte) { output.write($0) }
            if !output.isReady {
                // The host reader is behind: the transmitter stays busy (no THRE) until the console
                // has room again. Look once more after clearing, in case it got room meanwhile.
                state.withLock { s in
                    s.thrInterruptPending = false
                    updateInterrupt(s)
                }
                if output.isReady { transmitterReady() }
            }
        }
    }

    private func readRegister(_ offset: UInt64, _ s: inout State) -> UInt8 {
        let dlab = s.lcr & Self.lcrDLAB != 0
        switch offset {
        case Self.rbrThr:
            if dlab { return s.divisorLow }
            guard !s.rx.isEmpty else { return 0 }
            return s.rx.removeFirst()
        case Self.ier:
            return dlab ? s.divisorHigh : s.ier
        case Self.iirFcr:
            let id = interruptIdentification(s)
            if id == Self.iirTHRE { s.thrInterruptPending = false } // reading IIR acknowledges THRE
            return id | (s.fifoEnabled ? 0xC0 : 0)
        case Self.lcr:
            return s.lcr
        case Self.mcr:
            return s.mcr
        case Self.lsr:
            // The transmitter is empty whenever the console takes bytes (it writes them at once).
            var lsr = output.isReady ? Self.lsrTHRE | Self.lsrTEMT : 0
            if !s.rx.isEmpty { lsr |= Self.lsrDR }
            if s.overrun { lsr |= Self.lsrOE; s.overrun = false }
            return lsr
        case Self.msr:
            if s.mcr & Self.mcrLoop != 0 {
                // Loopback: DTR→DSR, RTS→CTS, OUT1→RI, OUT2→DCD.
                let m = s.mcr
                return ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
            }
            return 0xB0 // DCD, DSR, CTS: a terminal is attached
        case Self.scr:
            return s.scratch
        default:
            return 0xFF
        }
    }

    /// Returns the byte to transmit, if any.
    private func writeRegister(_ offset: UInt64, _ value: UInt8, _ s: inout State) -> UInt8? {
        let dlab = s.lcr & Self.lcrDLAB != 0
        switch offset {
        case Self.rbrThr:
            if dlab { s.divisorLow = value; return nil }
            s.thrInterruptPending = true // the byte leaves at once, so THR is empty again
            if s.mcr & Self.mcrLoop != 0 {
                if s.rx.count < Self.inputCapacity { s.rx.append(value) } else { s.overrun = true }
                return nil
            }
            return value
        case Self.ier:
            if dlab { s.divisorHigh = value; return nil }
            let enablingTHRE = value & Self.ierTHRE != 0 && s.ier & Self.ierTHRE == 0
            s.ier = value & 0x0F
            if enablingTHRE && output.isReady { s.thrInterruptPending = true }
            return nil
        case Self.iirFcr:
            s.fifoEnabled = value & 0x01 != 0
            if value & 0x02 != 0 { s.rx.removeAll() }
            return nil
        case Self.lcr:
            s.lcr = value
        case Self.mcr:
            s.mcr = value & 0x1F
        case Self.scr:
            s.scratch = value
        default:
            break // LSR and MSR are read-only
        }
        return nil
    }

    private func interruptIdentification(_ s: State) -> UInt8 {
        if s.ier & Self.ierRLS != 0 && s.overrun { return Self.iirRLS }
        if s.ier & Self.ierRDA != 0 && !s.rx.isEmpty { return Self.iirRDA }
        if s.ier & Self.ierTHRE != 0 && s.thrInterruptPending { return Self.iirTHRE }
        return Self.iirNone
    }

    /// Drives the IRQ line to match the pending-interrupt state; only changes are sent to the line
    /// (unless `always`). Called with the state lock held so that level changes keep their order.
    private func updateInterrupt(_ s: State, always: Bool = false) {
        let pending = interruptIdentification(s) != Self.iirNone
        irqLevel.withLock { level in
            if always || level != pending {
                level = pending
                irq.setLevel(pending)
            }
        }
    }
}

extension Serial16550: StateSnapshotDevice {
    public static let snapshotName = "serial"
    public static let snapshotVersion = UInt16(State.version)
    public static let oldestSnapshotVersion: UInt16 = 1
}

extension Serial16550.State: CodedDeviceState {
    public static var blank: Self { Self() }

    /// The payload layout (see `State`), for both directions: `saveSnapshot` and `restoreSnapshot`
    /// run it.
    public mutating func code<C: LECoder>(_ c: inout C, version: UInt16) throws(LEDecodeError) {
        try c.u8(&ier, "serial.ier")
        try c.u8(&lcr, "serial.lcr")
        try c.u8(&mcr, "serial.mcr")
        try c.u8(&scratch, "serial.scratch")
        try c.u8(&divisorLow, "serial.dll")
        try c.u8(&divisorHigh, "serial.dlm")
        try c.bool(&fifoEnabled, "serial.fifo enabled")
        try c.bool(&thrInterruptPending, "serial.thre pending")
        try c.bool(&overrun, "serial.overrun")
        var count = rx.count
        try c.count(&count, limit: Serial16550.inputCapacity, minimumItemSize: 1, "serial.fifo count")
        try c.raw(&rx, count: count, "serial.fifo")
    }
}

extension Serial16550: PlatformDevice {
    public var busRegions: [BusRegion] {
        guard let p = placement else { return [] }
        return [.pio("com1", p.port, 8, self)]
    }

    public var snapshotSection: (name: String, device: any SnapshotDevice)? { ("dev.serial0", self) }

    /// A PC serial port (PNP0501) with its ports and interrupt.
    public var dsdtAML: [AML] {
        guard let p = placement else { return [] }
        return [.device("COM1", [
            .name("_HID", .eisaID("PNP0501")),
            .name("_UID", .integer(1)),
            .name("_CRS", .resourceTemplate([AML.Resource.ports(p.port, 8), AML.Resource.irqNoFlags([UInt8(p.gsi)])])),
        ])]
    }

    /// The PC UART clock (1.8432 MHz: divisor 1 is 115200 baud).
    public static let clockFrequency: UInt32 = 1_843_200

    /// The same port as an ISA `ns16550a` (Linux's 8250 OF binding) with its clock and its
    /// edge-triggered interrupt.
    public var deviceTreeNodes: [DeviceTreeNode] {
        guard let p = placement else { return [] }
        return [DeviceTreeNode("serial", properties: [
            .compatible("ns16550a"), .reg(.io(p.port, 8)), .u32("clock-frequency", Self.clockFrequency),
            .interrupts(.edge(p.gsi)),
        ])]
    }

    public func afterRestore() { redriveInterrupt() }
}
