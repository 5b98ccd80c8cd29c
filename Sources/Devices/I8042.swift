import Synchronization
import VMMCore

/// A minimal i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command).
///
/// It exists so that guests can reset the machine the PC way (`reboot=k`: command 0xFE, or clearing
/// bit 0 of the output port with command 0xD1) and so that Linux's i8042 probe finds a sane controller
/// with a keyboard that acknowledges commands, instead of waiting on time-outs. There is no mouse.
public final class I8042: BusDevice {
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

    static let statusOBF: UInt8 = 0x01, statusSystem: UInt8 = 0x04, statusCommand: UInt8 = 0x08
    static let statusUnlocked: UInt8 = 0x10

    private let state: Mutex<State>
    private let irq: any InterruptLine
    private let onReset: @Sendable () -> Void
    private let irqLevel = Mutex(false)

    public init(irq: any InterruptLine, state: State = State(), onReset: @escaping @Sendable () -> Void) {
        self.irq = irq
        self.onReset = onReset
        self.state = Mutex(state)
    }

    public var snapshot: State { state.withLock { $0 } }

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
        if s.output.count > 16 { s.output.removeFirst(s.output.count - 16) }
        return false
    }

    private func updateInterrupt(_ s: State) {
        let pending = !s.output.isEmpty && s.config & 0x01 != 0
        irqLevel.withLock { level in
            if level != pending {
                level = pending
                irq.setLevel(pending)
            }
        }
    }
}
