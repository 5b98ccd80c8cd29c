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
