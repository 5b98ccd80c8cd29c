/// Every ACPI table of a machine as two relocatable blobs, the way QEMU hands them to firmware:
/// `etc/acpi/rsdp` (the RSDP) and `etc/acpi/tables` (XSDT, FADT, FACS, DSDT, MADT, SSDTs, in that
/// order). Pointer fields hold the *offset* of their target inside the tables blob; a loader adds the
/// blob's guest address to each (`pointers`) and then fixes every checksum (`checksums`). The machine
/// turns these into `etc/table-loader` commands and runs the same commands itself for a direct boot.
public struct ACPITableBlob: Sendable, Equatable {
    public enum File: String, Sendable, CaseIterable {
        case rsdp = "etc/acpi/rsdp"
        case tables = "etc/acpi/tables"
    }

    /// A little-endian field of `size` bytes at `offset` in `file` that must get the guest address of
    /// `target` added to it: the tables blob itself (nil) or another fw_cfg file a table points into
    /// (e.g. `etc/vmgenid_guid`).
    public struct Pointer: Sendable, Equatable {
        public var file: File
        public var offset: Int
        public var size: UInt8
        public var target: String?
        public init(file: File, offset: Int, size: UInt8, target: String? = nil) {
            self.file = file
            self.offset = offset
            self.size = size
            self.target = target
        }
    }

    /// A field inside an SSDT that points into another fw_cfg file (see `Pointer.target`).
    public struct ExternalPointer: Sendable, Equatable {
        public var ssdt: Int
        public var offsetInTable: Int
        public var size: UInt8
        public var target: String
        public init(ssdt: Int, offsetInTable: Int, size: UInt8, target: String) {
            self.ssdt = ssdt
            self.offsetInTable = offsetInTable
            self.size = size
            self.target = target
        }
    }

    /// The byte at `offset` in `file` must make bytes start..<start+length sum to zero.
    public struct Checksum: Sendable, Equatable {
        public var file: File
        public var offset: Int
        public var start: Int
        public var length: Int
        public init(file: File, offset: Int, start: Int, length: Int) {
            self.file = file
            self.offset = offset
            self.start = start
            self.length = length
        }
    }

    /// One table inside the tables blob.
    public struct Entry: Sendable, Equatable {
        public var name: String
        public var offset: Int
        public var length: Int
    }

    public static let rsdpAlignment: UInt32 = 16
    public static let tablesAlignment: UInt32 = 64

    public private(set) var rsdp: [UInt8]
    public private(set) var tables: [UInt8] = []
    public private(set) var entries: [Entry] = []
    public private(set) var pointers: [Pointer] = []
    public private(set) var checksums: [Checksum] = []

    public init(platform: ACPIPlatform, dsdt: SDT, ssdts: [SDT], externalPointers: [ExternalPointer] = []) {
        rsdp = []
        func append(_ name: String, _ bytes: [UInt8], alignment: Int = 16, checksummed: Bool = true) -> Int {
            while tables.count % alignment != 0 { tables.append(0) }
            let at = tables.count
            tables += bytes
            entries.append(Entry(name: name, offset: at, length: bytes.count))
            if checksummed { checksums.append(Checksum(file: .tables, offset: at + 9, start: at, length: bytes.count)) }
            return at
        }
        // Offsets first: the XSDT's and the FADT's pointer fields hold them.
        let xsdtLength = SDT.headerSize + 8 * (2 + ssdts.count)
        var cursor = 0
        func reserve(_ length: Int, alignment: Int = 16) -> Int {
            cursor = (cursor + alignment - 1) / alignment * alignment
            defer { cursor += length }
            return cursor
        }
        let xsdtAt = reserve(xsdtLength)
        let fadtAt = reserve(ACPITables.fadtLength)
        let facsAt = reserve(ACPITables.facsLength, alignment: 64)
        let dsdtAt = reserve(dsdt.length)
        let madt = ACPITables.madt(platform)
        let madtAt = reserve(madt.length)
        let ssdtAt = ssdts.map { reserve($0.length) }

        _ = append("XSDT", ACPITables.xsdt(entries: ([fadtAt, madtAt] + ssdtAt).map(UInt64.init)).bytes)
        for i in 0..<(2 + ssdts.count) { pointers.append(Pointer(file: .tables, offset: xsdtAt + SDT.headerSize + 8 * i, size: 8)) }
        _ = append("FACP", ACPITables.fadt(platform, facsAddress: UInt64(facsAt), dsdtAddress: UInt64(dsdtAt)).bytes)
        pointers += [Pointer(file: .tables, offset: fadtAt + 36, size: 4), Pointer(file: .tables, offset: fadtAt + 40, size: 4),
                     Pointer(file: .tables, offset: fadtAt + 132, size: 8), Pointer(file: .tables, offset: fadtAt + 140, size: 8)]
        _ = append("FACS", ACPITables.facs(), alignment: 64, checksummed: false)
        _ = append("DSDT", dsdt.bytes)
        _ = append("APIC", madt.bytes)
        for s in ssdts { _ = append(s.signature, s.bytes) }
        precondition(entries.map(\.offset) == [xsdtAt, fadtAt, facsAt, dsdtAt, madtAt] + ssdtAt, "table layout")
        for p in externalPointers {
            precondition(ssdts.indices.contains(p.ssdt) && p.offsetInTable + Int(p.size) <= ssdts[p.ssdt].length, "external pointer")
            pointers.append(Pointer(file: .tables, offset: ssdtAt[p.ssdt] + p.offsetInTable, size: p.size, target: p.target))
        }

        rsdp = ACPITables.rsdp(xsdtAddress: UInt64(xsdtAt))
        pointers.append(Pointer(file: .rsdp, offset: 24, size: 8))
        checksums.append(Checksum(file: .rsdp, offset: 8, start: 0, length: 20))
        checksums.append(Checksum(file: .rsdp, offset: 32, start: 0, length: ACPITables.rsdpLength))
    }

    public func bytes(of file: File) -> [UInt8] { file == .rsdp ? rsdp : tables }
}

/// The tables as the guest sees them after loading: each at its guest address.
public struct ACPITableSet: Sendable {
    public struct Placed: Sendable, Equatable {
        /// The signature ("FACP", "SSDT", ...) or "RSDP".
        public var name: String
        public var address: UInt64
        public var bytes: [UInt8]
        public init(name: String, address: UInt64, bytes: [UInt8]) {
            self.name = name
            self.address = address
            self.bytes = bytes
        }
    }

    /// RSDP first.
    public let tables: [Placed]
    public var rsdpAddress: UInt64 { tables[0].address }

    public init(tables: [Placed]) {
        precondition(tables.first?.name == "RSDP", "the RSDP comes first")
        self.tables = tables
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
