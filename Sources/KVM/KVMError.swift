import VMMSys

/// Errors from the KVM layer, each saying what failed and what to do about it.
public enum KVMError: Error, CustomStringConvertible, Sendable {
    case deviceMissing(path: String, SysError)
    case apiVersion(Int32)
    case missingCapability(String)
    case ioctl(SysError)
    case tooManyVCPUs(requested: Int, max: Int)

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
        }
    }
}
