import KVM

/// Adjusts the host's supported CPUID for one vCPU.
enum CPUIDSetup {
    /// The hypervisor timing leaf (used by VMware and QEMU's `vmware-cpuid-freq`): EAX = TSC kHz,
    /// EBX = local APIC timer kHz (KVM's is 1 GHz). Our firmware reads it to report its boot time.
    static let timingLeaf: UInt32 = 0x4000_0010

    static func entries(from supported: [CPUIDEntry], vcpuID: UInt32, vcpuCount: Int, tscKHz: UInt32? = nil) -> [CPUIDEntry] {
        var result = adjusted(supported, vcpuID: vcpuID, vcpuCount: vcpuCount)
        if let tscKHz, tscKHz > 0, let base = result.firstIndex(where: { $0.function == 0x4000_0000 }) {
            result[base].eax = max(result[base].eax, timingLeaf)
            result.removeAll { $0.function == timingLeaf }
            result.append(CPUIDEntry(function: timingLeaf, eax: tscKHz, ebx: 1_000_000))
        }
        return result
    }

    private static func adjusted(_ supported: [CPUIDEntry], vcpuID: UInt32, vcpuCount: Int) -> [CPUIDEntry] {
        supported.map { original in
            var e = original
            switch e.function {
            case 0x1:
                e.ecx |= 1 << 31                               // hypervisor present
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
}
