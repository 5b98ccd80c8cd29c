import ArgumentParser
import Launcher

/// `swiftvmm nvram inspect PATH`: look at a TPM state file (docs/tpm-state-format.md).
struct NVRAMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "nvram",
        abstract: "Inspect the TPM state file of --tpm builtin,state=PATH.",
        subcommands: [Inspect.self])

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
}
