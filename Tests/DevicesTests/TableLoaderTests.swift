import Devices
import FuzzEntries
import Testing
import TestSupport
import VMMCore

@Suite("ACPI linker/loader script")
struct TableLoaderTests {
    // MARK: Encoding

    func name(_ s: String) -> [UInt8] { Array(s.utf8) + [UInt8](repeating: 0, count: 56 - s.utf8.count) }
    func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * $0)) } }
    func padded(_ bytes: [UInt8]) -> [UInt8] { bytes + [UInt8](repeating: 0, count: 128 - bytes.count) }

    @Test("ALLOCATE: file @4, align @60, zone @64")
    func encodeAllocate() {
        let bytes = TableLoader.encode([.allocate(file: "etc/acpi/tables", alignment: 64, zone: .fseg)])
        #expect(bytes == padded(le32(1) + name("etc/acpi/tables") + le32(64) + [2]))
    }

    @Test("ADD_POINTER: dest @4, src @60, offset @116, size @120")
    func encodeAddPointer() {
        let bytes = TableLoader.encode([.addPointer(destFile: "etc/acpi/tables", srcFile: "etc/vmgenid_guid", offset: 0x1234, size: 4)])
        #expect(bytes == padded(le32(2) + name("etc/acpi/tables") + name("etc/vmgenid_guid") + le32(0x1234) + [4]))
    }

    @Test("ADD_CHECKSUM: file @4, offset @60, start @64, length @68")
    func encodeAddChecksum() {
        let bytes = TableLoader.encode([.addChecksum(file: "etc/acpi/tables", offset: 9, start: 0x100, length: 0x24)])
        #expect(bytes == padded(le32(3) + name("etc/acpi/tables") + le32(9) + le32(0x100) + le32(0x24)))
    }

    @Test("WRITE_POINTER: dest @4, src @60, dst_offset @116, src_offset @120, size @124")
    func encodeWritePointer() {
        let bytes = TableLoader.encode([.writePointer(destFile: "etc/vmgenid_addr", srcFile: "etc/vmgenid_guid", destOffset: 0, srcOffset: 40, size: 8)])
        #expect(bytes == padded(le32(4) + name("etc/vmgenid_addr") + name("etc/vmgenid_guid") + le32(0) + le32(40) + [8]))
        #expect(bytes.count == TableLoader.entrySize)
    }

    @Test("decode(encode(x)) == x; padding and unknown commands are skipped")
    func roundTrip() throws {
        let cmds: [LoaderCommand] = [
            .allocate(file: "etc/acpi/rsdp", alignment: 16, zone: .fseg),
            .allocate(file: "etc/acpi/tables", alignment: 64, zone: .high),
            .addPointer(destFile: "etc/acpi/rsdp", srcFile: "etc/acpi/tables", offset: 16, size: 4),
            .addChecksum(file: "etc/acpi/rsdp", offset: 8, start: 0, length: 20),
            .writePointer(destFile: "etc/vmgenid_addr", srcFile: "etc/vmgenid_guid", destOffset: 0, srcOffset: 40, size: 8),
        ]
        var bytes = TableLoader.encode(cmds)
        #expect(try TableLoader.decode(bytes) == cmds)
        bytes += [UInt8](repeating: 0, count: 128)                     // padding
        bytes += padded(le32(7) + name("etc/future"))                    // a command from a newer QEMU
        bytes += TableLoader.encode([.addPointer(destFile: "a", srcFile: "b", offset: 0, size: 1)])
        #expect(try TableLoader.decode(bytes) == cmds + [.addPointer(destFile: "a", srcFile: "b", offset: 0, size: 1)])
        #expect(try TableLoader.decode([]) == [])
    }

    @Test("decode rejects bad lengths, names, sizes, alignments and zones")
    func decodeErrors() {
        #expect(throws: TableLoaderError.badLength(127)) { try TableLoader.decode([UInt8](repeating: 0, count: 127)) }
        let good = TableLoader.encode([.allocate(file: "f", alignment: 8, zone: .high)])
        var noNUL = good
        noNUL.replaceSubrange(4..<60, with: [UInt8](repeating: 0x41, count: 56))
        #expect(throws: TableLoaderError.badName(command: 0)) { try TableLoader.decode(noNUL) }
        var notUTF8 = good
        notUTF8[4] = 0xFF
        #expect(throws: TableLoaderError.badName(command: 0)) { try TableLoader.decode(notUTF8) }
        for alignment: UInt32 in [0, 3, 0xFFFF_FFFF] {
            var bad = good
            bad.replaceSubrange(60..<64, with: le32(alignment))
            #expect(throws: TableLoaderError.badAlignment(command: 0, alignment: alignment)) { try TableLoader.decode(bad) }
        }
        for zone: UInt8 in [0, 3] {
            var bad = good
            bad[64] = zone
            #expect(throws: TableLoaderError.badZone(command: 0, zone: zone)) { try TableLoader.decode(bad) }
        }
        var badPointer = TableLoader.encode([.addPointer(destFile: "a", srcFile: "b", offset: 0, size: 4)])
        badPointer[120] = 3
        #expect(throws: TableLoaderError.badPointerSize(command: 1, size: 3)) { try TableLoader.decode(good + badPointer) }
        var badWrite = TableLoader.encode([.writePointer(destFile: "a", srcFile: "b", destOffset: 0, srcOffset: 0, size: 8)])
        badWrite[124] = 16
        #expect(throws: TableLoaderError.badPointerSize(command: 0, size: 16)) { try TableLoader.decode(badWrite) }
    }

    // MARK: Executor

    /// A 52-byte fake SSDT: 36-byte header, a 4-byte pointer (addend 0x10) at 36,
    /// an 8-byte pointer (addend 0x28) at 40, four more bytes at 48.
    static let table: [UInt8] = {
        var t = Array("SSDT".utf8) + [52, 0, 0, 0] + [1, 0] + Array("SWVMM ".utf8) + Array("TEST    ".utf8)
        t += [1, 0, 0, 0] + Array("SWFT".utf8) + [1, 0, 0, 0]
        t += [0x10, 0, 0, 0] + [0x28, 0, 0, 0, 0, 0, 0, 0] + [0xAA, 0xBB, 0xCC, 0xDD]
        return t
    }()

    static let files: [String: [UInt8]] = [
        "etc/acpi/tables": table,
        "etc/blob": [UInt8](repeating: 0x5A, count: 64),
        "etc/addr": [UInt8](repeating: 0, count: 8),
    ]

    struct Allocation: Equatable {
        let file: String, size: Int, alignment: UInt32, zone: LoaderCommand.Zone
    }

    /// Runs `cmds` with a bump allocator starting at 0x100010, recording allocations and file writes.
    func run(_ cmds: [LoaderCommand], memory: GuestMemory, start: UInt64 = 0x10_0010)
        throws -> (placed: [String: UInt64], allocations: [Allocation], writes: [(String, Int, [UInt8])]) {
        var next = start
        var allocations: [Allocation] = []
        var writes: [(String, Int, [UInt8])] = []
        let placed = try TableLoaderExecutor.run(
            cmds,
            files: { Self.files[$0] },
            allocate: { file, size, alignment, zone in
                allocations.append(Allocation(file: file, size: size, alignment: alignment, zone: zone))
                let address = (next + UInt64(alignment) - 1) & ~(UInt64(alignment) - 1)
                next = address + UInt64(size)
                return address
            },
            memory: memory,
            writeFile: { writes.append(($0, $1, $2)) })
        return (placed, allocations, writes)
    }

    func newMemory() throws -> GuestMemory { try GuestMemory(ranges: [(GuestAddress(0), 16 << 20)]) }

    @Test("ALLOCATE, ADD_POINTER (4 and 8 bytes), ADD_CHECKSUM and WRITE_POINTER, as firmware would run them")
    func executeScript() throws {
        let memory = try newMemory()
        let cmds: [LoaderCommand] = [
            .allocate(file: "etc/acpi/tables", alignment: 16, zone: .high),
            .allocate(file: "etc/blob", alignment: 4096, zone: .fseg),
            .addPointer(destFile: "etc/acpi/tables", srcFile: "etc/blob", offset: 36, size: 4),
            .addPointer(destFile: "etc/acpi/tables", srcFile: "etc/blob", offset: 40, size: 8),
            .addChecksum(file: "etc/acpi/tables", offset: 9, start: 0, length: 52),
            .writePointer(destFile: "etc/addr", srcFile: "etc/blob", destOffset: 0, srcOffset: 40, size: 8),
        ]
        let result = try run(try TableLoader.decode(TableLoader.encode(cmds)), memory: memory)
        #expect(result.placed == ["etc/acpi/tables": 0x10_0010, "etc/blob": 0x10_1000])
        #expect(result.allocations == [
            Allocation(file: "etc/acpi/tables", size: 52, alignment: 16, zone: .high),
            Allocation(file: "etc/blob", size: 64, alignment: 4096, zone: .fseg),
        ])
        #expect(try memory.read(GuestAddress(0x10_1000), count: 64) == [UInt8](repeating: 0x5A, count: 64))
        let t = try memory.read(GuestAddress(0x10_0010), count: 52)
        #expect(Array(t[0..<9]) == Array(Self.table[0..<9]))
        #expect(try memory.read(UInt32.self, at: GuestAddress(0x10_0010 + 36)) == 0x10_1010)
        #expect(try memory.read(UInt64.self, at: GuestAddress(0x10_0010 + 40)) == 0x10_1028)
        #expect(Array(t[48..<52]) == [0xAA, 0xBB, 0xCC, 0xDD])
        #expect(t.reduce(UInt8(0)) { $0 &+ $1 } == 0)
        #expect(result.writes.count == 1)
        #expect(result.writes.first?.0 == "etc/addr" && result.writes.first?.1 == 0)
        #expect(result.writes.first?.2 == [0x28, 0x10, 0x10, 0, 0, 0, 0, 0])
    }

    @Test("errors: unknown files, use before allocate, double allocate, ranges, sizes, overflow, memory")
    func executeErrors() throws {
        let memory = try newMemory()
        let tables = LoaderCommand.allocate(file: "etc/acpi/tables", alignment: 16, zone: .high)
        let blob = LoaderCommand.allocate(file: "etc/blob", alignment: 16, zone: .high)
        func expectError(_ error: TableLoaderError, _ cmds: [LoaderCommand], start: UInt64 = 0x10_0010) {
            #expect(throws: error) { _ = try run(cmds, memory: memory, start: start) }
        }
        expectError(.unknownFile(command: 0, file: "nope"), [.allocate(file: "nope", alignment: 1, zone: .high)])
        expectError(.unknownFile(command: 1, file: "nope"),
                    [tables, .addPointer(destFile: "etc/acpi/tables", srcFile: "nope", offset: 36, size: 4)])
        expectError(.notAllocated(command: 1, file: "etc/blob"),
                    [tables, .addPointer(destFile: "etc/acpi/tables", srcFile: "etc/blob", offset: 36, size: 4)])
        expectError(.notAllocated(command: 0, file: "etc/acpi/tables"),
                    [.addChecksum(file: "etc/acpi/tables", offset: 9, start: 0, length: 52)])
        expectError(.alreadyAllocated(command: 1, file: "etc/acpi/tables"), [tables, tables])
        expectError(.badAlignment(command: 0, alignment: 12), [.allocate(file: "etc/blob", alignment: 12, zone: .high)])
        expectError(.outOfRange(command: 2, file: "etc/acpi/tables", offset: 50, length: 4, fileSize: 52),
                    [tables, blob, .addPointer(destFile: "etc/acpi/tables", srcFile: "etc/blob", offset: 50, size: 4)])
        expectError(.outOfRange(command: 1, file: "etc/acpi/tables", offset: 52, length: 1, fileSize: 52),
                    [tables, .addChecksum(file: "etc/acpi/tables", offset: 52, start: 0, length: 52)])
        expectError(.outOfRange(command: 1, file: "etc/acpi/tables", offset: 0xFFFF_FFFF, length: 0xFFFF_FFFF, fileSize: 52),
                    [tables, .addChecksum(file: "etc/acpi/tables", offset: 9, start: 0xFFFF_FFFF, length: 0xFFFF_FFFF)])
        expectError(.outOfRange(command: 1, file: "etc/addr", offset: 4, length: 8, fileSize: 8),
                    [blob, .writePointer(destFile: "etc/addr", srcFile: "etc/blob", destOffset: 4, srcOffset: 0, size: 8)])
        expectError(.outOfRange(command: 1, file: "etc/blob", offset: 64, length: 1, fileSize: 64),
                    [blob, .writePointer(destFile: "etc/addr", srcFile: "etc/blob", destOffset: 0, srcOffset: 64, size: 8)])
        expectError(.unknownFile(command: 1, file: "etc/none"),
                    [blob, .writePointer(destFile: "etc/none", srcFile: "etc/blob", destOffset: 0, srcOffset: 0, size: 8)])
        expectError(.badPointerSize(command: 2, size: 3),
                    [tables, blob, .addPointer(destFile: "etc/acpi/tables", srcFile: "etc/blob", offset: 36, size: 3)])
        expectError(.pointerOverflow(command: 2, size: 1),
                    [tables, blob, .addPointer(destFile: "etc/acpi/tables", srcFile: "etc/blob", offset: 36, size: 1)])
        expectError(.memory(command: 0, GuestMemoryError(address: 16 << 20, length: 52)), [tables], start: 16 << 20)
        let description = TableLoaderError.notAllocated(command: 3, file: "f").description
        #expect(description == "table-loader command 3: file \"f\" is used before it is allocated")
    }

    @Test("WRITE_POINTER through FwCfg.writeFile: the GUID address lands in etc/vmgenid_addr and its handler runs")
    func writePointerIntoFwCfg() throws {
        let memory = try newMemory()
        let fw = FwCfg(memory: memory)
        let log = WriteLog()
        try fw.addFile("etc/vmgenid_guid", data: [UInt8](repeating: 0, count: 4096))
        try fw.addWritableFile("etc/vmgenid_addr", size: 8, onWrite: log.handler)
        let cmds: [LoaderCommand] = [
            .allocate(file: "etc/vmgenid_guid", alignment: 4096, zone: .high),
            .writePointer(destFile: "etc/vmgenid_addr", srcFile: "etc/vmgenid_guid", destOffset: 0, srcOffset: 40, size: 8),
        ]
        let placed = try TableLoaderExecutor.run(
            cmds, files: fw.fileData, allocate: { _, _, _, _ in 0x7F_F000 }, memory: memory,
            writeFile: { try fw.writeFile($0, offset: $1, $2) })
        #expect(placed == ["etc/vmgenid_guid": 0x7F_F000])
        let address: [UInt8] = [0x28, 0xF0, 0x7F, 0, 0, 0, 0, 0]
        #expect(fw.fileData("etc/vmgenid_addr") == address)
        #expect(log.calls == [WriteLog.Call(offset: 0, bytes: address, whole: address)])
    }

    @Test("the fuzz entry point survives thousands of seeded random and mutated scripts")
    func fuzzSmoke() {
        var rng = SplitMix64(state: 0x7AB1E)
        let names = ["a", "b", "w", "zz"]
        func small(_ limit: UInt32) -> UInt32 { UInt32.random(in: 0...limit, using: &rng) }
        for round in 0..<3000 {
            var cmds: [LoaderCommand] = []
            for _ in 0..<Int.random(in: 0...8, using: &rng) {
                let f = names.randomElement(using: &rng)!, g = names.randomElement(using: &rng)!
                let size = [1, 2, 4, 8].randomElement(using: &rng)!
                switch small(3) {
                case 0: cmds.append(.allocate(file: f, alignment: 1 << small(16), zone: .high))
                case 1: cmds.append(.addPointer(destFile: f, srcFile: g, offset: small(120), size: UInt8(size)))
                case 2: cmds.append(.addChecksum(file: f, offset: small(120), start: small(120), length: small(120)))
                default: cmds.append(.writePointer(destFile: f, srcFile: g, destOffset: small(10), srcOffset: small(120), size: UInt8(size)))
                }
            }
            var bytes = TableLoader.encode(cmds)
            if round % 3 == 0 {
                for _ in 0..<Int.random(in: 1...4, using: &rng) where !bytes.isEmpty {
                    bytes[Int.random(in: 0..<bytes.count, using: &rng)] = UInt8.random(in: 0...255, using: &rng)
                }
            } else if round % 3 == 1 {
                bytes = (0..<128 * Int.random(in: 0...3, using: &rng)).map { _ in UInt8.random(in: 0...255, using: &rng) }
                for entry in stride(from: 0, to: bytes.count, by: 128) {
                    bytes.replaceSubrange(entry..<entry + 4, with: [UInt8.random(in: 0...5, using: &rng), 0, 0, 0])
                }
            }
            Fuzz.tableLoader(bytes)
        }
    }
}
