import CSeccomp
import Glibc
@testable import Sandbox
import Testing
import VMMSys

/// The threads' seccomp filters. The lists are checked for what no role may do; the filters are
/// loaded for real in child processes (exit tests), where a forbidden call must stop the process
/// with a line naming it, and an allowed one must go through.
@Suite("seccomp filters")
struct SeccompTests {
    static let forbiddenEverywhere = ["execve", "execveat", "ptrace", "process_vm_writev", "process_vm_readv", "bpf",
                                      "mount", "open_by_handle_at", "init_module", "finit_module", "kexec_load",
                                      "setuid", "socket", "connect", "bind", "personality", "userfaultfd"]

    @Test("every role's rules name real system calls", arguments: ThreadRole.allCases)
    func rulesResolve(role: ThreadRole) throws {
        let rules = try Seccomp.compiled(role, pid: getpid())
        #expect(rules.count == SeccompPolicy.rules(for: role, pid: getpid()).count)
        #expect(rules.allSatisfy { $0.nr >= 0 })
    }

    @Test("no role may exec, trace, load code, open sockets or make memory executable", arguments: ThreadRole.allCases)
    func nothingDangerous(role: ThreadRole) {
        let rules = SeccompPolicy.rules(for: role, pid: getpid())
        for name in Self.forbiddenEverywhere {
            #expect(!rules.contains { $0.name == name && $0.error == nil }, "\(role) allows \(name)")
        }
        for name in ["mmap", "mprotect"] {
            let own = rules.filter { $0.name == name }
            #expect(!own.isEmpty && own.allSatisfy { $0.argument?.index == 2 && $0.argument?.mask == UInt64(PROT_EXEC) && $0.argument?.value == 0 },
                    "\(role): \(name) only without PROT_EXEC")
        }
        // ioctl only with a request number check.
        #expect(rules.filter { $0.name == "ioctl" }.allSatisfy { $0.argument?.index == 1 })
        // Signals only to the process's own threads.
        #expect(rules.filter { $0.name == "tgkill" }.allSatisfy { $0.argument?.index == 0 && $0.argument?.value == UInt64(getpid()) })
    }

    @Test("only the QMP role opens or creates files; vCPU threads only make KVM's ioctls")
    func openOnlyForQMP() {
        for role in ThreadRole.allCases {
            let names = Set(SeccompPolicy.rules(for: role, pid: 1).map(\.name))
            let opens = !names.isDisjoint(with: ["open", "openat", "creat", "mkdir", "mkdirat", "rename", "renameat2"])
            #expect(opens == (role == .qmp), "\(role)")
        }
        let vcpu = SeccompPolicy.rules(for: .vcpu, pid: 1).filter { $0.name == "ioctl" }
        #expect(vcpu.count == 1 && vcpu[0].argument?.mask == 0xFF00 && vcpu[0].argument?.value == 0xAE00)
        #expect(!SeccompPolicy.rules(for: .vcpu, pid: 1).contains { $0.name == "clone" })
    }

    @Test("a vCPU thread that opens a file is stopped, with a line naming the call and the thread")
    func vcpuOpenStops() async {
        let result = await #expect(processExitsWith: .exitCode(128 + SIGSYS), observing: [\.standardErrorContent]) {
            try! Seccomp.enable(.on)
            let t = try! OSThread(name: "vcpu0", role: .vcpu) {
                let fd = open("/etc/hostname", O_RDONLY)
                print("open returned \(fd)")
            }
            t.join()
            exit(0)
        }
        let text = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(text.contains("swiftvmm: seccomp: thread vcpu0 (vcpu role) made system call openat"), "stderr: \(text)")
    }

    @Test("forbidden on every role: execve (QMP), a non-KVM ioctl and executable memory (vCPU), an open (I/O)")
    func otherForbiddenCalls() async {
        await #expect(processExitsWith: .exitCode(128 + SIGSYS)) {
            try! Seccomp.enable(.on)
            let t = try! OSThread(name: "qmp", role: .qmp) {
                var argv: [UnsafeMutablePointer<CChar>?] = [strdup("/bin/true"), nil]
                execv("/bin/true", &argv)
            }
            t.join()
            exit(0)
        }
        await #expect(processExitsWith: .exitCode(128 + SIGSYS)) {
            try! Seccomp.enable(.on)
            let t = try! OSThread(name: "vcpu1", role: .vcpu) {
                var size = winsize()
                _ = ioctl(2, UInt(TIOCGWINSZ), &size)
            }
            t.join()
            exit(0)
        }
        await #expect(processExitsWith: .exitCode(128 + SIGSYS)) {
            try! Seccomp.enable(.on)
            let t = try! OSThread(name: "vcpu2", role: .vcpu) {
                _ = mmap(nil, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            }
            t.join()
            exit(0)
        }
        await #expect(processExitsWith: .exitCode(128 + SIGSYS)) {
            try! Seccomp.enable(.on)
            let t = try! OSThread(name: "virtio-blk0", role: .io) { _ = open("/etc/hostname", O_RDONLY) }
            t.join()
            exit(0)
        }
        await #expect(processExitsWith: .exitCode(128 + SIGSYS)) {
            try! Seccomp.enable(.on)
            // A stat by path is not an fstat: refused outside the QMP role.
            let t = try! OSThread(name: "vcpu3", role: .vcpu) { var st = stat(); _ = stat("/etc/hostname", &st) }
            t.join()
            exit(0)
        }
    }

    @Test("allowed calls go through under the filter: a QMP thread opens and writes a file, a vCPU thread makes a KVM ioctl")
    func allowedCallsWork() async {
        let result = await #expect(processExitsWith: .exitCode(0), observing: [\.standardErrorContent]) {
            try! Seccomp.enable(.on)
            let t = try! OSThread(name: "qmp", role: .qmp) {
                let fd = open("/dev/null", O_WRONLY)
                guard fd >= 0, write(fd, "x", 1) == 1 else { exit(3) }
                close(fd)
                // A thread it starts inherits its filter and adds its own.
                let inner = try! OSThread(name: "qmp-long", role: .qmp) { _ = getpid() }
                inner.join()
            }
            t.join()
            let kvm = open("/dev/kvm", O_RDWR)
            let v = try! OSThread(name: "vcpu0", role: .vcpu) {
                // KVM_GET_API_VERSION (0xAE00) on /dev/kvm, or EBADF where there is none: not stopped.
                _ = ioctl(kvm, 0xAE00, 0)
                // fstat of an open descriptor (glibc's stdio does one before a stream's first write).
                var st = stat()
                guard fstat(2, &st) == 0 else { exit(5) }
            }
            v.join()
            exit(0)
        }
        let text = String(decoding: result?.standardErrorContent ?? [], as: UTF8.self)
        #expect(result != nil && !text.contains("seccomp:"), "\(text)")
    }

    @Test("with the time zone pinned, a vCPU thread can format a log line's local timestamp (no stat of /etc/localtime)")
    func localTimeUnderFilter() async {
        await #expect(processExitsWith: .exitCode(0)) {
            unsetenv("TZ")
            pinLocalTimeZone()
            try! Seccomp.enable(.on)
            let t = try! OSThread(name: "vcpu0", role: .vcpu) {
                for _ in 0..<3 {
                    var now = time(nil)
                    guard localtime(&now) != nil else { exit(6) }
                }
            }
            t.join()
            exit(0)
        }
    }

    @Test("log mode: a forbidden call only gets logged, and runs")
    func logMode() async {
        await #expect(processExitsWith: .exitCode(0)) {
            try! Seccomp.enable(.log)
            let t = try! OSThread(name: "vcpu0", role: .vcpu) {
                let fd = open("/etc/hostname", O_RDONLY)
                if fd < 0 { exit(4) }
            }
            t.join()
            exit(0)
        }
    }
}
