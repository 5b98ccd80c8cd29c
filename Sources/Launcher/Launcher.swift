import Glibc
import Logging
import Sandbox
import ACPI
import Backends
import BootLoader
import Control
import Devices
import Machine
import QMP
import Snapshot
import VMMSys

/// Runs the commands of `swiftvmm` from their validated configurations. Every function returns the
/// process's exit status; none exits. An error is reported in one place, `failure(_:)`: one line
/// `swiftvmm: error: MESSAGE` and status 1 (after the QMP socket, if one was created, is removed).
///
/// The launcher holds the process's state: when it started, its fd sets, and the QMP monitor of
/// the VM it runs. One launcher runs one command.
public final class Launcher {
    /// When the process started (CLOCK_MONOTONIC, ns): start-up figures are measured from here.
    public let processStart: UInt64
    /// The process's fd sets: `--add-fd` fills them at start-up, QMP's add-fd/remove-fd later.
    public let fdSets = FdSets()
    private let errorOutput: (String) -> Void
    private let ownsProcess: Bool
    private var monitor: Monitor?
    /// The machine that ran, kept until the process exits (its threads may still hold parts of it).
    private var machine: Machine?
    /// The TPM's thread and engine (`--tpm`), stopped when the VM ends or the launch fails.
    private var tpm: TPMWorker?
    /// A TPM state file this launch created, removed again if the launch fails before the guest ran.
    private var createdTPMState: String?

    /// `errorOutput` receives every line for stderr (default: stderr). With `ownsProcess` false
    /// (tests running a launcher in their own process), logging is not bootstrapped (once per process)
    /// and the stop signals are left unblocked.
    public init(processStart: UInt64 = monotonicNanoseconds(), errorOutput: @escaping (String) -> Void = { printError($0) },
                ownsProcess: Bool = true) {
        self.processStart = processStart
        self.errorOutput = errorOutput
        self.ownsProcess = ownsProcess
    }

    /// The one place an error becomes `swiftvmm: error: MESSAGE` on stderr and status 1. A QMP
    /// monitor that was started is stopped and its socket removed; commands waiting for the machine
    /// get an error reply.
    public func failure(_ error: any Error) -> Int32 {
        stopTPM()
        if let path = createdTPMState {
            try? FileSystem.removeFile(path)
            createdTPMState = nil
        }
        if let monitor {
            monitor.abandon(reason: "\(error)")
            self.monitor = nil
        }
        errorOutput("swiftvmm: error: \(error)")
        return 1
    }

    /// Same, for a message.
    public func failure(_ message: String) -> Int32 { failure(LaunchError(message)) }

    /// The guest console on standard output, written by its own thread (a slow reader never stalls
    /// a vCPU).
    static func stdoutConsole() throws(LaunchError) -> FileDescriptorConsole {
        do { return try FileDescriptorConsole(fd: 1) } catch { throw LaunchError("cannot start the console writer: \(error)") }
    }

    // MARK: run

    /// `swiftvmm run`: writes the ACPI tables if asked, then boots the kernel and runs the VM to its
    /// end. Returns the VM's exit status (0 powered off or reset, 3 guest crash, 128+N signal), or 1.
    public func run(_ config: RunConfig) -> Int32 {
        do { return try runThrowing(config) } catch { return failure(error) }
    }

    private func runThrowing(_ config: RunConfig) throws(LaunchError) -> Int32 {
        try config.validate()
        try prepareProcess(config.process)
        try addInheritedDescriptors(config.process.addFD)
        // The virtio devices a machine of this configuration has, in order, for its descriptions.
        let virtio = config.process.drives.map { _ in "blk" } + config.process.nets.map { _ in "net" } + (config.rng && config.acpi ? ["rng"] : [])
            + (config.console == .virtio ? ["con"] : [])
        if let dir = config.dumpACPI {
            let tables: ACPITableSet
            do { tables = try PlatformTables.build(cpus: config.cpus, tpm: config.process.tpm != nil, virtio: virtio) } catch { throw LaunchError("\(error)") }
            try dumpTables(tables, to: dir)
        }
        if let path = config.dumpDTB {
            try dumpDeviceTree(config, virtio: virtio, to: path)
            return 0
        }
        guard let kernel = config.kernel else { return 0 }
        // The monitor serves before the machine exists, so a client is greeted within milliseconds.
        let monitor = try startMonitor(config.process.qmp)
        let host = HostVirtualization.probe(kvmPath: config.process.kvmDevice)
        let machine = try makeMachine(config, kernel: kernel, host: host)
        if case .emulated(let reason) = host {
            try warnEmulated(reason: reason, allow: config.process.allowSlowKVM)
        }
        try limitResources(machine, config.process)
        monitor.attach(machine)
        return runToEnd(machine, monitor: monitor)
    }

    /// Once the machine is set up: guest memory into core files only with `--core-dump all`, and
    /// no descriptor numbers beyond what the process holds now plus a margin (or `--max-open-files`).
    private func limitResources(_ machine: Machine, _ config: VMProcessConfig) throws(LaunchError) {
        guard ownsProcess else { return }
        if config.coreDump == .all { for region in machine.memory.regions { region.includeInCoreDumps() } }
        let held = UInt64(max(0, ResourceLimits.highestOpenDescriptor() + 1))
        let limit: UInt64
        if let asked = config.maxOpenFiles {
            guard asked >= held + 16 else {
                throw LaunchError("--max-open-files \(asked) is too low: swiftvmm already uses descriptors up to \(held - 1) and needs 16 more")
            }
            limit = asked
        } else {
            limit = held + VMProcessConfig.openFilesMargin
        }
        do { try ResourceLimits.limitOpenFiles(to: limit) } catch { throw LaunchError("cannot limit open files: \(error)") }
    }

    /// Reads and checks the kernel and initrd, then builds the machine. The file contents live only
    /// in this function: once they are in guest memory they are freed (they would otherwise count
    /// in the VMM's own memory for the whole run).
    private func makeMachine(_ config: RunConfig, kernel: String, host: HostVirtualization) throws(LaunchError) -> Machine {
        let kernelBytes = try readFile(kernel, what: "kernel", limit: 512 << 20)
        let image: BzImage
        do { image = try BzImage(kernelBytes) } catch { throw LaunchError("\(kernel): \(error)") }
        let initrdBytes = try config.initrd.map { path throws(LaunchError) in
            try readFile(path, what: "initrd", limit: Int(min(config.memory.bytes, 4 << 30)))
        }
        let drives = try openDrives(config.process.drives)
        let nets = try openNets(config.process.nets)
        let tpm = try startTPM(config.process.tpm)
        if case .none(let reason) = host { throw Self.noKVM(reason) }
        var machineConfig = MachineConfig(memorySize: config.memory.bytes, cpus: config.cpus, console: try Self.stdoutConsole(),
                                          kvmPath: config.process.kvmDevice, handleSignals: ownsProcess, acpi: config.acpi)
        machineConfig.cpuModel = config.cpuModel
        machineConfig.deviceTree = config.deviceTree
        machineConfig.processStart = processStart
        machineConfig.tpm = tpm
        machineConfig.virtio = drives.map { .block(store: $0.store, id: $0.id) } + nets.map { .net(backend: $0.backend, mac: $0.mac) }
            + (config.rng && config.acpi ? [.rng] : [])
            + (config.console == .virtio ? [.console] : [])
        if let guid = VMGenID.parseGUID(config.vmGenerationID) { machineConfig.vmGenerationID = guid }
        var files: [(name: String, data: [UInt8])] = []
        for file in config.fwCfgFiles {
            switch file.source {
            case .string(let text): files.append((file.name, Array(text.utf8)))
            case .file(let path): files.append((file.name, try readFile(path, what: "fw_cfg file", limit: FwCfgFileArgument.maxSize)))
            }
        }
        machineConfig.fwCfgFiles = files
        let boot: BootSource
        switch config.firmware {
        case .some(let firmware):
            let path: String
            switch firmware {
            case .builtin: path = try Self.builtinFirmwarePath()
            case .path(let p): path = p
            }
            let rom = try readFile(path, what: "firmware", limit: 16 << 20)
            boot = .firmware(rom: rom, kernel: image, initrd: initrdBytes, commandLine: config.commandLine)
        case .none:
            boot = .linux(kernel: image, initrd: initrdBytes, commandLine: config.commandLine)
        }
        do { return try Machine(machineConfig, boot: boot) } catch { throw LaunchError("\(error)") }
    }

    // MARK: restore

    /// `swiftvmm restore DIR`: continues a snapshot and runs it to its end; the exit status is as for `run`.
    public func restore(_ config: RestoreConfig) -> Int32 {
        do { return try restoreThrowing(config) } catch { return failure(error) }
    }

    private func restoreThrowing(_ config: RestoreConfig) throws(LaunchError) -> Int32 {
        try config.validate()
        try prepareProcess(config.process)
        try addInheritedDescriptors(config.process.addFD)
        let monitor = try startMonitor(config.process.qmp)
        let host = HostVirtualization.probe(kvmPath: config.process.kvmDevice)
        if case .none(let reason) = host { throw Self.noKVM(reason) }
        let generationID: RestoreOptions.GenerationID
        switch config.vmGenerationID {
        case "auto": generationID = .new(VMGenID.randomGUID())
        case "keep": generationID = .keep
        default:
            guard let guid = VMGenID.parseGUID(config.vmGenerationID) else { throw LaunchError("--vmgenid: not a GUID") }
            generationID = .new(guid)
        }
        var options = RestoreOptions(console: try Self.stdoutConsole(), generationID: generationID)
        options.kvmPath = config.process.kvmDevice
        options.clock = RestoreOptions.ClockMode(rawValue: config.clock) ?? .saved
        options.workingSet = config.workingSet
        options.handleSignals = ownsProcess
        options.processStart = processStart
        options.drives = try openDrives(config.process.drives).map { ($0.store, $0.id) }
        options.nets = try openNets(config.process.nets).map(\.backend)
        options.tpm = try startTPM(config.process.tpm, forRestore: true)
        options.inMemoryTPM = { () throws(TPMStateError) -> any TPMBackend in try Launcher.inMemoryTPM() }
        let machine: Machine
        do { machine = try Machine.restore(from: config.directory, options: options) } catch {
            throw LaunchError("cannot restore \(config.directory): \(error)")
        }
        // A TPM made for the restore (its state in memory only) is stopped with the VM like any other.
        if tpm == nil, let made = machine.config.tpm as? TPMWorker { tpm = made }
        if case .emulated(let reason) = host {
            try warnEmulated(reason: reason, allow: config.process.allowSlowKVM)
        }
        if config.paused { machine.pause() }
        try limitResources(machine, config.process)
        monitor.attach(machine)
        return runToEnd(machine, monitor: monitor)
    }

    // MARK: snapshot inspect / verify, host-info

    /// `swiftvmm snapshot inspect DIR`: the snapshot's header, sections and versions on stdout.
    public func inspectSnapshot(directory: String) -> Int32 {
        do throws(LaunchError) {
            try Self.requireDirectory(directory)
            print(SnapshotInspector.describe(directory: directory), terminator: "")
            return 0
        } catch { return failure(error) }
    }

    /// `swiftvmm snapshot verify DIR`: every checksum checked, the report on stdout; status 1 if any fails.
    public func verifySnapshot(directory: String) -> Int32 {
        do throws(LaunchError) {
            try Self.requireDirectory(directory)
            let report = SnapshotReader.verify(directory: directory)
            print(report)
            return report.ok ? 0 : 1
        } catch { return failure(error) }
    }

    /// `swiftvmm nvram inspect PATH`: a TPM state file's entries on stdout; status 1 if it is not
    /// one or an entry has no good copy.
    public func inspectNVRAM(path: String) -> Int32 {
        let (text, ok) = TPMStateStore.inspect(path: path)
        print(text, terminator: "")
        return ok ? 0 : 1
    }

    /// `swiftvmm nvram exercise PATH [--read]` (hidden; for crash tests): a builtin TPM on PATH
    /// counts up in NV index 0x01500010 (8 bytes, big-endian), printing `acked N` after each write
    /// returned, which is after the state file was synced. With `readOnly`: prints `value N` (or
    /// `value none` before the first write) and exits.
    public func exerciseNVRAM(path: String, readOnly: Bool) -> Int32 {
        do throws(TPMBackendError) {
            let (engine, _) = try openBuiltinTPM(statePath: path)
            defer { engine.powerOff() }
            try engine.powerOn()
            try engine.startUp()
            let index: [UInt8] = [0x01, 0x50, 0x00, 0x10]
            let owner: [UInt8] = [0x40, 0, 0, 0x01]
            let password: [UInt8] = [0, 0, 0, 9, 0x40, 0, 0, 0x09, 0, 0, 0, 0, 0]
            func command(_ body: [UInt8]) -> [UInt8] {
                var c = body
                let n = c.count
                c[2] = UInt8(n >> 24); c[3] = UInt8(n >> 16 & 0xFF); c[4] = UInt8(n >> 8 & 0xFF); c[5] = UInt8(n & 0xFF)
                return c
            }
            func rc(_ r: [UInt8]) -> UInt32 { TPMTIS.codeField(r) ?? 0xFFFF_FFFF }
            let read = try engine.execute(command([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x4E] + owner + index + password + [0, 8, 0, 0]), locality: 0)
            var value: UInt64
            if rc(read) == 0, read.count >= 24 {
                value = read[16..<24].reduce(0) { $0 << 8 | UInt64($1) }
            } else if readOnly {
                print("value none")
                return 0
            } else {
                // Define it: owner read/write, no dictionary-attack lockout, 8 bytes.
                let publicArea: [UInt8] = index + [0x00, 0x0B, 0x02, 0x02, 0x00, 0x02, 0, 0, 0, 8]
                let define = try engine.execute(command([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x2A] + owner + password + [0, 0, 0, UInt8(publicArea.count)] + publicArea), locality: 0)
                guard rc(define) == 0 || rc(define) == 0x14C else { return failure("TPM2_NV_DefineSpace failed: rc 0x\(String(rc(define), radix: 16))") }
                value = 0
            }
            if readOnly {
                print("value \(value)")
                return 0
            }
            while true {
                value += 1
                let data = (0..<8).map { UInt8(truncatingIfNeeded: value >> (8 * (7 - UInt64($0)))) }
                let write = try engine.execute(command([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x37] + owner + index + password + [0, 8] + data + [0, 0]), locality: 0)
                guard rc(write) == 0 else { return failure("TPM2_NV_Write failed: rc 0x\(String(rc(write), radix: 16))") }
                let line = Array("acked \(value)\n".utf8)
                line.withUnsafeBytes { writeAll(fd: 1, $0) }
            }
        } catch { return failure("\(error)") }
    }

    /// `swiftvmm host-info`: whether this host's KVM runs guests at hardware speed (status 2: no KVM).
    public func hostInfo(kvmPath: String = "/dev/kvm") -> Int32 {
        switch HostVirtualization.probe(kvmPath: kvmPath) {
        case .hardware:
            print("hardware: /dev/kvm uses hardware virtualization; guests run at native speed")
        case .emulated(let reason):
            print("emulated: \(reason); guests run extremely slowly (use guest-tests/testhost.sh)")
        case .none(let reason):
            print("none: \(reason)")
            return 2
        }
        return 0
    }

    // MARK: pieces

    private static func noKVM(_ reason: String) -> LaunchError {
        LaunchError("KVM is not available: \(reason). Without KVM, run guests in the nested test host: guest-tests/run-guest.sh (see README).")
    }

    private static func requireDirectory(_ path: String) throws(LaunchError) {
        let kind: FileStatus.Kind
        do { kind = try FileStatus.of(path).kind } catch { throw LaunchError("\(path): \(String(cString: strerror(error.errno)))") }
        guard kind == .directory else { throw LaunchError("\(path): not a directory (a snapshot is a directory)") }
    }

    /// Before the first thread starts (the QMP server's): a VM's process takes SIGINT/SIGTERM/SIGHUP
    /// through the machine's signalfd, so they are blocked here and every thread inherits the mask
    /// (a signal that comes early then waits for the run loop instead of killing the process). Then
    /// logging to stderr at the configured level.
    private func prepareProcess(_ config: VMProcessConfig) throws(LaunchError) {
        guard ownsProcess else { return }
        setSignalsBlocked(Machine.stopSignals, true)
        // Every thread from here on loads its role's filter as it starts; the main thread when
        // its run loop begins (Machine.run).
        do { try Seccomp.enable(config.seccomp) } catch { throw LaunchError(error.message) }
        pinLocalTimeZone()
        if config.coreDump == .off {
            do { try ResourceLimits.disableCoreDumps() } catch { throw LaunchError("cannot turn core dumps off: \(error)") }
        }
        let level = config.logLevel
        LoggingSystem.bootstrap { label in
            var handler = StreamLogHandler.standardError(label: label)
            handler.logLevel = level
            return handler
        }
    }

    private func startMonitor(_ path: String?) throws(LaunchError) -> Monitor {
        do {
            let monitor = try Monitor.start(path: path, fdSets: fdSets)
            self.monitor = monitor
            return monitor
        } catch {
            throw LaunchError("cannot serve QMP on \(path ?? ""): \(error)")
        }
    }

    /// Runs `machine` until it ends, reports how, and returns its exit status.
    private func runToEnd(_ machine: Machine, monitor: Monitor) -> Int32 {
        self.machine = machine
        createdTPMState = nil
        let terminal: TerminalInput
        if let console = machine.virtioConsole {
            terminal = TerminalInput { console.enqueueInput($0) }
        } else {
            terminal = TerminalInput { [serial = machine.serial] in serial.enqueueInput($0) }
        }
        let end = machine.run()
        terminal.restore()
        stopTPM()
        monitor.finish(shutdownData: end.shutdownEventData)
        self.monitor = nil
        if end.exitStatus == 0 {
            Logger(label: "swiftvmm").info("\(end.summary)")
        } else {
            errorOutput("swiftvmm: \(end.summary)")
        }
        return end.exitStatus
    }

    /// Opens and locks the image of each `--drive` (through the fd sets, so `/dev/fdset/N` works),
    /// in order; the first that cannot be used is a one-line error, and nothing is written.
    private func openDrives(_ drives: [DriveArgument]) throws(LaunchError) -> [(store: FileBlockStore, id: String)] {
        var opened: [(store: FileBlockStore, id: String)] = []
        for drive in drives {
            let fd: OwnedFD
            do {
                let file = try fdSets.openHostFile(path: drive.file, flags: (drive.readOnly ? O_RDONLY : O_RDWR) | O_NONBLOCK)
                fd = OwnedFD(adopting: try duplicateDescriptor(file.rawValue, minimum: 3))
            } catch {
                throw LaunchError("--drive: cannot open the image \(drive.file)\(drive.readOnly ? "" : " for writing"): \(error)")
            }
            do {
                opened.append((try FileBlockStore.open(fd: fd, path: drive.file, readOnly: drive.readOnly), drive.id))
            } catch { throw LaunchError("--drive: \(error)") }
        }
        return opened
    }

    /// Attaches each `--net` to its tap device (an existing one, or the descriptor in fd set N).
    private func openNets(_ nets: [NetArgument]) throws(LaunchError) -> [(backend: TapBackend, mac: [UInt8])] {
        var opened: [(backend: TapBackend, mac: [UInt8])] = []
        for net in nets {
            do throws(NetBackendError) {
                switch net.source {
                case .tap(let name):
                    opened.append((try TapBackend.attach(name: name), net.mac))
                case .fdSet(let n):
                    let fd: OwnedFD
                    do {
                        let file = try fdSets.openHostFile(path: "/dev/fdset/\(n)", flags: O_RDWR)
                        fd = OwnedFD(adopting: try duplicateDescriptor(file.rawValue, minimum: 3))
                    } catch {
                        throw NetBackendError("fd set \(n): \(error)")
                    }
                    opened.append((try TapBackend.adopt(fd: fd, name: "fdset\(n)"), net.mac))
                }
            } catch { throw LaunchError("--net: \(error)") }
        }
        return opened
    }

    /// Starts the TPM of `--tpm`: its engine is connected, powered on and started up
    /// (TPM2_Startup, as firmware does) here, before any vCPU exists, so that a missing socket, a
    /// peer that is not swtpm or a damaged state file is a one-line error; then its thread starts.
    /// (A restored guest's TPM is started the same way: its state is not in the snapshot yet.)
    private func startTPM(_ argument: TPMArgument?, forRestore: Bool = false) throws(LaunchError) -> TPMWorker? {
        guard let argument else { return nil }
        let logger = Logger(label: "swiftvmm.tpm")
        let engine: any TPMEngine
        let info: TPMBackendInfo
        var createdFile: String?
        do throws(TPMBackendError) {
            switch argument {
            case .swtpm(let socket):
                engine = try SwtpmEngine.connect(socketPath: socket, logger: logger)
                info = TPMBackendInfo(kind: .emulator, path: socket)
            case .builtin(let state):
                let opened = try openBuiltinTPM(statePath: state)
                engine = opened.engine
                if opened.created { createdFile = state }
                info = TPMBackendInfo(kind: .builtin, path: state)
            }
        } catch { throw LaunchError("--tpm: \(error)") }
        do throws(TPMBackendError) {
            let worker = try TPMWorker(engine: engine, info: info, logger: logger)
            // A restore powers the TPM on once it knows whether the snapshot holds its state
            // (`TPMBackend.resume`); a boot powers it on now.
            if !forRestore { try worker.powerOnAndStart() }
            tpm = worker
            createdTPMState = createdFile
            return worker
        } catch {
            engine.powerOff()
            // A state file made for this start goes again: a failed start leaves nothing behind.
            if let createdFile { try? FileSystem.removeFile(createdFile) }
            throw LaunchError("--tpm: \(error)")
        }
    }

    /// Stops the TPM's thread and powers its engine off (libtpms writes its state; swtpm gets
    /// CMD_SHUTDOWN). Once.
    private func stopTPM() {
        tpm?.stop()
        tpm = nil
    }

    /// Warns that /dev/kvm emulates guest code, and refuses to go on unless `allow`.
    private func warnEmulated(reason: String, allow: Bool) throws(LaunchError) {
        errorOutput("""
        swiftvmm: warning: no hardware virtualization: \(reason). Guest code is emulated, so a Linux \
        guest would take many minutes to boot. Run guests inside the nested test host instead: \
        guest-tests/run-guest.sh (see README, "The test host").
        """)
        if !allow {
            throw LaunchError("refusing to boot a Linux guest on emulated KVM; pass --allow-slow-kvm to try anyway")
        }
    }

    /// Hands the inherited descriptors of `--add-fd` to their fd sets (like QEMU's -add-fd). Each set
    /// gets its own duplicate (close-on-exec), so one descriptor may go into several sets; the inherited
    /// numbers are closed once every option has been handled.
    private func addInheritedDescriptors(_ args: [AddFDArgument]) throws(LaunchError) {
        for arg in args {
            guard isOpenDescriptor(arg.fd) else { throw LaunchError("--add-fd: descriptor \(arg.fd) is not open") }
            let dup: Int32
            do { dup = try duplicateDescriptor(arg.fd, minimum: 3) } catch { // never 0-2 (stdin, stdout, stderr)
                throw LaunchError("--add-fd: cannot duplicate descriptor \(arg.fd): \(error)")
            }
            do { _ = try fdSets.add(takingOwnershipOf: dup, fdSetID: arg.set, opaque: arg.opaque) } catch {
                throw LaunchError("--add-fd fd=\(arg.fd),set=\(arg.set): \(error.desc)")
            }
        }
        for fd in Set(args.map(\.fd)) { closeDescriptor(fd) }
    }

    /// Reads a host file through the fd sets, so `/dev/fdset/N` (from `--add-fd`) works anywhere a
    /// path does. Only a regular file is read: a FIFO, pipe, device or directory is refused (opened
    /// O_NONBLOCK, so that a FIFO without a writer does not block the open), and so is a file over
    /// `limit` bytes, from its size, before anything is read.
    private func readFile(_ path: String, what: String, limit: Int) throws(LaunchError) -> [UInt8] {
        let file: HostFile
        do { file = try fdSets.openHostFile(path: path, flags: O_RDONLY | O_NONBLOCK) } catch {
            throw LaunchError("cannot read the \(what) \(path): \(error)")
        }
        let kind: FileStatus.Kind
        do { kind = try FileStatus.of(fd: file.rawValue).kind } catch {
            throw LaunchError("cannot read the \(what) \(path): \(SysError("fstat \(path)", errno: error.errno))")
        }
        guard kind == .regular else { throw LaunchError("the \(what) \(path) is not a regular file") }
        do { return try readAllBytes(fd: file.rawValue, limit: limit) } catch where error.errno == EFBIG {
            throw LaunchError("the \(what) \(path) is larger than \(limit >> 20) MiB")
        } catch {
            throw LaunchError("cannot read the \(what) \(path): \(error)")
        }
    }

    /// Writes each table as DIR/NAME.dat (creating DIR if needed) and lists them on stderr.
    private func dumpTables(_ tables: ACPITableSet, to dir: String) throws(LaunchError) {
        do { try FileSystem.makeDirectory(dir, mode: 0o755) } catch where error.errno == EEXIST {
            // an existing directory is fine: its tables are replaced
        } catch {
            throw LaunchError("cannot create \(dir): \(SysError("mkdir", errno: error.errno))")
        }
        for (table, file) in zip(tables.tables, tables.dumpFileNames) {
            let path = dir + "/" + file
            do {
                let fd = try OwnedFD.open(path, flags: O_WRONLY | O_CREAT | O_TRUNC, mode: 0o644)
                try table.bytes.withUnsafeBytes { try fd.writeAll($0) }
            } catch {
                throw LaunchError("cannot write \(path): \(error)")
            }
        }
        errorOutput("swiftvmm: wrote \(tables.tables.count) ACPI tables to \(dir) (\(tables.dumpFileNames.joined(separator: ", ")))")
    }

    /// Writes the device tree of the machine `config` describes to `path` (complete or not at all:
    /// written under a temporary name beside it, synced, renamed), without a VM. With a kernel, the
    /// tree's initrd is where a boot of that kernel puts it (the kernel is read and planned, the
    /// initrd only measured); a `--tpm` backend is not contacted.
    private func dumpDeviceTree(_ config: RunConfig, virtio: [String], to path: String) throws(LaunchError) {
        var initrd: Range<UInt64>?
        if let kernel = config.kernel {
            let bytes = try readFile(kernel, what: "kernel", limit: 512 << 20)
            let image: BzImage
            do { image = try BzImage(bytes) } catch { throw LaunchError("\(kernel): \(error)") }
            let initrdSize = try config.initrd.map { path throws(LaunchError) in
                try fileSize(path, what: "initrd", limit: Int(min(config.memory.bytes, 4 << 30)))
            }
            do {
                initrd = try Machine.linuxBootPlan(image: image, commandLine: config.commandLine, initrdSize: initrdSize,
                                                   memorySize: config.memory.bytes).initrdRange(size: initrdSize)
            } catch { throw LaunchError("\(error)") }
        }
        let blob: [UInt8]
        do {
            blob = try PlatformDeviceTree.build(memorySize: config.memory.bytes, cpus: config.cpus,
                                                boot: .init(commandLine: config.commandLine, initrd: initrd),
                                                acpi: config.acpi, tpm: config.process.tpm != nil, virtio: virtio)
        } catch { throw LaunchError("cannot make the device tree: \(error)") }
        do { try FileSystem.writeAtomically(blob, to: path) } catch {
            throw LaunchError("cannot write the device tree to \(path): \(error)")
        }
        errorOutput("swiftvmm: wrote the device tree (\(blob.count) bytes) to \(path)")
    }

    /// The size of a regular host file (through the fd sets), checked as `readFile` checks it,
    /// without reading it.
    private func fileSize(_ path: String, what: String, limit: Int) throws(LaunchError) -> UInt64 {
        let file: HostFile
        do { file = try fdSets.openHostFile(path: path, flags: O_RDONLY | O_NONBLOCK) } catch {
            throw LaunchError("cannot read the \(what) \(path): \(error)")
        }
        let status: FileStatus
        do { status = try FileStatus.of(fd: file.rawValue) } catch {
            throw LaunchError("cannot read the \(what) \(path): \(SysError("fstat \(path)", errno: error.errno))")
        }
        guard status.kind == .regular else { throw LaunchError("the \(what) \(path) is not a regular file") }
        guard status.size <= UInt64(limit) else { throw LaunchError("the \(what) \(path) is larger than \(limit >> 20) MiB") }
        return status.size
    }

    /// firmware/build/swiftvmm-fw.bin of the checkout this executable was built in ($SWIFTVMM_FIRMWARE
    /// overrides): the directories above the executable are searched.
    private static func builtinFirmwarePath() throws(LaunchError) -> String {
        if let env = getenv("SWIFTVMM_FIRMWARE") { return String(cString: env) }
        var dir = executablePath()
        while let slash = dir.lastIndex(of: "/"), slash != dir.startIndex {
            dir = String(dir[..<slash])
            let candidate = dir + "/firmware/build/swiftvmm-fw.bin"
            if isAccessible(candidate, R_OK) { return candidate }
        }
        throw LaunchError("no built-in firmware: build it with firmware/build.sh (or pass --firmware PATH)")
    }
}

extension Launcher {
    /// libtpms in this process with its state in an unnamed file on /dev/shm (gone when the process
    /// ends): for a snapshot whose TPM state is restored without `--tpm`.
    static func inMemoryTPM() throws(TPMStateError) -> any TPMBackend {
        let dir = isAccessible("/dev/shm", W_OK) ? "/dev/shm" : "/tmp"
        let path = "\(dir)/.swiftvmm-tpm.\(getpid()).\(UInt64.random(in: 1...UInt64.max))"
        do {
            let fd: OwnedFD
            do { fd = try OwnedFD.open(path, flags: O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, mode: 0o600) } catch { throw TPMStateStoreError("cannot make a TPM state in memory (\(path)): \(error)") }
            try? FileSystem.removeFile(path)
            let store = try TPMStateStore(fd: fd, path: "(memory)")
            let worker = try TPMWorker(engine: try LibtpmsEngine(store: store), info: TPMBackendInfo(kind: .builtin, path: "(memory)"),
                                       logger: Logger(label: "swiftvmm.tpm"))
            return worker
        } catch let error as TPMStateStoreError {
            throw TPMStateError("\(error)")
        } catch {
            throw TPMStateError("\(error)")
        }
    }

    /// libtpms in this process with its state in `statePath`: created (mode 0600) when missing, or
    /// `/dev/fdset/N` (a descriptor open for reading and writing). Returns whether the file was
    /// created, so that a failed start can remove it again.
    func openBuiltinTPM(statePath: String) throws(TPMBackendError) -> (engine: any TPMEngine, created: Bool) {
        let store: TPMStateStore
        var created = false
        do throws(TPMStateStoreError) {
            if FdSets.fdSetID(path: statePath) != nil {
                let fd: OwnedFD
                do {
                    let file = try fdSets.openHostFile(path: statePath, flags: O_RDWR)
                    fd = OwnedFD(adopting: try duplicateDescriptor(file.rawValue, minimum: 3))
                } catch {
                    throw TPMStateStoreError("cannot open the TPM state file \(statePath): \(error)")
                }
                store = try TPMStateStore(fd: fd, path: statePath)
            } else {
                (store, created) = try TPMStateStore.open(path: statePath)
            }
        } catch { throw TPMBackendError("\(error)") }
        return (try LibtpmsEngine(store: store), created)
    }
}
