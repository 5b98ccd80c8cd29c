/// One entry of boot_params' `setup_data` list (boot protocol 2.09+): `{u64 next; u32 type; u32 len;
/// u8 data[len]}`, the entries chained through `next` (0 ends the list).
public struct SetupDataEntry: Equatable, Sendable {
    /// SETUP_DTB: a flattened device tree for kernels built with CONFIG_OF.
    public static let deviceTree: UInt32 = 2

    public var type: UInt32
    public var payload: [UInt8]
    public init(type: UInt32, payload: [UInt8]) {
        self.type = type
        self.payload = payload
    }
}

public enum SetupData {
    /// `next`, `type` and `len` before each entry's data.
    public static let headerSize = 16

    /// The bytes of `entries` as a list starting at guest address `base`, each entry 8-byte aligned
    /// after the previous one, the first at `base` (what boot_params' `setup_data` points to).
    /// Checks that the whole list ends at or below `limit` and that each payload's length fits the
    /// 32-bit `len`.
    public static func chain(_ entries: [SetupDataEntry], at base: UInt64, limit: UInt64) throws(BootError) -> [UInt8] {
        precondition(base % 8 == 0 && base <= limit, "setup_data region \(base)..<\(limit) is not 8-byte aligned")
        let room = limit - base
        var offsets: [Int] = []
        var end = 0
        for e in entries {
            let start = (end + 7) & ~7
            guard e.payload.count <= Int(UInt32.max), UInt64(start + headerSize + e.payload.count) <= room else {
                throw .setupDataTooLarge(size: UInt64(start + headerSize) + UInt64(e.payload.count), room: room)
            }
            offsets.append(start)
            end = start + headerSize + e.payload.count
        }
        var bytes = [UInt8](repeating: 0, count: end)
        func put(_ v: UInt64, _ count: Int, at o: Int) { for i in 0..<count { bytes[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
        for (i, e) in entries.enumerated() {
            let o = offsets[i]
            put(i + 1 < entries.count ? base + UInt64(offsets[i + 1]) : 0, 8, at: o)
            put(UInt64(e.type), 4, at: o + 8)
            put(UInt64(e.payload.count), 4, at: o + 12)
            bytes.replaceSubrange((o + headerSize)..<(o + headerSize + e.payload.count), with: e.payload)
        }
        return bytes
    }

    /// The entries of a list written by `chain` at `base` (for tests and diagnostics): follows `next`
    /// inside `bytes` only, at most `maxEntries`; nil for a pointer outside it, a length past its end
    /// or a loop.
    public static func parse(_ bytes: [UInt8], at base: UInt64, maxEntries: Int = 64) -> [SetupDataEntry]? {
        func get(_ o: Int, _ count: Int) -> UInt64 { (0..<count).reduce(0) { $0 | UInt64(bytes[o + $1]) << (8 * UInt64($1)) } }
        var entries: [SetupDataEntry] = []
        var address = base
        while entries.count < maxEntries {
            guard address >= base, address - base <= UInt64(bytes.count), UInt64(bytes.count) - (address - base) >= UInt64(headerSize) else { return nil }
            let o = Int(address - base)
            let length = Int(get(o + 12, 4))
            guard bytes.count - o - headerSize >= length else { return nil }
            entries.append(SetupDataEntry(type: UInt32(get(o + 8, 4)), payload: Array(bytes[(o + headerSize)..<(o + headerSize + length)])))
            address = get(o, 8)
            if address == 0 { return entries }
        }
        return nil
    }
}
