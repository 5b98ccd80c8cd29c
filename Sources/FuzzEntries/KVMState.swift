import KVM
import WireFormat

extension Fuzz {
    /// Two made-up hosts: x87/SSE/AVX without PKRU (AVX at the standard offset), and one with AVX
    /// elsewhere and a larger area.
    static let hosts = [
        HostCPU(supportedCPUID: [CPUIDEntry(function: 0xD, index: 0, eax: 0x7, ebx: 832, ecx: 832),
                                 CPUIDEntry(function: 0xD, index: 2, eax: 256, ebx: 576)],
                msrIndices: [0x10, 0x174, 0x175, 0x176, 0x277], xsaveSize: 4096),
        HostCPU(supportedCPUID: [CPUIDEntry(function: 0xD, index: 0, eax: 0x207, ebx: 2700, ecx: 2700),
                                 CPUIDEntry(function: 0xD, index: 2, eax: 256, ebx: 1024),
                                 CPUIDEntry(function: 0xD, index: 9, eax: 8, ebx: 2688)],
                msrIndices: [0x10], xsaveSize: 8192),
    ]
    static let kvmReference = [CPUIDEntry(function: 0x1, ecx: 0xFFFF_FFFF, edx: 0xFFFF_FFFF),
                               CPUIDEntry(function: 0x7, index: 0, ebx: 0xFFFF_FFFF, ecx: 0xFFFF_FFFF, edx: 0xFFFF_FFFF)]

    /// `fuzz-kvm-state`: arbitrary bytes as a snapshot's `vcpu.N` or `vm` payload (the first byte picks
    /// which, and the layout version). Decoding must either succeed or throw an `LEDecodeError` naming
    /// the field; a decoded state must encode to bytes that decode to the same state, and fitting it to
    /// a host (as a restore does) must refuse it or adapt it, never trap.
    public static func kvmState(_ data: [UInt8]) {
        guard let selector = data.first else { return }
        let bytes = Array(data.dropFirst())
        let version = UInt16(selector >> 1 & 3) // 0 (refused), 1 (current), 2 and 3 (newer: trailing bytes ignored)
        var r = LEReader(bytes)
        if selector & 1 == 0 {
            guard let state = try? VCPUState(from: &r, version: version) else { return }
            var w = LEWriter()
            state.encode(to: &w)
            var again = LEReader(w.bytes)
            precondition((try? VCPUState(from: &again, version: VCPUState.version)) == state, "vCPU state does not round-trip")
            // Fitting the (hostile) state to a host: refused or adapted, never a trap; an adapted state
            // has the host's XSAVE size and fits again unchanged.
            for host in hosts {
                guard let (fitted, _) = try? state.fitted(to: host, reference: kvmReference, vcpu: 0) else { continue }
                precondition(fitted.xsave.count == host.xsaveSize, "fitted XSAVE area of the wrong size")
                precondition((try? fitted.fitted(to: host, reference: kvmReference, vcpu: 0))?.state == fitted, "fitting is not idempotent")
            }
        } else {
            guard let state = try? VMState(from: &r, version: version) else { return }
            var w = LEWriter()
            state.encode(to: &w)
            var again = LEReader(w.bytes)
            precondition((try? VMState(from: &again, version: VMState.version)) == state, "VM state does not round-trip")
        }
    }
}
