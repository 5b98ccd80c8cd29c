import Devices

// MARK: - TPM 2.0 commands

/// Raw TPM 2.0 commands for tests (big-endian, built by hand).
public enum TPM2 {
    /// TPM2_Startup(SU_CLEAR).
    public static let startupClear: [UInt8] = [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x44, 0, 0]

    /// TPM2_GetRandom(count).
    public static func getRandom(_ count: UInt16) -> [UInt8] {
        [0x80, 0x01, 0, 0, 0, 12, 0, 0, 0x01, 0x7B, UInt8(count >> 8), UInt8(count & 0xFF)]
    }

    /// The password session of an empty authorisation (TPM_RS_PW), with its u32 size.
    public static let passwordAuthorization: [UInt8] = [0, 0, 0, 9, 0x40, 0, 0, 0x09, 0, 0, 0, 0, 0]

    /// TPM2_PCR_Reset(pcr).
    public static func pcrReset(_ pcr: UInt8) -> [UInt8] {
        withSize([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x3D, 0, 0, 0, pcr] + passwordAuthorization)
    }

    /// TPM2_PCR_Extend(pcr) with a SHA-256 digest of `byte` repeated.
    public static func pcrExtend(_ pcr: UInt8, byte: UInt8) -> [UInt8] {
        withSize([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x82, 0, 0, 0, pcr] + passwordAuthorization
                 + [0, 0, 0, 1, 0x00, 0x0B] + [UInt8](repeating: byte, count: 32))
    }

    /// TPM2_PCR_Read of one PCR (0...23) in the SHA-256 bank.
    public static func pcrRead(_ pcr: Int) -> [UInt8] {
        var select: [UInt8] = [0, 0, 0]
        select[pcr / 8] = 1 << (pcr % 8)
        return withSize([0x80, 0x01, 0, 0, 0, 0, 0, 0, 0x01, 0x7E, 0, 0, 0, 1, 0x00, 0x0B, 3] + select)
    }

    /// TPM2_CreatePrimary of an RSA 2048 storage key in the owner hierarchy (slow: a key pair).
    public static let createPrimaryRSA2048: [UInt8] = {
        let publicArea: [UInt8] = [0x00, 0x01, 0x00, 0x0B, 0x00, 0x03, 0x00, 0x72, 0, 0,   // RSA, SHA-256, attributes, no policy
                                   0x00, 0x06, 0x00, 0x80, 0x00, 0x43,                   // AES-128-CFB
                                   0x00, 0x10, 0x08, 0x00, 0, 0, 0, 0, 0, 0]             // no scheme, 2048 bits, exponent, unique
        return withSize([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x31, 0x40, 0, 0, 0x01] + passwordAuthorization
                        + [0, 4, 0, 0, 0, 0]                                             // sensitive: no auth, no data
                        + [0, UInt8(publicArea.count)] + publicArea
                        + [0, 0, 0, 0, 0, 0])                                             // outside info, no PCRs
    }()

    /// The object handle of a successful TPM2_CreatePrimary response.
    public static func createdHandle(_ response: [UInt8]) -> UInt32? {
        guard responseCode(response) == 0, response.count >= 14 else { return nil }
        return response[10..<14].reduce(0) { $0 << 8 | UInt32($1) }
    }

    /// TPM2_Create of a sealed data object holding `data` under the storage key `parent`: the TPM
    /// encrypts its private part with the parent's AES key.
    public static func createSealed(parent: UInt32, _ data: [UInt8]) -> [UInt8] {
        let publicArea: [UInt8] = [0x00, 0x08, 0x00, 0x0B, 0, 0, 0, 0x52, 0, 0,   // keyed hash, SHA-256, fixed, user auth, no policy
                                   0x00, 0x10, 0, 0]                              // no scheme, no unique
        let sensitive = [0, 0] + be16(data.count) + data                        // no auth, the data
        return withSize([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x53] + be32(parent) + passwordAuthorization
                        + be16(sensitive.count) + sensitive + be16(publicArea.count) + publicArea
                        + [0, 0, 0, 0, 0, 0])                                    // outside info, no PCRs
    }

    /// The owner hierarchy's handle (TPM_RH_OWNER).
    public static let owner: [UInt8] = [0x40, 0, 0, 0x01]

    static func be32(_ v: UInt32) -> [UInt8] { [24, 16, 8, 0].map { UInt8(truncatingIfNeeded: v >> $0) } }
    static func be16(_ v: Int) -> [UInt8] { [UInt8(truncatingIfNeeded: v >> 8), UInt8(truncatingIfNeeded: v)] }

    /// TPM2_NV_DefineSpace of an ordinary index of `size` bytes that the owner reads and writes
    /// with the (empty) owner password, exempt from dictionary-attack lockout.
    public static func nvDefine(_ index: UInt32, size: Int) -> [UInt8] {
        let publicArea = be32(index) + [0x00, 0x0B] + be32(0x0202_0002) + [0, 0] + be16(size)
        return withSize([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x2A] + owner + passwordAuthorization
                        + [0, 0] + be16(publicArea.count) + publicArea)
    }

    /// TPM2_NV_Write of `data` at offset 0, with the owner's authorization.
    public static func nvWrite(_ index: UInt32, _ data: [UInt8]) -> [UInt8] {
        withSize([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x37] + owner + be32(index) + passwordAuthorization
                 + be16(data.count) + data + [0, 0])
    }

    /// TPM2_NV_Read of `size` bytes at offset 0, with the owner's authorization.
    public static func nvRead(_ index: UInt32, size: Int) -> [UInt8] {
        withSize([0x80, 0x02, 0, 0, 0, 0, 0, 0, 0x01, 0x4E] + owner + be32(index) + passwordAuthorization + be16(size) + [0, 0])
    }

    /// The data of a successful TPM2_NV_Read response (after the parameter size and the TPM2B's size).
    public static func nvReadData(_ response: [UInt8]) -> [UInt8]? {
        guard responseCode(response) == 0, response.count >= 16 else { return nil }
        let n = Int(response[14]) << 8 | Int(response[15])
        guard response.count >= 16 + n else { return nil }
        return Array(response[16..<(16 + n)])
    }

    public static func withSize(_ command: [UInt8]) -> [UInt8] {
        var c = command
        let n = UInt32(c.count)
        c[2] = UInt8(n >> 24); c[3] = UInt8((n >> 16) & 0xFF); c[4] = UInt8((n >> 8) & 0xFF); c[5] = UInt8(n & 0xFF)
        return c
    }

    /// A response's code (0: success).
    public static func responseCode(_ response: [UInt8]) -> UInt32 {
        TPMTIS.codeField(response) ?? 0xFFFF_FFFF
    }
}
