/// A device reachable through port I/O or MMIO. `offset` is relative to the device's base.
///
/// Devices are called from vCPU threads (several at once on SMP guests) and must synchronize their
/// own state. They must never trap on any guest-supplied offset, size or value.
public protocol BusDevice: AnyObject, Sendable {
    /// Fills `data` (1, 2, 4 or 8 bytes) with the value read at `offset`.
    func read(offset: UInt64, data: UnsafeMutableRawBufferPointer)
    /// Handles a write of `data` at `offset`.
    func write(offset: UInt64, data: UnsafeRawBufferPointer)
}

public enum BusError: Error, CustomStringConvertible, Equatable, Sendable {
    case overlap(name: String, base: UInt64, size: UInt64, existing: String)
    case emptyRange(name: String)

    public var description: String {
        switch self {
        case .overlap(let name, let base, let size, let existing):
            return "bus range of \(name) (0x\(String(base, radix: 16)), \(size) bytes) overlaps \(existing)"
        case .emptyRange(let name):
            return "bus range of \(name) is empty"
        }
    }
}

/// An address space (the I/O port space or the MMIO space) mapping ranges to devices.
/// Built once before vCPUs start, then read-only, so lookups take no lock.
public struct Bus: Sendable {
    public struct Entry: Sendable {
        public let base: UInt64
        public let size: UInt64
        public let name: String
        public let device: any BusDevice
    }

    public private(set) var entries: [Entry] = []

    public init() {}

    /// Adds `device` at [base, base+size). Ranges must not overlap.
    public mutating func insert(_ device: any BusDevice, name: String, base: UInt64, size: UInt64) throws(BusError) {
        guard size > 0, base &+ size > base || base &+ size == 0 else { throw .emptyRange(name: name) }
        let end = base &+ size
        if let clash = entries.first(where: { base < $0.base &+ $0.size && $0.base < end }) {
            throw .overlap(name: name, base: base, size: size, existing: clash.name)
        }
        entries.append(Entry(base: base, size: size, name: name, device: device))
        entries.sort { $0.base < $1.base }
    }

    /// The device covering `address`, with the offset into it.
    @inline(__always)
    public func resolve(_ address: UInt64) -> (device: any BusDevice, offset: UInt64)? {
        // Binary search over sorted, non-overlapping ranges.
        var lo = 0
        var hi = entries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            let e = entries[mid]
            if address < e.base {
                hi = mid
            } else if address - e.base >= e.size {
                lo = mid + 1
            } else {
                return (e.device, address - e.base)
            }
        }
        return nil
    }

    /// Dispatches a read; returns false (and fills `data` with 0xFF, as a floating bus does) if no device answers.
    @discardableResult
    public func read(_ address: UInt64, data: UnsafeMutableRawBufferPointer) -> Bool {
        guard let (device, offset) = resolve(address) else {
            for i in data.indices { data[i] = 0xFF }
            return false
        }
        device.read(offset: offset, data: data)
        return true
    }

    /// Dispatches a write; returns false if no device answers (the write is dropped).
    @discardableResult
    public func write(_ address: UInt64, data: UnsafeRawBufferPointer) -> Bool {
        guard let (device, offset) = resolve(address) else { return false }
        device.write(offset: offset, data: data)
        return true
    }
}

/// An interrupt line a device drives (a GSI on the in-kernel IOAPIC/PIC in the real machine).
public protocol InterruptLine: Sendable {
    func setLevel(_ high: Bool)
}

/// Where a console device sends guest output.
public protocol ConsoleOutput: Sendable {
    /// Takes `bytes` at once, never waiting for the host (it is called on a vCPU thread); what does
    /// not fit is dropped.
    func write(_ bytes: UnsafeRawBufferPointer)
    /// Whether a burst of writes (a UART's FIFO) would be taken whole now. A UART reports its
    /// transmitter busy while this is false, which is how a slow host reader slows the guest down
    /// instead of stopping it.
    var isReady: Bool { get }
    /// Sets what to call (on any thread) when the output is ready again after it was not.
    func onReady(_ ready: @escaping @Sendable () -> Void)
    /// Waits until what was written reached the host, at most `timeoutMilliseconds`.
    func drain(timeoutMilliseconds: Int32)
}

extension ConsoleOutput {
    public var isReady: Bool { true }
    public func onReady(_ ready: @escaping @Sendable () -> Void) {}
    public func drain(timeoutMilliseconds: Int32) {}
}

/// A device that ignores writes and reads as `readValue` bytes: for legacy ports that guests probe
/// (port 0x80 POST codes, absent serial ports, ...) where silence is the right answer.
public final class QuietPort: BusDevice {
    let readValue: UInt8
    public init(readValue: UInt8 = 0xFF) { self.readValue = readValue }
    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        for i in data.indices { data[i] = readValue }
    }
    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {}
}
