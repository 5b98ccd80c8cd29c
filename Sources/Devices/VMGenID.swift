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
///
/// **The guest's acknowledgement.** A notified change is *pending* until the guest's OSPM clears
/// GPE0_STS bit 5 (ACPICA does so when it takes the SCI, before it runs `\_GPE._E05`); that clear
/// *acknowledges* it, with the time from the change (GUID written, GPE raised) to the clear. Each
/// change is acknowledged at most once. A change made while an earlier one is still pending
/// supersedes it: the next clear acknowledges the latest change only (the earlier one is never
/// acknowledged on its own), with the latency counted from the latest change. A clear that came
/// before the latest change was raised acknowledges nothing. A guest that never clears the bit
/// (no ACPI, GPE 5 masked) leaves the change pending; so does a paused machine, whose pause counts
/// in the latency. A change made before the guest reported the GUID's address is not notified
/// (the guest reads the GUID when its driver starts) and so is never pending. This bookkeeping is
/// not part of the snapshot: a restore leaves nothing pending, and the machine's post-restore
/// change (or, keeping the GUID, the re-notification of a change pending at the save) starts anew.
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

    /// The guest acknowledged a change: the GUID it changed to and the time from the change to the
    /// guest's clear of GPE0_STS bit 5.
    public struct Acknowledgement: Sendable, Equatable {
        /// The GUID in guest byte order.
        public var guid: [UInt8]
        public var latencyNanoseconds: UInt64
        public init(guid: [UInt8], latencyNanoseconds: UInt64) {
            self.guid = guid
            self.latencyNanoseconds = latencyNanoseconds
        }
        /// The latency in milliseconds, rounded to the microsecond.
        public var latencyMilliseconds: Double { (Double(latencyNanoseconds) / 1000).rounded() / 1000 }
    }

    /// Where the latest notified change stands.
    public enum ChangeStatus: Sendable, Equatable {
        /// No change was notified since the machine started (or was restored).
        case unchanged
        /// The latest change waits for the guest's acknowledgement.
        case pending
        /// The guest acknowledged the latest change.
        case acknowledged(Acknowledgement)
    }

    private struct Live {
        var state: State
        /// The number of notified changes: the latest one's tag (0: none yet).
        var changes: UInt64 = 0
        var status = ChangeStatus.unchanged

        /// Records a notified change: the next one's number, now pending.
        mutating func notified() -> UInt64 {
            changes += 1
            status = .pending
            return changes
        }
    }

    private let live: Mutex<Live>
    private let memory: GuestMemory
    private let raise: @Sendable (_ change: UInt64) -> Void
    private let acknowledgementHandler = Mutex<(@Sendable (Acknowledgement) -> Void)?>(nil)

    /// `notify` raises the ACPI event (the machine sets GPE 5 and the SCI). The guest's
    /// acknowledgements reach the device through `acknowledge(change:latencyNanoseconds:)`.
    public convenience init(guid: [UInt8], memory: GuestMemory, notify: @escaping @Sendable () -> Void) {
        self.init(guid: guid, memory: memory, raise: { _ in notify() })
    }

    /// A device that notifies through `acpi`'s GPE 5 and hears of the guest's acknowledgements from it.
    public convenience init(guid: [UInt8], memory: GuestMemory, acpi: ACPIPowerManagement) {
        self.init(guid: guid, memory: memory, raise: { change in acpi.raiseGPE(VMGenIDTable.gpe, tag: change) })
        acpi.onGuestAcknowledgement(gpe: VMGenIDTable.gpe) { [weak self] ack in
            self?.acknowledge(change: ack.tag, latencyNanoseconds: ack.latencyNanoseconds)
        }
    }

    /// `raise` raises the ACPI event for change number `change` (1, 2, ...).
    public init(guid: [UInt8], memory: GuestMemory, raise: @escaping @Sendable (_ change: UInt64) -> Void) {
        precondition(guid.count == 16, "a GUID has 16 bytes")
        live = Mutex(Live(state: State(guid: guid, address: 0)))
        self.memory = memory
        self.raise = raise
    }

    public var guid: [UInt8] { live.withLock { $0.state.guid } }
    /// Where the guest has the GUID, once its loader reported it.
    public var address: UInt64? { live.withLock { $0.state.address == 0 ? nil : $0.state.address } }

    /// Whether the latest change is pending or acknowledged.
    public var changeStatus: ChangeStatus { live.withLock { $0.status } }

    /// Sets who hears of each acknowledgement (nil: nobody). It runs on the thread of the guest's
    /// clear (a vCPU thread) with no lock held: it must not block or do host I/O.
    public func onAcknowledged(_ handler: (@Sendable (Acknowledgement) -> Void)?) {
        acknowledgementHandler.withLock { $0 = handler }
    }

    /// The guest cleared the GPE of change number `change` after `latencyNanoseconds`: if that is the
    /// latest change and it is pending, it is acknowledged (and the handler hears of it). Returns the
    /// acknowledgement, or nil when the clear acknowledges nothing.
    @discardableResult
    public func acknowledge(change: UInt64, latencyNanoseconds: UInt64) -> Acknowledgement? {
        let ack = live.withLock { live -> Acknowledgement? in
            guard change == live.changes, live.status == .pending else { return nil }
            let ack = Acknowledgement(guid: live.state.guid, latencyNanoseconds: latencyNanoseconds)
            live.status = .acknowledged(ack)
            return ack
        }
        if let ack { acknowledgementHandler.withLock { $0 }?(ack) }
        return ack
    }

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
        return live.withLock { live in
            guard (try? memory.write(live.state.guid, at: GuestAddress(address))) != nil else { return false }
            live.state.address = address
            return true
        }
    }

    /// Sets a new GUID: guest memory first, then the notification, which makes the change pending.
    /// Returns true if the guest was notified now, false if the GUID waits for the guest to report
    /// its address.
    @discardableResult
    public func setGUID(_ guid: [UInt8]) -> Bool {
        precondition(guid.count == 16, "a GUID has 16 bytes")
        let change = live.withLock { live -> UInt64? in
            live.state.guid = guid
            guard live.state.address != 0, (try? memory.write(guid, at: GuestAddress(live.state.address))) != nil else {
                return nil
            }
            return live.notified()
        }
        if let change { raise(change) }
        return change != nil
    }

    /// Notifies the guest again of the GUID it has, as a new pending change, without writing guest
    /// memory: for a restore that keeps the GUID of a snapshot saved while a change was pending
    /// (its GPE status bit comes back set, but the acknowledgement bookkeeping does not). Returns
    /// false, doing nothing, while the guest has not reported the GUID's address.
    @discardableResult
    public func renotify() -> Bool {
        guard let change = live.withLock({ live -> UInt64? in live.state.address == 0 ? nil : live.notified() }) else {
            return false
        }
        raise(change)
        return true
    }

    public func saveState() -> State { live.withLock { $0.state } }

    /// Restores GUID and address after checking them (nothing changes on error). Neither guest
    /// memory nor the guest is touched: the machine sets a new GUID afterwards with `setGUID`. No
    /// change is pending after it (see the type's notes on acknowledgements).
    public func restoreState(_ s: State) throws(LEDecodeError) {
        guard s.guid.count == 16 else { throw Self.invalid("guid", "\(s.guid.count) bytes, a GUID has 16") }
        guard s.address == 0 || isUsableAddress(s.address) else {
            throw Self.invalid("address", "\(hex(s.address)) is not 0 (not yet reported) nor an 8-byte aligned address "
                                   + "of 16 bytes inside one page of guest RAM")
        }
        live.withLock { live in
            live.state = s
            live.status = .unchanged // the change count goes on: an old raise's clear can never match
        }
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

extension VMGenID: StateSnapshotDevice {
    public static let snapshotName = "vmgenid"
    public static let snapshotVersion = UInt16(State.version)
    public static let oldestSnapshotVersion: UInt16 = 1
}

extension VMGenID.State: CodedDeviceState {
    public static var blank: Self { Self(guid: [], address: 0) }

    /// The payload layout (see `State`), for both directions: `saveSnapshot` and `restoreSnapshot`
    /// run it.
    public mutating func code<C: LECoder>(_ c: inout C, version: UInt16) throws(LEDecodeError) {
        try c.raw(&guid, count: 16, "vmgenid.guid")
        try c.u64(&address, "vmgenid.address")
    }
}

extension VMGenID: PlatformDevice {
    public var snapshotSection: (name: String, device: any SnapshotDevice)? { ("dev.vmgenid", self) }

    // No device-tree node: the `microsoft,vmgenid` binding needs an interrupt of the device's own
    // to announce a change, and this device announces it through ACPI (GPE 5 and the SCI, which
    // only a guest's ACPI enables), so a guest that found it in the tree would never hear of one.

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
