import Glibc
import VMMSys

/// The system calls each kind of thread may make: the one place that says what swiftvmm does with
/// the kernel once a VM runs. Everything else stops the process with a line naming the call
/// (`Seccomp`). No role has execve, execveat, ptrace, open_by_handle_at, bpf, mount, or a way to
/// make memory executable; only the QMP role opens, creates or removes files (`snapshot-create`);
/// ioctl is limited to KVM's (type 0xAE) plus the few others a role needs.
public struct SeccompRule: Equatable, Sendable {
    public let name: String
    /// With an argument: allowed only when (argument `index` & `mask`) == `value`.
    public let argument: (index: Int, mask: UInt64, value: UInt64)?
    /// Fails with this errno instead of running (clone3: glibc then uses clone, which can be checked).
    public let error: Int32?

    public static func allow(_ name: String) -> SeccompRule { SeccompRule(name: name, argument: nil, error: nil) }
    public static func allow(_ name: String, argument index: Int, mask: UInt64 = ~0, equals value: UInt64) -> SeccompRule {
        SeccompRule(name: name, argument: (index, mask, value), error: nil)
    }
    public static func fail(_ name: String, errno: Int32) -> SeccompRule { SeccompRule(name: name, argument: nil, error: errno) }

    public static func == (a: SeccompRule, b: SeccompRule) -> Bool {
        a.name == b.name && a.error == b.error && a.argument?.index == b.argument?.index
            && a.argument?.mask == b.argument?.mask && a.argument?.value == b.argument?.value
    }
}

public enum SeccompPolicy {
    /// ioctl numbers outside KVM's range that a role needs.
    static let terminalGet: UInt64 = 0x5401, terminalSet: UInt64 = 0x5402, terminalSetDrain: UInt64 = 0x5403,
               terminalSetFlush: UInt64 = 0x5404
    static let fileClone: UInt64 = 0x4004_9409          // FICLONE: a reflinked drive copy
    static let cloneThread: UInt64 = 0x0001_0000          // CLONE_THREAD

    /// KVM's ioctls: type byte 0xAE in bits 8-15 of the request (the rest is number, size, direction).
    static let kvmIoctls = SeccompRule.allow("ioctl", argument: 1, mask: 0xFF00, equals: 0xAE00)

    /// KVM_IRQ_LINE and KVM_IRQ_LINE_STATUS: a device thread raising or lowering an interrupt line
    /// (the UART when the console's input arrives).
    static let interruptLines: [SeccompRule] = [
        .allow("ioctl", argument: 1, mask: 0xFFFF_FFFF, equals: 0x4008_AE61),
        .allow("ioctl", argument: 1, mask: 0xFFFF_FFFF, equals: 0xC008_AE67),
    ]

    /// mmap and mprotect without PROT_EXEC: no role makes memory executable once the VM runs.
    static let noExec: [SeccompRule] = [
        .allow("mmap", argument: 2, mask: UInt64(PROT_EXEC), equals: 0),
        .allow("mprotect", argument: 2, mask: UInt64(PROT_EXEC), equals: 0),
    ]

    /// What every thread does: the allocator, locks, time, logging to stderr, its own end, the
    /// SIGSYS handler's line, and a new thread's start-up (robust list, rseq, its name, and its
    /// own filter: `seccomp` can only add restrictions, and no_new_privs only be set).
    static let common: [SeccompRule] = noExec + [
        "munmap", "madvise", "mremap", "brk", "futex", "sched_yield", "getpid", "gettid", "getrandom",
        "clock_gettime", "clock_nanosleep", "nanosleep", "gettimeofday", "rt_sigprocmask", "rt_sigreturn",
        "sigaltstack", "write", "writev", "close", "exit", "exit_group", "restart_syscall",
        "set_robust_list", "rseq", "getrusage", "sched_getaffinity",
        "seccomp", "fstat",
    ].map(SeccompRule.allow) + [
        // fstat of an open descriptor (AT_EMPTY_PATH): glibc's stdio does one before the first
        // write to a stream (a log line, from whichever thread logs first).
        .allow("newfstatat", argument: 3, mask: 0x1000, equals: 0x1000),
        .allow("prctl", argument: 0, equals: 15),   // PR_SET_NAME
        .allow("prctl", argument: 0, equals: 38),   // PR_SET_NO_NEW_PRIVS
    ]

    /// A device or backend thread serving descriptors: eventfds, images, the tap, sockets to swtpm,
    /// the console.
    static let descriptorIO: [SeccompRule] = [
        "read", "readv", "pread64", "preadv", "pwrite64", "pwritev", "poll", "ppoll", "fsync", "fdatasync",
        "fallocate", "recvmsg", "sendmsg", "recvfrom", "sendto", "lseek", "mincore",
    ].map(SeccompRule.allow)

    /// The rules of `role`; `pid` is the process's (signals go only to its own threads).
    public static func rules(for role: ThreadRole, pid: Int32) -> [SeccompRule] {
        let ownThreads = SeccompRule.allow("tgkill", argument: 0, equals: UInt64(UInt32(bitPattern: pid)))
        switch role {
        case .vcpu:
            // KVM_RUN and the exits' device models (pure; they kick other threads' eventfds).
            return common + [kvmIoctls, .allow("read"), ownThreads]
        case .io:
            return common + descriptorIO + interruptLines
        case .main:
            // The run loop (signalfd, the end event, the memory file's status), kicking vCPUs, the
            // terminal's mode restored, the TPM stopped, the QMP socket removed, teardown.
            return common + descriptorIO + [
                kvmIoctls, ownThreads, .allow("unlink"), .allow("unlinkat"), .allow("kill"), .allow("wait4"),
                .allow("ioctl", argument: 1, mask: 0xFFFF_FFFF, equals: terminalGet),
                .allow("ioctl", argument: 1, mask: 0xFFFF_FFFF, equals: terminalSet),
                .allow("ioctl", argument: 1, mask: 0xFFFF_FFFF, equals: terminalSetDrain),
                .allow("ioctl", argument: 1, mask: 0xFFFF_FFFF, equals: terminalSetFlush),
                .allow("clone", argument: 0, mask: cloneThread, equals: cloneThread), .fail("clone3", errno: ENOSYS),
                .allow("shutdown"),
            ]
        case .qmp:
            // Clients (accept, descriptors passed with SCM_RIGHTS), the commands' threads, and
            // snapshot-create: the snapshot directory and its files, the vCPUs' and devices' state
            // (KVM), reflinked or copied drives, the live snapshot's writer process (fork, never exec).
            return common + descriptorIO + [
                kvmIoctls, ownThreads,
                .allow("ioctl", argument: 1, mask: 0xFFFF_FFFF, equals: fileClone),
                .allow("ioctl", argument: 1, mask: 0xFFFF_FFFF, equals: terminalGet),
                .allow("accept"), .allow("accept4"), .allow("shutdown"), .allow("fcntl"), .allow("getsockopt"),
                .allow("openat"), .allow("open"), .allow("mkdir"), .allow("mkdirat"), .allow("rename"),
                .allow("renameat"), .allow("renameat2"), .allow("unlink"), .allow("unlinkat"), .allow("rmdir"),
                .allow("getdents64"), .allow("statx"), .allow("newfstatat", argument: 3, mask: 0x1000, equals: 0), .allow("ftruncate"), .allow("copy_file_range"),
                .allow("linkat"), .allow("fchmod"), .allow("dup"), .allow("pipe2"),
                .allow("flock"), .allow("clone"), .fail("clone3", errno: ENOSYS), .allow("wait4"), .allow("kill"), .allow("pidfd_open"),
                // The writer process: its parent's death ends it (PR_SET_PDEATHSIG), descriptors it does not need closed.
                .allow("getppid"), .allow("prctl", argument: 0, equals: 1), .allow("close_range"),
            ]
        }
    }
}
