/// Every ACPI table of a machine, placed at guest-physical addresses inside one region:
/// RSDP first (so a scan of the region finds it), then XSDT, FADT, FACS, DSDT, MADT and the SSDTs.
public struct ACPITableSet: Sendable {
    public struct Placed: Sendable, Equatable {
        /// The signature ("FACP", "SSDT", ...) or "RSDP".
        public var name: String
        public var address: UInt64
        public var bytes: [UInt8]
    }

    public enum Error: Swift.Error, CustomStringConvertible, Equatable {
        case doesNotFit(needed: UInt64, available: UInt64)
        public var description: String {
            switch self {
            case .doesNotFit(let needed, let available):
                return "the ACPI tables need \(needed) bytes but their region has \(available)"
            }
        }
    }

    public let tables: [Placed]
    public var rsdpAddress: UInt64 { tables[0].address }

    /// Lays the tables out from `base` (16-byte aligned) within `size` bytes.
    public init(platform: ACPIPlatform, dsdt: SDT, ssdts: [SDT], base: UInt64, size: UInt64) throws(Error) {
        func align(_ v: UInt64, _ a: UInt64) -> UInt64 { (v + a - 1) & ~(a - 1) }
        var cursor = align(base, 16)
        func place(_ length: Int, alignment: UInt64 = 16) -> UInt64 {
            let at = align(cursor, alignment)
            cursor = at + UInt64(length)
            return at
        }
        let rsdpAt = place(ACPITables.rsdpLength)
        let xsdtAt = place(SDT.headerSize + 8 * (2 + ssdts.count))
        let fadtAt = place(ACPITables.fadtLength)
        let facsAt = place(ACPITables.facsLength, alignment: 64)
        let dsdtAt = place(dsdt.length)
        let madt = ACPITables.madt(platform)
        let madtAt = place(madt.length)
        let ssdtAt = ssdts.map { place($0.length) }
        guard cursor - base <= size else { throw .doesNotFit(needed: cursor - base, available: size) }

        let fadt = ACPITables.fadt(platform, facsAddress: facsAt, dsdtAddress: dsdtAt)
        let xsdt = ACPITables.xsdt(entries: [fadtAt, madtAt] + ssdtAt)
        var t = [
            Placed(name: "RSDP", address: rsdpAt, bytes: ACPITables.rsdp(xsdtAddress: xsdtAt)),
            Placed(name: "XSDT", address: xsdtAt, bytes: xsdt.bytes),
            Placed(name: "FACP", address: fadtAt, bytes: fadt.bytes),
            Placed(name: "FACS", address: facsAt, bytes: ACPITables.facs()),
            Placed(name: "DSDT", address: dsdtAt, bytes: dsdt.bytes),
            Placed(name: "APIC", address: madtAt, bytes: madt.bytes),
        ]
        for (ssdt, at) in zip(ssdts, ssdtAt) { t.append(Placed(name: ssdt.signature, address: at, bytes: ssdt.bytes)) }
        tables = t
    }

    /// File names for a dump: the signature, numbered when it repeats (SSDT.dat, SSDT2.dat, ...).
    public var dumpFileNames: [String] {
        var seen: [String: Int] = [:]
        return tables.map { t in
            let n = (seen[t.name] ?? 0) + 1
            seen[t.name] = n
            return n == 1 ? "\(t.name).dat" : "\(t.name)\(n).dat"
        }
    }
}
