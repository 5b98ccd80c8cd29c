import Synchronization
import VMMSys

/// What the machine implements: the commands beyond the monitor's own.
///
/// `execute` runs on the QMP server's thread, one command at a time, and should return promptly
/// (it delays the replies and events behind it): a command that takes longer (one that writes a
/// file, say) checks its arguments there and returns `.long` with the rest of its work, which then
/// runs on a worker thread while the monitor serves other commands. Commands it does not list in
/// `commandNames` never reach it: they get CommandNotFound.
public protocol QMPCommandHandler: AnyObject, Sendable {
    /// The commands `execute` understands (listed by `query-commands`).
    var commandNames: [String] { get }

    /// Whether `command` only reads state: such a command is answered at once also while a long
    /// command runs; any other waits until the long command has finished. Default: false.
    func isQuery(_ command: String) -> Bool

    /// Runs `command`. `arguments` is the request's `arguments` member (empty when absent); check
    /// it with `QMPArguments`, whose errors match QEMU's. Return the `return` value (`.success([:])`
    /// for commands that return nothing), the error, or `.long` with the work that produces them.
    func execute(_ command: String, arguments: JSONObject, context: QMPContext) -> QMPCommandResult

    /// False while the handler cannot run its commands yet (the machine is still being built). Its
    /// commands then wait in the session, in order, without blocking the server's thread; when it
    /// turns true, call `QMPServer.handlerBecameReady()`. Default: true.
    var isReady: Bool { get }
}

extension QMPCommandHandler {
    public func isQuery(_ command: String) -> Bool { false }
    public var isReady: Bool { true }
}

/// What a command handler returns.
public enum QMPCommandResult: Sendable {
    /// The command is done: this is its reply.
    case done(Result<JSONValue, QMPError>)
    /// A long command whose arguments were checked: `work` runs on a worker thread (signals
    /// blocked, as every OSThread starts), its result is the reply, sent when it is done with the
    /// request's `id`. One runs at a time. Meanwhile queries are answered (when the long command
    /// has an `id`: without one, nothing may overtake its reply) and other commands wait for it.
    case long(@Sendable () -> Result<JSONValue, QMPError>)

    public static func success(_ value: JSONValue) -> QMPCommandResult { .done(.success(value)) }
    public static func failure(_ error: QMPError) -> QMPCommandResult { .done(.failure(error)) }
}

/// What the greeting and `query-version` report.
public struct QMPVersion: Sendable, Equatable {
    public var major: Int
    public var minor: Int
    public var micro: Int
    public var package: String

    public init(major: Int, minor: Int, micro: Int, package: String) {
        self.major = major
        self.minor = minor
        self.micro = micro
        self.package = package
    }

    /// The QEMU version whose QMP interface SwiftVMM follows.
    public static let swiftVMM = QMPVersion(major: 8, minor: 2, micro: 0, package: "swiftvmm 0.1.0")

    /// The VersionInfo object (`query-version`'s return value).
    public var json: JSONValue {
        ["qemu": ["micro": .int(Int64(micro)), "minor": .int(Int64(minor)), "major": .int(Int64(major))],
         "package": .string(package)]
    }
}

/// An event's wall-clock time, as QMP events carry it.
public struct QMPTimestamp: Sendable, Equatable {
    public var seconds: Int64
    public var microseconds: Int64

    public init(seconds: Int64, microseconds: Int64) {
        self.seconds = seconds
        self.microseconds = microseconds
    }

    public static func now() -> QMPTimestamp {
        let now = realtimeNow()
        return QMPTimestamp(seconds: now.seconds, microseconds: now.nanoseconds / 1000)
    }

    public var json: JSONValue { ["seconds": .int(seconds), "microseconds": .int(microseconds)] }
}

/// Descriptors a client passed with `getfd` under a name, for commands that take an fd by name.
/// They belong to the monitor, not to one connection (QEMU keeps them across reconnections), and
/// are closed by `closefd`, by being taken, or with this object.
public final class QMPNamedFDs: Sendable {
    private let fds = Mutex<[String: Int32]>([:])
    public let maxCount: Int

    public init(maxCount: Int = 64) { self.maxCount = maxCount }

    deinit { fds.withLock { closeDescriptors($0.values) } }

    /// Stores `rawFD` (ownership passes here) under `name`, closing any descriptor it replaces.
    func set(_ name: String, takingOwnershipOf rawFD: Int32) throws(QMPError) {
        let result: (old: Int32?, full: Bool) = fds.withLock { d in
            if d[name] == nil && d.count >= maxCount { return (nil, true) }
            let old = d[name]
            d[name] = rawFD
            return (old, false)
        }
        if result.full {
            closeDescriptor(rawFD)
            throw .generic("Too many named file descriptors (at most \(maxCount))")
        }
        if let old = result.old { closeDescriptor(old) }
    }

    /// `closefd`: closes the descriptor named `name`; false when there is none.
    @discardableResult
    public func close(_ name: String) -> Bool {
        guard let fd = fds.withLock({ $0.removeValue(forKey: name) }) else { return false }
        closeDescriptor(fd)
        return true
    }

    /// Takes the descriptor named `name` (the caller owns it from then on), as QEMU's
    /// monitor_get_fd does.
    public func take(_ name: String) -> OwnedFD? {
        fds.withLock { $0.removeValue(forKey: name) }.map { OwnedFD(adopting: $0) }
    }

    public var names: [String] { fds.withLock { Array($0.keys).sorted() } }
}

/// What a command sees of its connection.
public final class QMPContext {
    /// The process's fd sets.
    public let fdSets: FdSets
    /// The monitor's named descriptors (`getfd`).
    public let namedFDs: QMPNamedFDs
    /// Descriptors received with SCM_RIGHTS and not yet used (raw, owned here).
    fileprivate var receivedFDs: [Int32] = []
    fileprivate var afterReplyActions: [@Sendable () -> Void] = []

    init(fdSets: FdSets, namedFDs: QMPNamedFDs) {
        self.fdSets = fdSets
        self.namedFDs = namedFDs
    }

    deinit { discardReceivedFDs() }

    /// Takes the descriptor the client passed with SCM_RIGHTS, as QEMU's qemu_chr_fe_get_msgfd
    /// does: the first of the last batch received; the rest of the batch is closed. Nil when none
    /// is pending.
    public func takeReceivedFD() -> OwnedFD? {
        takeReceivedRawFD().map { OwnedFD(adopting: $0) }
    }

    func takeReceivedRawFD() -> Int32? {
        guard let first = receivedFDs.first else { return nil }
        closeDescriptors(receivedFDs.dropFirst())
        receivedFDs = []
        return first
    }

    /// Runs `action` once the reply to the current command has been written out (or the client
    /// has gone): for `quit`, whose reply must reach the client before the process exits.
    public func afterReply(_ action: @escaping @Sendable () -> Void) {
        afterReplyActions.append(action)
    }

    var hasReceivedFDs: Bool { !receivedFDs.isEmpty }

    /// Replaces pending descriptors with a new batch (the old ones are closed, as QEMU does).
    fileprivate func receive(_ fds: [Int32]) {
        guard !fds.isEmpty else { return }
        discardReceivedFDs()
        receivedFDs = fds
    }

    fileprivate func discardReceivedFDs() {
        closeDescriptors(receivedFDs)
        receivedFDs = []
    }
}

/// One QMP connection's protocol state, without I/O: bytes and descriptors in, JSON messages out.
///
/// - On creation the client is owed `greeting`; until `qmp_capabilities` succeeds, every other
///   command gets CommandNotFound "Expecting capabilities negotiation with 'qmp_capabilities'".
/// - Requests are checked as QEMU's qmp_dispatch does; the request's `id`, any JSON value, is
///   copied into the reply. Invalid JSON gets an error reply without id and the stream goes on.
/// - Descriptors that arrive with SCM_RIGHTS wait for the next command that takes one (`add-fd`,
///   `getfd` or a handler calling `context.takeReceivedFD()`); a newer batch replaces them
///   (the older one is closed) and `close()` closes them. QEMU's Python client sends the
///   descriptor on a single space before the command, so it cannot be tied to one message.
/// - Events are only for negotiated sessions: `eventMessage` returns nil before.
///
/// Not thread-safe: one thread (the server's) drives a session.
public final class QMPSession {
    public let handler: (any QMPCommandHandler)?
    public let context: QMPContext
    public let version: QMPVersion
    public private(set) var isNegotiated = false
    private var decoder: QMPStreamDecoder
    private var closed = false
    /// Runs this session's long commands (the server's, shared by its sessions).
    public let longCommands: QMPLongCommands
    private let sessionNumber: Int
    /// A request that must wait for the running long command, or for the handler to be ready
    /// (nothing after it is read meanwhile).
    private var held: (command: String, arguments: JSONObject, id: JSONValue?)?

    /// The commands the library implements itself.
    public static let builtinCommands = [
        "qmp_capabilities", "query-commands", "query-version",
        "add-fd", "remove-fd", "query-fdsets", "getfd", "closefd",
    ]

    /// The commands of the library that are answered while a long command runs.
    static let builtinQueries: Set<String> = ["qmp_capabilities", "query-commands", "query-version", "query-fdsets"]

    /// Creates the session of a newly connected client; it counts as a connected monitor for
    /// `fdSets` until `close()`. `longCommands` runs its long commands (a server passes its own,
    /// shared by all its sessions; by default the session has its own).
    public init(handler: (any QMPCommandHandler)?, fdSets: FdSets, namedFDs: QMPNamedFDs = QMPNamedFDs(),
                version: QMPVersion = .swiftVMM, limits: JSONLimits = JSONLimits(),
                longCommands: QMPLongCommands = QMPLongCommands()) {
        self.handler = handler
        self.longCommands = longCommands
        sessionNumber = longCommands.newSession()
        self.version = version
        context = QMPContext(fdSets: fdSets, namedFDs: namedFDs)
        decoder = QMPStreamDecoder(limits: limits)
        fdSets.monitorConnected()
    }

    deinit { self.close() }

    /// The first message of a connection. No capabilities are offered: out-of-band execution
    /// needs a monitor I/O thread separate from command execution, which this server does not have.
    public var greeting: JSONValue {
        ["QMP": ["version": version.json, "capabilities": []]]
    }

    /// Buffers bytes from the client, and takes ownership of the descriptors received with them.
    public func feed(_ bytes: some Sequence<UInt8>, fds: [Int32] = []) {
        if closed {
            closeDescriptors(fds)
            return
        }
        context.receive(fds)
        decoder.feed(bytes)
    }

    /// Handles the next complete messages buffered until one has a reply now, and returns it; nil
    /// when none is complete, or when the next must wait for a running long command or for the
    /// handler to be ready (a long command's own reply comes later, from `takeLongCommandReplies`).
    public func nextReply() -> JSONValue? {
        while !closed {
            if let h = held {
                guard mayRun(h.command, id: h.id) else { return nil }
                held = nil
                if let reply = dispatch(h.command, arguments: h.arguments, id: h.id) { return reply }
                continue
            }
            guard let item = decoder.next() else { return nil }
            switch item {
            case .value(let request):
                if let reply = handle(request) { return reply }
            case .error(let e):
                return Self.errorReply(.generic("JSON parse error, \(e.message)"), id: nil)
            }
        }
        return nil
    }

    /// Replies of this session's long commands that finished since the last call, in order.
    public func takeLongCommandReplies() -> [JSONValue] {
        closed ? [] : longCommands.takeReplies(session: sessionNumber)
    }

    /// True while a long command this session started runs, or a request waits (for a long command
    /// or for the handler): its reply is still to come.
    public var hasCommandInFlight: Bool {
        !closed && (held != nil || longCommands.running?.session == sessionNumber)
    }

    /// True while the next request waits for a running long command or for the handler to be
    /// ready: reading more input is pointless until then (then `hasBufferedInput` turns true).
    public var isWaiting: Bool {
        !closed && held.map { !mayRun($0.command, id: $0.id) } == true
    }

    /// Feeds bytes and returns the replies of every message they complete.
    public func receive(_ bytes: some Sequence<UInt8>, fds: [Int32] = []) -> [JSONValue] {
        feed(bytes, fds: fds)
        var replies: [JSONValue] = []
        while let r = nextReply() { replies.append(r) }
        return replies
    }

    /// True while part of a message is buffered.
    public var hasPartialInput: Bool { decoder.hasPartialValue }

    /// True while input not yet handled is buffered (complete messages among them, perhaps) and
    /// may be handled now: false while the next request waits for a long command.
    public var hasBufferedInput: Bool {
        guard !closed else { return false }
        if let h = held { return mayRun(h.command, id: h.id) }
        return decoder.hasUnscannedInput
    }

    /// Actions registered with `context.afterReply` by the last command(s); the caller runs them
    /// once the replies are out.
    public func takeAfterReplyActions() -> [@Sendable () -> Void] {
        defer { context.afterReplyActions = [] }
        return context.afterReplyActions
    }

    /// The event message to send this client, or nil before negotiation (QEMU sends events only
    /// to monitors in command mode). `data` is omitted when nil, as QEMU does for events without
    /// data members.
    public func eventMessage(_ name: String, data: JSONValue?, timestamp: QMPTimestamp) -> JSONValue? {
        guard isNegotiated, !closed else { return nil }
        return Self.eventMessage(name, data: data, timestamp: timestamp)
    }

    public static func eventMessage(_ name: String, data: JSONValue?, timestamp: QMPTimestamp) -> JSONValue {
        var o: JSONObject = ["event": .string(name)]
        if let data { o["data"] = data }
        o["timestamp"] = timestamp.json
        return .object(o)
    }

    /// The connection is gone: closes descriptors nobody took, and lets the fd sets close what
    /// no longer has a user. Idempotent.
    public func close() {
        guard !closed else { return }
        closed = true
        held = nil
        longCommands.abandon(session: sessionNumber)
        context.discardReceivedFDs()
        context.afterReplyActions = []
        context.fdSets.monitorDisconnected()
    }

    // MARK: Dispatch

    static func errorReply(_ error: QMPError, id: JSONValue?) -> JSONValue {
        var o: JSONObject = ["error": error.json]
        if let id { o["id"] = id }
        return .object(o)
    }

    static func successReply(_ value: JSONValue, id: JSONValue?) -> JSONValue {
        var o: JSONObject = ["return": value]
        if let id { o["id"] = id }
        return .object(o)
    }

    /// Handles one request message and returns its reply; nil when the reply comes later (a long
    /// command started, or the request waits for one: then `nextReply` runs it in turn).
    public func handle(_ request: JSONValue) -> JSONValue? {
        guard case .object(let dict) = request else {
            return Self.errorReply(.generic("QMP input must be a JSON object"), id: nil)
        }
        let id = dict["id"]
        var command: String?
        var arguments = JSONObject()
        for m in dict {
            switch m.key {
            case "execute":
                guard case .string(let name) = m.value else {
                    return Self.errorReply(.generic("QMP input member 'execute' must be a string"), id: id)
                }
                command = name
            case "arguments":
                guard case .object(let args) = m.value else {
                    return Self.errorReply(.generic("QMP input member 'arguments' must be an object"), id: id)
                }
                arguments = args
            case "id":
                continue
            default:
                // Includes "exec-oob": out-of-band execution is never enabled here.
                return Self.errorReply(.generic("QMP input member '\(m.key)' is unexpected"), id: id)
            }
        }
        guard let command else {
            return Self.errorReply(.generic("QMP input lacks member 'execute'"), id: id)
        }
        if !isNegotiated && command != "qmp_capabilities" {
            return Self.errorReply(QMPError(.commandNotFound, "Expecting capabilities negotiation with 'qmp_capabilities'"), id: id)
        }
        if held != nil || !mayRun(command, id: id) {
            // Only reached through `handle` called directly with a request still held: keep order.
            if held == nil {
                held = (command, arguments, id)
                return nil
            }
            return Self.errorReply(.generic("Another command waits for \(longCommands.running?.name ?? "a long command"); send this one after its reply"), id: id)
        }
        return dispatch(command, arguments: arguments, id: id)
    }

    /// Whether `command` may run now. A handler's command waits while the handler is not ready.
    /// While a long command runs, only queries may, and only when their reply cannot be mistaken
    /// for the long command's: it came from another session or has an `id`. Everything else waits
    /// for it (in order: nothing after a waiting request is read).
    private func mayRun(_ command: String, id: JSONValue?) -> Bool {
        if let handler, !handler.isReady, !Self.builtinCommands.contains(command),
           handler.commandNames.contains(command) {
            return false
        }
        guard let running = longCommands.running else { return true }
        if running.session == sessionNumber && !running.hasID { return false }
        return Self.builtinQueries.contains(command) || handler?.isQuery(command) == true
    }

    /// Executes a command allowed to run now; nil when it started as a long command.
    private func dispatch(_ command: String, arguments: JSONObject, id: JSONValue?) -> JSONValue? {
        switch execute(command, arguments: arguments) {
        case .done(.success(let v)):
            return Self.successReply(v, id: id)
        case .done(.failure(let e)):
            return Self.errorReply(e, id: id)
        case .long(let work):
            if let running = longCommands.running {
                // A handler that lists a long command as a query: still one at a time.
                return Self.errorReply(.generic("another \(running.name) is in progress"), id: id)
            }
            do throws(SysError) {
                try longCommands.start(command, session: sessionNumber, id: id, work: work)
                return nil
            } catch {
                return Self.errorReply(.generic("\(command): cannot start its thread: \(error)"), id: id)
            }
        }
    }

    /// Every command name `query-commands` lists.
    public var commandNames: [String] {
        var names = Self.builtinCommands
        for n in handler?.commandNames ?? [] where !names.contains(n) { names.append(n) }
        return names
    }

    private func execute(_ command: String, arguments: JSONObject) -> QMPCommandResult {
        do throws(QMPError) {
            var args = QMPArguments(arguments)
            switch command {
            case "qmp_capabilities":
                return .success(try qmpCapabilities(&args))
            case "query-commands":
                try args.finish()
                return .success(.array(commandNames.map { ["name": .string($0)] }))
            case "query-version":
                try args.finish()
                return .success(version.json)
            case "add-fd":
                let setID = try args.optionalInt("fdset-id")
                let opaque = try args.optionalString("opaque")
                try args.finish()
                guard let fd = context.takeReceivedRawFD() else {
                    throw .generic("No file descriptor supplied via SCM_RIGHTS")
                }
                let added = try context.fdSets.add(takingOwnershipOf: fd, fdSetID: setID, opaque: opaque)
                return .success(["fdset-id": .int(added.fdSetID), "fd": .int(Int64(added.fd))])
            case "remove-fd":
                let setID = try args.int("fdset-id")
                let fd = try args.optionalInt("fd")
                try args.finish()
                try context.fdSets.remove(fdSetID: setID, fd: fd)
                return .success([:])
            case "query-fdsets":
                try args.finish()
                return .success(.array(context.fdSets.query().map { set in
                    ["fdset-id": .int(set.fdSetID),
                     "fds": .array(set.fds.map { fd in
                         var o: JSONObject = ["fd": .int(Int64(fd.fd))]
                         if let opaque = fd.opaque { o["opaque"] = .string(opaque) }
                         return .object(o)
                     })]
                }))
            case "getfd":
                let name = try args.string("fdname")
                try args.finish()
                guard let fd = context.takeReceivedRawFD() else {
                    throw .generic("No file descriptor supplied via SCM_RIGHTS")
                }
                if let first = name.utf8.first, first >= 0x30 && first <= 0x39 {
                    closeDescriptor(fd)
                    throw .invalidParameterValue("fdname", expected: "a name not starting with a digit")
                }
                try context.namedFDs.set(name, takingOwnershipOf: fd)
                return .success([:])
            case "closefd":
                let name = try args.string("fdname")
                try args.finish()
                guard context.namedFDs.close(name) else {
                    throw .generic("File descriptor named '\(name)' not found")
                }
                return .success([:])
            default:
                guard let handler, handler.commandNames.contains(command) else {
                    throw .commandNotFound(command)
                }
                return handler.execute(command, arguments: arguments, context: context)
            }
        } catch {
            return .failure(error)
        }
    }

    private func qmpCapabilities(_ args: inout QMPArguments) throws(QMPError) -> JSONValue {
        // Arguments are checked first, as QEMU's unmarshaller does before the command runs.
        let enable = try args.optionalArray("enable") ?? []
        var unavailable: [String] = []
        for (i, v) in enable.enumerated() {
            guard case .string(let cap) = v else {
                throw .invalidParameterType("enable[\(i)]", expected: "string")
            }
            guard cap == "oob" else {
                throw .generic("Parameter 'enable[\(i)]' does not accept value '\(cap)'")
            }
            if !unavailable.contains(cap) { unavailable.append(cap) }
        }
        try args.finish()
        if isNegotiated {
            throw QMPError(.commandNotFound, "Capabilities negotiation is already complete, command ignored")
        }
        // Every known capability ("oob") is unavailable: none is offered.
        if !unavailable.isEmpty {
            throw .generic("Capability \(unavailable.joined(separator: ", ")) not available")
        }
        isNegotiated = true
        return [:]
    }
}
