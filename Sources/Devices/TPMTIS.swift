import ACPI
import DeviceTree
import Synchronization
import VMMCore
import WireFormat

/// What a TPM backend is, as QMP's `query-tpm` reports it (`options.type` and its one path).
public struct TPMBackendInfo: Sendable, Equatable {
    public enum Kind: String, Sendable {
        /// libtpms in this process; `path` is its state file.
        case builtin
        /// An external swtpm (QEMU's "emulator" type); `path` is its control socket.
        case emulator
    }
    public var kind: Kind
    public var path: String
    public init(kind: Kind, path: String) {
        self.kind = kind
        self.path = path
    }
}

/// Where a TPM's commands run: a backend with a thread of its own (libtpms in this process, or
/// an external swtpm). The TIS hands a complete command over on tpmGo and returns to the guest at
/// once; the guest polls STS until the response has come back.
public protocol TPMBackend: AnyObject, Sendable {
    /// What it is, for `query-tpm`.
    var info: TPMBackendInfo { get }
    /// The largest command and response the backend takes, in bytes.
    var bufferSize: Int { get }
    /// Takes `command` (whole: its header's size equals its length, at most `bufferSize` bytes)
    /// for execution on the backend's own thread and returns at once, never waiting for host I/O.
    /// `complete` is called exactly once, from the backend's thread, with the response.
    func submit(_ command: [UInt8], locality: UInt8, complete: @escaping @Sendable ([UInt8]) -> Void)
    /// Asks the command that runs to finish early (best effort; its response still arrives).
    func cancel()
    /// Waits until every submitted command's response has been delivered (`complete` returned);
    /// false after `timeoutMilliseconds`. For a snapshot, with the vCPUs paused.
    func waitUntilIdle(timeoutMilliseconds: Int) -> Bool
    /// The TPM's own state now, for a snapshot (called with the vCPUs paused, after
    /// `waitUntilIdle`, so between commands).
    func exportState() throws(TPMStateError) -> TPMBackendState
    /// Brings the TPM of a restored guest up: continuing from `state` (no TPM2_Startup: the guest
    /// started it long ago), or, for a snapshot without the TPM's state, powered on fresh and
    /// started up. Called once, before the guest runs.
    func resume(from state: TPMBackendState?) throws(TPMStateError)
}

extension TPMBackend {
    public func exportState() throws(TPMStateError) -> TPMBackendState { throw TPMStateError("this TPM backend cannot save its state") }
    public func resume(from state: TPMBackendState?) throws(TPMStateError) {}
}

/// The TPM's own state as its backend serializes it: the permanent state (seeds, NV, persistent objects), the volatile state
/// (sessions, loaded objects, PCRs: what a running TPM holds), and the state TPM2_Shutdown(STATE)
/// saved. Empty means absent.
public struct TPMBackendState: Equatable, Sendable {
    /// Whose bytes these are: libtpms's own (`TPMLIB_GetState`) or swtpm's state blobs, which wrap
    /// libtpms's in a header of swtpm's. A restore needs a backend that reads the same format.
    public enum Format: UInt8, Sendable {
        case libtpms = 1
        case swtpm = 2
        public var backendName: String { self == .libtpms ? "the builtin libtpms" : "swtpm" }
    }
    public var format: Format
    public var permanent: [UInt8]
    public var volatile: [UInt8]
    public var saveState: [UInt8]
    public init(format: Format, permanent: [UInt8], volatile: [UInt8], saveState: [UInt8]) {
        self.format = format
        self.permanent = permanent
        self.volatile = volatile
        self.saveState = saveState
    }
    /// The largest blob a snapshot holds (libtpms's permanent state is well under 1 MiB; swtpm
    /// refuses blobs over 512 KiB).
    public static let maxBlobSize = 4 << 20
}

/// Why the TPM's state could not be saved or brought back: one line.
public struct TPMStateError: Error, CustomStringConvertible, Equatable, Sendable {
    public let message: String
    public init(_ message: String) { self.message = message }
    public var description: String { message }
}

/// A TPM 2.0 behind the TCG PC Client "TIS" FIFO interface: five 4 KiB localities at 0xFED40000,
/// described to the guest by an ACPI `MSFT0101` device and a TPM2 table (start method 6), which is
/// what Linux's built-in tpm_tis binds to. Interrupts are not offered (no IRQ in `_CRS`): Linux
/// polls STS.
///
/// One command/response buffer and one offset serve all localities, since only the active
/// locality can use them. A command is complete when its header's size field (big-endian u32 at
/// byte 2) equals the bytes received; tpmGo then hands it to the backend. A command that overflows
/// the buffer or whose size field lies (under 10, or below what was written) gets a
/// TPM_RC_COMMAND_SIZE response from the TIS itself; a backend response that is malformed or
/// larger than the buffer becomes TPM_RC_FAILURE. Nothing the guest or the backend sends can make
/// the device write outside its buffer or trap.
public final class TPMTIS: Sendable {
    /// The register window's placement (its base comes from the machine's layout).
    public struct Placement: Sendable {
        public var base: UInt64
        public init(base: UInt64) { self.base = base }
    }

    public static let windowSize: UInt64 = 0x5000
    /// The snapshot section of the TIS.
    public static let sectionName = "dev.tpm"
    public static let localities = 5
    /// The TIS buffer is at most this large (QEMU's TPM_TIS_BUFFER_MAX); a backend may want less.
    public static let maxBufferSize = 4096

    // Register offsets inside a locality.
    static let regAccess: UInt64 = 0x000, regIntEnable: UInt64 = 0x008, regIntVector: UInt64 = 0x00C
    static let regIntStatus: UInt64 = 0x010, regIntfCapability: UInt64 = 0x014, regSTS: UInt64 = 0x018
    static let regDataFIFO: UInt64 = 0x024, regInterfaceID: UInt64 = 0x030
    static let regXDataFIFO: ClosedRange<UInt64> = 0x080...0x0BF
    static let regDIDVID: UInt64 = 0xF00, regRID: UInt64 = 0xF04

    // ACCESS bits.
    static let accessEstablishment: UInt32 = 0x01, accessRequestUse: UInt32 = 0x02, accessPendingRequest: UInt32 = 0x04
    static let accessSeize: UInt32 = 0x08, accessBeenSeized: UInt32 = 0x10, accessActiveLocality: UInt32 = 0x20
    static let accessRegValid: UInt32 = 0x80
    // STS bits.
    static let stsResponseRetry: UInt32 = 0x02, stsSelfTestDone: UInt32 = 0x04, stsExpect: UInt32 = 0x08
    static let stsDataAvail: UInt32 = 0x10, stsGo: UInt32 = 0x20, stsCommandReady: UInt32 = 0x40, stsValid: UInt32 = 0x80
    static let stsCommandCancel: UInt32 = 1 << 24, stsFamilyTPM2: UInt32 = 1 << 26
    // INT_ENABLE / INT_STATUS bits.
    static let intDataAvail: UInt32 = 0x01, intStsValid: UInt32 = 0x02, intLocalityChange: UInt32 = 0x04
    static let intCommandReady: UInt32 = 0x80, intGlobalEnable: UInt32 = 1 << 31, intPolarityMask: UInt32 = 0x18
    static let intSupported: UInt32 = 0x87
    /// TIS 1.3 for TPM 2.0, all four interrupt kinds, low level, 64-byte transfers (QEMU's value).
    static let interfaceCapability: UInt32 = 0x3000_0697
    /// FIFO interface, five localities, FIFO capable (QEMU's value for TPM 2.0).
    static let interfaceID: UInt32 = 0x0000_2100
    /// IBM's vendor ID and device 1, revision 1: QEMU's, so guests log what they log under QEMU.
    static let didVid: UInt32 = 0x0001_1014, rid: UInt32 = 0x01

    // TPM 2.0 response codes the TIS answers with itself.
    public static let rcFailure: UInt32 = 0x101
    public static let rcCommandSize: UInt32 = 0x142
    static let ccSelfTest: UInt32 = 0x143

    /// A response of just a header: tag TPM_ST_NO_SESSIONS, size 10, `code`.
    public static func errorResponse(_ code: UInt32) -> [UInt8] {
        [0x80, 0x01, 0, 0, 0, 10] + [24, 16, 8, 0].map { UInt8(truncatingIfNeeded: code >> $0) }
    }

    /// The big-endian size field of a command or response (bytes 2-5), if it has a header.
    public static func sizeField(_ bytes: [UInt8]) -> Int? {
        guard bytes.count >= 6 else { return nil }
        return bytes[2..<6].reduce(0) { $0 << 8 | Int($1) }
    }

    /// The big-endian code field of a command (its command code) or response (its response code,
    /// 0 for success): bytes 6-9, if it has a whole header.
    public static func codeField(_ bytes: [UInt8]) -> UInt32? {
        guard bytes.count >= 10 else { return nil }
        return bytes[6..<10].reduce(0) { $0 << 8 | UInt32($1) }
    }

    /// Where a command is, for the whole interface (one buffer for all localities).
    public enum Phase: UInt8, Sendable, CaseIterable {
        /// No command: commandReady is clear until the guest writes it.
        case idle = 0
        /// commandReady: the buffer waits for a command.
        case ready = 1
        /// Bytes of a command are arriving.
        case reception = 2
        /// The backend runs the command (the command-in-flight state; never in a snapshot).
        case execution = 3
        /// The response is in the buffer, read from `offset`.
        case completion = 4
    }

    /// The interface's state. Snapshot payload, version 1 (little-endian):
    ///
    ///     u8   activeLocality   0-4, or 0xFF for none
    ///     u8   requestUse       bit n: locality n asked for use while another was active
    ///     u8   beenSeized       bit n: locality n lost the interface to a seize
    ///     u8   phase            `Phase`; never 3 (execution): a snapshot waits for the response
    ///     u8   flags            bit 0 Expect, bit 1 the command overflowed the buffer,
    ///                           bit 2 selfTestDone, bit 3 the command is aborted (during execution)
    ///     u32  bufferSize       the interface's buffer size when saved
    ///     u32 ×5 intEnable      per locality
    ///     u32 ×5 intStatus      per locality
    ///     u32  offset           read offset into the response (completion)
    ///     u32 + bytes buffer    the command received so far, or the response (≤ bufferSize)
    ///
    /// Version 2 appends the TPM's own state (`TPMBackendState`), each blob as u32 length + bytes
    /// (at most 4 MiB), after a u8 that is 1 when they follow and 0 when the snapshot has none:
    ///
    ///     u8   hasBackendState
    ///     u8   format (1 libtpms, 2 swtpm), then u32 + bytes permanent, u32 + bytes volatile,
    ///          u32 + bytes saveState                                           (when 1)
    public struct State: Equatable, Sendable {
        public static let version = 2
        public static let noLocality: UInt8 = 0xFF
        public var activeLocality: UInt8 = noLocality
        public var requestUse: UInt8 = 0
        public var beenSeized: UInt8 = 0
        public var phase: Phase = .idle
        public var expect = false
        public var overflowed = false
        public var selfTestDone = false
        /// During execution: the guest aborted the command (commandReady or a locality change);
        /// its response is dropped on arrival.
        public var aborted = false
        public var bufferSize: UInt32
        public var intEnable = [UInt32](repeating: TPMTIS.intPolarityLowLevel, count: TPMTIS.localities)
        public var intStatus = [UInt32](repeating: 0, count: TPMTIS.localities)
        public var offset: UInt32 = 0
        public var buffer: [UInt8] = []
        /// The TPM's own state (snapshot version 2): set by the machine just before a snapshot is
        /// written, and what a restore brings back; nil otherwise.
        public var backendState: TPMBackendState?
        /// Counts commands handed to the backend, so that a response of an aborted command that
        /// arrives late is recognized (not saved: a snapshot holds no command in flight).
        var commandSerial: UInt64 = 0

        public init(bufferSize: UInt32) { self.bufferSize = bufferSize }

        public static func == (a: State, b: State) -> Bool {
            a.activeLocality == b.activeLocality && a.requestUse == b.requestUse && a.beenSeized == b.beenSeized
                && a.phase == b.phase && a.expect == b.expect && a.overflowed == b.overflowed
                && a.selfTestDone == b.selfTestDone && a.aborted == b.aborted && a.bufferSize == b.bufferSize
                && a.intEnable == b.intEnable && a.intStatus == b.intStatus && a.offset == b.offset && a.buffer == b.buffer
                && a.backendState == b.backendState
        }
    }

    static let intPolarityLowLevel: UInt32 = 0x08

    private let state: Mutex<State>
    private let backend: any TPMBackend
    public let placement: Placement
    /// min(backend buffer size, 4096).
    public let bufferSize: Int

    public init(backend: any TPMBackend, placement: Placement) {
        self.backend = backend
        self.placement = placement
        bufferSize = max(10, min(backend.bufferSize, Self.maxBufferSize))
        state = Mutex(State(bufferSize: UInt32(bufferSize)))
    }

    /// Whether a command runs in the backend now (the guest wrote tpmGo and its response has not
    /// been delivered to the registers yet).
    public var commandInFlight: Bool { state.withLock { $0.phase == .execution } }

    // MARK: Registers

    public func read(offset: UInt64, data: UnsafeMutableRawBufferPointer) {
        guard data.count <= 4 else {
            // An 8-byte access reads as two 4-byte ones.
            for half in [0, 4] { read(offset: offset + UInt64(half), data: UnsafeMutableRawBufferPointer(rebasing: data[half..<min(half + 4, data.count)])) }
            return
        }
        let locality = Int((offset >> 12) & 7)
        let reg = offset & 0xFFC
        let shift = (offset & 3) * 8
        let size = data.count
        var value: UInt32 = 0xFFFF_FFFF
        state.withLock { s in
            let active = Int(s.activeLocality) == locality
            switch reg {
            case Self.regAccess:
                value = Self.accessRegValid | Self.accessEstablishment
                if active { value |= Self.accessActiveLocality }
                if s.requestUse & (1 << locality) != 0 { value |= Self.accessRequestUse }
                if s.requestUse & ~(1 << locality) & 0x1F != 0 { value |= Self.accessPendingRequest }
                if s.beenSeized & (1 << locality) != 0 { value |= Self.accessBeenSeized }
            case Self.regIntEnable: value = s.intEnable[locality]
            case Self.regIntVector: value = 0
            case Self.regIntStatus: value = s.intStatus[locality]
            case Self.regIntfCapability: value = Self.interfaceCapability
            case Self.regSTS:
                guard active else { break }
                var burst: Int
                if s.phase == .completion {
                    burst = max(0, s.buffer.count - Int(s.offset))
                } else {
                    burst = max(0, Int(s.bufferSize) - (s.phase == .reception ? s.buffer.count : 0))
                    if size == 1 { burst = min(burst, 0xFF) }
                }
                value = status(s) | UInt32(min(burst, 0xFFFF)) << 8
            case Self.regDataFIFO, Self.regXDataFIFO:
                guard active else { break }
                // Each byte of the access is one FIFO byte.
                value = 0
                for i in 0..<min(size, 4 - Int(offset & 3)) {
                    value |= UInt32(readFIFOByte(&s)) << (8 * UInt32(i))
                }
                for i in min(size, 4 - Int(offset & 3))..<size { value |= 0xFF << (8 * UInt32(i)) }
                return
            case Self.regInterfaceID: value = Self.interfaceID
            case Self.regDIDVID: value = Self.didVid
            case Self.regRID: value = Self.rid
            default: break
            }
            value >>= UInt32(shift)
        }
        for i in 0..<size { data[i] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(i))) }
    }

    public func write(offset: UInt64, data: UnsafeRawBufferPointer) {
        guard data.count <= 4 else {
            for half in [0, 4] { write(offset: offset + UInt64(half), data: UnsafeRawBufferPointer(rebasing: data[half..<min(half + 4, data.count)])) }
            return
        }
        let locality = Int((offset >> 12) & 7)
        // Locality 4 belongs to the platform's trusted hardware; the guest's writes there do nothing.
        guard locality < 4 else { return }
        let reg = offset & 0xFFC
        let shift = UInt32((offset & 3) * 8)
        var raw: UInt32 = 0
        for (i, b) in data.enumerated() { raw |= UInt32(b) << (8 * UInt32(i)) }
        let value = raw << shift
        let mask = (data.count == 4 ? UInt32.max : (UInt32(1) << (8 * UInt32(data.count))) - 1) << shift
        var send: (command: [UInt8], locality: UInt8, serial: UInt64)?
        var immediate: (response: [UInt8], serial: UInt64)?
        var cancel = false
        state.withLock { s in
            let active = Int(s.activeLocality) == locality
            switch reg {
            case Self.regAccess:
                guard shift == 0 else { break }
                writeAccess(&s, locality: locality, value: value)
            case Self.regIntEnable:
                guard active else { break }
                let writable = Self.intGlobalEnable | Self.intPolarityMask | Self.intSupported
                s.intEnable[locality] = (s.intEnable[locality] & ~mask) | (value & mask & writable)
            case Self.regIntStatus:
                guard active else { break }
                s.intStatus[locality] &= ~(value & mask & Self.intSupported)
            case Self.regSTS:
                guard active else { break }
                if value & Self.stsCommandCancel != 0, s.phase == .execution { cancel = true }
                switch value & (Self.stsCommandReady | Self.stsGo | Self.stsResponseRetry) {
                case Self.stsCommandReady: commandReady(&s, locality: locality)
                case Self.stsGo:
                    guard s.phase == .reception, !s.expect else { break }
                    s.phase = .execution
                    s.commandSerial &+= 1
                    if s.overflowed || Self.sizeField(s.buffer) != s.buffer.count || s.buffer.count < 10 {
                        // Answered here: nothing the backend could run.
                        immediate = (Self.errorResponse(Self.rcCommandSize), s.commandSerial)
                    } else {
                        send = (s.buffer, UInt8(locality), s.commandSerial)
                    }
                case Self.stsResponseRetry:
                    if s.phase == .completion { s.offset = 0 }
                default: break
                }
            case Self.regDataFIFO, Self.regXDataFIFO:
                guard active, s.phase == .ready || s.phase == .reception else { break }
                for i in 0..<min(data.count, 4 - Int(offset & 3)) { writeFIFOByte(&s, data[i]) }
            default: break
            }
        }
        if cancel { backend.cancel() }
        if let immediate { deliver(immediate.response, serial: immediate.serial) }
        if let send {
            backend.submit(send.command, locality: send.locality) { [weak self] response in
                self?.deliver(response, serial: send.serial)
            }
        }
    }

    private func status(_ s: State) -> UInt32 {
        var v = Self.stsFamilyTPM2
        if s.selfTestDone { v |= Self.stsSelfTestDone }
        switch s.phase {
        case .idle: break
        case .ready: v |= Self.stsCommandReady
        case .reception: v |= Self.stsValid | (s.expect ? Self.stsExpect : 0)
        case .execution: v |= Self.stsValid
        case .completion: v |= Self.stsValid | (Int(s.offset) < s.buffer.count ? Self.stsDataAvail : 0)
        }
        return v
    }

    private func writeAccess(_ s: inout State, locality: Int, value: UInt32) {
        let bit = UInt8(1 << locality)
        if value & Self.accessActiveLocality != 0 {
            if Int(s.activeLocality) == locality {
                // Relinquish: the highest locality waiting gets the interface.
                let next = (0..<Self.localities).reversed().first { s.requestUse & (1 << $0) != 0 }
                changeLocality(&s, to: next)
            } else {
                s.requestUse &= ~bit
            }
        }
        if value & Self.accessBeenSeized != 0 { s.beenSeized &= ~bit }
        if value & Self.accessSeize != 0 {
            // A higher locality may take the interface from a lower one (or a free one).
            if s.activeLocality == State.noLocality || locality > Int(s.activeLocality) {
                if s.activeLocality != State.noLocality { s.beenSeized |= UInt8(1 << Int(s.activeLocality)) }
                changeLocality(&s, to: locality)
            }
        } else if value & Self.accessRequestUse != 0, Int(s.activeLocality) != locality {
            if s.activeLocality == State.noLocality {
                changeLocality(&s, to: locality)
            } else {
                s.requestUse |= bit
            }
        }
    }

    /// Makes `locality` (or none) the active one. A command of the previous locality is dropped:
    /// one that runs has its response discarded when it arrives.
    private func changeLocality(_ s: inout State, to locality: Int?) {
        let new = locality.map(UInt8.init) ?? State.noLocality
        guard new != s.activeLocality else { return }
        if s.activeLocality != State.noLocality { raise(&s, locality: Int(s.activeLocality), Self.intLocalityChange) }
        s.activeLocality = new
        if let locality {
            s.requestUse &= ~UInt8(1 << locality)
            raise(&s, locality: locality, Self.intLocalityChange)
        }
        if s.phase == .execution {
            s.aborted = true
        } else {
            resetBuffer(&s, to: .idle)
        }
    }

    private func commandReady(_ s: inout State, locality: Int) {
        switch s.phase {
        case .idle, .completion, .reception:
            resetBuffer(&s, to: .ready)
            raise(&s, locality: locality, Self.intCommandReady)
        case .ready: resetBuffer(&s, to: .ready)
        case .execution:
            // The backend is asked to stop; its response is dropped, then the interface is ready.
            s.aborted = true
        }
    }

    private func resetBuffer(_ s: inout State, to phase: Phase) {
        s.phase = phase
        s.buffer = []
        s.offset = 0
        s.expect = false
        s.overflowed = false
        s.aborted = false
    }

    private func writeFIFOByte(_ s: inout State, _ byte: UInt8) {
        if s.phase == .ready {
            s.phase = .reception
            s.expect = true
        }
        guard s.buffer.count < Int(s.bufferSize) else {
            // Past the buffer: the byte is dropped, and the command will be refused on tpmGo.
            s.overflowed = true
            s.expect = false
            return
        }
        s.buffer.append(byte)
        if let size = Self.sizeField(s.buffer) {
            s.expect = size > s.buffer.count
        }
    }

    private func readFIFOByte(_ s: inout State) -> UInt8 {
        guard s.phase == .completion, Int(s.offset) < s.buffer.count else { return 0xFF }
        let b = s.buffer[Int(s.offset)]
        s.offset += 1
        if Int(s.offset) == s.buffer.count { raise(&s, locality: Int(s.activeLocality), Self.intStsValid) }
        return b
    }

    /// Records an interrupt condition in INT_STATUS when the guest enabled it. No line is raised:
    /// the ACPI description offers none, so the guest polls.
    private func raise(_ s: inout State, locality: Int, _ bits: UInt32) {
        guard (0..<Self.localities).contains(locality) else { return }
        let enable = s.intEnable[locality]
        guard enable & Self.intGlobalEnable != 0 else { return }
        s.intStatus[locality] |= enable & bits
    }

    /// The backend's response to command number `serial` (on the backend's thread). A response of
    /// an aborted or superseded command is dropped; a malformed or oversized one becomes
    /// TPM_RC_FAILURE.
    func deliver(_ response: [UInt8], serial: UInt64) {
        state.withLock { s in
            guard s.phase == .execution, serial == s.commandSerial else { return }
            if s.aborted {
                resetBuffer(&s, to: s.activeLocality == State.noLocality ? .idle : .ready)
                if s.activeLocality != State.noLocality { raise(&s, locality: Int(s.activeLocality), Self.intCommandReady) }
                return
            }
            let command = s.buffer
            let valid = response.count >= 10 && response.count <= Int(s.bufferSize) && Self.sizeField(response) == response.count
            s.buffer = valid ? response : Self.errorResponse(Self.rcFailure)
            if Self.codeField(command) == Self.ccSelfTest, Self.codeField(s.buffer) == 0 {
                s.selfTestDone = true
            }
            s.phase = .completion
            s.offset = 0
            if s.activeLocality != State.noLocality {
                raise(&s, locality: Int(s.activeLocality), Self.intDataAvail | Self.intStsValid)
            }
        }
    }

    // MARK: State

    public func saveState() -> State { state.withLock { $0 } }

    /// Puts the TPM's own state into the next snapshot (nil: none).
    public func attachBackendState(_ backendState: TPMBackendState?) { state.withLock { $0.backendState = backendState } }

    /// The TPM's own state a restore brought back (once; nil when the snapshot had none).
    public func takeRestoredBackendState() -> TPMBackendState? {
        state.withLock { s in
            defer { s.backendState = nil }
            return s.backendState
        }
    }

    /// Replaces the state after checking it against this interface (nothing changes on error).
    public func restoreState(_ new: State) throws(LEDecodeError) {
        guard new.activeLocality == State.noLocality || Int(new.activeLocality) < Self.localities else {
            throw Self.invalid("activeLocality", "\(new.activeLocality) is not 0-4 nor 0xFF (none)")
        }
        guard new.requestUse & ~0x1F == 0 else { throw Self.invalid("requestUse", "\(hex(new.requestUse)) names a locality above 4") }
        guard new.beenSeized & ~0x1F == 0 else { throw Self.invalid("beenSeized", "\(hex(new.beenSeized)) names a locality above 4") }
        guard new.phase != .execution else {
            throw Self.invalid("phase", "a command was in flight: a snapshot holds the TPM only between commands")
        }
        guard !new.aborted else { throw Self.invalid("flags", "an aborted command outside execution") }
        guard new.intEnable.count == Self.localities, new.intStatus.count == Self.localities else {
            throw Self.invalid("intEnable", "\(new.intEnable.count) and \(new.intStatus.count) localities, not 5")
        }
        guard new.buffer.count <= bufferSize else {
            throw Self.invalid("buffer", "\(new.buffer.count) bytes, more than this TPM's buffer of \(bufferSize)")
        }
        switch new.phase {
        case .completion:
            guard new.buffer.count >= 10, Self.sizeField(new.buffer) == new.buffer.count, Int(new.offset) <= new.buffer.count else {
                throw Self.invalid("buffer", "a response of \(new.buffer.count) bytes that its header or offset \(new.offset) contradicts")
            }
        case .reception:
            guard new.offset == 0 else { throw Self.invalid("offset", "\(new.offset) while a command is received") }
        case .idle, .ready:
            guard new.buffer.isEmpty, new.offset == 0, !new.expect, !new.overflowed else {
                throw Self.invalid("buffer", "\(new.buffer.count) bytes at offset \(new.offset) without a command")
            }
        case .execution: break
        }
        var restored = new
        restored.bufferSize = UInt32(bufferSize)
        state.withLock { s in
            restored.commandSerial = s.commandSerial &+ 1
            s = restored
        }
    }

    // MARK: ACPI

    /// The TPM2 table (revision 4, 76 bytes, as QEMU builds it): client platform, no control area,
    /// start method 6 (TIS over MMIO), no event log (its length and address are 0, so the guest
    /// reads none).
    public static func tpm2Table() -> SDT {
        var body = [UInt8](repeating: 0, count: 76 - SDT.headerSize)
        body[48 - SDT.headerSize] = 6 // start method: "TIS 1.2 / FIFO over MMIO"
        return SDT(signature: "TPM2", revision: 4, oemTableID: "SWVMTPM2", body: body)
    }
}

extension TPMTIS: BusDevice {}

extension TPMTIS: StateSnapshotDevice {
    public static let snapshotName = "tpm"
    public static let snapshotVersion = UInt16(State.version)
    public static let oldestSnapshotVersion: UInt16 = 1
}

extension TPMTIS {
    /// The format of the TPM state a `dev.tpm` payload holds (nil: none), read before the machine
    /// is built, so that a restore knows which TPM it needs.
    public static func savedBackendStateFormat(_ payload: [UInt8], version: UInt16) throws(LEDecodeError) -> TPMBackendState.Format? {
        let s = try decodeSnapshot(payload, version: version) { r, v throws(LEDecodeError) in
            var s = State(bufferSize: 0)
            try r.decode { c throws(LEDecodeError) in try s.code(&c, version: v) }
            return s
        }
        return s.backendState?.format
    }
}

extension TPMTIS.State: CodedDeviceState {
    public static var blank: Self { Self(bufferSize: 0) }

    /// The payload layout (see `State`), for both directions.
    public mutating func code<C: LECoder>(_ c: inout C, version: UInt16) throws(LEDecodeError) {
        try c.u8(&activeLocality, "tpm.activeLocality")
        try c.u8(&requestUse, "tpm.requestUse")
        try c.u8(&beenSeized, "tpm.beenSeized")
        var rawPhase = phase.rawValue
        try c.u8(&rawPhase, "tpm.phase")
        guard let p = TPMTIS.Phase(rawValue: rawPhase) else { throw .invalid(field: "tpm.phase", reason: "\(rawPhase) is not 0-4") }
        phase = p
        var flags: UInt8 = (expect ? 1 : 0) | (overflowed ? 2 : 0) | (selfTestDone ? 4 : 0) | (aborted ? 8 : 0)
        try c.u8(&flags, "tpm.flags")
        try c.require(flags & ~0x0F == 0, "tpm.flags", "unknown bits in \(flags)")
        expect = flags & 1 != 0
        overflowed = flags & 2 != 0
        selfTestDone = flags & 4 != 0
        aborted = flags & 8 != 0
        try c.u32(&bufferSize, "tpm.bufferSize")
        if intEnable.count != TPMTIS.localities { intEnable = [UInt32](repeating: 0, count: TPMTIS.localities) }
        if intStatus.count != TPMTIS.localities { intStatus = [UInt32](repeating: 0, count: TPMTIS.localities) }
        for i in 0..<TPMTIS.localities { try c.u32(&intEnable[i], "tpm.intEnable[\(i)]") }
        for i in 0..<TPMTIS.localities { try c.u32(&intStatus[i], "tpm.intStatus[\(i)]") }
        try c.u32(&offset, "tpm.offset")
        try c.blob(&buffer, limit: TPMTIS.maxBufferSize, "tpm.buffer")
        guard version >= 2 else { return }
        var has: UInt8 = backendState == nil ? 0 : 1
        try c.u8(&has, "tpm.hasBackendState")
        try c.require(has <= 1, "tpm.hasBackendState", "\(has) is not 0 or 1")
        guard has == 1 else {
            backendState = nil
            return
        }
        var state = backendState ?? TPMBackendState(format: .libtpms, permanent: [], volatile: [], saveState: [])
        var format = state.format.rawValue
        try c.u8(&format, "tpm.format")
        guard let f = TPMBackendState.Format(rawValue: format) else { throw .invalid(field: "tpm.format", reason: "\(format) is not 1 (libtpms) or 2 (swtpm)") }
        state.format = f
        try c.blob(&state.permanent, limit: TPMBackendState.maxBlobSize, "tpm.permanent")
        try c.blob(&state.volatile, limit: TPMBackendState.maxBlobSize, "tpm.volatile")
        try c.blob(&state.saveState, limit: TPMBackendState.maxBlobSize, "tpm.saveState")
        try c.require(!state.permanent.isEmpty, "tpm.permanent", "empty: a TPM's state always has its permanent part")
        backendState = state
    }
}

extension TPMTIS: PlatformDevice {
    public var busRegions: [BusRegion] { [.mmio("tpm-tis", placement.base, Self.windowSize, self)] }

    public var snapshotSection: (name: String, device: any SnapshotDevice)? { (Self.sectionName, self) }

    /// The TPM as Linux's tpm_tis finds it (`MSFT0101` with the TPM2 table's start method 6); no
    /// interrupt in `_CRS`, so the guest polls.
    public var dsdtAML: [AML] {
        [.device("TPM", [
            .name("_HID", .string("MSFT0101")),
            .name("_UID", .integer(1)),
            .name("_STA", .integer(0x0F)),
            .name("_CRS", .resourceTemplate([
                AML.Resource.memory32Fixed(writable: true, base: UInt32(placement.base), length: UInt32(Self.windowSize)),
            ])),
        ])]
    }

    public var acpiTables: [SDT] { [Self.tpm2Table()] }

    /// `tcg,tpm-tis-mmio` (Linux's tpm_tis OF binding) with the five localities; no interrupt, as in
    /// the DSDT.
    public var deviceTreeNodes: [DeviceTreeNode] {
        [DeviceTreeNode("tpm", properties: [.compatible("tcg,tpm-tis-mmio"), .reg(.memory(placement.base, Self.windowSize))])]
    }
}
