import Glibc
import CLinux

/// An eventfd: a counter one thread signals and another waits on.
public struct EventFD: ~Copyable, @unchecked Sendable {
    public let fd: OwnedFD

    public init() throws(SysError) {
        let raw = eventfd(0, Int32(EFD_CLOEXEC))
        guard raw >= 0 else { throw SysError.last("eventfd") }
        fd = OwnedFD(adopting: raw)
    }

    /// Waits up to `timeoutMilliseconds` (-1: for ever) for a signal and consumes every signal
    /// pending; returns whether there was one.
    @discardableResult
    public func wait(timeoutMilliseconds: Int32 = -1) -> Bool {
        var p = pollfd(fd: fd.rawValue, events: Int16(POLLIN), revents: 0)
        while true {
            let rc = poll(&p, 1, timeoutMilliseconds)
            if rc < 0 && errno == EINTR { continue }
            guard rc > 0 else { return false }
            break
        }
        consume()
        return true
    }

    /// Adds 1 to the counter. Never blocks in practice (the counter would need 2^64 signals).
    public func signal() { signaller.signal() }
}

/// Waits until one of the descriptors is readable; returns the indices that are. Retries EINTR.
public func waitReadable(_ fds: [Int32], timeoutMilliseconds: Int32 = -1) throws(SysError) -> [Int] {
    var polls = fds.map { pollfd(fd: $0, events: Int16(POLLIN), revents: 0) }
    _ = try retryingEINTR("poll") { poll(&polls, nfds_t(polls.count), timeoutMilliseconds) }
    return polls.indices.filter { polls[$0].revents != 0 }
}

/// Receives the given signals through a descriptor instead of handlers. The signals must be blocked
/// in every thread (call `blockSignals` before starting threads).
public final class SignalFD: @unchecked Sendable {
    public let fd: OwnedFD

    public init(_ signals: [Int32]) throws(SysError) {
        var set = sigset_t()
        sigemptyset(&set)
        for s in signals { sigaddset(&set, s) }
        let raw = signalfd(-1, &set, Int32(SFD_CLOEXEC))
        guard raw >= 0 else { throw SysError.last("signalfd") }
        fd = OwnedFD(adopting: raw)
    }

    /// Reads one pending signal's number.
    public func next() throws(SysError) -> Int32 {
        var info = signalfd_siginfo()
        let n = withUnsafeMutableBytes(of: &info) { Glibc.read(fd.rawValue, $0.baseAddress, $0.count) }
        guard n == MemoryLayout<signalfd_siginfo>.size else { throw SysError.last("read signalfd") }
        return Int32(info.ssi_signo)
    }
}

/// Blocks (or unblocks) signals in the calling thread; threads started afterwards inherit the mask.
public func setSignalsBlocked(_ signals: [Int32], _ blocked: Bool) {
    var set = sigset_t()
    sigemptyset(&set)
    for s in signals { sigaddset(&set, s) }
    pthread_sigmask(blocked ? SIG_BLOCK : SIG_UNBLOCK, &set, nil)
}

/// A copyable handle that signals an `EventFD` from any thread or closure (an interrupt, a kick),
/// valid while the `EventFD` it came from lives.
public struct EventSignal: Sendable {
    let fd: Int32

    /// Adds 1 to the counter (see `EventFD.signal`).
    public func signal() {
        var one: UInt64 = 1
        _ = withUnsafeBytes(of: &one) { Glibc.write(fd, $0.baseAddress, 8) }
    }
}

extension EventFD {
    /// A handle that signals this eventfd; its owner must outlive every use of it.
    public var signaller: EventSignal { EventSignal(fd: fd.rawValue) }
}

/// Fills `buffer` with random bytes from the kernel's CSPRNG (getrandom(2); it blocks only before
/// the host's pool is first initialised, long before a VMM runs).
public func fillRandom(_ buffer: UnsafeMutableRawBufferPointer) {
    var done = 0
    while done < buffer.count {
        let n = getrandom(buffer.baseAddress! + done, buffer.count - done, 0)
        if n < 0 {
            if errno == EINTR { continue }
            preconditionFailure("getrandom failed: errno \(errno)")
        }
        done += n
    }
}
