import Glibc
import Testing
import TestSupport

@Suite("swiftvmm run --memory: sizes the host cannot give are refused at once")
struct MemoryLimitCLITests {
    @Test("--memory 4096G and 2T: one line, status 1, within seconds (not after minutes of host allocations)",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"), arguments: ["4096G", "2T"])
    func tooLarge(_ size: String) throws {
        let kernel = try #require(installedDebianKernel())
        let start = time(nil)
        let r = Invocation(["run", "--kernel", kernel, "--memory", size, "--allow-slow-kvm"], timeoutSeconds: 60)
        #expect(time(nil) - start < 10)
        #expect(r.status == 1, "\(r.stderr)")
        #expect(r.stderr.contains("swiftvmm: error: guest memory of") && r.stderr.contains("is more than"), "\(r.stderr)")
        #expect(r.stderr.split(separator: "\n").filter { !$0.hasPrefix("swiftvmm: warning") }.count == 1, "\(r.stderr)")
    }
}

@Suite("swiftvmm run --cpu")
struct CPUModelCLITests {
    @Test("--cpu baseline runs, snapshots and restores; a bad value is one line",
          .enabled(if: access("/dev/kvm", R_OK | W_OK) == 0, "needs /dev/kvm"))
    func baseline() throws {
        let kernel = try #require(installedDebianKernel())
        let parent = makeTemporaryDirectory("swiftvmm-cli-cpu")
        defer { _ = runProcess(["rm", "-rf", parent]) }
        let made = qmpSession(["run", "--kernel", kernel, "--memory", "128M", "--cpu", "baseline"],
                              #"[{"execute": "snapshot-create", "arguments": {"path": "\#(parent)/snap"}}]"#, tag: "cpu")
        #expect(made.stdout.contains("\"memory-size\""), "\(made.stdout) \(made.stderr)")
        #expect(made.stdout.contains("exit 0"))
        let restored = qmpSession(["restore", parent + "/snap"], #"[{"execute": "query-status"}]"#, tag: "cpur")
        #expect(restored.stdout.contains("\"running\"") && restored.stdout.contains("exit 0"), "\(restored.stdout) \(restored.stderr)")
        let bad = Invocation(["run", "--kernel", kernel, "--cpu", "pentium"])
        #expect(bad.status == 1 && bad.stderr.split(separator: "\n").count == 1 && bad.stderr.contains("--cpu"), "\(bad.stderr)")
    }
}
