import Glibc
import WireFormat

/// Machine-wide flags recorded in the header.
public struct SnapshotMachineFlags: OptionSet, Equatable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }

    /// The machine has ACPI tables (and so the ACPI devices).
    public static let acpi = SnapshotMachineFlags(rawValue: 1 << 0)
    /// Every bit format 1.0 defines; the others must be zero.
    public static let known: SnapshotMachineFlags = [.acpi]
}

/// The fixed header of `state.bin`: what wrote the snapshot, when, and the machine's shape.
public struct SnapshotHeader: Equatable, Sendable {
    /// Format version. `encodeState` writes these as given; `init` sets the current version.
    public var formatMajor: UInt16
    public var formatMinor: UInt16
    /// Creation time, Unix time in nanoseconds.
    public var created: UInt64
    /// The program that wrote the snapshot and its version (each at most 32 bytes of UTF-8, no NUL).
    public var writerName: String
    public var writerVersion: String
    /// Guest memory size in bytes.
    public var memorySize: UInt64
    public var vcpuCount: UInt32
    public var machineFlags: SnapshotMachineFlags
    /// Length of memory.bin; must equal `memorySize` (the writer sets it).
    public var memoryFileLength: UInt64
    /// CRC32C of all of memory.bin, nil when not recorded (the writer sets it).
    public var memoryCRC32C: UInt32?

    public init(
        created: UInt64, writerName: String = "swiftvmm", writerVersion: String, memorySize: UInt64,
        vcpuCount: UInt32, machineFlags: SnapshotMachineFlags = [], memoryCRC32C: UInt32? = nil
    ) {
        formatMajor = SnapshotFormat.currentMajor
        formatMinor = SnapshotFormat.currentMinor
        self.created = created
        self.writerName = writerName
        self.writerVersion = writerVersion
        self.memorySize = memorySize
        self.vcpuCount = vcpuCount
        self.machineFlags = machineFlags
        memoryFileLength = memorySize
        self.memoryCRC32C = memoryCRC32C
    }

    /// The current time as Unix nanoseconds (for `created`).
    public static func now() -> UInt64 {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return UInt64(max(0, ts.tv_sec)) * 1_000_000_000 + UInt64(max(0, ts.tv_nsec))
    }
}

/// One component's state: a named, versioned payload whose bytes the component defines.
public struct SnapshotSection: Equatable, Sendable {
    /// 1 to 16 characters of [a-z0-9._-], unique in a snapshot ("vcpu.0", "irqchip", "dev.serial0").
    public var name: String
    /// The payload layout version the writer used.
    public var version: UInt16
    /// The oldest reader version that can load this payload. Layouts only grow by appending
    /// fields, so a reader whose version is at least this loads the fields it knows and ignores
    /// the rest.
    public var minimumVersion: UInt16
    /// A reader that does not know `name` must refuse the snapshot (else it skips the section).
    public var required: Bool
    public var payload: [UInt8]

    public init(name: String, version: UInt16, minimumVersion: UInt16, required: Bool, payload: [UInt8]) {
        self.name = name
        self.version = version
        self.minimumVersion = minimumVersion
        self.required = required
        self.payload = payload
    }

    /// Runs `body` on a reader over the payload; a decode error comes back naming this section,
    /// e.g. `state.bin: section "dev.serial0": lsr: truncated (needs 1 bytes, 0 left)`.
    public func decode<T>(_ body: (inout LEReader) throws(LEDecodeError) -> T) throws(SnapshotError) -> T {
        var reader = LEReader(payload)
        do {
            return try body(&reader)
        } catch {
            throw .section(name: name, error)
        }
    }

    /// Decodes the payload for a reader that handles `support` for this section: the load decision
    /// (too new, too old), then `body` on layout `min(version, support.current)` under the payload
    /// rule of `VersionedPayload` (trailing bytes refused after a layout the reader knows). Errors
    /// name this section.
    public func load<T>(_ support: SectionSupport,
                        _ body: (inout LEReader, UInt16) throws(LEDecodeError) -> T) throws(SnapshotError) -> T {
        _ = try loadDecision(support)
        do {
            return try VersionedPayload.decode(payload, version: version, current: support.current, oldest: support.oldest,
                                               name: name, body)
        } catch {
            throw .section(name: name, error)
        }
    }

    /// Decides how a reader loads this section: `support` is what the reader handles for this
    /// name, nil when it does not know the name. Returns `.skip` for an unknown optional section;
    /// throws for an unknown required one, a payload that needs a newer reader, or one older than
    /// the reader still loads. `.load(version:)` is the layout to decode: the payload's own version
    /// or, for a newer compatible payload, the reader's (trailing bytes are then newer fields).
    public func loadDecision(_ support: SectionSupport?) throws(SnapshotError) -> SectionLoad {
        guard let support else {
            if required { throw .unknownRequiredSection(name: name) }
            return .skip
        }
        if minimumVersion > support.current {
            throw .sectionTooNew(name: name, minimumVersion: minimumVersion, readerVersion: support.current)
        }
        if version < support.oldest {
            throw .sectionTooOld(name: name, version: version, oldestSupported: support.oldest)
        }
        return .load(version: min(version, support.current))
    }
}

/// The payload versions a reader handles for one section name.
public struct SectionSupport: Equatable, Sendable {
    /// The layout version this reader writes and knows completely.
    public var current: UInt16
    /// The oldest layout version it still loads.
    public var oldest: UInt16

    public init(current: UInt16, oldest: UInt16 = 1) {
        precondition(oldest <= current, "oldest supported version above the current one")
        self.current = current
        self.oldest = oldest
    }
}

/// What a reader does with a section (see `SnapshotSection.loadDecision`).
public enum SectionLoad: Equatable, Sendable {
    /// Decode the payload as layout `version`.
    case load(version: UInt16)
    /// An optional section this reader does not know.
    case skip
}

/// A section table entry as stored, for inspect and verify.
public struct SnapshotSectionEntry: Equatable, Sendable {
    public var name: String
    public var version: UInt16
    public var minimumVersion: UInt16
    public var flags: UInt32
    public var offset: UInt64
    public var length: UInt64
    public var crc32c: UInt32

    public var required: Bool { flags & SnapshotFormat.sectionRequiredFlag != 0 }
}

/// Where the parts of a `state.bin` are, as its header and table say (already validated).
public struct SnapshotLayout: Equatable, Sendable {
    public var fileSize: UInt64
    public var headerSize: UInt32
    public var headerCRC32C: UInt32
    public var sectionCount: UInt32
    public var sectionEntrySize: UInt32
    public var sectionTableOffset: UInt64
    public var sectionTableCRC32C: UInt32
    /// The table, in stored order (empty when only the header was decoded).
    public var entries: [SnapshotSectionEntry]

    public var sectionTableEnd: UInt64 { sectionTableOffset + UInt64(sectionCount) * UInt64(sectionEntrySize) }
}

/// The fields every format major keeps at the same place (offsets 0 to 88), read without
/// validation so that `inspect` can say what wrote a file it cannot load.
public struct SnapshotFrozenFields: Equatable, Sendable {
    public var magic: [UInt8]
    public var formatMajor: UInt16?
    public var formatMinor: UInt16?
    public var headerSize: UInt32?
    public var created: UInt64?
    /// Printable renderings (non-printable bytes escaped), nil when the file is too short.
    public var writerName: String?
    public var writerVersion: String?

    public var magicIsValid: Bool { magic == SnapshotFormat.magic }
}
