import ACPI
import Synchronization
import VMMCore
import WireFormat

/// A minimal i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command).
///
/// It exists so that guests can reset the machine the PC way (`reboot=k`: command 0xFE, or clearing
/// bit 0 of the output port with command 0xD1) and so that Linux's i8042 probe finds a sane controller
/// with a keyboard that acknowledges commands, instead of waiting on time-outs. There is no mouse.
public final class I8042: BusDevice {
    /// Snapshot payload, version 1 (little-endian):
    ///
    ///     u8  configuration byte
    ///     u8  pending command: 0 for none, else 0x60 or 0xD1
    ///     u32 output buffer count (at most `outputCapacity`), then the bytes, oldest first
    public struct State: Codable, Equatable, Sendable {
        public static let version = 1
        /// Controller configuration byte ("command byte"); bit 0 enables the keyboard interrupt.
        public var config: UInt8 = 0x45
        /// The command whose data byte the next write to port 0x60 carries (0x60 or 0xD1), if any.
        public var pendingCommand: UInt8?
        /// Bytes waiting in the output buffer.
        public var output: [UInt8] = []
        public init() {}
    }

    /// Offsets inside the two-port device (registered at 0x60 with size 5: 0x60 data, 0x64 status).
    public static let dataOffset: UInt64 = 0
    public static let commandOffset: UInt64 = 4
    /// Output bytes beyond this many drop the oldest (a guest that never reads cannot grow it).
    public static let outputCapacity = 16

    static let statusOBF: UInt8 = 0x01, statusSystem: UInt8 = 0x04, statusCommand: UInt8 = 0x08
    static let statusUnlocked: UInt8 = 0x10

    private let state: Mutex<State>
    private let irq: any InterruptLine
    private let onReset: @Sendable () -> Void
    private let irqLevel = Mutex(false)

    /// Where the machine puts the controller: the first of its two ports (data; status/command is
    /// at +4) and the keyboard's ISA interrupt (a PC: 0x60, IRQ 1).
    public typealias Placement = PortPlacement
    /// Nil for a controller on no bus (unit tests).
    public let placement: Placement?

    public init(irq: any InterruptLine, placement: Placement? = nil, onReset: @escaping @Sendable () -> Void) {
        self.irq = irq
        self.onReset = onReset
        self.placement = placement
        self.state = Mutex(State())
    }

    /// The configuration byte, the pending command and the output buffer.
    public func saveState() -> State { state.withLock { $0 } }

    /// Replaces the state with `s` after checking that this controller could hold it (nothing changes
    /// on error). The IRQ line is left alone: `redriveInterrupt()`.
    public func restoreState(_ s: State) throws(LEDecodeError) {
        if let c = s.pendingCommand, c != 0x60 && c != 0xD1 {
            throw Self.invalid("pending command", "\(hex(c)) takes no data byte (only 0x60 and 0xD1 do)")
        }
        guard s.output.count <= Self.outputCapacity else {
            throw Self.invalid("output count", "\(s.output.count) bytes is over the capacity of \(Self.outputCapacity)")
        }
        state.withLock { $0 = s }
    }

    /// Drives the IRQ line to the level the state implies, whatever level it was last given (after
    /// a restore: see `PlatformDevice.afterRestore`).
    public func redriveInterrupt() {
        state.withLock { updateInterrupt($0, always: true) }
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        guard !data.isEmpty else { return }
        let value: UInt8 = state.withLock { s in
            switch offset {
            case Self.dataOffset:
                let v = s.output.isEmpty ? 0 : s.output.removeFirst()
                updateInterrupt(s)
                return v
            case Self.commandOffset:
                var status = Self.statusSystem | Self.statusUnlocked
                if !s.output.isEmpty { status |= Self.statusOBF }
                return status
            default:
                return 0xFF
            }
        }
        data[0] = value
        for i in 1..<data.count { data[i] = 0 }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard let value = data.first else { return }
        let reset: Bool = state.withLock { s in
            let r: Bool
            switch offset {
            case Self.commandOffset: r = command(value, &s)
            case Self.dataOffset: r = dataWrite(value, &s)
            default: r = false
            }
            if s.output.count > Self.outputCapacity { s.output.removeFirst(s.output.count - Self.outputCapacity) }
            updateInterrupt(s)
            return r
        }
        if reset { onReset() }
    }

    /// A controller command; returns true if it resets the machine.
    private func command(_ cmd: UInt8, _ s: inout State) -> Bool {
        s.pendingCommand = nil
        switch cmd {
        case 0x20: s.output.append(s.config)                 // read configuration byte
        case 0x60, 0xD1: s.pendingCommand = cmd               // write configuration / output port: data follows
        case 0xA7: s.config |= 0x20                           // disable aux port
        case 0xA8: s.config &= ~0x20                          // enable aux port
        case 0xA9: s.output.append(0xFF)                      // aux interface test: no aux port
        case 0xAA: s.output.append(0x55)                      // controller self test passed
        case 0xAB: s.output.append(0x00)                      // keyboard interface test passed
        case 0xAD: s.config |= 0x10                           // disable keyboard
        case 0xAE: s.config &= ~0x10                          // enable keyboard
        case 0xC0: s.output.append(0x00)                      // read input port
        case 0xD0: s.output.append(0x01)                      // read output port (reset line high)
        case 0xFE: return true                                 // pulse reset line
        case 0xF0...0xFD, 0xFF:                                // pulse other output lines: ignored
            break
        default:
            break                                              // aux commands etc.: no aux device, no answer
        }
        return false
    }

    private func dataWrite(_ value: UInt8, _ s: inout State) -> Bool {
        if let pending = s.pendingCommand {
            s.pendingCommand = nil
            if pending == 0x60 {
                s.config = value
                return false
            }
            return value & 0x01 == 0 // output port bit 0 low = CPU reset
        }
        // A byte for the keyboard: acknowledge like an MF2 keyboard.
        switch value {
        case 0xFF: s.output += [0xFA, 0xAA]                   // reset → ACK, self-test passed
        case 0xF2: s.output += [0xFA, 0xAB, 0x83]             // identify → MF2 keyboard
        case 0xEE: s.output.append(0xEE)                      // echo
        default: s.output.append(0xFA)                        // ACK
        }
        return false
    }

    /// Drives the IRQ line to the level the state implies, if it changed (or `always`).
    private func updateInterrupt(_ s: State, always: Bool = false) {
        let pending = !s.output.isEmpty && s.config & 0x01 != 0
        irqLevel.withLock { level in
            if always || level != pending {
                level = pending
                irq.setLevel(pending)
            }
        }
    }
}

extension I8042: StateSnapshotDevice {
    public static let snapshotName = "i8042"
    public static let snapshotVersion = UInt16(State.version)
    public static let oldestSnapshotVersion: UInt16 = 1
}

extension I8042.State: CodedDeviceState {
    public static var blank: Self { Self() }

    /// The payload layout (see `State`), for both directions: `saveSnapshot` and `restoreSnapshot`
    /// run it. No pending command is written as 0.
    public mutating func code<C: LECoder>(_ c: inout C, version: UInt16) throws(LEDecodeError) {
        try c.u8(&config, "i8042.config")
        var pending = pendingCommand ?? 0
        try c.u8(&pending, "i8042.pending command")
        pendingCommand = pending == 0 ? nil : pending
        var count = output.count
        try c.count(&count, limit: I8042.outputCapacity, minimumItemSize: 1, "i8042.output count")
        try c.raw(&output, count: count, "i8042.output")
    }
}

extension I8042: PlatformDevice {
    public var busRegions: [BusRegion] {
        guard let p = placement else { return [] }
        return [.pio("i8042", p.port, 5, self)]
    }

    public var snapshotSection: (name: String, device: any SnapshotDevice)? { ("dev.i8042", self) }

    /// A PS/2 keyboard controller (PNP0303): data and status ports, the keyboard interrupt.
    public var dsdtAML: [AML] {
        guard let p = placement else { return [] }
        return [.device("PS2K", [
            .name("_HID", .eisaID("PNP0303")),
            .name("_CRS", .resourceTemplate([AML.Resource.ports(p.port, 1), AML.Resource.ports(p.port + Self.commandOffset, 1),
                                              AML.Resource.irqNoFlags([UInt8(p.gsi)])])),
        ])]
    }

    // No device-tree node: there is no binding for a PC's 8042 (x86 Linux probes it at its
    // fixed ports).

    public func afterRestore() { redriveInterrupt() }
}
