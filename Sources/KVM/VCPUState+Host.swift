/// Fitting a saved vCPU state to the host that restores it.
///
/// A snapshot may come from a host with other CPU features (a pool of machines where one has PKU
/// and another not, a newer CPU generation). KVM refuses state the host cannot hold, mostly with a
/// bare EINVAL; this compares the saved state with what the restoring host supports first, and
/// either adapts it or refuses with a sentence that names the feature:
///
/// - XSAVE components (x87, SSE, AVX, MPX, AVX-512, PKRU, AMX...) the host lacks are dropped when
///   their saved state is in its initial configuration (XSTATE_BV clear, or all zero, e.g. PKRU = 0):
///   out of XSTATE_BV, XCR0, CPUID leaf 0xD and the CPUID feature bits that announce them. One in
///   use is refused. The XSAVE area is laid out again in the host's layout: the standard format
///   places each component at the offset CPUID 0xD reports, which differs between CPU vendors.
/// - CPUID: every feature bit the saved CPUID gives the guest must be one this host can give
///   (`reference`: the CPUID a fresh vCPU gets here); a guest that was told it has AVX-512 would
///   otherwise fault on its next AVX-512 instruction.
/// - CR4 bits whose feature the (fitted) CPUID no longer has are refused (KVM_SET_SREGS would be).
/// - MSRs the host's KVM does not list are dropped when their saved value is 0, refused otherwise.
public struct HostCPU: Sendable {
    /// KVM_GET_SUPPORTED_CPUID.
    public var supportedCPUID: [CPUIDEntry]
    /// KVM_GET_MSR_INDEX_LIST.
    public var msrIndices: Set<UInt32>
    /// The XSAVE area size KVM transfers (KVM_CAP_XSAVE2, at least 4096).
    public var xsaveSize: Int

    public init(supportedCPUID: [CPUIDEntry], msrIndices: Set<UInt32>, xsaveSize: Int) {
        self.supportedCPUID = supportedCPUID
        self.msrIndices = msrIndices
        self.xsaveSize = xsaveSize
    }

    /// The XSAVE features (XCR0 bits) the host supports: CPUID 0xD.0 EDX:EAX, x87 and SSE always.
    public var supportedXCR0: UInt64 { XSAVELayout.xcr0Mask(supportedCPUID) | 0b11 }
}

/// The parts of the XSAVE area's standard format (Intel SDM vol. 1, 13.4) the fitting touches.
public enum XSAVELayout {
    /// The legacy FXSAVE region.
    public static let legacySize = 512
    /// XSTATE_BV (u64), XCOMP_BV (u64), then 48 reserved bytes.
    public static let headerOffset = 512
    public static let headerSize = 64
    public static let mxcsrOffset = 24

    /// XCR0 bits the CPUID's leaf 0xD subleaf 0 announces (EDX:EAX).
    public static func xcr0Mask(_ cpuid: [CPUIDEntry]) -> UInt64 {
        guard let d = cpuid.first(where: { $0.function == 0xD && $0.index == 0 }) else { return 0 }
        return UInt64(d.edx) << 32 | UInt64(d.eax)
    }

    /// Offset and size of component `i` (>= 2) in the standard format, from CPUID 0xD.i.
    public static func component(_ i: Int, in cpuid: [CPUIDEntry]) -> (offset: Int, size: Int)? {
        guard let e = cpuid.first(where: { $0.function == 0xD && $0.index == UInt32(i) }), e.eax > 0 else { return nil }
        return (Int(e.ebx), Int(e.eax))
    }

    /// A short name for XSAVE component `i`.
    public static func name(_ i: Int) -> String {
        switch i {
        case 0: "x87"
        case 1: "SSE"
        case 2: "AVX"
        case 3: "MPX bound registers"
        case 4: "MPX bound configuration"
        case 5: "AVX-512 opmask"
        case 6: "AVX-512 ZMM_Hi256"
        case 7: "AVX-512 Hi16_ZMM"
        case 9: "PKRU, protection keys"
        case 11: "CET user"
        case 12: "CET supervisor"
        case 17: "AMX tile configuration"
        case 18: "AMX tile data"
        case 19: "APX"
        default: "unnamed"
        }
    }
}

/// A CPUID feature bit: leaf, subleaf, register (0 eax ... 3 edx), bit.
public struct CPUIDFeature: Hashable, Sendable, CustomStringConvertible {
    public var leaf: UInt32
    public var subleaf: UInt32
    public var register: Int
    public var bit: Int

    public init(_ leaf: UInt32, _ subleaf: UInt32, _ register: Int, _ bit: Int) {
        self.leaf = leaf
        self.subleaf = subleaf
        self.register = register
        self.bit = bit
    }

    static func reg(_ e: CPUIDEntry, _ r: Int) -> UInt32 { [e.eax, e.ebx, e.ecx, e.edx][r] }

    public func isSet(in cpuid: [CPUIDEntry]) -> Bool {
        guard let e = cpuid.first(where: { $0.function == leaf && $0.index == subleaf }) else { return false }
        return Self.reg(e, register) >> UInt32(bit) & 1 == 1
    }

    public var description: String {
        let where_ = "CPUID 0x\(String(leaf, radix: 16)).\(subleaf) \(["EAX", "EBX", "ECX", "EDX"][register]) bit \(bit)"
        if let name = Self.names[self] { return "\(name) (\(where_))" }
        return where_
    }

    /// The feature registers compared between a snapshot and the restoring host.
    static let compared: [(leaf: UInt32, subleaf: UInt32, register: Int)] = [
        (0x1, 0, 2), (0x1, 0, 3), (0x7, 0, 1), (0x7, 0, 2), (0x7, 0, 3), (0x7, 1, 0), (0xD, 1, 0),
        (0x8000_0001, 0, 2), (0x8000_0001, 0, 3),
    ]

    /// Bits KVM keeps up to date itself from the guest's registers (OSXSAVE from CR4, OSPKE from
    /// CR4, APIC from the APIC base MSR): not features the host has or lacks.
    static let dynamic: Set<CPUIDFeature> = [CPUIDFeature(0x1, 0, 2, 27), CPUIDFeature(0x7, 0, 2, 4), CPUIDFeature(0x1, 0, 3, 9)]

    static let names: [CPUIDFeature: String] = [
        CPUIDFeature(0x1, 0, 3, 1): "vme", CPUIDFeature(0x1, 0, 3, 2): "de", CPUIDFeature(0x1, 0, 3, 3): "pse",
        CPUIDFeature(0x1, 0, 3, 7): "mce", CPUIDFeature(0x1, 0, 3, 14): "mca", CPUIDFeature(0x1, 0, 3, 17): "pse36",
        CPUIDFeature(0x1, 0, 3, 12): "mtrr", CPUIDFeature(0x1, 0, 3, 18): "pn", CPUIDFeature(0x1, 0, 3, 28): "ht",
        CPUIDFeature(0x1, 0, 2, 0): "sse3", CPUIDFeature(0x1, 0, 2, 1): "pclmulqdq", CPUIDFeature(0x1, 0, 2, 9): "ssse3",
        CPUIDFeature(0x1, 0, 2, 12): "fma", CPUIDFeature(0x1, 0, 2, 13): "cx16", CPUIDFeature(0x1, 0, 2, 17): "pcid",
        CPUIDFeature(0x1, 0, 2, 19): "sse4.1", CPUIDFeature(0x1, 0, 2, 20): "sse4.2", CPUIDFeature(0x1, 0, 2, 21): "x2apic",
        CPUIDFeature(0x1, 0, 2, 22): "movbe", CPUIDFeature(0x1, 0, 2, 23): "popcnt", CPUIDFeature(0x1, 0, 2, 24): "tsc-deadline",
        CPUIDFeature(0x1, 0, 2, 25): "aes", CPUIDFeature(0x1, 0, 2, 26): "xsave", CPUIDFeature(0x1, 0, 2, 28): "avx",
        CPUIDFeature(0x1, 0, 2, 29): "f16c", CPUIDFeature(0x1, 0, 2, 30): "rdrand",
        CPUIDFeature(0x7, 0, 1, 0): "fsgsbase", CPUIDFeature(0x7, 0, 1, 1): "tsc_adjust", CPUIDFeature(0x7, 0, 1, 3): "bmi1",
        CPUIDFeature(0x7, 0, 1, 5): "avx2", CPUIDFeature(0x7, 0, 1, 7): "smep", CPUIDFeature(0x7, 0, 1, 8): "bmi2",
        CPUIDFeature(0x7, 0, 1, 9): "erms", CPUIDFeature(0x7, 0, 1, 10): "invpcid", CPUIDFeature(0x7, 0, 1, 14): "mpx",
        CPUIDFeature(0x7, 0, 1, 16): "avx512f", CPUIDFeature(0x7, 0, 1, 17): "avx512dq", CPUIDFeature(0x7, 0, 1, 18): "rdseed",
        CPUIDFeature(0x7, 0, 1, 19): "adx", CPUIDFeature(0x7, 0, 1, 20): "smap", CPUIDFeature(0x7, 0, 1, 21): "avx512ifma",
        CPUIDFeature(0x7, 0, 1, 23): "clflushopt", CPUIDFeature(0x7, 0, 1, 24): "clwb", CPUIDFeature(0x7, 0, 1, 29): "sha_ni",
        CPUIDFeature(0x7, 0, 1, 30): "avx512bw", CPUIDFeature(0x7, 0, 1, 31): "avx512vl",
        CPUIDFeature(0x7, 0, 2, 1): "avx512vbmi", CPUIDFeature(0x7, 0, 2, 2): "umip", CPUIDFeature(0x7, 0, 2, 3): "pku",
        CPUIDFeature(0x7, 0, 2, 6): "avx512_vbmi2", CPUIDFeature(0x7, 0, 2, 7): "cet_ss", CPUIDFeature(0x7, 0, 2, 8): "gfni",
        CPUIDFeature(0x7, 0, 2, 9): "vaes", CPUIDFeature(0x7, 0, 2, 10): "vpclmulqdq", CPUIDFeature(0x7, 0, 2, 11): "avx512_vnni",
        CPUIDFeature(0x7, 0, 2, 12): "avx512_bitalg", CPUIDFeature(0x7, 0, 2, 14): "avx512_vpopcntdq", CPUIDFeature(0x7, 0, 2, 16): "la57",
        CPUIDFeature(0x7, 0, 2, 22): "rdpid",
        CPUIDFeature(0x7, 0, 3, 4): "fsrm", CPUIDFeature(0x7, 0, 3, 20): "cet_ibt", CPUIDFeature(0x7, 0, 3, 22): "amx_bf16",
        CPUIDFeature(0x7, 0, 3, 23): "avx512_fp16", CPUIDFeature(0x7, 0, 3, 24): "amx_tile", CPUIDFeature(0x7, 0, 3, 25): "amx_int8",
        CPUIDFeature(0x7, 0, 3, 26): "spec_ctrl", CPUIDFeature(0x7, 0, 3, 27): "stibp", CPUIDFeature(0x7, 0, 3, 29): "arch_capabilities",
        CPUIDFeature(0x7, 0, 3, 31): "ssbd",
        CPUIDFeature(0x7, 1, 0, 4): "avx_vnni", CPUIDFeature(0x7, 1, 0, 5): "avx512_bf16",
        CPUIDFeature(0xD, 1, 0, 0): "xsaveopt", CPUIDFeature(0xD, 1, 0, 1): "xsavec", CPUIDFeature(0xD, 1, 0, 2): "xgetbv1",
        CPUIDFeature(0xD, 1, 0, 3): "xsaves",
        CPUIDFeature(0x8000_0001, 0, 2, 0): "lahf_lm", CPUIDFeature(0x8000_0001, 0, 2, 5): "abm", CPUIDFeature(0x8000_0001, 0, 2, 6): "sse4a",
        CPUIDFeature(0x8000_0001, 0, 2, 8): "3dnowprefetch", CPUIDFeature(0x8000_0001, 0, 2, 21): "tbm",
        CPUIDFeature(0x8000_0001, 0, 3, 11): "syscall", CPUIDFeature(0x8000_0001, 0, 3, 20): "nx",
        CPUIDFeature(0x8000_0001, 0, 3, 26): "pdpe1gb", CPUIDFeature(0x8000_0001, 0, 3, 27): "rdtscp", CPUIDFeature(0x8000_0001, 0, 3, 29): "lm",
    ]

    /// The CPUID bits that announce XSAVE component `i` and the features that need its state.
    static func announcing(component i: Int) -> [CPUIDFeature] {
        switch i {
        case 2: // AVX and everything built on the YMM registers
            return [CPUIDFeature(0x1, 0, 2, 28), CPUIDFeature(0x1, 0, 2, 12), CPUIDFeature(0x1, 0, 2, 29), CPUIDFeature(0x7, 0, 1, 5),
                    CPUIDFeature(0x7, 0, 2, 9), CPUIDFeature(0x7, 0, 2, 10), CPUIDFeature(0x7, 1, 0, 4)]
                + announcing(component: 5)
        case 3, 4:
            return [CPUIDFeature(0x7, 0, 1, 14)]
        case 5, 6, 7: // AVX-512
            return [16, 17, 21, 26, 27, 28, 30, 31].map { CPUIDFeature(0x7, 0, 1, $0) }
                + [1, 6, 11, 12, 14].map { CPUIDFeature(0x7, 0, 2, $0) }
                + [2, 3, 8, 23].map { CPUIDFeature(0x7, 0, 3, $0) } + [CPUIDFeature(0x7, 1, 0, 5)]
        case 9:
            return [CPUIDFeature(0x7, 0, 2, 3), CPUIDFeature(0x7, 0, 2, 4)]
        case 11, 12:
            return [CPUIDFeature(0x7, 0, 2, 7), CPUIDFeature(0x7, 0, 3, 20)]
        case 17, 18:
            return [22, 24, 25].map { CPUIDFeature(0x7, 0, 3, $0) }
        default:
            return []
        }
    }

    /// CR4 bits that KVM accepts only when the guest's CPUID has a feature.
    static let cr4Requirements: [(bit: Int, name: String, feature: CPUIDFeature)] = [
        (11, "UMIP", CPUIDFeature(0x7, 0, 2, 2)), (12, "LA57", CPUIDFeature(0x7, 0, 2, 16)),
        (16, "FSGSBASE", CPUIDFeature(0x7, 0, 1, 0)), (17, "PCIDE", CPUIDFeature(0x1, 0, 2, 17)),
        (18, "OSXSAVE", CPUIDFeature(0x1, 0, 2, 26)), (20, "SMEP", CPUIDFeature(0x7, 0, 1, 7)),
        (21, "SMAP", CPUIDFeature(0x7, 0, 1, 20)), (22, "PKE", CPUIDFeature(0x7, 0, 2, 3)),
    ]
}

extension VCPUState {
    /// XCR0 as saved (1, x87 only, when the state has no XCRs).
    var savedXCR0: UInt64 { xcrs.first { $0.index == 0 }?.value ?? 1 }

    /// This state adapted to `host` (see `HostCPU`), or an `.incompatibleHost` error naming what
    /// this host cannot hold. `reference` is the CPUID a fresh vCPU of this machine gets on this
    /// host: the most it can offer (a leaf may appear more than once: its bits are OR-ed). `notes`
    /// lists what was dropped, for the log.
    public func fitted(to host: HostCPU, reference: [CPUIDEntry], vcpu: UInt32) throws(KVMError) -> (state: VCPUState, notes: [String]) {
        func refuse(_ what: String) -> KVMError { .incompatibleHost("vCPU \(vcpu) \(what)") }
        var state = self
        var notes: [String] = []
        let saved = xsave
        guard saved.count >= XSAVELayout.legacySize + XSAVELayout.headerSize else {
            throw refuse("has a \(saved.count)-byte XSAVE area, too small for its header")
        }
        func u64(_ bytes: [UInt8], _ at: Int) -> UInt64 { (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[at + $1]) << (8 * UInt64($1)) } }
        let xstateBV = u64(saved, XSAVELayout.headerOffset)
        guard u64(saved, XSAVELayout.headerOffset + 8) == 0 else {
            throw refuse("has a compacted XSAVE area (XCOMP_BV is not 0), which KVM never transfers")
        }

        // XSAVE components: what the saved state uses against what the host holds.
        let hostMask = host.supportedXCR0
        var dropped: UInt64 = 0
        for i in 2..<64 where (savedXCR0 | xstateBV) >> UInt64(i) & 1 == 1 && hostMask >> UInt64(i) & 1 == 0 {
            if xstateBV >> UInt64(i) & 1 == 1 {
                guard let layout = XSAVELayout.component(i, in: cpuid) ?? XSAVELayout.component(i, in: host.supportedCPUID),
                      layout.offset >= XSAVELayout.legacySize + XSAVELayout.headerSize, layout.offset + layout.size <= saved.count else {
                    throw refuse("has XSAVE component \(i) (\(XSAVELayout.name(i))) in use, which this host's CPU does not support")
                }
                if saved[layout.offset..<layout.offset + layout.size].contains(where: { $0 != 0 }) {
                    throw refuse("uses XSAVE component \(i) (\(XSAVELayout.name(i))), which this host's CPU does not support")
                }
            }
            dropped |= 1 << UInt64(i)
            notes.append("XSAVE component \(i) (\(XSAVELayout.name(i))) was in its initial state and is dropped: this host does not support it")
        }

        // The area again, in the host's size and layout, without the dropped components.
        let keptBV = xstateBV & ~dropped
        var area = [UInt8](repeating: 0, count: host.xsaveSize)
        area.replaceSubrange(0..<XSAVELayout.legacySize, with: saved[0..<XSAVELayout.legacySize])
        withUnsafeBytes(of: keptBV.littleEndian) { area.replaceSubrange(XSAVELayout.headerOffset..<XSAVELayout.headerOffset + 8, with: $0) }
        for i in 2..<64 where keptBV >> UInt64(i) & 1 == 1 {
            guard let to = XSAVELayout.component(i, in: host.supportedCPUID) else {
                throw refuse("has XSAVE component \(i) (\(XSAVELayout.name(i))) in use, but this host's CPUID does not say where it goes")
            }
            let from = XSAVELayout.component(i, in: cpuid) ?? to
            guard from.size == to.size else {
                throw refuse("has XSAVE component \(i) (\(XSAVELayout.name(i))) of \(from.size) bytes; this host's is \(to.size) bytes")
            }
            guard from.offset >= XSAVELayout.legacySize + XSAVELayout.headerSize, from.offset + from.size <= saved.count,
                  to.offset >= XSAVELayout.legacySize + XSAVELayout.headerSize, to.offset + to.size <= area.count else {
                throw refuse("has XSAVE component \(i) (\(XSAVELayout.name(i))) outside its XSAVE area (offset \(from.offset), \(from.size) bytes)")
            }
            area.replaceSubrange(to.offset..<to.offset + to.size, with: saved[from.offset..<from.offset + from.size])
        }
        state.xsave = area
        state.xcrs = xcrs.map { $0.index == 0 ? XCR(index: 0, value: $0.value & ~dropped) : $0 }

        // CPUID: the dropped components' announcements go, then every feature must be the host's.
        if dropped != 0 {
            let gone = (2..<64).filter { dropped >> UInt64($0) & 1 == 1 }
            let bits = Set(gone.flatMap { CPUIDFeature.announcing(component: $0) })
            state.cpuid.removeAll { $0.function == 0xD && $0.index >= 2 && gone.contains(Int($0.index)) }
            state.cpuid = state.cpuid.map { e in
                var e = e
                if e.function == 0xD && e.index == 0 {
                    e.eax &= ~UInt32(truncatingIfNeeded: dropped)
                    e.edx &= ~UInt32(truncatingIfNeeded: dropped >> 32)
                }
                for f in bits where f.leaf == e.function && f.subleaf == e.index {
                    let clear = ~(UInt32(1) << UInt32(f.bit))
                    switch f.register {
                    case 0: e.eax &= clear
                    case 1: e.ebx &= clear
                    case 2: e.ecx &= clear
                    default: e.edx &= clear
                    }
                }
                return e
            }
        }
        var missing: [CPUIDFeature] = []
        for (leaf, subleaf, register) in CPUIDFeature.compared {
            guard let e = state.cpuid.first(where: { $0.function == leaf && $0.index == subleaf }) else { continue }
            let have = reference.filter { $0.function == leaf && $0.index == subleaf }.reduce(UInt32(0)) { $0 | CPUIDFeature.reg($1, register) }
            let lacking = CPUIDFeature.reg(e, register) & ~have
            for bit in 0..<32 where lacking >> UInt32(bit) & 1 == 1 {
                let f = CPUIDFeature(leaf, subleaf, register, bit)
                if !CPUIDFeature.dynamic.contains(f) { missing.append(f) }
            }
        }
        if missing.count == 1 { throw refuse("was given the CPU feature \(missing[0]), which this host cannot give") }
        if !missing.isEmpty {
            throw refuse("was given \(missing.count) CPU features this host cannot give: \(missing.map(\.description).joined(separator: ", "))")
        }
        for r in CPUIDFeature.cr4Requirements where state.sregs.cr4 >> UInt64(r.bit) & 1 == 1 && !r.feature.isSet(in: state.cpuid) {
            throw refuse("has CR4.\(r.name) set, which needs \(r.feature): this host cannot give it")
        }

        // MSRs: the host's KVM must have each one, unless its value is 0 (never set).
        var msrs: [MSREntry] = []
        for m in self.msrs {
            if host.msrIndices.contains(m.index) { msrs.append(m); continue }
            guard m.value == 0 else {
                throw refuse("has MSR 0x\(String(m.index, radix: 16)) = 0x\(String(m.value, radix: 16)), which this host's KVM does not have")
            }
            notes.append("MSR 0x\(String(m.index, radix: 16)) is 0 and this host's KVM does not have it: dropped")
        }
        state.msrs = msrs
        return (state, notes)
    }
}
