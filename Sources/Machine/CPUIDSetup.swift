import KVM

/// Adjusts the host's supported CPUID for one vCPU.
enum CPUIDSetup {
    static func entries(from supported: [CPUIDEntry], vcpuID: UInt32, vcpuCount: Int) -> [CPUIDEntry] {
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
