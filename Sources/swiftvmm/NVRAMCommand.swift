import ArgumentParser
import Launcher

/// `swiftvmm nvram inspect PATH`: look at a TPM state file (docs/tpm-state-format.md).
struct NVRAMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nvram",
        abstract: "Inspect the TPM state file of --tpm builtin,state=PATH.",
        subcommands: [Inspect.self, Exercise.self])

    /// No subcommand: an error, not the help screen.
    func run() throws {
        throw ValidationError("nvram needs a command: inspect (see swiftvmm nvram --help)")
    }

    struct Inspect: LaunchingCommand {
        static let configuration = CommandConfiguration(
            abstract: "List a TPM state file's entries: sizes, each copy's generation and checksum state, the copy in use. Exit status 1 if the file is not a state file or an entry has no good copy.")

        @Argument(help: "The TPM state file.")
        var path: String

        func launch(_ launcher: Launcher) -> Int32 { launcher.inspectNVRAM(path: path) }
    }

    /// Hidden, for the crash test: counts up in an NV index of a builtin TPM on PATH.
    struct Exercise: LaunchingCommand {
        static let configuration = CommandConfiguration(
            abstract: "Count up in an NV index of a builtin TPM with its state in PATH, printing each value once its write is durable (for crash tests).",
            shouldDisplay: false)

        @Argument(help: "The TPM state file.")
        var path: String

        @Flag(help: "Print the counter's value and exit.")
        var read = false

        func launch(_ launcher: Launcher) -> Int32 { launcher.exerciseNVRAM(path: path, readOnly: read) }
    }
}
