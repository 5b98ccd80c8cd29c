import Glibc
import Snapshot
import Testing

@Suite("swiftvmm snapshot inspect / verify")
struct SnapshotCLITests {
    /// A small snapshot in a fresh temporary directory: returns (parent, snapshot directory).
    func makeSnapshot() throws -> (String, String) {
        var template = Array("/tmp/swiftvmm-cli-snap-XXXXXX".utf8CString)
        let parent = String(cString: mkdtemp(&template)!)
        var memory = [UInt8](repeating: 0, count: 64 * 1024)
        memory[5000] = 0x42
        let sections = [SnapshotSection(name: "vcpu.0", version: 1, minimumVersion: 1, required: true, payload: [1, 2, 3])]
        let header = SnapshotHeader(created: 1_700_000_000_000_000_000, writerVersion: "0.1.0", memorySize: UInt64(memory.count), vcpuCount: 1)
        let dir = parent + "/snap"
        _ = try memory.withUnsafeBytes { raw in
            try SnapshotWriter.write(directory: dir, header: header, sections: sections, memory: [raw])
        }
        return (parent, dir)
    }

    func cleanup(_ parent: String, _ dir: String) {
        unlink(dir + "/state.bin")
        unlink(dir + "/memory.bin")
        rmdir(dir)
        rmdir(parent)
    }

    @Test func inspectAndVerify() throws {
        let (parent, dir) = try makeSnapshot()
        defer { cleanup(parent, dir) }
        let inspect = Invocation(["snapshot", "inspect", dir])
        #expect(inspect.status == 0, "stderr: \(inspect.stderr)")
        #expect(inspect.stdout.contains("format             1.0\n"))
        #expect(inspect.stdout.contains("writer             swiftvmm 0.1.0\n"))
        #expect(inspect.stdout.contains("  vcpu.0                  1        1  required"))

        let ok = Invocation(["snapshot", "verify", dir])
        #expect(ok.status == 0, "stdout: \(ok.stdout)")
        #expect(ok.stdout.hasSuffix("\(dir): all 9 checks passed\n")) // with memory.chunks and its check

        // One flipped byte of guest memory: verify says which check failed and exits 1.
        let fd = open(dir + "/memory.bin", O_RDWR)
        var b: UInt8 = 0x43
        #expect(pwrite(fd, &b, 1, 5000) == 1)
        close(fd)
        let bad = Invocation(["snapshot", "verify", dir])
        #expect(bad.status == 1)
        #expect(bad.stdout.contains("FAILED memory.bin chunks: memory.bin: chunk 0 (offset 0x0): CRC32C mismatch (stored 0x"))
        #expect(bad.stdout.contains("FAILED memory.bin CRC32C: memory.bin: contents: CRC32C mismatch (stored 0x"))
        #expect(bad.stdout.hasSuffix("\(dir): 2 of 9 checks failed\n"))
    }

    @Test("a memory.bin of the wrong length fails verify at once, without being read")
    func oversizedMemoryFile() throws {
        let (parent, dir) = try makeSnapshot()
        defer { cleanup(parent, dir) }
        try #require(truncate(dir + "/memory.bin", 64 << 30) == 0) // sparse: reading it all takes minutes
        let start = monotonicSeconds()
        let r = Invocation(["snapshot", "verify", dir], timeoutSeconds: 20)
        #expect(monotonicSeconds() - start < 5)
        #expect(r.status == 1, "stdout: \(r.stdout) stderr: \(r.stderr)")
        let failed = r.stdout.split(separator: "\n").filter { $0.hasPrefix("FAILED") }
        #expect(failed == ["FAILED memory.bin length: memory.bin: length: the file has 68719476736 bytes, the header says 65536; its CRC32C is not checked"],
                "stdout: \(r.stdout)")
        #expect(!r.stdout.contains("memory.bin CRC32C"))
        #expect(r.stdout.hasSuffix("\(dir): 1 of 7 checks failed\n"))
    }

    @Test func notADirectory() {
        let r = Invocation(["snapshot", "inspect", "/nonexistent/snap"])
        #expect(r.status == 1)
        #expect(r.stderr == "swiftvmm: error: /nonexistent/snap: No such file or directory\n")
        let v = Invocation(["snapshot", "verify", "/etc/hostname"])
        #expect(v.status == 1)
        #expect(v.stderr == "swiftvmm: error: /etc/hostname: not a directory (a snapshot is a directory)\n")
    }
}
