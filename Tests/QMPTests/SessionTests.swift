import QMP
import Testing

@Suite("QMP session transcripts")
struct SessionTests {
    let handler = TestHandler()
    let fdSets = FdSets()

    func session() -> QMPSession { QMPSession(handler: handler, fdSets: fdSets) }

    func negotiated() -> QMPSession {
        let s = session()
        #expect(s.receive(Array(#"{"execute": "qmp_capabilities"}"#.utf8)) == [json(#"{"return": {}}"#)])
        return s
    }

    /// Sends one line and returns the single reply's serialization.
    func exchange(_ s: QMPSession, _ request: String, sourceLocation: SourceLocation = #_sourceLocation) -> String {
        let replies = s.receive(Array((request + "\n").utf8))
        #expect(replies.count == 1, "\(replies)", sourceLocation: sourceLocation)
        return replies.first?.serialized ?? ""
    }

    @Test("greeting")
    func greeting() {
        #expect(session().greeting.serialized ==
                #"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": "swiftvmm 0.1.0"}, "capabilities": []}}"#)
        let custom = QMPSession(handler: nil, fdSets: fdSets, version: QMPVersion(major: 9, minor: 1, micro: 2, package: "x"))
        #expect(custom.greeting["QMP"]?["version"] == json(#"{"qemu": {"major": 9, "minor": 1, "micro": 2}, "package": "x"}"#))
    }

    @Test("before negotiation only qmp_capabilities runs")
    func beforeNegotiation() {
        let s = session()
        #expect(!s.isNegotiated)
        #expect(exchange(s, #"{"execute": "query-commands"}"#) ==
                #"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}"#)
        #expect(exchange(s, #"{"execute": "stop", "id": 3}"#) ==
                #"{"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 3}"#)
        #expect(exchange(s, #"{"execute": "no-such-command"}"#).contains("Expecting capabilities negotiation"))
        // Malformed requests keep their own errors.
        #expect(exchange(s, "[1, 2]") == #"{"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}"#)
        #expect(exchange(s, #"{"id": 1}"#) == #"{"error": {"class": "GenericError", "desc": "QMP input lacks member 'execute'"}, "id": 1}"#)
        #expect(handler.log.isEmpty)
        #expect(exchange(s, #"{"execute": "qmp_capabilities", "id": "neg"}"#) == #"{"return": {}, "id": "neg"}"#)
        #expect(s.isNegotiated)
        #expect(exchange(s, #"{"execute": "qmp_capabilities"}"#) ==
                #"{"error": {"class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}"#)
    }

    @Test("qmp_capabilities arguments")
    func capabilitiesArguments() {
        let s = session()
        #expect(exchange(s, #"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#) ==
                #"{"error": {"class": "GenericError", "desc": "Capability oob not available"}}"#)
        #expect(exchange(s, #"{"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}}"#) ==
                #"{"error": {"class": "GenericError", "desc": "Parameter 'enable[0]' does not accept value 'bogus'"}}"#)
        #expect(exchange(s, #"{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}"#) ==
                #"{"error": {"class": "GenericError", "desc": "Invalid parameter type for 'enable', expected: array"}}"#)
        #expect(exchange(s, #"{"execute": "qmp_capabilities", "arguments": {"other": 1}}"#) ==
                #"{"error": {"class": "GenericError", "desc": "Parameter 'other' is unexpected"}}"#)
        #expect(!s.isNegotiated)
        #expect(exchange(s, #"{"execute": "qmp_capabilities", "arguments": {"enable": []}}"#) == #"{"return": {}}"#)
        #expect(s.isNegotiated)
    }

    @Test("the id is echoed whatever its JSON type", arguments: [
        "1", "-5", "2.5", #""abc""#, "null", "true", "[1, \"two\", [3]]", #"{"tag": {"n": [1]}}"#, #""\u00e9""#,
    ])
    func idEcho(_ id: String) {
        let s = negotiated()
        let replies = s.receive(Array(#"{"execute": "query-status", "id": \#(id)}"#.utf8))
        #expect(replies.count == 1)
        #expect(replies.first?["id"] == json(id))
        // Errors carry it too.
        let errors = s.receive(Array(#"{"id": \#(id), "execute": "nope"}"#.utf8))
        #expect(errors.first?["id"] == json(id))
        #expect(errors.first.flatMap(errorOf)?.desc == "The command nope has not been found")
    }

    @Test("malformed requests, with QEMU's texts")
    func malformed() {
        let s = negotiated()
        func desc(_ request: String) -> String? { s.receive(Array(request.utf8)).first.flatMap(errorOf)?.desc }
        #expect(desc(#""just a string""#) == "QMP input must be a JSON object")
        #expect(desc("42\n") == "QMP input must be a JSON object")
        #expect(desc("{}") == "QMP input lacks member 'execute'")
        #expect(desc(#"{"execute": 1}"#) == "QMP input member 'execute' must be a string")
        #expect(desc(#"{"execute": "stop", "arguments": [1]}"#) == "QMP input member 'arguments' must be an object")
        #expect(desc(#"{"execute": "stop", "extra": 1}"#) == "QMP input member 'extra' is unexpected")
        #expect(desc(#"{"exec-oob": "stop"}"#) == "QMP input member 'exec-oob' is unexpected")
        #expect(desc(#"{"execute": "frobnicate"}"#) == "The command frobnicate has not been found")
        #expect(s.receive(Array(#"{"execute": "frobnicate"}"#.utf8)).first.flatMap(errorOf)?.cls == "CommandNotFound")
        #expect(desc(#"{"execute": "echo"}"#) == "Parameter 'text' is missing")
        #expect(desc(#"{"execute": "echo", "arguments": {"text": 5}}"#) == "Invalid parameter type for 'text', expected: string")
        #expect(desc(#"{"execute": "echo", "arguments": {"text": "a", "count": 1.5}}"#) == "Invalid parameter type for 'count', expected: integer")
        #expect(desc(#"{"execute": "stop", "arguments": {"now": true}}"#) == "Parameter 'now' is unexpected")
        #expect(!handler.log.contains("frobnicate"))
    }

    @Test("invalid JSON gets an error without id and the connection goes on")
    func invalidJSON() {
        let s = negotiated()
        let replies = s.receive(Array(#"{"execute": "query-status", "id": 1,} {"execute": "query-status", "id": 2}"#.utf8))
        #expect(replies.count == 2)
        #expect(errorOf(replies[0])?.cls == "GenericError")
        #expect(errorOf(replies[0])?.desc.hasPrefix("JSON parse error, ") == true)
        #expect(replies[0]["id"] == nil)
        #expect(replies[1] == json(#"{"return": {"running": true, "status": "running"}, "id": 2}"#))
        // Invalid UTF-8 inside a string.
        let bad = s.receive([0x7B, 0x22, 0xC3, 0x28, 0x22, 0x3A, 0x31, 0x7D])
        #expect(bad.count == 1 && errorOf(bad[0])?.desc.hasPrefix("JSON parse error, ") == true)
    }

    @Test("handler commands: results, errors and their classes")
    func handlerCommands() {
        let s = negotiated()
        #expect(exchange(s, #"{"execute": "echo", "arguments": {"text": "ab", "count": 2}, "id": 9}"#) ==
                #"{"return": {"text": "abab"}, "id": 9}"#)
        #expect(exchange(s, #"{"execute": "stop"}"#) == #"{"return": {}}"#)
        #expect(exchange(s, #"{"execute": "query-status"}"#) == #"{"return": {"running": false, "status": "paused"}}"#)
        #expect(exchange(s, #"{"execute": "fail"}"#) == #"{"error": {"class": "GenericError", "desc": "it failed"}}"#)
        #expect(exchange(s, #"{"execute": "no-such-device"}"#) ==
                #"{"error": {"class": "DeviceNotFound", "desc": "Device 'nic9' not found"}}"#)
        #expect(handler.log == ["echo", "stop", "query-status", "fail", "no-such-device"])
    }

    @Test("query-commands lists the built-in and the handler's commands; query-version")
    func queryCommands() {
        let s = negotiated()
        let reply = s.receive(Array(#"{"execute": "query-commands"}"#.utf8)).first
        let names = reply?["return"]?.arrayValue?.compactMap { $0["name"]?.stringValue } ?? []
        for n in QMPSession.builtinCommands + handler.commandNames { #expect(names.contains(n), "\(n) missing") }
        #expect(Set(names).count == names.count)
        #expect(exchange(s, #"{"execute": "query-version"}"#) ==
                #"{"return": {"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": "swiftvmm 0.1.0"}}"#)
        // Without a handler only the built-ins exist.
        let bare = QMPSession(handler: nil, fdSets: fdSets)
        _ = bare.receive(Array(#"{"execute": "qmp_capabilities"}"#.utf8))
        #expect(bare.receive(Array(#"{"execute": "stop"}"#.utf8)).first.flatMap(errorOf)?.desc == "The command stop has not been found")
    }

    @Test("events only after negotiation; data omitted when nil")
    func events() {
        let s = session()
        let t = QMPTimestamp(seconds: 1_700_000_000, microseconds: 123_456)
        #expect(s.eventMessage("STOP", data: nil, timestamp: t) == nil)
        _ = s.receive(Array(#"{"execute": "qmp_capabilities"}"#.utf8))
        #expect(s.eventMessage("STOP", data: nil, timestamp: t)?.serialized ==
                #"{"event": "STOP", "timestamp": {"seconds": 1700000000, "microseconds": 123456}}"#)
        #expect(s.eventMessage("VM_GENERATION_ID_CHANGED", data: ["guid": "324e6eaf-d1d1-4bf6-bf41-b9bb6c91fb87"], timestamp: t)?.serialized ==
                #"{"event": "VM_GENERATION_ID_CHANGED", "data": {"guid": "324e6eaf-d1d1-4bf6-bf41-b9bb6c91fb87"}, "timestamp": {"seconds": 1700000000, "microseconds": 123456}}"#)
        s.close()
        #expect(s.eventMessage("STOP", data: nil, timestamp: t) == nil)
        let now = QMPTimestamp.now()
        #expect(now.seconds > 1_600_000_000 && (0..<1_000_000).contains(now.microseconds))
    }

    @Test("nextReply handles one message at a time")
    func oneAtATime() {
        let s = negotiated()
        s.feed(Array(#"{"execute": "stop"} {"execute": "cont"} {"execute": "query-"#.utf8))
        #expect(s.nextReply() == json(#"{"return": {}}"#))
        #expect(handler.log == ["stop"])
        #expect(s.nextReply() == json(#"{"return": {}}"#))
        #expect(s.nextReply() == nil)
        #expect(s.hasPartialInput)
        s.feed(Array(#"status"}"#.utf8))
        #expect(s.nextReply()?["return"]?["running"] == true)
    }

    @Test("afterReply actions are handed to the caller")
    func afterReply() {
        let s = negotiated()
        _ = s.receive(Array(#"{"execute": "quit"}"#.utf8))
        let actions = s.takeAfterReplyActions()
        #expect(actions.count == 1)
        for a in actions { a() }
        #expect(handler.afterReplyRan.withLock { $0 } == 1)
        #expect(s.takeAfterReplyActions().isEmpty)
    }
}
