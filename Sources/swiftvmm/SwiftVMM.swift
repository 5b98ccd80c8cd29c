import ArgumentParser
import Logging
import Launcher
import Sandbox
import Machine

/// The command line: ArgumentParser's commands, which map their arguments to the launcher's
/// configurations (`RunConfig`, `RestoreConfig`); the launcher does the work and returns the exit
/// status. `main.swift` exits with it.
struct SwiftVMM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "swiftvmm",
        abstract: "A KVM micro-VMM for booting small Linux guests.",
        version: "0.1.0",
        subcommands: [Run.self, Restore.self, SnapshotCommand.self, NVRAMCommand.self, HostInfo.self],
        defaultSubcommand: nil)

    /// No subcommand: an error, not the help screen.
    func run() throws {
        throw ValidationError("a command is needed: run, restore, snapshot, nvram or host-info (see swiftvmm --help)")
    }

    /// Parses `arguments` (without the program name), runs the command and returns the exit status.
    static func main(arguments: [String], processStart: UInt64) -> Int32 {
        let launcher = Launcher(processStart: processStart)
        var command: ParsableCommand
        do { command = try parseCommand(arguments) } catch { return status(for: error, launcher) }
        if let launching = command as? LaunchingCommand { return launching.launch(launcher) }
        do { try command.run() } catch { return status(for: error, launcher) }
        return 0
    }

    /// `run` and `restore` are first parsed with their own command alone: building the whole command
    /// tree costs milliseconds of CPU before the QMP greeting (and of restore → running). Whatever
    /// that parse does not accept (an error, --help) is parsed again by the whole tree, so that
    /// messages and help are the tree's.
    static func parseCommand(_ arguments: [String]) throws -> ParsableCommand {
        let rest = Array(arguments.dropFirst())
        switch arguments.first {
        // (A help request comes back as ArgumentParser's HelpCommand: it too goes to the whole tree.)
        case "run": if let command = try? Run.parseAsRoot(rest) as? Run { return command }
        case "restore": if let command = try? Restore.parseAsRoot(rest) as? Restore { return command }
        default: break
        }
        return try parseAsRoot(arguments)
    }

    /// The status for an error from parsing or running a command: help and version requests print to
    /// stdout with status 0, an `ExitCode` is its status, and every other error is the launcher's
    /// one-line failure (`swiftvmm: error: ...`, the parser's usage text left out, status 1).
    static func status(for error: Error, _ launcher: Launcher) -> Int32 {
        let code = exitCode(for: error)
        if code == .success {
            let text = fullMessage(for: error)
            if !text.isEmpty { print(text) }
            return 0
        }
        let message = message(for: error)
        if message.isEmpty { return code.rawValue }
        return launcher.failure(oneLine(message))
    }

    /// The parser's message on one line: a value list ("Please provide one of the following:" and
    /// "  - item" lines) becomes a comma-separated list.
    static func oneLine(_ message: String) -> String {
        var text = ""
        var listing = false
        for line in message.split(separator: "\n") {
            let trimmed = line.drop { $0 == " " }
            if trimmed.hasPrefix("- ") {
                text += (listing ? ", " : " ") + trimmed.dropFirst(2)
                listing = true
            } else {
                text += (text.isEmpty ? "" : " ") + trimmed
                listing = false
            }
        }
        return text
    }
}

/// Set on `run` and `restore`: ArgumentParser then skips, when one of them is parsed alone (as the
/// root), its check for `--generate-completion-script`, which builds and tries two more parsers and
/// costs a third of the parse. It names the root only in help and completion output of the command
/// parsed alone, which is never shown: help and every error go through the whole tree (`parseCommand`).
let fastParseSuperCommand = "swiftvmm"

/// A command that the launcher runs: it returns the exit status instead of throwing.
protocol LaunchingCommand: ParsableCommand {
    func launch(_ launcher: Launcher) -> Int32
}

extension LaunchingCommand {
    /// Not called: `SwiftVMM.main` calls `launch`.
    func run() throws { throw ValidationError("internal error: \(Self.self) runs through the launcher") }
}

/// A configuration check as a parser validation error (a usage error, reported in one line).
func usageError(_ check: () throws(LaunchError) -> Void) throws {
    do { try check() } catch { throw ValidationError(error.message) }
}

extension MemorySize: ExpressibleByArgument {}
extension AddFDArgument: ExpressibleByArgument {}
extension Logger.Level: @retroactive ExpressibleByArgument {}
extension CPUModel: ExpressibleByArgument {}
extension RunConfig.ConsoleDevice: ExpressibleByArgument {}

struct Run: LaunchingCommand {
    static let configuration = CommandConfiguration(
        _superCommandName: fastParseSuperCommand,
        abstract: "Boot a Linux kernel (bzImage) in a new VM.",
        discussion: """
        The guest's serial console (COM1, ttyS0) is connected to standard output; standard input is \
        forwarded to it. The VM ends when the guest powers off or reboots (exit status 0), when the \
        VMM fails (1), when the guest reports a crash (3), or on SIGINT/SIGTERM (128 + signal).
        """)

    @Option(help: "Path to the kernel (bzImage). Required unless --dump-acpi or --dump-dtb is given alone.")
    var kernel: String?

    @Option(help: "Path to an initial ramdisk (cpio archive, optionally compressed).")
    var initrd: String?

    @Option(help: "Kernel command line.")
    var cmdline: String = RunConfig.defaultCommandLine

    @Option(help: "Guest memory size (K, M, G suffixes; a bare number means MiB).")
    var memory: MemorySize = MemorySize(bytes: 256 << 20)

    @Option(help: "Number of vCPUs.")
    var cpus: Int = 1

    @Option(help: ArgumentHelp(
        "Write every generated ACPI table to DIR as NAME.dat (for `iasl -d`); without --kernel, exit after that.",
        valueName: "DIR"))
    var dumpACPI: String?

    @Option(help: ArgumentHelp(
        "Write the machine (memory, CPUs, interrupt controllers, devices with their addresses and interrupts, the command line and, with --kernel, the initrd's place) as a flattened device tree to FILE (for `dtc -I dtb -O dts`) and exit without booting.",
        valueName: "FILE"))
    var dumpDTB: String?

    @Flag(help: "Hand the kernel the machine's device tree (what --dump-dtb writes) as a SETUP_DTB entry of boot_params' setup_data, for kernels built with CONFIG_OF; direct boot only.")
    var dtb = false

    @Option(help: ArgumentHelp(
        "Boot through firmware instead of loading the kernel directly: a flat image mapped below 4 GiB (firmware/), or 'builtin' for the one built in this checkout (firmware/build/swiftvmm-fw.bin).",
        valueName: "PATH|builtin"))
    var firmware: String?

    @Option(name: .customLong("fw-cfg"), help: ArgumentHelp(
        "Add a read-only fw_cfg file for the guest (repeatable): name=opt/NAME,file=PATH or name=opt/NAME,string=TEXT.",
        valueName: "name=...,file=...|string=..."), transform: { text in try FwCfgFileArgument.parse(text) })
    var fwCfg: [FwCfgFileArgument] = []

    @Option(help: ArgumentHelp(
        "The VM generation ID the guest starts with: a GUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx) or 'auto' for a random one.",
        valueName: "GUID|auto"))
    var vmgenid: String = "auto"

    @Flag(help: "No ACPI tables (like QEMU's -no-acpi): one vCPU, no S5 power-off (the guest resets instead), no power button.")
    var noACPI = false

    @Option(help: ArgumentHelp(
        "The CPU the guest sees: 'host' (everything this host's KVM offers) or 'baseline' (x86-64-v2, no AVX or PKU): snapshots of a baseline guest restore on any x86-64 KVM host.",
        valueName: "host|baseline"))
    var cpu: CPUModel = .host

    @Option(help: ArgumentHelp(
        "The guest console the host's input goes to: 'serial' (COM1, ttyS0) or 'virtio' (a virtio console, hvc0: boot the guest with console=hvc0 and its virtio_console driver). The guest's output on either reaches standard output.",
        valueName: "serial|virtio"))
    var console: RunConfig.ConsoleDevice = .serial

    @Flag(help: "No virtio-rng device (by default the guest gets one, fed from the host's getrandom, when it has ACPI).")
    var noRNG = false

    @OptionGroup var vm: VMOptions

    var config: RunConfig {
        var c = RunConfig(kernel: kernel)
        c.initrd = initrd
        c.commandLine = cmdline
        c.memory = memory
        c.cpus = cpus
        c.dumpACPI = dumpACPI
        c.dumpDTB = dumpDTB
        c.deviceTree = dtb
        c.firmware = firmware.map { $0 == "builtin" ? .builtin : .path($0) }
        c.fwCfgFiles = fwCfg
        c.vmGenerationID = vmgenid
        c.acpi = !noACPI
        c.rng = !noRNG && !noACPI
        c.console = console
        c.cpuModel = cpu
        c.process = vm.config
        return c
    }

    func validate() throws { try usageError(config.validate) }

    func launch(_ launcher: Launcher) -> Int32 { launcher.run(config) }
}

/// The options of every command that runs a VM (`run`, `restore`).
struct VMOptions: ParsableArguments {
    @Option(help: ArgumentHelp(
        "Serve QEMU's QMP protocol on a Unix socket at PATH (created mode 0600; clients in turn).",
        valueName: "PATH"))
    var qmp: String?

    @Option(help: ArgumentHelp(
        "Put an inherited descriptor into an fd set (repeatable, like QEMU's -add-fd); /dev/fdset/SET then works as a path.",
        valueName: "fd=N,set=SET[,opaque=TEXT]"))
    var addFD: [AddFDArgument] = []

    @Option(help: ArgumentHelp(
        "Give the guest a TPM 2.0 (TIS at 0xFED40000): libtpms in this process with its state in the file PATH (created if missing), or an already running `swtpm socket --tpm2 --ctrl type=unixio,path=PATH`.",
        valueName: "builtin,state=PATH|swtpm,socket=PATH"),
        transform: { text in
            do throws(LaunchError) { return try TPMArgument.parse(text) } catch { throw ValidationError(error.message) }
        })
    var tpm: TPMArgument?

    @Option(help: ArgumentHelp(
        "A raw disk image as a virtio-blk drive (repeatable: /dev/vda, /dev/vdb, ...); locked while the VM runs. PATH may be /dev/fdset/N; NAME is the drive's serial in the guest (at most 20 bytes).",
        valueName: "file=PATH[,readonly=on|off][,id=NAME]"),
        transform: { text in
            do throws(LaunchError) { return try DriveArgument.parse(text) } catch { throw ValidationError(error.message) }
        })
    var drive: [DriveArgument] = []

    @Option(help: ArgumentHelp(
        "A virtio-net device on an existing tap device (or a tap descriptor in fd set N; repeatable). Without mac=, the address is derived from the tap's name. No offloads.",
        valueName: "tap=NAME[,mac=MAC]|fd=N[,mac=MAC]"),
        transform: { text in
            do throws(LaunchError) { return try NetArgument.parse(text) } catch { throw ValidationError(error.message) }
        })
    var net: [NetArgument] = []

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .warning

    @Flag(help: "Run the guest even when /dev/kvm has no hardware virtualization behind it (guests run emulated, extremely slowly).")
    var allowSlowKVM = false

    @Option(help: ArgumentHelp(
        "Seccomp filters on every thread (on: a forbidden system call stops swiftvmm with a line naming it; log: the kernel only logs it; off: none, for debugging).",
        valueName: "on|off|log"))
    var seccomp: SeccompMode = .on

    @Option(help: ArgumentHelp(
        "Core files of this process: off (none), vmm (as the shell's limit allows, without guest memory), all (with guest memory).",
        valueName: "off|vmm|all"))
    var coreDump: CoreDumpMode = .off

    @Option(help: ArgumentHelp(
        "The descriptor limit once the VM is set up (default: what it holds then plus \(VMProcessConfig.openFilesMargin), for QMP clients, add-fd and snapshots).",
        valueName: "N"))
    var maxOpenFiles: UInt64?

    @Option(help: .hidden)
    var kvmDevice: String = "/dev/kvm"

    var config: VMProcessConfig {
        var c = VMProcessConfig(qmp: qmp)
        c.addFD = addFD
        c.logLevel = logLevel
        c.allowSlowKVM = allowSlowKVM
        c.kvmDevice = kvmDevice
        c.seccomp = seccomp
        c.coreDump = coreDump
        c.maxOpenFiles = maxOpenFiles
        c.tpm = tpm
        c.drives = drive
        c.nets = net
        return c
    }
}

struct HostInfo: LaunchingCommand {
    static let configuration = CommandConfiguration(
        commandName: "host-info",
        abstract: "Report whether this host's KVM runs guests at hardware speed.")

    func launch(_ launcher: Launcher) -> Int32 { launcher.hostInfo() }
}

extension SeccompMode: ExpressibleByArgument {}
extension CoreDumpMode: ExpressibleByArgument {}
