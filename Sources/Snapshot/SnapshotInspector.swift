import Glibc
import VMMSys

/// Human-readable listing of a snapshot (`swiftvmm snapshot inspect`). Works on any format version:
/// the frozen fields (magic, format, header size, creation time, writer) are always shown, and when
/// the rest cannot be read the listing says why instead of failing.
public enum SnapshotInspector {
    /// The listing of `DIR/state.bin` and `DIR/memory.bin`. Payload checksums are not checked
    /// here (that is `SnapshotReader.verify`).
    public static func describe(directory: String) -> String {
        let dir = trimmingTrailingSlashes(directory)
        var text = "snapshot \(dir)\n"
        do {
            text += describe(state: try SnapshotReader.readState(directory: dir))
        } catch {
            text += "cannot read \(SnapshotFormat.stateFile): \(error)\n"
        }
        let memoryPath = dir + "/" + SnapshotFormat.memoryFile
        do {
            let st = try FileStatus.of(memoryPath)
            let size = st.size, allocated = st.allocatedBytes
            text += row(SnapshotFormat.memoryFile, "\(size) bytes\(humanSize(size)), \(allocated) bytes\(humanSize(allocated)) allocated on disk")
        } catch {
            text += row(SnapshotFormat.memoryFile, "cannot stat: \(String(cString: strerror(error.errno)))")
        }
        return text
    }

    /// The listing of the bytes of a state.bin (pure; the fuzz target runs it on arbitrary input).
    public static func describe(state bytes: [UInt8]) -> String {
        var text = row(SnapshotFormat.stateFile, "\(bytes.count) bytes")
        let frozen = SnapshotFormat.frozenFields(bytes)
        guard frozen.magicIsValid else {
            do {
                _ = try SnapshotFormat.decodeHeader(bytes)
            } catch {
                text += "cannot list anything: \(error)\n"
            }
            return text
        }
        text += row("magic", "\"\(printable(frozen.magic))\"")
        if let major = frozen.formatMajor, let minor = frozen.formatMinor { text += row("format", "\(major).\(minor)") }
        if let size = frozen.headerSize { text += row("header size", "\(size) bytes") }
        if let created = frozen.created { text += row("created", formatTime(created)) }
        if let name = frozen.writerName, let version = frozen.writerVersion { text += row("writer", "\(name) \(version)") }

        let header: SnapshotHeader
        var layout: SnapshotLayout
        do {
            (header, layout) = try SnapshotFormat.decodeHeader(bytes)
        } catch {
            text += "cannot list the other header fields or the sections: \(error)\n"
            return text
        }
        text += row("guest memory", "\(header.memorySize) bytes\(humanSize(header.memorySize))")
        text += row("vCPUs", "\(header.vcpuCount)")
        var flagNames: [String] = []
        if header.machineFlags.contains(.acpi) { flagNames.append("acpi") }
        let unknown = header.machineFlags.rawValue & ~SnapshotMachineFlags.known.rawValue
        if unknown != 0 { flagNames.append("unknown \(hex32(unknown))") }
        text += row("machine flags", hex32(header.machineFlags.rawValue) + (flagNames.isEmpty ? "" : " (\(flagNames.joined(separator: ", ")))"))
        text += row("memory.bin length", "\(header.memoryFileLength) bytes")
        text += row("memory.bin CRC32C", header.memoryCRC32C.map(hex32) ?? "not recorded")
        text += row("header CRC32C", hex32(layout.headerCRC32C))
        text += row("section table", "\(layout.sectionCount) entries of \(layout.sectionEntrySize) bytes at offset \(layout.sectionTableOffset), CRC32C \(hex32(layout.sectionTableCRC32C))")

        do {
            layout.entries = try SnapshotFormat.decodeTable(bytes, layout: layout, strict: SnapshotFormat.isStrict(header))
        } catch {
            text += "cannot list the sections: \(error)\n"
            return text
        }
        text += "sections (\(layout.entries.count)):\n"
        let columns = [("NAME", 16, false), ("VERSION", 7, true), ("MINIMUM", 7, true), ("FLAGS", 8, false),
                       ("OFFSET", 10, true), ("LENGTH", 10, true), ("CRC32C", 10, false)]
        func line(_ cells: [String]) -> String {
            var out = ""
            for (cell, column) in zip(cells, columns) {
                let pad = String(repeating: " ", count: max(0, column.1 - cell.count))
                out += "  " + (column.2 ? pad + cell : cell + pad)
            }
            while out.hasSuffix(" ") { out.removeLast() }
            return out + "\n"
        }
        text += line(columns.map(\.0))
        for entry in layout.entries {
            var flags = entry.required ? "required" : "optional"
            let unknownFlags = entry.flags & ~SnapshotFormat.sectionRequiredFlag
            if unknownFlags != 0 { flags += "+\(hex32(unknownFlags))" }
            text += line([entry.name, "\(entry.version)", "\(entry.minimumVersion)", flags,
                          "\(entry.offset)", "\(entry.length)", hex32(entry.crc32c)])
        }
        return text
    }

    static func row(_ label: String, _ value: String) -> String {
        label + String(repeating: " ", count: max(1, 19 - label.count)) + value + "\n"
    }

    /// Unix nanoseconds as UTC, e.g. `2025-06-01 12:00:00.123456789 UTC`.
    static func formatTime(_ ns: UInt64) -> String {
        var seconds = time_t(ns / 1_000_000_000)
        var parts = tm()
        guard gmtime_r(&seconds, &parts) != nil else { return "\(ns) ns since 1970" }
        func pad(_ v: Int, _ width: Int) -> String {
            let s = String(v)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        return "\(pad(Int(parts.tm_year) + 1900, 4))-\(pad(Int(parts.tm_mon) + 1, 2))-\(pad(Int(parts.tm_mday), 2)) "
            + "\(pad(Int(parts.tm_hour), 2)):\(pad(Int(parts.tm_min), 2)):\(pad(Int(parts.tm_sec), 2))"
            + ".\(pad(Int(ns % 1_000_000_000), 9)) UTC"
    }

    /// " (1.5 MiB)" for sizes of 1 KiB and more, else "".
    static func humanSize(_ bytes: UInt64) -> String {
        let units: [(String, UInt64)] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        for (name, unit) in units where bytes >= unit {
            let whole = bytes / unit, tenth = (bytes % unit) * 10 / unit // no overflow for any UInt64
            return tenth == 0 ? " (\(whole) \(name))" : " (\(whole).\(tenth) \(name))"
        }
        return ""
    }
}
