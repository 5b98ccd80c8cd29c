import Foundation
import Glibc
import Testing
import TestSupport

/// Hostile QMP clients against the real binary: a 64 MiB line, 10,000-deep nesting, invalid UTF-8,
/// a client that never reads, and 1,000 add-fd/remove-fd cycles (10,000 in QMPTests' fd sets suite). Prints one JSON object with what it
/// measured.
private let hostileClientScript = """
import array, json, os, socket, subprocess, sys, time
sock, cmd = sys.argv[1], sys.argv[2:]
p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
for _ in range(4000):
    if os.path.exists(sock): break
    time.sleep(0.005)
out = {}
def rss():
    # Resident kB outside guest RAM (the 128 MiB mapping, which the booting guest fills as it goes).
    total, size = 0, 0
    for l in open(f"/proc/{p.pid}/smaps"):
        if l.startswith("Size:"): size = int(l.split()[1])
        elif l.startswith("Rss:") and size != 131072: total += int(l.split()[1])
    return total
def fds():
    return len(os.listdir(f"/proc/{p.pid}/fd"))
class Client:
    def __init__(self):
        self.s = socket.socket(socket.AF_UNIX); self.s.settimeout(20); self.s.connect(sock)
        self.buf = b""; self.read()
        self.call({"execute": "qmp_capabilities"})
    def read(self):
        while b"\\n" not in self.buf:
            chunk = self.s.recv(65536)
            if not chunk: raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\\n", 1)
        return json.loads(line)
    def reply(self):
        while True:
            m = self.read()
            if "event" not in m: return m
    def call(self, c, fds=None):
        data = json.dumps(c).encode() + b"\\n"
        if fds: self.s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else: self.s.sendall(data)
        return self.reply()
    def timed_status(self):
        t = time.monotonic(); r = self.call({"execute": "query-status"}); return (time.monotonic() - t) * 1000, r
    def close(self): self.s.close()
a = Client()
out["rss_start"] = rss()
a.s.sendall(b'{"execute": "')
chunk = b"x" * (1 << 20)
for _ in range(64): a.s.sendall(chunk)
a.s.sendall(b'"}\\n')
out["big"] = a.reply()
out["rss_after_big"] = rss()
a.s.sendall(b"[" * 10000 + b"]" * 10000 + b"\\n")
out["deep_array"] = a.reply()
a.s.sendall(b'{"a":' * 10000 + b"1" + b"}" * 10000 + b"\\n")
out["deep_object"] = a.reply()
a.s.sendall(b'{"execute": "query-status", "id": "\\xff\\xfe"}\\n')
out["utf8"] = a.reply()
out["status_ms"], out["status"] = a.timed_status()
fd_start = fds()
r, w = os.pipe()
for i in range(1000):
    a.call({"execute": "add-fd", "arguments": {"fdset-id": 7}}, fds=[r])
    a.call({"execute": "remove-fd", "arguments": {"fdset-id": 7}})
os.close(r); os.close(w)
out["fds_start"], out["fds_end"] = fd_start, fds()
a.close()
# A client that sends commands and never reads: dropped when its output stalls (10 s), then the
# next client is served at once.
c = socket.socket(socket.AF_UNIX); c.connect(sock)
c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
c.sendall(b'{"execute": "qmp_capabilities"}\\n' + b'{"execute": "query-commands"}\\n' * 3000)
t = time.monotonic()
b = Client()
out["waited_for_turn_ms"] = (time.monotonic() - t) * 1000
out["status2_ms"], out["status2"] = b.timed_status()
out["rss_end"] = rss()
b.call({"execute": "quit"})
c.close()
out["exit"] = p.wait(timeout=60)
out["stderr"] = p.stderr.read().decode()
print(json.dumps(out))
"""

@Suite("swiftvmm --qmp: hostile clients")
struct HostileClientTests {
    @Test("a 64 MiB line, 10,000-deep nesting and invalid UTF-8 get error replies without the VMM's memory growing; add-fd/remove-fd cycles leak nothing; a client that never reads is dropped and the next served",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func hostileClients() throws {
        let kernel = try #require(installedDebianKernel())
        let dir = makeTemporaryDirectory("swiftvmm-cli-hostile")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let sock = dir + "/qmp.sock"
        let r = runProcess(["python3", "-c", hostileClientScript, sock, Invocation.executable, "run", "--kernel", kernel,
                            "--memory", "128M", "--qmp", sock, "--allow-slow-kvm"], timeoutSeconds: 120)
        let o = try #require(try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], "\(r.stdout) \(r.stderr)")
        func desc(_ key: String) -> String { ((o[key] as? [String: Any])?["error"] as? [String: Any])?["desc"] as? String ?? "no error: \(o[key] ?? "nil")" }
        #expect(desc("big").contains("larger than 65536 bytes"), "\(desc("big"))")
        #expect(desc("deep_array").contains("deep") || desc("deep_array").contains("nest"), "\(desc("deep_array"))")
        #expect(desc("deep_object").contains("deep") || desc("deep_object").contains("nest"), "\(desc("deep_object"))")
        #expect(desc("utf8").contains("JSON parse error"), "\(desc("utf8"))")
        let start = o["rss_start"] as? Int ?? 0, afterBig = o["rss_after_big"] as? Int ?? .max, end = o["rss_end"] as? Int ?? .max
        // 64 MiB went through; the VMM may not keep more than a few MiB of it (kB resident outside guest RAM).
        #expect(afterBig - start < 16 * 1024 && end - start < 16 * 1024, "resident outside guest RAM \(start) kB, after the 64 MiB line \(afterBig) kB, at the end \(end) kB")
        #expect((o["status_ms"] as? Double ?? 1e9) < 100, "query-status took \(o["status_ms"] ?? "?") ms")
        #expect((o["status2_ms"] as? Double ?? 1e9) < 100, "query-status of the next client took \(o["status2_ms"] ?? "?") ms")
        #expect(o["fds_start"] as? Int == o["fds_end"] as? Int, "descriptors \(o["fds_start"] ?? "?") before 1000 add-fd/remove-fd cycles, \(o["fds_end"] ?? "?") after")
        let waited = o["waited_for_turn_ms"] as? Double ?? 1e9
        #expect(waited < 15_000, "the next client waited \(waited) ms behind one that never reads")
        #expect(o["exit"] as? Int == 0, "exit \(o["exit"] ?? "?"): \(o["stderr"] ?? "")")
    }
}
