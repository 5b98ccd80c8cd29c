import KVM

/// Adjusts the host's supported CPUID for one vCPU.
enum CPUIDSetup {
    /// The hypervisor timing leaf (used by VMware and QEMU's `vmware-cpuid-freq`): EAX = TSC kHz,
    /// EBX = local APIC timer kHz (KVM's is 1 GHz). Our firmware reads it to report its boot time.
    static let timingLeaf: UInt32 = 0x4000_0010

    static func entries(from supported: [CPUIDEntry], vcpuID: UInt32, vcpuCount: Int, tscKHz: UInt32? = nil,
                        tscDeadline: Bool = false, model: CPUModel = .host) -> [CPUIDEntry] {
        var result = adjusted(supported, vcpuID: vcpuID, vcpuCount: vcpuCount, tscDeadline: tscDeadline)
        if model == .baseline { result = baseline(result) }
        if let tscKHz, tscKHz > 0, let base = result.firstIndex(where: { $0.function == 0x4000_0000 }) {
            result[base].eax = max(result[base].eax, timingLeaf)
            result.removeAll { $0.function == timingLeaf }
            result.append(CPUIDEntry(function: timingLeaf, eax: tscKHz, ebx: 1_000_000))
        }
        return result
    }

    private static func adjusted(_ supported: [CPUIDEntry], vcpuID: UInt32, vcpuCount: Int, tscDeadline: Bool) -> [CPUIDEntry] {
        supported.map { original in
            var e = original
            switch e.function {
            case 0x1:
                e.ecx |= 1 << 31                               // hypervisor present
                if tscDeadline { e.ecx |= 1 << 24 }             // the in-kernel APIC's TSC-deadline timer
                e.ebx = (e.ebx & 0x00FF_FFFF) | (vcpuID << 24)  // initial APIC ID
                // Logical processor count for HTT-aware guests.
                e.ebx = (e.ebx & 0xFF00_FFFF) | (UInt32(min(vcpuCount, 255)) << 16)
                if vcpuCount > 1 { e.edx |= 1 << 28 }
            case 0x7 where e.index == 0:
                e.ecx &= ~(1 << 16)                             // hide LA57: we boot with 4-level paging
            case 0xB, 0x1F:
                e.edx = vcpuID                                   // x2APIC ID
            default:
                break
            }
            return e
        }
    }

    // MARK: The baseline model

    /// Leaf 1 ECX: SSE3, SSSE3, CX16, SSE4.1, SSE4.2, x2APIC, POPCNT, TSC deadline, XSAVE, hypervisor.
    static let baselineLeaf1ECX: UInt32 = [0, 9, 13, 19, 20, 21, 23, 24, 26, 31].reduce(0) { $0 | 1 << $1 }
    /// Leaf 1 EDX: FPU … SSE2 (the x86-64 base, less VME: some KVM hosts lack it, QEMU's emulated
    /// EPYC among them, and a 64-bit guest has no use for it), and HTT (set for several vCPUs).
    static let baselineLeaf1EDX: UInt32 = ([0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26, 28] as [UInt32]).reduce(0) { $0 | 1 << $1 }
    /// Leaf 0x80000001: LAHF/SAHF in 64-bit mode (ECX); SYSCALL, NX, long mode (EDX).
    static let baselineExtECX: UInt32 = 1 << 0
    static let baselineExtEDX: UInt32 = 1 << 11 | 1 << 20 | 1 << 29

    /// Cuts `entries` (a host-model CPUID) down to the baseline model: the features above, XSAVE
    /// with x87 and SSE state only, no leaf 7 features, no vendor extensions beyond the ones above.
    /// Values that describe rather than offer (vendor, family, caches, address sizes, the KVM leaves)
    /// stay the host's.
    static func baseline(_ entries: [CPUIDEntry]) -> [CPUIDEntry] {
        entries.compactMap { original -> CPUIDEntry? in
            var e = original
            switch (e.function, e.index) {
            case (0x1, _):
                e.ecx &= baselineLeaf1ECX
                e.edx &= baselineLeaf1EDX
            case (0x7, 0):
                e.eax = 0; e.ebx = 0; e.ecx = 0; e.edx = 0
            case (0x7, _):
                return nil
            case (0xD, 0):
                e.eax = 0b11; e.edx = 0 // x87 and SSE
                e.ebx = 576; e.ecx = 576 // legacy region and header
            case (0xD, 1):
                e.eax = 0; e.ebx = 0; e.ecx = 0; e.edx = 0
            case (0xD, _):
                return nil
            case (0x8000_0001, _):
                e.ecx &= baselineExtECX
                e.edx &= baselineExtEDX
            case (0x8000_0007, _):
                e.edx = 0
            case (0x8000_0008, _):
                e.ebx = 0
            case (0x8000_000A, _), (0x8000_001F, _), (0x8000_0021, _):
                e.eax = 0; e.ebx = 0; e.ecx = 0; e.edx = 0
            default:
                break
            }
            return e
        }
    }

    /// The MSRs a baseline machine's snapshots carry (those of them this host's KVM has):
    /// architectural ones every x86-64 CPU has and KVM's own (kvmclock, async PF, steal time, PV EOI,
    /// poll control).
    static let baselineMSRs: Set<UInt32> = [
        0x10, 0x11, 0x12, 0x3B, 0x174, 0x175, 0x176, 0x17A, 0x17B, 0x1A0, 0x277, 0x6E0,
        0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084, 0xC000_0102,
        0x4B56_4D00, 0x4B56_4D01, 0x4B56_4D02, 0x4B56_4D03, 0x4B56_4D04, 0x4B56_4D05, 0x4B56_4D06, 0x4B56_4D07,
    ]
}
