import Control
import Glibc
import Devices
import Machine
import QMP

extension Fuzz {
    /// A machine that does nothing: the command layer's arguments checks and replies are what is
    /// fuzzed, not a VM. Its one drive and network device give query-block, query-rx-filter and
    /// set_link something to find.
    final class NullMachine: MachineControl, @unchecked Sendable {
        var isPaused = false
        func pause() { isPaused = true }
        func resume() { isPaused = false }
        func pressPowerButton() {}
        func requestExit(_ exit: MachineExit) {}
        var generationID: [UInt8]? = Array(repeating: 0x42, count: 16)
        func setGenerationID(_ guid: [UInt8]) -> Bool { generationID = guid; return true }
        var generationIDChange: VMGenID.ChangeStatus? { .unchanged }
        func onGenerationIDAcknowledged(_ handler: (@Sendable (VMGenID.Acknowledgement) -> Void)?) {}
        var tpmInfo: TPMBackendInfo? { nil }
        func createSnapshot(at directory: String, live: Bool, copyDrives: Bool) throws(MachineError) -> SnapshotReport {
            SnapshotReport(diskBytes: 0, memoryBytes: 0, duration: .zero)
        }
        var drives = [DriveInfo(name: "virtio-blk0", file: "/dev/null", readOnly: false, size: 1 << 20, id: "drive0")]
        var networks = [NetInfo(name: "net0", mac: [0x52, 0x54, 0, 1, 2, 3], linkUp: true)]
        func setLink(_ name: String, up: Bool) -> Bool { name == "net0" }
    }

    /// `fuzz-qmp-commands`: arbitrary bytes as a negotiated client's input to the machine's command
    /// table (Control's `MachineCommands` over a `NullMachine`). Must never trap; every reply is an
    /// object with exactly one of `return` and `error`, and an `error` has a class and a description.
    public static func qmpCommands(_ data: [UInt8]) {
        let machine = NullMachine()
        let session = QMPSession(handler: MachineCommands(machine: machine, emit: { _, _ in }), fdSets: FdSets())
        _ = session.receive(Array(#"{"execute": "qmp_capabilities"}"#.utf8))
        var replies = session.receive(data)
        // A long command (snapshot-create) answers from its worker thread: wait for it to end (a
        // request held behind it may start another; the null machine's commands end at once).
        for _ in 0..<2000 {
            guard session.hasCommandInFlight else { break }
            session.longCommands.join()
            replies += session.takeLongCommandReplies()
            while let r = session.nextReply() { replies.append(r) }
        }
        replies += session.takeLongCommandReplies()
        while let r = session.nextReply() { replies.append(r) }
        for r in replies {
            guard case .object(let o) = r else { preconditionFailure("a reply that is not an object: \(r)") }
            precondition((o["return"] == nil) != (o["error"] == nil), "a reply with neither or both of return and error: \(r)")
            if case .object(let e)? = o["error"] {
                precondition(e["class"] != nil && e["desc"] != nil, "an error without class or desc: \(r)")
            }
        }
        session.close()
    }
}
