import Glibc
import Synchronization
import VMMSys

/// One descriptor of an fd set, as `query-fdsets` reports it.
public struct FdSetFDInfo: Equatable, Sendable {
    public var fd: Int32
    public var opaque: String?

    public init(fd: Int32, opaque: String?) {
        self.fd = fd
        self.opaque = opaque
    }
}

/// One fd set, as `query-fdsets` reports it.
public struct FdSetInfo: Equatable, Sendable {
    public var fdSetID: Int64
    public var fds: [FdSetFDInfo]

    public init(fdSetID: Int64, fds: [FdSetFDInfo]) {
        self.fdSetID = fdSetID
        self.fds = fds
    }
}

/// QEMU's file descriptor sets (`add-fd`, `remove-fd`, `query-fdsets`, `/dev/fdset/N`).
///
/// A management application that may not let the VMM open files itself passes descriptors over
/// the monitor socket (SCM_RIGHTS) into numbered sets. All descriptors of a set refer to the same
/// file, opened with different access modes. When the VMM "opens" `/dev/fdset/N`, it gets a
/// duplicate of the set's descriptor whose access mode (O_RDONLY, O_WRONLY, O_RDWR) matches the
/// requested one; the duplicate counts as a user of the set until it is closed.
///
/// Lifecycle:
/// - `remove-fd` marks descriptors removed: they no longer match opens nor show in
///   `query-fdsets`, and are closed as soon as the set has no users (at once if it has none);
/// - a descriptor not removed is closed when its set has no users while no monitor is
///   connected: when the monitor disconnects, or when the last user goes away after that
///   (QEMU's rule: "fds not in use are closed when the monitor connection disconnects");
/// - a set disappears with its last descriptor and last user.
///
/// Thread-safe: the monitor thread adds and removes, any thread opens and closes.
public final class FdSets: Sendable {
    private struct Entry {
        var fd: Int32
        var opaque: String?
        var removed = false
    }

    private struct FdSet {
        var id: Int64
        /// Oldest first.
        var entries: [Entry] = []
        /// Duplicates handed out and not yet closed.
        var users = 0
    }

    private struct State {
        var sets: [Int64: FdSet] = [:]
        var monitors = 0
        var totalFDs = 0
    }

    private let state = Mutex(State())
    /// Most descriptors held in all sets together (each costs a slot in the process's fd table).
    public let maxDescriptors: Int

    public init(maxDescriptors: Int = 1024) {
        self.maxDescriptors = maxDescriptors
    }

    deinit {
        state.withLock { s in
            for set in s.sets.values { closeDescriptors(set.entries.map(\.fd)) }
            s.sets = [:]
        }
    }

    // MARK: Monitor side

    /// Adds `rawFD`, which the caller hands over (it is closed here on failure), to set `fdSetID`
    /// (created if needed) or to a new set with the lowest free id. Returns the set id and the fd.
    public func add(takingOwnershipOf rawFD: Int32, fdSetID: Int64?, opaque: String?) throws(QMPError) -> (fdSetID: Int64, fd: Int32) {
        let result: Result<(Int64, Int32), QMPError> = state.withLock { s in
            if let id = fdSetID, id < 0 {
                return .failure(.invalidParameterValue("fdset-id", expected: "a non-negative value"))
            }
            guard s.totalFDs < maxDescriptors else {
                return .failure(.generic("Too many file descriptors in fd sets (at most \(maxDescriptors))"))
            }
            let id = fdSetID ?? Self.lowestFreeID(s.sets)
            s.sets[id, default: FdSet(id: id)].entries.append(Entry(fd: rawFD, opaque: opaque))
            s.totalFDs += 1
            return .success((id, rawFD))
        }
        switch result {
        case .success(let (id, fd)): return (id, fd)
        case .failure(let e):
            closeDescriptor(rawFD)
            throw e
        }
    }

    /// Adds a duplicate of `fd` (for descriptors that did not come over the monitor, such as
    /// inherited ones named on the command line).
    public func add(duplicating fd: borrowing OwnedFD, fdSetID: Int64?, opaque: String?) throws(QMPError) -> (fdSetID: Int64, fd: Int32) {
        let dup: OwnedFD
        do throws(SysError) { dup = try fd.duplicate() } catch {
            throw .generic("Cannot duplicate file descriptor: \(error)")
        }
        return try add(takingOwnershipOf: dup.releaseRawValue(), fdSetID: fdSetID, opaque: opaque)
    }

    private static func lowestFreeID(_ sets: [Int64: FdSet]) -> Int64 {
        var id: Int64 = 0
        while sets[id] != nil { id += 1 }
        return id
    }

    /// `remove-fd`: marks descriptor `fd` of set `fdSetID`, or every descriptor of the set, removed.
    public func remove(fdSetID: Int64, fd: Int64?) throws(QMPError) {
        let toClose: [Int32]? = state.withLock { s in
            guard var set = s.sets[fdSetID] else { return nil }
            if let fd {
                guard let i = set.entries.firstIndex(where: { Int64($0.fd) == fd && !$0.removed }) else { return nil }
                set.entries[i].removed = true
            } else {
                for i in set.entries.indices { set.entries[i].removed = true }
            }
            s.sets[fdSetID] = set
            return Self.cleanup(&s, id: fdSetID)
        }
        guard let toClose else {
            let name = fd.map { "fdset-id:\(fdSetID), fd:\($0)" } ?? "fdset-id:\(fdSetID)"
            throw .generic("File descriptor named '\(name)' not found")
        }
        closeDescriptors(toClose)
    }

    /// `query-fdsets`: sets in descending id order (as QEMU lists them), descriptors oldest first;
    /// removed descriptors still waiting for their set's users are not listed.
    public func query() -> [FdSetInfo] {
        state.withLock { s in
            s.sets.keys.sorted(by: >).map { id in
                FdSetInfo(fdSetID: id, fds: s.sets[id]!.entries.filter { !$0.removed }.map { FdSetFDInfo(fd: $0.fd, opaque: $0.opaque) })
            }
        }
    }

    /// A monitor connection opened.
    public func monitorConnected() {
        state.withLock { $0.monitors += 1 }
    }

    /// A monitor connection closed: with no monitor left, descriptors of sets not in use are closed.
    public func monitorDisconnected() {
        let toClose: [Int32] = state.withLock { s in
            s.monitors = max(0, s.monitors - 1)
            var gone: [Int32] = []
            for id in Array(s.sets.keys) { gone += Self.cleanup(&s, id: id) }
            return gone
        }
        closeDescriptors(toClose)
    }

    /// Drops what set `id` no longer needs; returns the descriptors to close (after unlocking).
    private static func cleanup(_ s: inout State, id: Int64) -> [Int32] {
        guard var set = s.sets[id], set.users == 0 else { return [] }
        let closeAll = s.monitors == 0
        let gone = set.entries.filter { $0.removed || closeAll }.map(\.fd)
        set.entries.removeAll { $0.removed || closeAll }
        s.totalFDs -= gone.count
        s.sets[id] = set.entries.isEmpty ? nil : set
        return gone
    }

    // MARK: VMM side

    /// Opens `/dev/fdset/N`: duplicates (close-on-exec) the newest descriptor of set N whose access
    /// mode matches `flags & O_ACCMODE`. Fails with ENOENT when the set does not exist, EACCES when
    /// no descriptor matches, EINVAL for a malformed path. Other bits of `flags` are ignored: the
    /// status flags belong to the open file description the set's descriptors share.
    public func openFdSet(path: String, flags: Int32) throws(SysError) -> HostFile {
        guard let id = Self.fdSetID(path: path) else { throw SysError("open \(path)", errno: EINVAL) }
        return try self.open(fdSetID: id, flags: flags, path: path)
    }

    /// Opens set `fdSetID` (see `openFdSet(path:flags:)`).
    public func open(fdSetID: Int64, flags: Int32, path: String? = nil) throws(SysError) -> HostFile {
        let operation = "open \(path ?? "/dev/fdset/\(fdSetID)")"
        let result: Result<Int32, SysError> = state.withLock { s in
            guard var set = s.sets[fdSetID] else { return .failure(SysError(operation, errno: ENOENT)) }
            for e in set.entries.reversed() where !e.removed {
                let fl: Int32
                do throws(SysError) { fl = try descriptorStatusFlags(e.fd) } catch {
                    return .failure(SysError(operation + " (\(error.operation))", errno: error.errno))
                }
                guard fl & O_ACCMODE == flags & O_ACCMODE else { continue }
                let dup: Int32
                do throws(SysError) { dup = try duplicateDescriptor(e.fd) } catch {
                    return .failure(SysError(operation + " (\(error.operation))", errno: error.errno))
                }
                set.users += 1
                s.sets[fdSetID] = set
                return .success(dup)
            }
            return .failure(SysError(operation, errno: EACCES))
        }
        switch result {
        case .success(let fd): return HostFile(adopting: fd, fdSetID: fdSetID, owner: self)
        case .failure(let e): throw e
        }
    }

    /// Opens a host file the way QEMU's qemu_open does: `/dev/fdset/N` from the fd sets, any
    /// other path with open(2) (O_CLOEXEC added).
    public func openHostFile(path: String, flags: Int32, mode: UInt32 = 0) throws(SysError) -> HostFile {
        if path.hasPrefix(Self.prefix) { return try openFdSet(path: path, flags: flags) }
        guard !path.utf8.contains(0) else { throw SysError("open \(path)", errno: EINVAL) }
        let file = try OwnedFD.open(path, flags: flags, mode: mode)
        return HostFile(adopting: file.releaseRawValue(), fdSetID: nil, owner: nil)
    }

    /// Number of duplicates of set `fdSetID` in use (0 for a set that does not exist).
    public func users(of fdSetID: Int64) -> Int {
        state.withLock { $0.sets[fdSetID]?.users ?? 0 }
    }

    /// A duplicate from set `id` was closed.
    fileprivate func release(fdSetID id: Int64) {
        let toClose: [Int32] = state.withLock { s in
            guard s.sets[id] != nil else { return [] }
            s.sets[id]!.users -= 1
            return Self.cleanup(&s, id: id)
        }
        closeDescriptors(toClose)
    }

    static let prefix = "/dev/fdset/"

    /// The set id in `/dev/fdset/N` (decimal digits only, as QEMU's parser wants).
    public static func fdSetID(path: String) -> Int64? {
        guard path.hasPrefix(prefix) else { return nil }
        let digits = path.utf8.dropFirst(prefix.utf8.count)
        guard !digits.isEmpty, digits.count <= 18, digits.allSatisfy({ $0 >= 0x30 && $0 <= 0x39 }) else { return nil }
        return Int64(String(decoding: digits, as: UTF8.self))
    }
}

/// A descriptor opened through `FdSets.openHostFile` or `openFdSet`: closes in `deinit`, and when
/// it came from an fd set, tells the set it has one user less.
public struct HostFile: ~Copyable, @unchecked Sendable {
    public let rawValue: Int32
    /// The set the descriptor was duplicated from; nil for a file opened by path.
    public let fdSetID: Int64?
    private let owner: FdSets?

    fileprivate init(adopting fd: Int32, fdSetID: Int64?, owner: FdSets?) {
        rawValue = fd
        self.fdSetID = fdSetID
        self.owner = owner
    }

    deinit {
        closeDescriptor(rawValue)
        if let owner, let fdSetID { owner.release(fdSetID: fdSetID) }
    }
}
