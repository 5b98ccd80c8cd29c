import Devices
import Logging
import Sandbox
import Machine

/// Why a launch cannot go on: one line of text, shown as `swiftvmm: error: MESSAGE` (see
/// `Launcher.failure`). Also what the configuration checks throw.
public struct LaunchError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// Sizes such as 256M, 1G, 512MiB or 4096K; a bare number means MiB (like QEMU's -m).
public struct MemorySize: Equatable, Sendable, CustomStringConvertible {
    public let bytes: UInt64

    public init(bytes: UInt64) { self.bytes = bytes }

    public init?(argument: String) {
        guard let parsed = Self.parse(argument) else { return nil }
        bytes = parsed
    }

    public static func parse(_ text: String) -> UInt64? {
        var digits = Substring(text)
        while digits.first == " " { digits = digits.dropFirst() }
        while digits.last == " " { digits = digits.dropLast() }
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
    public var description: String {
        for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] as [(String, UInt64)]
        where bytes != 0 && bytes % (1 << shift) == 0 {
            return "\(bytes >> shift)\(unit)"
        }
        return "\(bytes) bytes"
    }

    public var defaultValueDescription: String { description }
}

/// `--add-fd fd=N,set=SET[,opaque=TEXT]`.
public struct AddFDArgument: Equatable, Sendable {
    public let fd: Int32
    public let set: Int64
    public let opaque: String?

    public init(fd: Int32, set: Int64, opaque: String? = nil) {
        self.fd = fd
        self.set = set
        self.opaque = opaque
    }

    public init?(argument: String) {
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
        self.init(fd: fd, set: set, opaque: opaque)
    }
}

/// `--fw-cfg name=opt/NAME,file=PATH` or `--fw-cfg name=opt/NAME,string=TEXT` (QEMU's syntax).
public struct FwCfgFileArgument: Equatable, Sendable {
    public enum Source: Equatable, Sendable { case file(String), string(String) }
    public static let maxSize = 16 << 20
    public let name: String
    public let source: Source

    public init(name: String, source: Source) {
        self.name = name
        self.source = source
    }

    /// Splits at the first two "key=" fields; a string value may itself contain commas. A file path
    /// may too, but not a second source (`file=A,string=B` or `file=A,file=B`): QEMU takes one of
    /// file= and string=, and such a value is refused rather than read as a file named `A,string=B`.
    public static func parse(_ text: String) throws(LaunchError) -> FwCfgFileArgument {
        guard text.hasPrefix("name=") else { throw LaunchError("--fw-cfg must start with name=") }
        let rest = text.dropFirst(5)
        guard let comma = rest.firstIndex(of: ",") else { throw LaunchError("--fw-cfg needs file=PATH or string=TEXT after the name") }
        let name = String(rest[..<comma])
        let value = rest[rest.index(after: comma)...]
        guard name.hasPrefix("opt/"), name.utf8.count <= 55, !name.contains("\0") else {
            throw LaunchError("--fw-cfg names must start with opt/ and be at most 55 bytes (got \(name))")
        }
        if value.hasPrefix("file=") {
            let path = String(value.dropFirst(5))
            guard !path.contains(",string="), !path.contains(",file=") else {
                throw LaunchError("--fw-cfg takes one of file= or string=, not both")
            }
            return FwCfgFileArgument(name: name, source: .file(path))
        }
        if value.hasPrefix("string=") { return FwCfgFileArgument(name: name, source: .string(String(value.dropFirst(7)))) }
        throw LaunchError("--fw-cfg needs file=PATH or string=TEXT after the name")
    }
}

/// `--tpm builtin,state=PATH` (libtpms in this process, its state in the file PATH, created if
/// missing) or `--tpm swtpm,socket=PATH` (an already running `swtpm socket --tpm2 --ctrl
/// type=unixio,path=PATH`). PATH may be `/dev/fdset/N` for the state file.
public enum TPMArgument: Equatable, Sendable, CustomStringConvertible {
    case builtin(state: String)
    case swtpm(socket: String)

    public static let syntax = "builtin,state=PATH or swtpm,socket=PATH"

    public static func parse(_ text: String) throws(LaunchError) -> TPMArgument {
        let parts = text.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        let options = try keyValueOptions(parts.dropFirst(), syntax: syntax)
        func only(_ key: String, backend: String) throws(LaunchError) -> String {
            if let other = options.keys.sorted().first(where: { $0 != key }) {
                throw LaunchError("\(backend): unknown option \(other)= (it takes \(key)=PATH only)")
            }
            guard let value = options[key], !value.isEmpty else { throw LaunchError("\(backend) needs \(key)=PATH") }
            guard !value.utf8.contains(0) else { throw LaunchError("\(backend): the path contains a NUL byte") }
            return value
        }
        switch parts[0] {
        case "builtin": return .builtin(state: try only("state", backend: "builtin"))
        case "swtpm":
            let socket = try only("socket", backend: "swtpm")
            guard socket.utf8.count <= VMProcessConfig.maxSocketPathBytes else {
                throw LaunchError("swtpm: the socket path is \(socket.utf8.count) bytes, longer than the \(VMProcessConfig.maxSocketPathBytes)-byte limit of Unix socket addresses")
            }
            return .swtpm(socket: socket)
        case "": throw LaunchError("a backend is needed: \(syntax)")
        default: throw LaunchError("unknown backend \"\(parts[0])\" (expected \(syntax))")
        }
    }

    public var description: String {
        switch self {
        case .builtin(let state): return "builtin,state=\(state)"
        case .swtpm(let socket): return "swtpm,socket=\(socket)"
        }
    }
}

/// `--drive file=PATH[,readonly=on|off][,id=NAME]`: a raw image as a virtio-blk drive. PATH may be
/// `/dev/fdset/N`; NAME (at most 20 bytes) is what the guest reads as the drive's serial.
public struct DriveArgument: Equatable, Sendable, CustomStringConvertible {
    public var file: String
    public var readOnly = false
    public var id = ""

    public static let syntax = "file=PATH[,readonly=on|off][,id=NAME]"
    /// virtio-blk's GET_ID answers with at most 20 bytes.
    public static let maxIDBytes = 20

    public init(file: String, readOnly: Bool = false, id: String = "") {
        self.file = file
        self.readOnly = readOnly
        self.id = id
    }

    public static func parse(_ text: String) throws(LaunchError) -> DriveArgument {
        let options = try keyValueOptions(text.split(separator: ",", omittingEmptySubsequences: false).map(String.init),
                                          syntax: syntax, option: "--drive", allowed: ["file", "readonly", "id"])
        guard let file = options["file"], !file.isEmpty else { throw LaunchError("--drive needs file=PATH (expected \(syntax))") }
        guard !file.utf8.contains(0) else { throw LaunchError("--drive: the path contains a NUL byte") }
        var drive = DriveArgument(file: file)
        switch options["readonly"] {
        case nil, "off": break
        case "on": drive.readOnly = true
        case let other?: throw LaunchError("--drive: readonly=\(other) is not on or off")
        }
        if let id = options["id"] {
            guard id.utf8.count <= maxIDBytes else { throw LaunchError("--drive: id=\(id) is longer than \(maxIDBytes) bytes") }
            guard id.unicodeScalars.allSatisfy({ $0.isASCII && $0.value >= 0x20 && $0.value < 0x7F }) else {
                throw LaunchError("--drive: id= must be printable ASCII")
            }
            drive.id = id
        }
        return drive
    }

    public var description: String {
        "file=\(file)" + (readOnly ? ",readonly=on" : "") + (id.isEmpty ? "" : ",id=\(id)")
    }
}

/// `--net tap=NAME[,mac=MAC]` (an existing tap device) or `--net fd=N[,mac=MAC]` (a descriptor
/// already attached to a tap, from fd set N): a virtio-net device. Without mac=, the address is
/// derived from the tap's name (or the fd set's number), so it stays the same from run to run.
public struct NetArgument: Equatable, Sendable, CustomStringConvertible {
    public enum Source: Equatable, Sendable {
        case tap(String)
        case fdSet(Int64)
    }
    public var source: Source
    public var mac: [UInt8]

    public static let syntax = "tap=NAME[,mac=52:54:00:xx:xx:xx] or fd=N[,mac=...]"

    public static func parse(_ text: String) throws(LaunchError) -> NetArgument {
        let options = try keyValueOptions(text.split(separator: ",", omittingEmptySubsequences: false).map(String.init),
                                          syntax: syntax, option: "--net", allowed: ["tap", "fd", "mac"])
        let source: Source
        switch (options["tap"], options["fd"]) {
        case (let name?, nil):
            guard !name.isEmpty, name.utf8.count < 16, !name.contains("/"), !name.utf8.contains(0) else {
                throw LaunchError("--net: tap=\(name) is not an interface name (1 to 15 bytes, no slash)")
            }
            source = .tap(name)
        case (nil, let fd?):
            guard let n = Int64(fd), n >= 0 else { throw LaunchError("--net: fd=\(fd) is not an fd set number") }
            source = .fdSet(n)
        case (nil, nil): throw LaunchError("--net needs tap=NAME or fd=N (expected \(syntax))")
        default: throw LaunchError("--net takes one of tap= and fd=, not both")
        }
        let mac: [UInt8]
        if let text = options["mac"] {
            let parts = text.split(separator: ":", omittingEmptySubsequences: false)
            let bytes = parts.compactMap { $0.count == 2 ? UInt8($0, radix: 16) : nil }
            guard parts.count == 6, bytes.count == 6 else { throw LaunchError("--net: mac=\(text) is not six hex bytes like 52:54:00:12:34:56") }
            guard bytes[0] & 1 == 0 else { throw LaunchError("--net: mac=\(text) is a multicast address") }
            mac = bytes
        } else {
            mac = Self.derivedMAC(source)
        }
        return NetArgument(source: source, mac: mac)
    }

    /// 52:54:00 (QEMU's locally administered prefix) and three bytes of a hash of the source's name.
    static func derivedMAC(_ source: Source) -> [UInt8] {
        let key: String
        switch source {
        case .tap(let name): key = "tap:" + name
        case .fdSet(let n): key = "fdset:\(n)"
        }
        var h: UInt32 = 2_166_136_261
        for b in key.utf8 { h = (h ^ UInt32(b)) &* 16_777_619 }
        return [0x52, 0x54, 0x00, UInt8(truncatingIfNeeded: h >> 16), UInt8(truncatingIfNeeded: h >> 8), UInt8(truncatingIfNeeded: h)]
    }

    public var macString: String { mac.map { String($0, radix: 16).count == 1 ? "0" + String($0, radix: 16) : String($0, radix: 16) }.joined(separator: ":") }

    public var description: String {
        switch source {
        case .tap(let name): return "tap=\(name),mac=\(macString)"
        case .fdSet(let n): return "fd=\(n),mac=\(macString)"
        }
    }
}

/// What every command that runs a VM (`run`, `restore`) is given besides its own options.
/// Core files of a VM's process (`--core-dump`).
public enum CoreDumpMode: String, Sendable, CaseIterable {
    /// None (RLIMIT_CORE 0).
    case off
    /// As the environment's limit allows, without guest memory.
    case vmm
    /// As the environment's limit allows, with guest memory.
    case all
}

public struct VMProcessConfig: Equatable, Sendable {
    /// Serve QMP on this Unix socket path.
    public var qmp: String?
    /// Inherited descriptors for the fd sets.
    public var addFD: [AddFDArgument] = []
    public var logLevel: Logger.Level = .warning
    /// Go on when /dev/kvm emulates guest code.
    public var allowSlowKVM = false
    public var kvmDevice = "/dev/kvm"
    /// The threads' seccomp filters (`--seccomp`).
    public var seccomp: SeccompMode = .on
    /// What a core file may hold (`--core-dump`).
    public var coreDump: CoreDumpMode = .off
    /// The descriptor limit once the VM is set up (`--max-open-files`); nil: what it holds plus
    /// `openFilesMargin`.
    public var maxOpenFiles: UInt64?
    /// Descriptors left for what comes after start-up: QMP clients, add-fd, snapshot files.
    public static let openFilesMargin: UInt64 = 256
    /// The guest's TPM (`--tpm`).
    public var tpm: TPMArgument?
    /// The guest's virtio-blk drives (`--drive`), in order (/dev/vda, /dev/vdb, ...).
    public var drives: [DriveArgument] = []
    /// The guest's virtio-net devices (`--net`), in order (eth0, eth1, ...).
    public var nets: [NetArgument] = []

    public init(qmp: String? = nil) { self.qmp = qmp }

    /// The longest path a Unix socket address holds (sun_path is 108 bytes with its NUL).
    public static let maxSocketPathBytes = 107

    public func validate() throws(LaunchError) {
        // One virtio device of the machine's eight is the default virtio-rng.
        guard drives.count + nets.count < Layout.maxVirtioDevices else {
            throw LaunchError("at most \(Layout.maxVirtioDevices - 1) --drive and --net options together (got \(drives.count + nets.count))")
        }
        if let qmp {
            guard !qmp.isEmpty else { throw LaunchError("--qmp needs a socket path") }
            guard qmp.utf8.count <= Self.maxSocketPathBytes else {
                throw LaunchError("the --qmp path is \(qmp.utf8.count) bytes, longer than the \(Self.maxSocketPathBytes)-byte limit of Unix socket addresses")
            }
        }
    }
}

/// `swiftvmm run`: everything a boot needs, checked by `validate()` (which the launcher calls
/// first, and the command line's parser too, so that a bad value is a usage error).
public struct RunConfig: Equatable, Sendable {
    public enum Firmware: Equatable, Sendable {
        /// firmware/build/swiftvmm-fw.bin of the checkout the executable was built in.
        case builtin
        case path(String)
    }

    public static let defaultCommandLine = "console=ttyS0 reboot=k panic=1 pci=off"

    /// The bzImage; nil only with `dumpACPI` or `dumpDTB` (then nothing boots).
    public var kernel: String?
    public var initrd: String?
    public var commandLine = RunConfig.defaultCommandLine
    public var memory = MemorySize(bytes: 256 << 20)
    public var cpus = 1
    /// Write the ACPI tables to this directory.
    public var dumpACPI: String?
    /// Write the machine's flattened device tree to this file and exit without booting.
    public var dumpDTB: String?
    /// Hand the guest the device tree through boot_params' setup_data (SETUP_DTB).
    public var deviceTree = false
    public var firmware: Firmware?
    public var fwCfgFiles: [FwCfgFileArgument] = []
    /// The initial VM generation ID: a GUID (xxxxxxxx-xxxx-...) or "auto" for a random one.
    public var vmGenerationID = "auto"
    public var acpi = true
    public var cpuModel: CPUModel = .host
    /// Give the guest a virtio-rng (the default; only with ACPI, where the guest finds it).
    public var rng = true
    /// Where the host's input goes: COM1 (ttyS0, the default) or a virtio console (hvc0).
    public enum ConsoleDevice: String, Equatable, Sendable, CaseIterable { case serial, virtio }
    public var console = ConsoleDevice.serial
    public var process = VMProcessConfig()

    public init(kernel: String?) { self.kernel = kernel }

    /// The one set of rules for `run`'s options (memory and vCPU limits are `MachineConfig`'s).
    public func validate() throws(LaunchError) {
        guard (1...MachineConfig.maximumCPUs).contains(cpus) else {
            throw LaunchError("--cpus must be between 1 and \(MachineConfig.maximumCPUs)")
        }
        if let problem = MachineConfig.memorySizeProblem(memory.bytes) { throw LaunchError(problem) }
        guard vmGenerationID == "auto" || VMGenID.parseGUID(vmGenerationID) != nil else {
            throw LaunchError("--vmgenid must be a GUID like 12345678-9abc-def0-1234-56789abcdef0, or auto")
        }
        let names = fwCfgFiles.map(\.name)
        guard Set(names).count == names.count else { throw LaunchError("--fw-cfg names must be unique") }
        guard acpi || cpus == 1 else { throw LaunchError("--no-acpi allows only one vCPU (--cpus 1)") }
        guard acpi || console == .serial else { throw LaunchError("--console virtio needs ACPI (the guest finds virtio devices in the DSDT): drop --no-acpi") }
        guard acpi || process.nets.isEmpty else { throw LaunchError("--net needs ACPI (the guest finds virtio devices in the DSDT): drop --no-acpi") }
        guard acpi || process.drives.isEmpty else { throw LaunchError("--drive needs ACPI (the guest finds virtio devices in the DSDT): drop --no-acpi") }
        guard kernel != nil || dumpACPI != nil || dumpDTB != nil else { throw LaunchError("Missing expected argument '--kernel <kernel>'") }
        if let dumpDTB {
            guard !dumpDTB.isEmpty else { throw LaunchError("--dump-dtb needs a file name") }
            guard kernel != nil || initrd == nil else {
                throw LaunchError("--dump-dtb with --initrd needs --kernel too (where the initrd goes depends on the kernel)")
            }
        }
        guard firmware == nil || (!deviceTree && dumpDTB == nil) else {
            throw LaunchError("--dtb and --dump-dtb describe a direct boot (the tree reaches the kernel in boot_params' setup_data): drop --firmware")
        }
        try process.validate()
    }
}

/// `swiftvmm restore DIR`.
public struct RestoreConfig: Equatable, Sendable {
    public var directory: String
    /// A GUID, "auto" (a new random one) or "keep" (the one saved).
    public var vmGenerationID = "auto"
    /// Restore with the vCPUs paused.
    public var paused = false
    /// The guest's clocks: "saved" (continue from the save) or "host" (advanced to the host's time).
    public var clock = "saved"
    /// Prefetch the snapshot's working set (workingset.bin), or record one when it has none.
    public var workingSet = true
    public var process = VMProcessConfig()

    public init(directory: String) { self.directory = directory }

    public func validate() throws(LaunchError) {
        guard ["auto", "keep"].contains(vmGenerationID) || VMGenID.parseGUID(vmGenerationID) != nil else {
            throw LaunchError("--vmgenid must be a GUID like 12345678-9abc-def0-1234-56789abcdef0, auto or keep")
        }
        guard RestoreOptions.ClockMode(rawValue: clock) != nil else {
            throw LaunchError("--clock must be saved or host, not '\(clock)'")
        }
        try process.validate()
    }
}

/// The KEY=VALUE parts of an option's value (`--tpm`, `--drive`, `--net`), each key at most once;
/// with `allowed`, no other key. Errors start with `option: ` when it is given.
func keyValueOptions(_ parts: some Sequence<String>, syntax: String, option: String? = nil,
                     allowed: Set<String>? = nil) throws(LaunchError) -> [String: String] {
    let prefix = option.map { "\($0): " } ?? ""
    var options: [String: String] = [:]
    for part in parts {
        guard let eq = part.firstIndex(of: "="), eq != part.startIndex else {
            throw LaunchError("\(prefix)\"\(part)\" is not KEY=VALUE (expected \(syntax))")
        }
        let key = String(part[..<eq])
        if let allowed, !allowed.contains(key) { throw LaunchError("\(prefix)unknown option \(key)= (expected \(syntax))") }
        guard options[key] == nil else { throw LaunchError("\(prefix)\(key)= is given twice") }
        options[key] = String(part[part.index(after: eq)...])
    }
    return options
}
