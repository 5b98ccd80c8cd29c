import Glibc
import WireFormat

/// Why a snapshot could not be written, read or loaded.
///
/// Every description is one line that starts with the file (`state.bin`, `memory.bin` or the
/// directory) and, where there is one, names the part of the file (`header`, `section table`,
/// `section "vcpu.0"`) and the field, so that a user knows exactly what is wrong with which file.
public enum SnapshotError: Error, Equatable, Sendable, CustomStringConvertible {
    /// The file ended before `part`, which needs `needed` bytes from the start of the file.
    case truncated(file: String, part: String, needed: UInt64, available: UInt64)
    /// `field` of `part` holds a value this reader does not accept.
    case invalid(file: String, part: String, field: String, reason: String)
    /// The CRC32C stored in `field` does not match the bytes it covers.
    case checksumMismatch(file: String, part: String, field: String, stored: UInt32, computed: UInt32)
    /// The header's format major is not one this reader knows (`major.minor` of the file).
    case unsupportedFormat(major: UInt16, minor: UInt16)
    /// A section's payload could not be decoded (thrown by the loaders of each component).
    case section(name: String, LEDecodeError)
    /// The payload needs a reader of at least `minimumVersion`; this one is `readerVersion`.
    case sectionTooNew(name: String, minimumVersion: UInt16, readerVersion: UInt16)
    /// The payload's layout `version` is older than the oldest this reader still loads.
    case sectionTooOld(name: String, version: UInt16, oldestSupported: UInt16)
    /// A section marked required that this reader does not know.
    case unknownRequiredSection(name: String)
    /// A section a loader needs is not in the snapshot.
    case missingSection(name: String)
    /// The snapshot directory to write exists already (nothing was touched).
    case alreadyExists(path: String)
    /// The directory that would hold the snapshot does not exist.
    case noParentDirectory(path: String, parent: String)
    /// A system call on `path` failed.
    case system(path: String, operation: String, errno: Int32)
    /// Writing the snapshot directory `path` was cancelled by the caller (`isCancelled`); the
    /// temporary directory was removed and `path` was not created.
    case cancelled(path: String)

    public var description: String {
        switch self {
        case .truncated(let file, let part, let needed, let available):
            return "\(file): truncated: \(part) needs \(needed) bytes, file has \(available)"
        case .invalid(let file, let part, let field, let reason):
            return part.isEmpty ? "\(file): \(field): \(reason)" : "\(file): \(part): \(field): \(reason)"
        case .checksumMismatch(let file, let part, let field, let stored, let computed):
            return "\(file): \(part): \(field) mismatch (stored \(hex32(stored)), computed \(hex32(computed)))"
        case .unsupportedFormat(let major, let minor):
            let known = "\(SnapshotFormat.currentMajor).x"
            if major > SnapshotFormat.currentMajor {
                return "\(SnapshotFormat.stateFile): header: format \(major).\(minor) is newer than this swiftvmm reads (\(known))"
            }
            return "\(SnapshotFormat.stateFile): header: format \(major).\(minor) is not a version this swiftvmm reads (\(known))"
        case .section(let name, let error):
            return "\(SnapshotFormat.stateFile): section \"\(name)\": \(error)"
        case .sectionTooNew(let name, let minimumVersion, let readerVersion):
            return "\(SnapshotFormat.stateFile): section \"\(name)\": version: needs a reader of version \(minimumVersion) or later, this swiftvmm reads up to \(readerVersion)"
        case .sectionTooOld(let name, let version, let oldestSupported):
            return "\(SnapshotFormat.stateFile): section \"\(name)\": version: \(version) is older than the oldest this swiftvmm loads (\(oldestSupported))"
        case .unknownRequiredSection(let name):
            return "\(SnapshotFormat.stateFile): section \"\(name)\": marked required, but this swiftvmm does not know it"
        case .missingSection(let name):
            return "\(SnapshotFormat.stateFile): section \"\(name)\": missing"
        case .alreadyExists(let path):
            return "\(path): already exists"
        case .noParentDirectory(let path, let parent):
            return "\(path): the parent directory \(parent) does not exist"
        case .system(let path, let operation, let errno):
            return "\(path): \(operation) failed: \(String(cString: strerror(errno))) (errno \(errno))"
        case .cancelled(let path):
            return "\(path): snapshot cancelled (the VM is shutting down); nothing was written"
        }
    }
}

func hex32(_ v: UInt32) -> String {
    let digits = String(v, radix: 16)
    return "0x" + String(repeating: "0", count: max(0, 8 - digits.count)) + digits
}
