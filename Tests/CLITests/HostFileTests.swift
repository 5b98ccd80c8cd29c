import Glibc
import Testing
import TestSupport
import VMMSys

/// A FIFO in a fresh temporary directory: returns (directory, fifo path).
func makeFIFO() throws -> (String, String) {
    let dir = makeTemporaryDirectory("swiftvmm-cli-fifo")
    let fifo = dir + "/fifo"
    try #require(mkfifo(fifo, 0o600) == 0)
    return (dir, fifo)
}

@Suite("swiftvmm run: host files must be regular files, refused without blocking or reading")
struct HostFileTests {
    /// Long enough for any refusal; an old build that blocks is killed by then (status 124).
    static let watchdog = 10

    @Test("a FIFO as --kernel is refused at once, not waited on")
    func fifoKernel() throws {
        let (dir, fifo) = try makeFIFO()
        defer { unlink(fifo); rmdir(dir) }
        let start = monotonicSeconds()
        let r = Invocation(["run", "--kernel", fifo], timeoutSeconds: Self.watchdog)
        expectOneErrorLine(r, containing: "the kernel \(fifo) is not a regular file")
        #expect(monotonicSeconds() - start < 5)
    }

    @Test("a FIFO as --initrd is refused at once")
    func fifoInitrd() throws {
        let kernel = try #require(installedDebianKernel())
        let (dir, fifo) = try makeFIFO()
        defer { unlink(fifo); rmdir(dir) }
        let r = Invocation(["run", "--kernel", kernel, "--initrd", fifo, "--kvm-device", "/nonexistent/kvm"],
                           timeoutSeconds: Self.watchdog)
        expectOneErrorLine(r, containing: "the initrd \(fifo) is not a regular file")
    }

    @Test("/dev/zero and a directory as --kernel are refused without reading them")
    func deviceAndDirectory() {
        let start = monotonicSeconds()
        expectOneErrorLine(Invocation(["run", "--kernel", "/dev/zero"], timeoutSeconds: Self.watchdog),
                           containing: "the kernel /dev/zero is not a regular file")
        #expect(monotonicSeconds() - start < 2, "/dev/zero must not be read")
        expectOneErrorLine(Invocation(["run", "--kernel", "/tmp"], timeoutSeconds: Self.watchdog),
                           containing: "the kernel /tmp is not a regular file")
    }

    @Test("a regular kernel file over 512 MiB is refused from its size")
    func oversizedKernel() throws {
        let path = writeTempFile([])
        defer { unlink(path) }
        try #require(truncate(path, 64 << 30) == 0) // sparse
        let start = monotonicSeconds()
        expectOneErrorLine(Invocation(["run", "--kernel", path], timeoutSeconds: Self.watchdog),
                           containing: "the kernel \(path) is larger than 512 MiB")
        #expect(monotonicSeconds() - start < 2)
    }

    @Test("a pipe in an fd set is refused as the kernel, not read until its writer closes")
    func pipeFromFdSet() throws {
        let pipe = try #require(closeOnExecPipe())
        let fds = [pipe.read, pipe.write]
        defer { close(fds[0]); close(fds[1]) }
        // The child inherits the read end only; this process keeps the write end open.
        let r = Invocation(["run", "--add-fd", "fd=\(fds[0]),set=3", "--kernel", "/dev/fdset/3"], timeoutSeconds: Self.watchdog,
                           inheriting: [fds[0]])
        expectOneErrorLine(r, containing: "the kernel /dev/fdset/3 is not a regular file")
    }
}

@Suite("swiftvmm run --fw-cfg: one source per file")
struct FwCfgSyntaxTests {
    @Test("file= followed by a second source key is refused", arguments: [
        "name=opt/x,file=/etc/hostname,string=b", "name=opt/x,file=/etc/hostname,file=/etc/passwd",
    ])
    func twoSources(_ value: String) {
        expectOneErrorLine(Invocation(["run", "--kernel", "/nonexistent/bzImage", "--fw-cfg", value]),
                           containing: "--fw-cfg takes one of file= or string=, not both")
    }

    @Test("string= text may contain commas and key-like words")
    func stringWithCommas() {
        // Accepted: the run gets as far as reading the kernel.
        expectOneErrorLine(Invocation(["run", "--kernel", "/nonexistent/bzImage", "--fw-cfg", "name=opt/x,string=a,file=b,c"]),
                           containing: "cannot read the kernel /nonexistent/bzImage")
    }
}

@Suite("swiftvmm run --add-fd: one descriptor in several sets")
struct AddFDTwiceTests {
    @Test("the same inherited descriptor goes into two sets, each usable")
    func sameDescriptorInTwoSets() throws {
        let kernel = try #require(installedDebianKernel())
        let fd = open(kernel, O_RDONLY | O_CLOEXEC) // the child alone inherits it
        try #require(fd > 2)
        defer { close(fd) }
        let r = Invocation(["run", "--add-fd", "fd=\(fd),set=1", "--add-fd", "fd=\(fd),set=2", "--kernel", "/dev/fdset/2",
                            "--kvm-device", "/nonexistent/kvm"], inheriting: [fd])
        // The kernel is read and parsed through set 2; the run then stops at the missing KVM device.
        expectOneErrorLine(r, containing: "KVM is not available")
        #expect(!r.stderr.contains("not open"))
    }
}

func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}
