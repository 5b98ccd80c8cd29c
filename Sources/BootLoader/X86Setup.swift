/// Pure builders for the x86-64 state a 64-bit boot needs: GDT entries and identity-mapping page tables.
public enum X86Setup {
    /// Encodes a GDT descriptor from flags (bits 15:0 of the access/flags word: access byte in 7:0,
    /// flags nibble in 15:12), base and limit.
    public static func gdtEntry(flags: UInt16, base: UInt32, limit: UInt32) -> UInt64 {
        var d = UInt64(limit & 0xFFFF)
        d |= UInt64(base & 0xFF_FFFF) << 16
        d |= UInt64(flags & 0xFF) << 40
        d |= UInt64((limit >> 16) & 0xF) << 48
        d |= UInt64((flags >> 12) & 0xF) << 52
        d |= UInt64((base >> 24) & 0xFF) << 56
        return d
    }

    /// The boot GDT: null, null, 64-bit code at selector 0x10, data at 0x18, a TSS at 0x20.
    public static let bootGDT: [UInt64] = [
        0,
        0,
        gdtEntry(flags: 0xA09B, base: 0, limit: 0xFFFFF), // code: present, DPL0, exec/read, accessed; L=1, G=1
        gdtEntry(flags: 0xC093, base: 0, limit: 0xFFFFF), // data: present, read/write, accessed; D/B=1, G=1
        gdtEntry(flags: 0x808B, base: 0, limit: 0xFFFFF), // TSS: present, 64-bit busy TSS
    ]
    public static let codeSelector: UInt16 = 0x10
    public static let dataSelector: UInt16 = 0x18
    public static let tssSelector: UInt16 = 0x20

    /// Decoded fields of a GDT descriptor, as KVM's segment registers want them.
    public struct Segment: Equatable, Sendable {
        public var base: UInt64
        public var limit: UInt32
        public var selector: UInt16
        public var type: UInt8
        public var present: UInt8
        public var dpl: UInt8
        public var db: UInt8
        public var s: UInt8
        public var l: UInt8
        public var g: UInt8
        public var avl: UInt8
    }

    public static func segment(descriptor d: UInt64, selector: UInt16) -> Segment {
        let base = ((d >> 16) & 0xFF_FFFF) | (((d >> 56) & 0xFF) << 24)
        let rawLimit = UInt32((d & 0xFFFF) | (((d >> 48) & 0xF) << 16))
        let g = UInt8((d >> 55) & 1)
        // With G=1 the limit counts 4 KiB pages; KVM wants it in bytes.
        let limit = g == 1 ? (rawLimit << 12) | 0xFFF : rawLimit
        return Segment(
            base: base, limit: limit, selector: selector,
            type: UInt8((d >> 40) & 0xF), present: UInt8((d >> 47) & 1), dpl: UInt8((d >> 45) & 3),
            db: UInt8((d >> 54) & 1), s: UInt8((d >> 44) & 1), l: UInt8((d >> 53) & 1), g: g,
            avl: UInt8((d >> 52) & 1))
    }

    /// Page tables identity-mapping the first `gigabytes` GiB with 2 MiB pages: one PML4 page, one PDPT
    /// page and one page directory per GiB, laid out consecutively from `base`. Returns the bytes to
    /// write at `base` (CR3 = base).
    public static func identityPageTables(base: UInt64, gigabytes: Int) -> [UInt8] {
        precondition((1...512).contains(gigabytes) && base & 0xFFF == 0)
        let pages = 2 + gigabytes
        var bytes = [UInt8](repeating: 0, count: pages * 4096)
        func put(_ value: UInt64, page: Int, index: Int) {
            let o = page * 4096 + index * 8
            for i in 0..<8 { bytes[o + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
        }
        let present: UInt64 = 0x1, writable: UInt64 = 0x2, huge: UInt64 = 0x80
        put((base + 4096) | present | writable, page: 0, index: 0) // PML4[0] → PDPT
        for g in 0..<gigabytes {
            let pd = base + UInt64(2 + g) * 4096
            put(pd | present | writable, page: 1, index: g) // PDPT[g] → PD g
            for i in 0..<512 {
                let phys = (UInt64(g) << 30) | (UInt64(i) << 21)
                put(phys | present | writable | huge, page: 2 + g, index: i)
            }
        }
        return bytes
    }

    // Control register bits.
    public static let cr0PE: UInt64 = 1 << 0
    public static let cr0ET: UInt64 = 1 << 4
    public static let cr0PG: UInt64 = 1 << 31
    public static let cr4PAE: UInt64 = 1 << 5
    public static let eferLME: UInt64 = 1 << 8
    public static let eferLMA: UInt64 = 1 << 10
}
