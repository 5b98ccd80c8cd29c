import ArgumentParser
import Glibc
import Snapshot

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

    struct Inspect: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Print a snapshot's header, sections and versions (any format version; checksums are not checked).")

        @Argument(help: "The snapshot directory.")
        var directory: String

        func run() throws {
            requireDirectory(directory)
            print(SnapshotInspector.describe(directory: directory), terminator: "")
        }
    }

    struct Verify: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Check every checksum of a snapshot: header, section table, payloads, memory.bin. Exit status 1 if any fails.")

        @Argument(help: "The snapshot directory.")
        var directory: String

        func run() throws {
            requireDirectory(directory)
            let report = SnapshotReader.verify(directory: directory)
            print(report)
            if !report.ok { throw ExitCode(1) }
        }
    }
}

private func requireDirectory(_ path: String) {
    var st = stat()
    guard stat(path, &st) == 0 else { fail("\(path): \(String(cString: strerror(errno)))") }
    guard st.st_mode & S_IFMT == S_IFDIR else { fail("\(path): not a directory (a snapshot is a directory)") }
}
