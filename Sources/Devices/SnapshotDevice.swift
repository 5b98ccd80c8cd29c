import VMMCore
import WireFormat

/// A device model whose state goes into a snapshot as one versioned section payload.
///
/// The payload is explicit little-endian (`LEWriter`/`LEReader`), field by field; nothing is
/// memcpy'ed from a host structure. Each device documents its layout next to its `State`.
///
/// Versioning: `snapshotVersion` is the layout `saveSnapshot` writes. A restore accepts every version
/// from `oldestSnapshotVersion` up. Layouts only ever grow by appending fields, so a payload from a
/// newer build is read with the fields this build knows and the bytes after them are ignored; a
/// payload of the current version (or an older one) must end exactly after its last field.
///
/// A restore is all-or-nothing: every field is read and validated against the device's
/// configuration before anything changes, and a rejected payload leaves the device as it was.
/// Errors name the field (`"serial.fifo count"`, `"fwcfg.offset"`). After a successful restore the
/// device drives its interrupt line (if it has one) to the level its registers imply, because the
/// interrupt controller's saved state does not remember what level a device holds a line at.
public protocol SnapshotDevice: AnyObject, Sendable {
    /// The prefix of the field names in errors ("serial", "fwcfg", ...).
    static var snapshotName: String { get }
    /// The payload layout `saveSnapshot` writes.
    static var snapshotVersion: UInt16 { get }
    /// The oldest payload layout `restoreSnapshot` still loads.
    static var oldestSnapshotVersion: UInt16 { get }
    /// The device's state as a payload of layout `snapshotVersion`.
    func saveSnapshot() -> [UInt8]
    /// Replaces the device's state with a payload of layout `version` (validated first; on error
    /// nothing changes).
    func restoreSnapshot(_ payload: [UInt8], version: UInt16) throws(LEDecodeError)
}

extension SnapshotDevice {
    /// Runs `body` over the payload under the payload compatibility rule (`VersionedPayload`): it
    /// reads the fields of the layout it is given, validating each.
    static func decodeSnapshot<T>(
        _ payload: [UInt8], version: UInt16,
        _ body: (inout LEReader, UInt16) throws(LEDecodeError) -> T
    ) throws(LEDecodeError) -> T {
        try VersionedPayload.decode(payload, version: version, current: snapshotVersion, oldest: oldestSnapshotVersion,
                                    name: snapshotName, body)
    }

    /// The error for a field holding a value the device cannot have.
    static func invalid(_ field: String, _ reason: String) -> LEDecodeError {
        .invalid(field: "\(snapshotName).\(field)", reason: reason)
    }
}

/// "0x1f".
func hex<T: BinaryInteger>(_ v: T) -> String { "0x" + String(v, radix: 16) }

// MARK: Fuzzing

/// The fuzzing entry point for snapshot restores (`Fuzz/Sources/fuzz-device-state`).
public enum SnapshotFuzz {
    private struct NoLine: InterruptLine { func setLevel(_ high: Bool) {} }
    private struct NoConsole: ConsoleOutput { func write(_ bytes: UnsafeRawBufferPointer) {} }

    /// Every snapshot device, configured as a small machine would configure it (fixed clocks).
    static func devices(memory: GuestMemory) -> [() -> any SnapshotDevice] {
        [
            { Serial16550(output: NoConsole(), irq: NoLine()) },
            { I8042(irq: NoLine()) {} },
            { CMOSClock(now: { 1_700_000_000 }) },
            { ACPIPowerManagement(gpeBlockLength: 4, sci: NoLine(), now: { 5_000_000_000 }, onPowerOff: {}, onReset: {}) },
            {
                let fw = FwCfg(memory: memory)
                fw.addItem(key: 0x0005, data: [2, 0])
                try? fw.addFile("etc/table", data: (0..<300).map { UInt8(truncatingIfNeeded: $0) })
                try? fw.addWritableFile("etc/vmgenid_addr", size: 8) { _, _, _ in }
                try? fw.addWritableFile("etc/vmcoreinfo", size: 16) { _, _, _ in }
                return fw
            },
            { VMGenID(guid: [UInt8](repeating: 0x11, count: 16), memory: memory) {} },
        ]
    }

    /// Byte 0 picks the device (modulo 6), byte 1 the payload version (modulo 4), the rest is the
    /// payload. Checks, by trapping, that a rejected payload leaves the device as it was; that a
    /// loaded one saves to bytes that a fresh device loads and saves identically; and that a
    /// current-version payload that loads saves back to itself (except fw_cfg, whose files may come in
    /// any order). Must never trap otherwise.
    public static func restoreOne(_ data: [UInt8]) {
        guard data.count >= 2, let memory = try? GuestMemory(ranges: [(GuestAddress(0), 1 << 16)]) else { return }
        let makers = devices(memory: memory)
        let make = makers[Int(data[0]) % makers.count]
        let version = UInt16(data[1] % 4)
        let payload = Array(data[2...])
        let device = make()
        let pristine = device.saveSnapshot()
        do {
            try device.restoreSnapshot(payload, version: version)
        } catch {
            precondition(device.saveSnapshot() == pristine, "a rejected payload changed the device (\(error))")
            return
        }
        let saved = device.saveSnapshot()
        let kind = type(of: device)
        if version == kind.snapshotVersion && !(device is FwCfg) {
            precondition(saved == payload, "a current-version payload did not save back to itself")
        }
        let other = make()
        do {
            try other.restoreSnapshot(saved, version: kind.snapshotVersion)
        } catch {
            preconditionFailure("a saved payload does not load: \(error)")
        }
        precondition(other.saveSnapshot() == saved, "save → restore → save changed the bytes")
    }
}
