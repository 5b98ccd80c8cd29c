import Devices

/// A TPM 2.0 that runs commands synchronously: what the TPM worker thread (`TPMWorker`) drives.
/// Two engines exist: libtpms in this process (`LibtpmsEngine`) and an external swtpm reached
/// over its control and data channels (`SwtpmEngine`).
///
/// Threading: `powerOn` runs once on the launcher's thread before any vCPU starts (so that a
/// missing socket or a damaged state file is a one-line start-up error); every later call comes
/// from the worker thread, one at a time. No engine method is ever called on a vCPU or QMP thread.
public protocol TPMEngine: AnyObject {
    /// For logs and `query-tpm`: "libtpms (state /var/lib/x.tpm)", "swtpm at /run/swtpm.sock".
    var description: String { get }
    /// The largest command and response the engine takes, in bytes; the TIS buffer is
    /// min(this, 4096).
    var bufferSize: Int { get }
    /// Powers the TPM on (libtpms: MainInit with its state loaded; swtpm: CMD_INIT after the data
    /// channel and buffer size are set). The guest (or its firmware) then sends TPM2_Startup.
    func powerOn() throws(TPMBackendError)
    /// Runs one command (a whole TPM 2.0 command, header size == count, at most `bufferSize`
    /// bytes) at `locality` and returns the whole response. Throws when the TPM cannot answer
    /// (swtpm gone, a response that lies about its size, libtpms failing); the worker then gives
    /// the guest a TPM_RC_FAILURE response and logs the error once.
    func execute(_ command: [UInt8], locality: UInt8) throws(TPMBackendError) -> [UInt8]
    /// Asks a command that is running to finish early (swtpm: CMD_CANCEL_TPM_CMD); may do nothing.
    /// Called from another thread than `execute`'s.
    func cancel()
    /// The TPM's own state, between commands (for a snapshot).
    func exportState() throws(TPMBackendError) -> TPMBackendState
    /// Powers the TPM on continuing from `state` instead of its stored state (a restored guest's
    /// TPM): no TPM2_Startup follows.
    func powerOn(from state: TPMBackendState) throws(TPMBackendError)
    /// Powers the TPM off for good (libtpms: TPMLIB_Terminate; swtpm: CMD_SHUTDOWN). Safe to call
    /// more than once and after a failed `powerOn`.
    func powerOff()
}

/// Why a TPM backend cannot start or answer: one line, naming the backend and what to do.
public struct TPMBackendError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

extension TPMEngine {
    /// Sends TPM2_Startup(SU_CLEAR), as PC firmware does after power-on before it hands over to
    /// the OS: a directly booted guest then finds a started TPM, as it would under QEMU with its
    /// BIOS (Linux would otherwise log its self test's TPM_RC_INITIALIZE as an error and send
    /// Startup itself). TPM_RC_INITIALIZE (already started) is fine.
    public func startUp() throws(TPMBackendError) {
        let startup: [UInt8] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0]
        let response = try execute(startup, locality: 0)
        guard let code = TPMTIS.codeField(response) else {
            throw TPMBackendError("\(description): TPM2_Startup got a response of \(response.count) bytes")
        }
        guard code == 0 || code == Self.rcInitialize else {
            throw TPMBackendError("\(description): TPM2_Startup failed with response code 0x\(String(code, radix: 16))")
        }
    }
}

extension TPMEngine {
    /// TPM_RC_INITIALIZE: the TPM is already started (or, for other commands, not yet).
    static var rcInitialize: UInt32 { 0x100 }
}
