/// The compatibility rule of every versioned snapshot payload (docs/snapshot-format.md, "Versions
/// and compatibility"), in the one place that applies it: vCPU and VM state, every device, every
/// configuration section.
///
/// Layouts only grow by appending fields. A reader that writes layout `current` and still
/// understands layouts back to `oldest`:
/// - refuses a payload older than `oldest`;
/// - decodes any other as layout `min(version, current)`: a payload from a newer writer is read
///   with the fields this reader knows, and its trailing bytes (the newer fields) are ignored;
/// - refuses trailing bytes after a payload of a layout it knows completely (`version <= current`):
///   they are not part of any field.
///
/// (`minimum version > current`, a payload that needs a newer reader, is the container's check:
/// `SnapshotSection.loadDecision`.)
public enum VersionedPayload {
    /// Runs `body` over `payload` as layout `min(version, current)` under the rule above. `name`
    /// prefixes the errors ("vcpu", "serial", "config.fwcfg").
    public static func decode<T>(
        _ payload: [UInt8], version: UInt16, current: UInt16, oldest: UInt16, name: String,
        _ body: (inout LEReader, UInt16) throws(LEDecodeError) -> T
    ) throws(LEDecodeError) -> T {
        guard version >= oldest else {
            throw .invalid(field: "\(name).version",
                           reason: "payload version \(version) is older than the oldest this build loads (\(oldest))")
        }
        var reader = LEReader(payload)
        let value = try body(&reader, min(version, current))
        if version <= current && reader.remaining != 0 {
            throw .invalid(field: name, reason: "\(reader.remaining) unexpected bytes after the last field of a version-\(version) payload")
        }
        return value
    }
}
