import Glibc
import Snapshot
import Testing
import WireFormat

@Suite struct WorkingSetTests {
    @Test func runsFromPages() {
        #expect(WorkingSet.runs([false, true, true, false, true]) == [.init(firstPage: 1, pages: 2), .init(firstPage: 4, pages: 1)])
        #expect(WorkingSet.runs([Bool]()).isEmpty)
        #expect(WorkingSet.runs([true]) == [.init(firstPage: 0, pages: 1)])
    }

    @Test func roundTripAndRefusals() throws {
        let runs: [WorkingSet.Run] = [.init(firstPage: 0, pages: 3), .init(firstPage: 10, pages: 246)]
        let length: UInt64 = 1 << 20
        let bytes = WorkingSet.encode(runs, memoryLength: length)
        #expect(bytes.count == 28 + 24 + 4)
        #expect(try WorkingSet.decode(bytes, memoryLength: length) == runs)
        #expect(throws: LEDecodeError.invalid(field: "memory length", reason: "1048576 bytes, but memory.bin has 2097152")) {
            _ = try WorkingSet.decode(bytes, memoryLength: 2 << 20)
        }
        // Every single flipped byte is caught (the CRC), every truncation too.
        for i in bytes.indices {
            var b = bytes
            b[i] ^= 0x20
            #expect(throws: LEDecodeError.self) { _ = try WorkingSet.decode(b, memoryLength: length) }
        }
        for n in 0..<bytes.count {
            #expect(throws: LEDecodeError.self) { _ = try WorkingSet.decode(Array(bytes.prefix(n)), memoryLength: length) }
        }
        // Well-formed files with bad runs: out of range, overlapping, empty, past the end.
        let bad: [[WorkingSet.Run]] = [
            [.init(firstPage: 255, pages: 2)], [.init(firstPage: 0, pages: 5), .init(firstPage: 4, pages: 1)],
            [.init(firstPage: 3, pages: 0)], [.init(firstPage: UInt64.max, pages: 1)], [.init(firstPage: 257, pages: 1)],
        ]
        for runs in bad {
            #expect(throws: LEDecodeError.self) { _ = try WorkingSet.decode(WorkingSet.encode(runs, memoryLength: length), memoryLength: length) }
        }
        #expect(try WorkingSet.decode(WorkingSet.encode([.init(firstPage: 255, pages: 1)], memoryLength: length), memoryLength: length).count == 1)
        // A header that claims a huge run count is refused before anything is allocated.
        var huge = WorkingSet.encode([], memoryLength: length)
        huge.removeLast(4)
        huge.replaceSubrange(24..<28, with: [0xFF, 0xFF, 0xFF, 0x7F])
        huge += withUnsafeBytes(of: CRC32C.checksum(huge).littleEndian) { Array($0) }
        #expect(throws: LEDecodeError.invalid(field: "run count", reason: "2147483647 is over the limit of 1048576")) {
            _ = try WorkingSet.decode(huge, memoryLength: length)
        }
    }

    @Test func storeLoadNeverReplaces() throws {
        let tmp = TempDirectory()
        #expect(try WorkingSet.load(directory: tmp.path, memoryLength: 1 << 20) == nil)
        let runs: [WorkingSet.Run] = [.init(firstPage: 2, pages: 7)]
        #expect(try WorkingSet.store(runs, directory: tmp.path, memoryLength: 1 << 20))
        #expect(try WorkingSet.load(directory: tmp.path, memoryLength: 1 << 20) == runs)
        #expect(try !WorkingSet.store([.init(firstPage: 0, pages: 1)], directory: tmp.path, memoryLength: 1 << 20), "the first one stays")
        #expect(try WorkingSet.load(directory: tmp.path, memoryLength: 1 << 20) == runs)
        #expect(tmp.entries() == [WorkingSet.fileName], "no temporary file left")
        // A damaged file is an error to log, not a crash; a read-only directory cannot take one.
        writeFile(tmp.path + "/x", [1])
        #expect(throws: SnapshotError.self) { _ = try WorkingSet.load(directory: tmp.path, memoryLength: 2 << 20) }
        #expect(throws: SnapshotError.self) { try WorkingSet.store(runs, directory: tmp.path + "/missing", memoryLength: 1 << 20) }
    }
}

@Suite struct WorkingSetCapTests {
    @Test func cappedFillsTheShortestGaps() throws {
        let runs: [WorkingSet.Run] = [.init(firstPage: 0, pages: 1), .init(firstPage: 2, pages: 1), .init(firstPage: 10, pages: 2),
                                      .init(firstPage: 13, pages: 1), .init(firstPage: 40, pages: 1)]
        #expect(WorkingSet.capped(runs, to: 5) == runs)
        let three = WorkingSet.capped(runs, to: 3)
        #expect(three == [.init(firstPage: 0, pages: 3), .init(firstPage: 10, pages: 4), .init(firstPage: 40, pages: 1)])
        #expect(WorkingSet.capped(runs, to: 1) == [.init(firstPage: 0, pages: 41)])
        // Every recorded page stays in the capped set.
        for limit in 1...5 {
            let capped = WorkingSet.capped(runs, to: limit)
            #expect(capped.count <= limit)
            for run in runs {
                #expect(capped.contains { $0.firstPage <= run.firstPage && run.firstPage + UInt64(run.pages) <= $0.firstPage + UInt64($0.pages) })
            }
        }
        // A recorder with more runs than a reader takes still writes a file readers take.
        let many = (0..<(WorkingSet.maxRuns + 10)).map { WorkingSet.Run(firstPage: UInt64($0) * 2, pages: 1) }
        let length = UInt64(WorkingSet.maxRuns + 10) * 2 * 4096
        let tmp = TempDirectory()
        try WorkingSet.store(many, directory: tmp.path, memoryLength: length)
        let loaded = try #require(try WorkingSet.load(directory: tmp.path, memoryLength: length))
        #expect(loaded.count <= WorkingSet.maxRuns)
    }
}
