import ACPI
import DeviceTree
import Synchronization
import VMMCore
import WireFormat

/// The PC's MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data), read-only time of day.
///
/// Linux reads it once at boot for the wall clock; without it, it would spin on a never-clearing
/// "update in progress" bit. Time comes from the injected `now` closure (UTC seconds since the epoch),
/// reported in BCD, 24-hour mode. Writes to the time registers are ignored; the 50 bytes of
/// battery-backed RAM (0x0E–0x3F... up to 0x7F) keep what the guest stores.
public final class CMOSClock: BusDevice {
    /// The index register and the RAM. The time is not state: it always comes from `now`.
    ///
    /// Snapshot payload, version 1 (little-endian):
    ///
    ///     u8 index (0x00-0x7F; the NMI mask bit is not kept)
    ///     128 bytes of RAM; the bytes under the clock registers (0x00-0x0D, 0x32) are never written
    ///     and must be 0
    public struct State: Codable, Equatable, Sendable {
        public static let version = 1
        public var index: UInt8 = 0
        public var ram = [UInt8](repeating: 0, count: 128)
        public init() {}
    }

    /// The RAM bytes a guest can write: everything but the clock registers and the century.
    static func isWritable(_ index: Int) -> Bool { index >= 0x0E && index != 0x32 }

    private let state = Mutex(State())
    private let now: @Sendable () -> Int

    /// Where the machine puts the clock: its index port (data at +1) and the RTC's ISA interrupt,
    /// which the DSDT names (a PC: 0x70, IRQ 8; this model never raises it).
    public typealias Placement = PortPlacement
    /// Nil for a clock on no bus (unit tests).
    public let placement: Placement?

    public init(placement: Placement? = nil, now: @escaping @Sendable () -> Int) {
        self.placement = placement
        self.now = now
    }

    /// The index register and the RAM.
    public func saveState() -> State { state.withLock { $0 } }

    /// Replaces the index register and the RAM with `s` after checking that the device could hold
    /// them (nothing changes on error).
    public func restoreState(_ s: State) throws(LEDecodeError) {
        guard s.index <= 0x7F else { throw Self.invalid("index", "\(hex(s.index)) is past the 128 registers") }
        guard s.ram.count == 128 else { throw Self.invalid("ram", "\(s.ram.count) bytes, not 128") }
        if let i = s.ram.indices.first(where: { !Self.isWritable($0) && s.ram[$0] != 0 }) {
            throw Self.invalid("ram", "byte \(hex(i)) is a clock register, which is never stored, but holds \(hex(s.ram[i]))")
        }
        state.withLock { $0 = s }
    }

    static func bcd(_ v: Int) -> UInt8 { UInt8(((v / 10) % 10) << 4 | (v % 10)) }

    /// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    static func civil(fromDays z0: Int) -> (year: Int, month: Int, day: Int) {
        let z = z0 + 719_468
        let era = (z >= 0 ? z : z - 146_096) / 146_097
        let doe = z - era * 146_097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (m <= 2 ? 1 : 0), m, d)
    }

    func register(_ index: UInt8, _ s: State) -> UInt8 {
        let t = now()
        let days = t >= 0 ? t / 86400 : (t - 86399) / 86400
        let secs = t - days * 86400
        let date = Self.civil(fromDays: days)
        switch index {
        case 0x00: return Self.bcd(secs % 60)
        case 0x02: return Self.bcd((secs / 60) % 60)
        case 0x04: return Self.bcd(secs / 3600)
        case 0x06: return UInt8(((days + 4) % 7 + 7) % 7 + 1) // day of week, Sunday = 1
        case 0x07: return Self.bcd(date.day)
        case 0x08: return Self.bcd(date.month)
        case 0x09: return Self.bcd(date.year % 100)
        case 0x32: return Self.bcd(date.year / 100)       // century
        case 0x0A: return 0x26                             // divider on, 1024 Hz, never "update in progress"
        case 0x0B: return 0x02                             // 24-hour mode, BCD, no interrupts
        case 0x0C: return 0x00                             // no interrupt flags
        case 0x0D: return 0x80                             // battery good, time valid
        case 0x01, 0x03, 0x05: return 0                    // alarms
        default: return s.ram[Int(index & 0x7F)]
        }
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        guard !data.isEmpty else { return }
        let v: UInt8 = state.withLock { s in offset == 1 ? register(s.index, s) : s.index }
        data[0] = v
        for i in 1..<data.count { data[i] = 0 }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard let v = data.first else { return }
        state.withLock { s in
            if offset == 0 {
                s.index = v & 0x7F // bit 7 is the NMI mask
            } else if Self.isWritable(Int(s.index)) {
                s.ram[Int(s.index)] = v
            }
        }
    }
}

extension CMOSClock: StateSnapshotDevice {
    public static let snapshotName = "cmos"
    public static let snapshotVersion = UInt16(State.version)
    public static let oldestSnapshotVersion: UInt16 = 1
}

extension CMOSClock.State: CodedDeviceState {
    public static var blank: Self { Self() }

    /// The payload layout (see `State`), for both directions: `saveSnapshot` and `restoreSnapshot`
    /// run it.
    public mutating func code<C: LECoder>(_ c: inout C, version: UInt16) throws(LEDecodeError) {
        try c.u8(&index, "cmos.index")
        try c.raw(&ram, count: 128, "cmos.ram")
    }
}

extension CMOSClock: PlatformDevice {
    public var busRegions: [BusRegion] {
        guard let p = placement else { return [] }
        return [.pio("cmos", p.port, 2, self)]
    }

    public var snapshotSection: (name: String, device: any SnapshotDevice)? { ("dev.cmos", self) }

    /// An AT real-time clock (PNP0B00): index and data ports, the RTC interrupt.
    public var dsdtAML: [AML] {
        guard let p = placement else { return [] }
        return [.device("RTC", [
            .name("_HID", .eisaID("PNP0B00")),
            .name("_CRS", .resourceTemplate([AML.Resource.ports(p.port, 2), AML.Resource.irqNoFlags([UInt8(p.gsi)])])),
        ])]
    }

    /// The same clock as an ISA `motorola,mc146818` (Linux's rtc-cmos OF binding): its ports and
    /// the RTC interrupt.
    public var deviceTreeNodes: [DeviceTreeNode] {
        guard let p = placement else { return [] }
        return [DeviceTreeNode("rtc", properties: [.compatible("motorola,mc146818"), .reg(.io(p.port, 2)), .interrupts(.edge(p.gsi))])]
    }
}
