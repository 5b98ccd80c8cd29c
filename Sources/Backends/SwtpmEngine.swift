import Devices
import Glibc
import Logging
import Synchronization
import VMMSys

/// The state blobs swtpm hands out and takes back (CMD_GET_STATEBLOB / CMD_SET_STATEBLOB).
public enum SwtpmBlobType: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    /// The permanent state (NV, hierarchies, seeds): libtpms' "permall".
    case permanent = 1
    /// The volatile state (loaded objects, sessions, PCRs): "volatilestate".
    case volatile = 2
    /// The state TPM2_Shutdown(STATE) saved: "savestate" (absent otherwise).
    case savestate = 3

    public var description: String {
        switch self {
        case .permanent: "permanent"
        case .volatile: "volatile"
        case .savestate: "savestate"
        }
    }
}

/// The control commands a swtpm implements (CMD_GET_CAPABILITY's PTM_CAP_* bits).
public struct SwtpmCapabilities: OptionSet, Sendable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    public static let initialize = SwtpmCapabilities(rawValue: 1 << 0)
    public static let shutdown = SwtpmCapabilities(rawValue: 1 << 1)
    public static let getTPMEstablished = SwtpmCapabilities(rawValue: 1 << 2)
    public static let setLocality = SwtpmCapabilities(rawValue: 1 << 3)
    public static let hashing = SwtpmCapabilities(rawValue: 1 << 4)
    public static let cancelTPMCommand = SwtpmCapabilities(rawValue: 1 << 5)
    public static let storeVolatile = SwtpmCapabilities(rawValue: 1 << 6)
    public static let resetTPMEstablished = SwtpmCapabilities(rawValue: 1 << 7)
    public static let getStateBlob = SwtpmCapabilities(rawValue: 1 << 8)
    public static let setStateBlob = SwtpmCapabilities(rawValue: 1 << 9)
    public static let stop = SwtpmCapabilities(rawValue: 1 << 10)
    public static let getConfig = SwtpmCapabilities(rawValue: 1 << 11)
    public static let setDataFD = SwtpmCapabilities(rawValue: 1 << 12)
    public static let setBufferSize = SwtpmCapabilities(rawValue: 1 << 13)

    /// What a TPM 2.0 backend needs (the set QEMU's tpm_emulator requires).
    public static let requiredForTPM2: SwtpmCapabilities = [
        .initialize, .shutdown, .getTPMEstablished, .setLocality, .resetTPMEstablished, .setDataFD, .stop, .setBufferSize,
    ]

    /// What moving the TPM state in and out (snapshots) needs.
    public static let stateBlobs: SwtpmCapabilities = [.getStateBlob, .setStateBlob, .stop]

    static let names: [(SwtpmCapabilities, String)] = [
        (.initialize, "CMD_INIT"), (.shutdown, "CMD_SHUTDOWN"), (.getTPMEstablished, "CMD_GET_TPMESTABLISHED"),
        (.setLocality, "CMD_SET_LOCALITY"), (.hashing, "CMD_HASH_*"), (.cancelTPMCommand, "CMD_CANCEL_TPM_CMD"),
        (.storeVolatile, "CMD_STORE_VOLATILE"), (.resetTPMEstablished, "CMD_RESET_TPMESTABLISHED"),
        (.getStateBlob, "CMD_GET_STATEBLOB"), (.setStateBlob, "CMD_SET_STATEBLOB"), (.stop, "CMD_STOP"),
        (.getConfig, "CMD_GET_CONFIG"), (.setDataFD, "CMD_SET_DATAFD"), (.setBufferSize, "CMD_SET_BUFFERSIZE"),
    ]

    /// The command names of the bits set, e.g. "CMD_INIT, CMD_STOP".
    public var description: String {
        Self.names.filter { contains($0.0) }.map(\.1).joined(separator: ", ")
    }
}

/// The vTPM backed by an external swtpm (`swtpm socket --tpm2 --ctrl type=unixio,path=PATH`),
/// reached over its control socket and a data channel (one end of a socketpair handed to swtpm
/// with CMD_SET_DATAFD). Protocol: docs/guest-interfaces.md section 6; every integer is big-endian.
///
/// Replies are checked for their result code and their exact length: swtpm writes each reply
/// with one write, so once its first bytes are here the rest is too; a reply that is short,
/// long or garbage is a one-line error naming the command. A reply that broke the framing, a
/// timeout, or a connection that failed make the channel unusable: every later call on it
/// throws that first error (the VM then sees TPM failures; restarting swtpm and the VM is the
/// cure). The first time swtpm is found gone, one line is logged.
///
/// Threading: `execute`, `powerOn`, `powerOff` and the state blob calls come from one thread at
/// a time (the TPM worker; see `TPMEngine`); `cancel` comes from another. Two locks: `data`
/// (the data channel, held for a whole `execute`) and `control` (the control socket, held only
/// for one control request and its reply, each bounded by the timeout; taken after `data` when
/// both are needed). The control lock is never held while a TPM command runs, so `cancel`
/// waits at most behind one short control exchange, never behind a command. swtpm's main loop
/// is single-threaded: it reads CMD_CANCEL_TPM_CMD only after the running command has ended,
/// so `cancel` sends the request and does not wait for the reply; the next control exchange
/// reads it first. (libtpms clears the cancel flag when a command starts, so a late cancel
/// does not touch the next command.)
public final class SwtpmEngine: TPMEngine, Sendable {
    /// The control socket's path.
    public let socketPath: String
    public let description: String
    /// The buffer size swtpm agreed to (CMD_SET_BUFFERSIZE): at most 4096.
    public let bufferSize: Int
    /// The control commands this swtpm implements.
    public let capabilities: SwtpmCapabilities
    /// The timeout of each TPM command and each control exchange.
    public let timeoutMilliseconds: Int32

    /// Largest state blob taken or given (current swtpm rejects larger ones).
    public static let stateBlobLimit = 512 * 1024
    /// TPM_RETRY: CMD_GET_STATEBLOB's result for a blob that does not exist.
    static let resultRetry: UInt32 = 0x800

    private let peer: Peer
    private let logger: Logger?
    private let data: Mutex<DataChannel>
    private let control: Mutex<ControlChannel>

    /// True when swtpm can hand out and take back its state (CMD_GET/SET_STATEBLOB and CMD_STOP).
    public var supportsStateBlobs: Bool { capabilities.isSuperset(of: .stateBlobs) }

    private init(peer: Peer, capabilities: SwtpmCapabilities, bufferSize: Int, logger: Logger?,
                 control: consuming ControlChannel, data: consuming DataChannel) {
        self.peer = peer
        socketPath = peer.path
        description = "swtpm at \(peer.path)"
        timeoutMilliseconds = peer.timeout
        self.capabilities = capabilities
        self.bufferSize = bufferSize
        self.logger = logger
        self.control = Mutex(control)
        self.data = Mutex(data)
    }

    /// Connects to the swtpm whose control socket is `socketPath`: checks its capabilities,
    /// hands it the data channel (CMD_SET_DATAFD), checks that it emulates a TPM 2.0, stops it
    /// and sets the buffer size to min(its maximum, 4096). The TPM is not powered on yet
    /// (`powerOn`). `commandTimeoutMilliseconds` bounds each TPM command and each control reply.
    public static func connect(socketPath: String, commandTimeoutMilliseconds: Int32 = 120_000,
                               logger: Logger? = nil) throws(TPMBackendError) -> SwtpmEngine {
        let peer = Peer(path: socketPath, timeout: max(commandTimeoutMilliseconds, 1))
        let stream: UnixStream
        do {
            stream = try UnixStream.connect(to: socketPath)
        } catch {
            throw peer.error("cannot connect (\(reason(error.errno))): start `swtpm socket --tpm2 --ctrl type=unixio,path=\(socketPath)` first")
        }
        var control = ControlChannel(stream: stream)

        // CMD_GET_CAPABILITY: 8 bytes, a BE u64 of PTM_CAP_* bits (the first four bytes read as
        // a result of 0). The first exchange: a malformed reply means the peer is not swtpm.
        let reply = try control.exchange(.getCapability, peer: peer, successLength: 8, firstContact: true).reply
        let capabilities = SwtpmCapabilities(rawValue: BigEndian.u64(reply, 0))
        let missing = SwtpmCapabilities.requiredForTPM2.subtracting(capabilities)
        guard missing.isEmpty else {
            throw peer.error("swtpm lacks \(missing) (capabilities 0x\(String(capabilities.rawValue, radix: 16))): use swtpm 0.2 or later")
        }

        // The data channel: our end stays nonblocking, swtpm's is blocking (it reads it so).
        let pair: UnixStream.UnixStreamPair
        do {
            pair = try UnixStream.pair()
        } catch {
            throw peer.error("cannot create the data channel (\(error))")
        }
        let setFD = try control.exchange(.setDataFD, passing: [pair.remote.fd.rawValue], peer: peer)
        // swtpm holds the only other end now: its exit is our end of stream.
        let local = pair.closingRemote()
        guard setFD.result == 0 else {
            if setFD.result == 0x1F {
                throw peer.error("swtpm refused the data channel (TPM_IOERROR): another VMM already uses this swtpm; start one swtpm per VM")
            }
            throw peer.error("CMD_SET_DATAFD failed (TPM result 0x\(hex(setFD.result))): restart swtpm")
        }
        let data = DataChannel(stream: local)
        try data.checkTPM2(peer: peer)

        // Stopped, so that the buffer size can be set. swtpm answers CMD_STOP with success
        // whatever its state; a failure only shows in the SET_BUFFERSIZE that follows, so it
        // is logged and tolerated (as QEMU's tpm_emulator does).
        let stop = try control.exchange(.stop, peer: peer)
        if stop.result != 0 {
            logger?.warning("\(peer.prefix): CMD_STOP failed (TPM result 0x\(hex(stop.result))); setting the buffer size anyway")
        }
        let sizes = try control.setBufferSize(0, peer: peer)
        guard sizes.minimum <= sizes.maximum, sizes.maximum >= 10 else {
            throw peer.error("CMD_SET_BUFFERSIZE reported sizes \(sizes.minimum)...\(sizes.maximum), not a usable range: restart swtpm")
        }
        let wanted = min(sizes.maximum, 4096)
        let agreed = try control.setBufferSize(wanted, peer: peer)
        guard agreed.size >= 10 && agreed.size <= wanted else {
            throw peer.error("CMD_SET_BUFFERSIZE(\(wanted)) set \(agreed.size) bytes: restart swtpm")
        }
        return SwtpmEngine(peer: peer, capabilities: capabilities, bufferSize: Int(agreed.size), logger: logger,
                           control: control, data: data)
    }

    // MARK: TPMEngine

    /// CMD_INIT with no flags: swtpm (re)starts libtpms with the state in its state directory.
    public func powerOn() throws(TPMBackendError) {
        try powerOn(deletingVolatileState: false)
    }

    /// CMD_INIT; with `deletingVolatileState` (PTM_INIT_FLAG_DELETE_VOLATILE) swtpm deletes the
    /// volatile state file once it has loaded it (what a restore after `setStateBlob` wants).
    public func powerOn(deletingVolatileState: Bool) throws(TPMBackendError) {
        try withControl { (control: inout ControlChannel) throws(TPMBackendError) in
            let reply = try control.exchange(.initialize, body: BigEndian.bytes(UInt32(deletingVolatileState ? 1 : 0)), peer: peer)
            guard reply.result == 0 else {
                throw peer.error("CMD_INIT failed (TPM result 0x\(hex(reply.result))): the TPM state in swtpm's --tpmstate directory may be damaged; see swtpm's log")
            }
        }
    }

    /// Sets the locality when it changed (CMD_SET_LOCALITY), writes the command on the data
    /// channel and reads the response: the 10-byte header, whose size must be within
    /// 10...bufferSize, then the rest, each wait bounded by the timeout.
    public func execute(_ command: [UInt8], locality: UInt8) throws(TPMBackendError) -> [UInt8] {
        try data.withLock { (data: inout DataChannel) throws(TPMBackendError) -> [UInt8] in
            if let failure = data.failure { throw failure }
            if control.withLock({ $0.shutDown }) { throw peer.error("a TPM command after CMD_SHUTDOWN: the TPM is powered off") }
            guard command.count >= 10, command.count <= bufferSize, Int(BigEndian.u32(command, 2)) == command.count else {
                throw peer.error("refused a TPM command of \(command.count) bytes (its header says \(command.count >= 6 ? String(BigEndian.u32(command, 2)) : "nothing"), the buffer is \(bufferSize) bytes): a bug of the TPM device")
            }
            guard locality <= 4 else { throw peer.error("refused locality \(locality) (0 to 4): a bug of the TPM device") }
            if data.locality != locality {
                try withControl { (control: inout ControlChannel) throws(TPMBackendError) in
                    try control.setLocality(locality, peer: peer)
                }
                data.locality = locality
            }
            do throws(TPMBackendError) {
                return try data.transact(command, bufferSize: bufferSize, peer: peer)
            } catch {
                data.failure = error
                logger?.error("\(error.message)")
                throw error
            }
        }
    }

    /// CMD_CANCEL_TPM_CMD when swtpm has it; sends the request without waiting for the reply
    /// (see the type's comment). At most one cancel is outstanding.
    public func cancel() {
        guard capabilities.contains(.cancelTPMCommand) else { return }
        control.withLock { (control: inout ControlChannel) in
            control.sendCancel(peer: peer)
        }
    }

    /// CMD_SHUTDOWN: swtpm stores its state and exits. Later calls do nothing; errors (swtpm
    /// already gone) are logged at debug level only.
    public func powerOff() {
        control.withLock { (control: inout ControlChannel) in
            guard !control.shutDown else { return }
            do throws(TPMBackendError) {
                let reply = try control.exchange(.shutdown, peer: peer)
                if reply.result != 0 { logger?.debug("\(peer.prefix): CMD_SHUTDOWN: TPM result 0x\(hex(reply.result))") }
            } catch {
                logger?.debug("\(error.message)")
            }
            control.shutDown = true
        }
    }

    // MARK: State blobs

    /// The three state blobs, in the clear (for a snapshot).
    public func exportState() throws(TPMBackendError) -> TPMBackendState {
        var blobs: [[UInt8]] = []
        for type in [SwtpmBlobType.permanent, .volatile, .savestate] {
            let (flags, bytes) = try stateBlob(type)
            guard flags & 2 == 0 else {
                throw TPMBackendError("\(description): swtpm hands out its \(type) state encrypted (it has a state key): a snapshot needs it in the clear")
            }
            blobs.append(bytes)
        }
        return TPMBackendState(format: .swtpm, permanent: blobs[0], volatile: blobs[1], saveState: blobs[2])
    }

    /// Sets the three blobs (CMD_STOP first), then CMD_INIT with DELETE_VOLATILE.
    public func powerOn(from state: TPMBackendState) throws(TPMBackendError) {
        guard state.format == .swtpm else {
            throw TPMBackendError("the snapshot's TPM state comes from \(state.format.backendName), whose blobs swtpm does not read: restore it with --tpm builtin,state=NEWPATH")
        }
        try setStateBlob(.permanent, flags: 0, bytes: state.permanent)
        if !state.volatile.isEmpty { try setStateBlob(.volatile, flags: 0, bytes: state.volatile) }
        if !state.saveState.isEmpty { try setStateBlob(.savestate, flags: 0, bytes: state.saveState) }
        // As QEMU after an incoming migration: start from the blobs just set, then forget the
        // volatile one, so that a later restart of swtpm does not resume from it again.
        try powerOn(deletingVolatileState: true)
    }

    /// The TPM's `type` state blob (CMD_GET_STATEBLOB, decrypted, from offset 0) and its flags
    /// (2: still encrypted, with swtpm's migration key). A blob that does not exist (TPM_RETRY,
    /// e.g. the savestate blob before TPM2_Shutdown(STATE)) is empty. The TPM must be running.
    public func stateBlob(_ type: SwtpmBlobType) throws(TPMBackendError) -> (flags: UInt32, bytes: [UInt8]) {
        try requireStateBlobs()
        return try data.withLock { (_: inout DataChannel) throws(TPMBackendError) -> (flags: UInt32, bytes: [UInt8]) in
            try withControl { (control: inout ControlChannel) throws(TPMBackendError) -> (flags: UInt32, bytes: [UInt8]) in
                try control.getStateBlob(type, peer: peer)
            }
        }
    }

    /// Gives swtpm the `type` state blob (CMD_SET_STATEBLOB with `flags` as `stateBlob` returned
    /// them), at most `stateBlobLimit` bytes. Stops the TPM first (CMD_STOP, as swtpm requires):
    /// power it on again (`powerOn`) once every blob is set, the permanent one first.
    public func setStateBlob(_ type: SwtpmBlobType, flags: UInt32, bytes: [UInt8]) throws(TPMBackendError) {
        try requireStateBlobs()
        guard bytes.count <= Self.stateBlobLimit else {
            throw peer.error("the \(type) state blob has \(bytes.count) bytes, more than swtpm takes (\(Self.stateBlobLimit)): it cannot be restored into swtpm")
        }
        try data.withLock { (_: inout DataChannel) throws(TPMBackendError) in
            try withControl { (control: inout ControlChannel) throws(TPMBackendError) in
                let stop = try control.exchange(.stop, peer: peer)
                guard stop.result == 0 else {
                    throw peer.error("CMD_STOP failed (TPM result 0x\(hex(stop.result))) before CMD_SET_STATEBLOB: restart swtpm")
                }
                let header = BigEndian.bytes(flags) + BigEndian.bytes(type.rawValue) + BigEndian.bytes(UInt32(bytes.count))
                let reply = try control.exchange(.setStateBlob, body: header + bytes, peer: peer)
                guard reply.result == 0 else {
                    throw peer.error("CMD_SET_STATEBLOB refused the \(type) blob of \(bytes.count) bytes (TPM result 0x\(hex(reply.result))): the blob is damaged, or encrypted with a key swtpm lacks")
                }
            }
        }
    }

    private func requireStateBlobs() throws(TPMBackendError) {
        guard supportsStateBlobs else {
            throw peer.error("this swtpm lacks \(SwtpmCapabilities.stateBlobs.subtracting(capabilities)): its TPM state cannot be saved or restored; use a newer swtpm")
        }
    }

    private func withControl<R: Sendable>(_ body: (inout ControlChannel) throws(TPMBackendError) -> R) throws(TPMBackendError) -> R {
        // The first failure that makes the control channel unusable is logged once.
        try control.withLock { (control: inout ControlChannel) throws(TPMBackendError) -> sending R in
            let alreadyFailed = control.failure != nil
            do throws(TPMBackendError) {
                return try body(&control)
            } catch {
                if !alreadyFailed, control.failure != nil { logger?.error("\(error.message)") }
                throw error
            }
        }
    }
}

// MARK: - Channels

/// Names the swtpm in messages and holds the timeout.
private struct Peer: Sendable {
    let path: String
    let timeout: Int32

    var prefix: String { "swtpm at \(path)" }

    func error(_ detail: String) -> TPMBackendError { TPMBackendError("\(prefix): \(detail)") }

    /// The socket failed: swtpm died (EPIPE, ECONNRESET) or something else went wrong.
    func failed(_ error: SysError, channel: String) -> TPMBackendError {
        if error.errno == EPIPE || error.errno == ECONNRESET || error.errno == ENOTCONN {
            return self.error("swtpm exited or was killed (\(reason(error.errno)) on the \(channel) channel): restart swtpm and the VM")
        }
        return self.error("the \(channel) channel failed (\(error)): restart swtpm and the VM")
    }

    func closed(channel: String, during what: String) -> TPMBackendError {
        error("swtpm exited or was killed (it closed the \(channel) channel during \(what)): restart swtpm and the VM")
    }

    func timedOut(_ what: String, hint: String) -> TPMBackendError {
        error("no reply to \(what) within \(timeout) ms: \(hint)")
    }

    /// A reply of the wrong shape; on the first exchange, the peer is not swtpm at all.
    func malformed(_ command: ControlCommand, _ detail: String, firstContact: Bool) -> TPMBackendError {
        if firstContact {
            return error("the peer is not swtpm: \(command) got \(detail): check that \(path) is the --ctrl socket of `swtpm socket --tpm2`")
        }
        return error("\(command) got \(detail), not a swtpm reply: restart swtpm")
    }
}

/// Control command codes.
enum ControlCommand: UInt32, CustomStringConvertible {
    case getCapability = 0x01
    case initialize = 0x02
    case shutdown = 0x03
    case setLocality = 0x05
    case cancelTPMCommand = 0x09
    case getStateBlob = 0x0C
    case setStateBlob = 0x0D
    case stop = 0x0E
    case setDataFD = 0x10
    case setBufferSize = 0x11

    var description: String {
        switch self {
        case .getCapability: "CMD_GET_CAPABILITY"
        case .initialize: "CMD_INIT"
        case .shutdown: "CMD_SHUTDOWN"
        case .setLocality: "CMD_SET_LOCALITY"
        case .cancelTPMCommand: "CMD_CANCEL_TPM_CMD"
        case .getStateBlob: "CMD_GET_STATEBLOB"
        case .setStateBlob: "CMD_SET_STATEBLOB"
        case .stop: "CMD_STOP"
        case .setDataFD: "CMD_SET_DATAFD"
        case .setBufferSize: "CMD_SET_BUFFERSIZE"
        }
    }
}

/// The control socket and what is known about its framing.
private struct ControlChannel: ~Copyable {
    let stream: UnixStream
    /// Why the channel is unusable; every later exchange throws it.
    var failure: TPMBackendError?
    /// CMD_CANCEL_TPM_CMD requests sent whose 4-byte replies are still to be read.
    var unreadCancelReplies = 0
    /// CMD_SHUTDOWN was sent: swtpm is gone by design.
    var shutDown = false

    init(stream: consuming UnixStream) {
        self.stream = stream
    }

    /// Sends `command` with `body` and reads its reply: `successLength` bytes in all when the
    /// result (the first four) is 0; else four bytes, or `errorLength` when the command has a
    /// longer error form. Returns the result and the whole reply. Failures make the channel
    /// unusable.
    mutating func exchange(_ command: ControlCommand, body: [UInt8] = [], passing descriptors: [Int32] = [], peer: Peer,
                           successLength: Int = 4, errorLength: Int = 4,
                           firstContact: Bool = false) throws(TPMBackendError) -> (result: UInt32, reply: [UInt8]) {
        try begin(command, body: body, passing: descriptors, peer: peer)
        do throws(TPMBackendError) {
            var reply = try receiveControl(4, of: command, expected: "\(successLength)", received: 0, peer: peer, firstContact: firstContact)
            let result = BigEndian.u32(reply, 0)
            if result == 0 || command == .getCapability {
                reply += try receiveControl(successLength - 4, of: command, expected: "\(successLength)", received: 4, peer: peer,
                                  firstContact: firstContact)
            } else if errorLength > 4 {
                reply += try readOptionalRest(errorLength - 4, of: command, peer: peer, firstContact: firstContact)
            }
            try checkNothingFollows(command, length: reply.count, peer: peer, firstContact: firstContact)
            return (result, reply)
        } catch {
            failure = error
            throw error
        }
    }

    /// CMD_SET_LOCALITY (one byte of body, which swtpm reads).
    mutating func setLocality(_ locality: UInt8, peer: Peer) throws(TPMBackendError) {
        let reply = try exchange(.setLocality, body: [locality], peer: peer)
        guard reply.result == 0 else {
            if reply.result == 0x3D {
                throw peer.error("CMD_SET_LOCALITY refused locality \(locality) (TPM_BAD_LOCALITY): swtpm was started with --locality reject-locality-4")
            }
            throw peer.error("CMD_SET_LOCALITY(\(locality)) failed (TPM result 0x\(hex(reply.result))): restart swtpm")
        }
    }

    /// CMD_SET_BUFFERSIZE: `wanted` bytes (0: only ask). Returns the size in force and the range.
    mutating func setBufferSize(_ wanted: UInt32, peer: Peer) throws(TPMBackendError) -> (size: UInt32, minimum: UInt32, maximum: UInt32) {
        let reply = try exchange(.setBufferSize, body: BigEndian.bytes(wanted), peer: peer, successLength: 16)
        guard reply.result == 0 else {
            throw peer.error("CMD_SET_BUFFERSIZE(\(wanted)) failed (TPM result 0x\(hex(reply.result))): the TPM may be running; restart swtpm")
        }
        return (BigEndian.u32(reply.reply, 4), BigEndian.u32(reply.reply, 8), BigEndian.u32(reply.reply, 12))
    }

    /// CMD_GET_STATEBLOB, decrypted, offset 0. The reply: result, flags, total length, length,
    /// then the bytes (only when the result is 0); swtpm sends the whole blob at once over a
    /// socket, so both lengths must agree, and be at most `stateBlobLimit`. An error reply is
    /// four bytes (TPM not running) or the 16-byte header (TPM_RETRY: no such blob).
    mutating func getStateBlob(_ type: SwtpmBlobType, peer: Peer) throws(TPMBackendError) -> (flags: UInt32, bytes: [UInt8]) {
        let command = ControlCommand.getStateBlob
        let body = BigEndian.bytes(UInt32(1)) + BigEndian.bytes(type.rawValue) + BigEndian.bytes(UInt32(0))
        try begin(command, body: body, passing: [], peer: peer)
        let result: UInt32
        var flags: UInt32 = 0
        var bytes: [UInt8] = []
        do throws(TPMBackendError) {
            var header = try receiveControl(4, of: command, expected: "16 or more", received: 0, peer: peer, firstContact: false)
            result = BigEndian.u32(header, 0)
            if result != 0 {
                header += try readOptionalRest(12, of: command, peer: peer, firstContact: false)
            } else {
                header += try receiveControl(12, of: command, expected: "16 or more", received: 4, peer: peer, firstContact: false)
                flags = BigEndian.u32(header, 4)
                let total = BigEndian.u32(header, 8)
                let length = BigEndian.u32(header, 12)
                guard total == length, length <= SwtpmEngine.stateBlobLimit else {
                    throw peer.error("\(command)(\(type)) announced \(length) of \(total) bytes (at most \(SwtpmEngine.stateBlobLimit), all at once): restart swtpm")
                }
                bytes = try receiveControl(Int(length), of: command, expected: "\(16 + Int(length))", received: 16, peer: peer, firstContact: false)
            }
            try checkNothingFollows(command, length: header.count + bytes.count, peer: peer, firstContact: false)
        } catch {
            failure = error
            throw error
        }
        // The reply was read in good order: a refusal leaves the channel usable.
        switch result {
        case 0: return (flags, bytes)
        case SwtpmEngine.resultRetry: return (0, [])
        case 0x0A: throw peer.error("\(command)(\(type)) refused (TPM_BAD_ORDINAL): the TPM is not running; power it on first")
        default: throw peer.error("\(command)(\(type)) failed (TPM result 0x\(hex(result))): see swtpm's log")
        }
    }

    /// Sends CMD_CANCEL_TPM_CMD unless one is outstanding, and returns at once: swtpm answers
    /// only when the running command has ended; the next exchange reads that reply. A failure
    /// here is left for that exchange to find.
    mutating func sendCancel(peer: Peer) {
        guard failure == nil, !shutDown, unreadCancelReplies == 0 else { return }
        let request = BigEndian.bytes(ControlCommand.cancelTPMCommand.rawValue)
        // The socket is idle (the lock is ours), so its buffer has room: this does not wait.
        if (try? sendAll(stream, request, timeoutMilliseconds: 1000)) == true {
            unreadCancelReplies += 1
        }
    }

    /// Checks the channel, reads the replies of cancels sent earlier, and sends the request.
    private mutating func begin(_ command: ControlCommand, body: [UInt8], passing descriptors: [Int32], peer: Peer) throws(TPMBackendError) {
        if let failure { throw failure }
        if shutDown { throw peer.error("\(command) after CMD_SHUTDOWN: the TPM is powered off") }
        do throws(TPMBackendError) {
            while unreadCancelReplies > 0 {
                // Four bytes (the result; a failure, e.g. TPM not running, is harmless here).
                _ = try receiveControl(4, of: .cancelTPMCommand, expected: "4", received: 0, peer: peer, firstContact: false)
                unreadCancelReplies -= 1
            }
            let request = BigEndian.bytes(command.rawValue) + body
            let sent: Bool
            do {
                sent = try sendAll(stream, request, passing: descriptors, timeoutMilliseconds: peer.timeout)
            } catch {
                throw peer.failed(error, channel: "control")
            }
            guard sent else { throw peer.timedOut("\(command) (swtpm does not read its control socket)", hint: "restart swtpm") }
        } catch {
            failure = error
            throw error
        }
    }

    /// Reads exactly `count` bytes of `command`'s reply (`received` were read before), within
    /// the timeout.
    private func receiveControl(_ count: Int, of command: ControlCommand, expected: String, received: Int, peer: Peer,
                      firstContact: Bool) throws(TPMBackendError) -> [UInt8] {
        let bytes: [UInt8]
        let outcome: UnixStream.FillOutcome
        do {
            (bytes, outcome) = try receiveExactly(stream, count, timeoutMilliseconds: peer.timeout)
        } catch {
            throw peer.failed(error, channel: "control")
        }
        switch outcome {
        case .complete:
            return bytes
        case .endOfStream(let n):
            if received + n == 0 && !firstContact { throw peer.closed(channel: "control", during: "\(command)") }
            throw peer.malformed(command, "\(received + n) bytes (expected \(expected)) and the connection closed", firstContact: firstContact)
        case .timedOut(let n):
            if received + n == 0 {
                throw peer.timedOut("\(command)", hint: "swtpm hangs, or another client holds its control channel (it serves one at a time)")
            }
            throw peer.malformed(command, "\(received + n) bytes (expected \(expected)) and then nothing", firstContact: firstContact)
        }
    }

    /// The rest of an error reply that has a long form: `count` more bytes, or none. swtpm sends
    /// a reply with one write, so whatever follows is here already.
    private func readOptionalRest(_ count: Int, of command: ControlCommand, peer: Peer, firstContact: Bool) throws(TPMBackendError) -> [UInt8] {
        let bytes: [UInt8]
        let outcome: UnixStream.FillOutcome
        do {
            (bytes, outcome) = try receiveExactly(stream, count, timeoutMilliseconds: 0)
        } catch {
            throw peer.failed(error, channel: "control")
        }
        switch outcome {
        case .complete: return bytes
        case .endOfStream(0), .timedOut(0): return []
        case .endOfStream(let n), .timedOut(let n):
            throw peer.malformed(command, "an error reply of \(4 + n) bytes (expected 4 or \(4 + count))", firstContact: firstContact)
        }
    }

    /// After a whole reply, nothing more may be waiting.
    private func checkNothingFollows(_ command: ControlCommand, length: Int, peer: Peer, firstContact: Bool) throws(TPMBackendError) {
        let received: UnixStream.Received
        do {
            received = try receiveNow(stream, upTo: 64)
        } catch {
            throw peer.failed(error, channel: "control")
        }
        if case .data(let n, let descriptors) = received {
            closeDescriptors(descriptors)
            throw peer.malformed(command, "a reply longer than \(length) bytes (\(length + n) or more)", firstContact: firstContact)
        }
    }
}

/// The data channel (our end of the socketpair) and the locality swtpm was last given.
private struct DataChannel: ~Copyable {
    let stream: UnixStream
    /// The locality set with CMD_SET_LOCALITY; nil until the first command.
    var locality: UInt8?
    /// Why the channel is unusable (swtpm died, a response broke the framing, a timeout: a late
    /// response would be taken for the next one's); every later command throws it.
    var failure: TPMBackendError?

    init(stream: consuming UnixStream) {
        self.stream = stream
    }

    /// Writes `command` and reads its response.
    func transact(_ command: [UInt8], bufferSize: Int, peer: Peer) throws(TPMBackendError) -> [UInt8] {
        let sent: Bool
        do {
            sent = try sendAll(stream, command, timeoutMilliseconds: peer.timeout)
        } catch {
            throw peer.failed(error, channel: "data")
        }
        guard sent else { throw peer.timedOut("a TPM command (swtpm does not read it)", hint: "swtpm hangs; restart swtpm and the VM") }
        let header = try receiveData(10, received: 0, peer: peer)
        let size = Int(BigEndian.u32(header, 2))
        guard size >= 10 && size <= bufferSize else {
            throw peer.error("a TPM response announced \(size) bytes (10 to \(bufferSize)): swtpm misbehaves; restart swtpm and the VM")
        }
        return header + (try receiveData(size - 10, received: 10, peer: peer))
    }

    /// Before the TPM is initialised swtpm answers any command with a failure response of its
    /// TPM version's form; a TPM2 command gets tag 0x8001 from a TPM 2.0, 0x00C4 from a 1.2.
    func checkTPM2(peer: Peer) throws(TPMBackendError) {
        // TPM2_GetRandom(1): harmless should the TPM already run (another VMM initialised it).
        let probe: [UInt8] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, 0, 1]
        let response = try transact(probe, bufferSize: 4096, peer: peer)
        switch BigEndian.u16(response, 0) {
        case 0x8001, 0x8002: return
        case 0x00C4: throw peer.error("swtpm emulates a TPM 1.2: start it with --tpm2")
        case let tag: throw peer.error("the data channel answered with tag 0x\(String(tag, radix: 16)), not a TPM response: restart swtpm")
        }
    }

    private func receiveData(_ count: Int, received: Int, peer: Peer) throws(TPMBackendError) -> [UInt8] {
        let bytes: [UInt8]
        let outcome: UnixStream.FillOutcome
        do {
            (bytes, outcome) = try receiveExactly(stream, count, timeoutMilliseconds: peer.timeout)
        } catch {
            throw peer.failed(error, channel: "data")
        }
        switch outcome {
        case .complete: return bytes
        case .endOfStream(let n): throw peer.closed(channel: "data", during: "a TPM command, after \(received + n) bytes of its response")
        case .timedOut(let n):
            throw peer.timedOut("a TPM command", hint: "\(received + n) bytes of the response came; swtpm hangs or the command is too slow; restart swtpm and the VM")
        }
    }
}

/// Big-endian integers of the control protocol (and TPM headers).
enum BigEndian {
    static func u16(_ bytes: [UInt8], _ at: Int) -> UInt16 { UInt16(bytes[at]) << 8 | UInt16(bytes[at + 1]) }
    static func u32(_ bytes: [UInt8], _ at: Int) -> UInt32 {
        (0..<4).reduce(0) { $0 << 8 | UInt32(bytes[at + $1]) }
    }
    static func u64(_ bytes: [UInt8], _ at: Int) -> UInt64 {
        (0..<8).reduce(0) { $0 << 8 | UInt64(bytes[at + $1]) }
    }
    static func bytes(_ value: UInt32) -> [UInt8] {
        [UInt8(value >> 24), UInt8((value >> 16) & 0xFF), UInt8((value >> 8) & 0xFF), UInt8(value & 0xFF)]
    }
}

/// `UnixStream.sendAll` of an array.
private func sendAll(_ stream: borrowing UnixStream, _ bytes: [UInt8], passing descriptors: [Int32] = [],
                     timeoutMilliseconds: Int32) throws(SysError) -> Bool {
    try bytes.withUnsafeBytes { raw in
        Result { () throws(SysError) -> Bool in
            try stream.sendAll(raw, passing: descriptors, timeoutMilliseconds: timeoutMilliseconds)
        }
    }.get()
}

/// `UnixStream.receiveExactly` into a new array of `count` bytes (only the first ones are valid
/// when the outcome is not `.complete`).
private func receiveExactly(_ stream: borrowing UnixStream, _ count: Int,
                            timeoutMilliseconds: Int32) throws(SysError) -> ([UInt8], UnixStream.FillOutcome) {
    var bytes = [UInt8](repeating: 0, count: count)
    let outcome = try bytes.withUnsafeMutableBytes { raw in
        Result { () throws(SysError) -> UnixStream.FillOutcome in
            try stream.receiveExactly(into: raw, timeoutMilliseconds: timeoutMilliseconds)
        }
    }.get()
    return (bytes, outcome)
}

/// `UnixStream.receive` of up to `count` bytes, without waiting (the bytes themselves are dropped).
private func receiveNow(_ stream: borrowing UnixStream, upTo count: Int) throws(SysError) -> UnixStream.Received {
    var bytes = [UInt8](repeating: 0, count: count)
    return try bytes.withUnsafeMutableBytes { raw in
        Result { () throws(SysError) -> UnixStream.Received in try stream.receive(into: raw) }
    }.get()
}

private func hex(_ value: UInt32) -> String { String(value, radix: 16) }

/// strerror's text for `code`.
private func reason(_ code: Int32) -> String { String(cString: strerror(code)) }
