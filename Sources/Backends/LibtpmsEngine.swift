import CLibtpms
import Devices
import Glibc
import Synchronization
import VMMSys

/// A TPM 2.0 in this process: libtpms (Debian's, linked statically), its state in a
/// `TPMStateStore`. libtpms keeps one TPM per process in global state, so one engine at a time
/// may exist; its NVRAM callbacks read and write the store (on the TPM's thread, which may wait on
/// the disk: a write the guest saw succeed is durable).
public final class LibtpmsEngine: TPMEngine, @unchecked Sendable {
    /// /dev/null, for libtpms's log (opened once per process).
    private static let nullDevice: Int32 = (try? OwnedFD.open("/dev/null", flags: O_WRONLY | O_CLOEXEC).releaseRawValue()) ?? -1

    /// Whether an engine holds libtpms now.
    private static let inUse = Mutex(false)

    public let description: String
    public private(set) var bufferSize = 4096
    let store: TPMStateStore
    /// What libtpms calls back into; its `context` points at this engine.
    private let host: UnsafeMutablePointer<clibtpms_host>
    /// The first store error of a callback, reported by the call that triggered it.
    private var storeError: TPMStateStoreError?
    private var poweredOn = false
    private var released = false

    // TPM_RESULT values the callbacks return.
    static let tpmSuccess: UInt32 = 0, tpmFail: UInt32 = 9, tpmRetry: UInt32 = 0x800

    /// Takes libtpms for this process, with its state in `store`.
    public init(store: TPMStateStore) throws(TPMBackendError) {
        let taken = Self.inUse.withLock { used -> Bool in
            defer { used = true }
            return !used
        }
        guard taken else { throw TPMBackendError("libtpms is already in use in this process (one builtin TPM per process)") }
        self.store = store
        description = "libtpms (state \(store.path))"
        host = .allocate(capacity: 1)
        host.initialize(to: clibtpms_host(context: nil, load: { ctx, name, data, length in
            LibtpmsEngine.from(ctx).load(name: name, data: data, length: length)
        }, store: { ctx, name, data, length in
            LibtpmsEngine.from(ctx).store(name: name, data: data, length: length)
        }, remove: { ctx, name, mustExist in
            LibtpmsEngine.from(ctx).remove(name: name, mustExist: mustExist != 0)
        }, locality: 0))
        host.pointee.context = Unmanaged.passUnretained(self).toOpaque()
    }

    deinit {
        powerOff()
        host.deallocate()
    }

    private static func from(_ context: UnsafeMutableRawPointer?) -> LibtpmsEngine {
        Unmanaged<LibtpmsEngine>.fromOpaque(context!).takeUnretainedValue()
    }

    public func powerOn() throws(TPMBackendError) {
        guard !released else { throw TPMBackendError("\(description): powered off") }
        guard !poweredOn else { return }
        try startLibrary {}
    }

    /// Chooses TPM 2.0, registers the callbacks, sets the buffer size, runs `beforeInit` (SetState
    /// for a restore), then MainInit.
    private func startLibrary(_ beforeInit: () throws(TPMBackendError) -> Void) throws(TPMBackendError) {
        // libtpms's own log lines (a failure-mode notice on a rejected state) would break the
        // one-line errors: they go nowhere; what failed is reported by this engine.
        if Self.nullDevice >= 0 { clibtpms_set_log_fd(Self.nullDevice) }
        // OpenSSL reads its configuration file on first use: here, before the threads' filters,
        // not in the TPM thread's first command (a restored TPM runs no TPM2_Startup here).
        guard clibtpms_prepare_crypto() == 0 else { throw TPMBackendError("\(description): OpenSSL could not be initialised") }
        var rc = clibtpms_choose_tpm2()
        guard rc == 0 else { throw TPMBackendError("\(description): libtpms cannot be a TPM 2.0 (TPM_RESULT 0x\(String(rc, radix: 16)))") }
        rc = clibtpms_register(host)
        guard rc == 0 else { throw TPMBackendError("\(description): libtpms refused the callbacks (TPM_RESULT 0x\(String(rc, radix: 16)))") }
        var minimum: UInt32 = 0, maximum: UInt32 = 0
        bufferSize = Int(clibtpms_set_buffer_size(4096, &minimum, &maximum))
        do { try beforeInit() } catch {
            clibtpms_terminate()
            throw error
        }
        storeError = nil
        rc = clibtpms_main_init()
        if let storeError {
            clibtpms_terminate()
            throw TPMBackendError("\(storeError)")
        }
        guard rc == 0 else {
            clibtpms_terminate()
            throw TPMBackendError("\(description): libtpms could not start with this state (TPM_RESULT 0x\(String(rc, radix: 16))): the file holds a state libtpms rejects")
        }
        poweredOn = true
    }

    public func exportState() throws(TPMBackendError) -> TPMBackendState {
        guard poweredOn else { throw TPMBackendError("\(description): the TPM is not powered on") }
        var blobs: [[UInt8]] = []
        for type: UInt32 in [1, 2, 4] { // TPMLIB_STATE_PERMANENT, _VOLATILE, _SAVE_STATE
            var buffer: UnsafeMutablePointer<UInt8>?
            var length: UInt32 = 0
            let rc = clibtpms_get_state(type, &buffer, &length)
            defer { clibtpms_free(buffer) }
            if rc == Self.tpmRetry || (rc == 0 && buffer == nil) {
                blobs.append([])
                continue
            }
            guard rc == 0, let buffer, Int(length) <= TPMBackendState.maxBlobSize else {
                throw TPMBackendError("\(description): TPMLIB_GetState(\(type)) failed (TPM_RESULT 0x\(String(rc, radix: 16)), \(length) bytes)")
            }
            blobs.append(Array(UnsafeBufferPointer(start: buffer, count: Int(length))))
        }
        guard !blobs[0].isEmpty else { throw TPMBackendError("\(description): libtpms gave no permanent state") }
        return TPMBackendState(format: .libtpms, permanent: blobs[0], volatile: blobs[1], saveState: blobs[2])
    }

    /// A restored TPM's state goes into a state file of its own: a file that already holds a TPM
    /// (the original's, another clone's) is refused, so that clones never share a store and a
    /// restore never changes the original's. The state is written to the file at once.
    public func powerOn(from state: TPMBackendState) throws(TPMBackendError) {
        guard !released else { throw TPMBackendError("\(description): powered off") }
        guard !poweredOn else { throw TPMBackendError("\(description): already powered on") }
        guard state.format == .libtpms else {
            throw TPMBackendError("the snapshot's TPM state comes from \(state.format.backendName), whose blobs libtpms does not read: restore it with --tpm swtpm,socket=PATH")
        }
        do throws(TPMStateStoreError) {
            if try store.read("permall") != nil {
                throw TPMStateStoreError("\(store.path) already holds a TPM's state: a restored TPM's state goes into a new file (clones never share one, and the original's stays as it was)")
            }
        } catch { throw TPMBackendError("\(error)") }
        try startLibrary { () throws(TPMBackendError) in
            for (type, blob) in [(UInt32(1), state.permanent), (2, state.volatile), (4, state.saveState)] where !blob.isEmpty {
                let rc = blob.withUnsafeBufferPointer { clibtpms_set_state(type, $0.baseAddress, UInt32($0.count)) }
                guard rc == 0 else {
                    throw TPMBackendError("\(description): libtpms refused the snapshot's TPM state (TPMLIB_SetState(\(type)): TPM_RESULT 0x\(String(rc, radix: 16)))")
                }
            }
        }
        // The clone's file gets the state now (libtpms writes it again on its next change).
        let permanent: [UInt8]
        do { permanent = try exportState().permanent } catch {
            powerOff()
            throw error
        }
        do throws(TPMStateStoreError) { try store.write("permall", permanent) } catch {
            powerOff()
            throw TPMBackendError("\(error)")
        }
    }

    public func execute(_ command: [UInt8], locality: UInt8) throws(TPMBackendError) -> [UInt8] {
        guard poweredOn else { throw TPMBackendError("\(description): the TPM is not powered on") }
        host.pointee.locality = locality
        storeError = nil
        var response: UnsafeMutablePointer<UInt8>?
        var length: UInt32 = 0, capacity: UInt32 = 0
        var input = command
        let rc = input.withUnsafeMutableBufferPointer { b in
            clibtpms_process(&response, &length, &capacity, b.baseAddress, UInt32(b.count))
        }
        defer { clibtpms_free(response) }
        if let storeError { throw TPMBackendError("\(storeError)") }
        guard rc == 0, let response, length >= 10 else {
            throw TPMBackendError("\(description): TPMLIB_Process failed (TPM_RESULT 0x\(String(rc, radix: 16)), \(length) response bytes)")
        }
        return Array(UnsafeBufferPointer(start: response, count: Int(length)))
    }

    public func cancel() { _ = clibtpms_cancel() }

    public func powerOff() {
        if poweredOn {
            clibtpms_terminate()
            poweredOn = false
        }
        if !released {
            released = true
            Self.inUse.withLock { $0 = false }
        }
    }

    // MARK: libtpms's NVRAM callbacks (on the thread that called into libtpms)

    private func load(name: UnsafePointer<CChar>?, data: UnsafeMutablePointer<UnsafeMutablePointer<UInt8>?>?,
                      length: UnsafeMutablePointer<UInt32>?) -> UInt32 {
        guard let name, let data, let length else { return Self.tpmFail }
        do throws(TPMStateStoreError) {
            guard let bytes = try store.read(String(cString: name)) else { return Self.tpmRetry }
            guard let copy = malloc(max(1, bytes.count))?.assumingMemoryBound(to: UInt8.self) else { return Self.tpmFail }
            bytes.withUnsafeBufferPointer { copy.initialize(from: $0.baseAddress!, count: bytes.count) }
            data.pointee = copy
            length.pointee = UInt32(bytes.count)
            return Self.tpmSuccess
        } catch {
            if storeError == nil { storeError = error }
            return Self.tpmFail
        }
    }

    private func store(name: UnsafePointer<CChar>?, data: UnsafePointer<UInt8>?, length: UInt32) -> UInt32 {
        guard let name else { return Self.tpmFail }
        let bytes = data.map { Array(UnsafeBufferPointer(start: $0, count: Int(length))) } ?? []
        do throws(TPMStateStoreError) {
            try store.write(String(cString: name), bytes)
            return Self.tpmSuccess
        } catch {
            if storeError == nil { storeError = error }
            return Self.tpmFail
        }
    }

    private func remove(name: UnsafePointer<CChar>?, mustExist: Bool) -> UInt32 {
        guard let name else { return Self.tpmFail }
        let entry = String(cString: name)
        do throws(TPMStateStoreError) {
            if mustExist, try store.read(entry) == nil { return Self.tpmFail }
            try store.delete(entry)
            return Self.tpmSuccess
        } catch {
            if storeError == nil { storeError = error }
            return Self.tpmFail
        }
    }
}
