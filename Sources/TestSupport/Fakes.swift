import Glibc
import Synchronization
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

/// Pokes device registers the way a guest would, without a guest (like QEMU's qtest).
public struct BusHarness {
    public var bus = Bus()
    public init() {}

    public mutating func attach(_ device: any BusDevice, name: String = "dut", at base: UInt64, size: UInt64) throws {
        try bus.insert(device, name: name, base: base, size: size)
    }

    public func read8(_ address: UInt64) -> UInt8 { UInt8(read(address, size: 1)) }
    public func write8(_ address: UInt64, _ value: UInt8) { write(address, size: 1, value: UInt64(value)) }

    public func read(_ address: UInt64, size: Int) -> UInt64 {
        var buffer = [UInt8](repeating: 0, count: size)
        buffer.withUnsafeMutableBytes { _ = bus.read(address, data: $0) }
        return buffer.enumerated().reduce(0) { $0 | UInt64($1.element) << (8 * $1.offset) }
    }

    public func write(_ address: UInt64, size: Int, value: UInt64) {
        let buffer = (0..<size).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
        buffer.withUnsafeBytes { _ = bus.write(address, data: $0) }
    }
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
