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

    /// A child still running after `timeoutSeconds` is killed with SIGKILL (status 137): the test
    /// runner's threads block most signals and a child inherits that mask, so the SIGTERM of
    /// runProcess's own timeout would not end a swiftvmm that hangs.
    /// `inheriting`: descriptors (opened close-on-exec) that swiftvmm gets under the same numbers,
    /// for `--add-fd`.
    init(_ args: [String], timeoutSeconds: Int = 60, inheriting: [Int32] = []) {
        let r = runProcess(["timeout", "-s", "KILL", "\(timeoutSeconds)", Self.executable] + args, timeoutSeconds: timeoutSeconds + 10,
                           inheriting: inheriting)
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

    @Test("a --fw-cfg file over 16 MiB is refused, and an endless stream is refused as not a regular file")
    func fwCfgFileTooLarge() throws {
        let kernel = try #require(installedDebianKernel())
        let big = writeTempFile([])
        defer { unlink(big) }
        try #require(truncate(big, 17 << 20) == 0)
        expectOneLineError(Invocation(["run", "--kernel", kernel, "--fw-cfg", "name=opt/big,file=\(big)"]),
                           contains: "the fw_cfg file \(big) is larger than 16 MiB")
        expectOneLineError(Invocation(["run", "--kernel", kernel, "--fw-cfg", "name=opt/big,file=/dev/zero"]),
                           contains: "the fw_cfg file /dev/zero is not a regular file")
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
        expectOneErrorLine(Invocation(["run", "--kernel", "/boot/none"] + args))
    }

    @Test("run without --kernel or --dump-acpi is a usage error")
    func noKernel() {
        expectOneErrorLine(Invocation(["run"]), containing: "--kernel")
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

    @Test("--help shows the memory default as a size")
    func helpShowsMemoryDefault() {
        let r = Invocation(["run", "--help"])
        #expect(r.status == 0)
        // The help text is wrapped to the terminal width: compare with the line breaks removed.
        let text = r.stdout.split(whereSeparator: { $0 == " " || $0 == "\n" }).joined(separator: " ")
        #expect(text.contains("(default: 256M)"), "\(r.stdout)")
        #expect(!text.contains("MemorySize("), "\(r.stdout)")
    }
}


@Suite("swiftvmm run --dump-acpi")
struct DumpACPITests {
    static let expectedFiles = ["RSDP.dat", "XSDT.dat", "FACP.dat", "FACS.dat", "DSDT.dat", "APIC.dat", "SSDT.dat"]

    @Test("without a kernel it writes every table and exits 0")
    func dumpOnly() throws {
        let top = makeTemporaryDirectory("swiftvmm-acpi")
        defer { _ = runProcess(["rm", "-rf", top]) }
        let dir = top + "/tables"
        let r = Invocation(["run", "--dump-acpi", dir, "--cpus", "4"])
        #expect(r.status == 0, "stderr: \(r.stderr)")
        #expect(r.stderr.contains("wrote 7 ACPI tables to \(dir)"))
        for f in Self.expectedFiles { #expect(access(dir + "/" + f, R_OK) == 0, "\(f) missing") }
    }

    @Test("`iasl -d` disassembles every dumped table without errors or checksum warnings",
          .enabled(if: commandExists("iasl"), "needs iasl (Debian package acpica-tools)"))
    func iaslDisassembles() throws {
        let dir = makeTemporaryDirectory("swiftvmm-acpi")
        defer { _ = runProcess(["rm", "-rf", dir]) }
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

    @Test("with --tpm the dump has a TPM2 table (start method 6) and an MSFT0101 device at 0xFED40000, which iasl reads back; the backend is not contacted",
          .enabled(if: commandExists("iasl"), "needs iasl (Debian package acpica-tools)"))
    func iaslTPM() throws {
        let dir = makeTemporaryDirectory("swiftvmm-acpi-tpm")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let r = Invocation(["run", "--dump-acpi", dir, "--tpm", "swtpm,socket=\(dir)/no-such-socket"])
        try #require(r.status == 0, "stderr: \(r.stderr)")
        #expect(r.stderr.contains("TPM2.dat"))
        var listings: [String: String] = [:]
        for f in ["TPM2.dat", "DSDT.dat"] {
            let out = runProcess(["iasl", "-d", dir + "/" + f])
            let text = out.stdout + out.stderr
            #expect(out.status == 0, "iasl -d \(f): \(text)")
            for bad in ["Error", "error(s)", "Incorrect checksum", "Invalid", "Warning"] where text.contains(bad) {
                Issue.record("iasl -d \(f) reports '\(bad)': \(text)")
            }
            listings[f] = try String(contentsOfFile: dir + "/" + f.replacingOccurrences(of: ".dat", with: ".dsl"), encoding: .utf8)
        }
        let tpm2 = try #require(listings["TPM2.dat"])
        #expect(tpm2.contains("Start Method : 06 [Memory Mapped I/O]"), "\(tpm2)")
        #expect(tpm2.contains("Table Length : 0000004C"))
        let dsdt = try #require(listings["DSDT.dat"])
        for needle in ["\"MSFT0101\"", "Memory32Fixed (ReadWrite,", "0xFED40000", "0x00005000"] {
            #expect(dsdt.contains(needle), "DSDT listing lacks \(needle)")
        }
        let device = try #require(dsdt.range(of: "\"MSFT0101\"")).lowerBound
        #expect(!dsdt[device...].prefix(400).contains("IRQ"), "the TPM offers no interrupt")
    }
}

@Suite("swiftvmm run --add-fd: host files through fd sets")
struct AddFDTests {
    @Test("--kernel /dev/fdset/N reads the kernel from an inherited descriptor")
    func kernelFromFdSet() throws {
        let kernel = try #require(installedDebianKernel())
        let fd = open(kernel, O_RDONLY | O_CLOEXEC) // the child alone inherits it
        try #require(fd > 2)
        defer { close(fd) }
        // The kernel is read and parsed through the set; the run then stops at the missing KVM device.
        let r = Invocation(["run", "--add-fd", "fd=\(fd),set=4,opaque=kernel", "--kernel", "/dev/fdset/4",
                            "--kvm-device", "/nonexistent/kvm"], inheriting: [fd])
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
        expectOneErrorLine(bad, containing: "--add-fd")
    }
}

@Suite("swiftvmm run --qmp: the monitor from process start to exit")
struct QMPCommandLineTests {
    static func socketPath(_ tag: String) -> String { "/tmp/swiftvmm-cli-qmp-\(getpid())-\(tag).sock" }

    @Test("a client is greeted, sees the VM running, and quit ends the process with status 0",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func greetStatusQuit() throws {
        let kernel = try #require(installedDebianKernel())
        let r = qmpSession(["run", "--kernel", kernel], #"[{"execute": "query-status"}]"#, tag: "quit")
        #expect(r.status == 0, "client: \(r.stderr)")
        #expect(r.stdout.contains("greeting \"swiftvmm 0.1.0\""), "\(r.stdout)")
        #expect(r.stdout.contains("capabilities {\"return\": {}}"))
        #expect(r.stdout.contains("\"status\": \"running\""))
        #expect(r.stdout.contains("exit 0"))
        #expect(r.stdout.contains("socket-left False"))
    }

    @Test("an empty --qmp path is a one-line usage error", arguments: [
        ["run", "--kernel", "/boot/none", "--qmp", ""], ["restore", "/tmp", "--qmp", ""],
    ])
    func emptyPath(_ args: [String]) {
        expectOneErrorLine(Invocation(args), containing: "--qmp needs a socket path")
        // `--qmp=` is a missing value to the argument parser: also one line.
        expectOneErrorLine(Invocation(args.dropLast(2) + ["--qmp="]), containing: "--qmp")
    }

    @Test("a --qmp path over the 107-byte limit of Unix socket addresses is a one-line error, and nothing is created")
    func overlongPath() {
        let dir = makeTemporaryDirectory("swiftvmm-cli-qmp")
        defer { rmdir(dir) }
        let long = dir + "/" + String(repeating: "s", count: 108 - dir.utf8.count - 1) // 108 bytes
        #expect(long.utf8.count == 108)
        for args in [["run", "--kernel", "/boot/none", "--qmp", long], ["run", "--kernel", "/boot/none", "--qmp=\(long)"],
                     ["restore", "/tmp", "--qmp", long]] {
            expectOneErrorLine(Invocation(args), containing: "longer than the 107-byte limit of Unix socket addresses")
            #expect(access(long, F_OK) != 0)
        }
        // 107 bytes is allowed: the run gets as far as the kernel.
        let fits = String(long.dropLast())
        defer { unlink(fits) }
        expectOneErrorLine(Invocation(["run", "--kernel", "/nonexistent/bzImage", "--qmp", fits]),
                           containing: "cannot read the kernel /nonexistent/bzImage")
        #expect(access(fits, F_OK) != 0, "the socket is removed on failure")
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

@Suite("swiftvmm snapshot-create and restore through the command line and QMP")
struct RestoreCommandLineTests {
    static func json(_ line: Substring) -> [String: Any]? {
        (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
    }

    @Test("a snapshot taken over QMP restores with a new, a kept or a given generation ID, running or paused",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func snapshotAndRestore() throws {
        let kernel = try #require(installedDebianKernel())
        let parent = makeTemporaryDirectory("swiftvmm-cli-snap")
        defer { _ = runProcess(["rm", "-rf", parent]) }
        let dir = parent + "/snap"
        let original = qmpSession(["run", "--kernel", kernel, "--memory", "128M", "--vmgenid", "12345678-9abc-def0-1234-56789abcdef0"], """
            [{"execute": "snapshot-create", "arguments": {"path": "\(dir)"}},
             {"execute": "snapshot-create", "arguments": {"path": "\(dir)"}},
             {"execute": "query-status"},
             {"execute": "snapshot-create", "arguments": {"path": ""}},
             {"execute": "snapshot-create", "arguments": {"path": "\(dir)2", "size": 1}},
             {"execute": "snapshot-create", "arguments": {"path": "/nonexistent/dir/snap"}}]
            """, tag: "orig")
        let lines = Array(original.stdout.split(separator: "\n").dropFirst(2)) // greeting, capabilities
        try #require(lines.count == 8, "\(original.stdout) \(original.stderr)")
        let created = try #require(Self.json(lines[0])?["return"] as? [String: Any])
        #expect(created["path"] as? String == dir)
        #expect((created["memory-size"] as? Int) == 128 << 20)
        #expect((created["size"] as? Int ?? 0) > 0 && (created["time-ms"] as? Double ?? -1) >= 0)
        #expect(lines[1].contains("already exists"), "a second snapshot to the same path is refused: \(lines[1])")
        #expect(lines[2].contains("\"running\""), "the VM runs on after the snapshot")
        #expect(lines[3].contains("Parameter 'path' must not be empty"), "\(lines[3])")
        #expect(lines[4].contains("GenericError") && lines[4].contains("size"), "an unknown argument is refused: \(lines[4])")
        #expect(lines[5].contains("snapshot-create:") && lines[5].contains("/nonexistent/dir"), "\(lines[5])")
        #expect(access(dir + "2", F_OK) != 0)
        #expect(lines[6] == "exit 0")
        #expect(Invocation(["snapshot", "verify", dir]).status == 0)

        let guid = #"{"execute": "query-vm-generation-id"}"#
        let fresh = qmpSession(["restore", dir], "[\(guid), {\"execute\": \"query-status\"}]", tag: "new")
        #expect(fresh.stdout.contains("\"guid\""), "\(fresh.stdout) \(fresh.stderr)")
        #expect(!fresh.stdout.contains("12345678-9abc-def0-1234-56789abcdef0"), "a clone gets a new generation ID by default")
        #expect(fresh.stdout.contains("\"running\"") && fresh.stdout.contains("exit 0"))
        let kept = qmpSession(["restore", dir, "--vmgenid", "keep", "--paused"], "[\(guid), {\"execute\": \"query-status\"}]", tag: "keep")
        #expect(kept.stdout.contains("12345678-9abc-def0-1234-56789abcdef0"), "\(kept.stdout) \(kept.stderr)")
        #expect(kept.stdout.contains("\"paused\""), "--paused restores stopped")
        let given = qmpSession(["restore", dir, "--vmgenid", "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"], "[\(guid)]", tag: "given")
        #expect(given.stdout.contains("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee"), "\(given.stdout) \(given.stderr)")
        #expect(Invocation(["snapshot", "verify", dir]).status == 0, "restores leave the snapshot as it was")

        // A damaged state.bin: restore refuses with one line naming the file and what is wrong.
        let state = dir + "/state.bin"
        let fd = open(state, O_WRONLY)
        try #require(fd >= 0)
        var byte: UInt8 = 0x5A
        _ = pwrite(fd, &byte, 1, 900)
        close(fd)
        let damaged = Invocation(["restore", dir, "--allow-slow-kvm"])
        #expect(damaged.status == 1)
        #expect(damaged.stderr.contains("cannot restore \(dir): state.bin: section \""), "\(damaged.stderr)")
        #expect(damaged.stderr.contains("CRC32C mismatch"))
        #expect(damaged.stderr.split(separator: "\n").count == 1)
        #expect(Invocation(["restore", parent + "/none", "--allow-slow-kvm"]).status == 1)
    }
}

/// A Python QMP client that starts `swiftvmm ARGS --qmp SOCK --allow-slow-kvm`, prints the greeting's
/// package and the qmp_capabilities reply, runs `commands` (a JSON array) printing each reply as one
/// JSON line, quits, and prints the exit status and whether the socket file is left.
let qmpClientScript = """
import json, os, socket, subprocess, sys, time
sock, commands, cmd = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
s = socket.socket(socket.AF_UNIX)
for _ in range(2000):
    try:
        s.connect(sock); break
    except OSError:
        time.sleep(0.005)
f = s.makefile("rwb")
s.settimeout(100)
def threads():
    out = []
    for t in sorted(os.listdir(f"/proc/{p.pid}/task")):
        try:
            comm = open(f"/proc/{p.pid}/task/{t}/comm").read().strip()
            wchan = open(f"/proc/{p.pid}/task/{t}/wchan").read().strip()
            state = open(f"/proc/{p.pid}/task/{t}/stat").read().rsplit(")", 1)[1].split()[0]
            out.append(f"{comm}:{state}:{wchan}")
        except OSError:
            pass
    return " ".join(out)
def msg():
    while True:
        try:
            line = f.readline()
        except socket.timeout:
            # A hang: say where each thread of swiftvmm waits, then stop it.
            print("TIMEOUT waiting for a reply; swiftvmm threads:", threads())
            p.kill()
            sys.stderr.write(p.stderr.read().decode())
            sys.exit(3)
        m = json.loads(line)
        if "event" not in m: return m
def run(c):
    f.write(json.dumps(c).encode() + b"\\n"); f.flush(); return msg()
print("greeting", json.dumps(msg()["QMP"]["version"]["package"]))
print("capabilities", json.dumps(run({"execute": "qmp_capabilities"})))
for c in commands: print(json.dumps(run(c)))
run({"execute": "quit"})
print("exit", p.wait(timeout=60))
print("socket-left", os.path.exists(sock))
sys.stderr.write(p.stderr.read().decode())
"""

func qmpSession(_ args: [String], _ commands: String, tag: String) -> ProcessOutput {
    let sock = "/tmp/swiftvmm-cli-qmp-\(getpid())-\(tag).sock"
    defer { unlink(sock) }
    return runProcess(["python3", "-c", qmpClientScript, sock, commands, Invocation.executable] + args + ["--qmp", sock, "--allow-slow-kvm"],
                      timeoutSeconds: 120)
}
