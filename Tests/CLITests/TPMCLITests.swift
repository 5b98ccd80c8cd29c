import Foundation
import Glibc
import Testing
import TestSupport
import VMMSys

/// `--tpm` errors: one line on stderr, exit status 1, nothing written.
@Suite("swiftvmm --tpm: errors")
struct TPMCLITests {
    @Test("an unknown backend or option, a missing path, a duplicate key: one line each", arguments: [
        (["--tpm", "tpm2"], "unknown backend \"tpm2\""),
        (["--tpm", "swtpm,path=/run/x"], "unknown option path="),
        (["--tpm", "builtin,state=/tmp/x,socket=/run/y"], "unknown option socket="),
        (["--tpm", "swtpm"], "swtpm needs socket=PATH"),
        (["--tpm", "builtin,state="], "builtin needs state=PATH"),
        (["--tpm", "swtpm,socket=/a,socket=/b"], "socket= is given twice"),
        (["--tpm", ""], "a backend is needed"),
        (["--tpm", "swtpm,socket=/" + String(repeating: "s", count: 120)], "longer than the 107-byte limit"),
    ])
    func badArguments(args: [String], message: String) {
        expectOneErrorLine(Invocation(["run", "--kernel", "/boot/none"] + args), containing: message)
        expectOneErrorLine(Invocation(["restore", "/tmp/none"] + args), containing: message)
    }

    @Test("swtpm: a socket that does not exist, and one whose server is not swtpm", .enabled(if: installedDebianKernel() != nil, "needs a Debian kernel image"))
    func swtpmSocketProblems() throws {
        let kernel = try #require(installedDebianKernel())
        let dir = makeTemporaryDirectory("swiftvmm-tpm-cli")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        expectOneErrorLine(Invocation(["run", "--kernel", kernel, "--tpm", "swtpm,socket=\(dir)/none.sock"]),
                           containing: "swtpm at \(dir)/none.sock: cannot connect (No such file or directory): start `swtpm socket --tpm2")

        // A server that answers like a web server and hangs up.
        let path = dir + "/http.sock"
        let listener = try UnixListener(path: path, description: "test server", temporaryPrefix: ".test")
        let server = try OSThread(name: "not-swtpm", role: .io) { [listener] in
            if let client = try? listener.accept() {
                let reply = Array("HTTP/1.0 400 Bad Request\r\n\r\n".utf8)
                _ = reply.withUnsafeBytes { try? client.send($0) }
            }
        }
        let r = Invocation(["run", "--kernel", kernel, "--tpm", "swtpm,socket=\(path)"], timeoutSeconds: 30)
        server.join()
        expectOneErrorLine(r, containing: "swtpm at \(path)")
        #expect(r.stderr.contains("swtpm"), "\(r.stderr)")
    }

    @Test("builtin: a state file in a missing directory, a damaged one, a foreign one: one line each, and nothing is written",
          .enabled(if: installedDebianKernel() != nil, "needs a Debian kernel image"))
    func builtinStateProblems() throws {
        let kernel = try #require(installedDebianKernel())
        let dir = makeTemporaryDirectory("swiftvmm-tpm-cli")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        expectOneErrorLine(Invocation(["run", "--kernel", kernel, "--tpm", "builtin,state=\(dir)/none/tpm.state"]),
                           containing: "cannot create the TPM state file \(dir)/none/tpm.state")
        #expect(!isAccessible(dir + "/none"))

        // A file that is not ours is never taken over.
        let foreign = dir + "/notes.txt"
        _ = runProcess(["sh", "-c", "echo important > \(foreign)"])
        expectOneErrorLine(Invocation(["run", "--kernel", kernel, "--tpm", "builtin,state=\(foreign)"]),
                           containing: "\(foreign) is not a swiftvmm TPM state file")
        #expect(runProcess(["cat", foreign]).stdout == "important\n")

        // A launch that fails after the TPM started (no KVM device here) removes the state file it created.
        let fresh = dir + "/fresh.state"
        let noKVM = Invocation(["run", "--kernel", kernel, "--tpm", "builtin,state=\(fresh)", "--kvm-device", "/nonexistent/kvm"])
        expectOneErrorLine(noKVM, containing: "KVM is not available")
        #expect(!isAccessible(fresh), "a failed launch leaves no state file behind")
    }

    @Test("builtin: the state file through an fd set (--add-fd, /dev/fdset/N) is formatted and holds libtpms's state; damaged, it is refused naming the entry",
          .enabled(if: installedDebianKernel() != nil, "needs a Debian kernel image"))
    func builtinStateThroughFdSet() throws {
        let kernel = try #require(installedDebianKernel())
        let dir = makeTemporaryDirectory("swiftvmm-tpm-cli")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let path = dir + "/tpm.state"
        // Close-on-exec, passed to the one child: inheritable, it went to every child another test
        // started meanwhile, and one that lived on held the state file's lock (CI flake, 2026-12-05).
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        try #require(fd > 2)
        // The TPM starts (manufactured, started up), then the run stops at the missing KVM device.
        let r = Invocation(["run", "--add-fd", "fd=\(fd),set=3", "--kernel", kernel, "--tpm", "builtin,state=/dev/fdset/3",
                            "--kvm-device", "/nonexistent/kvm"], inheriting: [fd])
        expectOneErrorLine(r, containing: "KVM is not available")
        let bytes = try OwnedFD.open(path, flags: O_RDONLY).readAll(limit: 8 << 20)
        #expect(Array(bytes.prefix(8)) == Array("SWVMTPMS".utf8), "formatted through the descriptor")
        #expect(Array(bytes[4096..<4100]) == Array("SLOT".utf8), "libtpms's permanent state was written")
        // The child's lock lives on the open file this process still holds (flock is per open
        // file): another process cannot take the state while it is open here.
        expectOneErrorLine(Invocation(["run", "--kernel", kernel, "--tpm", "builtin,state=\(path)"]), containing: "is in use by another process")
        close(fd)
        let inspected = Invocation(["nvram", "inspect", path])
        #expect(inspected.status == 0, "\(inspected.stdout)\(inspected.stderr)")
        #expect(inspected.stdout.contains("format 1.0, 3 entries, header checksum ok"), "\(inspected.stdout)")
        #expect(inspected.stdout.contains("permall (at most 1048576 bytes): A generation 1") && inspected.stdout.contains("data ok → "), "\(inspected.stdout)")
        #expect(inspected.stdout.contains("volatilestate (at most 1048576 bytes): A empty; B empty → never written"), "\(inspected.stdout)")

        // Damage every copy of the permanent state: the next start refuses it, naming file and entry.
        let slot = (64 + (1 << 20) + 4095) / 4096 * 4096
        for at in [4096 + 64 + 10, 4096 + slot + 64 + 10] {
            _ = runProcess(["sh", "-c", "printf '\\377\\377\\377' | dd of=\(path) bs=1 seek=\(at) conv=notrunc status=none"])
        }
        let damaged = Invocation(["run", "--kernel", kernel, "--tpm", "builtin,state=\(path)"])
        expectOneErrorLine(damaged, containing: "\(path): entry \"permall\" is damaged")
        let report = Invocation(["nvram", "inspect", path])
        #expect(report.status == 1 && report.stdout.contains("data MISMATCH") && report.stdout.contains("NO GOOD COPY"), "\(report.stdout)")
        #expect(Invocation(["nvram", "inspect", "/etc/hostname"]).stdout.contains("not a swiftvmm TPM state file"))
    }
}

@Suite("the builtin TPM's state file under SIGKILL")
struct TPMCrashTests {
    @Test("a process counting in an NV index is killed with SIGKILL 50 times at random moments: the file always opens and holds the last acknowledged value or the one written after it")
    func killed50Times() throws {
        let dir = makeTemporaryDirectory("swiftvmm-tpm-crash")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let path = dir + "/tpm.state"
        var rng = SplitMix64(state: 0xC2A5)
        var lastAcked: UInt64 = 0
        var landedAfterAck = 0
        for round in 0..<50 {
            let delay = Double(Int.random(in: 30...250, using: &rng)) / 1000
            let r = runProcess(["timeout", "-s", "KILL", String(format: "%.3f", delay), Invocation.executable, "nvram", "exercise", path],
                               timeoutSeconds: 30)
            #expect(r.status == 137, "round \(round): killed by SIGKILL (status \(r.status), stderr \(r.stderr))")
            let acked = r.stdout.split(separator: "\n").compactMap { $0.hasPrefix("acked ") ? UInt64($0.dropFirst(6)) : nil }.last
            if let acked { lastAcked = acked }
            let read = Invocation(["nvram", "exercise", path, "--read"])
            try #require(read.status == 0, "round \(round): the state file does not open: \(read.stderr)")
            let value = UInt64(read.stdout.trimmingCharacters(in: .whitespacesAndNewlines).dropFirst(6)) ?? 0
            #expect(value == lastAcked || value == lastAcked + 1,
                    "round \(round): read \(value), last acknowledged \(lastAcked)")
            if value == lastAcked + 1 { landedAfterAck += 1 }
            lastAcked = max(lastAcked, value)
            #expect(Invocation(["nvram", "inspect", path]).status == 0, "round \(round): an entry without a good copy")
        }
        #expect(lastAcked > 50, "the rounds wrote something: \(lastAcked)")
        print("TPM state crash test: 50 SIGKILLs, counter at \(lastAcked), \(landedAfterAck) time(s) the write in progress at the kill had reached the file (not yet acknowledged)")
    }
}
