import Glibc
import Control
import Devices
import Machine
import QMP
import Synchronization
import Testing
import TestSupport
import VMMCore
import VMMSys

/// A machine stand-in whose vmgenid is the real device wired to the real ACPI model (as the machine
/// wires them); the test plays the guest's OSPM by writing GPE0_STS through the bus harness.
final class DeviceBackedMachine: MachineControl, @unchecked Sendable {
    static let gpeSts: UInt64 = 0x620
    let pm: ACPIPowerManagement
    let vmgenid: VMGenID
    var bus = BusHarness()
    let memory: GuestMemory

    init() throws {
        pm = ACPIPowerManagement(sci: RecordingInterruptLine(), now: { monotonicNanoseconds() }, onPowerOff: {}, onReset: {})
        try bus.attach(pm.gpe0, name: "gpe0", at: Self.gpeSts, size: UInt64(pm.gpe0.length))
        memory = try GuestMemory(ranges: [(GuestAddress(0), 1 << 20)])
        vmgenid = VMGenID(guid: [UInt8](repeating: 0x11, count: 16), memory: memory, acpi: pm)
        vmgenid.addressWritten([0x28, 0x10, 0, 0, 0, 0, 0, 0])
    }

    /// The guest's OSPM clears GPE0_STS bits (write 1 to clear).
    func guestClears(_ bits: UInt8) { bus.write8(Self.gpeSts, bits) }

    var isPaused: Bool { false }
    func pause() {}
    func resume() {}
    func pressPowerButton() {}
    func requestExit(_ exit: MachineExit) {}
    var generationID: [UInt8]? { vmgenid.guid }
    func setGenerationID(_ guid: [UInt8]) -> Bool { vmgenid.setGUID(guid) }
    var generationIDChange: VMGenID.ChangeStatus? { vmgenid.changeStatus }
    func onGenerationIDAcknowledged(_ handler: (@Sendable (VMGenID.Acknowledgement) -> Void)?) { vmgenid.onAcknowledged(handler) }
    var tpmInfo: TPMBackendInfo? { nil }
    func createSnapshot(at directory: String, live: Bool, copyDrives: Bool) throws(MachineError) -> SnapshotReport {
        throw .invalidConfig("not in this test")
    }
}

@Suite("Control: VM_GENERATION_ID_ACKNOWLEDGED and query-vm-generation-id's acknowledgement fields")
struct GenerationIDAckTests {
    static let g1 = "12345678-9abc-def0-1234-56789abcdef0"
    static let g2 = "22222222-3333-4444-8555-666666666666"
    static let g3 = "33333333-4444-4555-8666-777777777777"

    static func set(_ guid: String) -> String { #"{"execute": "set-vm-generation-id", "arguments": {"guid": "\#(guid)"}}"# }
    static let query = #"{"execute": "query-vm-generation-id"}"#

    @Test("one event per change, after VM_GENERATION_ID_CHANGED; query says pending, then acknowledged with the latency")
    func eventOncePerChange() throws {
        let machine = try DeviceBackedMachine()
        let events = EventLog()
        let session = negotiatedSession(MachineCommands(machine: machine, emit: events.emit))
        func ask(_ text: String) -> JSONValue? { session.receive(Array(text.utf8)).first }

        #expect(ask(Self.query) == parse(#"{"return": {"guid": "11111111-1111-1111-1111-111111111111", "pending": false, "acknowledged": false}}"#))
        machine.guestClears(0x20)
        #expect(events.names.isEmpty, "a clear with no change pending")

        #expect(ask(Self.set(Self.g1)) == parse(#"{"return": {"guid": "\#(Self.g1)"}}"#))
        #expect(ask(Self.query) == parse(#"{"return": {"guid": "\#(Self.g1)", "pending": true, "acknowledged": false}}"#))
        usleep(2_000)
        machine.guestClears(0x01) // another GPE: nothing
        #expect(events.names == ["VM_GENERATION_ID_CHANGED"])
        machine.guestClears(0x20)
        machine.guestClears(0x20) // again: nothing more
        #expect(events.names == ["VM_GENERATION_ID_CHANGED", "VM_GENERATION_ID_ACKNOWLEDGED"])
        let data = try #require(events.data(of: "VM_GENERATION_ID_ACKNOWLEDGED").first ?? nil)
        #expect(data["guid"] == .string(Self.g1))
        guard case .double(let latency) = data["latency-ms"] else {
            Issue.record("latency-ms is not a number: \(data)")
            return
        }
        #expect(latency >= 2 && latency < 10_000, "latency \(latency) ms (the test slept 2 ms)")
        let reply = try #require(ask(Self.query)?["return"])
        #expect(reply["pending"] == false)
        #expect(reply["acknowledged"] == true)
        #expect(reply["ack-latency-ms"] == .double(latency))

        // Two changes before the guest's clear: one event, for the latest.
        _ = ask(Self.set(Self.g2))
        _ = ask(Self.set(Self.g3))
        #expect(ask(Self.query)?["return"]?["pending"] == true)
        machine.guestClears(0x20)
        machine.guestClears(0x20)
        #expect(events.names == ["VM_GENERATION_ID_CHANGED", "VM_GENERATION_ID_ACKNOWLEDGED",
                                 "VM_GENERATION_ID_CHANGED", "VM_GENERATION_ID_CHANGED", "VM_GENERATION_ID_ACKNOWLEDGED"])
        #expect(events.data(of: "VM_GENERATION_ID_ACKNOWLEDGED").map { $0?["guid"] } == [.string(Self.g1), .string(Self.g3)])
        #expect(events.data(of: "VM_GENERATION_ID_CHANGED").map { $0?["guid"] } == [.string(Self.g1), .string(Self.g2), .string(Self.g3)])
        #expect(ask(Self.query)?["return"]?["acknowledged"] == true)
    }

    @Test("a guest that never clears GPE 5 (no driver handling it): no event, and the change stays pending")
    func neverAcknowledged() throws {
        let machine = try DeviceBackedMachine()
        let events = EventLog()
        let session = negotiatedSession(MachineCommands(machine: machine, emit: events.emit))
        _ = session.receive(Array(Self.set("auto").utf8))
        usleep(20_000)
        #expect(events.names == ["VM_GENERATION_ID_CHANGED"])
        let reply = session.receive(Array(Self.query.utf8)).first?["return"]
        #expect(reply?["pending"] == true)
        #expect(reply?["acknowledged"] == false)
        #expect(reply?["ack-latency-ms"] == nil)
    }

    @Test("without the vmgenid device: set-vm-generation-id fails and emits nothing")
    func noDevice() {
        let machine = FakeMachine()
        machine.state.withLock { $0.guid = nil }
        let events = EventLog()
        let session = negotiatedSession(MachineCommands(machine: machine, emit: events.emit))
        #expect(errorDesc(session.receive(Array(Self.set(Self.g1).utf8)).first) == "VM Generation ID device not found")
        #expect(errorDesc(session.receive(Array(Self.query.utf8)).first) == "VM Generation ID device not found")
        #expect(events.names.isEmpty)
        #expect(machine.calls.isEmpty)
    }

    /// A guest OSPM reduced to its GPE handling: poll GPE0_STS, write 1 to clear bit 5, forever.
    ///
    ///     mov dx, 0x620
    ///     loop: in al, dx ; test al, 0x20 ; jz loop
    ///     mov al, 0x20 ; out dx, al ; jmp loop
    static let clearsGPE5: [UInt8] = [0x66, 0xBA, 0x20, 0x06, 0xEC, 0xA8, 0x20, 0x74, 0xFB, 0xB0, 0x20, 0xEE, 0xEB, 0xF6]

    @Test("a real machine and a tiny guest that clears GPE 5: one event per change through the machine's commands",
          .enabled(if: kvmAvailable(), "needs /dev/kvm"))
    func realMachine() throws {
        let machine = try Machine(MachineConfig(memorySize: 16 << 20, console: RecordingConsole()),
                                  boot: .program64(code: Self.clearsGPE5, loadAddress: 0x100000))
        let events = EventLog()
        let session = negotiatedSession(MachineCommands(machine: machine, emit: events.emit))
        let run = try OSThread(name: "test-machine", role: .io) { _ = machine.run() }
        defer {
            machine.requestExit(.quit("test"))
            run.join()
        }
        func ask(_ text: String) -> JSONValue? { session.receive(Array(text.utf8)).first }
        let acked = "VM_GENERATION_ID_ACKNOWLEDGED"
        _ = ask(Self.set(Self.g1))
        #expect(eventually { events.data(of: acked).count == 1 })
        #expect(events.data(of: acked).first??["guid"] == .string(Self.g1))
        #expect(ask(Self.query)?["return"]?["acknowledged"] == true)
        // Two changes while paused: one acknowledgement once the guest runs again, for the latest.
        _ = ask(#"{"execute": "stop"}"#)
        _ = ask(Self.set(Self.g2))
        _ = ask(Self.set(Self.g3))
        usleep(50_000)
        #expect(ask(Self.query)?["return"]?["pending"] == true)
        _ = ask(#"{"execute": "cont"}"#)
        #expect(eventually { events.data(of: acked).count == 2 })
        usleep(100_000)
        #expect(events.data(of: acked).map { $0?["guid"] } == [.string(Self.g1), .string(Self.g3)])
        let reply = ask(Self.query)?["return"]
        #expect(reply?["guid"] == .string(Self.g3))
        #expect(reply?["acknowledged"] == true)
        if case .double(let ms) = reply?["ack-latency-ms"] { #expect(ms >= 50, "the pause counts: \(ms) ms") } else {
            Issue.record("no ack-latency-ms in \(String(describing: reply))")
        }
        #expect(events.names == ["VM_GENERATION_ID_CHANGED", acked, "STOP", "VM_GENERATION_ID_CHANGED",
                                 "VM_GENERATION_ID_CHANGED", "RESUME", acked])
    }
}
