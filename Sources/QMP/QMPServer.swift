import CLinux
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
    private let listener: OwnedFD
    private let wake: EventFD
    /// The long command running (at most one, whichever client started it).
    public let longCommands = QMPLongCommands()
    private let socketIdentity: (dev: UInt64, ino: UInt64)

    private struct Shared {
        var events: [(name: String, data: JSONValue?, time: QMPTimestamp)] = []
        var droppedEvents = 0
        var stopping = false
        var started = false
        var socketRemoved = false
        var clientConnected = false
        var clientsAccepted = 0
        var threadID: pthread_t?
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
        let fd = try retryingEINTR("socket") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0) }
        listener = OwnedFD(adopting: fd)
        socketIdentity = try Self.createSocketFile(listening: fd, at: path)
        longCommands.onFinish { [weak self] in self?.wake.signal() }
    }

    deinit {
        stop()
    }

    /// Temporary socket names are this, the pid, "-", random hex.
    static let temporaryPrefix = ".swiftvmm-qmp-"

    /// Linux's O_PATH (the same on x86-64 and arm64), which Swift's Glibc module leaves out.
    private static let openPathOnly: Int32 = 0o10000000

    /// Binds `fd` under a temporary name in `path`'s directory, listens, and renames the file to
    /// `path`. Returns the identity of the file (rename keeps the inode).
    private static func createSocketFile(listening fd: Int32, at path: String) throws(SysError) -> (dev: UInt64, ino: UInt64) {
        guard !path.isEmpty else { throw SysError("create the QMP socket (the QMP socket path is empty)", errno: EINVAL) }
        // sun_path holds 108 bytes, the terminating NUL included: nobody could connect to a longer path.
        guard path.utf8.count <= 107 else {
            throw SysError("create the QMP socket \(path) (the QMP socket path is longer than 107 bytes, the limit of Unix socket addresses)", errno: ENAMETOOLONG)
        }
        let directory: String
        let name: String
        if let slash = path.lastIndex(of: "/") {
            directory = slash == path.startIndex ? "/" : String(path[..<slash])
            name = String(path[path.index(after: slash)...])
        } else {
            directory = "."
            name = path
        }
        guard !name.isEmpty && name != "." && name != ".." else {
            throw SysError("create the QMP socket \(path) (the path names a directory)", errno: EISDIR)
        }
        let dir = try OwnedFD.open(directory, flags: openPathOnly | O_DIRECTORY)
        // Names relative to the directory's descriptor: short whatever the directory's length.
        let inDirectory = "/proc/self/fd/\(dir.rawValue)/"
        removeStaleTemporaries(in: dir.rawValue)
        try removeStaleSocket(path)

        // The file bind creates takes the socket inode's mode (less the umask): no window at 0777.
        _ = fchmod(fd, 0o600)
        var temporary = ""
        var collisions = 0
        while true {
            temporary = "\(temporaryPrefix)\(getpid())-\(String(UInt64.random(in: .min ... .max), radix: 16))"
            do throws(SysError) {
                _ = try retryingEINTR("bind \(path) (under a temporary name)") { clinux_unix_bind(fd, inDirectory + temporary) }
                break
            } catch {
                guard error.errno == EADDRINUSE && collisions < 3 else { throw error }
                collisions += 1
            }
        }
        do throws(SysError) {
            _ = fchmodat(dir.rawValue, temporary, 0o600, 0)
            var st = stat()
            guard fstatat(dir.rawValue, temporary, &st, AT_SYMLINK_NOFOLLOW) == 0 else { throw SysError.last("stat \(path)") }
            _ = try retryingEINTR("listen \(path)") { listen(fd, 8) }
            try moveIntoPlace(inDirectory + temporary, directory: dir.rawValue, temporary: temporary, path: path, name: name)
            return (UInt64(st.st_dev), UInt64(st.st_ino))
        } catch {
            unlinkat(dir.rawValue, temporary, 0)
            throw error
        }
    }

    /// Renames the temporary socket file to `path`, never over something else: another stale
    /// socket that appeared meanwhile is removed, a live server's socket or another file refused.
    private static func moveIntoPlace(_ from: String, directory dir: Int32, temporary: String, path: String, name: String) throws(SysError) {
        let to = "/proc/self/fd/\(dir)/\(name)"
        for _ in 0..<4 {
            if clinux_rename_noreplace(from, to) == 0 { return }
            var err = errno
            if err == EINVAL {
                // No RENAME_NOREPLACE on this file system: a hard link refuses an existing name too.
                if linkat(dir, temporary, dir, name, 0) == 0 {
                    unlinkat(dir, temporary, 0)
                    return
                }
                err = errno
            }
            guard err == EEXIST || err == EINTR else { throw SysError("rename the QMP socket to \(path)", errno: err) }
            if err == EEXIST { try removeStaleSocket(path) }
        }
        throw SysError("create the QMP socket \(path) (the path keeps being taken)", errno: EEXIST)
    }

    /// Removes temporary socket files in `dir` left by a server killed between bind and rename:
    /// named `temporaryPrefix` PID "-" HEX, a socket nobody listens on, and that pid is not a
    /// live process. Anything else stays. Best effort: failures are ignored.
    private static func removeStaleTemporaries(in dir: Int32) {
        let listing = clinux_open("/proc/self/fd/\(dir)", O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0)
        guard listing >= 0 else { return }
        guard let stream = fdopendir(listing) else {
            Glibc.close(listing)
            return
        }
        var candidates: [(name: String, pid: pid_t)] = []
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if let pid = temporaryOwner(name) { candidates.append((name, pid)) }
        }
        closedir(stream)
        for (name, pid) in candidates {
            guard pid != getpid(), kill(pid, 0) != 0 && errno == ESRCH else { continue }
            var st = stat()
            guard fstatat(dir, name, &st, AT_SYMLINK_NOFOLLOW) == 0, st.st_mode & S_IFMT == S_IFSOCK else { continue }
            let probe = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
            guard probe >= 0 else { return }
            let rc = clinux_unix_connect(probe, "/proc/self/fd/\(dir)/\(name)")
            let err = errno
            Glibc.close(probe)
            if rc != 0 && err == ECONNREFUSED { unlinkat(dir, name, 0) }
        }
    }

    /// The pid in a temporary socket name (`temporaryPrefix` DIGITS "-" HEX), nil for other names.
    static func temporaryOwner(_ name: String) -> pid_t? {
        guard name.hasPrefix(temporaryPrefix) else { return nil }
        let parts = name.dropFirst(temporaryPrefix.count).split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2, (1...10).contains(parts[0].count), parts[0].allSatisfy({ $0.isASCII && $0.isNumber }),
              (1...16).contains(parts[1].count), parts[1].allSatisfy({ $0.isASCII && $0.isHexDigit }),
              let pid = pid_t(parts[0]), pid > 0 else { return nil }
        return pid
    }

    private static func removeStaleSocket(_ path: String) throws(SysError) {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        guard st.st_mode & S_IFMT == S_IFSOCK else { throw SysError("create the QMP socket \(path) (a file that is not a socket is in the way)", errno: EEXIST) }
        // A socket someone listens on belongs to a live server: connecting tells. Nonblocking, so a
        // full backlog (EAGAIN) cannot hang us; it means "in use" as well.
        let probe = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        if probe >= 0 {
            let rc = clinux_unix_connect(probe, path)
            let err = errno
            Glibc.close(probe)
            if rc == 0 || err == EAGAIN || err == EINPROGRESS {
                throw SysError("create the QMP socket \(path) (another server is listening on it)", errno: EADDRINUSE)
            }
            guard err == ECONNREFUSED else { throw SysError("probe the QMP socket \(path)", errno: err) }
        }
        guard unlink(path) == 0 || errno == ENOENT else { throw SysError.last("unlink the stale socket \(path)") }
    }

    /// Removes the socket file, once, if it is still the one this server created.
    private func unlinkSocket() {
        let first = shared.withLock { s -> Bool in
            defer { s.socketRemoved = true }
            return !s.socketRemoved
        }
        guard first else { return }
        var st = stat()
        if lstat(path, &st) == 0 && UInt64(st.st_dev) == socketIdentity.dev && UInt64(st.st_ino) == socketIdentity.ino {
            unlink(path)
        }
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
            let thread = try OSThread(name: "qmp") { [self] in
                shared.withLock { $0.threadID = pthread_self() }
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
            if let t = s.threadID { return pthread_equal(t, pthread_self()) != 0 }
            return false
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

    /// Events dropped because too many were waiting.
    public var droppedEventCount: Int { shared.withLock { $0.droppedEvents } }

    /// True while a client is connected.
    public var isClientConnected: Bool { shared.withLock { $0.clientConnected } }

    /// Clients accepted so far.
    public var clientsAccepted: Int { shared.withLock { $0.clientsAccepted } }

    // MARK: The server thread

    private final class Connection {
        let fd: OwnedFD
        let session: QMPSession
        var output: [UInt8] = []
        var sent = 0
        var peerDone = false
        var peerDoneAt: Int64 = 0
        var failed = false

        init(fd: consuming OwnedFD, session: QMPSession) {
            self.fd = fd
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
            while sent < output.count {
                let n = output.withUnsafeBytes { buf in
                    send(fd.rawValue, buf.baseAddress! + sent, buf.count - sent, Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT))
                }
                if n < 0 {
                    if errno == EINTR { continue }
                    if errno == EAGAIN || errno == EWOULDBLOCK { break }
                    failed = true
                    return false
                }
                sent += n
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
                var p = pollfd(fd: fd.rawValue, events: Int16(POLLOUT), revents: 0)
                _ = poll(&p, 1, Int32(min(left, 1000)))
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
            if shared.withLock({ $0.stopping }) { break }
            if let c = client {
                if !c.flush() || c.pending > limits.maxOutputBytes {
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

            var polls = [pollfd(fd: wake.fd.rawValue, events: Int16(POLLIN), revents: 0)]
            if let c = client {
                var ev: Int32 = 0
                // Not reading while a request waits for a long command bounds the buffered input.
                if !c.peerDone && c.pending <= limits.outputHighWater && !c.session.isWaitingForLongCommand { ev |= Int32(POLLIN) }
                if c.pending > 0 { ev |= Int32(POLLOUT) }
                polls.append(pollfd(fd: c.fd.rawValue, events: Int16(ev), revents: 0))
            } else {
                let paused = monotonicMilliseconds() < acceptPausedUntil
                polls.append(pollfd(fd: listener.rawValue, events: paused ? 0 : Int16(POLLIN), revents: 0))
            }
            let timeout: Int32 = client?.peerDone == true || (client == nil && acceptPausedUntil > 0) ? 100 : -1
            let rc = poll(&polls, nfds_t(polls.count), timeout)
            if rc < 0 {
                if errno == EINTR { continue }
                break // cannot happen with valid descriptors; end rather than spin
            }
            if polls[0].revents != 0 {
                var counter: UInt64 = 0
                _ = withUnsafeMutableBytes(of: &counter) { Glibc.read(wake.fd.rawValue, $0.baseAddress, 8) }
            }
            let revents = polls[1].revents
            guard revents != 0 else { continue }
            if let c = client {
                if revents & Int16(POLLOUT) != 0 && !c.flush() {
                    client = nil
                    disconnect(c)
                    continue
                }
                if revents & Int16(POLLIN | POLLHUP | POLLERR) != 0 && !c.peerDone {
                    if !receive(c, buffer: &readBuffer) {
                        client = nil
                        disconnect(c)
                        continue
                    }
                }
                // Commands left waiting while the output was over the high-water mark.
                if c.pending <= limits.outputHighWater { process(c) }
            } else {
                switch accept() {
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

    private func accept() -> Result<Connection, SysError> {
        let fd = clinux_accept4(listener.rawValue, Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue))
        guard fd >= 0 else { return .failure(SysError.last("accept")) }
        let session = QMPSession(handler: handler, fdSets: fdSets, namedFDs: namedFDs, version: version,
                                 limits: limits.json, longCommands: longCommands)
        let c = Connection(fd: OwnedFD(adopting: fd), session: session)
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
        var fds = [Int32](repeating: -1, count: Int(CLINUX_MAX_PASSED_FDS))
        var nfds: Int32 = 0
        let n = buffer.withUnsafeMutableBytes { buf in
            clinux_recv_fds(c.fd.rawValue, buf.baseAddress, buf.count, Int32(MSG_DONTWAIT) | Int32(MSG_CMSG_CLOEXEC),
                            &fds, CLINUX_MAX_PASSED_FDS, &nfds)
        }
        if n < 0 {
            return errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK
        }
        if n == 0 {
            // The client closed its sending side: it may still read the remaining replies.
            for fd in fds.prefix(Int(nfds)) { Glibc.close(fd) }
            c.peerDone = true
            c.peerDoneAt = monotonicMilliseconds()
            return true
        }
        c.session.feed(buffer.prefix(n), fds: Array(fds.prefix(Int(nfds))))
        return true
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
