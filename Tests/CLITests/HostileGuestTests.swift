import Foundation
import Glibc
import Testing
import TestSupport

/// A guest that does nothing but exit to the VMM as fast as it can: it floods the UART's transmit
/// register (stdout is a pipe nobody reads), reads the UART's line status, writes and reads an
/// unassigned port, reads and writes unassigned MMIO, and starts an fw_cfg DMA request at an address
/// outside guest RAM, in a loop. Meanwhile QMP's query-status
/// is timed and the VMM's memory outside guest RAM is sampled.
private let hostileGuestScript = """
import json, os, socket, subprocess, sys, time
sock, seconds, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
# stdout is a pipe this script never reads: the guest's flood fills it and stays there.
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
for _ in range(4000):
    if os.path.exists(sock): break
    time.sleep(0.005)
def rss():
    total, size = 0, 0
    for l in open(f"/proc/{p.pid}/smaps"):
        if l.startswith("Size:"): size = int(l.split()[1])
        elif l.startswith("Rss:") and size != 65536: total += int(l.split()[1])
    return total
s = socket.socket(socket.AF_UNIX); s.settimeout(20); s.connect(sock)
f = s.makefile("rwb")
def call(c):
    f.write(json.dumps(c).encode() + b"\\n"); f.flush()
    while True:
        m = json.loads(f.readline())
        if "event" not in m: return m
f.readline(); call({"execute": "qmp_capabilities"})
time.sleep(0.5)
samples, statuses, rsses = [], [], [rss()]
end = time.monotonic() + seconds
while time.monotonic() < end:
    t = time.monotonic(); r = call({"execute": "query-status"}); samples.append((time.monotonic() - t) * 1000)
    statuses.append(r.get("return", {}).get("status"))
    rsses.append(rss())
    time.sleep(0.05)
call({"execute": "quit"})
try: status = p.wait(timeout=30)
except subprocess.TimeoutExpired: p.kill(); status = "hung"
flood = p.stdout.read().count(b"A")
print(json.dumps({"flood": flood, "ms": samples, "statuses": statuses, "rss": rsses, "exit": status, "stderr": p.stderr.read().decode()[-2000:]}))
"""

@Suite("swiftvmm: hostile guests")
struct HostileGuestTests {
    /// 64-bit code at the kernel's entry: the exit loop described above.
    static let exitLoop: [UInt8] = [
        0x66, 0xBA, 0xF8, 0x03,        // mov dx, 0x3f8
        0xB0, 0x41,                    // mov al, 'A'
        0xEE,                          // out dx, al       (UART transmit)
        0x66, 0xBA, 0xFD, 0x03,        // mov dx, 0x3fd
        0xEC,                          // in al, dx        (UART line status)
        0x66, 0xBA, 0x34, 0x12,        // mov dx, 0x1234
        0xEE,                          // out dx, al       (unassigned port)
        0xEC,                          // in al, dx
        0xB8, 0x00, 0x00, 0x00, 0xFE,  // mov eax, 0xFE000000
        0x8A, 0x00,                    // mov al, [rax]    (unassigned MMIO)
        0x88, 0x00,                    // mov [rax], al
        0x66, 0xBA, 0x18, 0x05,        // mov dx, 0x518
        0xB8, 0xFF, 0xFF, 0xF0, 0x00,  // mov eax, big-endian 0xFFFFF000
        0xEF,                          // out dx, eax      (fw_cfg DMA request at an address outside RAM)
        0xEB, 0xD9,                    // jmp back to the start
    ]

    @Test("a guest spinning on PIO, MMIO and fw_cfg DMA exits and flooding the UART into a pipe nobody reads: query-status answers within 100 ms throughout, the VMM's own memory stays flat, quit still quits",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func exitStorm() throws {
        let dir = makeTemporaryDirectory("swiftvmm-cli-hostile-guest")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let image = syntheticBzImage { b in
            let entry = 5 * 512 + 0x200
            for (i, byte) in Self.exitLoop.enumerated() { b[entry + i] = byte }
        }
        let kernel = dir + "/spin.bzImage"
        #expect(FileManager.default.createFile(atPath: kernel, contents: Data(image)))
        let sock = dir + "/qmp.sock"
        let r = runProcess(["python3", "-c", hostileGuestScript, sock, "4", Invocation.executable, "run", "--kernel", kernel,
                            "--memory", "64M", "--qmp", sock, "--allow-slow-kvm"], timeoutSeconds: 90)
        let o = try #require(try? JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [String: Any], "\(r.stdout) \(r.stderr)")
        // The guest really ran its loop: its UART output filled the pipe.
        #expect((o["flood"] as? Int ?? 0) >= 4096, "the guest wrote \(o["flood"] ?? 0) bytes")
        let ms = o["ms"] as? [Double] ?? []
        #expect(ms.count >= 20, "\(ms.count) samples")
        #expect((ms.max() ?? 1e9) < 100, "slowest query-status \(ms.max() ?? -1) ms of \(ms.count)")
        #expect((o["statuses"] as? [String] ?? []).allSatisfy { $0 == "running" }, "\(o["statuses"] ?? "?")")
        let rss = o["rss"] as? [Int] ?? []
        let growth = (rss.max() ?? .max) - (rss.first ?? 0)
        #expect(growth < 8 * 1024, "memory outside guest RAM grew by \(growth) kB: \(rss)")
        #expect(o["exit"] as? Int == 0, "exit \(o["exit"] ?? "?"): \(o["stderr"] ?? "")")
    }
}
