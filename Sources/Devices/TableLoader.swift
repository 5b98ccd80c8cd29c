import VMMCore
import WireFormat

/// One command of QEMU's ACPI linker/loader script, the fw_cfg file `etc/table-loader`
/// (`hw/acpi/bios-linker-loader.c`; guest-interfaces §4.5). Firmware runs the script to place fw_cfg
/// files in guest RAM and link them; for direct kernel boot `TableLoaderExecutor` runs it on the host.
public enum LoaderCommand: Equatable, Sendable {
    /// Where firmware allocates a file.
    public enum Zone: UInt8, Sendable {
        /// Anywhere in RAM (below 4 GiB for the firmware that honour it).
        case high = 1
        /// The F segment, 0xE0000-0xFFFFF.
        case fseg = 2
    }

    /// Loads the whole file into guest RAM at an address aligned to `alignment` (a power of two).
    case allocate(file: String, alignment: UInt32, zone: Zone)
    /// Adds the address of `srcFile` to the `size`-byte little-endian integer at `offset` in `destFile`.
    case addPointer(destFile: String, srcFile: String, offset: UInt32, size: UInt8)
    /// Subtracts the byte sum of `file[start ..< start + length]` from `file[offset]`, so the range sums to 0.
    case addChecksum(file: String, offset: UInt32, start: UInt32, length: UInt32)
    /// Writes the address of `srcFile` plus `srcOffset` (`size` bytes, little-endian) into the fw_cfg
    /// file `destFile` at `destOffset`, as a guest DMA write would.
    case writePointer(destFile: String, srcFile: String, destOffset: UInt32, srcOffset: UInt32, size: UInt8)
}

/// A malformed script, or a command that cannot be carried out. `command` is the index of the
/// 128-byte entry when decoding, and of the command in the list when executing.
public enum TableLoaderError: Error, CustomStringConvertible, Equatable, Sendable {
    /// The script is not a whole number of 128-byte entries.
    case badLength(Int)
    /// A name field has no NUL within its 56 bytes, or is not UTF-8.
    case badName(command: Int)
    case badAlignment(command: Int, alignment: UInt32)
    case badZone(command: Int, zone: UInt8)
    case badPointerSize(command: Int, size: UInt8)
    case unknownFile(command: Int, file: String)
    case notAllocated(command: Int, file: String)
    case alreadyAllocated(command: Int, file: String)
    /// `length` bytes at `offset` do not lie inside the file.
    case outOfRange(command: Int, file: String, offset: UInt64, length: UInt64, fileSize: Int)
    /// A pointer does not fit in its `size` bytes.
    case pointerOverflow(command: Int, size: UInt8)
    case memory(command: Int, GuestMemoryError)

    public var description: String {
        switch self {
        case .badLength(let n):
            return "table-loader script of \(n) bytes is not a multiple of \(TableLoader.entrySize)"
        case .badName(let i):
            return "table-loader command \(i): a file name is not NUL-terminated UTF-8 within \(TableLoader.nameSize) bytes"
        case .badAlignment(let i, let a):
            return "table-loader command \(i): alignment \(a) is not a power of two"
        case .badZone(let i, let z):
            return "table-loader command \(i): unknown allocation zone \(z)"
        case .badPointerSize(let i, let s):
            return "table-loader command \(i): pointer size \(s) is not 1, 2, 4 or 8"
        case .unknownFile(let i, let f):
            return "table-loader command \(i): no fw_cfg file \"\(f)\""
        case .notAllocated(let i, let f):
            return "table-loader command \(i): file \"\(f)\" is used before it is allocated"
        case .alreadyAllocated(let i, let f):
            return "table-loader command \(i): file \"\(f)\" is allocated twice"
        case .outOfRange(let i, let f, let offset, let length, let size):
            return "table-loader command \(i): \(length) bytes at offset \(offset) lie outside file \"\(f)\" of \(size) bytes"
        case .pointerOverflow(let i, let s):
            return "table-loader command \(i): the pointer does not fit in \(s) bytes"
        case .memory(let i, let e):
            return "table-loader command \(i): \(e)"
        }
    }
}

/// The binary form of the linker/loader script: 128-byte entries, a little-endian u32 command and a
/// 124-byte body whose names are NUL-terminated within 56 bytes.
public enum TableLoader {
    /// The fw_cfg file that holds the script.
    public static let fileName = "etc/table-loader"
    public static let entrySize = 128
    public static let nameSize = 56

    static let allocateCommand: UInt32 = 1, addPointerCommand: UInt32 = 2
    static let addChecksumCommand: UInt32 = 3, writePointerCommand: UInt32 = 4

    /// Encodes `cmds` as script entries. Names must be at most 55 bytes without NUL (as fw_cfg file
    /// names are); a longer name is a programming error.
    public static func encode(_ cmds: [LoaderCommand]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(cmds.count * entrySize)
        for cmd in cmds {
            var e = [UInt8](repeating: 0, count: entrySize)
            func put(_ bytes: [UInt8], at offset: Int) { e.replaceSubrange(offset..<offset + bytes.count, with: bytes) }
            func putName(_ name: String, at offset: Int) {
                let bytes = Array(name.utf8)
                precondition(bytes.count < nameSize && !bytes.contains(0), "table-loader file name \"\(name)\" does not fit")
                put(bytes, at: offset)
            }
            switch cmd {
            case .allocate(let file, let alignment, let zone):
                put(littleEndianBytes(allocateCommand), at: 0)
                putName(file, at: 4)
                put(littleEndianBytes(alignment), at: 60)
                e[64] = zone.rawValue
            case .addPointer(let dest, let src, let offset, let size):
                put(littleEndianBytes(addPointerCommand), at: 0)
                putName(dest, at: 4)
                putName(src, at: 60)
                put(littleEndianBytes(offset), at: 116)
                e[120] = size
            case .addChecksum(let file, let offset, let start, let length):
                put(littleEndianBytes(addChecksumCommand), at: 0)
                putName(file, at: 4)
                put(littleEndianBytes(offset), at: 60)
                put(littleEndianBytes(start), at: 64)
                put(littleEndianBytes(length), at: 68)
            case .writePointer(let dest, let src, let destOffset, let srcOffset, let size):
                put(littleEndianBytes(writePointerCommand), at: 0)
                putName(dest, at: 4)
                putName(src, at: 60)
                put(littleEndianBytes(destOffset), at: 116)
                put(littleEndianBytes(srcOffset), at: 120)
                e[124] = size
            }
            out += e
        }
        return out
    }

    /// Decodes a script. Entries with command 0 (padding) and unknown commands are skipped, as SeaBIOS
    /// and OVMF do, so that newer scripts stay usable. Pointer sizes must be 1, 2, 4 or 8, alignments
    /// powers of two and zones known.
    public static func decode(_ bytes: [UInt8]) throws(TableLoaderError) -> [LoaderCommand] {
        guard bytes.count % entrySize == 0 else { throw .badLength(bytes.count) }
        var cmds: [LoaderCommand] = []
        for i in 0..<bytes.count / entrySize {
            let e = bytes[i * entrySize..<(i + 1) * entrySize]
            let base = e.startIndex
            func u32(_ offset: Int) -> UInt32 {
                (0..<4).reduce(0) { $0 | UInt32(e[base + offset + $1]) << (8 * $1) }
            }
            func name(_ offset: Int) throws(TableLoaderError) -> String {
                let field = e[base + offset..<base + offset + nameSize]
                guard let end = field.firstIndex(of: 0),
                      let s = String(validating: field[..<end], as: UTF8.self) else { throw .badName(command: i) }
                return s
            }
            func pointerSize(_ offset: Int) throws(TableLoaderError) -> UInt8 {
                let size = e[base + offset]
                guard [1, 2, 4, 8].contains(size) else { throw .badPointerSize(command: i, size: size) }
                return size
            }
            switch u32(0) {
            case allocateCommand:
                let alignment = u32(60)
                guard alignment.nonzeroBitCount == 1 else { throw .badAlignment(command: i, alignment: alignment) }
                guard let zone = LoaderCommand.Zone(rawValue: e[base + 64]) else {
                    throw .badZone(command: i, zone: e[base + 64])
                }
                cmds.append(.allocate(file: try name(4), alignment: alignment, zone: zone))
            case addPointerCommand:
                cmds.append(.addPointer(destFile: try name(4), srcFile: try name(60), offset: u32(116),
                                        size: try pointerSize(120)))
            case addChecksumCommand:
                cmds.append(.addChecksum(file: try name(4), offset: u32(60), start: u32(64), length: u32(68)))
            case writePointerCommand:
                cmds.append(.writePointer(destFile: try name(4), srcFile: try name(60), destOffset: u32(116),
                                          srcOffset: u32(120), size: try pointerSize(124)))
            default:
                continue
            }
        }
        return cmds
    }
}

/// Runs a linker/loader script on the host, for direct kernel boot: the same commands firmware would
/// run, so that both boot paths share one description of the ACPI tables.
public enum TableLoaderExecutor {
    /// Runs `cmds` against guest memory and returns where each file was allocated.
    ///
    /// - `files` returns a fw_cfg file's content.
    /// - `allocate` returns a guest address for `size` bytes with the given alignment and zone; it must
    ///   honour the alignment. ALLOCATE then copies the file there; ADD_POINTER and ADD_CHECKSUM patch
    ///   that copy in guest memory.
    /// - `writeFile` receives WRITE_POINTER's bytes for a fw_cfg file (the machine writes them into the
    ///   writable file and runs its handler, as a guest DMA write would).
    ///
    /// Every malformed command throws a `TableLoaderError`; errors of the closures propagate.
    public static func run(
        _ cmds: [LoaderCommand],
        files: (String) -> [UInt8]?,
        allocate: (_ file: String, _ size: Int, _ alignment: UInt32, _ zone: LoaderCommand.Zone) throws -> UInt64,
        memory: GuestMemory,
        writeFile: (_ file: String, _ offset: Int, _ bytes: [UInt8]) throws -> Void
    ) throws -> [String: UInt64] {
        var placed: [String: (address: UInt64, size: Int)] = [:]

        for (i, cmd) in cmds.enumerated() {
            /// The allocated copy of `file`.
            func allocated(_ file: String) throws(TableLoaderError) -> (address: UInt64, size: Int) {
                if let p = placed[file] { return p }
                throw files(file) == nil ? .unknownFile(command: i, file: file) : .notAllocated(command: i, file: file)
            }
            /// Checks that `length` bytes at `offset` lie inside a file of `size` bytes.
            func check(_ file: String, size: Int, offset: UInt64, length: UInt64) throws(TableLoaderError) {
                guard offset + length <= UInt64(size) else {
                    throw .outOfRange(command: i, file: file, offset: offset, length: length, fileSize: size)
                }
            }
            /// The guest address of `offset` in an allocated copy, which lies in guest RAM, so no overflow.
            func at(_ copy: (address: UInt64, size: Int), _ offset: UInt64) -> GuestAddress {
                GuestAddress(copy.address + offset)
            }
            func memoryAccess<T>(_ body: () throws(GuestMemoryError) -> T) throws(TableLoaderError) -> T {
                do { return try body() } catch { throw .memory(command: i, error) }
            }
            func checkPointerSize(_ size: UInt8) throws(TableLoaderError) {
                guard [1, 2, 4, 8].contains(size) else { throw .badPointerSize(command: i, size: size) }
            }
            /// `base + addend` if it fits in `size` bytes.
            func pointer(_ base: UInt64, plus addend: UInt64, size: UInt8) throws(TableLoaderError) -> UInt64 {
                let (sum, overflow) = base.addingReportingOverflow(addend)
                guard !overflow, size == 8 || sum >> (8 * UInt64(size)) == 0 else {
                    throw .pointerOverflow(command: i, size: size)
                }
                return sum
            }

            switch cmd {
            case .allocate(let file, let alignment, let zone):
                guard let data = files(file) else { throw TableLoaderError.unknownFile(command: i, file: file) }
                guard placed[file] == nil else { throw TableLoaderError.alreadyAllocated(command: i, file: file) }
                guard alignment.nonzeroBitCount == 1 else {
                    throw TableLoaderError.badAlignment(command: i, alignment: alignment)
                }
                let address = try allocate(file, data.count, alignment, zone)
                try memoryAccess { () throws(GuestMemoryError) in try memory.write(data, at: GuestAddress(address)) }
                placed[file] = (address, data.count)

            case .addPointer(let destFile, let srcFile, let offset, let size):
                try checkPointerSize(size)
                let dest = try allocated(destFile)
                let src = try allocated(srcFile)
                try check(destFile, size: dest.size, offset: UInt64(offset), length: UInt64(size))
                let field = at(dest, UInt64(offset))
                let old = try memoryAccess { () throws(GuestMemoryError) in try memory.read(field, count: Int(size)) }
                let value = try pointer(littleEndianValue(old), plus: src.address, size: size)
                try memoryAccess { () throws(GuestMemoryError) in
                    try memory.write(littleEndianBytes(value).prefix(Int(size)), at: field)
                }

            case .addChecksum(let file, let offset, let start, let length):
                let copy = try allocated(file)
                try check(file, size: copy.size, offset: UInt64(offset), length: 1)
                try check(file, size: copy.size, offset: UInt64(start), length: UInt64(length))
                let range = try memoryAccess { () throws(GuestMemoryError) in
                    try memory.read(at(copy, UInt64(start)), count: Int(length))
                }
                let sum = range.reduce(UInt8(0)) { $0 &+ $1 }
                let field = at(copy, UInt64(offset))
                try memoryAccess { () throws(GuestMemoryError) in
                    try memory.write(try memory.read(UInt8.self, at: field) &- sum, at: field)
                }

            case .writePointer(let destFile, let srcFile, let destOffset, let srcOffset, let size):
                try checkPointerSize(size)
                let src = try allocated(srcFile)
                guard let dest = files(destFile) else { throw TableLoaderError.unknownFile(command: i, file: destFile) }
                try check(destFile, size: dest.count, offset: UInt64(destOffset), length: UInt64(size))
                try check(srcFile, size: src.size, offset: UInt64(srcOffset), length: 1)
                let value = try pointer(src.address, plus: UInt64(srcOffset), size: size)
                try writeFile(destFile, Int(destOffset), Array(littleEndianBytes(value).prefix(Int(size))))
            }
        }
        return placed.mapValues { $0.address }
    }
}

func littleEndianValue(_ bytes: [UInt8]) -> UInt64 {
    bytes.reversed().reduce(0) { $0 << 8 | UInt64($1) }
}
