import Glibc
import QMP
import Synchronization
import Testing
import VMMSys

/// A handler that is not ready until told (like the monitor's before the machine is built).
final class LateHandler: QMPCommandHandler {
    let ready = Atomic<Bool>(false)
    let reply: Mutex<Result<JSONValue, QMPError>> = Mutex(.success(["late": true]))
    let calls = Atomic<Int>(0)
    var commandNames: [String] { ["late"] }
    var isReady: Bool { ready.load(ordering: .acquiring) }
    func execute(_ command: String, arguments: JSONObject, context: QMPContext) -> QMPCommandResult {
        calls.add(1, ordering: .relaxed)
        return .done(reply.withLock { $0 })
    }
}

@Suite("QMP server: a handler's commands wait for it to be ready, off the server thread")
struct HandlerReadinessTests {
    @Test("a command waits for the handler while the server goes on (events, other requests before it); it runs in order once ready")
    func waitsWithoutBlocking() throws {
        let handler = LateHandler()
        let server = try QMPServer(path: temporarySocketPath(), handler: handler)
        try server.start()
        defer { server.stop() }
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        #expect(client.execute(#"{"execute": "query-version", "id": "before"}"#)?["id"] == "before")
        client.send(#"{"execute": "late", "id": "L"} {"execute": "query-version", "id": "after"}"# + "\n")
        #expect(client.readMessage(timeoutMilliseconds: 200) == nil)
        #expect(handler.calls.load(ordering: .relaxed) == 0)
        // The server thread is not stuck in the handler: an event emitted now is delivered.
        server.emit(event: "PING")
        #expect(client.readMessage()?["event"] == "PING")
        handler.ready.store(true, ordering: .releasing)
        server.handlerBecameReady()
        #expect(client.readMessage() == json(#"{"return": {"late": true}, "id": "L"}"#))
        #expect(client.readMessage()?["id"] == "after")
        #expect(handler.calls.load(ordering: .relaxed) == 1)
    }

    @Test("ready, then stopped at once (the machine could not be built): the waiting command gets its error reply before EOF")
    func readyThenStop() throws {
        let handler = LateHandler()
        let server = try QMPServer(path: temporarySocketPath(), handler: handler)
        try server.start()
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        client.send(#"{"execute": "late", "id": 7}"# + "\n")
        #expect(client.readMessage(timeoutMilliseconds: 200) == nil)
        handler.reply.withLock { $0 = .failure(.generic("the VM could not be started: no kernel")) }
        handler.ready.store(true, ordering: .releasing)
        server.handlerBecameReady()
        server.stop()
        #expect(client.readMessage() == json(#"{"error": {"class": "GenericError", "desc": "the VM could not be started: no kernel"}, "id": 7}"#))
        #expect(client.seesEOF())
    }

    @Test("stop() while a command waits for a handler that never gets ready returns at once")
    func stopWhileWaiting() throws {
        let handler = LateHandler()
        let server = try QMPServer(path: temporarySocketPath(), handler: handler)
        try server.start()
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        client.send(#"{"execute": "late"}"# + "\n")
        #expect(client.readMessage(timeoutMilliseconds: 100) == nil)
        let started = monotonicMs()
        server.stop()
        #expect(monotonicMs() - started < 2000)
        #expect(client.seesEOF())
        #expect(handler.calls.load(ordering: .relaxed) == 0)
    }

    @Test("a session holds the handler's command, and the requests after it, until the handler is ready; built-in commands before it run")
    func sessionHolds() {
        let handler = LateHandler()
        let session = QMPSession(handler: handler, fdSets: FdSets())
        #expect(session.receive(Array(#"{"execute": "qmp_capabilities", "id": 1}"#.utf8)) == [json(#"{"return": {}, "id": 1}"#)])
        #expect(session.receive(Array(#"{"execute": "late", "id": 2} {"execute": "query-version", "id": 3}"#.utf8)).isEmpty)
        #expect(session.isWaiting)
        #expect(session.hasCommandInFlight)
        #expect(!session.hasBufferedInput)
        handler.ready.store(true, ordering: .releasing)
        #expect(!session.isWaiting)
        #expect(session.hasBufferedInput)
        #expect(session.nextReply() == json(#"{"return": {"late": true}, "id": 2}"#))
        #expect(session.nextReply()?["id"] == 3)
        #expect(!session.hasCommandInFlight)
    }
}
