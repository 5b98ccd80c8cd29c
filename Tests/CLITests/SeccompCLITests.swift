import Foundation
import Glibc
import Testing
import TestSupport

/// Starts `swiftvmm ARGS --qmp SOCK --allow-slow-kvm`, waits (up to 30 s) until every thread's
/// /proc status shows the wanted Seccomp mode, runs a few QMP commands (a snapshot among them),
/// quits, and prints one JSON object: each thread's name and mode when it stopped waiting, the
/// replies, the exit status and stderr.
private let seccompClientScript = """
import json, os, socket, subprocess, sys, time
sock, want, snap, cmd = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
import resource
resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
s = socket.socket(socket.AF_UNIX)
for _ in range(4000):
    try:
        s.connect(sock); break
    except OSError:
        time.sleep(0.005)
f = s.makefile("rwb")
def call(c):
    f.write(json.dumps(c).encode() + b"\\n"); f.flush()
    while True:
        m = json.loads(f.readline())
        if "event" not in m: return m
f.readline()
call({"execute": "qmp_capabilities"})
def threads():
    out = {}
    for t in os.listdir(f"/proc/{p.pid}/task"):
        try:
            comm = open(f"/proc/{p.pid}/task/{t}/comm").read().strip()
            mode = [l.split()[1] for l in open(f"/proc/{p.pid}/task/{t}/status") if l.startswith("Seccomp:")][0]
            out[f"{comm}/{t}"] = mode
        except OSError:
            pass
    return out
seen = {}
for _ in range(300):
    seen = threads()
    if len(seen) >= 4 and all(m == want for m in seen.values()): break
    time.sleep(0.1)
limits = open(f"/proc/{p.pid}/limits").read()
# VmFlags of the mappings of 128 MiB or more (guest RAM; without "dd" it may merge with a neighbour)
ram_flags, size = [], None
for line in open(f"/proc/{p.pid}/smaps"):
    if line.startswith("Size:"): size = int(line.split()[1])
    if line.startswith("VmFlags:") and size >= 131072: ram_flags.append(line.split()[1:])
fds = len(os.listdir(f"/proc/{p.pid}/fd"))
replies = [call({"execute": "query-status"}), call({"execute": "snapshot-create", "arguments": {"path": snap}}),
           call({"execute": "query-block"})]
call({"execute": "quit"})
status = p.wait(timeout=60)
print(json.dumps({"threads": seen, "limits": limits, "ram_flags": ram_flags, "fds": fds, "replies": replies, "status": status, "stderr": p.stderr.read().decode()}))
"""

@Suite("swiftvmm --seccomp")
struct SeccompCLITests {
    struct Outcome: Decodable {
        let threads: [String: String]
        let limits: String
        let ram_flags: [[String]]
        let fds: Int
        let replies: [[String: JSONValue]]
        let status: Int
        let stderr: String
    }

    enum JSONValue: Decodable {
        case any
        init(from decoder: any Decoder) throws { self = .any }
    }

    func session(_ mode: String, want: String, extra: [String] = []) throws -> (Outcome, String) {
        let kernel = try #require(installedDebianKernel())
        let dir = makeTemporaryDirectory("swiftvmm-cli-seccomp")
        let image = dir + "/d.img"
        _ = runProcess(["truncate", "-s", "4M", image])
        let sock = dir + "/qmp.sock"
        let r = runProcess(["python3", "-c", seccompClientScript, sock, want, dir + "/snap", Invocation.executable,
                            "run", "--kernel", kernel, "--memory", "128M", "--drive", "file=\(image)",
                            "--tpm", "builtin,state=\(dir)/tpm.state", "--seccomp", mode, "--qmp", sock, "--allow-slow-kvm"] + extra,
                           timeoutSeconds: 120)
        let outcome = try JSONDecoder().decode(Outcome.self, from: Data(r.stdout.utf8))
        return (outcome, dir)
    }

    @Test("by default every thread of a running VM is in a seccomp filter (Seccomp: 2), and the VM works: QMP, a snapshot, a clean quit",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func everyThreadFiltered() throws {
        let (o, dir) = try session("on", want: "2")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let names = Set(o.threads.keys.map { String($0.split(separator: "/")[0]) })
        for expected in ["swiftvmm", "vcpu0", "qmp", "tpm", "virtio-blk0", "console"] {
            #expect(names.contains(expected), "no thread \(expected): \(o.threads)")
        }
        #expect(o.threads.values.allSatisfy { $0 == "2" }, "threads without a filter: \(o.threads.filter { $0.value != "2" })")
        #expect(o.replies.count == 3 && o.replies.allSatisfy { $0["return"] != nil }, "\(o.replies) \(o.stderr)")
        #expect(FileManager.default.fileExists(atPath: dir + "/snap/state.bin"))
        #expect(o.status == 0 && !o.stderr.contains("seccomp"), "status \(o.status), stderr: \(o.stderr)")
    }

    @Test("--seccomp off leaves the threads unfiltered; a bad mode is a one-line usage error",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func offAndBadMode() throws {
        let (o, dir) = try session("off", want: "0")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        #expect(!o.threads.isEmpty && o.threads.values.allSatisfy { $0 == "0" }, "\(o.threads)")
        #expect(o.status == 0, "\(o.stderr)")
        let bad = Invocation(["run", "--kernel", "/boot/none", "--seccomp", "maybe"])
        #expect(bad.status == 64 || bad.status == 1, "status \(bad.status)")
        #expect(bad.stderr.contains("'maybe'") && bad.stderr.contains("--seccomp"), "\(bad.stderr)")
    }

    /// The limit line of /proc/PID/limits named `name`: (soft, hard) as text.
    func limit(_ o: Outcome, _ name: String) -> (String, String)? {
        guard let line = o.limits.split(separator: "\n").first(where: { $0.hasPrefix(name) }) else { return nil }
        let parts = line.dropFirst(name.count).split(separator: " ", omittingEmptySubsequences: true)
        return parts.count >= 2 ? (String(parts[0]), String(parts[1])) : nil
    }

    @Test("by default: no core files, guest RAM marked out of core dumps, open files limited to what the VM holds plus 256",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func defaultLimits() throws {
        let (o, dir) = try session("on", want: "2")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        #expect(limit(o, "Max core file size")! == ("0", "0"), "\(o.limits)")
        let files = try #require(limit(o, "Max open files"))
        let soft = try #require(Int(files.0)), hard = try #require(Int(files.1))
        #expect(soft == hard && soft > o.fds && soft <= o.fds + 300, "limit \(files) with \(o.fds) descriptors open")
        #expect(o.ram_flags.count == 1 && o.ram_flags[0].contains("dd"), "guest RAM VmFlags: \(o.ram_flags)")
        // The snapshot and the other commands still work under the limit.
        #expect(o.replies.allSatisfy { $0["return"] != nil } && o.status == 0, "\(o.stderr)")
    }

    @Test("--core-dump all keeps the shell's core limit and lets guest RAM into core files; vmm keeps it out; a low --max-open-files is refused",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func coreDumpModes() throws {
        let (all, dir) = try session("on", want: "2", extra: ["--core-dump", "all", "--max-open-files", "500"])
        defer { _ = runProcess(["rm", "-rf", dir]) }
        #expect(limit(all, "Max core file size")! == ("unlimited", "unlimited"), "\(all.limits)")
        #expect(!all.ram_flags.isEmpty && all.ram_flags.allSatisfy { !$0.contains("dd") }, "\(all.ram_flags)")
        #expect(limit(all, "Max open files")! == ("500", "500"), "\(all.limits)")
        let (vmm, dir2) = try session("on", want: "2", extra: ["--core-dump", "vmm"])
        defer { _ = runProcess(["rm", "-rf", dir2]) }
        #expect(limit(vmm, "Max core file size")! == ("unlimited", "unlimited"))
        #expect(vmm.ram_flags.count == 1 && vmm.ram_flags[0].contains("dd"), "\(vmm.ram_flags)")
        let kernel = try #require(installedDebianKernel())
        let low = Invocation(["run", "--kernel", kernel, "--memory", "128M", "--max-open-files", "8", "--allow-slow-kvm"])
        #expect(low.status == 1 && low.stderr.contains("--max-open-files 8 is too low"), "\(low.status) \(low.stderr)")
    }
}
