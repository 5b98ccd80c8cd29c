import CLinux
import Glibc
import Synchronization

/// What a thread of the VMM does, which decides the system calls its seccomp filter allows (the
/// lists are in Sources/Sandbox/SeccompPolicy.swift).
public enum ThreadRole: String, Sendable, CaseIterable {
    /// Runs a vCPU: KVM_RUN and the exits it dispatches to device models.
    case vcpu
    /// The process's main thread in its run loop: signals, the end of the VM, teardown.
    case main
    /// Serves a device or backend: virtio queues, the TPM engine, the console, prefetching.
    case io
    /// The QMP monitor and the commands it runs (snapshots write files and fork a writer).
    case qmp
}

/// Where threads enter their role's sandbox. The executable sets an installer once, before its
/// first thread starts; without one (unit tests, tools) entering a role does nothing.
public enum ThreadSandbox {
    private static let installer = Mutex<(@Sendable (ThreadRole, String) -> Void)?>(nil)

    /// Sets what `enter` runs (the seccomp filter of the role, loaded on the calling thread).
    public static func setInstaller(_ install: @escaping @Sendable (ThreadRole, String) -> Void) {
        installer.withLock { $0 = install }
    }

    /// Puts the calling thread, named `name` (for the line a refused call prints), in `role`'s
    /// sandbox (every OSThread does so first; the main thread when it enters its run loop).
    public static func enter(_ role: ThreadRole, name: String = "main") {
        let install = installer.withLock { $0 }
        install?(role, name)
    }
}

/// A started OS thread running a closure (vCPU threads must be real threads: KVM_RUN blocks).
public final class OSThread: @unchecked Sendable {
    private final class Box {
        let body: () -> Void
        let name: String
        let role: ThreadRole
        init(_ body: @escaping () -> Void, name: String, role: ThreadRole) {
            self.body = body
            self.name = name
            self.role = role
        }
    }

    public let handle: pthread_t
    private var joined = false

    /// Starts `body` on a new thread named `name` (at most 15 characters are kept) in `role`'s
    /// sandbox: the thread names itself and loads its role's filter before `body` runs.
    ///
    /// The thread starts with every signal blocked but SIGSYS, whatever the caller's mask: the
    /// process's stop signals (SIGINT, SIGTERM, SIGHUP) must reach only the thread that reads them
    /// from a signalfd, never a worker whose default action would end the process on the spot. A
    /// thread that needs a signal (a vCPU thread's kick) unblocks that one itself. SIGSYS stays
    /// open: a seccomp filter raises it, and its handler names the refused system call (a blocked
    /// SIGSYS would kill the process without a word).
    public init(name: String, role: ThreadRole, _ body: @escaping @Sendable () -> Void) throws(SysError) {
        let box = Unmanaged.passRetained(Box(body, name: String(name.prefix(15)), role: role)).toOpaque()
        var thread = pthread_t()
        var all = sigset_t()
        var previous = sigset_t()
        sigfillset(&all)
        sigdelset(&all, SIGSYS)
        pthread_sigmask(SIG_SETMASK, &all, &previous)
        defer { pthread_sigmask(SIG_SETMASK, &previous, nil) }
        let rc = pthread_create(&thread, nil, { context in
            let box = Unmanaged<Box>.fromOpaque(context!).takeRetainedValue()
            // Named from inside (prctl), so no thread opens /proc/self/task/N/comm for another.
            _ = clinux_set_thread_name(pthread_self(), box.name)
            ThreadSandbox.enter(box.role, name: box.name)
            box.body()
            return nil
        }, box)
        guard rc == 0 else {
            Unmanaged<Box>.fromOpaque(box).release()
            throw SysError("pthread_create \(name)", errno: rc)
        }
        handle = thread
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

/// Writes `line` to standard error and ends the process at once with `status` (from any thread,
/// for a failure after which nothing may run on).
public func exitProcess(writing line: String, status: Int32) -> Never {
    var bytes = Array(line.utf8)
    _ = bytes.withUnsafeMutableBytes { write(2, $0.baseAddress, $0.count) }
    _exit(status)
}
