import Glibc
import Launcher
import Machine
import Testing
import TestSupport
@testable import swiftvmm

/// The lines a launcher would have written to stderr.
final class CapturedLines {
    var lines: [String] = []
    func launcher() -> Launcher { Launcher(processStart: 0, errorOutput: { self.lines.append($0) }, ownsProcess: false) }
}

@Suite("Launcher: configurations checked and run in this process, statuses returned")
struct LauncherTests {
    @Test("an invalid RunConfig returns status 1 with one error line")
    func invalidRunConfig() {
        var config = RunConfig(kernel: "/nonexistent/bzImage")
        config.cpus = 0
        let out = CapturedLines()
        #expect(out.launcher().run(config) == 1)
        #expect(out.lines == ["swiftvmm: error: --cpus must be between 1 and \(MachineConfig.maximumCPUs)"])
    }

    @Test("memory and vCPU limits are MachineConfig's")
    func limitsAreMachineConfigs() throws {
        var config = RunConfig(kernel: "k")
        config.memory = MemorySize(bytes: MachineConfig.minimumMemory)
        try config.validate() // below the old CLI-only minimum of 16M
        config.memory = MemorySize(bytes: MachineConfig.minimumMemory - 4096)
        #expect(throws: LaunchError(MachineConfig.memorySizeProblem(MachineConfig.minimumMemory - 4096)!)) { try config.validate() }
        config.memory = MemorySize(bytes: (256 << 20) + 1024)
        #expect(throws: LaunchError(MachineConfig.memorySizeProblem((256 << 20) + 1024)!)) { try config.validate() }
        config.memory = MemorySize(bytes: MachineConfig.maximumMemory + 4096)
        #expect(throws: LaunchError(MachineConfig.memorySizeProblem(MachineConfig.maximumMemory + 4096)!)) { try config.validate() }
        config.memory = MemorySize(bytes: 64 << 20)
        config.cpus = MachineConfig.maximumCPUs
        try config.validate()
        config.cpus = MachineConfig.maximumCPUs + 1
        #expect(throws: LaunchError("--cpus must be between 1 and \(MachineConfig.maximumCPUs)")) { try config.validate() }
    }

    /// A valid configuration with one change, and the message that change gives.
    static func badConfigs() -> [(RunConfig, String)] {
        func with(_ change: (inout RunConfig) -> Void) -> RunConfig {
            var c = RunConfig(kernel: "k")
            change(&c)
            return c
        }
        return [
            (with { $0.acpi = false; $0.cpus = 2 }, "--no-acpi allows only one vCPU (--cpus 1)"),
            (with { $0.kernel = nil }, "Missing expected argument '--kernel <kernel>'"),
            (with { $0.vmGenerationID = "nope" }, "--vmgenid must be a GUID like 12345678-9abc-def0-1234-56789abcdef0, or auto"),
            (with { $0.fwCfgFiles = [.init(name: "opt/a", source: .string("1")), .init(name: "opt/a", source: .string("2"))] },
             "--fw-cfg names must be unique"),
            (with { $0.process.qmp = "" }, "--qmp needs a socket path"),
            (with { $0.process.qmp = String(repeating: "x", count: 108) },
             "the --qmp path is 108 bytes, longer than the 107-byte limit of Unix socket addresses"),
        ]
    }

    @Test("the other RunConfig rules", arguments: badConfigs())
    func runRules(config: RunConfig, message: String) {
        let out = CapturedLines()
        #expect(out.launcher().run(config) == 1)
        #expect(out.lines == ["swiftvmm: error: \(message)"])
    }

    @Test("an invalid RestoreConfig returns status 1 before anything is read")
    func invalidRestoreConfig() {
        var config = RestoreConfig(directory: "/nonexistent/snap")
        config.vmGenerationID = "nope"
        let out = CapturedLines()
        #expect(out.launcher().restore(config) == 1)
        #expect(out.lines == ["swiftvmm: error: --vmgenid must be a GUID like 12345678-9abc-def0-1234-56789abcdef0, auto or keep"])
    }

    @Test("run with --dump-acpi and no kernel writes the tables and returns 0")
    func dumpACPIOnly() throws {
        let dir = makeTemporaryDirectory("swiftvmm-launcher-acpi")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        var config = RunConfig(kernel: nil)
        config.dumpACPI = dir
        config.cpus = 2
        let out = CapturedLines()
        #expect(out.launcher().run(config) == 0)
        #expect(out.lines.count == 1 && out.lines[0].hasPrefix("swiftvmm: wrote 7 ACPI tables to \(dir)"), "\(out.lines)")
        #expect(access(dir + "/DSDT.dat", R_OK) == 0)
    }

    @Test("a failure after the QMP socket is served returns 1 and removes the socket")
    func failureRemovesSocket() {
        let sock = "/tmp/swiftvmm-launcher-\(getpid()).sock"
        defer { unlink(sock) }
        var config = RunConfig(kernel: "/nonexistent/bzImage")
        config.process.qmp = sock
        let out = CapturedLines()
        #expect(out.launcher().run(config) == 1)
        #expect(out.lines.count == 1 && out.lines[0].hasPrefix("swiftvmm: error: cannot read the kernel /nonexistent/bzImage"), "\(out.lines)")
        #expect(access(sock, F_OK) != 0, "the socket file is left behind")
    }

    @Test("snapshot and host-info statuses")
    func otherCommands() {
        let out = CapturedLines()
        #expect(out.launcher().inspectSnapshot(directory: "/nonexistent/snap") == 1)
        #expect(out.launcher().verifySnapshot(directory: "/etc/hostname") == 1)
        #expect(out.lines == ["swiftvmm: error: /nonexistent/snap: No such file or directory",
                              "swiftvmm: error: /etc/hostname: not a directory (a snapshot is a directory)"])
    }
}

@Suite("swiftvmm's one parser: run and restore parsed alone give what the whole tree gives")
struct ParserTests {
    @Test("the same configuration from the fast path and the whole command tree", arguments: [
        ["run", "--kernel", "k", "--initrd", "i", "--memory", "64M", "--cpus", "2", "--qmp", "/tmp/s", "--fw-cfg", "name=opt/a,string=x,y",
         "--vmgenid", "12345678-9abc-def0-1234-56789abcdef0", "--cpu", "baseline", "--log-level", "info", "--allow-slow-kvm", "--add-fd", "fd=7,set=2"],
        ["run", "--dump-acpi", "/tmp/d", "--no-acpi", "--firmware", "builtin", "--qmp=/tmp/s2"],
        ["restore", "/tmp/snap", "--vmgenid", "keep", "--paused", "--qmp", "/tmp/s", "--kvm-device", "/dev/null"],
    ])
    func fastPathMatchesTree(args: [String]) throws {
        let fast = try SwiftVMM.parseCommand(args)
        let tree = try SwiftVMM.parseAsRoot(args)
        if let f = fast as? Run, let t = tree as? Run {
            #expect(f.config == t.config)
        } else if let f = fast as? Restore, let t = tree as? Restore {
            #expect(f.config == t.config)
        } else {
            Issue.record("parsed as \(type(of: fast)) and \(type(of: tree))")
        }
    }

    @Test("the fast path maps every option into the configuration")
    func mapping() throws {
        let run = try #require(try SwiftVMM.parseCommand(["run", "--kernel", "k", "--memory", "8M", "--no-acpi", "--firmware", "fw.bin",
                                                          "--cmdline", "quiet", "--qmp", "/tmp/s"]) as? Run).config
        #expect(run.kernel == "k" && run.memory.bytes == 8 << 20 && !run.acpi && run.firmware == .path("fw.bin"))
        #expect(run.commandLine == "quiet" && run.process.qmp == "/tmp/s" && run.cpus == 1)
    }

    @Test("what the fast path refuses is the whole tree's error or help")
    func errorsComeFromTheTree() throws {
        #expect(throws: (any Error).self) { try SwiftVMM.parseCommand(["run", "--cpus", "0", "--kernel", "k"]) }
        // Help is the tree's: it names the program (restore parsed alone once printed `USAGE: restore`).
        for command in ["run", "restore"] {
            let help = Invocation([command, "--help"])
            #expect(help.status == 0 && help.stdout.contains("USAGE: swiftvmm \(command) "), "\(help.stdout)")
        }
        do {
            _ = try SwiftVMM.parseCommand(["run", "--kernel", "k", "--memory", "1K"])
            Issue.record("1K parsed")
        } catch {
            #expect(SwiftVMM.message(for: error) == MachineConfig.memorySizeProblem(1024))
        }
    }
}

@Suite("The launcher and the executable do not end the process themselves")
struct NoExitTests {
    /// The Swift files of Sources/swiftvmm and Sources/Launcher, found from this file's path.
    static func sources() throws -> [(name: String, text: String)] {
        // #filePath is REPO/Tests/CLITests/LauncherTests.swift.
        let root = "/" + "\(#filePath)".split(separator: "/").dropLast(3).joined(separator: "/")
        var files: [(String, String)] = []
        for dir in ["Sources/swiftvmm", "Sources/Launcher"] {
            let r = runProcess(["sh", "-c", "ls \(root)/\(dir)/*.swift"])
            for path in r.stdout.split(separator: "\n") {
                let text = try #require(readText(String(path)), "cannot read \(path)")
                files.append((String(path), text))
            }
        }
        try #require(files.count >= 6, "found \(files.map(\.0))")
        return files
    }

    static func readText(_ path: String) -> String? {
        guard let f = fopen(path, "r") else { return nil }
        defer { fclose(f) }
        var bytes: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = fread(&buf, 1, buf.count, f)
            if n <= 0 { break }
            bytes += buf[0..<n]
        }
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Lines that call `exit(`, `_exit(`, `exit(withError:` or the old `fail(` helper (comments left out).
    static func exitCalls(_ text: String) -> [String] {
        text.split(separator: "\n").map(String.init).filter { line in
            let code = line.components(separatedBy: "//").first ?? ""
            return code.range(of: #"(^|[^A-Za-z0-9_.])(_?exit|fail|abort)\s*\("#, options: .regularExpression) != nil
                || code.contains(".exit(")
        }
    }

    @Test("exit( appears only in main.swift, once")
    func onlyMainExits() throws {
        for (path, text) in try Self.sources() {
            let calls = Self.exitCalls(text)
            if path.hasSuffix("/Sources/swiftvmm/main.swift") {
                #expect(calls.count == 1, "\(path): \(calls)")
            } else {
                #expect(calls.isEmpty, "\(path) ends the process: \(calls)")
            }
        }
    }

    @Test("no nonisolated(unsafe) state and no reading of the raw arguments outside main.swift")
    func noGlobalsNoArgvScan() throws {
        for (path, text) in try Self.sources() {
            #expect(!text.contains("nonisolated(unsafe)"), "\(path)")
            if !path.hasSuffix("/main.swift") { #expect(!text.contains("CommandLine.arguments"), "\(path)") }
        }
    }

    @Test("the check itself finds exit calls")
    func checkerWorks() {
        #expect(Self.exitCalls("    Glibc.exit(1)\n    exit(status)\n    _exit(2)\n    type.exit(withError: e)\n    fail(\"x\")").count == 5)
        #expect(Self.exitCalls("    // exit(1) in a comment\n    let exitStatus = end.exitStatus\n    func failure(_ e: Error)").isEmpty)
    }
}
