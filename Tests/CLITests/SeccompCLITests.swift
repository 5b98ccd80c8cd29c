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
replies = [call({"execute": "query-status"}), call({"execute": "snapshot-create", "arguments": {"path": snap}}),
           call({"execute": "query-block"})]
call({"execute": "quit"})
status = p.wait(timeout=60)
print(json.dumps({"threads": seen, "replies": replies, "status": status, "stderr": p.stderr.read().decode()}))
"""

@Suite("swiftvmm --seccomp")
struct SeccompCLITests {
    struct Outcome: Decodable {
        let threads: [String: String]
        let replies: [[String: JSONValue]]
        let status: Int
        let stderr: String
    }

    enum JSONValue: Decodable {
        case any
        init(from decoder: any Decoder) throws { self = .any }
    }

    func session(_ mode: String, want: String) throws -> (Outcome, String) {
        let kernel = try #require(installedDebianKernel())
        let dir = makeTemporaryDirectory("swiftvmm-cli-seccomp")
        let image = dir + "/d.img"
        _ = runProcess(["truncate", "-s", "4M", image])
        let sock = dir + "/qmp.sock"
        let r = runProcess(["python3", "-c", seccompClientScript, sock, want, dir + "/snap", Invocation.executable,
                            "run", "--kernel", kernel, "--memory", "128M", "--drive", "file=\(image)",
                            "--tpm", "builtin,state=\(dir)/tpm.state", "--seccomp", mode, "--qmp", sock, "--allow-slow-kvm"],
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
        #expect(bad.stderr.contains("--seccomp: expected on, off or log"), "\(bad.stderr)")
    }
}
