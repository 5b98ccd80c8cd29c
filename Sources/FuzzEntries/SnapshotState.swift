import Snapshot
import VMMSys

extension Fuzz {
    /// `fuzz-snapshot`: arbitrary bytes as a snapshot's state.bin. `decodeState` must either accept
    /// them or throw a one-line `SnapshotError`; `inspect`'s listing must never trap either. An
    /// accepted 1.0 file must re-encode to something that decodes to the same header and sections.
    ///
    /// Random bytes almost never carry valid CRC32Cs, which would keep the fuzzer at the header
    /// checksum; so each input is also tried with its checksums recomputed, to exercise the checks
    /// behind them (sizes, bounds, overlaps, names, reserved bits, padding).
    public static func snapshotState(_ bytes: [UInt8]) {
        checkSnapshotState(bytes)
        let resigned = withChecksumsRecomputed(bytes)
        if resigned != bytes { checkSnapshotState(resigned) }
    }

    private static func checkSnapshotState(_ bytes: [UInt8]) {
        _ = SnapshotInspector.describe(state: bytes)
        let header: SnapshotHeader, sections: [SnapshotSection]
        do {
            (header, sections) = try SnapshotFormat.decodeState(bytes)
        } catch {
            precondition(!error.description.contains("\n"), "multi-line error: \(error)")
            return
        }
        for section in sections {
            _ = try? section.loadDecision(SectionSupport(current: 2))
            _ = try? section.loadDecision(nil)
        }
        // The chunk checksums: refused in one line or exactly one per chunk of memory.bin.
        do {
            if let crcs = try MemoryChunks.decode(sections, memoryLength: header.memoryFileLength) {
                precondition(crcs.count == MemoryImage.chunkCount(length: header.memoryFileLength), "wrong chunk count")
            }
        } catch {
            precondition(!error.description.contains("\n"), "multi-line error: \(error)")
        }
        guard header.formatMinor == SnapshotFormat.currentMinor else { return } // newer minors may use reserved bits
        let again: [UInt8]
        do {
            again = try SnapshotFormat.encodeState(header: header, sections: sections)
        } catch {
            fatalError("an accepted snapshot does not re-encode: \(error)")
        }
        do {
            let (h, s) = try SnapshotFormat.decodeState(again)
            precondition(h == header && s == sections, "re-encoded snapshot decodes differently")
        } catch {
            fatalError("a re-encoded snapshot does not decode: \(error)")
        }
    }

    /// The payload, table and header CRC32Cs recomputed wherever the fields that locate them fit in
    /// the input (format 1.0 offsets; anything that does not fit is left alone).
    private static func withChecksumsRecomputed(_ input: [UInt8]) -> [UInt8] {
        var b = input
        guard b.count >= 192 else { return b }
        func get(_ offset: Int, _ size: Int) -> UInt64 {
            var v: UInt64 = 0
            for i in 0..<size { v |= UInt64(b[offset + i]) << (8 * UInt64(i)) }
            return v
        }
        func put(_ value: UInt32, _ offset: Int) {
            for i in 0..<4 { b[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) }
        }
        let h = Int(get(12, 4)), n = get(120, 4), e = get(124, 4), t = get(128, 8)
        if n <= 4096, e >= 64, e <= 1024, t <= UInt64(b.count), t + n * e <= UInt64(b.count) {
            let table = Int(t), count = Int(n), entry = Int(e)
            for i in 0..<count {
                let at = table + i * entry
                let offset = get(at + 24, 8), length = get(at + 32, 8)
                if offset <= UInt64(b.count), length <= UInt64(b.count) - offset {
                    put(CRC32C.checksum(b[Int(offset)..<Int(offset + length)]), at + 40)
                }
            }
            put(CRC32C.checksum(b[table..<(table + count * entry)]), 136)
        }
        let headerEnd = min(max(h, 192), b.count)
        put(0, 188)
        put(CRC32C.checksum(b[0..<headerEnd]), 188)
        return b
    }
}
