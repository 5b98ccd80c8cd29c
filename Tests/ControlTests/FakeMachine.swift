import Glibc
import Control
import Devices
import Machine
import QMP
import Synchronization

/// A machine stand-in that records what the commands asked of it. `createSnapshot` can be held
/// until `releaseSnapshot()`, to look at the monitor while a long command runs.
final class FakeMachine: MachineControl, @unchecked Sendable {
    struct State {
        var paused = false
        var calls: [String] = []
        var guid: [UInt8]? = Array(repeating: 0x11, count: 16)
        var change = VMGenID.ChangeStatus.unchanged
        var ackHandler: (@Sendable (VMGenID.Acknowledgement) -> Void)?
        var holdSnapshot = false
        var snapshotStarted = false
        var networks: [NetInfo] = []
    }
    let state = Mutex(State())
    private var mutex = pthread_mutex_t()
    private var cond = pthread_cond_t()
    private var released = false

    init(holdSnapshot: Bool = false) {
        state.withLock { $0.holdSnapshot = holdSnapshot }
        pthread_mutex_init(&mutex, nil)
        pthread_cond_init(&cond, nil)
    }

    deinit {
        pthread_cond_destroy(&cond)
        pthread_mutex_destroy(&mutex)
    }

    var calls: [String] { state.withLock { $0.calls } }
    var snapshotStarted: Bool { state.withLock { $0.snapshotStarted } }
    private func log(_ s: String) { state.withLock { $0.calls.append(s) } }

    var tpmInfo: TPMBackendInfo?
    var drives: [DriveInfo] = []
    var networks: [NetInfo] { state.withLock { $0.networks } }
    func setLink(_ name: String, up: Bool) -> Bool {
        state.withLock { s in
            guard let i = s.networks.firstIndex(where: { $0.name == name }) else { return false }
            s.calls.append("setLink \(name) \(up)")
            s.networks[i].linkUp = up
            return true
        }
    }
    var isPaused: Bool { state.withLock { $0.paused } }
    func pause() { log("pause"); state.withLock { $0.paused = true } }
    func resume() { log("resume"); state.withLock { $0.paused = false } }
    func pressPowerButton() { log("powerButton") }
    func requestExit(_ exit: MachineExit) { log("exit \(exit.cause.reason)") }
    var generationID: [UInt8]? { state.withLock { $0.guid } }
    func setGenerationID(_ guid: [UInt8]) -> Bool {
        log("setGenerationID")
        state.withLock { s in
            s.guid = guid
            s.change = .pending
        }
        return true
    }
    var generationIDChange: VMGenID.ChangeStatus? { state.withLock { $0.guid == nil ? nil : $0.change } }
    func onGenerationIDAcknowledged(_ handler: (@Sendable (VMGenID.Acknowledgement) -> Void)?) {
        state.withLock { $0.ackHandler = handler }
    }

    func createSnapshot(at directory: String, live: Bool, copyDrives: Bool) throws(MachineError) -> SnapshotReport {
        log("createSnapshot \(directory)\(live ? " live" : "")")
        let hold = state.withLock { s in
            s.snapshotStarted = true
            return s.holdSnapshot
        }
        if hold {
            pthread_mutex_lock(&mutex)
            while !released { pthread_cond_wait(&cond, &mutex) }
            pthread_mutex_unlock(&mutex)
        }
        if directory.hasPrefix("/fail") { throw .invalidConfig("cannot write \(directory)") }
        return SnapshotReport(diskBytes: 4096, memoryBytes: 1 << 20, duration: .milliseconds(5), pause: .microseconds(live ? 1500 : 5000))
    }

    func releaseSnapshot() {
        pthread_mutex_lock(&mutex)
        released = true
        pthread_cond_broadcast(&cond)
        pthread_mutex_unlock(&mutex)
    }
}

/// Records the events the commands emit.
final class EventLog: Sendable {
    private let events = Mutex<[(name: String, data: JSONValue?)]>([])
    var names: [String] { events.withLock { $0.map(\.name) } }
    /// The data of every event named `name`, in order.
    func data(of name: String) -> [JSONValue?] { events.withLock { $0.filter { $0.name == name }.map(\.data) } }
    var emit: MachineCommands.Emit { { [self] name, data in events.withLock { $0.append((name, data)) } } }
}

func parse(_ text: String) -> JSONValue {
    guard case .success(let v) = JSONValue.parse(text) else { fatalError("bad JSON in the test: \(text)") }
    return v
}

func errorDesc(_ reply: JSONValue?) -> String? {
    guard let e = reply?["error"], e["class"]?.stringValue == "GenericError" else { return nil }
    return e["desc"]?.stringValue
}

/// A negotiated session over `handler`.
func negotiatedSession(_ handler: any QMPCommandHandler) -> QMPSession {
    let s = QMPSession(handler: handler, fdSets: FdSets())
    _ = s.receive(Array(#"{"execute": "qmp_capabilities"}"#.utf8))
    return s
}

/// Waits until `condition` holds, up to `timeoutMilliseconds`.
func eventually(timeoutMilliseconds: Int = 5000, _ condition: () -> Bool) -> Bool {
    var waited = 0
    while !condition() {
        if waited >= timeoutMilliseconds { return false }
        usleep(5_000)
        waited += 5
    }
    return true
}
