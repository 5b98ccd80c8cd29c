import Glibc
import QMP

/// Lets the QMP socket serve (and greet) before the machine exists: the monitor starts first, so a
/// client's connection is answered within a few milliseconds of process start while the kernel is
/// still being read and the VM built. A machine command that arrives before `connect` waits for
/// the machine (building it takes tens of milliseconds); the monitor's own commands never wait.
public final class DeferredCommands: QMPCommandHandler, @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    private var cond = pthread_cond_t()
    private var target: (any QMPCommandHandler)?

    public let commandNames: [String]
    private let queries: Set<String>

    public init(commandNames: [String] = MachineCommands.names, queries: Set<String> = MachineCommands.queryNames) {
        self.commandNames = commandNames
        self.queries = queries
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&cond, nil)
    }

    deinit {
        pthread_cond_destroy(&cond)
        pthread_mutex_destroy(&mutex)
    }

    /// Hands over to the real handler and wakes commands waiting for it.
    public func connect(_ handler: any QMPCommandHandler) {
        pthread_mutex_lock(&mutex)
        target = handler
        pthread_cond_broadcast(&cond)
        pthread_mutex_unlock(&mutex)
    }

    public func isQuery(_ command: String) -> Bool { queries.contains(command) }

    public func execute(_ command: String, arguments: JSONObject, context: QMPContext) -> QMPCommandResult {
        pthread_mutex_lock(&mutex)
        while target == nil { pthread_cond_wait(&cond, &mutex) }
        let handler = target!
        pthread_mutex_unlock(&mutex)
        return handler.execute(command, arguments: arguments, context: context)
    }
}
