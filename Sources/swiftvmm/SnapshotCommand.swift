import ArgumentParser
import Launcher

/// `swiftvmm snapshot inspect|verify DIR`: look at snapshot directories (docs/snapshot-format.md).
struct SnapshotCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "snapshot",
        abstract: "Inspect and verify snapshot directories.",
        subcommands: [Inspect.self, Verify.self])

    /// No subcommand: an error, not the help screen.
    func run() throws {
        throw ValidationError("snapshot needs a command: inspect or verify (see swiftvmm snapshot --help)")
    }

    struct Inspect: LaunchingCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print a snapshot's header, sections and versions (any format version; checksums are not checked).")

        @Argument(help: "The snapshot directory.")
        var directory: String

        func launch(_ launcher: Launcher) -> Int32 { launcher.inspectSnapshot(directory: directory) }
    }

    struct Verify: LaunchingCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check every checksum of a snapshot: header, section table, payloads, memory.bin. Exit status 1 if any fails.")

        @Argument(help: "The snapshot directory.")
        var directory: String

        func launch(_ launcher: Launcher) -> Int32 { launcher.verifySnapshot(directory: directory) }
    }
}
