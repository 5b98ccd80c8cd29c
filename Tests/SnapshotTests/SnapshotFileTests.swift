import CLinux
import Glibc
import Testing
import Snapshot

/// Guest-memory-like regions: anonymous mappings, mostly zero.
final class FakeMemory {
    let regions: [UnsafeMutableRawBufferPointer]

    init(sizes: [Int]) {
        regions = sizes.map { size in
            let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
            precondition(p != MAP_FAILED)
            return UnsafeMutableRawBufferPointer(start: p, count: size)
        }
    }

    deinit { for r in regions { munmap(r.baseAddress, r.count) } }

    var buffers: [UnsafeRawBufferPointer] { regions.map { UnsafeRawBufferPointer($0) } }
    var total: Int { regions.reduce(0) { $0 + $1.count } }

    /// Everything concatenated, as memory.bin must hold it.
    var contents: [UInt8] { regions.flatMap { Array($0) } }

    /// A few scattered non-zero bytes, including the region edges.
    func scribble() {
        for (i, r) in regions.enumerated() {
            r[0] = 0xA0 + UInt8(i)
            r[r.count - 1] = 0x5A
            if r.count > 3 * 4096 + 100 { r[3 * 4096 + 100] = 0x77 }
            if r.count > (1 << 20) + 5 { r[(1 << 20) + 5] = 0x11 }
        }
    }
}

@Suite(.serialized) struct SnapshotFileTests {
    func header(for memory: FakeMemory) -> SnapshotHeader {
        SnapshotHeader(created: SnapshotHeader.now(), writerVersion: "test", memorySize: UInt64(memory.total), vcpuCount: 1)
    }

    @Test func writeThenOpen() throws {
        let tmp = TempDirectory()
        let memory = FakeMemory(sizes: [8 << 20, 12288, 1 << 20])
        memory.scribble()
        let dir = tmp.path + "/snap"
        let result = try SnapshotWriter.write(directory: dir + "/", header: header(for: memory), sections: sampleSections(), memory: memory.buffers)
        #expect(tmp.entries() == ["snap"]) // no temporary directory left
        #expect(listDirectory(dir) == ["memory.bin", "state.bin"])

        let contents = memory.contents
        let independent = contents.withUnsafeBytes { clinux_crc32c_sw(0, $0.baseAddress, $0.count) }
        #expect(result.directory == dir)
        #expect(result.memoryCRC32C == independent)
        #expect(result.memoryBytes == UInt64(memory.total))
        #expect(result.memoryBytesWritten < 64 * 1024) // only the scribbled pages
        #expect(readFile(dir + "/memory.bin") == contents)
        #expect(result.stateBytes == UInt64(readFile(dir + "/state.bin").count))

        // Sparse: the mostly-zero memory takes far less disk than its length.
        var st = stat()
        #expect(stat(dir + "/memory.bin", &st) == 0)
        #expect(Int(st.st_blocks) * 512 < Int(st.st_size) / 4)
        #expect(st.st_mode & 0o777 == 0o600)

        let loaded = try SnapshotReader.open(directory: dir)
        // The writer adds the chunk checksums of memory.bin (optional, last).
        #expect(Array(loaded.sections.dropLast()) == sampleSections())
        #expect(loaded.sections.last?.name == MemoryChunks.name && loaded.sections.last?.required == false)
        let contentsChunks = stride(from: 0, to: contents.count, by: 1 << 20).map { CRC32C.checksum(Array(contents[$0..<min(contents.count, $0 + (1 << 20))])) }
        #expect(loaded.memoryChunkCRCs == contentsChunks)
        #expect(loaded.header.memoryCRC32C == independent)
        #expect(loaded.header.memoryFileLength == UInt64(memory.total))
        #expect(loaded.section(named: "irqchip")?.payload == [])
        #expect(loaded.section(named: "nope") == nil)
        #expect(throws: SnapshotError.missingSection(name: "nope")) { _ = try loaded.requireSection(named: "nope") }
        let skipped = try loaded.unknownSections { $0.hasPrefix("vcpu") || $0 == "irqchip" }
        #expect(skipped.map(\.name) == ["dev.serial0", "x_y-z", MemoryChunks.name])
        #expect(throws: SnapshotError.unknownRequiredSection(name: "vcpu.0")) { _ = try loaded.unknownSections { $0 == "irqchip" } }

        // What restore does: map memory.bin privately and read guest pages from it.
        let map = mmap(nil, memory.total, PROT_READ | PROT_WRITE, MAP_PRIVATE, loaded.memoryFileDescriptor, 0)!
        #expect(map != MAP_FAILED)
        let mapped = UnsafeRawBufferPointer(start: map, count: memory.total)
        #expect(mapped[0] == 0xA0 && mapped[(8 << 20) - 1] == 0x5A && mapped[8 << 20] == 0xA1 && mapped[3 * 4096 + 100] == 0x77)
        map.storeBytes(of: 0xEE, toByteOffset: 0, as: UInt8.self) // private: the file is not changed
        munmap(map, memory.total)
        #expect(readFile(dir + "/memory.bin")[0] == 0xA0)

        let report = SnapshotReader.verify(directory: dir)
        #expect(report.ok, "\(report)")
        #expect(report.check(named: "memory.bin CRC32C")?.detail == hex(independent))
        #expect(report.checks.count == 3 + 6 + 4) // file, header, table, 5 sections + memory.chunks, padding, memory length, chunks and CRC
    }

    @Test func existingDirectoryIsRefusedUntouched() throws {
        let tmp = TempDirectory()
        let dir = tmp.path + "/snap"
        #expect(mkdir(dir, 0o755) == 0)
        writeFile(dir + "/keep", [1, 2, 3])
        let memory = FakeMemory(sizes: [4096])
        let error = snapshotError {
            _ = try SnapshotWriter.write(directory: dir, header: header(for: memory), sections: [], memory: memory.buffers)
        }
        #expect(error?.description == "\(dir): already exists")
        #expect(listDirectory(dir) == ["keep"])
        #expect(readFile(dir + "/keep") == [1, 2, 3])
        #expect(tmp.entries() == ["snap"])
    }

    @Test func missingParentIsRefused() {
        let tmp = TempDirectory()
        let memory = FakeMemory(sizes: [4096])
        let error = snapshotError {
            _ = try SnapshotWriter.write(directory: tmp.path + "/no/snap", header: header(for: memory), sections: [], memory: memory.buffers)
        }
        #expect(error?.description == "\(tmp.path)/no/snap: the parent directory \(tmp.path)/no does not exist")
        #expect(tmp.entries().isEmpty)
    }

    @Test func badInputIsRefusedBeforeTouchingTheDisk() {
        let tmp = TempDirectory()
        let memory = FakeMemory(sizes: [8192])
        var h = header(for: memory)
        h.memorySize = 4096
        h.memoryFileLength = 4096
        #expect(snapshotError {
            _ = try SnapshotWriter.write(directory: tmp.path + "/a", header: h, sections: [], memory: memory.buffers)
        }?.description == "memory.bin: length: the memory regions hold 8192 bytes but the header's guest memory size is 4096")
        let dup = SnapshotSection(name: "a", version: 1, minimumVersion: 1, required: true, payload: [])
        #expect(snapshotError {
            _ = try SnapshotWriter.write(directory: tmp.path + "/b", header: header(for: memory), sections: [dup, dup], memory: memory.buffers)
        }?.description == "state.bin: section \"a\": name: appears more than once")
        #expect(tmp.entries().isEmpty)
    }

    @Test(arguments: [SnapshotWriter.Step.memoryWritten, .stateWritten, .beforeRename])
    func failureLeavesNothingBehind(step: SnapshotWriter.Step) {
        let tmp = TempDirectory()
        let memory = FakeMemory(sizes: [1 << 20])
        memory.scribble()
        let error = snapshotError {
            _ = try SnapshotWriter.write(directory: tmp.path + "/snap", header: header(for: memory), sections: sampleSections(),
                                         memory: memory.buffers) { (at: SnapshotWriter.Step) throws(SnapshotError) in
                if at == step { throw .system(path: tmp.path, operation: "write (injected failure)", errno: EIO) }
            }
        }
        #expect(error?.description.contains("injected failure") == true)
        #expect(!tmp.entries().contains { $0.hasPrefix(".swiftvmm-snapshot-tmp") })
        #expect(tmp.entries().isEmpty)
    }

    @Test("a successful write passes every step in order (so the failures above are injected where they say)")
    func stepsInOrder() throws {
        let tmp = TempDirectory()
        let memory = FakeMemory(sizes: [1 << 20])
        memory.scribble()
        var steps: [SnapshotWriter.Step] = []
        _ = try SnapshotWriter.write(directory: tmp.path + "/snap", header: header(for: memory), sections: sampleSections(),
                                     memory: memory.buffers) { (step: SnapshotWriter.Step) throws(SnapshotError) in steps.append(step) }
        #expect(steps == [.memoryWritten, .stateWritten, .beforeRename])
        #expect(SnapshotReader.verify(directory: tmp.path + "/snap").ok)
    }

    @Test func verifyFindsFlippedBytes() throws {
        let tmp = TempDirectory()
        let memory = FakeMemory(sizes: [2 << 20])
        memory.scribble()
        let dir = tmp.path + "/snap"
        _ = try SnapshotWriter.write(directory: dir, header: header(for: memory), sections: sampleSections(), memory: memory.buffers)
        #expect(SnapshotReader.verify(directory: dir).ok)

        // In a hole of memory.bin, then in a written page, then in the second chunk: the chunk is named.
        for (offset, chunk) in [(12345, "chunk 0 (offset 0x0)"), (0, "chunk 0 (offset 0x0)"), ((1 << 20) + 7, "chunk 1 (offset 0x100000)")] {
            flipByte(dir + "/memory.bin", at: offset)
            let report = SnapshotReader.verify(directory: dir)
            #expect(!report.ok)
            let failed = report.checks.filter { !$0.ok }
            #expect(failed.map(\.name) == ["memory.bin chunks", "memory.bin CRC32C"])
            #expect(failed.first?.detail.hasPrefix("memory.bin: \(chunk): CRC32C mismatch (stored ") == true, "\(failed)")
            #expect(failed.last?.detail.hasPrefix("memory.bin: contents: CRC32C mismatch (stored ") == true)
            #expect(report.description.hasSuffix("\(dir): 2 of 13 checks failed"))
            flipByte(dir + "/memory.bin", at: offset)
        }
        #expect(SnapshotReader.verify(directory: dir).ok)

        // In vcpu.1's payload (776..<789) and in the header.
        flipByte(dir + "/state.bin", at: 784)
        var report = SnapshotReader.verify(directory: dir)
        #expect(report.checks.filter { !$0.ok }.map(\.name) == ["state.bin section \"vcpu.1\""])
        #expect(report.check(named: "state.bin section \"vcpu.1\"")?.detail.hasPrefix("state.bin: section \"vcpu.1\": payload CRC32C mismatch") == true)
        #expect(snapshotError { _ = try SnapshotReader.open(directory: dir) }?.description.hasPrefix("state.bin: section \"vcpu.1\": payload CRC32C mismatch") == true)
        flipByte(dir + "/state.bin", at: 784)
        flipByte(dir + "/state.bin", at: 90)
        report = SnapshotReader.verify(directory: dir)
        #expect(report.checks.map(\.ok) == [true, false])
        #expect(report.check(named: "state.bin header")?.detail.hasPrefix("state.bin: header: CRC32C mismatch") == true)
    }

    @Test func openChecksMemoryLengthAndStateSize() throws {
        let tmp = TempDirectory()
        let memory = FakeMemory(sizes: [1 << 20])
        let dir = tmp.path + "/snap"
        _ = try SnapshotWriter.write(directory: dir, header: header(for: memory), sections: [], memory: memory.buffers)
        #expect(truncate(dir + "/memory.bin", 4096) == 0)
        #expect(snapshotError { _ = try SnapshotReader.open(directory: dir) }?.description ==
                "memory.bin: length: the file has 4096 bytes, the header says 1048576")
        // Once the length is wrong, memory.bin is not read (it may be huge): no CRC32C check.
        let report = SnapshotReader.verify(directory: dir)
        #expect(report.checks.filter { !$0.ok }.map(\.name) == ["memory.bin length"])
        #expect(report.check(named: "memory.bin length")?.detail ==
                "memory.bin: length: the file has 4096 bytes, the header says 1048576; its CRC32C is not checked")
        #expect(report.check(named: "memory.bin CRC32C") == nil)

        unlink(dir + "/memory.bin")
        #expect(snapshotError { _ = try SnapshotReader.open(directory: dir) }?.description ==
                "\(dir)/memory.bin: open failed: No such file or directory (errno 2)")

        // A state.bin over the cap is refused from its size, without reading it (sparse file).
        #expect(truncate(dir + "/state.bin", 2 << 30) == 0)
        #expect(snapshotError { _ = try SnapshotReader.open(directory: dir) }?.description ==
                "state.bin: size: 2147483648 bytes is over the limit of 1073741824 (1 GiB)")
        #expect(SnapshotReader.verify(directory: dir).checks.map(\.ok) == [false])

        #expect(mkdir(tmp.path + "/odd", 0o700) == 0)
        #expect(mkfifo(tmp.path + "/odd/state.bin", 0o600) == 0)
        #expect(snapshotError { _ = try SnapshotReader.open(directory: tmp.path + "/odd") }?.description ==
                "\(tmp.path)/odd/state.bin: type: not a regular file")
    }

    @Test func inspectListsHeaderAndSections() throws {
        let tmp = TempDirectory()
        let memory = FakeMemory(sizes: [3 << 20])
        memory.scribble()
        let dir = tmp.path + "/snap"
        var h = header(for: memory)
        h.created = 1_700_000_000_123_456_789
        h.machineFlags = .acpi
        let result = try SnapshotWriter.write(directory: dir, header: h, sections: sampleSections(), memory: memory.buffers)
        let text = SnapshotInspector.describe(directory: dir)
        let lines = text.split(separator: "\n").map(String.init)
        #expect(lines.first == "snapshot \(dir)")
        #expect(lines.contains("state.bin          828 bytes")) // with memory.chunks: 64 more table bytes, 20 of payload
        #expect(lines.contains("magic              \"SWVMSNAP\""))
        #expect(lines.contains("format             1.0"))
        #expect(lines.contains("created            2023-11-14 22:13:20.123456789 UTC"))
        #expect(lines.contains("writer             swiftvmm test"))
        #expect(lines.contains("guest memory       3145728 bytes (3 MiB)"))
        #expect(lines.contains("machine flags      0x00000001 (acpi)"))
        #expect(lines.contains("memory.bin CRC32C  \(hex(result.memoryCRC32C))"))
        #expect(lines.contains("section table      6 entries of 64 bytes at offset 192, CRC32C \(hex(UInt32(readFile(dir + "/state.bin").le(136, 4))))"))
        #expect(lines.contains("sections (6):"))
        #expect(lines.contains("  NAME              VERSION  MINIMUM  FLAGS         OFFSET      LENGTH  CRC32C"))
        let crc = hex(CRC32C.checksum(sampleSections()[0].payload))
        #expect(lines.contains("  vcpu.0                  3        2  required         576         200  \(crc)"))
        #expect(lines.contains { $0.hasPrefix("  dev.serial0             1        1  optional         792           8  0x") })
        #expect(lines.last?.hasPrefix("memory.bin         3145728 bytes (3 MiB), ") == true)
        #expect(lines.last?.hasSuffix("allocated on disk") == true)
        print(text)
    }

    /// A file from a future format major: inspect still says what wrote it and why it stops.
    @Test func inspectOfANewerFormat() throws {
        let tmp = TempDirectory()
        let dir = tmp.path + "/future"
        #expect(mkdir(dir, 0o700) == 0)
        var h = sampleHeader()
        h.formatMajor = 2
        h.formatMinor = 0
        h.writerVersion = "9.9.9"
        var bytes = try SnapshotFormat.encodeState(header: h, sections: sampleSections())
        bytes.put(0xFF, at: 120, size: 4) // whatever 2.0 keeps there
        writeFile(dir + "/state.bin", bytes)
        let text = SnapshotInspector.describe(directory: dir)
        let lines = text.split(separator: "\n").map(String.init)
        #expect(lines.contains("format             2.0"))
        #expect(lines.contains("writer             swiftvmm 9.9.9"))
        #expect(lines.contains("created            2023-11-14 22:13:20.123456789 UTC"))
        #expect(lines.contains("cannot list the other header fields or the sections: state.bin: header: format 2.0 is newer than this swiftvmm reads (1.x)"))
        #expect(!text.contains("sections ("))
        #expect(lines.last?.hasPrefix("memory.bin         cannot stat: ") == true)
        print(text)

        // A 1.0 file whose table is damaged: the header is listed, then the reason.
        var damaged = try sampleState()
        damaged[200] ^= 1
        let listing = SnapshotInspector.describe(state: damaged)
        #expect(listing.contains("vCPUs              2\n"))
        #expect(listing.hasSuffix("cannot list the sections: state.bin: section table: CRC32C mismatch (stored \(hex(UInt32(damaged.le(136, 4)))), computed \(hex(CRC32C.checksum(damaged[192..<512]))))\n"))

        // Not a snapshot at all.
        #expect(SnapshotInspector.describe(state: Array("hello".utf8)) ==
                "state.bin          5 bytes\ncannot list anything: state.bin: truncated: header needs 192 bytes, file has 5\n")
    }
}
