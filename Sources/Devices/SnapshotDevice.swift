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
    public static func decodeSnapshot<T>(
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

/// A device state with one layout function for both directions (`code`, as `LECoder` describes),
/// and a blank value that the reader fills in.
public protocol CodedDeviceState: Sendable {
    /// What a restore decodes into: every field the layout has is overwritten.
    static var blank: Self { get }
    mutating func code<C: LECoder>(_ c: inout C, version: UInt16) throws(LEDecodeError)
}

/// A snapshot device whose payload is its `State`, coded by the state's `code` and nothing else:
/// `saveSnapshot` encodes `saveState()`, `restoreSnapshot` decodes a payload under the compatibility
/// rule (`decodeSnapshot`) and hands it to `restoreState`, which validates it against the device
/// and applies it or changes nothing.
public protocol StateSnapshotDevice: SnapshotDevice {
    associatedtype State: CodedDeviceState
    func saveState() -> State
    func restoreState(_ s: State) throws(LEDecodeError)
}

extension StateSnapshotDevice {
    public func saveSnapshot() -> [UInt8] {
        var s = saveState()
        var w = LEWriter(capacity: 64)
        w.encode { c throws(LEDecodeError) in try s.code(&c, version: Self.snapshotVersion) }
        return w.bytes
    }

    public func restoreSnapshot(_ payload: [UInt8], version: UInt16) throws(LEDecodeError) {
        let s = try Self.decodeSnapshot(payload, version: version) { r, v throws(LEDecodeError) in
            var s = State.blank
            try r.decode { c throws(LEDecodeError) in try s.code(&c, version: v) }
            return s
        }
        try restoreState(s)
    }
}
