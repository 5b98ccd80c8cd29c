import CLinux
import Glibc
import VMMSys

/// A snapshot whose state.bin has been read and fully validated, with memory.bin open read-only
/// (not read: restore maps it MAP_PRIVATE, so guest pages come in on demand).
public final class LoadedSnapshot: Sendable {
    public let directory: String
    public let header: SnapshotHeader
    /// The sections in table order.
    public let sections: [SnapshotSection]
    public let layout: SnapshotLayout
    /// `DIR/memory.bin`, open read-only; its length equals `header.memorySize`.
    public let memoryPath: String
    public let memoryFile: OwnedFD
    /// The CRC32C of each 1 MiB chunk of memory.bin (section `memory.chunks`), if the writer recorded them.
    public let memoryChunkCRCs: [UInt32]?

    init(directory: String, header: SnapshotHeader, sections: [SnapshotSection], layout: SnapshotLayout,
         memoryPath: String, memoryFile: consuming OwnedFD, memoryChunkCRCs: [UInt32]?) {
        self.memoryChunkCRCs = memoryChunkCRCs
        self.directory = directory
        self.header = header
        self.sections = sections
        self.layout = layout
        self.memoryPath = memoryPath
        self.memoryFile = memoryFile
    }

    /// The descriptor of memory.bin, valid while this object lives.
    public var memoryFileDescriptor: Int32 { memoryFile.rawValue }

    public func section(named name: String) -> SnapshotSection? {
        sections.first { $0.name == name }
    }

    /// The section, or `SnapshotError.missingSection`.
    public func requireSection(named name: String) throws(SnapshotError) -> SnapshotSection {
        guard let section = section(named: name) else { throw .missingSection(name: name) }
        return section
    }

    /// The sections whose names `isKnown` rejects: throws for the first required one, returns the
    /// optional ones (which the caller skips, perhaps with a note in its log).
    public func unknownSections(isKnown: (String) -> Bool) throws(SnapshotError) -> [SnapshotSection] {
        var skipped: [SnapshotSection] = []
        for section in sections where !isKnown(section.name) {
            if section.required { throw .unknownRequiredSection(name: section.name) }
            skipped.append(section)
        }
        return skipped
    }
}

/// The result of `SnapshotReader.verify`: every check made, passed or failed.
public struct SnapshotVerifyReport: Equatable, Sendable, CustomStringConvertible {
    public struct Check: Equatable, Sendable {
        /// What was checked, e.g. `state.bin header`, `state.bin section "vcpu.0"`, `memory.bin CRC32C`.
        public var name: String
        public var ok: Bool
        /// The values found, or for a failure the one-line error.
        public var detail: String
    }

    public var directory: String
    public var checks: [Check]

    /// True when every check passed (and there was at least one).
    public var ok: Bool { !checks.isEmpty && checks.allSatisfy(\.ok) }

    public func check(named name: String) -> Check? { checks.first { $0.name == name } }

    /// One line per check, then a verdict.
    public var description: String {
        var lines = checks.map { "\($0.ok ? "ok    " : "FAILED") \($0.name): \($0.detail)" }
        let failed = checks.filter { !$0.ok }.count
        lines.append(ok ? "\(directory): all \(checks.count) checks passed"
                        : "\(directory): \(failed) of \(checks.count) checks failed")
        return lines.joined(separator: "\n")
    }
}

public enum SnapshotReader {
    /// Reads `DIR/state.bin` (refusing a file over the 1 GiB cap before reading it), decodes and
    /// validates all of it, and opens `DIR/memory.bin` read-only, checking its length against the
    /// header. Nothing is done to KVM; the memory is neither read nor checksummed here.
    public static func open(directory: String) throws(SnapshotError) -> LoadedSnapshot {
        let dir = trimmingTrailingSlashes(directory)
        let bytes = try readState(directory: dir)
        let (header, layout, sections) = try SnapshotFormat.decode(bytes)
        let memoryPath = dir + "/" + SnapshotFormat.memoryFile
        let fd = try openRegularFile(memoryPath)
        let length = try fileSize(fd, memoryPath)
        guard length == header.memoryFileLength else {
            throw memoryLengthError(length, header)
        }
        let chunkCRCs = try MemoryChunks.decode(sections, memoryLength: header.memoryFileLength)
        return LoadedSnapshot(directory: dir, header: header, sections: sections, layout: layout,
                              memoryPath: memoryPath, memoryFile: fd, memoryChunkCRCs: chunkCRCs)
    }

    /// The bytes of `DIR/state.bin`, size-capped before anything is read.
    public static func readState(directory: String) throws(SnapshotError) -> [UInt8] {
        let path = trimmingTrailingSlashes(directory) + "/" + SnapshotFormat.stateFile
        let fd = try openRegularFile(path)
        let size = try fileSize(fd, path)
        if size > UInt64(SnapshotFormat.maxStateSize) { throw SnapshotFormat.tooLarge(size) }
        var bytes = [UInt8](repeating: 0, count: Int(size))
        // Fewer bytes than fstat said: the file shrank meanwhile, and decoding reports it as truncated.
        let result: Result<Int, SysError> = bytes.withUnsafeMutableBytes { buffer in
            Result { () throws(SysError) in try fd.readFully(into: buffer, at: 0) }
        }
        switch result {
        case .success(let count): bytes.removeSubrange(count...)
        case .failure(let error): throw .system(path: path, operation: "read", errno: error.errno)
        }
        return bytes
    }

    /// Checks everything: the header, the table and every payload's CRC32C, the padding, the
    /// length of memory.bin and its CRC32C (read in pieces, never whole; not read at all when its
    /// length is wrong). Never throws: a problem is a failed check.
    public static func verify(directory: String) -> SnapshotVerifyReport {
        let dir = trimmingTrailingSlashes(directory)
        var report = SnapshotVerifyReport(directory: dir, checks: [])
        func add(_ name: String, _ ok: Bool, _ detail: String) {
            report.checks.append(.init(name: name, ok: ok, detail: detail))
        }
        let state = SnapshotFormat.stateFile
        let bytes: [UInt8]
        do {
            bytes = try readState(directory: dir)
        } catch {
            add(state, false, error.description)
            return report
        }
        add(state, true, "\(bytes.count) bytes")

        let header: SnapshotHeader
        var layout: SnapshotLayout
        do {
            (header, layout) = try SnapshotFormat.decodeHeader(bytes)
            add("\(state) header", true, "format \(header.formatMajor).\(header.formatMinor), CRC32C \(hex32(layout.headerCRC32C))")
        } catch {
            add("\(state) header", false, error.description)
            return report
        }

        do {
            layout.entries = try SnapshotFormat.decodeTable(bytes, layout: layout, strict: SnapshotFormat.isStrict(header))
            add("\(state) section table", true, "\(layout.entries.count) sections, CRC32C \(hex32(layout.sectionTableCRC32C))")
        } catch {
            add("\(state) section table", false, error.description)
        }
        var chunksEntry: SnapshotSectionEntry? // memory.chunks, when its payload is intact
        for entry in layout.entries {
            let computed = SnapshotFormat.payloadCRC32C(bytes, entry)
            let name = "\(state) section \"\(entry.name)\""
            if computed == entry.crc32c {
                if entry.name == MemoryChunks.name { chunksEntry = entry }
                add(name, true, "\(entry.length) bytes, CRC32C \(hex32(computed))")
            } else {
                add(name, false, SnapshotError.checksumMismatch(
                    file: state, part: "section \"\(entry.name)\"", field: "payload CRC32C", stored: entry.crc32c, computed: computed).description)
            }
        }
        if !layout.entries.isEmpty || layout.sectionCount == 0 {
            do {
                try SnapshotFormat.checkPadding(bytes, layout: layout, header: header)
                add("\(state) padding", true, "zero")
            } catch {
                add("\(state) padding", false, error.description)
            }
        }

        let memoryPath = dir + "/" + SnapshotFormat.memoryFile
        let memory = SnapshotFormat.memoryFile
        do {
            let fd = try openRegularFile(memoryPath)
            let length = try fileSize(fd, memoryPath)
            if length == header.memoryFileLength {
                add("\(memory) length", true, "\(length) bytes")
            } else {
                // Not read: the file may be far larger than the snapshot (a sparse 64 GiB file takes
                // minutes), and its checksum cannot match anyway.
                add("\(memory) length", false, memoryLengthError(length, header).description + "; its CRC32C is not checked")
                return report
            }
            let (computed, chunks) = try checksum(fd, length: length, path: memoryPath)
            // The chunk checksums, when their section is there and intact (a damaged one already failed above).
            if let entry = chunksEntry {
                do throws(SnapshotError) {
                    if let stored = try MemoryChunks.decode([SnapshotFormat.section(bytes, entry)], memoryLength: length) {
                        if let bad = zip(stored, chunks).enumerated().first(where: { $0.element.0 != $0.element.1 }) {
                            let offset = UInt64(bad.offset) * UInt64(MemoryImage.chunkSize)
                            add("\(memory) chunks", false, SnapshotError.checksumMismatch(
                                file: memory, part: "chunk \(bad.offset) (offset 0x\(String(offset, radix: 16)))", field: "CRC32C",
                                stored: bad.element.0, computed: bad.element.1).description)
                        } else {
                            add("\(memory) chunks", true, "\(chunks.count) chunk CRC32Cs match")
                        }
                    }
                } catch {
                    add("\(memory) chunks", false, error.description)
                }
            }
            if let stored = header.memoryCRC32C {
                if stored == computed {
                    add("\(memory) CRC32C", true, hex32(computed))
                } else {
                    add("\(memory) CRC32C", false, SnapshotError.checksumMismatch(
                        file: memory, part: "contents", field: "CRC32C", stored: stored, computed: computed).description)
                }
            } else {
                add("\(memory) CRC32C", true, "not recorded in the header (computed \(hex32(computed)))")
            }
        } catch {
            add(memory, false, error.description)
        }
        return report
    }

    /// CRC32C of the first `length` bytes of a file, and of each `MemoryImage.chunkSize` chunk of
    /// them, read in 8 MiB pieces.
    static func checksum(_ fd: borrowing OwnedFD, length: UInt64, path: String) throws(SnapshotError) -> (UInt32, [UInt32]) {
        let piece = 8 << 20, chunkSize = MemoryImage.chunkSize
        var buffer = [UInt8](repeating: 0, count: Int(min(UInt64(piece), length)))
        var crc: UInt32 = 0
        var chunks: [UInt32] = []
        var offset: UInt64 = 0
        while offset < length {
            let want = Int(min(UInt64(piece), length - offset))
            let result: Result<Int, SysError> = buffer.withUnsafeMutableBytes { b in
                Result { () throws(SysError) in try fd.readFully(into: UnsafeMutableRawBufferPointer(rebasing: b[0..<want]), at: offset) }
            }
            let n: Int
            switch result {
            case .success(let count): n = count
            case .failure(let error): throw .system(path: path, operation: "read", errno: error.errno)
            }
            if n == 0 { break }
            // Pieces are whole chunks (8 MiB), except where the file ends.
            for start in stride(from: 0, to: n, by: chunkSize) {
                let slice = buffer[start..<min(n, start + chunkSize)]
                let chunk = CRC32C.update(0, slice)
                chunks.append(chunk)
                crc = clinux_crc32c_combine(crc, chunk, UInt64(slice.count))
            }
            offset += UInt64(n)
        }
        return (crc, chunks)
    }

    /// Opens a file read-only, refusing anything but a regular file (O_NONBLOCK so that a FIFO
    /// put in place of a snapshot file cannot block the open).
    static func openRegularFile(_ path: String) throws(SnapshotError) -> OwnedFD {
        let fd: OwnedFD
        do {
            fd = try OwnedFD.open(path, flags: O_RDONLY | O_NONBLOCK)
        } catch {
            throw .system(path: path, operation: "open", errno: error.errno)
        }
        if try status(fd, path).kind != .regular {
            throw .invalid(file: path, part: "", field: "type", reason: "not a regular file")
        }
        return fd
    }

    static func fileSize(_ fd: borrowing OwnedFD, _ path: String) throws(SnapshotError) -> UInt64 {
        try status(fd, path).size
    }

    static func status(_ fd: borrowing OwnedFD, _ path: String) throws(SnapshotError) -> FileStatus {
        do {
            return try fd.status()
        } catch {
            throw .system(path: path, operation: "fstat", errno: error.errno)
        }
    }

    static func memoryLengthError(_ length: UInt64, _ header: SnapshotHeader) -> SnapshotError {
        .invalid(file: SnapshotFormat.memoryFile, part: "", field: "length",
                 reason: "the file has \(length) bytes, the header says \(header.memoryFileLength)")
    }
}
