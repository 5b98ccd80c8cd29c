import CLinux
import Glibc

/// A started OS thread running a closure (vCPU threads must be real threads: KVM_RUN blocks).
public final class OSThread: @unchecked Sendable {
    private final class Box {
        let body: () -> Void
        init(_ body: @escaping () -> Void) { self.body = body }
    }

    public let handle: pthread_t
    private var joined = false

    /// Starts `body` on a new thread named `name` (at most 15 characters are kept).
    ///
    /// The thread starts with every signal blocked, whatever the caller's mask: the process's stop
    /// signals (SIGINT, SIGTERM, SIGHUP) must reach only the thread that reads them from a signalfd,
    /// never a worker whose default action would end the process on the spot. A thread that needs
    /// a signal (a vCPU thread's kick) unblocks that one itself.
    public init(name: String, _ body: @escaping @Sendable () -> Void) throws(SysError) {
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        var thread = pthread_t()
        var all = sigset_t()
        var previous = sigset_t()
        sigfillset(&all)
        pthread_sigmask(SIG_SETMASK, &all, &previous)
        defer { pthread_sigmask(SIG_SETMASK, &previous, nil) }
        let rc = pthread_create(&thread, nil, { context in
            let box = Unmanaged<Box>.fromOpaque(context!).takeRetainedValue()
            box.body()
            return nil
        }, box)
        guard rc == 0 else {
            Unmanaged<Box>.fromOpaque(box).release()
            throw SysError("pthread_create \(name)", errno: rc)
        }
        handle = thread
        _ = clinux_set_thread_name(thread, String(name.prefix(15)))
    }

    /// Sends `signal` to the thread (to interrupt a blocking system call).
    public func kick(signal: Int32) {
        _ = pthread_kill(handle, signal)
    }

    public func join() {
        guard !joined else { return }
        joined = true
        pthread_join(handle, nil)
    }
}

/// The signal used to kick vCPU threads out of KVM_RUN. Its handler does nothing; it only makes the
/// blocking ioctl return EINTR. Installed once per process.
public enum KickSignal {
    public static let number: Int32 = clinux_sigrtmin(1)
    private static let installed: Bool = clinux_install_kick_handler(clinux_sigrtmin(1)) == 0

    @discardableResult
    public static func install() -> Bool { installed }
}
