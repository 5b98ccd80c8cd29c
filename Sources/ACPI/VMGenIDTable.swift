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
