import Glibc
import Synchronization
import Testing
import VMMCore

/// Collects everything a console device writes.
public final class RecordingConsole: ConsoleOutput {
    private let bytes = Mutex<[UInt8]>([])
    public init() {}
    public func write(_ data: UnsafeRawBufferPointer) { bytes.withLock { $0 += data } }
    public var output: [UInt8] { bytes.withLock { $0 } }
    public var text: String { String(decoding: output, as: UTF8.self) }
}

/// Records every level an interrupt line is driven to.
public final class RecordingInterruptLine: InterruptLine {
    private let levels = Mutex<[Bool]>([])
    public init() {}
    public func setLevel(_ high: Bool) { levels.withLock { $0.append(high) } }
    /// Every level change, in order.
    public var history: [Bool] { levels.withLock { $0 } }
    /// The current level (low if never driven).
    public var level: Bool { history.last ?? false }
}

/// A small deterministic random number generator (SplitMix64), for seeded random tests.
public struct SplitMix64: RandomNumberGenerator {
    public var state: UInt64
    public init(state: UInt64) { self.state = state }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Pokes device registers the way a guest would, without a guest (like QEMU's qtest).
///
/// An access that no attached device answers records a test failure (an `Issue`) at the caller's
/// line: on a real bus it would read all-ones or be dropped, which is almost always a wrong address
/// in the test. A test that means to probe an unanswered address says so with `readUnanswered` or
/// `writeUnanswered`, which in turn fail the test if a device does answer.
public struct BusHarness {
    public var bus = Bus()
    public init() {}

    public mutating func attach(_ device: any BusDevice, name: String = "dut", at base: UInt64, size: UInt64) throws {
        try bus.insert(device, name: name, base: base, size: size)
    }

    public func read8(_ address: UInt64, sourceLocation: SourceLocation = #_sourceLocation) -> UInt8 {
        UInt8(read(address, size: 1, sourceLocation: sourceLocation))
    }

    public func write8(_ address: UInt64, _ value: UInt8, sourceLocation: SourceLocation = #_sourceLocation) {
        write(address, size: 1, value: UInt64(value), sourceLocation: sourceLocation)
    }

    public func read(_ address: UInt64, size: Int, sourceLocation: SourceLocation = #_sourceLocation) -> UInt64 {
        let (value, answered) = access(read: address, size: size)
        if !answered { Issue.record("no device answers a \(size)-byte read at \(hex(address))", sourceLocation: sourceLocation) }
        return value
    }

    public func write(_ address: UInt64, size: Int, value: UInt64, sourceLocation: SourceLocation = #_sourceLocation) {
        if !access(write: address, size: size, value: value) {
            Issue.record("no device answers a \(size)-byte write at \(hex(address))", sourceLocation: sourceLocation)
        }
    }

    /// A read the test expects no device to answer: returns what the bus gives (all-ones), and
    /// records an issue if a device answers after all.
    public func readUnanswered(_ address: UInt64, size: Int, sourceLocation: SourceLocation = #_sourceLocation) -> UInt64 {
        let (value, answered) = access(read: address, size: size)
        if answered { Issue.record("a device answers the \(size)-byte read at \(hex(address))", sourceLocation: sourceLocation) }
        return value
    }

    /// A write the test expects no device to answer (the bus drops it); records an issue if a
    /// device answers after all.
    public func writeUnanswered(_ address: UInt64, size: Int, value: UInt64, sourceLocation: SourceLocation = #_sourceLocation) {
        if access(write: address, size: size, value: value) {
            Issue.record("a device answers the \(size)-byte write at \(hex(address))", sourceLocation: sourceLocation)
        }
    }

    private func access(read address: UInt64, size: Int) -> (UInt64, answered: Bool) {
        var buffer = [UInt8](repeating: 0, count: size)
        let answered = buffer.withUnsafeMutableBytes { bus.read(address, data: $0) }
        return (buffer.enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * $1.offset) }, answered)
    }

    private func access(write address: UInt64, size: Int, value: UInt64) -> Bool {
        let buffer = (0..<size).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
        return buffer.withUnsafeBytes { bus.write(address, data: $0) }
    }

    private func hex(_ address: UInt64) -> String { "0x" + String(address, radix: 16) }
}

/// The newest stock Debian kernel in /boot (`vmlinuz-*-amd64`), which the guest-test setup installs.
public func installedDebianKernel() -> String? {
    guard let dir = opendir("/boot") else { return nil }
    defer { closedir(dir) }
    var best: String?
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
        if name.hasPrefix("vmlinuz-") && name.hasSuffix("-amd64") { best = max(best ?? "", "/boot/" + name) }
    }
    return best
}
