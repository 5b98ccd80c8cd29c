import Foundation
import Glibc
import Testing
import TestSupport

/// A Python QMP client that starts `swiftvmm ARGS --qmp SOCK --allow-slow-kvm`, negotiates, records
/// which of SIGHUP, SIGINT and SIGTERM every thread of the VMM blocks, optionally sends a command
/// (without waiting for its reply) and sleeps, then sends the signal and reads until EOF. It prints
/// one JSON object: the threads and their blocked stop signals, the events received, the exit
/// status, the VMM's stderr, and whether the socket file is left.
let signalClientScript = """
import json, os, signal, socket, subprocess, sys, time, traceback
sock, signame, command, delay, cmd = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5:]
# Start the VMM as a shell would: nothing blocked (the test runner may have blocked signals, and a
# child inherits the mask).
signal.pthread_sigmask(signal.SIG_SETMASK, [])
out = {"events": [], "replies": []}
try:
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    s = socket.socket(socket.AF_UNIX)
    for _ in range(4000):
        try:
            s.connect(sock); break
        except OSError:
            time.sleep(0.005)
    f = s.makefile("rwb")
    def read():
        line = f.readline()
        if not line: return None
        m = json.loads(line)
        if "event" in m: out["events"].append(m["event"])
        elif "QMP" not in m: out["replies"].append(m)
        return m
    read()
    f.write(b'{"execute": "qmp_capabilities"}\\n'); f.flush()
    while read() is not None and not out["replies"]: pass
    f.write(b'{"execute": "query-status"}\\n'); f.flush()  # the machine exists once this is answered
    while read() is not None and len(out["replies"]) < 2: pass
    def threads():
        found = {}
        for tid in os.listdir(f"/proc/{p.pid}/task"):
            try:
                with open(f"/proc/{p.pid}/task/{tid}/status") as st:
                    fields = dict(l.split(":", 1) for l in st if ":" in l)
                blocked = int(fields["SigBlk"].strip(), 16)
                found[fields["Name"].strip()] = [n for n in (1, 2, 15) if blocked >> (n - 1) & 1]
            except (FileNotFoundError, ProcessLookupError):  # a thread that has just ended
                pass
        return found
    for _ in range(500):  # until the vCPU thread has started
        out["threads"] = threads()
        if "vcpu0" in out["threads"]: break
        time.sleep(0.01)
    if command:
        f.write(command.encode() + b"\\n"); f.flush()
    time.sleep(delay)
    os.kill(p.pid, getattr(signal, signame))
    try:
        while read() is not None: pass
    except (ConnectionResetError, ValueError):
        pass
    out["status"] = p.wait(timeout=60)
    out["stderr"] = p.stderr.read().decode()
    out["socket_left"] = os.path.exists(sock)
except Exception:
    out["error"] = traceback.format_exc()
    try:
        p.kill(); out["stderr"] = p.communicate(timeout=10)[1].decode()
    except Exception:
        pass
print(json.dumps(out))
"""

struct SignalOutcome {
    var threads: [String: [Int]] = [:]
    var events: [String] = []
    var replies: [[String: Any]] = []
    var status = -1
    var stderr = ""
    var socketLeft = true
}

/// Runs `swiftvmm ARGS` under the signal client and decodes what it printed.
func signalSession(_ args: [String], signal: String, command: String = "", delay: Double = 0.05,
                   tag: String) throws -> SignalOutcome {
    let sock = "/tmp/swiftvmm-cli-sig-\(getpid())-\(tag).sock"
    defer { unlink(sock) }
    let r = runProcess(["python3", "-c", signalClientScript, sock, signal, command, String(delay), Invocation.executable]
                       + args + ["--qmp", sock, "--allow-slow-kvm"], timeoutSeconds: 120)
    let json = try #require(try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any],
                            "client output: \(r.stdout) \(r.stderr)")
    var o = SignalOutcome()
    o.threads = json["threads"] as? [String: [Int]] ?? [:]
    o.events = json["events"] as? [String] ?? []
    o.replies = json["replies"] as? [[String: Any]] ?? []
    o.status = json["status"] as? Int ?? -1
    o.stderr = json["stderr"] as? String ?? ""
    o.socketLeft = json["socket_left"] as? Bool ?? true
    if let error = json["error"] as? String { Issue.record("the client failed: \(error)\nVMM stderr: \(o.stderr)") }
    return o
}

@Suite("swiftvmm run|restore --qmp: a stop signal ends the VM cleanly")
struct SignalTests {
    static let signals: [(name: String, number: Int)] = [("SIGTERM", 15), ("SIGINT", 2), ("SIGHUP", 1)]

    func expectCleanStop(_ o: SignalOutcome, signal: Int, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(o.threads.count >= 3 && o.threads["vcpu0"] != nil && o.threads["qmp"] != nil, "the VMM has its main, qmp and vCPU threads: \(o.threads)", sourceLocation: sourceLocation)
        for (name, blocked) in o.threads {
            #expect(blocked == [1, 2, 15], "thread \(name) does not block SIGHUP, SIGINT and SIGTERM: \(blocked)",
                    sourceLocation: sourceLocation)
        }
        #expect(o.status == 128 + signal, "exit status \(o.status); stderr: \(o.stderr)", sourceLocation: sourceLocation)
        #expect(o.stderr.contains("swiftvmm: stopped by signal \(signal)"), "stderr: \(o.stderr)", sourceLocation: sourceLocation)
        #expect(o.events.last == "SHUTDOWN", "events: \(o.events)", sourceLocation: sourceLocation)
        #expect(!o.socketLeft, "the socket file is left behind", sourceLocation: sourceLocation)
    }

    @Test("run: SIGTERM, SIGINT and SIGHUP give 128+N, a SHUTDOWN event and no socket file, and no thread takes them",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func runStopsOnSignals() throws {
        let kernel = try #require(installedDebianKernel())
        for s in Self.signals {
            let o = try signalSession(["run", "--kernel", kernel, "--memory", "128M"], signal: s.name, tag: "run\(s.number)")
            expectCleanStop(o, signal: s.number)
        }
    }

    @Test("restore: a stop signal ends a restored VM the same way",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func restoreStopsOnSignals() throws {
        // The committed baseline fixture (a tiny counting guest) restores on every host, and
        // restores never write it.
        let fixture = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures/snapshots/v1.0-baseline-counter").path
        for s in Self.signals {
            let o = try signalSession(["restore", fixture, "--no-working-set"], signal: s.name, tag: "restore\(s.number)")
            expectCleanStop(o, signal: s.number)
        }
    }

    @Test("a signal during snapshot-create (live or not) leaves the snapshot complete or absent, no temporary directory and no writer process",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"),
          arguments: [(0.0, false), (0.02, false), (0.08, false), (0.2, false), (0.0, true), (0.02, true), (0.08, true)])
    func signalDuringSnapshot(delay: Double, live: Bool) throws {
        let kernel = try #require(installedDebianKernel())
        let parent = makeTemporaryDirectory("swiftvmm-cli-sigsnap")
        defer { _ = runProcess(["rm", "-rf", parent]) }
        let dir = parent + "/snap"
        // 512 MiB of guest memory, the kernel and initrd loaded: a write that takes a while. (A
        // memory size of its own per case, to find its processes.)
        let memory = "\(512 + Int(delay * 1000) * 2 + (live ? 1 : 0))M"
        let o = try signalSession(["run", "--kernel", kernel, "--memory", memory], signal: "SIGTERM",
                                  command: #"{"execute": "snapshot-create", "arguments": {"path": "\#(dir)", "live": \#(live)}}"#,
                                  delay: delay, tag: "snap\(Int(delay * 1000))\(live ? "live" : "")")
        expectCleanStop(o, signal: 15)
        // A live snapshot's writer (a child process) does not outlive the VM.
        var left = ""
        for _ in 0..<100 {
            left = processesWith(argument: memory).joined(separator: ", ")
            if left.isEmpty { break }
            usleep(20_000)
        }
        #expect(left.isEmpty, "processes left: \(left)")
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: parent)) ?? []
        #expect(entries.allSatisfy { $0 == "snap" }, "left in \(parent): \(entries)")
        if entries.contains("snap") {
            #expect(Invocation(["snapshot", "verify", dir]).status == 0, "a snapshot that exists is complete")
        }
    }
}

/// The pids of live processes (not zombies) with `argument` among their command-line arguments.
func processesWith(argument: String) -> [String] {
    let pids = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).filter { $0.allSatisfy(\.isNumber) }
    return pids.filter { pid in
        guard let cmdline = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline"), !cmdline.isEmpty else { return false }
        let args = cmdline.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        return args.contains(argument)
    }
}
