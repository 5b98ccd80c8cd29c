import Foundation
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
        let r = runProcess([Self.executable] + args, timeoutSeconds: timeoutSeconds)
        status = r.status
        stdout = r.stdout
        stderr = r.stderr
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
        ["--no-acpi", "--cpus", "2"],
        ["--fw-cfg", "name=etc/mine,string=x"], ["--fw-cfg", "name=opt/x"], ["--fw-cfg", "name=opt/x,blob=1"],
        ["--fw-cfg", "name=opt/a,string=1", "--fw-cfg", "name=opt/a,string=2"],
    ])
    func usage(args: [String]) {
        let r = Invocation(["run", "--kernel", "/boot/none"] + args)
        #expect(r.status == 64, "stderr: \(r.stderr)")
        #expect(r.stderr.contains("Error:"))
    }

    @Test("run without --kernel or --dump-acpi is a usage error")
    func noKernel() {
        let r = Invocation(["run"])
        #expect(r.status == 64)
        #expect(r.stderr.contains("--kernel"))
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


@Suite("swiftvmm run --dump-acpi")
struct DumpACPITests {
    static let expectedFiles = ["RSDP.dat", "XSDT.dat", "FACP.dat", "FACS.dat", "DSDT.dat", "APIC.dat", "SSDT.dat"]

    @Test("without a kernel it writes every table and exits 0")
    func dumpOnly() throws {
        let dir = makeTemporaryDirectory("swiftvmm-acpi") + "/tables"
        let r = Invocation(["run", "--dump-acpi", dir, "--cpus", "4"])
        #expect(r.status == 0, "stderr: \(r.stderr)")
        #expect(r.stderr.contains("wrote 7 ACPI tables to \(dir)"))
        for f in Self.expectedFiles { #expect(access(dir + "/" + f, R_OK) == 0, "\(f) missing") }
    }

    @Test("`iasl -d` disassembles every dumped table without errors or checksum warnings",
          .enabled(if: commandExists("iasl"), "needs iasl (Debian package acpica-tools)"))
    func iaslDisassembles() throws {
        let dir = makeTemporaryDirectory("swiftvmm-acpi")
        let r = Invocation(["run", "--dump-acpi", dir, "--cpus", "2"])
        try #require(r.status == 0, "stderr: \(r.stderr)")
        var listings: [String: String] = [:]
        // iasl cannot disassemble a bare RSDP (its signature is not a valid table name); the RSDP's
        // checksums and fields are checked by the ACPI unit tests.
        for f in Self.expectedFiles where f != "RSDP.dat" {
            let out = runProcess(["iasl", "-d", dir + "/" + f])
            let text = out.stdout + out.stderr
            #expect(out.status == 0, "iasl -d \(f): \(text)")
            // iasl -d exits 0 on some problems: read what it says.
            for bad in ["Error", "error(s)", "Incorrect checksum", "Invalid", "Warning"] where text.contains(bad) {
                Issue.record("iasl -d \(f) reports '\(bad)': \(text)")
            }
            let dsl = dir + "/" + f.replacingOccurrences(of: ".dat", with: ".dsl")
            listings[f] = try String(contentsOfFile: dsl, encoding: .utf8)
        }
        let dsdt = try #require(listings["DSDT.dat"])
        for needle in ["PNP0501", "PNP0303", "PNP0B00", "PNP0C02", "_S5", "_GPE", "IRQNoFlags ()"] {
            #expect(dsdt.contains(needle), "DSDT listing lacks \(needle)")
        }
        let facp = try #require(listings["FACP.dat"])
        #expect(facp.contains("Hardware Reduced (V5) : 0"))
        #expect(facp.contains("Control Method Power Button (V1) : 0"))
        #expect(facp.contains("SCI Interrupt : 0009"))
        let apic = try #require(listings["APIC.dat"])
        #expect(apic.components(separatedBy: "Subtable Type : 00 [Processor Local APIC]").count - 1 == 2)
        #expect(apic.contains("Interrupt Source Override"))
        // The VM generation ID SSDT, with VGIA patched by the loader to the GUID page.
        let ssdt = try #require(listings["SSDT.dat"])
        for needle in ["\"QEMUVGID\"", "\"VM_Gen_Counter\"", "Method (ADDR", "_E05", "Notify (\\_SB.VGEN, 0x80)", "Name (VGIA, 0x000F0000)"] {
            #expect(ssdt.contains(needle), "SSDT listing lacks \(needle)")
        }
    }
}

@Suite("swiftvmm run --add-fd: host files through fd sets")
struct AddFDTests {
    @Test("--kernel /dev/fdset/N reads the kernel from an inherited descriptor")
    func kernelFromFdSet() throws {
        let kernel = try #require(installedDebianKernel())
        let fd = open(kernel, O_RDONLY) // not close-on-exec: the child inherits it
        try #require(fd > 2)
        defer { close(fd) }
        // The kernel is read and parsed through the set; the run then stops at the missing KVM device.
        let r = Invocation(["run", "--add-fd", "fd=\(fd),set=4,opaque=kernel", "--kernel", "/dev/fdset/4",
                            "--kvm-device", "/nonexistent/kvm"])
        #expect(r.status == 1)
        #expect(r.stderr.contains("KVM is not available"), "stderr: \(r.stderr)")
        #expect(!r.stderr.contains("cannot read the kernel"))
    }

    @Test("a missing set, a closed descriptor and a bad --add-fd are one-line errors")
    func errors() throws {
        let missing = Invocation(["run", "--kernel", "/dev/fdset/9", "--kvm-device", "/nonexistent/kvm"])
        #expect(missing.status == 1)
        #expect(missing.stderr.contains("cannot read the kernel /dev/fdset/9"), "stderr: \(missing.stderr)")
        let closed = Invocation(["run", "--add-fd", "fd=250,set=1", "--kernel", "/dev/fdset/1"])
        #expect(closed.status == 1)
        #expect(closed.stderr.contains("--add-fd: descriptor 250 is not open"), "stderr: \(closed.stderr)")
        let bad = Invocation(["run", "--add-fd", "fd=x", "--kernel", "/boot/none"])
        #expect(bad.status == 64)
    }
}

@Suite("swiftvmm run --qmp: the monitor from process start to exit")
struct QMPCommandLineTests {
    static func socketPath(_ tag: String) -> String { "/tmp/swiftvmm-cli-qmp-\(getpid())-\(tag).sock" }

    /// A Python client that starts swiftvmm, greets, asks for the status and quits; it prints what it saw.
    static let client = """
    import json, os, socket, subprocess, sys, time
    sock, cmd = sys.argv[1], sys.argv[2:]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    s = socket.socket(socket.AF_UNIX)
    for _ in range(2000):
        try:
            s.connect(sock); break
        except OSError:
            time.sleep(0.005)
    f = s.makefile("rwb")
    def msg():
        while True:
            m = json.loads(f.readline())
            if "event" not in m: return m
    def cmd_(name):
        f.write(json.dumps({"execute": name}).encode() + b"\\n"); f.flush(); return msg()
    print("greeting", json.dumps(msg()["QMP"]["version"]["package"]))
    print("capabilities", json.dumps(cmd_("qmp_capabilities")))
    print("status", json.dumps(cmd_("query-status")["return"]["status"]))
    print("quit", json.dumps(cmd_("quit")))
    print("exit", p.wait(timeout=60))
    print("socket-left", os.path.exists(sock))
    """

    @Test("a client is greeted, sees the VM running, and quit ends the process with status 0",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func greetStatusQuit() throws {
        let kernel = try #require(installedDebianKernel())
        let sock = Self.socketPath("quit")
        let r = runProcess(["python3", "-c", Self.client, sock, Invocation.executable, "run", "--kernel", kernel,
                            "--qmp", sock, "--allow-slow-kvm"], timeoutSeconds: 120)
        #expect(r.status == 0, "client: \(r.stderr)")
        #expect(r.stdout.contains("greeting \"swiftvmm 0.1.0\""), "\(r.stdout)")
        #expect(r.stdout.contains("capabilities {\"return\": {}}"))
        #expect(r.stdout.contains("status \"running\""))
        #expect(r.stdout.contains("exit 0"))
        #expect(r.stdout.contains("socket-left False"))
    }

    @Test("a run that fails after the monitor started removes its socket", arguments: [
        ["run", "--kernel", "/nonexistent/bzImage"],      // fails while building the machine
        ["run", "--kernel", "/boot/none", "--cpus", "0"], // fails in argument validation
    ])
    func failureRemovesSocket(_ args: [String]) {
        let sock = Self.socketPath("fail\(args.count)")
        let r = Invocation(args + ["--qmp", sock])
        #expect(r.status != 0)
        #expect(access(sock, F_OK) != 0, "socket \(sock) left behind; stderr: \(r.stderr)")
        unlink(sock)
    }
}
