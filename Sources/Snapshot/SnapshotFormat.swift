import CLinux
import WireFormat

/// The `state.bin` container: constants of the layout (docs/snapshot-format.md) and pure functions
/// that encode it and decode it with full validation. Nothing here touches a file.
///
/// Layout: a header (`headerSize` bytes), the section table (`sectionCount` entries of
/// `sectionEntrySize` bytes) and the payloads, each 8-byte aligned with zero bytes between them.
/// Every field is explicitly little-endian.
public enum SnapshotFormat {
    public static let stateFile = "state.bin"
    public static let memoryFile = "memory.bin"

    public static let magic: [UInt8] = Array("SWVMSNAP".utf8)
    public static let currentMajor: UInt16 = 1
    public static let currentMinor: UInt16 = 0

    /// Sizes of format 1.0 (a reader accepts larger headers and entries and ignores the rest).
    public static let headerSize = 192
    public static let sectionEntrySize = 64
    public static let payloadAlignment = 8
    public static let nameWidth = 16
    public static let writerFieldWidth = 32
    /// Bytes 0..<88 (magic, format, header size, creation time, writer name and version) stay at
    /// these offsets in every future format major.
    public static let frozenPrefixSize = 88

    /// Caps, checked before anything is allocated or looped over.
    public static let maxSections = 4096
    public static let maxPayloadSize = 256 << 20
    public static let maxStateSize = 1 << 30
    public static let maxHeaderSize = 4096
    public static let maxSectionEntrySize = 1024

    /// Bit 0 of a section's flags: a reader that does not know the section must refuse the snapshot.
    public static let sectionRequiredFlag: UInt32 = 1 << 0
    /// Bit 0 of the memory flags: the memory.bin CRC32C field is valid.
    public static let memoryCRCValidFlag: UInt32 = 1 << 0

    /// Offset of the header CRC32C in format 1.x.
    static let headerCRCOffset = 188
    static let headerReservedRange = 140..<188
    static let entryReservedSize = 20

    // MARK: Encoding

    /// The bytes of `state.bin` for `header` and `sections` (in this order, payloads packed after
    /// the table). Throws when the result would not decode: a bad or duplicate name, a payload or
    /// file over the caps, writer strings too long, inconsistent memory fields.
    public static func encodeState(header: SnapshotHeader, sections: [SnapshotSection]) throws(SnapshotError) -> [UInt8] {
        try check(header: header)
        try check(sections: sections)

        let tableOffset = headerSize // already 8-aligned
        let tableEnd = tableOffset + sections.count * sectionEntrySize
        var offsets: [Int] = []
        offsets.reserveCapacity(sections.count)
        var end = tableEnd
        for section in sections {
            let start = align(end)
            offsets.append(start)
            end = start + section.payload.count
            if end > maxStateSize { throw tooLarge(UInt64(end)) }
        }

        var table = LEWriter(capacity: tableEnd - tableOffset)
        for (section, offset) in zip(sections, offsets) {
            table.fixedString(section.name, width: nameWidth)
            table.u16(section.version)
            table.u16(section.minimumVersion)
            table.u32(section.required ? sectionRequiredFlag : 0)
            table.u64(UInt64(offset))
            table.u64(UInt64(section.payload.count))
            table.u32(CRC32C.checksum(section.payload))
            table.raw(repeatElement(0, count: entryReservedSize))
        }

        var w = LEWriter(capacity: end)
        w.raw(magic)
        w.u16(header.formatMajor)
        w.u16(header.formatMinor)
        w.u32(UInt32(headerSize))
        w.u64(header.created)
        w.fixedString(header.writerName, width: writerFieldWidth)
        w.fixedString(header.writerVersion, width: writerFieldWidth)
        w.u64(header.memorySize)
        w.u32(header.vcpuCount)
        w.u32(header.machineFlags.rawValue)
        w.u64(header.memoryFileLength)
        w.u32(header.memoryCRC32C ?? 0)
        w.u32(header.memoryCRC32C == nil ? 0 : memoryCRCValidFlag)
        w.u32(UInt32(sections.count))
        w.u32(UInt32(sectionEntrySize))
        w.u64(UInt64(tableOffset))
        w.u32(CRC32C.checksum(table.bytes))
        w.raw(repeatElement(0, count: headerReservedRange.count))
        w.u32(0) // header CRC32C, computed with this field as zero
        precondition(w.count == headerSize, "header layout")
        w.patchU32(CRC32C.checksum(w.bytes), at: headerCRCOffset)
        w.raw(table.bytes)
        for (section, offset) in zip(sections, offsets) {
            w.raw(repeatElement(0, count: offset - w.count))
            w.raw(section.payload)
        }
        return w.bytes
    }

    static func check(header: SnapshotHeader) throws(SnapshotError) {
        for (field, value) in [("writer name", header.writerName), ("writer version", header.writerVersion)] {
            if value.utf8.count > writerFieldWidth {
                throw headerError(field, "\"\(value)\" is longer than \(writerFieldWidth) bytes")
            }
            if value.utf8.contains(0) { throw headerError(field, "contains a NUL byte") }
        }
        if header.vcpuCount == 0 { throw headerError("vCPU count", "0: a machine has at least one vCPU") }
        let reserved = header.machineFlags.rawValue & ~SnapshotMachineFlags.known.rawValue
        if reserved != 0 { throw headerError("machine flags", "reserved bits \(hex32(reserved)) are set") }
        if header.memoryFileLength != header.memorySize {
            throw headerError("memory.bin length", "\(header.memoryFileLength) does not equal the guest memory size \(header.memorySize)")
        }
    }

    static func check(sections: [SnapshotSection]) throws(SnapshotError) {
        if sections.count > maxSections {
            throw headerError("section count", "\(sections.count) is over the limit of \(maxSections)")
        }
        var seen = Set<String>()
        for (index, section) in sections.enumerated() {
            if let problem = nameProblem(Array(section.name.utf8)) {
                throw .invalid(file: stateFile, part: "section \(index)", field: "name", reason: problem)
            }
            let part = sectionPart(section.name)
            if !seen.insert(section.name).inserted {
                throw .invalid(file: stateFile, part: part, field: "name", reason: "appears more than once")
            }
            if section.minimumVersion > section.version {
                throw .invalid(file: stateFile, part: part, field: "minimum version",
                               reason: "\(section.minimumVersion) is above the section's version \(section.version)")
            }
            if section.payload.count > maxPayloadSize {
                throw .invalid(file: stateFile, part: part, field: "payload length",
                               reason: "\(section.payload.count) is over the limit of \(maxPayloadSize) bytes (256 MiB)")
            }
        }
    }

    // MARK: Decoding

    /// Decodes and validates all of `state.bin`: magic, format version, sizes against the caps,
    /// alignment, bounds, overlaps, names, reserved bits and zero padding (for files of this minor
    /// version or older), and every CRC32C. Sections come back in table order.
    public static func decodeState(_ bytes: [UInt8]) throws(SnapshotError) -> (SnapshotHeader, [SnapshotSection]) {
        let (header, _, sections) = try decode(bytes)
        return (header, sections)
    }

    /// `decodeState`, also returning the layout.
    static func decode(_ bytes: [UInt8]) throws(SnapshotError) -> (SnapshotHeader, SnapshotLayout, [SnapshotSection]) {
        let (header, layout) = try decodeLayout(bytes)
        try checkPadding(bytes, layout: layout, header: header)
        var sections: [SnapshotSection] = []
        sections.reserveCapacity(layout.entries.count)
        for entry in layout.entries {
            let range = Int(entry.offset)..<Int(entry.offset + entry.length)
            let computed = CRC32C.checksum(bytes[range])
            if computed != entry.crc32c {
                throw .checksumMismatch(file: stateFile, part: sectionPart(entry.name), field: "payload CRC32C",
                                        stored: entry.crc32c, computed: computed)
            }
            sections.append(section(bytes, entry))
        }
        return (header, layout, sections)
    }

    /// The header and the section table, validated (with their CRC32Cs), but not the payloads or
    /// the padding: what `inspect` lists and `verify` then checks piece by piece.
    public static func decodeLayout(_ bytes: [UInt8]) throws(SnapshotError) -> (SnapshotHeader, SnapshotLayout) {
        var (header, layout) = try decodeHeader(bytes)
        layout.entries = try decodeTable(bytes, layout: layout, strict: isStrict(header))
        return (header, layout)
    }

    /// The header alone, validated with its CRC32C; `layout.entries` is empty.
    public static func decodeHeader(_ bytes: [UInt8]) throws(SnapshotError) -> (SnapshotHeader, SnapshotLayout) {
        let size = UInt64(bytes.count)
        if bytes.count > maxStateSize { throw tooLarge(size) }
        let shortHeader = SnapshotError.truncated(file: stateFile, part: "header", needed: UInt64(headerSize), available: size)
        guard bytes.count >= magic.count else { throw shortHeader }
        guard bytes[0..<magic.count].elementsEqual(magic) else {
            throw headerError("magic", "not a swiftvmm snapshot (expected \"SWVMSNAP\", found \"\(printable(bytes[0..<magic.count]))\")")
        }
        guard bytes.count >= 16 else { throw shortHeader }
        var prefix = LEReader(bytes[0..<16])
        let major: UInt16, minor: UInt16, declaredSize: UInt32
        do {
            try prefix.skip(magic.count, "magic")
            major = try prefix.u16("format major")
            minor = try prefix.u16("format minor")
            declaredSize = try prefix.u32("header size")
        } catch {
            throw decodeError("header", error)
        }
        guard major == currentMajor else { throw .unsupportedFormat(major: major, minor: minor) }
        guard declaredSize >= headerSize else {
            throw headerError("header size", "\(declaredSize) is smaller than the \(headerSize) bytes of format \(currentMajor).0")
        }
        guard declaredSize <= maxHeaderSize else {
            throw headerError("header size", "\(declaredSize) is over the limit of \(maxHeaderSize)")
        }
        let h = Int(declaredSize)
        guard bytes.count >= h else {
            throw .truncated(file: stateFile, part: "header", needed: UInt64(h), available: size)
        }

        var crc = CRC32C.checksum(bytes[0..<headerCRCOffset])
        crc = CRC32C.update(crc, [0, 0, 0, 0][...])
        crc = CRC32C.update(crc, bytes[(headerCRCOffset + 4)..<h])
        var r = LEReader(bytes[0..<h])
        let stored: UInt32
        do {
            try r.skip(headerCRCOffset, "header")
            stored = try r.u32("CRC32C")
        } catch {
            throw decodeError("header", error)
        }
        guard stored == crc else {
            throw .checksumMismatch(file: stateFile, part: "header", field: "CRC32C", stored: stored, computed: crc)
        }

        // Fields, in file order. Files of a newer minor may use reserved bits and bytes.
        let strict = minor <= currentMinor
        r = LEReader(bytes[0..<h])
        var header = SnapshotHeader(created: 0, writerVersion: "", memorySize: 0, vcpuCount: 1)
        header.formatMajor = major
        header.formatMinor = minor
        var layout = SnapshotLayout(
            fileSize: size, headerSize: declaredSize, headerCRC32C: stored, sectionCount: 0, sectionEntrySize: 0,
            sectionTableOffset: 0, sectionTableCRC32C: 0, entries: [])
        let memoryCRC: UInt32, memoryFlags: UInt32, reserved: [UInt8]
        do {
            try r.skip(16, "magic, format and header size")
            header.created = try r.u64("creation time")
            header.writerName = try r.fixedString(writerFieldWidth, "writer name")
            header.writerVersion = try r.fixedString(writerFieldWidth, "writer version")
            header.memorySize = try r.u64("guest memory size")
            header.vcpuCount = try r.u32("vCPU count")
            header.machineFlags = SnapshotMachineFlags(rawValue: try r.u32("machine flags"))
            header.memoryFileLength = try r.u64("memory.bin length")
            memoryCRC = try r.u32("memory.bin CRC32C")
            memoryFlags = try r.u32("memory flags")
            layout.sectionCount = try r.u32("section count")
            layout.sectionEntrySize = try r.u32("section entry size")
            layout.sectionTableOffset = try r.u64("section table offset")
            layout.sectionTableCRC32C = try r.u32("section table CRC32C")
            reserved = try r.raw(headerReservedRange.count, "reserved")
        } catch {
            throw decodeError("header", error)
        }

        if header.vcpuCount == 0 { throw headerError("vCPU count", "0: a machine has at least one vCPU") }
        let unknownMachine = header.machineFlags.rawValue & ~SnapshotMachineFlags.known.rawValue
        if strict && unknownMachine != 0 {
            throw headerError("machine flags", "reserved bits \(hex32(unknownMachine)) are set")
        }
        if header.memoryFileLength != header.memorySize {
            throw headerError("memory.bin length", "\(header.memoryFileLength) does not equal the guest memory size \(header.memorySize)")
        }
        let unknownMemory = memoryFlags & ~memoryCRCValidFlag
        if strict && unknownMemory != 0 {
            throw headerError("memory flags", "reserved bits \(hex32(unknownMemory)) are set")
        }
        if memoryFlags & memoryCRCValidFlag != 0 {
            header.memoryCRC32C = memoryCRC
        } else if strict && memoryCRC != 0 {
            throw headerError("memory.bin CRC32C", "is \(hex32(memoryCRC)) but the memory flags say it was not recorded")
        }
        if layout.sectionCount > maxSections {
            throw headerError("section count", "\(layout.sectionCount) is over the limit of \(maxSections)")
        }
        if layout.sectionEntrySize < sectionEntrySize {
            throw headerError("section entry size", "\(layout.sectionEntrySize) is smaller than the \(sectionEntrySize) bytes of format \(currentMajor).0")
        }
        if layout.sectionEntrySize > maxSectionEntrySize {
            throw headerError("section entry size", "\(layout.sectionEntrySize) is over the limit of \(maxSectionEntrySize)")
        }
        if layout.sectionTableOffset < UInt64(h) {
            throw headerError("section table offset", "\(layout.sectionTableOffset) is inside the header (\(h) bytes)")
        }
        if layout.sectionTableOffset % UInt64(payloadAlignment) != 0 {
            throw headerError("section table offset", "\(layout.sectionTableOffset) is not a multiple of \(payloadAlignment)")
        }
        if layout.sectionTableOffset > size {
            throw headerError("section table offset", "\(layout.sectionTableOffset) is past the end of the file (\(size) bytes)")
        }
        if strict, let index = reserved.firstIndex(where: { $0 != 0 }) {
            throw headerError("reserved", "byte \(headerReservedRange.lowerBound + index) is \(hex8(reserved[index])), must be zero in format \(currentMajor).\(currentMinor)")
        }
        return (header, layout)
    }

    static func decodeTable(_ bytes: [UInt8], layout: SnapshotLayout, strict: Bool) throws(SnapshotError) -> [SnapshotSectionEntry] {
        let size = layout.fileSize
        let tableEnd = layout.sectionTableEnd // offset <= file size <= 1 GiB and the table <= 4 MiB: no overflow
        guard tableEnd <= size else {
            throw .truncated(file: stateFile, part: "section table", needed: tableEnd, available: size)
        }
        let table = bytes[Int(layout.sectionTableOffset)..<Int(tableEnd)]
        let computed = CRC32C.checksum(table)
        guard computed == layout.sectionTableCRC32C else {
            throw .checksumMismatch(file: stateFile, part: "section table", field: "CRC32C",
                                    stored: layout.sectionTableCRC32C, computed: computed)
        }

        var r = LEReader(table)
        var entries: [SnapshotSectionEntry] = []
        entries.reserveCapacity(Int(layout.sectionCount))
        var names: [String: Int] = [:]
        for index in 0..<Int(layout.sectionCount) {
            var part = "section table entry \(index)"
            var entry = SnapshotSectionEntry(name: "", version: 0, minimumVersion: 0, flags: 0, offset: 0, length: 0, crc32c: 0)
            let rawName: [UInt8], reserved: [UInt8]
            do {
                rawName = try r.raw(nameWidth, "name")
                entry.version = try r.u16("version")
                entry.minimumVersion = try r.u16("minimum version")
                entry.flags = try r.u32("flags")
                entry.offset = try r.u64("payload offset")
                entry.length = try r.u64("payload length")
                entry.crc32c = try r.u32("payload CRC32C")
                reserved = try r.raw(entryReservedSize, "reserved")
                try r.skip(Int(layout.sectionEntrySize) - sectionEntrySize, "entry bytes of newer formats")
            } catch {
                throw decodeError(part, error)
            }

            let text = rawName.prefix { $0 != 0 }
            if rawName[text.count...].contains(where: { $0 != 0 }) {
                throw .invalid(file: stateFile, part: part, field: "name", reason: "bytes after the terminating NUL")
            }
            if let problem = nameProblem(Array(text)) {
                throw .invalid(file: stateFile, part: part, field: "name", reason: problem)
            }
            entry.name = String(decoding: text, as: UTF8.self)
            part = sectionPart(entry.name)
            if let first = names[entry.name] {
                throw .invalid(file: stateFile, part: part, field: "name", reason: "appears twice (entries \(first) and \(index))")
            }
            names[entry.name] = index

            if entry.minimumVersion > entry.version {
                throw .invalid(file: stateFile, part: part, field: "minimum version",
                               reason: "\(entry.minimumVersion) is above the section's version \(entry.version)")
            }
            let unknownFlags = entry.flags & ~sectionRequiredFlag
            if strict && unknownFlags != 0 {
                throw .invalid(file: stateFile, part: part, field: "flags", reason: "reserved bits \(hex32(unknownFlags)) are set")
            }
            if entry.offset % UInt64(payloadAlignment) != 0 {
                throw .invalid(file: stateFile, part: part, field: "payload offset", reason: "\(entry.offset) is not a multiple of \(payloadAlignment)")
            }
            if entry.offset < tableEnd {
                throw .invalid(file: stateFile, part: part, field: "payload offset",
                               reason: "\(entry.offset) is inside the header or the section table (which end at \(tableEnd))")
            }
            if entry.length > UInt64(maxPayloadSize) {
                throw .invalid(file: stateFile, part: part, field: "payload length",
                               reason: "\(entry.length) is over the limit of \(maxPayloadSize) bytes (256 MiB)")
            }
            let (end, overflow) = entry.offset.addingReportingOverflow(entry.length)
            if overflow || end > size {
                throw .truncated(file: stateFile, part: part + " payload", needed: overflow ? UInt64.max : end, available: size)
            }
            if strict, let at = reserved.firstIndex(where: { $0 != 0 }) {
                throw .invalid(file: stateFile, part: part, field: "reserved",
                               reason: "byte \(sectionEntrySize - entryReservedSize + at) is \(hex8(reserved[at])), must be zero in format \(currentMajor).\(currentMinor)")
            }
            entries.append(entry)
        }

        // Payloads must not overlap (empty ones occupy nothing).
        let placed = entries.filter { $0.length > 0 }.sorted { $0.offset < $1.offset }
        for (previous, next) in zip(placed, placed.dropFirst()) where next.offset < previous.offset + previous.length {
            throw .invalid(file: stateFile, part: sectionPart(next.name), field: "payload offset",
                           reason: "\(next.offset) overlaps the payload of section \"\(previous.name)\" (\(previous.offset)..<\(previous.offset + previous.length))")
        }
        return entries
    }

    /// In files of this minor version or older, every byte outside the header, the table and the
    /// payloads must be zero, so that no flipped bit goes unnoticed.
    static func checkPadding(_ bytes: [UInt8], layout: SnapshotLayout, header: SnapshotHeader) throws(SnapshotError) {
        guard isStrict(header) else { return }
        var covered: [(start: UInt64, end: UInt64)] = [(0, UInt64(layout.headerSize)), (layout.sectionTableOffset, layout.sectionTableEnd)]
        covered += layout.entries.map { (start: $0.offset, end: $0.offset + $0.length) }
        covered.sort { $0.start < $1.start }
        covered.append((start: UInt64(bytes.count), end: UInt64(bytes.count)))
        var cursor: UInt64 = 0
        for region in covered {
            if region.start > cursor {
                let gap = Int(cursor)..<Int(region.start)
                let zero = bytes[gap].withUnsafeBytes { clinux_all_zero($0.baseAddress!, $0.count) != 0 }
                if !zero, let at = bytes[gap].firstIndex(where: { $0 != 0 }) {
                    throw .invalid(file: stateFile, part: "padding", field: "offset \(at)",
                                   reason: "byte is \(hex8(bytes[at])); bytes outside the header, the section table and the payloads must be zero")
                }
            }
            cursor = max(cursor, region.end)
        }
    }

    /// The section an entry of the table describes, with its payload from `bytes` (unchecked).
    static func section(_ bytes: [UInt8], _ entry: SnapshotSectionEntry) -> SnapshotSection {
        SnapshotSection(name: entry.name, version: entry.version, minimumVersion: entry.minimumVersion,
                        required: entry.required, payload: Array(bytes[Int(entry.offset)..<Int(entry.offset + entry.length)]))
    }

    /// The CRC32C of one payload as it is in `bytes` (the entry comes from `decodeLayout`).
    static func payloadCRC32C(_ bytes: [UInt8], _ entry: SnapshotSectionEntry) -> UInt32 {
        CRC32C.checksum(bytes[Int(entry.offset)..<Int(entry.offset + entry.length)])
    }

    /// Whatever of the frozen fields (offsets 0..<88) the bytes hold, unvalidated.
    public static func frozenFields(_ bytes: [UInt8]) -> SnapshotFrozenFields {
        var fields = SnapshotFrozenFields(magic: Array(bytes.prefix(magic.count)))
        var r = LEReader(bytes.prefix(frozenPrefixSize))
        _ = try? r.skip(magic.count, "magic")
        fields.formatMajor = try? r.u16("format major")
        fields.formatMinor = try? r.u16("format minor")
        fields.headerSize = try? r.u32("header size")
        fields.created = try? r.u64("creation time")
        if let raw = try? r.raw(writerFieldWidth, "writer name") { fields.writerName = printable(raw.prefix { $0 != 0 }) }
        if let raw = try? r.raw(writerFieldWidth, "writer version") { fields.writerVersion = printable(raw.prefix { $0 != 0 }) }
        return fields
    }

    /// Why `name` (its UTF-8 bytes) is not a valid section name, or nil when it is.
    public static func nameProblem(_ name: [UInt8]) -> String? {
        if name.isEmpty { return "is empty" }
        if name.count > nameWidth { return "\"\(printable(name[...]))\" is longer than \(nameWidth) bytes" }
        let allowed = name.allSatisfy { b in
            (b >= 0x61 && b <= 0x7A) || (b >= 0x30 && b <= 0x39) || b == 0x2E || b == 0x5F || b == 0x2D
        }
        if !allowed { return "\"\(printable(name[...]))\" has characters outside [a-z0-9._-]" }
        return nil
    }

    // MARK: Helpers

    static func isStrict(_ header: SnapshotHeader) -> Bool {
        header.formatMajor == currentMajor && header.formatMinor <= currentMinor
    }

    package static func align(_ n: Int) -> Int { (n + payloadAlignment - 1) & ~(payloadAlignment - 1) }

    static func sectionPart(_ name: String) -> String { "section \"\(name)\"" }

    static func headerError(_ field: String, _ reason: String) -> SnapshotError {
        .invalid(file: stateFile, part: "header", field: field, reason: reason)
    }

    static func tooLarge(_ size: UInt64) -> SnapshotError {
        .invalid(file: stateFile, part: "", field: "size", reason: "\(size) bytes is over the limit of \(maxStateSize) (1 GiB)")
    }

    /// A bounded read failed (cannot happen after the size checks, but is reported, never trapped).
    static func decodeError(_ part: String, _ error: LEDecodeError) -> SnapshotError {
        switch error {
        case .invalid(let field, let reason):
            return .invalid(file: stateFile, part: part, field: field, reason: reason)
        case .truncated(let field, let needed, let available):
            return .invalid(file: stateFile, part: part, field: field, reason: "truncated (needs \(needed) bytes, \(available) left)")
        case .trailingBytes:
            return .invalid(file: stateFile, part: part, field: "end", reason: error.description)
        }
    }
}

/// Bytes as text: printable ASCII as is, anything else as \xNN.
func printable(_ bytes: some Collection<UInt8>) -> String {
    var s = ""
    for b in bytes {
        if b >= 0x20 && b < 0x7F && b != 0x22 && b != 0x5C {
            s.unicodeScalars.append(Unicode.Scalar(b))
        } else {
            let digits = String(b, radix: 16)
            s += "\\x" + (digits.count == 1 ? "0" : "") + digits
        }
    }
    return s
}

func hex8(_ v: UInt8) -> String {
    let digits = String(v, radix: 16)
    return "0x" + (digits.count == 1 ? "0" : "") + digits
}
