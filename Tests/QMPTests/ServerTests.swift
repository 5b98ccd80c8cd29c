import CLinux
import Glibc
import QMP
import Synchronization
import Testing
import TestSupport
import VMMSys

@Suite("QMP server over a Unix socket")
struct ServerTests {
    let handler = TestHandler()

    func makeServer(path: String = temporarySocketPath(), limits: QMPServerLimits = QMPServerLimits()) throws -> QMPServer {
        let server = try QMPServer(path: path, handler: handler, limits: limits)
        handler.server.withLock { $0 = server }
        try server.start()
        return server
    }

    @Test("a client negotiates, passes a descriptor, gets events; the next client gets a fresh greeting")
    func fullSession() throws {
        let file = TempFile()
        let id = file.identity
        let server = try makeServer()
        defer { server.stop() }

        var st = stat()
        #expect(lstat(server.path, &st) == 0 && st.st_mode & 0o777 == 0o600 && st.st_mode & S_IFMT == S_IFSOCK)

        let first = try TestClient(path: server.path)
        let greeting = try #require(first.readMessage())
        #expect(greeting == session(greetingOf: server))
        // Events are not sent before negotiation.
        server.emit(event: "EARLY")
        #expect(first.execute(#"{"execute": "query-status"}"#).flatMap(errorOf)?.desc == "Expecting capabilities negotiation with 'qmp_capabilities'")
        #expect(first.execute(#"{"execute": "qmp_capabilities", "id": 1}"#) == json(#"{"return": {}, "id": 1}"#))

        // add-fd with the descriptor on the same message.
        let fd = file.open(O_RDWR)
        let added = first.execute(#"{"execute": "add-fd", "arguments": {"opaque": "disk0"}, "id": "a"}"#, fds: [fd])
        close(fd)
        let fdNumber = try #require(added?["return"]?["fd"]?.intValue)
        #expect(added?["return"]?["fdset-id"] == 0)
        #expect(first.execute(#"{"execute": "query-fdsets"}"#) ==
                json(#"{"return": [{"fdset-id": 0, "fds": [{"fd": \#(fdNumber), "opaque": "disk0"}]}]}"#))
        #expect(id.openDescriptorCount == 1) // the server's copy

        // An event emitted from another thread.
        let emitter = try OSThread(name: "emitter", role: .io) { [server] in
            server.emit(event: "VM_GENERATION_ID_CHANGED", data: ["guid": "324e6eaf-d1d1-4bf6-bf41-b9bb6c91fb87"])
        }
        emitter.join()
        let event = try #require(first.readMessage())
        #expect(event["event"] == "VM_GENERATION_ID_CHANGED")
        #expect(event["data"] == ["guid": "324e6eaf-d1d1-4bf6-bf41-b9bb6c91fb87"])
        let seconds = try #require(event["timestamp"]?["seconds"]?.intValue)
        let micros = try #require(event["timestamp"]?["microseconds"]?.intValue)
        let now = QMPTimestamp.now()
        #expect(abs(now.seconds - seconds) < 60 && (0..<1_000_000).contains(micros))

        // An event emitted by a command goes out before the command's reply.
        first.send(#"{"execute": "stop", "id": 2}"# + "\n")
        #expect(first.readMessage()?["event"] == "STOP")
        #expect(first.readMessage() == json(#"{"return": {}, "id": 2}"#))

        // A second client waits in the backlog while the first is connected.
        let second = try TestClient(path: server.path)
        #expect(second.readMessage(timeoutMilliseconds: 300) == nil)
        #expect(server.clientsAccepted == 1)

        // The first disconnects: its unused fd set is closed, the second is served.
        _ = consume first
        #expect(eventually { id.openDescriptorCount == 0 })
        let greeting2 = try #require(second.readMessage())
        #expect(greeting2["QMP"] != nil)
        #expect(second.execute(#"{"execute": "query-fdsets"}"#).flatMap(errorOf)?.cls == "CommandNotFound")
        #expect(second.execute(#"{"execute": "qmp_capabilities"}"#) == json(#"{"return": {}}"#))
        #expect(second.execute(#"{"execute": "query-fdsets"}"#) == json(#"{"return": []}"#))
        #expect(second.execute(#"{"execute": "query-status"}"#) == json(#"{"return": {"running": false, "status": "paused"}}"#))
        #expect(server.clientsAccepted == 2)
    }

    func session(greetingOf server: QMPServer) -> JSONValue {
        QMPSession(handler: nil, fdSets: FdSets(), version: server.version).greeting
    }

    @Test("a descriptor sent on a lone space before the command (qemu.qmp's way), and a command sent byte by byte")
    func descriptorFirstAndSplitCommand() throws {
        let file = TempFile()
        let id = file.identity
        let server = try makeServer()
        defer { server.stop() }
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        let fd = file.open(O_WRONLY)
        client.send(" ", fds: [fd])
        close(fd)
        for b in Array(#"{"execute": "take-fd"}"#.utf8) {
            client.send(String(decoding: [b], as: UTF8.self))
        }
        client.send("\n")
        #expect(client.readMessage() == json(#"{"return": {"access-mode": \#(O_WRONLY)}}"#))
        #expect(eventually { id.openDescriptorCount == 0 }) // the handler's OwnedFD closed it
        // Garbage does not end the connection.
        #expect(client.execute("{]").flatMap(errorOf)?.desc.hasPrefix("JSON parse error") == true)
        #expect(client.execute(#"{"execute": "query-version"}"#)?["return"]?["package"] == "swiftvmm 0.1.0")
    }

    @Test("afterReply runs once the reply is out (quit)")
    func afterReply() throws {
        let server = try makeServer()
        defer { server.stop() }
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        #expect(client.execute(#"{"execute": "quit"}"#) == json(#"{"return": {}}"#))
        #expect(eventually { handler.afterReplyRan.withLock { $0 } == 1 })
    }

    @Test("a client that does not read is dropped; emit never blocks")
    func slowClient() throws {
        var limits = QMPServerLimits()
        limits.maxOutputBytes = 64 * 1024
        limits.maxPendingEvents = 100_000
        let server = try makeServer(limits: limits)
        defer { server.stop() }
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        // Shrink the client's receive buffer so the server's queue fills quickly.
        var size: Int32 = 4096
        setsockopt(client.fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        let start = monotonicMs()
        let payload: JSONValue = ["blob": .string(String(repeating: "x", count: 1000))]
        for _ in 0..<5000 { server.emit(event: "FLOOD", data: payload) }
        #expect(monotonicMs() - start < 2000)
        #expect(eventually { !server.isClientConnected })
        // The next client is served normally.
        let next = try TestClient(path: server.path)
        #expect(next.handshake() != nil)
    }

    @Test("a client that sends commands and never reads their replies is dropped once its output stalls; the next client is served at once")
    func neverReadingClient() throws {
        var limits = QMPServerLimits()
        limits.stalledOutputMilliseconds = 500
        let server = try makeServer(limits: limits)
        defer { server.stop() }
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        var size: Int32 = 4096
        setsockopt(client.fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
        let text = String(repeating: "z", count: 1000)
        var batch = ""
        for i in 0..<40 { batch += #"{"execute": "echo", "arguments": {"text": "\#(text)", "count": 100}, "id": \#(i)}"# + "\n" }
        client.send(batch) // replies far beyond what the socket holds; the client reads none
        let start = monotonicMs()
        #expect(eventually(timeoutMilliseconds: 5000) { !server.isClientConnected })
        let dropped = monotonicMs() - start
        #expect(dropped >= 400 && dropped < 4000, "dropped after \(dropped) ms")
        let next = try TestClient(path: server.path)
        let before = monotonicMs()
        #expect(next.handshake() != nil)
        next.send(#"{"execute": "echo", "arguments": {"text": "x", "count": 1}, "id": 1}"# + "\n")
        #expect(next.readMessage()?["id"] == .int(1))
        #expect(monotonicMs() - before < 1000)
    }

    @Test("pipelined commands with large replies are all answered: backpressure, not disconnection")
    func pipelinedLargeReplies() throws {
        let server = try makeServer()
        defer { server.stop() }
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        let text = String(repeating: "z", count: 1000)
        var batch = ""
        for i in 0..<40 { batch += #"{"execute": "echo", "arguments": {"text": "\#(text)", "count": 100}, "id": \#(i)}"# + "\n" }
        client.send(batch) // 40 replies of 100 kB: far more than the server's output limit at once
        usleep(200_000)
        for i in 0..<40 {
            let reply = client.readMessage()
            #expect(reply?["id"] == .int(Int64(i)))
            #expect(reply?["return"]?["text"]?.stringValue?.utf8.count == 100_000)
        }
        #expect(server.isClientConnected)
    }

    @Test("an oversized message gets an error and the connection goes on")
    func oversizedOverSocket() throws {
        let server = try makeServer()
        defer { server.stop() }
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        let huge = #"{"execute": "echo", "arguments": {"text": ""# + String(repeating: "q", count: 200_000) + #""}}"#
        let reply = client.execute(huge)
        #expect(reply.flatMap(errorOf)?.desc == "JSON parse error, message larger than 65536 bytes")
        #expect(client.execute(#"{"execute": "echo", "arguments": {"text": "ok"}}"#) == json(#"{"return": {"text": "ok"}}"#))
    }

    @Test("a bad byte or a raw newline inside a string costs one error reply, and the next line is served")
    func badLineThenCommand() throws {
        let server = try makeServer()
        defer { server.stop() }
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        let next = Array(#"{"execute":"query-status","id":1}"#.utf8) + [0x0A]
        let badLines: [(name: String, bytes: [UInt8])] = [
            ("0xFF in a string", Array(#"{"execute":"query-status","id":""#.utf8) + [0xFF] + Array(#""}"#.utf8) + [0x0A]),
            ("raw LF in a string", Array(#"{"execute":"x","id":"a"#.utf8) + [0x0A] + Array(#"b"}"#.utf8) + [0x0A]),
            ("0x01 in a string", Array(#"{"execute":"x","id":"a"#.utf8) + [0x01] + Array(#"b"}"#.utf8) + [0x0A]),
        ]
        for (name, bad) in badLines {
            client.send(bytes: bad + next)
            let error = client.readMessage()
            #expect(error.flatMap(errorOf)?.cls == "GenericError", "\(name): \(String(describing: error))")
            #expect(error.flatMap(errorOf)?.desc.hasPrefix("JSON parse error") == true, "\(name)")
            #expect(error?["id"] == nil, "\(name)")
            #expect(client.readMessage(timeoutMilliseconds: 2000) == json(#"{"return": {"running": true, "status": "running"}, "id": 1}"#), "\(name)")
        }
        // Nothing else came, and the connection still works.
        #expect(client.readMessage(timeoutMilliseconds: 200) == nil)
        #expect(client.execute(#"{"execute": "query-status", "id": 2}"#)?["id"] == 2)
    }

    @Test("a client that half-closes still gets its replies")
    func halfClose() throws {
        let server = try makeServer()
        defer { server.stop() }
        let client = try TestClient(path: server.path)
        _ = try #require(client.readMessage())
        client.send(#"{"execute": "qmp_capabilities"} {"execute": "query-status", "id": 5}"#)
        shutdown(client.fd, Int32(SHUT_WR))
        #expect(client.readMessage() == json(#"{"return": {}}"#))
        #expect(client.readMessage()?["id"] == 5)
        #expect(client.seesEOF())
        #expect(eventually { !server.isClientConnected })
    }

    @Test("the server closes its end of every connection, and its listening socket once released")
    func noSocketLeaks() throws {
        let path = temporarySocketPath()
        // The address the server's sockets carry: the temporary name it was bound to before the
        // file was renamed into place.
        var address = ""
        do {
            let server = try QMPServer(path: path, handler: handler)
            try server.start()
            address = try TestClient(path: path).peerAddress // a client that goes away at once
            #expect(address.contains("/.swiftvmm-qmp-\(getpid())-"))
            #expect(eventually { serverSocketDescriptorCount(path: address) == 1 }) // the listening socket
            for round in 0..<3 {
                let client = try TestClient(path: path)
                _ = try #require(client.handshake())
                #expect(serverSocketDescriptorCount(path: address) == 2, "round \(round)")
                _ = consume client
                #expect(eventually { serverSocketDescriptorCount(path: address) == 1 }, "round \(round)")
                #expect(eventually { !server.isClientConnected })
            }
            // A client that goes away before being accepted, and one dropped by stop().
            _ = try TestClient(path: path)
            let last = try TestClient(path: path)
            _ = last.readMessage()
            server.stop()
            #expect(last.seesEOF())
            #expect(serverSocketDescriptorCount(path: address) <= 1)
        }
        // The socket file is gone, and with the server object the listening socket.
        #expect(access(path, F_OK) != 0)
        #expect(serverSocketDescriptorCount(path: address) == 0)
    }

    @Test("stop() disconnects the client and removes the socket file")
    func stopServer() throws {
        let server = try makeServer()
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        server.stop()
        #expect(client.seesEOF())
        #expect(access(server.path, F_OK) != 0)
        server.stop() // idempotent
        server.emit(event: "AFTER_STOP") // harmless
    }

    @Test("a stale socket file is replaced; a live server's socket and other files are not")
    func staleSocket() throws {
        let path = temporarySocketPath()
        // A socket file nobody listens on, as a crashed VMM leaves behind.
        let s = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        #expect(clinux_unix_bind(s, path) == 0)
        close(s)
        let server = try makeServer(path: path)
        defer { server.stop() }
        #expect(try TestClient(path: path).handshake() != nil)
        #expect(throws: SysError.self) { _ = try QMPServer(path: path, handler: nil) }
        #expect(try TestClient(path: path).readMessage() != nil) // still served after the refused attempt

        let regular = TempFile()
        #expect(throws: SysError.self) { _ = try QMPServer(path: regular.path, handler: nil) }
        #expect(access(regular.path, F_OK) == 0)
    }

    @Test("stop() from inside a command handler does not deadlock")
    func stopFromHandler() throws {
        final class Stopper: QMPCommandHandler {
            let server = Mutex<QMPServer?>(nil)
            var commandNames: [String] { ["quit"] }
            func execute(_ command: String, arguments: JSONObject, context: QMPContext) -> QMPCommandResult {
                let s = server.withLock { $0 }
                context.afterReply { s?.stop() }
                return .success([:])
            }
        }
        let stopper = Stopper()
        let server = try QMPServer(path: temporarySocketPath(), handler: stopper)
        stopper.server.withLock { $0 = server }
        try server.start()
        let client = try TestClient(path: server.path)
        _ = try #require(client.handshake())
        #expect(client.execute(#"{"execute": "quit"}"#) == json(#"{"return": {}}"#))
        #expect(client.seesEOF())
        server.stop()
        stopper.server.withLock { $0 = nil }
    }
}
