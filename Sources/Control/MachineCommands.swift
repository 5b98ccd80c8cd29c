import Devices
import Machine
import QMP
import Synchronization

/// The machine's QMP commands (beyond the monitor's own `qmp_capabilities`, `query-commands`,
/// `query-version` and the fd-set commands), with QEMU's names, arguments, results and events.
public final class MachineCommands: QMPCommandHandler {
    public typealias Emit = @Sendable (_ event: String, _ data: JSONValue?) -> Void

    private let machine: Machine
    private let emit: Emit

    public init(machine: Machine, emit: @escaping Emit) {
        self.machine = machine
        self.emit = emit
    }

    public static let names = [
        "query-status", "stop", "cont", "system_powerdown", "system_reset", "quit",
        "query-vm-generation-id", "set-vm-generation-id", "snapshot-create",
    ]

    public var commandNames: [String] { Self.names }

    public func execute(_ command: String, arguments: JSONObject, context: QMPContext) -> Result<JSONValue, QMPError> {
        var args = QMPArguments(arguments)
        do {
            switch command {
            case "query-status":
                let paused = machine.isPaused
                return .success(["status": .string(paused ? "paused" : "running"), "running": .bool(!paused), "singlestep": false])
            case "stop":
                if !machine.isPaused {
                    machine.pause()
                    emit("STOP", nil)
                }
                return .success(.object([:]))
            case "cont":
                if machine.isPaused {
                    machine.resume()
                    emit("RESUME", nil)
                }
                return .success(.object([:]))
            case "system_powerdown":
                machine.pressPowerButton()
                emit("POWERDOWN", nil)
                return .success(.object([:]))
            case "system_reset":
                // Like QEMU with -no-reboot: a reset ends the VM (SHUTDOWN follows when it has).
                emit("RESET", ["guest": false, "reason": "host-qmp-system-reset"])
                let machine = self.machine
                context.afterReply { machine.requestExit(.reset("QMP system_reset")) }
                return .success(.object([:]))
            case "quit":
                let machine = self.machine
                context.afterReply { machine.requestExit(.quit("QMP quit")) }
                return .success(.object([:]))
            case "query-vm-generation-id":
                guard let id = machine.vmgenid else { return .failure(.generic("VM Generation ID device not found")) }
                return .success(["guid": .string(VMGenID.guidString(id.guid))])
            case "set-vm-generation-id":
                let text = try args.string("guid")
                let guid: [UInt8]
                if text == "auto" {
                    guid = VMGenID.randomGUID()
                } else if let parsed = VMGenID.parseGUID(text) {
                    guid = parsed
                } else {
                    return .failure(.generic("Parameter 'guid' expects a UUID or \"auto\", got '\(text)'"))
                }
                guard machine.setGenerationID(guid) else { return .failure(.generic("VM Generation ID device not found")) }
                let string = VMGenID.guidString(guid)
                emit("VM_GENERATION_ID_CHANGED", ["guid": .string(string)])
                return .success(["guid": .string(string)])
            case "snapshot-create":
                // Pauses the vCPUs for the save when they run (each completes the I/O it is in;
                // the devices have no work in flight outside a vCPU exit) and resumes them after.
                let path = try args.string("path")
                try args.finish()
                guard !path.isEmpty else { return .failure(.generic("Parameter 'path' must not be empty")) }
                let summary: SnapshotSummary
                do { summary = try machine.createSnapshot(at: path) } catch {
                    return .failure(.generic("snapshot-create: \(error)"))
                }
                let r = summary.result
                let ms = Double(r.duration.components.seconds) * 1000 + Double(r.duration.components.attoseconds) / 1e15
                return .success(["path": .string(path), "size": .int(Int64(r.diskBytes)),
                                 "memory-size": .int(Int64(r.memoryBytes)), "time-ms": .double((ms * 1000).rounded() / 1000)])
            default:
                return .failure(.commandNotFound(command))
            }
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
        switch self {
        case .poweredOff: return ["guest": true, "reason": "guest-shutdown"]
        case .reset(let how): return ["guest": .bool(!how.hasPrefix("QMP")), "reason": .string(how.hasPrefix("QMP") ? "host-qmp-system-reset" : "guest-reset")]
        case .guestCrashed: return ["guest": true, "reason": "guest-panic"]
        case .quit: return ["guest": false, "reason": "host-qmp-quit"]
        case .signalled: return ["guest": false, "reason": "host-signal"]
        case .failed: return ["guest": false, "reason": "host-error"]
        }
    }
}
