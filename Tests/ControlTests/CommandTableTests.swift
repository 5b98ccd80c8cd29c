import Control
import Devices
import Machine
import QMP
import Testing

@Suite("Control: the machine's QMP command table")
struct CommandTableTests {
    /// Valid arguments for each command, so that only the unknown one is wrong.
    static let validArguments: [String: String] = [
        "set-vm-generation-id": #""guid": "auto", "#,
        "snapshot-create": #""path": "/tmp/never-written", "#,
        "set_link": #""name": "net0", "up": false, "#,
    ]

    @Test("every command refuses an unknown argument with QEMU's text, and does nothing")
    func unknownArgumentRefused() {
        #expect(MachineCommands.names.count == 15)
        for name in MachineCommands.names {
            let machine = FakeMachine()
            let events = EventLog()
            let session = negotiatedSession(MachineCommands(machine: machine, emit: events.emit))
            let args = Self.validArguments[name] ?? ""
            let replies = session.receive(Array(#"{"execute": "\#(name)", "arguments": {\#(args)"x": 1}, "id": 7}"#.utf8))
            #expect(replies.count == 1, "\(name): \(replies)")
            #expect(errorDesc(replies.first) == "Parameter 'x' is unexpected", "\(name): \(replies)")
            #expect(replies.first?["id"] == 7)
            #expect(machine.calls.isEmpty, "\(name) ran: \(machine.calls)")
            #expect(!machine.isPaused)
            #expect(events.names.isEmpty, "\(name) emitted \(events.names)")
            #expect(session.takeAfterReplyActions().isEmpty, "\(name) left an action to run after its reply")
            #expect(!session.longCommands.isBusy)
        }
    }

    @Test("stop with an unknown argument does not pause; without it, it does")
    func stopArguments() {
        let machine = FakeMachine()
        let events = EventLog()
        let session = negotiatedSession(MachineCommands(machine: machine, emit: events.emit))
        #expect(errorDesc(session.receive(Array(#"{"execute": "stop", "arguments": {"x": 1}}"#.utf8)).first) == "Parameter 'x' is unexpected")
        #expect(!machine.isPaused)
        #expect(session.receive(Array(#"{"execute": "stop", "arguments": {}}"#.utf8)) == [parse(#"{"return": {}}"#)])
        #expect(machine.isPaused)
        #expect(events.names == ["STOP"])
    }

    @Test("set-vm-generation-id and snapshot-create: missing and wrongly typed arguments", arguments: [
        (#"{"execute": "set-vm-generation-id"}"#, "Parameter 'guid' is missing"),
        (#"{"execute": "set-vm-generation-id", "arguments": {}}"#, "Parameter 'guid' is missing"),
        (#"{"execute": "set-vm-generation-id", "arguments": {"guid": 5}}"#, "Invalid parameter type for 'guid', expected: string"),
        (#"{"execute": "set-vm-generation-id", "arguments": {"guid": null}}"#, "Invalid parameter type for 'guid', expected: string"),
        (#"{"execute": "set-vm-generation-id", "arguments": {"x": 1}}"#, "Parameter 'guid' is missing"),
        (#"{"execute": "set-vm-generation-id", "arguments": {"guid": "nope"}}"#, "Parameter 'guid' expects a UUID or \"auto\", got 'nope'"),
        (#"{"execute": "snapshot-create"}"#, "Parameter 'path' is missing"),
        (#"{"execute": "snapshot-create", "arguments": {"path": true}}"#, "Invalid parameter type for 'path', expected: string"),
        (#"{"execute": "snapshot-create", "arguments": {"path": ["a"], "x": 1}}"#, "Invalid parameter type for 'path', expected: string"),
        (#"{"execute": "snapshot-create", "arguments": {"path": ""}}"#, "Parameter 'path' must not be empty"),
        (#"{"execute": "snapshot-create", "arguments": {"path": "/tmp/x", "live": "yes"}}"#, "Invalid parameter type for 'live', expected: boolean"),
    ])
    func badArguments(request: String, expected: String) {
        let machine = FakeMachine()
        let events = EventLog()
        let session = negotiatedSession(MachineCommands(machine: machine, emit: events.emit))
        let replies = session.receive(Array(request.utf8))
        #expect(errorDesc(replies.first) == expected, "\(replies)")
        #expect(machine.calls.isEmpty)
        #expect(events.names.isEmpty)
        #expect(!session.longCommands.isBusy)
    }

    @Test("query-commands lists the monitor's commands and then the table's")
    func queryCommands() {
        let session = negotiatedSession(MachineCommands(machine: FakeMachine(), emit: EventLog().emit))
        let reply = session.receive(Array(#"{"execute": "query-commands"}"#.utf8)).first
        guard case .array(let list)? = reply?["return"] else {
            Issue.record("no list: \(String(describing: reply))")
            return
        }
        #expect(list.compactMap { $0["name"]?.stringValue } == QMPSession.builtinCommands + MachineCommands.table.map(\.name))
        #expect(Set(MachineCommands.queryNames) == ["query-status", "query-vm-generation-id", "query-tpm", "query-tpm-models", "query-tpm-types",
                                                    "query-block", "query-rx-filter"])
    }

    @Test("query-block, query-rx-filter and set_link: QEMU's shapes, a link that goes down and up, unknown devices")
    func virtioQueries() {
        let machine = FakeMachine()
        machine.drives = [DriveInfo(name: "drive0", file: "/img/a.raw", readOnly: true, size: 8 << 20, id: "disk-a")]
        machine.state.withLock { $0.networks = [NetInfo(name: "net0", mac: [0x52, 0x54, 0, 0xab, 0x0c, 0x01], linkUp: true)] }
        let session = negotiatedSession(MachineCommands(machine: machine, emit: EventLog().emit))
        let block = session.receive(Array(#"{"execute": "query-block"}"#.utf8)).first?["return"]
        #expect(block?.arrayValue?.first?["device"] == "drive0")
        #expect(block?.arrayValue?.first?["qdev"] == "disk-a")
        #expect(block?.arrayValue?.first?["inserted"]?["ro"] == true)
        #expect(block?.arrayValue?.first?["inserted"]?["image"]?["virtual-size"] == .int(8 << 20))
        #expect(block?.arrayValue?.first?["inserted"]?["image"]?["filename"] == "/img/a.raw")
        let rx = session.receive(Array(#"{"execute": "query-rx-filter", "arguments": {"name": "net0"}}"#.utf8)).first?["return"]
        #expect(rx?.arrayValue?.first?["main-mac"] == "52:54:00:ab:0c:01")
        #expect(session.receive(Array(#"{"execute": "query-rx-filter", "arguments": {"name": "net9"}}"#.utf8)).first?["error"]?["class"] == "DeviceNotFound")
        #expect(session.receive(Array(#"{"execute": "set_link", "arguments": {"name": "net0", "up": false}}"#.utf8)).first == parse(#"{"return": {}}"#))
        #expect(machine.networks.first?.linkUp == false)
        #expect(session.receive(Array(#"{"execute": "set_link", "arguments": {"name": "net1", "up": true}}"#.utf8)).first?["error"]?["class"] == "DeviceNotFound")
        #expect(errorDesc(session.receive(Array(#"{"execute": "set_link", "arguments": {"name": "net0"}}"#.utf8)).first) == "Parameter 'up' is missing")
        #expect(machine.calls == ["setLink net0 false"])
    }

    @Test("query-tpm, query-tpm-models and query-tpm-types in QEMU's shapes, for each backend and for none")
    func tpmQueries() {
        let machine = FakeMachine()
        let session = negotiatedSession(MachineCommands(machine: machine, emit: EventLog().emit))
        func ask(_ command: String) -> JSONValue? { session.receive(Array(#"{"execute": "\#(command)"}"#.utf8)).first }
        #expect(ask("query-tpm") == parse(#"{"return": []}"#))
        #expect(ask("query-tpm-models") == parse(#"{"return": ["tpm-tis"]}"#))
        #expect(ask("query-tpm-types") == parse(#"{"return": ["emulator", "builtin"]}"#))
        machine.tpmInfo = TPMBackendInfo(kind: .emulator, path: "/run/swtpm.sock")
        #expect(ask("query-tpm") == parse(#"{"return": [{"id": "tpm0", "model": "tpm-tis", "options": {"type": "emulator", "data": {"chardev": "/run/swtpm.sock"}}}]}"#))
        machine.tpmInfo = TPMBackendInfo(kind: .builtin, path: "/var/lib/vm.tpm")
        #expect(ask("query-tpm") == parse(#"{"return": [{"id": "tpm0", "model": "tpm-tis", "options": {"type": "builtin", "data": {"state": "/var/lib/vm.tpm"}}}]}"#))
        #expect(machine.calls.isEmpty)
    }

    @Test("the commands still do their work with valid arguments")
    func validCommands() {
        let machine = FakeMachine()
        let events = EventLog()
        let session = negotiatedSession(MachineCommands(machine: machine, emit: events.emit))
        let r = session.receive(Array(#"""
            {"execute": "set-vm-generation-id", "arguments": {"guid": "12345678-9abc-def0-1234-56789abcdef0"}}
            {"execute": "query-vm-generation-id"}
            {"execute": "system_powerdown"}
            {"execute": "query-status"}
            """#.utf8))
        #expect(r == [parse(#"{"return": {"guid": "12345678-9abc-def0-1234-56789abcdef0"}}"#),
                      parse(#"{"return": {"guid": "12345678-9abc-def0-1234-56789abcdef0", "pending": true, "acknowledged": false}}"#),
                      parse(#"{"return": {}}"#),
                      parse(#"{"return": {"status": "running", "running": true, "singlestep": false}}"#)])
        #expect(machine.calls == ["setGenerationID", "powerButton"])
        #expect(events.names == ["VM_GENERATION_ID_CHANGED", "POWERDOWN"])
        #expect(session.receive(Array(#"{"execute": "system_reset"}"#.utf8)) == [parse(#"{"return": {}}"#)])
        for action in session.takeAfterReplyActions() { action() }
        #expect(machine.calls.last == "exit host-qmp-system-reset")
    }
}

@Suite("Control: SHUTDOWN causes")
struct ShutdownCauseTests {
    @Test("each exit's SHUTDOWN event data, summary and exit status", arguments: [
        (MachineExit.poweredOff("ACPI S5"), #"{"guest": true, "reason": "guest-shutdown"}"#, "guest powered off (ACPI S5)", Int32(0)),
        (.reset("keyboard controller reset"), #"{"guest": true, "reason": "guest-reset"}"#, "guest reset (keyboard controller reset); the VM ends on reset", 0),
        (.reset("QMP-like text from the guest side"), #"{"guest": true, "reason": "guest-reset"}"#, "guest reset (QMP-like text from the guest side); the VM ends on reset", 0),
        (.hostReset("QMP system_reset"), #"{"guest": false, "reason": "host-qmp-system-reset"}"#, "guest reset (QMP system_reset); the VM ends on reset", 0),
        (.guestCrashed("KVM system event: crash"), #"{"guest": true, "reason": "guest-panic"}"#, "guest crashed (KVM system event: crash)", 3),
        (.quit("QMP quit"), #"{"guest": false, "reason": "host-qmp-quit"}"#, "stopped (QMP quit)", 0),
        (.signalled(15), #"{"guest": false, "reason": "host-signal"}"#, "stopped by signal 15", 143),
        (.failed("boom"), #"{"guest": false, "reason": "host-error"}"#, "VM failed: boom", 1),
    ])
    func causes(exit: MachineExit, data: String, summary: String, status: Int32) {
        #expect(exit.shutdownEventData == parse(data))
        #expect(exit.summary == summary)
        #expect(exit.exitStatus == status)
    }

    @Test("the cause is structured, whatever the text says")
    func structured() {
        #expect(MachineExit.reset("QMP system_reset").cause == .guestReset)
        #expect(MachineExit.hostReset("guest").cause == .hostQMPSystemReset)
        #expect(MachineExit.signalled(2).cause == .hostSignal(2))
        #expect(MachineExit.reset("x") != MachineExit.hostReset("x"))
    }
}
