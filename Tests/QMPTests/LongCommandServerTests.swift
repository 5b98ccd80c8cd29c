import Glibc
import QMP
import Synchronization
import Testing
import VMMSys

/// A handler whose `slow` command runs as a long command and blocks until released.
final class SlowHandler: QMPCommandHandler {
    let released = Atomic<Bool>(false)
    let started = Atomic<Bool>(false)
    var commandNames: [String] { ["slow", "query-thing", "poke"] }
    func isQuery(_ command: String) -> Bool { command == "query-thing" }
    func execute(_ command: String, arguments: JSONObject, context: QMPContext) -> QMPCommandResult {
        switch command {
        case "slow":
            return .long { [self] in
                started.store(true, ordering: .releasing)
                while !released.load(ordering: .acquiring) { usleep(1000) }
                return .success(["done": true])
            }
        case "query-thing": return .success(["thing": 1])
        default: return .success([:])
        }
    }
}

@Suite("QMP server: long commands run off the server thread")
struct LongCommandServerTests {
    @Test("a query is answered while a long command runs; the long reply follows with its id")
    func queryWhileLong() throws {
        let handler = SlowHandler()
        let server = try QMPServer(path: temporarySocketPath(), handler: handler)
        try server.start()
        defer { server.stop() }
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        client.send(#"{"execute": "slow", "id": "L"}"# + "\n")
        #expect(eventually { handler.started.load(ordering: .acquiring) })
        #expect(client.execute(#"{"execute": "query-thing", "id": "q"}"#) == json(#"{"return": {"thing": 1}, "id": "q"}"#))
        #expect(client.execute(#"{"execute": "query-version", "id": "v"}"#)?["id"] == "v")
        // Not a query: waits.
        client.send(#"{"execute": "poke", "id": "p"}"# + "\n")
        #expect(client.readMessage(timeoutMilliseconds: 200) == nil)
        handler.released.store(true, ordering: .releasing)
        #expect(client.readMessage() == json(#"{"return": {"done": true}, "id": "L"}"#))
        #expect(client.readMessage() == json(#"{"return": {}, "id": "p"}"#))
    }

    @Test("a client that half-closes after a long command still gets its reply")
    func halfCloseWaitsForLong() throws {
        let handler = SlowHandler()
        var limits = QMPServerLimits()
        limits.flushTimeoutMilliseconds = 100
        let server = try QMPServer(path: temporarySocketPath(), handler: handler, limits: limits)
        try server.start()
        defer { server.stop() }
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        client.send(#"{"execute": "slow"}"# + "\n")
        shutdown(client.fd, Int32(SHUT_WR))
        #expect(eventually { handler.started.load(ordering: .acquiring) })
        usleep(300_000) // longer than the flush timeout
        handler.released.store(true, ordering: .releasing)
        #expect(client.readMessage() == json(#"{"return": {"done": true}}"#))
        #expect(client.seesEOF())
    }

    @Test("stop() while a long command runs waits for it, and the client gets its reply")
    func stopWaits() throws {
        let handler = SlowHandler()
        let server = try QMPServer(path: temporarySocketPath(), handler: handler)
        try server.start()
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        client.send(#"{"execute": "slow", "id": 3}"# + "\n")
        #expect(eventually { handler.started.load(ordering: .acquiring) })
        let releaser = try OSThread(name: "test-release", role: .io) {
            usleep(200_000)
            handler.released.store(true, ordering: .releasing)
        }
        let started = monotonicMs()
        server.stop()
        #expect(monotonicMs() - started >= 150, "stop() returned before the long command finished")
        #expect(!server.longCommands.isBusy)
        releaser.join()
        #expect(client.readMessage() == json(#"{"return": {"done": true}, "id": 3}"#))
        #expect(client.seesEOF())
    }
}
