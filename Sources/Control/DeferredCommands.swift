import QMP
import Synchronization

/// Lets the QMP socket serve (and greet) before the machine exists: the monitor starts first, so a
/// client's connection is answered within a few milliseconds of process start while the kernel is
/// still being read and the VM built. Until `connect`, `isReady` is false: a machine command that
/// arrives meanwhile waits in its session (building the machine takes tens of milliseconds) while
/// the QMP thread goes on serving; the monitor's own commands never wait. Whoever connects tells
/// the server (`QMPServer.handlerBecameReady()`).
public final class DeferredCommands: QMPCommandHandler, Sendable {
    private let target = Mutex<(any QMPCommandHandler)?>(nil)

    public let commandNames: [String]
    private let queries: Set<String>

    public init(commandNames: [String] = MachineCommands.names, queries: Set<String> = MachineCommands.queryNames) {
        self.commandNames = commandNames
        self.queries = queries
    }

    /// Hands over to the real handler.
    public func connect(_ handler: any QMPCommandHandler) {
        target.withLock { $0 = handler }
    }

    public var isReady: Bool { target.withLock { $0 != nil } }

    public func isQuery(_ command: String) -> Bool { queries.contains(command) }

    public func execute(_ command: String, arguments: JSONObject, context: QMPContext) -> QMPCommandResult {
        // A session does not call this before `isReady`; a direct caller gets an error, never a wait.
        guard let handler = target.withLock({ $0 }) else {
            return .failure(.generic("the VM is still being built; try again"))
        }
        return handler.execute(command, arguments: arguments, context: context)
    }
}
