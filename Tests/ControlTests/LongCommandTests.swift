import Glibc
import Control
import Machine
import QMP
import Testing
import TestSupport
import VMMCore
import VMMSys

@Suite("Control: snapshot-create runs off the QMP thread")
struct LongCommandTests {
    @Test("while snapshot-create runs, query-status is answered; stop waits; the long reply keeps its id")
    func queriesAnsweredMeanwhile() {
        let machine = FakeMachine(holdSnapshot: true)
        let session = negotiatedSession(MachineCommands(machine: machine, emit: EventLog().emit))
        #expect(session.receive(Array(#"{"execute": "snapshot-create", "arguments": {"path": "/tmp/s"}, "id": "snap"}"#.utf8)).isEmpty)
        #expect(eventually { machine.snapshotStarted })
        #expect(session.hasCommandInFlight)
        #expect(session.receive(Array(#"{"execute": "query-status", "id": "q"}"#.utf8))
                == [parse(#"{"return": {"status": "save-vm", "running": false, "singlestep": false}, "id": "q"}"#)])
        #expect(session.receive(Array(#"{"execute": "query-version", "id": "v"}"#.utf8)).first?["id"] == "v")
        // A command that changes state waits for the snapshot (and so does everything after it).
        #expect(session.receive(Array(#"{"execute": "stop", "id": "s"} {"execute": "query-status", "id": "q2"}"#.utf8)).isEmpty)
        #expect(session.isWaiting)
        #expect(!session.hasBufferedInput)
        #expect(machine.calls == ["createSnapshot /tmp/s"])
        #expect(session.takeLongCommandReplies().isEmpty)
        machine.releaseSnapshot()
        session.longCommands.join()
        #expect(session.takeLongCommandReplies()
                == [parse(#"{"return": {"path": "/tmp/s", "size": 4096, "memory-size": 1048576, "time-ms": 5.0, "pause-ms": 5.0, "live": false}, "id": "snap"}"#)])
        #expect(session.hasBufferedInput)
        #expect(session.nextReply() == parse(#"{"return": {}, "id": "s"}"#))
        #expect(session.nextReply() == parse(#"{"return": {"status": "paused", "running": false, "singlestep": false}, "id": "q2"}"#))
        #expect(machine.calls == ["createSnapshot /tmp/s", "pause"])
        #expect(!session.hasCommandInFlight)
    }

    @Test("snapshot-create with live: true reaches the machine and its reply has pause-ms")
    func liveArgument() {
        let machine = FakeMachine(holdSnapshot: false)
        let session = negotiatedSession(MachineCommands(machine: machine, emit: EventLog().emit))
        #expect(session.receive(Array(#"{"execute": "snapshot-create", "arguments": {"path": "/tmp/l", "live": true}, "id": 1}"#.utf8)).isEmpty)
        session.longCommands.join()
        #expect(session.takeLongCommandReplies()
                == [parse(#"{"return": {"path": "/tmp/l", "size": 4096, "memory-size": 1048576, "time-ms": 5.0, "pause-ms": 1.5, "live": true}, "id": 1}"#)])
        #expect(machine.calls == ["createSnapshot /tmp/l live"])
    }

    @Test("a long command without an id: nothing overtakes its reply")
    func noIDKeepsOrder() {
        let machine = FakeMachine(holdSnapshot: true)
        let session = negotiatedSession(MachineCommands(machine: machine, emit: EventLog().emit))
        #expect(session.receive(Array(#"{"execute": "snapshot-create", "arguments": {"path": "/fail"}}"#.utf8)).isEmpty)
        #expect(session.receive(Array(#"{"execute": "query-status"}"#.utf8)).isEmpty)
        machine.releaseSnapshot()
        session.longCommands.join()
        #expect(errorDesc(session.takeLongCommandReplies().first) == "snapshot-create: cannot write /fail")
        #expect(session.nextReply()?["return"]?["status"] == "running")
    }

    @Test("a second snapshot-create waits for the first and replies after it")
    func secondWaits() {
        let machine = FakeMachine(holdSnapshot: true)
        let session = negotiatedSession(MachineCommands(machine: machine, emit: EventLog().emit))
        #expect(session.receive(Array(#"""
            {"execute": "snapshot-create", "arguments": {"path": "/tmp/a"}, "id": 1}
            {"execute": "snapshot-create", "arguments": {"path": "/tmp/b"}, "id": 2}
            """#.utf8)).isEmpty)
        #expect(eventually { machine.snapshotStarted })
        #expect(machine.calls == ["createSnapshot /tmp/a"])
        machine.releaseSnapshot()
        session.longCommands.join()
        #expect(session.takeLongCommandReplies().map { $0["id"] } == [1])
        #expect(session.nextReply() == nil) // the second started
        session.longCommands.join()
        #expect(session.takeLongCommandReplies().map { $0["id"] } == [2])
        #expect(machine.calls == ["createSnapshot /tmp/a", "createSnapshot /tmp/b"])
    }

    /// `jmp $`: a guest that runs and never exits.
    static let spin: [UInt8] = [0xEB, 0xFE]

    @Test("a real 512 MiB machine: query-status answers in under 100 ms while snapshot-create writes its filled memory",
          .enabled(if: HostVirtualization.probe() != .none(reason: ""), "needs /dev/kvm"))
    func realMachine() throws {
        let dir = makeTemporaryDirectory("swiftvmm-ctl-snap")
        defer { _ = runProcess(["rm", "-rf", dir]) }
        let machine = try Machine(MachineConfig(memorySize: 512 << 20, console: RecordingConsole()),
                                  boot: .program64(code: Self.spin, loadAddress: 0x100000))
        // Nonzero everywhere but the program's page, so that every page is written.
        let chunk = [UInt8](repeating: 0xA5, count: 1 << 20)
        for mib in 2..<512 { try machine.memory.write(chunk, at: GuestAddress(UInt64(mib) << 20)) }
        let run = try OSThread(name: "test-machine", role: .io) { _ = machine.run() }
        defer {
            machine.requestExit(.quit("test"))
            run.join()
        }
        let session = negotiatedSession(MachineCommands(machine: machine, emit: EventLog().emit))
        #expect(session.receive(Array(#"{"execute": "snapshot-create", "arguments": {"path": "\#(dir)/snap"}, "id": "snap"}"#.utf8)).isEmpty)
        usleep(20_000)
        #expect(session.longCommands.isBusy, "the snapshot of 512 MiB took under 20 ms")
        let started = monotonicMilliseconds()
        let replies = session.receive(Array(#"{"execute": "query-status", "id": "q"}"#.utf8))
        let took = monotonicMilliseconds() - started
        #expect(replies == [parse(#"{"return": {"status": "save-vm", "running": false, "singlestep": false}, "id": "q"}"#)])
        #expect(took < 100, "query-status took \(took) ms")
        session.longCommands.join()
        let reply = session.takeLongCommandReplies().first
        #expect(reply?["id"] == "snap")
        #expect(reply?["return"]?["memory-size"] == .int(512 << 20), "\(String(describing: reply))")
        #expect(session.receive(Array(#"{"execute": "query-status"}"#.utf8)).first?["return"]?["status"] == "running")
    }
}
