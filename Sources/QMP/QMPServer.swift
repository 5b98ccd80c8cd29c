import Glibc
import Synchronization
import VMMSys

/// Bounds that keep a client from costing the VMM unbounded memory or time.
public struct QMPServerLimits: Sendable, Equatable {
    /// Largest message and deepest nesting accepted from a client.
    public var json = JSONLimits()
    /// Bytes read per recvmsg.
    public var readChunk = 16 * 1024
    /// Replies and events waiting for a client that does not read: past this, the client is dropped.
    public var maxOutputBytes = 1 << 20
    /// Above this much unsent output, no further command is executed until the client reads.
    public var outputHighWater = 64 * 1024
    /// Events emitted and not yet handed to the server thread; more are dropped (and counted).
    public var maxPendingEvents = 1024
    /// How long a reply may take to reach the client before `afterReply` actions run anyway, and how
    /// long a client that closed its sending side gets to read the remaining replies.
    public var flushTimeoutMilliseconds: Int32 = 2000
    /// A client with output waiting that takes none of it for this long is dropped: one that sends
    /// commands and never reads their replies would otherwise hold the monitor (clients are served
    /// in turn) forever.
    public var stalledOutputMilliseconds: Int32 = 10_000

    public init() {}
}

/// A QMP monitor on a Unix stream socket, served by its own OS thread.
///
/// One client at a time, like a QEMU `-qmp unix:PATH,server=on,wait=off` monitor: while a client
/// is connected, later connections wait in the listen backlog; when it disconnects, the next one
/// is accepted and gets a fresh greeting. The thread polls the listening socket (only while no
/// client is connected), the client socket and an eventfd that `emit` and `stop` signal.
///
/// Writes never block the thread: output is queued and sent as the socket accepts it, and a
/// client whose queue exceeds `limits.maxOutputBytes` is disconnected. Long commands
/// (`QMPCommandResult.long`) run on a worker thread (`longCommands`), which wakes this thread with
/// the eventfd when their reply is ready.
public final class QMPServer: Sendable {
    public let path: String
    public let fdSets: FdSets
    public let namedFDs: QMPNamedFDs
    public let version: QMPVersion
    public let limits: QMPServerLimits
    private let handler: (any QMPCommandHandler)?
    private let listener: UnixListener
    private let wake: EventFD
    /// The long command running (at most one, whichever client started it).
    public let longCommands = QMPLongCommands()

    private struct Shared {
        var events: [(name: String, data: JSONValue?, time: QMPTimestamp)] = []
        var droppedEvents = 0
        var stopping = false
        var handlerBecameReady = false
        var started = false
        var socketRemoved = false
        var clientConnected = false
        var clientsAccepted = 0
        var thread: ThreadIdentity?
    }
    private let shared = Mutex(Shared())
    private let threadBox = Mutex<OSThread?>(nil)

    /// Creates the socket at `path` (mode 0600) and listens. The path appears only once the socket
    /// listens: it is bound under a temporary name in the same directory first, then renamed.
    /// A stale socket file left by a dead process is replaced; a path held by a live server
    /// (EADDRINUSE) or by anything but a socket (EEXIST) is refused, and so are an empty path and
    /// one longer than 107 bytes (clients could not connect to it). Temporary names left by a
    /// server killed between bind and rename are removed. Clients can connect from now on; they
    /// are served after `start()`.
    public init(path: String, handler: (any QMPCommandHandler)?, fdSets: FdSets = FdSets(),
                namedFDs: QMPNamedFDs = QMPNamedFDs(), version: QMPVersion = .swiftVMM,
                limits: QMPServerLimits = QMPServerLimits()) throws(SysError) {
        self.path = path
        self.handler = handler
        self.fdSets = fdSets
        self.namedFDs = namedFDs
        self.version = version
        self.limits = limits
        wake = try EventFD()
        listener = try UnixListener(path: path, description: "QMP socket", temporaryPrefix: Self.temporaryPrefix)
        longCommands.onFinish { [weak self] in self?.wake.signal() }
    }

    deinit {
        stop()
    }

    /// Temporary socket names are this, the pid, "-", random hex.
    static let temporaryPrefix = ".swiftvmm-qmp-"

    /// Removes the socket file, once, if it is still the one this server created.
    private func unlinkSocket() {
        let first = shared.withLock { s -> Bool in
            defer { s.socketRemoved = true }
            return !s.socketRemoved
        }
        guard first else { return }
        listener.removeSocketFile()
    }

    /// Starts serving on a new thread named "qmp". Calling it again does nothing.
    public func start() throws(SysError) {
        let go = shared.withLock { s -> Bool in
            guard !s.started && !s.stopping else { return false }
            s.started = true
            return true
        }
        guard go else { return }
        do throws(SysError) {
            let thread = try OSThread(name: "qmp", role: .qmp) { [self] in
                shared.withLock { $0.thread = .current }
                run()
            }
            threadBox.withLock { $0 = thread }
        } catch {
            shared.withLock { $0.started = false }
            throw error
        }
    }

    /// Stops serving: a long command still running is waited for (a machine's `snapshot-create`
    /// rolls back at once when the machine has ended), the client (if any) gets what was queued for
    /// it, that command's reply included, within the flush timeout and is disconnected, the socket
    /// file is removed. Safe to call from any thread, more than once; from the server's own thread
    /// (a command handler) it only asks the loop to end.
    public func stop() {
        let onServerThread = shared.withLock { s -> Bool in
            s.stopping = true
            return s.thread == .current
        }
        wake.signal()
        if onServerThread { return }
        let thread = threadBox.withLock { t -> OSThread? in
            defer { t = nil }
            return t
        }
        thread?.join()
        longCommands.join()
        unlinkSocket()
    }

    /// Queues event `name` for the connected client, stamped now. Callable from any thread,
    /// including vCPU threads and command handlers: it takes a lock briefly and writes an eventfd,
    /// never waits for the client (not from a signal handler, though: the lock is not
    /// async-signal-safe). Dropped when no negotiated client is connected by the time the server thread looks,
    /// or when `limits.maxPendingEvents` are already waiting.
    public func emit(event name: String, data: JSONValue? = nil) {
        let time = QMPTimestamp.now()
        let queued = shared.withLock { s -> Bool in
            guard !s.stopping, s.events.count < limits.maxPendingEvents else {
                s.droppedEvents += 1
                return false
            }
            s.events.append((name, data, time))
            return true
        }
        if queued { wake.signal() }
    }

    /// The handler's `isReady` turned true: the requests that waited for it are handled now, before
    /// a `stop()` that follows (so a machine that could not be built still answers them, with an
    /// error). Callable from any thread; it never waits.
    public func handlerBecameReady() {
        shared.withLock { $0.handlerBecameReady = true }
        wake.signal()
    }

    /// Events dropped because too many were waiting.
    public var droppedEventCount: Int { shared.withLock { $0.droppedEvents } }

    /// True while a client is connected.
    public var isClientConnected: Bool { shared.withLock { $0.clientConnected } }

    /// Clients accepted so far.
    public var clientsAccepted: Int { shared.withLock { $0.clientsAccepted } }

    // MARK: The server thread

    private final class Connection {
        let stream: UnixStream
        let session: QMPSession
        var output: [UInt8] = []
        var sent = 0
        var peerDone = false
        var peerDoneAt: Int64 = 0
        var failed = false
        /// Since when output has waited without the client taking any (nil: none waits).
        var stalledSince: Int64?

        init(stream: consuming UnixStream, session: QMPSession) {
            self.stream = stream
            self.session = session
        }

        var pending: Int { output.count - sent }

        func append(_ message: JSONValue) {
            if sent > 0 && sent == output.count {
                output.removeAll(keepingCapacity: true)
                sent = 0
            }
            message.serialize(into: &output)
            output.append(0x0A)
        }

        /// Sends what the socket takes now. False when the connection failed.
        func flush() -> Bool {
            var progressed = false
            defer {
                if pending == 0 { stalledSince = nil } else if progressed || stalledSince == nil { stalledSince = monotonicMilliseconds() }
            }
            while sent < output.count {
                let result = output.withUnsafeBytes { buf -> Result<Int, SysError> in
                    do throws(SysError) {
                        return .success(try stream.send(UnsafeRawBufferPointer(rebasing: buf[sent...])))
                    } catch {
                        return .failure(error)
                    }
                }
                guard case .success(let n) = result else {
                    failed = true
                    return false
                }
                if n == 0 { break } // the socket buffer is full
                sent += n
                progressed = true
            }
            if sent == output.count {
                output.removeAll(keepingCapacity: output.capacity <= 1 << 16)
                sent = 0
            } else if sent > 1 << 16 {
                output.removeFirst(sent)
                sent = 0
            }
            return true
        }

        /// Sends everything, waiting up to `timeout` ms for the client to read.
        func flush(timeoutMilliseconds timeout: Int32) {
            let deadline = monotonicMilliseconds() + Int64(timeout)
            while pending > 0 && !failed {
                guard flush() else { return }
                if pending == 0 { return }
                let left = deadline - monotonicMilliseconds()
                if left <= 0 { return }
                _ = stream.waitWritable(timeoutMilliseconds: Int32(min(left, 1000)))
            }
        }
    }

    private func run() {
        var client: Connection?
        var readBuffer = [UInt8](repeating: 0, count: max(1, limits.readChunk))
        // After accept fails for lack of resources (EMFILE...), the listening socket stays readable:
        // leave it alone for a while rather than spin.
        var acceptPausedUntil: Int64 = 0
        while true {
            if let c = client { sendLongCommandReplies(c); sendEvents(c) } else { shared.withLock { $0.events = [] } }
            // Read together: a stop that follows handlerBecameReady() is seen with it.
            let (handlerReady, stopping) = shared.withLock { s -> (Bool, Bool) in
                defer { s.handlerBecameReady = false }
                return (s.handlerBecameReady, s.stopping)
            }
            // Requests that waited for the handler go before that stop.
            if handlerReady, let c = client, c.pending <= limits.outputHighWater, c.session.hasBufferedInput {
                process(c)
            }
            if stopping { break }
            if let c = client {
                if !c.flush() || c.pending > limits.maxOutputBytes
                    || (c.stalledSince.map { monotonicMilliseconds() - $0 > Int64(limits.stalledOutputMilliseconds) } ?? false) {
                    client = nil
                    disconnect(c)
                    continue
                }
                // A client that closed its sending side still gets the replies of commands in flight.
                if c.peerDone && !c.session.hasCommandInFlight
                    && (c.pending == 0 || monotonicMilliseconds() - c.peerDoneAt > Int64(limits.flushTimeoutMilliseconds)) {
                    client = nil
                    disconnect(c)
                    continue
                }
                // Commands left buffered while the output was over the high-water mark: the client
                // may have read enough by now, and nothing else would wake us for them.
                if c.pending <= limits.outputHighWater && c.session.hasBufferedInput {
                    process(c)
                    continue
                }
            }

            var polls = PollSet()
            polls.add(wake.fd, .readable)
            if let c = client {
                var ev: PollEvents = []
                // Not reading while a request waits (for a long command or the handler) bounds the buffered input.
                if !c.peerDone && c.pending <= limits.outputHighWater && !c.session.isWaiting { ev.insert(.readable) }
                if c.pending > 0 { ev.insert(.writable) }
                polls.add(c.stream.fd, ev)
            } else {
                let paused = monotonicMilliseconds() < acceptPausedUntil
                polls.add(listener.fd, paused ? [] : .readable)
            }
            var timeout: Int32 = client?.peerDone == true || (client == nil && acceptPausedUntil > 0) ? 100 : -1
            // Output waiting: wake up in time to drop a client that has stopped reading.
            if let c = client, c.pending > 0 { timeout = timeout < 0 ? 250 : min(timeout, 250) }
            // An interrupted wait reports nothing ready: the loop re-checks its state.
            guard let ready = try? polls.wait(timeoutMilliseconds: timeout) else {
                break // cannot happen with valid descriptors; end rather than spin
            }
            if !ready[0].isEmpty { wake.consume() }
            let revents = ready[1]
            guard !revents.isEmpty else { continue }
            if let c = client {
                if revents.contains(.writable) && !c.flush() {
                    client = nil
                    disconnect(c)
                    continue
                }
                if !revents.isDisjoint(with: [.readable, .hangup, .error]) && !c.peerDone {
                    if !receive(c, buffer: &readBuffer) {
                        client = nil
                        disconnect(c)
                        continue
                    }
                }
                // Commands left waiting while the output was over the high-water mark.
                if c.pending <= limits.outputHighWater { process(c) }
            } else {
                switch acceptClient() {
                case .success(let c):
                    client = c
                    acceptPausedUntil = 0
                case .failure(let e) where e.errno == EMFILE || e.errno == ENFILE || e.errno == ENOBUFS || e.errno == ENOMEM:
                    acceptPausedUntil = monotonicMilliseconds() + 100
                case .failure:
                    break // the client went away before we took it (EAGAIN, ECONNABORTED, EINTR)
                }
            }
        }
        // Stopping: the long command, if one runs, is waited for and its reply sent.
        longCommands.join()
        if let c = client {
            sendLongCommandReplies(c)
            c.flush(timeoutMilliseconds: limits.flushTimeoutMilliseconds)
            disconnect(c)
        }
        unlinkSocket()
    }

    private func acceptClient() -> Result<Connection, SysError> {
        let stream: UnixStream
        do throws(SysError) { stream = try listener.accept() } catch { return .failure(error) }
        let session = QMPSession(handler: handler, fdSets: fdSets, namedFDs: namedFDs, version: version,
                                 limits: limits.json, longCommands: longCommands)
        let c = Connection(stream: stream, session: session)
        c.append(session.greeting)
        shared.withLock {
            $0.clientConnected = true
            $0.clientsAccepted += 1
        }
        return .success(c)
    }

    private func disconnect(_ c: Connection) {
        // Actions of a command whose reply could not be sent still run (quit must still quit).
        let actions = c.session.takeAfterReplyActions()
        c.session.close()
        for action in actions { action() }
        shared.withLock { $0.clientConnected = false }
    }

    /// Reads once and handles the complete messages. False when the connection is to be dropped.
    private func receive(_ c: Connection, buffer: inout [UInt8]) -> Bool {
        let received = buffer.withUnsafeMutableBytes { buf -> Result<UnixStream.Received, SysError> in
            do throws(SysError) { return .success(try c.stream.receive(into: buf)) } catch { return .failure(error) }
        }
        switch received {
        case .failure:
            return false
        case .success(.wouldBlock):
            return true
        case .success(.endOfStream):
            // The client closed its sending side: it may still read the remaining replies.
            c.peerDone = true
            c.peerDoneAt = monotonicMilliseconds()
            return true
        case .success(.data(let n, let fds)):
            c.session.feed(buffer.prefix(n), fds: fds)
            return true
        }
    }

    /// Queues the pending events for `c` (dropped if it has not negotiated).
    private func sendEvents(_ c: Connection) {
        let events = shared.withLock { s in
            defer { s.events = [] }
            return s.events
        }
        for e in events {
            if let m = c.session.eventMessage(e.name, data: e.data, timestamp: e.time) { c.append(m) }
        }
    }

    /// Queues the replies of `c`'s long commands that finished, after the events emitted before
    /// (those of the command come before its reply, as for any command).
    private func sendLongCommandReplies(_ c: Connection) {
        let replies = c.session.takeLongCommandReplies()
        guard !replies.isEmpty else { return }
        sendEvents(c)
        for r in replies { c.append(r) }
        // A client that closed its sending side gets the flush timeout from now to read it.
        if c.peerDone { c.peerDoneAt = monotonicMilliseconds() }
    }

    /// Executes buffered commands until none is complete or the output is over the high-water mark.
    private func process(_ c: Connection) {
        while c.pending <= limits.outputHighWater {
            // Events emitted before the command are judged by the session's state before it (no
            // event before qmp_capabilities' reply); those the command emitted go out before its
            // reply, as in QEMU (STOP before stop's return).
            sendEvents(c)
            guard let reply = c.session.nextReply() else { break }
            sendEvents(c)
            c.append(reply)
            let actions = c.session.takeAfterReplyActions()
            if !actions.isEmpty {
                c.flush(timeoutMilliseconds: limits.flushTimeoutMilliseconds)
                for action in actions { action() }
            }
        }
        _ = c.flush()
    }
}
