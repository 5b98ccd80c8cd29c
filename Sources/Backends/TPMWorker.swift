import Devices
import Logging
import Synchronization
import VMMSys

/// The TPM's own thread: the TIS hands it commands (`submit`, on a vCPU thread, which returns at
/// once) and it runs them one after another on its engine, then delivers each response back to
/// the TIS. The engine's waits (libtpms writing its state file, swtpm's socket) happen here only.
///
/// An engine that fails (swtpm gone, a malformed response) gives the guest a TPM_RC_FAILURE
/// response for that command and the log one line; it never leaves the guest waiting.
public final class TPMWorker: TPMBackend, @unchecked Sendable {
    private struct Job {
        var command: [UInt8]
        var locality: UInt8
        var complete: @Sendable ([UInt8]) -> Void
    }

    private struct Queue {
        var jobs: [Job] = []
        /// A command is being executed (taken from `jobs`, response not yet delivered).
        var busy = false
        var stopping = false
        var poweredOff = false
        var failures = 0
        /// Commands run, and the time the engine took for them (ns).
        var executed = 0
        var engineNanoseconds: UInt64 = 0
        /// The longest single command (its code and backend time): a guest driver's timeout
        /// (Linux gives GetCapability 750 ms) is then told apart from a slow backend.
        var slowest: (code: UInt32, nanoseconds: UInt64)?
    }

    /// Used only on the worker thread after start-up (and `cancel` from others, which engines allow).
    private let engine: any TPMEngine
    private let queue = Mutex(Queue())
    private let wake: EventFD
    private let idle: EventFD
    private let logger: Logger
    private let thread = Mutex<OSThread?>(nil)
    public let bufferSize: Int
    public let info: TPMBackendInfo
    /// The engine's description ("libtpms (state /x)", "swtpm at /run/x.sock").
    public let engineDescription: String

    /// Takes an engine that is powered on; `start` starts the thread.
    public init(engine: any TPMEngine, info: TPMBackendInfo, logger: Logger = Logger(label: "swiftvmm.tpm")) throws(TPMBackendError) {
        self.engine = engine
        self.info = info
        self.logger = logger
        bufferSize = engine.bufferSize
        engineDescription = engine.description
        do {
            wake = try EventFD()
            idle = try EventFD()
        } catch {
            throw TPMBackendError("cannot start the TPM thread: \(error)")
        }
    }

    /// Starts the thread that runs commands.
    public func start() throws(TPMBackendError) {
        do {
            let t = try OSThread(name: "tpm", role: .io) { [self] in loop() }
            thread.withLock { $0 = t }
        } catch {
            throw TPMBackendError("cannot start the TPM thread: \(error)")
        }
    }

    public func submit(_ command: [UInt8], locality: UInt8, complete: @escaping @Sendable ([UInt8]) -> Void) {
        let accepted = queue.withLock { q -> Bool in
            guard !q.stopping else { return false }
            q.jobs.append(Job(command: command, locality: locality, complete: complete))
            return true
        }
        if accepted { wake.signal() } else { complete(TPMTIS.errorResponse(TPMTIS.rcFailure)) }
    }

    public func cancel() { engine.cancel() }

    /// Whether no command is queued or running.
    public var isIdle: Bool { queue.withLock { !$0.busy && $0.jobs.isEmpty } }

    /// Waits until every command handed over has been answered and its response delivered to the
    /// TIS (a snapshot then saves the TIS with the response in its buffer); false if that took
    /// longer than `timeoutMilliseconds`.
    public func waitUntilIdle(timeoutMilliseconds: Int) -> Bool {
        let deadline = monotonicNanoseconds() + UInt64(max(0, timeoutMilliseconds)) * 1_000_000
        while !isIdle {
            let now = monotonicNanoseconds()
            guard now < deadline else { return false }
            idle.wait(timeoutMilliseconds: Int32(min(1000, (deadline - now) / 1_000_000 + 1)))
        }
        return true
    }

    /// The TPM's own state, for a snapshot: taken on the calling thread (the snapshot's) while the
    /// worker has nothing to do (`waitUntilIdle` returned with the vCPUs paused) and holds off.
    public func exportState() throws(TPMStateError) -> TPMBackendState {
        let claimed = queue.withLock { q -> Bool in
            guard !q.busy, q.jobs.isEmpty, !q.stopping else { return false }
            q.busy = true
            return true
        }
        guard claimed else { throw TPMStateError("the TPM is busy or stopped: its state cannot be saved now") }
        defer {
            queue.withLock { $0.busy = false }
            idle.signal()
        }
        do { return try engine.exportState() } catch { throw TPMStateError("\(error)") }
    }

    /// For a restored guest: powers the engine on from `state` (or fresh, with TPM2_Startup, when
    /// the snapshot has no TPM state) and starts the thread.
    public func resume(from state: TPMBackendState?) throws(TPMStateError) {
        do throws(TPMBackendError) {
            if let state {
                try engine.powerOn(from: state)
                try start()
            } else {
                try powerOnAndStart()
            }
        } catch { throw TPMStateError("\(error)") }
    }

    /// Powers the engine on fresh, starts it up (TPM2_Startup, as firmware does) and starts the
    /// thread: a booting guest's TPM.
    public func powerOnAndStart() throws(TPMBackendError) {
        try engine.powerOn()
        try engine.startUp()
        try start()
    }

    /// Stops the thread (a queued command is answered with TPM_RC_FAILURE) and powers the engine
    /// off. Safe to call more than once.
    public func stop() {
        let pending = queue.withLock { q -> [Job] in
            q.stopping = true
            defer { q.jobs = [] }
            return q.jobs
        }
        for job in pending { job.complete(TPMTIS.errorResponse(TPMTIS.rcFailure)) }
        wake.signal()
        let t = thread.withLock { t -> OSThread? in
            defer { t = nil }
            return t
        }
        t?.join()
        let first = queue.withLock { q -> Bool in
            defer { q.poweredOff = true }
            return !q.poweredOff
        }
        if first {
            engine.powerOff()
            let (n, ns, slowest) = queue.withLock { ($0.executed, $0.engineNanoseconds, $0.slowest) }
            let longest = slowest.map { "; the longest, command 0x\(String($0.code, radix: 16)), \(Self.milliseconds($0.nanoseconds)) ms" } ?? ""
            logger.info("TPM: \(n) command\(n == 1 ? "" : "s") run by \(engineDescription) in \(ns / 1_000_000) ms of backend time\(longest)")
        }
    }

    private func loop() {
        while true {
            let next = queue.withLock { q -> Job?? in
                if q.stopping { return .some(nil) }
                guard !q.jobs.isEmpty else { return nil }
                q.busy = true
                return q.jobs.removeFirst()
            }
            switch next {
            case .none:
                wake.wait()
                continue
            case .some(.none):
                return
            case .some(.some(let job)):
                let response: [UInt8]
                let started = monotonicNanoseconds()
                do {
                    response = try engine.execute(job.command, locality: job.locality)
                    let took = monotonicNanoseconds() - started
                    queue.withLock { q in
                        q.failures = 0
                        q.executed += 1
                        q.engineNanoseconds += took
                        if took > q.slowest?.nanoseconds ?? 0 { q.slowest = (TPMTIS.codeField(job.command) ?? 0, took) }
                    }
                } catch {
                    let n = queue.withLock { q -> Int in
                        q.failures += 1
                        return q.failures
                    }
                    // One line when the engine starts failing; after that, one per 100 commands.
                    if n == 1 || n % 100 == 0 {
                        logger.error("TPM: \(error) (the guest gets TPM_RC_FAILURE; \(n) failed command\(n == 1 ? "" : "s") in a row)")
                    }
                    response = TPMTIS.errorResponse(TPMTIS.rcFailure)
                }
                job.complete(response)
                queue.withLock { $0.busy = false }
                idle.signal()
            }
        }
    }

    /// The longest command so far: its code and its backend time in nanoseconds.
    var slowestCommand: (code: UInt32, nanoseconds: UInt64)? { queue.withLock { $0.slowest } }

    private static func milliseconds(_ ns: UInt64) -> String {
        let tenths = (ns + 50_000) / 100_000
        return "\(tenths / 10).\(tenths % 10)"
    }
}
