import Glibc

// Operations on descriptors held as plain numbers by code that must report them (QMP's fd sets
// list theirs in `query-fdsets`, and clients name them in `remove-fd`). Whoever holds such a
// number owns it and ends it with `closeDescriptor`.

/// Closes `fd`. Errors are ignored: after close(2) returns, even with EINTR or EIO, the number is
/// released on Linux, and retrying could close a descriptor another thread just opened.
public func closeDescriptor(_ fd: Int32) {
    _ = Glibc.close(fd)
}

/// Closes every descriptor of `fds` (see `closeDescriptor`).
public func closeDescriptors(_ fds: some Sequence<Int32>) {
    for fd in fds { closeDescriptor(fd) }
}

/// A close-on-exec duplicate of `fd` (fcntl F_DUPFD_CLOEXEC), the lowest free number from
/// `minimum` up. Throws SysError("fcntl F_DUPFD_CLOEXEC") on failure (EMFILE: the process's
/// descriptor table is full).
public func duplicateDescriptor(_ fd: Int32, minimum: Int32 = 0) throws(SysError) -> Int32 {
    try retryingEINTR("fcntl F_DUPFD_CLOEXEC") { fcntl(fd, F_DUPFD_CLOEXEC, minimum) }
}

/// The file status flags and access mode of the open file description `fd` refers to (fcntl
/// F_GETFL); `& O_ACCMODE` gives O_RDONLY, O_WRONLY or O_RDWR. Throws SysError("fcntl F_GETFL").
public func descriptorStatusFlags(_ fd: Int32) throws(SysError) -> Int32 {
    try retryingEINTR("fcntl F_GETFL") { fcntl(fd, F_GETFL) }
}

extension OwnedFD {
    /// A close-on-exec duplicate (see `duplicateDescriptor`).
    public func duplicate() throws(SysError) -> OwnedFD {
        OwnedFD(adopting: try duplicateDescriptor(rawValue))
    }

    /// Ends this owner without closing the descriptor; the caller owns the number from then on
    /// (and closes it with `closeDescriptor`).
    public consuming func releaseRawValue() -> Int32 {
        let fd = rawValue
        discard self
        return fd
    }
}

/// The calling thread's wall-clock time (CLOCK_REALTIME): seconds and nanoseconds since the epoch.
public func realtimeNow() -> (seconds: Int64, nanoseconds: Int64) {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return (Int64(ts.tv_sec), Int64(ts.tv_nsec))
}

/// Identifies a thread (pthread_self), to tell whether code runs on a given thread.
public struct ThreadIdentity: Equatable, @unchecked Sendable {
    private let handle: pthread_t

    /// The calling thread.
    public static var current: ThreadIdentity { ThreadIdentity(handle: pthread_self()) }

    public static func == (a: ThreadIdentity, b: ThreadIdentity) -> Bool { pthread_equal(a.handle, b.handle) != 0 }
}

extension EventFD {
    /// Reads and resets the counter. Blocks while it is 0 (the descriptor is blocking): call it when
    /// a poll reported the descriptor readable.
    @discardableResult
    public func consume() -> UInt64 {
        var counter: UInt64 = 0
        _ = withUnsafeMutableBytes(of: &counter) { Glibc.read(fd.rawValue, $0.baseAddress, 8) }
        return counter
    }
}
