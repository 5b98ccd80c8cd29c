import Devices
import Machine
import Virtio
import QMP
import Synchronization

/// What the machine's QMP commands need of a machine (`Machine` has it all; tests use a fake).
public protocol MachineControl: AnyObject, Sendable {
    var isPaused: Bool { get }
    func pause()
    func resume()
    func pressPowerButton()
    func requestExit(_ exit: MachineExit)
    /// The VM generation ID (guest byte order), nil without the vmgenid device.
    var generationID: [UInt8]? { get }
    /// Sets the VM generation ID; false without the vmgenid device.
    func setGenerationID(_ guid: [UInt8]) -> Bool
    /// Where the latest generation ID change stands (pending, acknowledged), nil without the
    /// vmgenid device.
    var generationIDChange: VMGenID.ChangeStatus? { get }
    /// Sets who hears of the guest acknowledging a generation ID change; called on a vCPU thread,
    /// it must not block.
    func onGenerationIDAcknowledged(_ handler: (@Sendable (VMGenID.Acknowledgement) -> Void)?)
    /// The TPM's backend, nil without a TPM.
    var tpmInfo: TPMBackendInfo? { get }
    /// Writes a snapshot to `directory` (see `Machine.createSnapshot`); takes seconds for a big guest.
    /// `copyDrives`: the drives' images go into the snapshot too (`drive<N>.img`).
    func createSnapshot(at directory: String, live: Bool, copyDrives: Bool) throws(MachineError) -> SnapshotReport
    /// The virtio-blk drives, in order.
    var drives: [DriveInfo] { get }
    /// The virtio-net devices, in order.
    var networks: [NetInfo] { get }
    /// Sets network device `name`'s link (the guest gets a configuration interrupt); false when
    /// there is no such device.
    func setLink(_ name: String, up: Bool) -> Bool
}

/// A virtio-blk drive as `query-block` reports it.
public struct DriveInfo: Sendable, Equatable {
    /// "drive0", "drive1"...: its place among the drives.
    public var name: String
    public var file: String
    public var readOnly: Bool
    public var size: UInt64
    public var id: String
    public init(name: String, file: String, readOnly: Bool, size: UInt64, id: String) {
        self.name = name
        self.file = file
        self.readOnly = readOnly
        self.size = size
        self.id = id
    }
}

/// A virtio-net device as `query-rx-filter` reports it.
public struct NetInfo: Sendable, Equatable {
    /// "net0", "net1"...: its place among the network devices (`set_link`'s name).
    public var name: String
    public var mac: [UInt8]
    public var linkUp: Bool
    public init(name: String, mac: [UInt8], linkUp: Bool) {
        self.name = name
        self.mac = mac
        self.linkUp = linkUp
    }
}

extension MachineControl {
    public var drives: [DriveInfo] { [] }
    public var networks: [NetInfo] { [] }
    public func setLink(_ name: String, up: Bool) -> Bool { false }
}

/// What `snapshot-create` returns.
public struct SnapshotReport: Sendable, Equatable {
    public var diskBytes: UInt64
    public var memoryBytes: UInt64
    public var duration: Duration
    /// How long the guest was paused for it (zero when it was already paused).
    public var pause: Duration

    public init(diskBytes: UInt64, memoryBytes: UInt64, duration: Duration, pause: Duration = .zero) {
        self.diskBytes = diskBytes
        self.memoryBytes = memoryBytes
        self.duration = duration
        self.pause = pause
    }
}

extension Machine: MachineControl {
    public var drives: [DriveInfo] {
        virtioDevices.compactMap { $0.model as? VirtioBlock }.enumerated().map { n, blk in
            DriveInfo(name: "drive\(n)", file: blk.store.path, readOnly: blk.store.readOnly, size: blk.store.size,
                      id: String(decoding: blk.id, as: UTF8.self))
        }
    }

    public var networks: [NetInfo] {
        virtioDevices.compactMap { $0.model as? VirtioNet }.enumerated().map { n, net in
            NetInfo(name: "net\(n)", mac: net.mac, linkUp: net.linkUp)
        }
    }

    public func setLink(_ name: String, up: Bool) -> Bool {
        let nets = virtioDevices.filter { $0.model is VirtioNet }
        guard let index = nets.indices.first(where: { "net\($0)" == name || nets[$0].name == name }) else { return false }
        let device = nets[index]
        if let net = device.model as? VirtioNet, net.setLink(up: up) { device.configChanged() }
        return true
    }

    public var generationID: [UInt8]? { vmgenid?.guid }
    public var tpmInfo: TPMBackendInfo? { config.tpm?.info }

    public func createSnapshot(at directory: String, live: Bool, copyDrives: Bool) throws(MachineError) -> SnapshotReport {
        let summary: SnapshotSummary = try createSnapshot(at: directory, live: live, copyDrives: copyDrives)
        return SnapshotReport(diskBytes: summary.result.diskBytes, memoryBytes: summary.result.memoryBytes,
                              duration: summary.result.duration, pause: summary.pause)
    }
}

/// One machine command: its QMP name, its arguments (checked before it runs, with QEMU's errors),
/// whether it only reads state (then it is answered while a long command runs), and what it does.
public struct MachineCommand: Sendable {
    public typealias Run = @Sendable (_ commands: MachineCommands, _ args: inout QMPArguments, _ context: QMPContext) throws(QMPError) -> QMPCommandResult

    public let name: String
    public let parameters: [QMPParameter]
    public let isQuery: Bool
    let run: Run

    init(_ name: String, _ parameters: [QMPParameter] = [], query: Bool = false, run: @escaping Run) {
        self.name = name
        self.parameters = parameters
        self.isQuery = query
        self.run = run
    }
}

/// The machine's QMP commands (beyond the monitor's own `qmp_capabilities`, `query-commands`,
/// `query-version` and the fd-set commands), with QEMU's names, arguments, results and events.
public final class MachineCommands: QMPCommandHandler {
    public typealias Emit = @Sendable (_ event: String, _ data: JSONValue?) -> Void

    let machine: any MachineControl
    let emit: Emit
    /// True while `snapshot-create` runs: `query-status` then says "save-vm", as QEMU does.
    let saving = Atomic<Bool>(false)

    /// Also makes the machine's generation ID acknowledgements `VM_GENERATION_ID_ACKNOWLEDGED`
    /// events (emitted from the vCPU thread of the guest's clear; `emit` only queues).
    public init(machine: any MachineControl, emit: @escaping Emit) {
        self.machine = machine
        self.emit = emit
        machine.onGenerationIDAcknowledged { ack in
            emit("VM_GENERATION_ID_ACKNOWLEDGED", ["guid": .string(VMGenID.guidString(ack.guid)),
                                                   "latency-ms": .double(ack.latencyMilliseconds)])
        }
    }

    /// Every command, in `query-commands` order.
    public static let table: [MachineCommand] = [
        MachineCommand("query-status", query: true) { c, _, _ throws(QMPError) in
            if c.saving.load(ordering: .acquiring) {
                return .success(["status": "save-vm", "running": false, "singlestep": false])
            }
            let paused = c.machine.isPaused
            return .success(["status": .string(paused ? "paused" : "running"), "running": .bool(!paused), "singlestep": false])
        },
        MachineCommand("stop") { c, _, _ throws(QMPError) in
            if !c.machine.isPaused {
                c.machine.pause()
                c.emit("STOP", nil)
            }
            return .success([:])
        },
        MachineCommand("cont") { c, _, _ throws(QMPError) in
            if c.machine.isPaused {
                // Before the vCPUs run, as QEMU's vm_start does: an event the guest causes at once
                // (VM_GENERATION_ID_ACKNOWLEDGED) then comes after RESUME.
                c.emit("RESUME", nil)
                c.machine.resume()
            }
            return .success([:])
        },
        MachineCommand("system_powerdown") { c, _, _ throws(QMPError) in
            c.machine.pressPowerButton()
            c.emit("POWERDOWN", nil)
            return .success([:])
        },
        MachineCommand("system_reset") { c, _, context throws(QMPError) in
            // Like QEMU with -no-reboot: a reset ends the VM (SHUTDOWN follows when it has).
            let cause = ShutdownCause.hostQMPSystemReset
            c.emit("RESET", ["guest": .bool(cause.isGuest), "reason": .string(cause.reason)])
            let machine = c.machine
            context.afterReply { machine.requestExit(.hostReset("QMP system_reset")) }
            return .success([:])
        },
        MachineCommand("quit") { c, _, context throws(QMPError) in
            let machine = c.machine
            context.afterReply { machine.requestExit(.quit("QMP quit")) }
            return .success([:])
        },
        // QEMU's reply has `guid` only; the rest is ours: `pending` while the latest change waits
        // for the guest to clear GPE0_STS bit 5, `acknowledged` once it did, with `ack-latency-ms`
        // from the change to the clear. Both false: no change since the machine started or was
        // restored.
        MachineCommand("query-vm-generation-id", query: true) { c, _, _ throws(QMPError) in
            guard let guid = c.machine.generationID else { throw .generic("VM Generation ID device not found") }
            var reply: JSONObject = ["guid": .string(VMGenID.guidString(guid))]
            switch c.machine.generationIDChange ?? VMGenID.ChangeStatus.unchanged {
            case .unchanged:
                reply["pending"] = false
                reply["acknowledged"] = false
            case .pending:
                reply["pending"] = true
                reply["acknowledged"] = false
            case .acknowledged(let ack):
                reply["pending"] = false
                reply["acknowledged"] = true
                reply["ack-latency-ms"] = .double(ack.latencyMilliseconds)
            }
            return .success(.object(reply))
        },
        MachineCommand("set-vm-generation-id", [.required("guid", .string)]) { c, args, _ throws(QMPError) in
            let text = try args.string("guid")
            let guid: [UInt8]
            if text == "auto" {
                guid = VMGenID.randomGUID()
            } else if let parsed = VMGenID.parseGUID(text) {
                guid = parsed
            } else {
                throw .generic("Parameter 'guid' expects a UUID or \"auto\", got '\(text)'")
            }
            // CHANGED is queued before the change is made, so that the guest's acknowledgement
            // (emitted from a vCPU thread, possibly within microseconds) always comes after it.
            guard c.machine.generationID != nil else { throw .generic("VM Generation ID device not found") }
            let string = VMGenID.guidString(guid)
            c.emit("VM_GENERATION_ID_CHANGED", ["guid": .string(string)])
            guard c.machine.setGenerationID(guid) else { throw .generic("VM Generation ID device not found") }
            return .success(["guid": .string(string)])
        },
        // QEMU's TPM queries: the models and backend types this build has, and the TPM of this VM
        // (id "tpm0", model tpm-tis; `emulator` is swtpm, whose data names its control socket where
        // QEMU names a chardev; `builtin` is libtpms in this process, with its state file).
        MachineCommand("query-tpm-models", query: true) { _, _, _ throws(QMPError) in
            .success(.array(["tpm-tis"]))
        },
        MachineCommand("query-tpm-types", query: true) { _, _, _ throws(QMPError) in
            .success(.array(["emulator", "builtin"]))
        },
        MachineCommand("query-tpm", query: true) { c, _, _ throws(QMPError) in
            guard let info = c.machine.tpmInfo else { return .success(.array([])) }
            let data: JSONValue = info.kind == .emulator ? ["chardev": .string(info.path)] : ["state": .string(info.path)]
            return .success(.array([["id": "tpm0", "model": "tpm-tis",
                                     "options": ["type": .string(info.kind.rawValue), "data": data]]]))
        },
        MachineCommand("query-block", query: true) { c, _, _ throws(QMPError) in
            // QEMU's BlockInfo, for raw images behind virtio-blk.
            .success(.array(c.machine.drives.map { d in
                ["device": .string(d.name), "qdev": .string(d.id.isEmpty ? d.name : d.id), "locked": false, "removable": false,
                 "type": "unknown", "io-status": "ok",
                 "inserted": ["file": .string(d.file), "ro": .bool(d.readOnly), "drv": "raw", "encrypted": false,
                              "backing_file_depth": 0, "detect_zeroes": "off", "cache": ["writeback": false, "direct": false, "no-flush": false],
                              "image": ["filename": .string(d.file), "format": "raw", "virtual-size": .int(Int64(d.size))]]]
            }))
        },
        MachineCommand("query-rx-filter", [.optional("name", .string)], query: true) { c, args, _ throws(QMPError) in
            // The device does no filtering: everything the tap delivers reaches the guest.
            let name = try args.optionalString("name")
            let nets = c.machine.networks.filter { name == nil || $0.name == name }
            if let name, nets.isEmpty { throw .deviceNotFound(name) }
            return .success(.array(nets.map { n in
                ["name": .string(n.name), "main-mac": .string(n.mac.map { hexByte($0) }.joined(separator: ":")),
                 "promiscuous": true, "multicast": "normal", "unicast": "normal", "vlan": "normal",
                 "broadcast-allowed": true, "multicast-overflow": false, "unicast-overflow": false,
                 "unicast-table": .array([]), "multicast-table": .array([]), "vlan-table": .array([])]
            }))
        },
        MachineCommand("set_link", [.required("name", .string), .required("up", .boolean)]) { c, args, _ throws(QMPError) in
            let name = try args.string("name")
            let up = try args.bool("up")
            guard c.machine.setLink(name, up: up) else { throw .deviceNotFound(name) }
            return .success([:])
        },
        MachineCommand("snapshot-create", [.required("path", .string), .optional("live", .boolean), .optional("copy-drives", .boolean)]) { c, args, _ throws(QMPError) in
            // Runs on a worker thread (it writes all of guest memory) while the monitor answers
            // queries. Pauses the vCPUs for the save when they run (each completes the I/O it is
            // in; the devices have no work in flight outside a vCPU exit) and resumes them after,
            // or, with "live": true, as soon as a child process holds memory as it was at the pause.
            let path = try args.string("path")
            let live = try args.optionalBool("live") ?? false
            // "copy-drives": true puts each drive's image into the snapshot (drive<N>.img).
            let copyDrives = try args.optionalBool("copy-drives") ?? false
            guard !path.isEmpty else { throw .generic("Parameter 'path' must not be empty") }
            return .long { [c] in
                c.saving.store(true, ordering: .releasing)
                defer { c.saving.store(false, ordering: .releasing) }
                let r: SnapshotReport
                do { r = try c.machine.createSnapshot(at: path, live: live, copyDrives: copyDrives) } catch {
                    return .failure(.generic("snapshot-create: \(error)"))
                }
                return .success(["path": .string(path), "size": .int(Int64(r.diskBytes)),
                                 "memory-size": .int(Int64(r.memoryBytes)), "time-ms": .double(milliseconds(r.duration)),
                                 "pause-ms": .double(milliseconds(r.pause)), "live": .bool(live)])
            }
        },
    ]

    private static let byName: [String: MachineCommand] = Dictionary(uniqueKeysWithValues: table.map { ($0.name, $0) })

    public static let names = table.map(\.name)
    public static let queryNames: Set<String> = Set(table.filter(\.isQuery).map(\.name))

    public var commandNames: [String] { Self.names }

    public func isQuery(_ command: String) -> Bool { Self.queryNames.contains(command) }

    public func execute(_ command: String, arguments: JSONObject, context: QMPContext) -> QMPCommandResult {
        guard let entry = Self.byName[command] else { return .failure(.commandNotFound(command)) }
        do throws(QMPError) {
            var args = try QMPArguments.validated(arguments, against: entry.parameters)
            return try entry.run(self, &args, context)
        } catch {
            return .failure(error)
        }
    }
}

/// Lets the command handler emit events through a server created after it.
public final class EventRelay: Sendable {
    private let target = Mutex<QMPServer?>(nil)
    public init() {}
    public func connect(_ server: QMPServer) { target.withLock { $0 = server } }
    public func emit(_ event: String, _ data: JSONValue?) {
        target.withLock { $0 }?.emit(event: event, data: data)
    }
}

extension MachineExit {
    /// QMP's SHUTDOWN event data for how the run ended.
    public var shutdownEventData: JSONValue {
        ["guest": .bool(cause.isGuest), "reason": .string(cause.reason)]
    }
}

/// A duration in milliseconds, to the microsecond.
func milliseconds(_ d: Duration) -> Double {
    let ms = Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
    return (ms * 1000).rounded() / 1000
}

/// "0a": a byte as two lowercase hex digits.
func hexByte(_ b: UInt8) -> String { b < 16 ? "0" + String(b, radix: 16) : String(b, radix: 16) }
