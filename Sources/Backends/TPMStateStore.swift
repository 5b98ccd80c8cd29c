import Glibc
import Snapshot
import VMMSys
import WireFormat

/// Why a TPM state file cannot be used: one line naming the file (and the entry).
public struct TPMStateStoreError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// The file behind `--tpm builtin,state=PATH`: named entries (libtpms's "permall", "volatilestate"
/// and "savestate" blobs), each registered with a maximum size, each kept in two slots. A write goes
/// to the slot that does not hold the newest copy and is synced before it counts, so a crash or a
/// torn write at any point leaves the newest complete copy or the one before it readable. Written
/// in place (pwrite, fsync), never renamed, so a descriptor from an fd set works as well as a
/// path. The layout is in docs/tpm-state-format.md.
///
/// Not thread-safe: the TPM's thread uses it (and start-up before that thread exists).
public final class TPMStateStore: @unchecked Sendable {
    /// A registered entry: its name (1-32 bytes) and the most bytes it may hold.
    public struct Entry: Sendable, Equatable {
        public var name: String
        public var maxSize: Int
        public init(name: String, maxSize: Int) {
            self.name = name
            self.maxSize = maxSize
        }
    }

    /// What libtpms stores (TPM 2.0's permanent state with its NV memory is well under 1 MiB).
    public static let libtpmsEntries = [Entry(name: "permall", maxSize: 1 << 20), Entry(name: "volatilestate", maxSize: 1 << 20),
                                        Entry(name: "savestate", maxSize: 1 << 20)]

    static let magic: [UInt8] = Array("SWVMTPMS".utf8)
    static let major: UInt16 = 1, minor: UInt16 = 0
    static let headerSize = 4096
    static let entryRecordSize = 48
    static let maxNameBytes = 32
    static let maxEntries = (headerSize - 32 - 4) / entryRecordSize
    static let slotHeaderSize = 64
    static let slotMagic: [UInt8] = Array("SLOT".utf8)
    static let flagDeleted: UInt32 = 1

    public let path: String
    private let fd: OwnedFD
    private let entries: [Entry]
    private let slotOffsets: [UInt64]
    private let slotSizes: [UInt64]
    /// Tests only: how long each write waits before its sync (a slow or stalled disk), in µs.
    var syncDelayForTesting: UInt32 = 0
    /// Per entry: the slot (0 or 1) with the newest copy that checked out, and its generation.
    private var newest: [(slot: Int, generation: UInt64)?]

    /// Opens the store in `fd` (read-write; `path` names it in messages), taking an exclusive lock
    /// (a second process on the same file is refused). An empty file is formatted for `entries`;
    /// any other file must be a store of exactly these entries. Entries are checked when read.
    public init(fd: consuming OwnedFD, path: String, entries: [Entry] = TPMStateStore.libtpmsEntries) throws(TPMStateStoreError) {
        precondition(!entries.isEmpty && entries.count <= Self.maxEntries, "entry count")
        precondition(entries.allSatisfy { !$0.name.utf8.isEmpty && $0.name.utf8.count <= Self.maxNameBytes && $0.maxSize > 0 }, "entry")
        self.path = path
        self.entries = entries
        var offsets: [UInt64] = [], sizes: [UInt64] = []
        var at = UInt64(Self.headerSize)
        for e in entries {
            let size = (UInt64(Self.slotHeaderSize + e.maxSize) + 4095) / 4096 * 4096
            offsets.append(at)
            sizes.append(size)
            at += 2 * size
        }
        slotOffsets = offsets
        slotSizes = sizes
        newest = Array(repeating: nil, count: entries.count)
        // A lock held for a moment (a process that is just exiting, or a child between fork and
        // exec holding a copy of the descriptor) is waited out for up to half a second.
        var attempts = 0
        while true {
            do {
                try fd.lockExclusiveNow()
                break
            } catch where error.errno == EWOULDBLOCK && attempts < 50 {
                attempts += 1
                usleep(10_000)
            } catch where error.errno == EWOULDBLOCK {
                throw TPMStateStoreError("\(path) is in use by another process (another VM's TPM): give each VM its own state file")
            } catch {
                throw TPMStateStoreError("\(path): cannot lock it: \(error)")
            }
        }
        let length: UInt64
        do { length = try fd.status().size } catch { throw TPMStateStoreError("\(path): \(error)") }
        self.fd = fd
        if length == 0 {
            try format()
        } else {
            try checkHeader(fileLength: length, expectedLength: at)
        }
        for i in entries.indices { newest[i] = try scan(i).newest }
    }

    /// Creates `path` (mode 0600; its directory must exist) or opens it, and opens the store in it.
    /// `created` tells whether the file was made now (to remove it again if the launch fails).
    public static func open(path: String, entries: [Entry] = libtpmsEntries) throws(TPMStateStoreError) -> (store: TPMStateStore, created: Bool) {
        var created = false
        let fd: OwnedFD
        do {
            fd = try OwnedFD.open(path, flags: O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode: 0o600)
            created = true
        } catch where error.errno == EEXIST {
            do { fd = try OwnedFD.open(path, flags: O_RDWR | O_CLOEXEC) } catch {
                throw TPMStateStoreError("cannot open the TPM state file \(path): \(error)")
            }
        } catch {
            throw TPMStateStoreError("cannot create the TPM state file \(path): \(error)")
        }
        do {
            return (try TPMStateStore(fd: fd, path: path, entries: entries), created)
        } catch {
            if created { try? FileSystem.removeFile(path) }
            throw error
        }
    }

    // MARK: Entries

    /// The newest copy of `name`; nil if it was never written or was deleted. Throws when both
    /// copies are damaged.
    public func read(_ name: String) throws(TPMStateStoreError) -> [UInt8]? {
        let i = try index(of: name)
        let slots = try scan(i)
        // Newest first; a copy whose data fails its checksum gives way to the older one.
        var problems: [String] = slots.problems
        for candidate in slots.valid.sorted(by: { $0.generation > $1.generation }) {
            if candidate.deleted { newest[i] = (candidate.slot, candidate.generation); return nil }
            var data = [UInt8](repeating: 0, count: Int(candidate.length))
            let offset = slotOffsets[i] + UInt64(candidate.slot) * slotSizes[i] + UInt64(Self.slotHeaderSize)
            do {
                let n = try readBytes(into: &data, at: offset)
                guard n == data.count else { problems.append("slot \(Self.slotName(candidate.slot)): truncated"); continue }
            } catch { throw TPMStateStoreError("\(path): entry \"\(name)\": \(error)") }
            guard CRC32C.checksum(data) == candidate.dataCRC else {
                problems.append("slot \(Self.slotName(candidate.slot)): data checksum mismatch")
                continue
            }
            newest[i] = (candidate.slot, candidate.generation)
            return data
        }
        if problems.isEmpty { return nil }
        throw TPMStateStoreError("\(path): entry \"\(name)\" is damaged (\(problems.joined(separator: "; "))): the TPM's state is lost; restore the file from a copy or remove it for a new TPM")
    }

    /// Replaces `name` with `bytes`, durably: written to the older slot and synced before this returns.
    public func write(_ name: String, _ bytes: [UInt8]) throws(TPMStateStoreError) {
        try put(name, bytes, deleted: false)
    }

    /// Marks `name` absent (a newer, empty copy), durably.
    public func delete(_ name: String) throws(TPMStateStoreError) {
        try put(name, [], deleted: true)
    }

    /// The registered entries.
    public var registered: [Entry] { entries }

    private func put(_ name: String, _ bytes: [UInt8], deleted: Bool) throws(TPMStateStoreError) {
        let i = try index(of: name)
        guard bytes.count <= entries[i].maxSize else {
            throw TPMStateStoreError("\(path): entry \"\(name)\" would hold \(bytes.count) bytes, more than its registered \(entries[i].maxSize): refused")
        }
        let current = newest[i]
        let slot = current.map { 1 - $0.slot } ?? 0
        let generation = (current?.generation ?? 0) + 1
        var record = Self.slotHeader(flags: deleted ? Self.flagDeleted : 0, generation: generation, data: bytes)
        record += bytes
        let offset = slotOffsets[i] + UInt64(slot) * slotSizes[i]
        do {
            try writeBytes(record, at: offset)
            if syncDelayForTesting > 0 { usleep(syncDelayForTesting) }
            try fd.sync()
        } catch {
            throw TPMStateStoreError("\(path): cannot write entry \"\(name)\": \(error)")
        }
        newest[i] = (slot, generation)
    }

    private func index(of name: String) throws(TPMStateStoreError) -> Int {
        guard let i = entries.firstIndex(where: { $0.name == name }) else {
            throw TPMStateStoreError("\(path): no entry \"\(name.prefix(64))\" is registered")
        }
        return i
    }

    // MARK: Layout

    private struct SlotInfo {
        var slot: Int
        var generation: UInt64
        var length: UInt32
        var dataCRC: UInt32
        var deleted: Bool
    }

    /// Both slot headers of entry `i`: the ones that check out, and what is wrong with the others
    /// (a never-written, all-zero header is neither).
    private func scan(_ i: Int) throws(TPMStateStoreError) -> (valid: [SlotInfo], problems: [String], newest: (slot: Int, generation: UInt64)?) {
        var valid: [SlotInfo] = [], problems: [String] = []
        for slot in 0..<2 {
            var h = [UInt8](repeating: 0, count: Self.slotHeaderSize)
            let offset = slotOffsets[i] + UInt64(slot) * slotSizes[i]
            do {
                let n = try readBytes(into: &h, at: offset)
                guard n == h.count else { problems.append("slot \(Self.slotName(slot)): truncated"); continue }
            } catch { throw TPMStateStoreError("\(path): entry \"\(entries[i].name)\": \(error)") }
            if h.allSatisfy({ $0 == 0 }) { continue }
            guard Array(h[0..<4]) == Self.slotMagic, CRC32C.checksum(h[0..<60]) == Self.u32(h, 60) else {
                problems.append("slot \(Self.slotName(slot)): header checksum mismatch")
                continue
            }
            let flags = Self.u32(h, 4), length = Self.u32(h, 16)
            guard flags & ~Self.flagDeleted == 0, Int(length) <= entries[i].maxSize, flags & Self.flagDeleted == 0 || length == 0 else {
                problems.append("slot \(Self.slotName(slot)): flags \(flags) or length \(length) out of range")
                continue
            }
            valid.append(SlotInfo(slot: slot, generation: Self.u64(h, 8), length: length, dataCRC: Self.u32(h, 20),
                                  deleted: flags & Self.flagDeleted != 0))
        }
        let best = valid.max { $0.generation < $1.generation }
        return (valid, problems, best.map { ($0.slot, $0.generation) })
    }

    static func slotHeader(flags: UInt32, generation: UInt64, data: [UInt8]) -> [UInt8] {
        var h = slotMagic
        h += littleEndianBytes(flags) + littleEndianBytes(generation) + littleEndianBytes(UInt32(data.count)) + littleEndianBytes(CRC32C.checksum(data))
        h += [UInt8](repeating: 0, count: 60 - h.count)
        h += littleEndianBytes(CRC32C.checksum(h))
        return h
    }

    private func headerBytes() -> [UInt8] {
        var h = Self.magic + littleEndianBytes(Self.major) + littleEndianBytes(Self.minor) + littleEndianBytes(UInt32(Self.headerSize)) + littleEndianBytes(UInt32(entries.count))
        h += littleEndianBytes(UInt32(0)) + littleEndianBytes(expectedLength)
        for (i, e) in entries.enumerated() {
            let name = Array(e.name.utf8)
            h += [UInt8(name.count)] + name + [UInt8](repeating: 0, count: Self.maxNameBytes - name.count) + [0, 0, 0]
            h += littleEndianBytes(UInt32(e.maxSize)) + littleEndianBytes(slotOffsets[i])
        }
        h += [UInt8](repeating: 0, count: Self.headerSize - 4 - h.count)
        h += littleEndianBytes(CRC32C.checksum(h))
        return h
    }

    private var expectedLength: UInt64 { slotOffsets.last! + 2 * slotSizes.last! }

    private func format() throws(TPMStateStoreError) {
        let header = headerBytes()
        do {
            // The slots are holes (all-zero headers: never written) until written.
            try fd.truncate(to: expectedLength)
            try writeBytes(header, at: 0)
            try fd.sync()
        } catch {
            throw TPMStateStoreError("cannot write the TPM state file \(path): \(error)")
        }
    }

    private func checkHeader(fileLength: UInt64, expectedLength: UInt64) throws(TPMStateStoreError) {
        var h = [UInt8](repeating: 0, count: Self.headerSize)
        let n: Int
        do { n = try readBytes(into: &h, at: 0) } catch {
            throw TPMStateStoreError("cannot read the TPM state file \(path): \(error)")
        }
        guard n >= 8, Array(h[0..<8]) == Self.magic else {
            throw TPMStateStoreError("\(path) is not a swiftvmm TPM state file (no SWVMTPMS signature): refusing to overwrite it")
        }
        guard n == Self.headerSize else { throw TPMStateStoreError("\(path): the header is truncated (\(n) of \(Self.headerSize) bytes)") }
        let major = Self.u16(h, 8), minor = Self.u16(h, 10)
        guard major == Self.major else {
            throw TPMStateStoreError("\(path) is a TPM state file of format \(major).\(minor); this swiftvmm reads format \(Self.major).x")
        }
        guard CRC32C.checksum(h[0..<(Self.headerSize - 4)]) == Self.u32(h, Self.headerSize - 4) else {
            throw TPMStateStoreError("\(path): the header checksum does not match: the file is damaged")
        }
        // The layout must be this build's; a newer minor version's additions (the minor number,
        // the reserved word, bytes after the table) are not compared.
        let mine = headerBytes(), tableEnd = 32 + Self.entryRecordSize * entries.count
        guard h[12..<20] == mine[12..<20], h[24..<tableEnd] == mine[24..<tableEnd] else {
            throw TPMStateStoreError("\(path): the entry table differs from this swiftvmm's (\(entries.map { "\($0.name) ≤ \($0.maxSize)" }.joined(separator: ", ")))")
        }
        guard fileLength >= expectedLength else {
            throw TPMStateStoreError("\(path) is truncated: \(fileLength) bytes, its layout needs \(expectedLength)")
        }
    }

    /// pread until `bytes` is full or the file ends; the count read.
    private func readBytes(into bytes: inout [UInt8], at offset: UInt64) throws(SysError) -> Int {
        let r: Result<Int, SysError> = bytes.withUnsafeMutableBytes { b in
            do throws(SysError) { return .success(try fd.readFully(into: b, at: offset)) } catch { return .failure(error) }
        }
        return try r.get()
    }

    private func writeBytes(_ bytes: [UInt8], at offset: UInt64) throws(SysError) {
        let r: Result<Void, SysError> = bytes.withUnsafeBytes { b in
            do throws(SysError) { return .success(try fd.write(b, at: offset)) } catch { return .failure(error) }
        }
        try r.get()
    }

    // MARK: Inspect

    /// What `swiftvmm nvram inspect PATH` prints: the header, then per entry its registered size
    /// and each slot's generation, length and checksum state, and which copy a reader takes. Reads
    /// only (no lock: it may look at the file of a running VM). `ok` is false when the file is not
    /// a state file or an entry has no good copy though one was written.
    public static func inspect(path: String) -> (text: String, ok: Bool) {
        let opened: OwnedFD?
        do { opened = try OwnedFD.open(path, flags: O_RDONLY | O_CLOEXEC) } catch { return ("\(path): cannot open: \(error)\n", false) }
        guard let fd = opened else { return ("\(path): cannot open\n", false) }
        return describe(fd, path: path)
    }

    private static func readAt(_ fd: borrowing OwnedFD, _ count: Int, _ offset: UInt64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        let r: Result<Int, SysError> = b.withUnsafeMutableBytes { p in
            do throws(SysError) { return .success(try fd.readFully(into: p, at: offset)) } catch { return .failure(error) }
        }
        return Array(b.prefix((try? r.get()) ?? 0))
    }

    private static func describe(_ fd: borrowing OwnedFD, path: String) -> (text: String, ok: Bool) {
        func bytes(_ count: Int, at offset: UInt64) -> [UInt8] { readAt(fd, count, offset) }
        let h = bytes(headerSize, at: 0)
        guard h.count >= 32, Array(h[0..<8]) == magic else { return ("\(path): not a swiftvmm TPM state file (no SWVMTPMS signature)\n", false) }
        var out = "\(path): swiftvmm TPM state file, format \(u16(h, 8)).\(u16(h, 10))"
        guard h.count == headerSize else { return (out + ", header truncated (\(h.count) bytes)\n", false) }
        let headerOK = CRC32C.checksum(h[0..<(headerSize - 4)]) == u32(h, headerSize - 4)
        let count = Int(u32(h, 16))
        out += ", \(count) entr\(count == 1 ? "y" : "ies"), header checksum \(headerOK ? "ok" : "MISMATCH")\n"
        guard headerOK, count <= maxEntries else { return (out, false) }
        var ok = true
        for i in 0..<count {
            let r = 32 + i * entryRecordSize
            let nameLength = min(Int(h[r]), maxNameBytes)
            let name = String(decoding: h[(r + 1)..<(r + 1 + nameLength)], as: UTF8.self)
            let maxSize = Int(u32(h, r + 36)), slotA = u64(h, r + 40)
            let slotSize = (UInt64(slotHeaderSize + maxSize) + 4095) / 4096 * 4096
            out += "  \(name) (at most \(maxSize) bytes)"
            var best: (slot: Int, generation: UInt64, deleted: Bool, length: UInt32)?
            var written = false
            var slots: [String] = []
            for slot in 0..<2 {
                let offset = slotA + UInt64(slot) * slotSize
                let sh = bytes(slotHeaderSize, at: offset)
                if sh.count < slotHeaderSize { slots.append("\(slotName(slot)) truncated"); written = true; continue }
                if sh.allSatisfy({ $0 == 0 }) { slots.append("\(slotName(slot)) empty"); continue }
                written = true
                guard Array(sh[0..<4]) == slotMagic, CRC32C.checksum(sh[0..<60]) == u32(sh, 60), Int(u32(sh, 16)) <= maxSize else {
                    slots.append("\(slotName(slot)) damaged header")
                    continue
                }
                let generation = u64(sh, 8), length = u32(sh, 16), deleted = u32(sh, 4) & flagDeleted != 0
                let dataOK = CRC32C.checksum(bytes(Int(length), at: offset + UInt64(slotHeaderSize))) == u32(sh, 20)
                slots.append("\(slotName(slot)) generation \(generation), \(deleted ? "deleted" : "\(length) bytes"), data \(dataOK ? "ok" : "MISMATCH")")
                if dataOK, best.map({ generation > $0.generation }) ?? true { best = (slot, generation, deleted, length) }
            }
            out += ": " + slots.joined(separator: "; ")
            if let best {
                out += " → " + (best.deleted ? "absent (deleted)" : "\(best.length) bytes from slot \(slotName(best.slot))") + "\n"
            } else if written {
                out += " → NO GOOD COPY\n"
                ok = false
            } else {
                out += " → never written\n"
            }
        }
        return (out, ok)
    }

    static func slotName(_ slot: Int) -> String { slot == 0 ? "A" : "B" }

    static func u16(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) | UInt16(b[at + 1]) << 8 }
    static func u32(_ b: [UInt8], _ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 | UInt32(b[at + $1]) << (8 * $1) } }
    static func u64(_ b: [UInt8], _ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 | UInt64(b[at + $1]) << (8 * $1) } }
}
