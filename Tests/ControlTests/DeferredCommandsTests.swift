import Control
import QMP
import Testing

@Suite("Control: machine commands before the machine exists")
struct DeferredCommandsTests {
    @Test("query-status sent before the machine exists waits in the session (not on the QMP thread) and is answered once connected")
    func waitsForConnect() {
        let deferred = DeferredCommands()
        let session = negotiatedSession(deferred)
        #expect(!deferred.isReady)
        #expect(session.receive(Array(#"{"execute": "query-version", "id": "v"}"#.utf8)).first?["id"] == "v")
        #expect(session.receive(Array(#"{"execute": "query-status", "id": "q"}"#.utf8)).isEmpty)
        #expect(session.isWaiting)
        let direct = deferred.execute("query-status", arguments: [:], context: session.context)
        guard case .done(.failure(let e)) = direct else {
            Issue.record("a direct call before connect did not fail at once: \(direct)")
            return
        }
        #expect(e.description.contains("still being built"))
        deferred.connect(MachineCommands(machine: FakeMachine(), emit: EventLog().emit))
        #expect(deferred.isReady)
        #expect(session.nextReply() == parse(#"{"return": {"status": "running", "running": true, "singlestep": false}, "id": "q"}"#))
        #expect(!session.hasCommandInFlight)
    }

    @Test("a command the handler does not know is refused at once, also before the machine exists")
    func unknownNotHeld() {
        let session = negotiatedSession(DeferredCommands())
        let replies = session.receive(Array(#"{"execute": "no-such-command", "id": 1}"#.utf8))
        #expect(replies.first?["error"]?["class"] == "CommandNotFound")
        #expect(!session.isWaiting)
    }
}
