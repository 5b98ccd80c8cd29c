import Glibc
import Testing
import TestSupport

/// Runs the built `swiftvmm` executable and captures its exit status and output.
struct Invocation {
    var status: Int32 = -1
    var stdout = ""
    var stderr = ""

    /// The executable sits next to the test bundle in the build directory.
    static var executable: String {
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        let selfPath = String(decoding: buf.prefix(max(0, n)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        var dir = selfPath
        while let slash = dir.lastIndex(of: "/"), !dir.hasSuffix(".xctest") && dir.contains(".xctest") {
            dir = String(dir[..<slash])
        }
        if let slash = dir.lastIndex(of: "/") { dir = String(dir[..<slash]) }
        return dir + "/swiftvmm"
    }

    init(_ args: [String], timeoutSeconds: Int = 60) {
        var outPipe: [Int32] = [0, 0], errPipe: [Int32] = [0, 0]
        pipe(&outPipe); pipe(&errPipe)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, outPipe[1], 1)
        posix_spawn_file_actions_adddup2(&actions, errPipe[1], 2)
        let argv = (["timeout", "\(timeoutSeconds)", Self.executable] + args).map { strdup($0) } + [nil]
        var pid: pid_t = 0
        let rc = posix_spawnp(&pid, "timeout", &actions, nil, argv, environ)
        for p in argv { free(p) }
        posix_spawn_file_actions_destroy(&actions)
        close(outPipe[1]); close(errPipe[1])
        guard rc == 0 else { stderr = "spawn failed \(rc)"; return }
        stdout = Self.drain(outPipe[0])
        stderr = Self.drain(errPipe[0])
        var st: Int32 = 0
        waitpid(pid, &st, 0)
        status = (st & 0x7F) == 0 ? (st >> 8) & 0xFF : 128 + (st & 0x7F)
    }

    static func drain(_ fd: Int32) -> String {
        var data: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while true {
            let n = read(fd, &buf, buf.count)
            if n <= 0 { break }
            data += buf[0..<n]
        }
        close(fd)
        return String(decoding: data, as: UTF8.self)
    }
}

func writeTempFile(_ bytes: [UInt8]) -> String {
    var template = Array("/tmp/swiftvmm-cli-XXXXXX".utf8CString)
    let fd = mkstemp(&template)
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
    close(fd)
    return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
}

@Suite("swiftvmm command line: bad input gives one line and a non-zero status")
struct CLITests {
    func expectOneLineError(_ r: Invocation, contains needle: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(r.status != 0, sourceLocation: sourceLocation)
        #expect(r.status < 128, "must not die from a signal: \(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stderr.contains(needle), "stderr was: \(r.stderr)", sourceLocation: sourceLocation)
        #expect(r.stdout.isEmpty, sourceLocation: sourceLocation)
    }

    @Test("missing kernel")
    func missingKernel() {
        let r = Invocation(["run", "--kernel", "/nonexistent/bzImage"])
        expectOneLineError(r, contains: "swiftvmm: error: cannot read the kernel /nonexistent/bzImage")
        #expect(r.stderr.split(separator: "\n").count == 1)
    }

    @Test("a file that is not a bzImage")
    func notBzImage() {
        let path = writeTempFile(Array(repeating: 0x41, count: 8192))
        defer { unlink(path) }
        let r = Invocation(["run", "--kernel", path])
        expectOneLineError(r, contains: "not a bzImage")
        #expect(r.stderr.split(separator: "\n").count == 1)
    }

    @Test("an empty file")
    func emptyFile() {
        let path = writeTempFile([])
        defer { unlink(path) }
        expectOneLineError(Invocation(["run", "--kernel", path]), contains: "smaller than a boot sector")
    }

    @Test("missing initrd")
    func missingInitrd() throws {
        let kernel = try #require(installedDebianKernel())
        expectOneLineError(Invocation(["run", "--kernel", kernel, "--initrd", "/nonexistent/initrd"]),
                           contains: "cannot read the initrd /nonexistent/initrd")
    }

    @Test("memory too small for the kernel", arguments: ["16M", "20M"])
    func memoryTooSmall(size: String) throws {
        let kernel = try #require(installedDebianKernel())
        let r = Invocation(["run", "--kernel", kernel, "--memory", size, "--allow-slow-kvm"])
        expectOneLineError(r, contains: "guest memory too small")
    }

    @Test("bad sizes and counts are usage errors", arguments: [
        ["--memory", "lots"], ["--memory", "0"], ["--memory", "1K"], ["--memory", "99999999999T"], ["--cpus", "0"], ["--cpus", "1000"],
    ])
    func usage(args: [String]) {
        let r = Invocation(["run", "--kernel", "/boot/none"] + args)
        #expect(r.status == 64, "stderr: \(r.stderr)")
        #expect(r.stderr.contains("Error:"))
    }

    @Test("a missing KVM device is reported, not a hang")
    func noKVM() throws {
        let kernel = try #require(installedDebianKernel())
        let r = Invocation(["run", "--kernel", kernel, "--kvm-device", "/nonexistent/kvm"])
        expectOneLineError(r, contains: "KVM is not available: /nonexistent/kvm does not exist")
    }

    @Test("on emulated KVM a Linux boot is refused with a pointer to the test host",
          .enabled(if: access("/sys/module/kvm_pvm", F_OK) == 0, "only where /dev/kvm is kvm_pvm"))
    func emulatedKVMRefused() throws {
        let kernel = try #require(installedDebianKernel())
        let r = Invocation(["run", "--kernel", kernel], timeoutSeconds: 30)
        #expect(r.status == 1)
        #expect(r.stderr.contains("no hardware virtualization"))
        #expect(r.stderr.contains("guest-tests/run-guest.sh"))
        #expect(r.stderr.contains("--allow-slow-kvm"))
    }

    @Test("--help documents run's options")
    func help() {
        let r = Invocation(["run", "--help"])
        #expect(r.status == 0)
        for option in ["--kernel", "--initrd", "--cmdline", "--memory", "--cpus"] {
            #expect(r.stdout.contains(option))
        }
    }
}

