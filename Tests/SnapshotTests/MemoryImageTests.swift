import CLinux
import Glibc
import Snapshot
import Testing
import VMMSys
import WireFormat

@Suite struct MemoryImageTests {
    /// Extending by zeros and combining give exactly the checksum of the bytes themselves.
    @Test func zerosAndCombine() {
        var rng = SeededRandom(seed: 7)
        let a = (0..<5000).map { _ in UInt8.random(in: 0...255, using: &rng) }
        let b = (0..<7777).map { _ in UInt8.random(in: 0...255, using: &rng) }
        for n in [0, 1, 15, 4096, 1 << 20, 3 << 20 + 17] {
            let zeros = [UInt8](repeating: 0, count: n)
            #expect(clinux_crc32c_zeros(CRC32C.checksum(a), UInt64(n)) == CRC32C.checksum(a + zeros), "n \(n)")
            #expect(clinux_crc32c_zeros(0, UInt64(n)) == CRC32C.checksum(zeros))
        }
        #expect(clinux_crc32c_combine(CRC32C.checksum(a), CRC32C.checksum(b), UInt64(b.count)) == CRC32C.checksum(a + b))
        #expect(clinux_crc32c_combine(CRC32C.checksum(a), 0, 0) == CRC32C.checksum(a))
    }

    /// Anonymous memory with a few pages touched: only those are read, only the non-zero ones
    /// written; the checksums are those of the file's bytes.
    @Test func anonymousMemory() throws {
        let tmp = TempDirectory()
        let size = 5 << 20 + 3 * 4096 // a last chunk shorter than 1 MiB
        let mapping = try MemoryMapping.anonymous(size: size)
        let base = mapping.base
        base.storeBytes(of: 0xAB, toByteOffset: 4096 * 3 + 5, as: UInt8.self)
        base.storeBytes(of: 0xCD, toByteOffset: (2 << 20) + 100, as: UInt8.self)
        base.storeBytes(of: 0, toByteOffset: (4 << 20), as: UInt8.self) // touched, still zero
        base.storeBytes(of: 0xEF, toByteOffset: size - 1, as: UInt8.self)
        let path = tmp.path + "/m"
        let fd = try OwnedFD.createExclusive(path)
        try fd.truncate(to: UInt64(size))
        let regions = [UnsafeRawBufferPointer(start: base, count: 3 << 20), UnsafeRawBufferPointer(start: base + (3 << 20), count: size - (3 << 20))]
        let r = try MemoryImage.write(regions, to: fd.rawValue, parent: nil, shouldStop: { false })
        #expect(r.bytesWritten == 3 * 4096)
        #expect(r.bytesRead == 4 * 4096, "touched pages only")
        let bytes = readFile(path)
        #expect(bytes == Array(UnsafeRawBufferPointer(start: base, count: size)))
        #expect(r.crc == CRC32C.checksum(bytes))
        #expect(r.chunkCRCs.count == 6)
        for i in 0..<6 {
            let chunk = bytes[(i << 20)..<min(bytes.count, (i + 1) << 20)]
            #expect(r.chunkCRCs[i] == CRC32C.checksum(Array(chunk)), "chunk \(i)")
        }
        // Stopping before the first chunk: ECANCELED.
        #expect(throws: SysError("write memory", errno: ECANCELED)) {
            _ = try MemoryImage.write(regions, to: fd.rawValue, parent: nil, shouldStop: { true })
        }
    }

    /// A copy-on-write mapping of a parent file: chunks the "guest" never wrote are copied in the
    /// kernel with the parent's checksums; written chunks are read; holes stay holes.
    @Test func restoredFromParent() throws {
        let tmp = TempDirectory()
        let size = 4 << 20
        var parentBytes = [UInt8](repeating: 0, count: size)
        for i in 0..<4096 { parentBytes[(1 << 20) + i] = UInt8(truncatingIfNeeded: i) } // chunk 1 has data
        for i in 0..<4096 { parentBytes[(2 << 20) + 8192 + i] = 0x5A } // chunk 2 too
        let parentPath = tmp.path + "/parent"
        let pfd = try OwnedFD.open(parentPath, flags: O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode: 0o600)
        try pfd.truncate(to: UInt64(size))
        try parentBytes[(1 << 20)..<((1 << 20) + 4096)].withUnsafeBytes { try pfd.write($0, at: 1 << 20) }
        try parentBytes[((2 << 20) + 8192)..<((2 << 20) + 12288)].withUnsafeBytes { try pfd.write($0, at: (2 << 20) + 8192) }
        let parentCRCs = (0..<4).map { CRC32C.checksum(Array(parentBytes[($0 << 20)..<(($0 + 1) << 20)])) }
        let mapping = try MemoryMapping.privateFile(fd: pfd.rawValue, offset: 0, size: size)
        // The "guest" writes chunk 2 (another page) and chunk 3; chunks 0 and 1 stay unchanged.
        mapping.base.storeBytes(of: 0x77, toByteOffset: (2 << 20) + 5, as: UInt8.self)
        mapping.base.storeBytes(of: 0x88, toByteOffset: (3 << 20) + 4096, as: UInt8.self)
        var expected = parentBytes
        expected[(2 << 20) + 5] = 0x77
        expected[(3 << 20) + 4096] = 0x88

        let path = tmp.path + "/child"
        let fd = try OwnedFD.createExclusive(path)
        try fd.truncate(to: UInt64(size))
        let region = [UnsafeRawBufferPointer(start: mapping.base, count: size)]
        let r = try MemoryImage.write(region, to: fd.rawValue, parent: MemoryImageParent(fd: pfd.rawValue, chunkCRCs: parentCRCs),
                                      shouldStop: { false })
        #expect(readFile(path) == expected)
        #expect(r.crc == CRC32C.checksum(expected))
        #expect(r.chunkCRCs == (0..<4).map { CRC32C.checksum(Array(expected[($0 << 20)..<(($0 + 1) << 20)])) })
        #expect(r.bytesCopied == 4096, "chunk 1's data, copied")
        #expect(r.bytesRead == 3 * 4096, "chunk 2: the written page and the parent's data page; chunk 3: the written page")
        // A parent chunk checksum is trusted for unchanged chunks (a lie shows in the result, which
        // `snapshot verify` then catches): here chunk 1's.
        var lying = parentCRCs
        lying[1] ^= 1
        let fd2 = try OwnedFD.createExclusive(tmp.path + "/child2")
        try fd2.truncate(to: UInt64(size))
        let r2 = try MemoryImage.write(region, to: fd2.rawValue, parent: MemoryImageParent(fd: pfd.rawValue, chunkCRCs: lying),
                                       shouldStop: { false })
        #expect(r2.chunkCRCs[1] == lying[1] && r2.crc != r.crc)
        // Without the parent's checksums every page that may hold data is read.
        let fd3 = try OwnedFD.createExclusive(tmp.path + "/child3")
        try fd3.truncate(to: UInt64(size))
        let r3 = try MemoryImage.write(region, to: fd3.rawValue, parent: MemoryImageParent(fd: pfd.rawValue, chunkCRCs: nil),
                                       shouldStop: { false })
        #expect(r3.crc == r.crc && r3.bytesCopied == 0 && r3.bytesRead == 4 * 4096)
    }

    /// Enough chunks for the work to be shared among threads (a parent file, written and
    /// unwritten chunks, holes): the same bytes and checksums as one thread would give.
    @Test func sharedAmongThreads() throws {
        let tmp = TempDirectory()
        let size = 48 << 20
        let parentPath = tmp.path + "/parent"
        let pfd = try OwnedFD.open(parentPath, flags: O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode: 0o600)
        try pfd.truncate(to: UInt64(size))
        var rng = SeededRandom(seed: 3)
        var expected = [UInt8](repeating: 0, count: size)
        for chunk in stride(from: 0, to: 48, by: 3) { // data in every third chunk of the parent
            let page = (0..<4096).map { _ in UInt8.random(in: 1...255, using: &rng) }
            try page.withUnsafeBytes { try pfd.write($0, at: UInt64(chunk << 20) + 8192) }
            expected.replaceSubrange((chunk << 20) + 8192..<(chunk << 20) + 12288, with: page)
        }
        let parentCRCs = (0..<48).map { CRC32C.checksum(Array(expected[($0 << 20)..<(($0 + 1) << 20)])) }
        let mapping = try MemoryMapping.privateFile(fd: pfd.rawValue, offset: 0, size: size)
        for chunk in stride(from: 1, to: 48, by: 4) { // the "guest" writes every fourth chunk
            mapping.base.storeBytes(of: UInt8(chunk), toByteOffset: (chunk << 20) + 77, as: UInt8.self)
            expected[(chunk << 20) + 77] = UInt8(chunk)
        }
        let regions = [UnsafeRawBufferPointer(start: mapping.base, count: 20 << 20),
                       UnsafeRawBufferPointer(start: mapping.base + (20 << 20), count: size - (20 << 20))]
        let fd = try OwnedFD.open(tmp.path + "/child", flags: O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode: 0o600)
        try fd.truncate(to: UInt64(size))
        let r = try MemoryImage.write(regions, to: fd.rawValue, parent: MemoryImageParent(fd: pfd.rawValue, chunkCRCs: parentCRCs),
                                      shouldStop: { false })
        #expect(readFile(tmp.path + "/child") == expected)
        #expect(r.crc == CRC32C.checksum(expected))
        #expect(r.chunkCRCs == (0..<48).map { CRC32C.checksum(Array(expected[($0 << 20)..<(($0 + 1) << 20)])) })
        #expect(r.bytesCopied > 0 && r.bytesRead < 64 * 4096)
        // Forked, the same.
        let fd2 = try OwnedFD.open(tmp.path + "/child2", flags: O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode: 0o600)
        try fd2.truncate(to: UInt64(size))
        let r2 = try MemoryImage.startForked(regions, to: fd2.rawValue, parent: MemoryImageParent(fd: pfd.rawValue, chunkCRCs: parentCRCs))
            .wait(shouldStop: { false })
        #expect(r2.crc == r.crc && r2.chunkCRCs == r.chunkCRCs)
        #expect(readFile(tmp.path + "/child2") == expected)
        // Told to stop: no result.
        let fd3 = try OwnedFD.open(tmp.path + "/child3", flags: O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode: 0o600)
        #expect(throws: SysError("write memory", errno: ECANCELED)) {
            _ = try MemoryImage.write(regions, to: fd3.rawValue, parent: nil, shouldStop: { true })
        }
    }

    /// The forked writer sees memory as it was at the fork, whatever is written after.
    @Test func forkedWriterSeesTheInstant() throws {
        let tmp = TempDirectory()
        let size = 8 << 20
        let mapping = try MemoryMapping.anonymous(size: size)
        let words = mapping.base.assumingMemoryBound(to: UInt64.self)
        for i in 0..<(size / 8) { words[i] = UInt64(i) }
        let before = Array(UnsafeRawBufferPointer(start: mapping.base, count: size))
        let path = tmp.path + "/m"
        let fd = try OwnedFD.createExclusive(path)
        try fd.truncate(to: UInt64(size))
        let child = try MemoryImage.startForked([UnsafeRawBufferPointer(start: mapping.base, count: size)], to: fd.rawValue, parent: nil)
        for i in 0..<(size / 8) { words[i] = ~UInt64(i) } // the "guest" runs on
        let r = try child.wait(shouldStop: { false })
        #expect(readFile(path) == before)
        #expect(r.crc == CRC32C.checksum(before))
        #expect(r.bytesWritten == UInt64(size))
    }

    @Test func forkedWriterCancelled() throws {
        let tmp = TempDirectory()
        let size = 64 << 20
        let mapping = try MemoryMapping.anonymous(size: size)
        memset(mapping.base, 1, size)
        let fd = try OwnedFD.createExclusive(tmp.path + "/m")
        try fd.truncate(to: UInt64(size))
        let child = try MemoryImage.startForked([UnsafeRawBufferPointer(start: mapping.base, count: size)], to: fd.rawValue, parent: nil)
        #expect(throws: SysError("write memory", errno: ECANCELED)) { _ = try child.wait(shouldStop: { true }) }
    }
}


@Suite struct MemoryChunksSectionTests {
    func section(_ size: UInt32, _ count: UInt32, _ crcs: [UInt32], version: UInt16 = 1, minimum: UInt16 = 1) -> [SnapshotSection] {
        var w = LEWriter()
        w.u32(size)
        w.u32(count)
        for c in crcs { w.u32(c) }
        return [SnapshotSection(name: MemoryChunks.name, version: version, minimumVersion: minimum, required: false, payload: w.bytes)]
    }

    @Test func decodesAndRefuses() throws {
        #expect(try MemoryChunks.decode([], memoryLength: 1 << 20) == nil)
        #expect(try MemoryChunks.decode(section(1 << 20, 2, [7, 8]), memoryLength: (1 << 20) + 4096) == [7, 8])
        // Another chunk size or a layout that needs a newer reader: not usable, not an error.
        #expect(try MemoryChunks.decode(section(1 << 21, 1, [7]), memoryLength: 1 << 20) == nil)
        #expect(try MemoryChunks.decode(section(1 << 20, 1, [7], version: 2, minimum: 2), memoryLength: 1 << 20) == nil)
        // A newer compatible layout with more fields after ours: loaded.
        #expect(try MemoryChunks.decode(section(1 << 20, 1, [7, 99], version: 2, minimum: 1), memoryLength: 1 << 20) == [7])
        let errors: [(UInt32, [UInt32], UInt64, String)] = [
            (3, [1, 2, 3], 2 << 20, "count: 3 chunks, but memory.bin has 2"),
            (2, [1], 2 << 20, "chunk CRC32Cs: truncated (needs 8 bytes, 4 left)"),
            (0xFFFF_FFFF, [], 0xFFFF_FFFF << 20, "chunk CRC32Cs: truncated (needs 17179869180 bytes, 0 left)"),
            (1, [1], UInt64.max, "count: 1 chunks, but memory.bin has 17592186044416"),
        ]
        for (count, crcs, length, message) in errors {
            #expect(throws: SnapshotError.self) { _ = try MemoryChunks.decode(section(1 << 20, count, crcs), memoryLength: length) }
            do { _ = try MemoryChunks.decode(section(1 << 20, count, crcs), memoryLength: length) } catch {
                #expect(error.description == "state.bin: section \"memory.chunks\": \(message)")
            }
        }
        // Trailing bytes after a layout this reader knows completely are refused.
        #expect(throws: SnapshotError.self) { _ = try MemoryChunks.decode(section(1 << 20, 1, [7, 99]), memoryLength: 1 << 20) }
    }
}
