import Synchronization
import VMMSys

/// Runs the monitor's long commands (those whose handler returns `.long`, e.g. `snapshot-create`)
/// on a worker thread, one at a time, so that the QMP thread keeps serving while they run.
///
/// One per server, shared by its sessions: a client that disconnects while its long command runs
/// leaves it running (its reply is dropped), and the next client cannot start a second one
/// meanwhile. When a command finishes, its reply is queued for the session that started it and
/// `onFinish` is called (the server wakes its thread with it).
public final class QMPLongCommands: Sendable {
    /// State shared with the worker; the worker holds this, never the runner, so that the runner's
    /// deinit (which joins the worker) cannot run on the worker itself.
    private final class Shared: Sendable {
        struct State {
            var running: (name: String, session: Int, hasID: Bool)?
            var finished: [(session: Int, reply: JSONValue)] = []
            var abandoned: Set<Int> = []
        }
        let state = Mutex(State())
        let onFinish = Mutex<(@Sendable () -> Void)?>(nil)
    }

    private let shared = Shared()
    private let thread = Mutex<OSThread?>(nil)
    private let nextSession = Atomic<Int>(1)

    public init() {}

    deinit { join() }

    /// Sets what is called (on the worker thread) after a command's reply is queued.
    public func onFinish(_ action: @escaping @Sendable () -> Void) {
        shared.onFinish.withLock { $0 = action }
    }

    /// A new number for a session's replies.
    func newSession() -> Int { nextSession.add(1, ordering: .relaxed).oldValue }

    /// The long command running now: its name, the session that started it, whether it had an id.
    var running: (name: String, session: Int, hasID: Bool)? { shared.state.withLock { $0.running } }

    /// True while a long command runs.
    public var isBusy: Bool { running != nil }

    /// Starts `work` on a worker thread; its result becomes the reply (with `id`) of `session`.
    /// The caller has checked that none runs (`isBusy`). Throws when no thread can be started.
    func start(_ name: String, session: Int, id: JSONValue?,
               work: @escaping @Sendable () -> Result<JSONValue, QMPError>) throws(SysError) {
        // The previous worker has finished (it cleared `running` as its last step but one): reap it.
        thread.withLock { t -> OSThread? in
            defer { t = nil }
            return t
        }?.join()
        let shared = self.shared
        shared.state.withLock { $0.running = (name, session, id != nil) }
        do throws(SysError) {
            let worker = try OSThread(name: "qmp-long", role: .qmp) {
                let result = work()
                let reply: JSONValue
                switch result {
                case .success(let v): reply = QMPSession.successReply(v, id: id)
                case .failure(let e): reply = QMPSession.errorReply(e, id: id)
                }
                shared.state.withLock { s in
                    s.running = nil
                    if s.abandoned.contains(session) {
                        s.abandoned.remove(session)
                    } else {
                        s.finished.append((session, reply))
                    }
                }
                shared.onFinish.withLock { $0 }?()
            }
            thread.withLock { $0 = worker }
        } catch {
            shared.state.withLock { $0.running = nil }
            throw error
        }
    }

    /// The replies of `session`'s long commands that finished, in order.
    func takeReplies(session: Int) -> [JSONValue] {
        shared.state.withLock { s in
            guard s.finished.contains(where: { $0.session == session }) else { return [] }
            let mine = s.finished.filter { $0.session == session }.map(\.reply)
            s.finished.removeAll { $0.session == session }
            return mine
        }
    }

    /// `session` is gone: the reply of its running command, and any not yet taken, are dropped.
    func abandon(session: Int) {
        shared.state.withLock { s in
            s.finished.removeAll { $0.session == session }
            if s.running?.session == session { s.abandoned.insert(session) }
        }
    }

    /// Waits until the running long command (if any) has finished. Not from the worker itself.
    public func join() {
        thread.withLock { t -> OSThread? in
            defer { t = nil }
            return t
        }?.join()
    }
}
