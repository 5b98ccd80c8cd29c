import ACPI
import DeviceTree
import Synchronization
import VMMCore
import WireFormat

/// Errors from configuring an `FwCfg` or changing its files from the host.
public enum FwCfgError: Error, CustomStringConvertible, Equatable, Sendable {
    /// A file name is empty, longer than `FwCfg.maxNameLength` bytes or contains a NUL.
    case invalidName(String)
    case duplicateFile(String)
    /// Every file selector (up to `FwCfg.fileKeyLimit`) is taken.
    case tooManyFiles
    /// A file size is negative or does not fit the directory's 32-bit size field.
    case invalidSize(file: String, size: Int)
    case unknownFile(String)
    case notWritable(String)
    /// `length` bytes at `offset` do not lie inside the file.
    case outOfRange(file: String, offset: Int, length: Int, size: Int)
    case sizeMismatch(file: String, expected: Int, actual: Int)

    public var description: String {
        switch self {
        case .invalidName(let name):
            return "fw_cfg file name \"\(name)\" must be 1 to \(FwCfg.maxNameLength) bytes without NUL"
        case .duplicateFile(let name):
            return "fw_cfg file \"\(name)\" already exists"
        case .tooManyFiles:
            return "no fw_cfg file selector is left"
        case .invalidSize(let file, let size):
            return "fw_cfg file \"\(file)\" has an invalid size of \(size) bytes"
        case .unknownFile(let name):
            return "no fw_cfg file named \"\(name)\""
        case .notWritable(let name):
            return "fw_cfg file \"\(name)\" is not writable"
        case .outOfRange(let file, let offset, let length, let size):
            return "\(length) bytes at offset \(offset) lie outside fw_cfg file \"\(file)\" of \(size) bytes"
        case .sizeMismatch(let file, let expected, let actual):
            return "fw_cfg file \"\(file)\" is \(expected) bytes, not \(actual)"
        }
    }
}

/// QEMU's firmware configuration device ("fw_cfg") with the DMA interface
/// (`docs/specs/fw_cfg.rst`; guest-interfaces §4).
///
/// Items are byte strings keyed by a 16-bit selector. The guest writes a selector, then reads the item
/// byte by byte through the data register, or describes a transfer in a `FWCfgDmaAccess` descriptor in
/// guest RAM and writes its address to the DMA register. Named files are listed in a directory item
/// (key 0x0019); only files added with `addWritableFile` accept DMA writes.
///
/// The device is reached through one of two register windows, `ports` and `mmio`. DMA runs
/// synchronously on the vCPU thread that writes the DMA register; write callbacks run after the device
/// lock is released.
public final class FwCfg: Sendable {
    /// Called after a guest DMA write to a writable file with the offset written at, the bytes written,
    /// and the file's whole new content.
    public typealias WriteHandler = @Sendable (_ offset: Int, _ bytes: [UInt8], _ whole: [UInt8]) -> Void

    /// The guest-visible registers and transfer state, plus the content of writable files. Read-only
    /// items are not state: the machine recreates them from the same configuration.
    ///
    /// Snapshot payload, version 1 (little-endian):
    ///
    ///     u16 selector (any key; an unknown one reads as empty)
    ///     u32 offset in the selected item (at most its size)
    ///     u64 DMA address register (0, or the high half between the guest's two writes: low 32 bits 0)
    ///     u32 number of writable files (must be this device's number)
    ///     per writable file, by name (UTF-8 byte order):
    ///         u32 name length (1-55), name (UTF-8)
    ///         u32 content length (the file's size on this device), content
    public struct State: Codable, Equatable, Sendable {
        public static let version = 1
        public var selector: UInt16 = 0
        /// Offset of the next byte in the selected item.
        public var offset = 0
        /// The DMA address register (the high half, between the guest's two writes).
        public var dmaAddress: UInt64 = 0
        /// Content of every writable file, by name.
        public var writableFiles: [String: [UInt8]] = [:]
        public init() {}
    }

    /// The x86 I/O port base (QEMU's and the guest DSDT's `FWCF` resource).
    public static let portBase: UInt64 = 0x510
    /// Selector (2 ports, rounded up to 4) plus the 8-byte DMA address register.
    public static let portSize: UInt64 = 12
    /// Size of the MMIO window.
    public static let mmioSize: UInt64 = 0x18

    public static let signatureKey: UInt16 = 0x0000
    public static let idKey: UInt16 = 0x0001
    public static let fileDirKey: UInt16 = 0x0019
    public static let firstFileKey: UInt16 = 0x0020
    /// File selectors stay below this key (bit 14 was the historical write flag).
    public static let fileKeyLimit: UInt16 = 0x4000
    /// Longest file name, leaving room for the NUL in the directory's 56-byte name field.
    public static let maxNameLength = 55

    /// FW_CFG_ID feature bits.
    public static let featureTraditional: UInt32 = 0x01
    public static let featureDMA: UInt32 = 0x02

    /// Control bits of a DMA descriptor; a SELECT carries the key in bits 31:16.
    public static let dmaError: UInt32 = 0x01
    public static let dmaRead: UInt32 = 0x02
    public static let dmaSkip: UInt32 = 0x04
    public static let dmaSelect: UInt32 = 0x08
    public static let dmaWrite: UInt32 = 0x10

    /// What reads of the DMA address register return, in byte order ("QEMU CFG" big-endian).
    static let dmaSignature = Array("QEMU CFG".utf8)

    // Register offsets, the same in both windows.
    package static let selectorOffset: UInt64 = 0, dataOffset: UInt64 = 1
    package static let dmaHighOffset: UInt64 = 4, dmaLowOffset: UInt64 = 8

    fileprivate struct Item {
        var data: [UInt8]
        /// Non-nil for files the guest may write by DMA.
        var onWrite: WriteHandler?
    }

    /// A completed guest write whose handler still has to run (outside the lock).
    fileprivate struct PendingWrite {
        let handler: WriteHandler
        let offset: Int
        let bytes: [UInt8]
        let whole: [UInt8]
    }

    fileprivate struct Core {
        var selector: UInt16 = 0
        var offset = 0 // invariant: 0 ... size of the selected item (0 if there is none)
        var dmaAddress: UInt64 = 0
        var items: [UInt16: Item] = [:]
        var files: [String: UInt16] = [:]
    }

    private let core: Mutex<Core>
    private let memory: GuestMemory

    /// Where the machine puts the two register windows (QEMU's x86: ports 0x510, no MMIO window;
    /// ours has both, like QEMU's `fw_cfg` on other machines).
    public struct Placement: Sendable {
        public var port: UInt64
        public var mmio: UInt64
        public init(port: UInt64, mmio: UInt64) {
            self.port = port
            self.mmio = mmio
        }
    }
    /// Nil for a device on no bus (unit tests).
    public let placement: Placement?

    /// A device with the signature, the ID (traditional and DMA interfaces) and an empty directory.
    /// DMA transfers go to and from `memory`.
    public init(memory: GuestMemory, placement: Placement? = nil) {
        self.memory = memory
        self.placement = placement
        var c = Core()
        c.items[Self.signatureKey] = Item(data: Array("QEMU".utf8))
        c.items[Self.idKey] = Item(data: littleEndianBytes(Self.featureTraditional | Self.featureDMA))
        c.items[Self.fileDirKey] = Item(data: Self.directory(c))
        core = Mutex(c)
    }

    /// The I/O port window, to be placed at `portBase` with `portSize`: selector at +0 (16-bit
    /// little-endian), data at +1, DMA address at +4 (64-bit big-endian, high half then low half).
    /// Each call returns a new view of this device.
    public var ports: FwCfgRegisters { FwCfgRegisters(device: self, bigEndianSelector: false) }

    /// The MMIO window (size `mmioSize`).
    ///
    /// On x86, Linux's `qemu_fw_cfg` uses ctrl +0 / data +1 / DMA +4 whatever the resource type
    /// (guest-interfaces §0 row 3), and writes the selector big-endian when the resource is memory.
    /// So this window has the port layout with a big-endian selector, not the ARM "virt" layout
    /// (data +0, selector +8, DMA +16), which that driver cannot use. A single 8-byte big-endian write
    /// at +4 also starts a transfer. Each call returns a new view of this device.
    public var mmio: FwCfgRegisters { FwCfgRegisters(device: self, bigEndianSelector: true) }

    /// Adds or replaces a numbered item (legacy keys such as 0x0005 NB_CPUS, or arch keys from 0x8000).
    /// The directory key and the file keys (0x0019 ..< `fileKeyLimit`) are reserved.
    public func addItem(key: UInt16, data: [UInt8]) {
        precondition(key < Self.fileDirKey || key >= Self.fileKeyLimit,
                     "fw_cfg key 0x\(String(key, radix: 16)) is reserved for the file directory and files")
        core.withLock { $0.items[key] = Item(data: data) }
    }

    /// Adds a read-only file. Selectors are given from `firstFileKey` up in the order files are added.
    public func addFile(_ name: String, data: [UInt8]) throws(FwCfgError) {
        try insertFile(name, Item(data: data))
    }

    /// Adds a file of `size` zero bytes that the guest may overwrite in place by DMA (it never grows).
    /// `onWrite` runs after each accepted write, outside the device lock.
    public func addWritableFile(_ name: String, size: Int, onWrite: @escaping WriteHandler) throws(FwCfgError) {
        guard size >= 0 else { throw .invalidSize(file: name, size: size) }
        try insertFile(name, Item(data: [UInt8](repeating: 0, count: size), onWrite: onWrite))
    }

    /// The content of a numbered item (nil when there is none).
    public func itemData(key: UInt16) -> [UInt8]? {
        core.withLock { $0.items[key]?.data }
    }

    /// The current content of a file.
    public func fileData(_ name: String) -> [UInt8]? {
        core.withLock { c in c.files[name].flatMap { c.items[$0]?.data } }
    }

    /// Replaces a file's content with as many bytes (on reset or restore). No write handler runs.
    public func replaceFileData(_ name: String, _ data: [UInt8]) throws(FwCfgError) {
        try core.withLock { c throws(FwCfgError) in
            guard let key = c.files[name], let size = c.items[key]?.data.count else { throw .unknownFile(name) }
            guard data.count == size else { throw .sizeMismatch(file: name, expected: size, actual: data.count) }
            c.items[key]?.data = data
        }
    }

    /// Writes into a writable file exactly as a guest DMA write would (in place, inside the file), then
    /// runs its handler; for the host-side WRITE_POINTER of direct boot. Registers are not affected.
    public func writeFile(_ name: String, offset: Int, _ bytes: [UInt8]) throws(FwCfgError) {
        let pending = try core.withLock { c throws(FwCfgError) -> PendingWrite? in
            guard let key = c.files[name], let size = c.items[key]?.data.count else { throw .unknownFile(name) }
            guard c.items[key]?.onWrite != nil else { throw .notWritable(name) }
            guard offset >= 0, offset <= size, bytes.count <= size - offset else {
                throw .outOfRange(file: name, offset: offset, length: bytes.count, size: size)
            }
            return c.store(bytes, at: offset, in: key)
        }
        if let p = pending { p.handler(p.offset, p.bytes, p.whole) }
    }

    /// The selector of a file.
    public func selector(ofFile name: String) -> UInt16? {
        core.withLock { $0.files[name] }
    }

    /// File names in the order they were added (that is, by selector).
    public var fileNames: [String] {
        core.withLock { $0.files.sorted { $0.value < $1.value }.map(\.key) }
    }

    /// The registers, transfer state and writable file contents.
    public func saveState() -> State {
        core.withLock { c in
            var s = State()
            s.selector = c.selector
            s.offset = c.offset
            s.dmaAddress = c.dmaAddress
            for (name, key) in c.files {
                if let item = c.items[key], item.onWrite != nil { s.writableFiles[name] = item.data }
            }
            return s
        }
    }

    /// Restores a state saved by a device with the same configuration: the same writable files
    /// (names and sizes) and the same items, since `offset` must lie inside the selected one. Checks
    /// everything before changing anything. No write handler runs (the machine restores what they
    /// feed separately); read restored contents back with `fileData`.
    public func restoreState(_ s: State) throws(LEDecodeError) {
        try core.withLock { c throws(LEDecodeError) in
            var contents: [(key: UInt16, data: [UInt8])] = []
            for (name, data) in s.writableFiles.sorted(by: { $0.key.utf8.lexicographicallyPrecedes($1.key.utf8) }) {
                guard let key = c.files[name], let item = c.items[key], item.onWrite != nil else {
                    throw Self.invalid("file name", "\"\(name)\" is not a writable file of this device")
                }
                guard data.count == item.data.count else {
                    throw Self.invalid("file \(name)", "\(data.count) bytes, this device's file has \(item.data.count)")
                }
                contents.append((key, data))
            }
            let writable = c.files.filter { c.items[$0.value]?.onWrite != nil }.keys
            if let missing = writable.sorted().first(where: { s.writableFiles[$0] == nil }) {
                throw Self.invalid("file count", "writable file \"\(missing)\" is missing")
            }
            let itemSize = c.items[s.selector]?.data.count ?? 0
            guard (0...itemSize).contains(s.offset) else {
                throw Self.invalid("offset", "\(s.offset) is outside item \(hex(s.selector)) of \(itemSize) bytes")
            }
            guard s.dmaAddress & 0xFFFF_FFFF == 0 else {
                throw Self.invalid("dma address", "\(hex(s.dmaAddress)) has a low half, which the register never holds")
            }
            for (key, data) in contents { c.items[key]?.data = data }
            c.selector = s.selector
            c.offset = s.offset
            c.dmaAddress = s.dmaAddress
        }
    }

    /// Name and size of every writable file.
    private var writableFileSizes: [String: Int] {
        core.withLock { c in
            var sizes: [String: Int] = [:]
            for (name, key) in c.files {
                if let item = c.items[key], item.onWrite != nil { sizes[name] = item.data.count }
            }
            return sizes
        }
    }

    private func insertFile(_ name: String, _ item: Item) throws(FwCfgError) {
        let nameBytes = Array(name.utf8)
        guard !nameBytes.isEmpty, nameBytes.count <= Self.maxNameLength, !nameBytes.contains(0) else {
            throw .invalidName(name)
        }
        guard item.data.count <= Int(UInt32.max) else { throw .invalidSize(file: name, size: item.data.count) }
        try core.withLock { c throws(FwCfgError) in
            guard c.files[name] == nil else { throw .duplicateFile(name) }
            let key = Self.firstFileKey + UInt16(c.files.count)
            guard key < Self.fileKeyLimit else { throw .tooManyFiles }
            c.files[name] = key
            c.items[key] = item
            c.items[Self.fileDirKey] = Item(data: Self.directory(c))
        }
    }

    /// FW_CFG_FILE_DIR: a big-endian count, then 64-byte entries {be32 size, be16 select, u16 0,
    /// name[56]} sorted by name bytes as QEMU does. (QEMU also renumbers selectors in name order; ours
    /// keep insertion order, which guests cannot tell apart since they look selectors up here.)
    private static func directory(_ c: Core) -> [UInt8] {
        let sorted = c.files.sorted { $0.key.utf8.lexicographicallyPrecedes($1.key.utf8) }
        var out = bigEndianBytes(UInt32(sorted.count))
        for (name, key) in sorted {
            out += bigEndianBytes(UInt32(c.items[key]?.data.count ?? 0))
            out += bigEndianBytes(key)
            out += [0, 0]
            let nameBytes = Array(name.utf8)
            out += nameBytes + [UInt8](repeating: 0, count: 56 - nameBytes.count)
        }
        return out
    }

    // MARK: Register access (both windows)

    func readRegister(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        switch offset {
        case Self.dataOffset:
            // Wider reads return successive bytes in order ("string-preserving").
            core.withLock { c in
                for i in data.indices { data[i] = c.nextByte() }
            }
        case Self.dmaHighOffset..<Self.dmaHighOffset + 8:
            let start = Int(offset - Self.dmaHighOffset)
            for i in data.indices {
                data[i] = start + i < Self.dmaSignature.count ? Self.dmaSignature[start + i] : 0
            }
        default:
            for i in data.indices { data[i] = 0 }
        }
    }

    func writeRegister(offset: UInt64, data: UnsafeRawBufferPointer, bigEndianSelector: Bool) {
        let pending: PendingWrite? = core.withLock { c in
            switch (offset, data.count) {
            case (Self.selectorOffset, 2):
                let raw = UInt16(data[0]) | UInt16(data[1]) << 8
                c.select(bigEndianSelector ? raw.byteSwapped : raw)
            case (Self.dmaHighOffset, 4):
                c.dmaAddress = UInt64(bigEndianValue(data) as UInt32) << 32
            case (Self.dmaLowOffset, 4):
                let address = c.dmaAddress | UInt64(bigEndianValue(data) as UInt32)
                c.dmaAddress = 0 // the register reads 0 at rest, as in QEMU
                return c.transfer(descriptor: address, memory: memory)
            case (Self.dmaHighOffset, 8):
                c.dmaAddress = 0
                return c.transfer(descriptor: bigEndianValue(data), memory: memory)
            default:
                break // data writes are ignored (QEMU >= 2.4); other accesses hit nothing
            }
            return nil
        }
        if let p = pending { p.handler(p.offset, p.bytes, p.whole) }
    }
}

/// A register window of an `FwCfg` on a bus (see `FwCfg.ports` and `FwCfg.mmio`).
public final class FwCfgRegisters: BusDevice {
    public let device: FwCfg
    let bigEndianSelector: Bool

    init(device: FwCfg, bigEndianSelector: Bool) {
        self.device = device
        self.bigEndianSelector = bigEndianSelector
    }

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        device.readRegister(offset: offset, data: data)
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        device.writeRegister(offset: offset, data: data, bigEndianSelector: bigEndianSelector)
    }
}

extension FwCfg.Core {
    fileprivate mutating func select(_ key: UInt16) {
        selector = key
        offset = 0
    }

    /// The next data byte of the selected item, or 0 past its end or for an unknown key.
    fileprivate mutating func nextByte() -> UInt8 {
        guard let data = items[selector]?.data, offset < data.count else { return 0 }
        offset += 1
        return data[offset - 1]
    }

    /// Runs the DMA descriptor at `address` and stores its completion status.
    /// A descriptor outside guest RAM has nowhere to report an error, so it is dropped.
    fileprivate mutating func transfer(descriptor address: UInt64, memory: GuestMemory) -> FwCfg.PendingWrite? {
        let at = GuestAddress(address)
        guard let d = try? memory.read(at, count: 16) else { return nil }
        let control: UInt32 = bigEndianValue(d[0..<4])
        let length: UInt32 = bigEndianValue(d[4..<8])
        let target: UInt64 = bigEndianValue(d[8..<16])

        if control & FwCfg.dmaSelect != 0 { select(UInt16(control >> 16)) }
        var ok = true
        var pending: FwCfg.PendingWrite?
        if control & FwCfg.dmaRead != 0 {
            ok = read(length, to: target, memory: memory)
        } else if control & FwCfg.dmaWrite != 0 {
            (ok, pending) = write(length, from: target, memory: memory)
        } else if control & FwCfg.dmaSkip != 0, let size = items[selector]?.data.count {
            offset += min(Int(length), size - offset)
        }
        try? memory.write(bigEndianBytes(ok ? 0 : FwCfg.dmaError), at: at)
        return pending
    }

    /// Copies `length` bytes of the item to guest RAM, zero-filling past its end. The whole target
    /// range must be RAM (`hostPointer` rejects ranges that wrap around), which bounds the work.
    private mutating func read(_ length: UInt32, to address: UInt64, memory: GuestMemory) -> Bool {
        guard length > 0 else { return true }
        guard let p = try? memory.hostPointer(GuestAddress(address), length: UInt64(length)) else { return false }
        let dest = UnsafeMutableRawBufferPointer(start: p, count: Int(length))
        var copied = 0
        if let data = items[selector]?.data, offset < data.count {
            copied = min(dest.count, data.count - offset)
            data.withUnsafeBytes { src in
                UnsafeMutableRawBufferPointer(rebasing: dest[..<copied])
                    .copyMemory(from: UnsafeRawBufferPointer(rebasing: src[offset..<offset + copied]))
            }
            offset += copied
        }
        UnsafeMutableRawBufferPointer(rebasing: dest[copied...]).initializeMemory(as: UInt8.self, repeating: 0)
        return true
    }

    /// Copies `length` bytes from guest RAM into a writable item; fails if the item is not writable,
    /// the bytes would run past its end, or the source is not RAM.
    private mutating func write(_ length: UInt32, from address: UInt64, memory: GuestMemory) -> (Bool, FwCfg.PendingWrite?) {
        guard items[selector]?.onWrite != nil, let size = items[selector]?.data.count,
              Int(length) <= size - offset else { return (false, nil) }
        guard length > 0 else { return (true, nil) }
        guard let bytes = try? memory.read(GuestAddress(address), count: Int(length)) else { return (false, nil) }
        let pending = store(bytes, at: offset, in: selector)
        offset += bytes.count
        return (true, pending)
    }

    /// Overwrites the bytes at `offset` (inside the item) of writable item `key` and returns the handler
    /// call to make once the lock is released; nothing for an empty write.
    fileprivate mutating func store(_ bytes: [UInt8], at offset: Int, in key: UInt16) -> FwCfg.PendingWrite? {
        guard !bytes.isEmpty, let handler = items[key]?.onWrite else { return nil }
        items[key]?.data.replaceSubrange(offset..<offset + bytes.count, with: bytes)
        return FwCfg.PendingWrite(handler: handler, offset: offset, bytes: bytes, whole: items[key]?.data ?? [])
    }
}

extension FwCfg: SnapshotDevice {
    public static let snapshotName = "fwcfg"
    public static let snapshotVersion = UInt16(State.version)
    public static let oldestSnapshotVersion: UInt16 = 1

    public func saveSnapshot() -> [UInt8] {
        var s = saveState()
        let sizes = s.writableFiles.mapValues(\.count) // what is written (sizes are only checked when reading)
        var w = LEWriter(capacity: 64)
        w.encode { c throws(LEDecodeError) in try s.code(&c, version: Self.snapshotVersion, writableFileSizes: sizes) }
        return w.bytes
    }

    public func restoreSnapshot(_ payload: [UInt8], version: UInt16) throws(LEDecodeError) {
        let sizes = writableFileSizes
        let s = try Self.decodeSnapshot(payload, version: version) { r, v throws(LEDecodeError) in
            var s = State()
            try r.decode { c throws(LEDecodeError) in try s.code(&c, version: v, writableFileSizes: sizes) }
            return s
        }
        try restoreState(s)
    }
}

extension FwCfg.State {
    /// The payload layout (see `State`), for both directions: `saveSnapshot` and `restoreSnapshot`
    /// run it. The writer writes the files by name (UTF-8 byte order); the reader accepts them in
    /// any order but only `sizes`' files, each once and of its size.
    public mutating func code<C: LECoder>(_ c: inout C, version: UInt16, writableFileSizes sizes: [String: Int]) throws(LEDecodeError) {
        try c.u16(&selector, "fwcfg.selector")
        var offset32 = UInt32(clamping: offset)
        try c.u32(&offset32, "fwcfg.offset")
        offset = Int(offset32)
        try c.u64(&dmaAddress, "fwcfg.dma address")
        var count = writableFiles.count
        try c.count(&count, limit: sizes.count, minimumItemSize: 8, "fwcfg.file count")
        try c.require(count == sizes.count, "fwcfg.file count", "\(count) writable files, this device has \(sizes.count)")
        var names = c.isDecoding
            ? [String](repeating: "", count: count)
            : writableFiles.keys.sorted { $0.utf8.lexicographicallyPrecedes($1.utf8) }
        var files: [String: [UInt8]] = [:]
        try c.elements(&names, count: count, blank: { "" }) { c, name, _ throws(LEDecodeError) in
            try c.string(&name, limit: FwCfg.maxNameLength, "fwcfg.file name")
            try c.require(sizes[name] != nil, "fwcfg.file name", "\"\(name)\" is not a writable file of this device")
            try c.require(files[name] == nil, "fwcfg.file name", "\"\(name)\" appears twice")
            var data = writableFiles[name] ?? []
            var length = UInt32(truncatingIfNeeded: data.count)
            try c.u32(&length, "fwcfg.file \(name) length")
            let size = sizes[name] ?? 0
            try c.require(length == size, "fwcfg.file \(name)", "\(length) bytes, this device's file has \(size)")
            try c.raw(&data, count: Int(length), "fwcfg.file \(name)")
            files[name] = data
        }
        writableFiles = files
    }
}

// MARK: Byte order helpers

/// The big-endian value of `bytes` (as many as the type holds).
func bigEndianValue<T: FixedWidthInteger>(_ bytes: some Sequence<UInt8>) -> T {
    bytes.reduce(0) { $0 << 8 | T($1) }
}

func bigEndianBytes<T: FixedWidthInteger>(_ value: T) -> [UInt8] {
    (0..<MemoryLayout<T>.size).reversed().map { UInt8(truncatingIfNeeded: value >> (8 * $0)) }
}

extension FwCfg: PlatformDevice {
    public var busRegions: [BusRegion] {
        guard let p = placement else { return [] }
        return [.pio("fw_cfg", p.port, Self.portSize, ports), .mmio("fw_cfg", p.mmio, Self.mmioSize, mmio)]
    }

    public var snapshotSection: (name: String, device: any SnapshotDevice)? { ("dev.fw-cfg", self) }

    /// QEMU's firmware configuration device (QEMU0002, which Linux's qemu_fw_cfg driver binds to):
    /// both windows.
    public var dsdtAML: [AML] {
        guard let p = placement else { return [] }
        return [.device("FWCF", [
            .name("_HID", .string("QEMU0002")),
            .name("_STA", .integer(0x0B)),
            .name("_CRS", .resourceTemplate([
                AML.Resource.ports(p.port, Int(Self.portSize)),
                AML.Resource.memory32Fixed(writable: true, base: UInt32(p.mmio), length: UInt32(Self.mmioSize)),
            ])),
        ])]
    }

    /// `qemu,fw-cfg-mmio` with the MMIO window (the binding has one register window; Linux's
    /// qemu_fw_cfg uses the x86 register layout there, as this window has it), DMA coherent.
    public var deviceTreeNodes: [DeviceTreeNode] {
        guard let p = placement else { return [] }
        return [DeviceTreeNode("fw-cfg", properties: [.compatible("qemu,fw-cfg-mmio"), .reg(.memory(p.mmio, Self.mmioSize)), .flag("dma-coherent")])]
    }
}
