import Glibc
import Testing
import TestSupport

/// Exactly one line on stderr, `swiftvmm: error: ...`, nothing on stdout, exit status 1.
func expectOneErrorLine(_ r: Invocation, containing needle: String = "", sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(r.status == 1, "stderr: \(r.stderr)", sourceLocation: sourceLocation)
    #expect(r.stderr.hasPrefix("swiftvmm: error: "), "stderr: \(r.stderr)", sourceLocation: sourceLocation)
    #expect(r.stderr.hasSuffix("\n") && r.stderr.filter { $0 == "\n" }.count == 1, "not one line: \(r.stderr)",
            sourceLocation: sourceLocation)
    #expect(needle.isEmpty || r.stderr.contains(needle), "stderr: \(r.stderr)", sourceLocation: sourceLocation)
    #expect(r.stdout.isEmpty, "stdout: \(r.stdout)", sourceLocation: sourceLocation)
}

@Suite("swiftvmm argument errors: one line on stderr, exit status 1")
struct ArgumentErrorTests {
    @Test("a bad invocation gives one error line and status 1", arguments: [
        ["run", "--cpus", "0"],
        ["run", "--bogus"],
        ["run", "--kernel", "/boot/none", "--bogus"],
        ["restore"],
        ["restore", "/tmp", "--vmgenid", "nope"],
        ["restore", "/tmp", "--clock", "utc"],
        ["snapshot", "inspect"],
        ["snapshot", "verify", "a", "b"],
        ["run", "--memory", "12Q"],
        ["run", "--kernel", "/boot/none", "--log-level", "loud"],
        ["bogus-command"],
    ])
    func oneLine(args: [String]) {
        expectOneErrorLine(Invocation(args))
    }

    @Test("a missing subcommand is one error line naming the subcommands")
    func missingSubcommand() {
        expectOneErrorLine(Invocation([]), containing: "run, restore, snapshot, nvram or host-info")
        expectOneErrorLine(Invocation(["snapshot"]), containing: "inspect or verify")
    }

    @Test("the messages say what is wrong")
    func messages() {
        expectOneErrorLine(Invocation(["run", "--cpus", "0"]), containing: "--cpus must be between 1 and 254")
        expectOneErrorLine(Invocation(["run", "--memory", "12Q"]), containing: "'12Q'")
        expectOneErrorLine(Invocation(["restore"]), containing: "<DIR>")
        expectOneErrorLine(Invocation(["restore", "/tmp", "--clock", "utc"]), containing: "--clock must be saved or host, not 'utc'")
        expectOneErrorLine(Invocation(["snapshot", "inspect"]), containing: "<directory>")
    }

    @Test("--help and --version still print to stdout and exit 0", arguments: [
        ["--help"], ["run", "--help"], ["restore", "--help"], ["snapshot", "verify", "--help"], ["help", "run"], ["-h"],
    ])
    func helpIsNotAnError(args: [String]) {
        let r = Invocation(args)
        #expect(r.status == 0, "stderr: \(r.stderr)")
        #expect(r.stdout.contains("USAGE:"))
        #expect(r.stderr.isEmpty)
    }

    @Test func version() {
        let r = Invocation(["--version"])
        #expect(r.status == 0)
        #expect(r.stdout == "0.1.0\n")
        #expect(r.stderr.isEmpty)
    }
}
