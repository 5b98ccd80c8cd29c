import VMMSys

/// Errors from the KVM layer, each saying what failed and what to do about it.
public enum KVMError: Error, CustomStringConvertible, Sendable {
    case deviceMissing(path: String, SysError)
    case apiVersion(Int32)
    case missingCapability(String)
    case ioctl(SysError)
    case tooManyVCPUs(requested: Int, max: Int)
    /// KVM_SET_MSRS refused one MSR while restoring a vCPU.
    case msrRefused(index: UInt32, value: UInt64, vcpu: UInt32)
    /// Saved state that this host's KVM cannot take, or a vCPU not in a state to be saved.
    case invalidState(String)
    /// Saved state from a host whose CPU offers what this one cannot (`VCPUState.fitted`).
    case incompatibleHost(String)

    public var description: String {
        switch self {
        case .deviceMissing(let path, let error):
            return "cannot open \(path): \(error). KVM is not available on this host (is the kvm module loaded and are you allowed to open \(path)?)"
        case .apiVersion(let v):
            return "unsupported KVM API version \(v) (expected 12)"
        case .missingCapability(let name):
            return "the host KVM lacks the capability \(name), which swiftvmm needs"
        case .ioctl(let error):
            return "KVM: \(error)"
        case .tooManyVCPUs(let requested, let max):
            return "\(requested) vCPUs requested but this host's KVM supports at most \(max)"
        case .msrRefused(let index, let value, let vcpu):
            return "KVM refused to restore MSR 0x\(String(index, radix: 16)) (value 0x\(String(value, radix: 16))) on vCPU \(vcpu): this host's KVM does not accept the saved value"
        case .invalidState(let reason):
            return "KVM state: \(reason)"
        case .incompatibleHost(let reason):
            return "this host cannot run the saved CPU state: \(reason)"
        }
    }
}
