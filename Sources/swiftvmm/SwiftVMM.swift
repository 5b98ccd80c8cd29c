import ArgumentParser
import Glibc
import Logging
import ACPI
import BootLoader
import Control
import QMP
import Devices
import Machine
import VMMSys

@main
struct SwiftVMM: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "swiftvmm",
        abstract: "A KVM micro-VMM for booting small Linux guests.",
        version: "0.1.0",
        subcommands: [Run.self, Restore.self, SnapshotCommand.self, HostInfo.self],
        defaultSubcommand: nil)

    /// Serves QMP before parsing the arguments in full (the parser costs a few milliseconds of CPU
    /// that a client waiting for the greeting would otherwise wait through), then runs the command.
    static func main() {
        processStart = monotonicNanoseconds()
        // A command that runs a VM takes SIGINT/SIGTERM/SIGHUP through the machine's signalfd: block
        // them before any thread starts (the QMP server's is next), so that every thread inherits
        // the mask and a signal that comes early waits for the run loop instead of killing us.
        if CommandLine.arguments.count > 1, ["run", "restore"].contains(CommandLine.arguments[1]) {
            setSignalsBlocked(Machine.stopSignals, true)
        }
        Monitor.prestart(arguments: CommandLine.arguments)
        // `restore` is parsed on its own: building the whole command tree first costs milliseconds
        // of the restore-to-running time.
        let args = CommandLine.arguments
        let direct = args.count > 1 && args[1] == "restore"
        do {
            var command = direct ? try Restore.parseAsRoot(Array(args.dropFirst(2))) : try parseAsRoot()
            try command.run()
        } catch {
            Monitor.removeSocketOnFailure()
            exit(reporting: error, as: direct ? Restore.self : SwiftVMM.self)
        }
    }

    /// No subcommand: an error, not the help screen.
    func run() throws {
        throw ValidationError("a command is needed: run, restore, snapshot or host-info (see swiftvmm --help)")
    }

    /// Ends the process for an error from parsing or running `type`: help and version requests
    /// print to stdout and exit 0, an `ExitCode` exits with its status, and every other error is
    /// one line on stderr (`swiftvmm: error: ...`, the parser's usage text left out) and status 1.
    static func exit(reporting error: Error, as type: ParsableCommand.Type) -> Never {
        let code = type.exitCode(for: error)
        let message = type.message(for: error)
        if code == .success || message.isEmpty { type.exit(withError: error) }
        fail(oneLine(message))
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

/// Sizes such as 256M, 1G, 512MiB or 4096K; a bare number means MiB (like QEMU's -m).
struct MemorySize: ExpressibleByArgument, Equatable, CustomStringConvertible {
    let bytes: UInt64

    init?(argument: String) {
        guard let parsed = Self.parse(argument) else { return nil }
        bytes = parsed
    }

    static func parse(_ text: String) -> UInt64? {
        var digits = Substring(text.trimmingCharacters(in: " "))
        var unit = ""
        while let last = digits.last, last.isLetter {
            unit = String(last).uppercased() + unit
            digits = digits.dropLast()
        }
        guard let value = UInt64(digits), value > 0 else { return nil }
        let shift: UInt64
        switch unit {
        case "": shift = 20
        case "K", "KB", "KIB": shift = 10
        case "M", "MB", "MIB": shift = 20
        case "G", "GB", "GIB": shift = 30
        case "T", "TB", "TIB": shift = 40
        default: return nil
        }
        let (product, overflow) = value.multipliedReportingOverflow(by: 1 << shift)
        return overflow ? nil : product
    }

    /// The size in the largest unit that divides it: 256M, 1G, 4097K (the help text shows the default so).
    var description: String {
        for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] as [(String, UInt64)]
        where bytes != 0 && bytes % (1 << shift) == 0 {
            return "\(bytes >> shift)\(unit)"
        }
        return "\(bytes) bytes"
    }

    var defaultValueDescription: String { description }
}

extension String {
    func trimmingCharacters(in set: Character) -> String {
        var s = Substring(self)
        while s.first == set { s = s.dropFirst() }
        while s.last == set { s = s.dropLast() }
        return String(s)
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Boot a Linux kernel (bzImage) in a new VM.",
        discussion: """
        The guest's serial console (COM1, ttyS0) is connected to standard output; standard input is \
        forwarded to it. The VM ends when the guest powers off or reboots (exit status 0), when the \
        VMM fails (1), when the guest reports a crash (3), or on SIGINT/SIGTERM (128 + signal).
        """)

    static let defaultCommandLine = "console=ttyS0 reboot=k panic=1 pci=off"

    @Option(help: "Path to the kernel (bzImage). Required unless --dump-acpi is given alone.")
    var kernel: String?

    @Option(help: "Path to an initial ramdisk (cpio archive, optionally compressed).")
    var initrd: String?

    @Option(help: "Kernel command line.")
    var cmdline: String = Run.defaultCommandLine

    @Option(help: "Guest memory size (K, M, G suffixes; a bare number means MiB).")
    var memory: MemorySize = MemorySize(argument: "256M")!

    @Option(help: "Number of vCPUs.")
    var cpus: Int = 1

    @Option(help: ArgumentHelp(
        "Write every generated ACPI table to DIR as NAME.dat (for `iasl -d`); without --kernel, exit after that.",
        valueName: "DIR"))
    var dumpACPI: String?

    @Option(help: ArgumentHelp(
        "Boot through firmware instead of loading the kernel directly: a flat image mapped below 4 GiB (firmware/), or 'builtin' for the one built in this checkout (firmware/build/swiftvmm-fw.bin).",
        valueName: "PATH|builtin"))
    var firmware: String?

    @Option(name: .customLong("fw-cfg"), help: ArgumentHelp(
        "Add a read-only fw_cfg file for the guest (repeatable): name=opt/NAME,file=PATH or name=opt/NAME,string=TEXT.",
        valueName: "name=...,file=...|string=..."), transform: FwCfgFileArgument.parse)
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

    @OptionGroup var vm: VMOptions


    func validate() throws {
        guard (1...MachineConfig.maximumCPUs).contains(cpus) else {
            throw ValidationError("--cpus must be between 1 and \(MachineConfig.maximumCPUs)")
        }
        guard memory.bytes >= 16 << 20 else {
            throw ValidationError("--memory must be at least 16M for a Linux guest")
        }
        guard memory.bytes % 4096 == 0 else { throw ValidationError("--memory must be a multiple of 4K") }
        guard vmgenid == "auto" || VMGenID.parseGUID(vmgenid) != nil else {
            throw ValidationError("--vmgenid must be a GUID like 12345678-9abc-def0-1234-56789abcdef0, or auto")
        }
        let names = fwCfg.map(\.name)
        guard Set(names).count == names.count else { throw ValidationError("--fw-cfg names must be unique") }
        guard !noACPI || cpus == 1 else { throw ValidationError("--no-acpi allows only one vCPU (--cpus 1)") }
        guard kernel != nil || dumpACPI != nil else { throw ValidationError("Missing expected argument '--kernel <kernel>'") }
    }

    func run() throws {
        bootstrapLogging(vm.logLevel)
        addInheritedDescriptors(vm.addFD)
        if let dir = dumpACPI {
            let tables: ACPITableSet
            do { tables = try PlatformTables.build(cpus: cpus) } catch { fail("\(error)") }
            dumpTables(tables, to: dir)
            if kernel == nil { return }
        }
        guard let kernel else { return }
        let host = HostVirtualization.probe(kvmPath: vm.kvmDevice)
        // The monitor serves before the machine exists, so a client is greeted within milliseconds.
        let monitor = Monitor.started(path: vm.qmp)
        let machine = makeMachine(kernel: kernel, host: host)
        if case .emulated(let reason) = host {
            warnEmulated(reason: reason, allow: vm.allowSlowKVM)
        }
        monitor.attach(machine)
        monitor.runToEnd(machine)
    }

    /// Reads and checks the kernel and initrd, then builds the machine. The file contents live only
    /// in this function: once they are in guest memory they are freed (they would otherwise count
    /// in the VMM's own memory for the whole run).
    func makeMachine(kernel: String, host: HostVirtualization) -> Machine {
        let kernelBytes = readFile(kernel, what: "kernel", limit: 512 << 20)
        let image: BzImage
        do { image = try BzImage(kernelBytes) } catch { fail("\(kernel): \(error)") }
        let initrdBytes = initrd.map { readFile($0, what: "initrd", limit: Int(min(memory.bytes, 4 << 30))) }
        if case .none(let reason) = host {
            fail("KVM is not available: \(reason). Without KVM, run guests in the nested test host: guest-tests/run-guest.sh (see README).")
        }
        var config = MachineConfig(memorySize: memory.bytes, cpus: cpus, console: stdoutConsole(),
                                   kvmPath: vm.kvmDevice, handleSignals: true, acpi: !noACPI)
        config.cpuModel = cpu
        config.processStart = processStart
        if vmgenid != "auto", let guid = VMGenID.parseGUID(vmgenid) { config.vmGenerationID = guid }
        config.fwCfgFiles = fwCfg.map { arg in
            switch arg.source {
            case .string(let text): return (arg.name, Array(text.utf8))
            case .file(let path): return (arg.name, readFile(path, what: "fw_cfg file", limit: FwCfgFileArgument.maxSize))
            }
        }
        let boot: BootSource
        if let firmware {
            let path = firmware == "builtin" ? builtinFirmwarePath() : firmware
            let rom = readFile(path, what: "firmware", limit: 16 << 20)
            boot = .firmware(rom: rom, kernel: image, initrd: initrdBytes, commandLine: cmdline)
        } else {
            boot = .linux(kernel: image, initrd: initrdBytes, commandLine: cmdline)
        }
        do {
            return try Machine(config, boot: boot)
        } catch { fail("\(error)") }
    }

    /// firmware/build/swiftvmm-fw.bin of the checkout this executable was built in ($SWIFTVMM_FIRMWARE
    /// overrides): the directories above the executable are searched.
    func builtinFirmwarePath() -> String {
        if let env = getenv("SWIFTVMM_FIRMWARE") { return String(cString: env) }
        var buf = [CChar](repeating: 0, count: 4096)
        let n = readlink("/proc/self/exe", &buf, buf.count - 1)
        var dir = String(decoding: buf.prefix(max(0, n)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        while let slash = dir.lastIndex(of: "/"), slash != dir.startIndex {
            dir = String(dir[..<slash])
            let candidate = dir + "/firmware/build/swiftvmm-fw.bin"
            if access(candidate, R_OK) == 0 { return candidate }
        }
        fail("no built-in firmware: build it with firmware/build.sh (or pass --firmware PATH)")
    }

    /// Writes each table as DIR/NAME.dat (creating DIR if needed) and lists them on stderr.
    func dumpTables(_ tables: ACPITableSet, to dir: String) {
        if mkdir(dir, 0o755) != 0 && errno != EEXIST {
            fail("cannot create \(dir): \(SysError.last("mkdir"))")
        }
        for (table, file) in zip(tables.tables, tables.dumpFileNames) {
            let path = dir + "/" + file
            do {
                let fd = try OwnedFD.open(path, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
                try table.bytes.withUnsafeBytes { try fd.writeAll($0) }
            } catch {
                fail("cannot write \(path): \(error)")
            }
        }
        printError("swiftvmm: wrote \(tables.tables.count) ACPI tables to \(dir) (\(tables.dumpFileNames.joined(separator: ", ")))")
    }

    /// Reads a host file through the fd sets, so `/dev/fdset/N` (from `--add-fd`) works anywhere a
    /// path does. Only a regular file is read: a FIFO, pipe, device or directory is refused (opened
    /// O_NONBLOCK, so that a FIFO without a writer does not block the open), and so is a file over
    /// `limit` bytes, from its size, before anything is read.
    func readFile(_ path: String, what: String, limit: Int) -> [UInt8] {
        do throws(SysError) {
            let file = try Run.fdSets.openHostFile(path: path, flags: O_RDONLY | O_NONBLOCK)
            var st = stat()
            guard fstat(file.rawValue, &st) == 0 else { throw SysError.last("fstat \(path)") }
            guard st.st_mode & S_IFMT == S_IFREG else { fail("the \(what) \(path) is not a regular file") }
            return try readAllBytes(fd: file.rawValue, limit: limit)
        } catch where error.errno == EFBIG {
            fail("the \(what) \(path) is larger than \(limit >> 20) MiB")
        } catch {
            fail("cannot read the \(what) \(path): \(error)")
        }
    }

    /// The process's fd sets: `--add-fd` fills them at start-up, QMP's add-fd/remove-fd later.
    static let fdSets = FdSets()
}

/// Hands the inherited descriptors of `--add-fd` to their fd sets (like QEMU's -add-fd). Each set
/// gets its own duplicate (close-on-exec), so one descriptor may go into several sets; the inherited
/// numbers are closed once every option has been handled.
func addInheritedDescriptors(_ args: [AddFDArgument]) {
    for arg in args {
        guard fcntl(arg.fd, F_GETFD) >= 0 else { fail("--add-fd: descriptor \(arg.fd) is not open") }
        let dup = fcntl(arg.fd, F_DUPFD_CLOEXEC, 3)
        guard dup >= 0 else { fail("--add-fd: cannot duplicate descriptor \(arg.fd): \(SysError.last("fcntl"))") }
        do { _ = try Run.fdSets.add(takingOwnershipOf: dup, fdSetID: arg.set, opaque: arg.opaque) } catch {
            fail("--add-fd fd=\(arg.fd),set=\(arg.set): \(error.desc)")
        }
    }
    for fd in Set(args.map(\.fd)) { _ = Glibc.close(fd) }
}

extension Logger.Level: @retroactive ExpressibleByArgument {}
extension CPUModel: ExpressibleByArgument {}

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

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: Logger.Level = .warning

    @Flag(help: "Run the guest even when /dev/kvm has no hardware virtualization behind it (guests run emulated, extremely slowly).")
    var allowSlowKVM = false

    @Option(help: .hidden)
    var kvmDevice: String = "/dev/kvm"

    /// The longest path a Unix socket address holds (sun_path is 108 bytes with its NUL).
    static let maxSocketPathBytes = 107

    func validate() throws {
        if let qmp {
            guard !qmp.isEmpty else { throw ValidationError("--qmp needs a socket path") }
            guard qmp.utf8.count <= Self.maxSocketPathBytes else {
                throw ValidationError("the --qmp path is \(qmp.utf8.count) bytes, longer than the \(Self.maxSocketPathBytes)-byte limit of Unix socket addresses")
            }
        }
    }
}

/// `--add-fd fd=N,set=SET[,opaque=TEXT]`.
struct AddFDArgument: ExpressibleByArgument {
    let fd: Int32
    let set: Int64
    let opaque: String?

    init?(argument: String) {
        var fd: Int32?, set: Int64?, opaque: String?
        for part in argument.split(separator: ",", maxSplits: 2) {
            let kv = part.split(separator: "=", maxSplits: 1).map(String.init)
            guard kv.count == 2 else { return nil }
            switch kv[0] {
            case "fd": fd = Int32(kv[1])
            case "set": set = Int64(kv[1])
            case "opaque": opaque = kv[1]
            default: return nil
            }
        }
        guard let fd, fd > 2, let set, set >= 0 else { return nil }
        self.fd = fd
        self.set = set
        self.opaque = opaque
    }
}

/// `--fw-cfg name=opt/NAME,file=PATH` or `--fw-cfg name=opt/NAME,string=TEXT` (QEMU's syntax).
/// Parsed by `parse` (the option's transform), so that its error says what is wrong.
struct FwCfgFileArgument {
    enum Source { case file(String), string(String) }
    static let maxSize = 16 << 20
    let name: String
    let source: Source

    init(name: String, source: Source) {
        self.name = name
        self.source = source
    }

    /// Splits at the first two "key=" fields; a string value may itself contain commas. A file path
    /// may too, but not a second source (`file=A,string=B` or `file=A,file=B`): QEMU takes one of
    /// file= and string=, and such a value is refused rather than read as a file named `A,string=B`.
    static func parse(_ text: String) throws -> FwCfgFileArgument {
        guard text.hasPrefix("name=") else { throw ValidationError("--fw-cfg must start with name=") }
        let rest = text.dropFirst(5)
        guard let comma = rest.firstIndex(of: ",") else { throw ValidationError("--fw-cfg needs file=PATH or string=TEXT after the name") }
        let name = String(rest[..<comma])
        let value = rest[rest.index(after: comma)...]
        guard name.hasPrefix("opt/"), name.utf8.count <= 55, !name.contains("\0") else {
            throw ValidationError("--fw-cfg names must start with opt/ and be at most 55 bytes (got \(name))")
        }
        if value.hasPrefix("file=") {
            let path = String(value.dropFirst(5))
            guard !path.contains(",string="), !path.contains(",file=") else {
                throw ValidationError("--fw-cfg takes one of file= or string=, not both")
            }
            return FwCfgFileArgument(name: name, source: .file(path))
        }
        if value.hasPrefix("string=") { return FwCfgFileArgument(name: name, source: .string(String(value.dropFirst(7)))) }
        throw ValidationError("--fw-cfg needs file=PATH or string=TEXT after the name")
    }
}

struct HostInfo: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "host-info",
        abstract: "Report whether this host's KVM runs guests at hardware speed.")

    func run() throws {
        switch HostVirtualization.probe() {
        case .hardware:
            print("hardware: /dev/kvm uses hardware virtualization; guests run at native speed")
        case .emulated(let reason):
            print("emulated: \(reason); guests run extremely slowly (use guest-tests/testhost.sh)")
        case .none(let reason):
            print("none: \(reason)")
            throw ExitCode(2)
        }
    }
}

/// When main() began (CLOCK_MONOTONIC, ns): start-up figures are measured from here.
nonisolated(unsafe) var processStart: UInt64 = 0

/// Sets up stderr logging at `level`.
func bootstrapLogging(_ level: Logger.Level) {
    LoggingSystem.bootstrap { label in
        var handler = StreamLogHandler.standardError(label: label)
        handler.logLevel = level
        return handler
    }
}

/// Prints one line to stderr and exits with status 1 (removing the QMP socket if one was created).
func fail(_ message: String) -> Never {
    printError("swiftvmm: error: \(message)")
    Monitor.removeSocketOnFailure()
    Glibc.exit(1)
}

/// The guest console on standard output, written by its own thread (a slow reader never stalls a vCPU).
func stdoutConsole() -> FileDescriptorConsole {
    do { return try FileDescriptorConsole(fd: 1) } catch { fail("cannot start the console writer: \(error)") }
}

/// Warns that /dev/kvm emulates guest code, and refuses to go on unless `allow`.
func warnEmulated(reason: String, allow: Bool) {
    printError("""
    swiftvmm: warning: no hardware virtualization: \(reason). Guest code is emulated, so a Linux \
    guest would take many minutes to boot. Run guests inside the nested test host instead: \
    guest-tests/run-guest.sh (see README, "The test host").
    """)
    if !allow {
        fail("refusing to boot a Linux guest on emulated KVM; pass --allow-slow-kvm to try anyway")
    }
}

/// The QMP monitor of one VM (when --qmp is given) and the run of that VM to its end.
struct Monitor {
    let server: QMPServer?
    let deferred: DeferredCommands?
    let relay: EventRelay

    nonisolated(unsafe) private static var socketPath: String?
    nonisolated(unsafe) private static var early: Monitor?

    /// Starts the monitor straight from the raw arguments when they ask for one (`run|restore ...
    /// --qmp PATH` or `--qmp=PATH`). `started(path:)` later checks it against the parsed option.
    static func prestart(arguments: [String]) {
        guard arguments.count > 2, ["run", "restore"].contains(arguments[1]) else { return }
        var path: String?
        var i = 2
        while i < arguments.count {
            let a = arguments[i]
            if a == "--" { break }
            if a == "--qmp", i + 1 < arguments.count { path = arguments[i + 1]; i += 1 }
            else if a.hasPrefix("--qmp=") { path = String(a.dropFirst(6)) }
            i += 1
        }
        // An empty or overlong path is left to the argument check, which reports it.
        guard let path, !path.isEmpty, path.utf8.count <= VMOptions.maxSocketPathBytes, !path.hasPrefix("-") else { return }
        // Quietly: if this fails, the start after parsing reports it (or the arguments' own error).
        early = try? serve(path)
    }

    /// The monitor for the parsed `--qmp` value: the one `prestart` began when it serves that path.
    static func started(path: String?) -> Monitor {
        if let early {
            if early.server?.path == path { return early }
            early.server?.stop()
            Monitor.early = nil
        }
        return start(path: path)
    }

    /// Starts serving QMP at `path` (nil: no monitor). Machine commands wait until `attach`.
    static func start(path: String?) -> Monitor {
        let relay = EventRelay()
        guard let path else { return Monitor(server: nil, deferred: nil, relay: relay) }
        do { return try serve(path) } catch { fail("cannot serve QMP on \(path): \(error)") }
    }

    private static func serve(_ path: String) throws(SysError) -> Monitor {
        let relay = EventRelay()
        let deferred = DeferredCommands()
        let s = try QMPServer(path: path, handler: deferred, fdSets: Run.fdSets)
        relay.connect(s)
        try s.start()
        socketPath = path
        return Monitor(server: s, deferred: deferred, relay: relay)
    }

    static func removeSocketOnFailure() {
        if let socketPath { unlink(socketPath) }
    }

    func attach(_ machine: Machine) {
        let relay = self.relay
        deferred?.connect(MachineCommands(machine: machine) { relay.emit($0, $1) })
    }

    /// Runs `machine` until it ends, reports how, and exits the process with its status.
    func runToEnd(_ machine: Machine) -> Never {
        let terminal = TerminalInput(serial: machine.serial)
        let exit = machine.run()
        terminal.restore()
        if let server {
            server.emit(event: "SHUTDOWN", data: exit.shutdownEventData)
            server.stop()
        }
        if exit.exitStatus == 0 {
            Logger(label: "swiftvmm").info("\(exit.summary)")
        } else {
            printError("swiftvmm: \(exit.summary)")
        }
        Glibc.exit(exit.exitStatus)
    }
}
