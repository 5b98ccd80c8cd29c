import ACPI
import Synchronization
import VMMCore
import WireFormat

/// The VM generation ID (Microsoft's "Virtual Machine Generation ID", QEMU's vmgenid): a 16-byte GUID
/// in guest memory that changes whenever the VM may have been duplicated (a snapshot restore), with
/// an ACPI notification (GPE 5 → `\_GPE._E05` → `Notify(\_SB.VGEN, 0x80)`) so that the guest reseeds
/// its random number generator.
///
/// The guest page is the fw_cfg blob `etc/vmgenid_guid`; firmware (or the host-side loader on a direct
/// boot) places it and reports the GUID's address through the writable file `etc/vmgenid_addr`
/// (`addressWritten`). A change before that address is known is kept and written when it arrives;
/// the notification is raised only once the GUID is in guest memory.
public final class VMGenID: Sendable {
    /// Snapshot payload, version 1 (little-endian):
    ///
    ///     16 bytes GUID, guest byte order
    ///     u64      guest-physical address of the GUID, 0 while the guest has not reported it;
    ///              otherwise a usable address (see `isUsableAddress`)
    ///
    /// A restore does not touch guest memory (it comes back with the rest of RAM) and does not
    /// notify: the machine then sets a new GUID with `setGUID`, which writes it and notifies once.
    public struct State: Codable, Equatable, Sendable {
        public static let version = 1
        /// The GUID in guest byte order (little-endian fields, as QEMU writes it).
        public var guid: [UInt8]
        /// Guest-physical address of the GUID; 0 until the guest's loader reported it.
        public var address: UInt64
        public init(guid: [UInt8], address: UInt64) {
            self.guid = guid
            self.address = address
        }
    }

    private let state: Mutex<State>
    private let memory: GuestMemory
    private let notify: @Sendable () -> Void

    /// `notify` raises the ACPI event (the machine sets GPE 5 and the SCI).
    public init(guid: [UInt8], memory: GuestMemory, notify: @escaping @Sendable () -> Void) {
        precondition(guid.count == 16, "a GUID has 16 bytes")
        state = Mutex(State(guid: guid, address: 0))
        self.memory = memory
        self.notify = notify
    }

    public var guid: [UInt8] { state.withLock { $0.guid } }
    /// Where the guest has the GUID, once its loader reported it.
    public var address: UInt64? { state.withLock { $0.address == 0 ? nil : $0.address } }

    /// Whether the GUID can live at `address`: not 0, 8-byte aligned (Microsoft's requirement R1a),
    /// inside one 4 KiB page (it is in the page-sized blob `etc/vmgenid_guid`) and in guest RAM.
    public func isUsableAddress(_ address: UInt64) -> Bool {
        address != 0 && address % 8 == 0 && address & 0xFFF <= 0x1000 - 16
            && memory.isRAM(GuestAddress(address), length: 16)
    }

    /// The guest wrote `etc/vmgenid_addr` (8 bytes, little-endian): write the current GUID there.
    /// Unusable addresses (`isUsableAddress`) are ignored (returns false).
    @discardableResult
    public func addressWritten(_ bytes: [UInt8]) -> Bool {
        guard bytes.count == 8 else { return false }
        let address = bytes.enumerated().reduce(UInt64(0)) { $0 | UInt64($1.element) << (8 * UInt64($1.offset)) }
        guard isUsableAddress(address) else { return false }
        return state.withLock { s in
            guard (try? memory.write(s.guid, at: GuestAddress(address))) != nil else { return false }
            s.address = address
            return true
        }
    }

    /// Sets a new GUID: guest memory first, then the notification. Returns true if the guest was
    /// notified now, false if the GUID waits for the guest to report its address.
    @discardableResult
    public func setGUID(_ guid: [UInt8]) -> Bool {
        precondition(guid.count == 16, "a GUID has 16 bytes")
        let written = state.withLock { s -> Bool in
            s.guid = guid
            guard s.address != 0 else { return false }
            return (try? memory.write(guid, at: GuestAddress(s.address))) != nil
        }
        if written { notify() }
        return written
    }

    public func saveState() -> State { state.withLock { $0 } }

    /// Restores GUID and address after checking them (nothing changes on error). Neither guest
    /// memory nor the guest is touched: the machine sets a new GUID afterwards with `setGUID`.
    public func restoreState(_ s: State) throws(LEDecodeError) {
        guard s.guid.count == 16 else { throw Self.invalid("guid", "\(s.guid.count) bytes, a GUID has 16") }
        guard s.address == 0 || isUsableAddress(s.address) else {
            throw Self.invalid("address", "\(hex(s.address)) is not 0 (not yet reported) nor an 8-byte aligned address "
                                   + "of 16 bytes inside one page of guest RAM")
        }
        state.withLock { $0 = s }
    }

    // MARK: GUID text form

    /// Parses "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" into guest byte order: the first three fields
    /// little-endian (QEMU's `qemu_uuid_bswap`), the last two as written.
    public static func parseGUID(_ text: String) -> [UInt8]? {
        let groups = text.split(separator: "-", omittingEmptySubsequences: false)
        guard groups.map(\.count) == [8, 4, 4, 4, 12] else { return nil }
        var bytes: [UInt8] = []
        for g in groups {
            let chars = Array(g)
            for i in stride(from: 0, to: chars.count, by: 2) {
                guard let b = UInt8(String(chars[i...i + 1]), radix: 16) else { return nil }
                bytes.append(b)
            }
        }
        return swapFields(bytes)
    }

    /// The text form of a GUID in guest byte order (lower case, as QEMU's query-vm-generation-id).
    public static func guidString(_ guest: [UInt8]) -> String {
        precondition(guest.count == 16, "a GUID has 16 bytes")
        let b = swapFields(guest)
        func hex(_ r: Range<Int>) -> String {
            b[r].map { ($0 < 16 ? "0" : "") + String($0, radix: 16) }.joined()
        }
        return [hex(0..<4), hex(4..<6), hex(6..<8), hex(8..<10), hex(10..<16)].joined(separator: "-")
    }

    /// A random version-4 GUID, in guest byte order.
    public static func randomGUID() -> [UInt8] {
        var rng = SystemRandomNumberGenerator()
        var b = (0..<16).map { _ in UInt8.random(in: 0...255, using: &rng) }
        b[6] = (b[6] & 0x0F) | 0x40 // version 4 (big-endian text order)
        b[8] = (b[8] & 0x3F) | 0x80 // RFC 4122 variant
        return swapFields(b)
    }

    private static func swapFields(_ b: [UInt8]) -> [UInt8] {
        Array(b[0..<4].reversed()) + Array(b[4..<6].reversed()) + Array(b[6..<8].reversed()) + Array(b[8..<16])
    }
}

extension VMGenID: SnapshotDevice {
    public static let snapshotName = "vmgenid"
    public static let snapshotVersion = UInt16(State.version)
    public static let oldestSnapshotVersion: UInt16 = 1

    public func saveSnapshot() -> [UInt8] {
        var s = saveState()
        var w = LEWriter(capacity: 24)
        w.encode { c throws(LEDecodeError) in try s.code(&c, version: Self.snapshotVersion) }
        return w.bytes
    }

    public func restoreSnapshot(_ payload: [UInt8], version: UInt16) throws(LEDecodeError) {
        let s = try Self.decodeSnapshot(payload, version: version) { r, v throws(LEDecodeError) in
            var s = State(guid: [], address: 0)
            try r.decode { c throws(LEDecodeError) in try s.code(&c, version: v) }
            return s
        }
        try restoreState(s)
    }
}

extension VMGenID.State {
    /// The payload layout (see `State`), for both directions: `saveSnapshot` and `restoreSnapshot`
    /// run it.
    public mutating func code<C: LECoder>(_ c: inout C, version: UInt16) throws(LEDecodeError) {
        try c.raw(&guid, count: 16, "vmgenid.guid")
        try c.u64(&address, "vmgenid.address")
    }
}

extension VMGenID: PlatformDevice {
    public var snapshotSection: (name: String, device: any SnapshotDevice)? { ("dev.vmgenid", self) }

    /// Publishes the GUID's page and the writable address file in fw_cfg, where the ACPI loader
    /// script (`VMGenIDTable`) finds them; `onUnusableAddress` hears of an address the guest's loader
    /// reported that cannot hold the GUID.
    public func publish(to fwCfg: FwCfg, onUnusableAddress: @escaping @Sendable () -> Void) throws(FwCfgError) {
        try fwCfg.addFile(VMGenIDTable.guidFile, data: VMGenIDTable.blob(guid))
        try fwCfg.addWritableFile(VMGenIDTable.addressFile, size: 8) { [self] _, _, whole in
            if !addressWritten(whole) { onUnusableAddress() }
        }
    }
}

/// The VM generation ID device's SSDT (OEM table ID "VMGENID"), as QEMU describes it
/// (docs/specs/vmgenid.txt): `VGIA` holds the guest address of the `etc/vmgenid_guid` page, patched
/// by the loader's ADD_POINTER; the GUID sits at `VGIA + 0x28`.
///
///     DefinitionBlock ("", "SSDT", 1, "SWVMM ", "VMGENID", 1) {
///         Name (VGIA, 0x00000000)
///         Scope (\_SB) {
///             Device (VGEN) {
///                 Name (_HID, "QEMUVGID")
///                 Name (_CID, "VM_Gen_Counter")
///                 Name (_DDN, "VM_Gen_Counter")
///                 Method (_STA, 0) { If (LEqual (VGIA, Zero)) { Return (Zero) } Return (0x0F) }
///                 Method (ADDR, 0) {
///                     Store (Package (2) { Zero, Zero }, Local0)
///                     Store (Add (VGIA, 0x28), Index (Local0, Zero))
///                     Store (Zero, Index (Local0, One))
///                     Return (Local0)
///                 }
///             }
///         }
///         Method (\_GPE._E05) { Notify (\_SB.VGEN, 0x80) }
///     }
public enum VMGenIDTable {
    /// The fw_cfg file of the GUID's page (the loader allocates it and points VGIA at it).
    public static let guidFile = "etc/vmgenid_guid"
    /// The writable fw_cfg file the loader writes the GUID's guest address into (WRITE_POINTER).
    public static let addressFile = "etc/vmgenid_addr"

    /// The `etc/vmgenid_guid` blob with `guid` at `guidOffset`.
    public static func blob(_ guid: [UInt8]) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: blobSize)
        b.replaceSubrange(guidOffset..<(guidOffset + 16), with: guid)
        return b
    }

    /// Offset of the GUID inside `etc/vmgenid_guid` (bytes 0-35 stay clear for OVMF's probe).
    public static let guidOffset = 40
    public static let blobSize = 4096
    /// GPE 5 carries the change notification (`\_GPE._E05`).
    public static let gpe = 5
    /// Offset of VGIA's 4-byte value inside the SSDT: header, NameOp, "VGIA", DWordPrefix.
    public static let vgiaOffset = SDT.headerSize + 1 + 4 + 1

    public static func ssdt() -> SDT {
        let body: [AML] = [
            .name("VGIA", .dword(0)),
            .scope("\\_SB", [
                .device("VGEN", [
                    .name("_HID", .string("QEMUVGID")),
                    .name("_CID", .string("VM_Gen_Counter")),
                    .name("_DDN", .string("VM_Gen_Counter")),
                    .method("_STA", [
                        .ifThen(.lEqual(.path("VGIA"), .integer(0)), [.returnValue(.integer(0))]),
                        .returnValue(.integer(0x0F)),
                    ]),
                    .method("ADDR", [
                        .store(.package([.integer(0), .integer(0)]), .local(0)),
                        .store(.add(.path("VGIA"), .integer(UInt64(guidOffset))), .index(.local(0), .integer(0))),
                        .store(.integer(0), .index(.local(0), .integer(1))),
                        .returnValue(.local(0)),
                    ]),
                ]),
            ]),
            .method("\\_GPE._E05", [.notify(.path("\\_SB.VGEN"), .integer(0x80))]),
        ]
        let table = SDT(signature: "SSDT", revision: 1, oemTableID: "VMGENID", body: AML.list(body).bytes)
        precondition(Array(table.bytes[(vgiaOffset - 6)..<vgiaOffset]) == [0x08] + Array("VGIA".utf8) + [0x0C], "VGIA layout")
        return table
    }
}
