import Glibc

/// What a descriptor is waited for, or reported ready for (poll(2)'s event bits).
public struct PollEvents: OptionSet, Sendable {
    public let rawValue: Int16
    public init(rawValue: Int16) { self.rawValue = rawValue }

    /// Data to read, a connection to accept, or the end of the stream (POLLIN).
    public static let readable = PollEvents(rawValue: Int16(POLLIN))
    /// Room to write (POLLOUT).
    public static let writable = PollEvents(rawValue: Int16(POLLOUT))
    /// The peer hung up (POLLHUP; reported whether asked for or not).
    public static let hangup = PollEvents(rawValue: Int16(POLLHUP))
    /// An error is pending on the descriptor (POLLERR; reported whether asked for or not).
    public static let error = PollEvents(rawValue: Int16(POLLERR))
    /// The descriptor is not open (POLLNVAL): a bug of ours.
    public static let invalid = PollEvents(rawValue: Int16(POLLNVAL))
}

/// A set of descriptors to wait on with poll(2). Add the owners' descriptors, then `wait`; the
/// result lists what each one (in the order added) is ready for. The set holds descriptor numbers
/// only while it lives: build it from owners that outlive it, for one wait.
public struct PollSet {
    private var fds: [pollfd] = []

    public init() {}

    /// Adds `fd`, waited for `events` (empty: only hangup and errors are reported). Returns its index.
    @discardableResult
    public mutating func add(_ fd: borrowing OwnedFD, _ events: PollEvents) -> Int {
        fds.append(pollfd(fd: fd.rawValue, events: events.rawValue, revents: 0))
        return fds.count - 1
    }

    /// Waits until a descriptor is ready or `timeoutMilliseconds` pass (-1: no limit), and returns
    /// what each descriptor is ready for (all empty after a timeout). A signal that interrupts the
    /// wait (EINTR) ends it as a timeout would, so the caller re-checks its state before waiting
    /// again. Other failures (ENOMEM, EINVAL for too many descriptors) throw SysError("poll").
    public mutating func wait(timeoutMilliseconds: Int32) throws(SysError) -> [PollEvents] {
        for i in fds.indices { fds[i].revents = 0 }
        let rc = poll(&fds, nfds_t(fds.count), timeoutMilliseconds)
        if rc < 0 {
            let code = Glibc.errno
            precondition(code != EFAULT, "poll: EFAULT (a bug: the pollfd array is ours)")
            if code == EINTR { return fds.map { _ in [] } }
            throw SysError("poll", errno: code)
        }
        return fds.map { PollEvents(rawValue: $0.revents) }
    }
}
