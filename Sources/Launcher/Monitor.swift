import Control
import Machine
import QMP
import VMMSys

/// The QMP monitor of one VM (when --qmp is given): served before the machine exists, its machine
/// commands waiting (in their session, not on the QMP thread) until `attach`.
struct Monitor {
    let server: QMPServer?
    let deferred: DeferredCommands?
    let relay: EventRelay

    /// Starts serving QMP at `path` (nil: no monitor).
    static func start(path: String?, fdSets: FdSets) throws(SysError) -> Monitor {
        let relay = EventRelay()
        guard let path else { return Monitor(server: nil, deferred: nil, relay: relay) }
        let deferred = DeferredCommands()
        let server = try QMPServer(path: path, handler: deferred, fdSets: fdSets)
        relay.connect(server)
        try server.start()
        return Monitor(server: server, deferred: deferred, relay: relay)
    }

    func attach(_ machine: Machine) {
        let relay = self.relay
        deferred?.connect(MachineCommands(machine: machine) { relay.emit($0, $1) })
        server?.handlerBecameReady()
    }

    /// The VM ended: a SHUTDOWN event, then the server stops (the socket file is removed).
    func finish(shutdownData: JSONValue) {
        guard let server else { return }
        server.emit(event: "SHUTDOWN", data: shutdownData)
        server.stop()
    }

    /// The VM could not be started: machine commands (those waiting included) fail with `reason`,
    /// and the server stops (the socket file is removed).
    func abandon(reason: String) {
        guard let server else { return }
        deferred?.connect(UnavailableMachine(reason: reason))
        server.handlerBecameReady()
        server.stop()
    }
}

/// The machine commands' handler when there is no machine.
private final class UnavailableMachine: QMPCommandHandler {
    let reason: String
    let commandNames = MachineCommands.names
    init(reason: String) { self.reason = reason }

    func execute(_ command: String, arguments: JSONObject, context: QMPContext) -> QMPCommandResult {
        .done(.failure(.generic("the VM could not be started: \(reason)")))
    }
}
