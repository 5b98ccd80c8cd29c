import Glibc
import Testing
import TestSupport
import Snapshot
import VMMSys
@testable import Backends

@Suite("TPM state file")
struct TPMStateStoreTests {
    static let entries = [TPMStateStore.Entry(name: "permall", maxSize: 100), TPMStateStore.Entry(name: "volatilestate", maxSize: 40)]

    /// A fresh store in a temporary directory; `body` gets its path (a store holds a lock on its
    /// file: each step opens its own and lets it go).
    func withStore(_ body: (String) throws -> Void) throws {
        let dir = makeTemporaryDirectory("swiftvmm-tpmstore")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let path = dir + "/state"
        #expect(try TPMStateStore.open(path: path, entries: Self.entries).created)
        try body(path)
    }

    func reopen(_ path: String) throws -> TPMStateStore { try TPMStateStore.open(path: path, entries: Self.entries).store }

    /// Opens the store, reads `name` and lets the store (and its lock) go before returning.
    func readOnce(_ path: String, _ name: String) throws -> [UInt8]? {
        let store = try reopen(path)
        return try store.read(name)
    }

    func bytes(_ path: String) throws -> [UInt8] { try OwnedFD.open(path, flags: O_RDONLY).readAll(limit: 1 << 20) }

    func poke(_ path: String, at offset: Int, xor: UInt8) throws {
        let fd = try OwnedFD.open(path, flags: O_RDWR)
        var b: [UInt8] = [0]
        _ = try b.withUnsafeMutableBytes { try fd.readFully(into: $0, at: UInt64(offset)) }
        b[0] ^= xor
        try b.withUnsafeBytes { try fd.write($0, at: UInt64(offset)) }
    }

    // The layout of `entries`: header 4096, then per entry two slots of round-up(64 + max, 4096).
    static let permallSlotA = 4096, permallSlotB = 8192, volatileSlotA = 12288

    @Test("entries round-trip, alternate between their slots with rising generations, and survive reopening")
    func roundTrip() throws {
        try withStore { path in
            do {
                let store = try reopen(path)
                #expect(try store.read("permall") == nil, "never written")
                try store.write("permall", [1, 2, 3])
                try store.write("permall", [4, 5])
                try store.write("volatilestate", Array(repeating: 9, count: 40))
                #expect(try store.read("permall") == [4, 5])
            }
            let file = try bytes(path)
            #expect(Array(file[0..<8]) == Array("SWVMTPMS".utf8))
            #expect(Array(file[Self.permallSlotA..<(Self.permallSlotA + 4)]) == Array("SLOT".utf8))
            #expect(file[Self.permallSlotA + 8] == 1 && file[Self.permallSlotB + 8] == 2, "generations 1 and 2 in slots A and B")
            #expect(Array(file[(Self.permallSlotB + 64)..<(Self.permallSlotB + 66)]) == [4, 5])
            do {
                let again = try reopen(path)
                #expect(try again.read("permall") == [4, 5])
                #expect(try again.read("volatilestate") == Array(repeating: 9, count: 40))
                try again.write("permall", [6])
                #expect(try bytes(path)[Self.permallSlotA + 8] == 3, "the third write goes to slot A again")
                try again.delete("volatilestate")
                #expect(try again.read("volatilestate") == nil)
            }
            #expect(try readOnce(path, "volatilestate") == nil)
        }
    }

    @Test("a write torn in the newer slot (header or data) falls back to the older copy")
    func tornWriteFallsBack() throws {
        try withStore { path in
            do {
                let store = try reopen(path)
                try store.write("permall", [1, 1, 1])
                try store.write("permall", [2, 2, 2])
            }
            // Newest is slot B: damage its data, then (separately) its header.
            try poke(path, at: Self.permallSlotB + 64, xor: 0xFF)
            #expect(try readOnce(path, "permall") == [1, 1, 1])
            try poke(path, at: Self.permallSlotB + 64, xor: 0xFF)
            #expect(try readOnce(path, "permall") == [2, 2, 2])
            try poke(path, at: Self.permallSlotB + 10, xor: 0x01)
            do {
                let s = try reopen(path)
                #expect(try s.read("permall") == [1, 1, 1])
                // The next write replaces the damaged slot, not the good one.
                try s.write("permall", [3])
            }
            #expect(try readOnce(path, "permall") == [3])
            try poke(path, at: Self.permallSlotB + 64, xor: 0xFF)
            #expect(try readOnce(path, "permall") == [1, 1, 1])
        }
    }

    @Test("both copies damaged: an error naming the file, the entry and each slot's problem")
    func bothDamaged() throws {
        try withStore { path in
            do {
                let store = try reopen(path)
                try store.write("permall", [1])
                try store.write("permall", [2])
            }
            try poke(path, at: Self.permallSlotA + 64, xor: 0x10)
            try poke(path, at: Self.permallSlotB + 20, xor: 0x10)
            let error = #expect(throws: TPMStateStoreError.self) { _ = try readOnce(path, "permall") }
            let m = error?.message ?? ""
            #expect(m.contains(path) && m.contains("\"permall\"") && m.contains("slot A: data checksum mismatch")
                    && m.contains("slot B: header checksum mismatch"), "\(m)")
        }
    }

    @Test("an entry over its registered size is refused and nothing changes; unknown names are refused")
    func sizes() throws {
        try withStore { path in
            let store = try reopen(path)
            try store.write("volatilestate", Array(repeating: 7, count: 40))
            let before = try bytes(path)
            let error = #expect(throws: TPMStateStoreError.self) { try store.write("volatilestate", Array(repeating: 7, count: 41)) }
            #expect(error?.message.contains("more than its registered 40") == true)
            #expect(try bytes(path) == before)
            #expect(throws: TPMStateStoreError.self) { try store.write("x", []) }
            #expect(throws: TPMStateStoreError.self) { _ = try store.read(String(repeating: "n", count: 1000)) }
        }
    }

    @Test("foreign, truncated, damaged-header, newer-format and differently laid out files are refused unchanged")
    func refusedFiles() throws {
        let dir = makeTemporaryDirectory("swiftvmm-tpmstore")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let good = dir + "/good"
        try TPMStateStore.open(path: good, entries: Self.entries).store.write("permall", [1, 2])
        let original = try bytes(good)
        func variant(_ name: String, _ change: (inout [UInt8]) -> Void) throws -> String {
            var b = original
            change(&b)
            let path = dir + "/" + name
            let fd = try OwnedFD.open(path, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o600)
            try b.withUnsafeBytes { try fd.writeAll($0) }
            return path
        }
        var rng = SplitMix64(state: 7)
        let cases: [(String, String)] = [
            (try variant("garbage") { b in b = (0..<5000).map { _ in UInt8.random(in: 0...255, using: &rng) } }, "not a swiftvmm TPM state file"),
            (try variant("elf") { b in b = [0x7F, 0x45, 0x4C, 0x46] + Array(b.dropFirst(4)) }, "not a swiftvmm TPM state file"),
            (try variant("short-header") { b in b = Array(b.prefix(100)) }, "header is truncated"),
            (try variant("truncated") { b in b = Array(b.prefix(9000)) }, "is truncated"),
            (try variant("header-crc") { b in b[40] ^= 1 }, "header checksum does not match"),
            (try variant("major-2") { b in b[8] = 2 }, "format 2.0"),
        ]
        for (path, needle) in cases {
            let before = try bytes(path)
            let error = #expect(throws: TPMStateStoreError.self, "\(path)") { _ = try reopen(path) }
            #expect(error?.message.contains(needle) == true && error?.message.contains(path) == true, "\(error?.message ?? "")")
            #expect(try bytes(path) == before, "\(path) was written")
        }
        // A newer minor version (with its header checksum fixed) still opens.
        let minor = try variant("minor-1") { b in
            b[10] = 1
            let crc = CRC32C.checksum(b[0..<4092])
            for i in 0..<4 { b[4092 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
        }
        #expect(try readOnce(minor, "permall") == [1, 2])
        let other = #expect(throws: TPMStateStoreError.self) {
            _ = try TPMStateStore.open(path: good, entries: [.init(name: "permall", maxSize: 100)])
        }
        #expect(other?.message.contains("entry table differs") == true)
    }

    @Test("a state file in a missing directory: an error, nothing created; a second opener of the same file is refused")
    func missingDirectoryAndLock() throws {
        let dir = makeTemporaryDirectory("swiftvmm-tpmstore")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let error = #expect(throws: TPMStateStoreError.self) { _ = try TPMStateStore.open(path: dir + "/none/state") }
        #expect(error?.message.contains("cannot create the TPM state file \(dir)/none/state") == true, "\(error?.message ?? "")")
        #expect(!isAccessible(dir + "/none"))
        let first = try TPMStateStore.open(path: dir + "/state", entries: Self.entries).store
        let second = #expect(throws: TPMStateStoreError.self) { _ = try TPMStateStore.open(path: dir + "/state", entries: Self.entries) }
        #expect(second?.message.contains("in use by another process") == true)
        _ = first
    }

    @Test("a write cut at every byte of its record (header and data), before or after the data reached the disk, leaves the entry at its last complete value or the new one; the file always opens")
    func everyTornWritePoint() throws {
        let dir = makeTemporaryDirectory("swiftvmm-tpmstore")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let path = dir + "/state"
        let old: [UInt8] = Array(0..<60), new: [UInt8] = Array(100..<180)
        do {
            let store = try reopen(path)
            try store.write("permall", Array(repeating: 1, count: 10))   // generation 1, slot A
            try store.write("permall", old)                              // generation 2, slot B
        }
        let pristine = try bytes(path)
        // The next write (generation 3) goes to slot A: its record is the slot header + data.
        let record = TPMStateStore.slotHeader(flags: 0, generation: 3, data: new) + new
        for cut in 0...record.count {
            // The first `cut` bytes reached the file, the rest is what slot A held before.
            let fd = try OwnedFD.open(path, flags: O_RDWR)
            try pristine.withUnsafeBytes { try fd.write($0, at: 0) }
            try Array(record.prefix(cut)).withUnsafeBytes { try fd.write($0, at: UInt64(Self.permallSlotA)) }
            let value = try readOnce(path, "permall")
            if cut == record.count {
                #expect(value == new, "the whole record written")
            } else {
                #expect(value == old, "cut after \(cut) of \(record.count) bytes: \(value?.prefix(4).map { $0 } ?? [])")
            }
        }
        // A cut that leaves garbage past the written bytes (a sector of the old slot reordered):
        // still the old value, and then a full write succeeds on top.
        do {
            let fd = try OwnedFD.open(path, flags: O_RDWR)
            try pristine.withUnsafeBytes { try fd.write($0, at: 0) }
            var mixed = record
            for i in stride(from: 64, to: mixed.count, by: 7) { mixed[i] ^= 0xFF }
            try mixed.withUnsafeBytes { try fd.write($0, at: UInt64(Self.permallSlotA)) }
        }
        #expect(try readOnce(path, "permall") == old)
        do {
            let store = try reopen(path)
            try store.write("permall", new)
        }
        #expect(try readOnce(path, "permall") == new)
    }
}
