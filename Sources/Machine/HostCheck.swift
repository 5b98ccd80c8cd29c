import Glibc
import VMMSys

/// What kind of KVM this host offers.
public enum HostVirtualization: Equatable, Sendable {
    /// /dev/kvm backed by VMX or SVM: guests run at native speed.
    case hardware
    /// kvm_pvm (a paravirtual nested KVM) or another KVM without VMX/SVM: guest code is emulated and
    /// a Linux guest takes many minutes to boot.
    case emulated(reason: String)
    /// No usable /dev/kvm at all.
    case none(reason: String)

    /// Inspects /dev/kvm, /proc/cpuinfo and /sys/module.
    public static func probe(kvmPath: String = "/dev/kvm") -> HostVirtualization {
        if !isAccessible(kvmPath) {
            return .none(reason: "\(kvmPath) does not exist (is the kvm module loaded?)")
        }
        if !isAccessible(kvmPath, R_OK | W_OK) {
            return .none(reason: "\(kvmPath) is not readable and writable by this user")
        }
        if isAccessible("/sys/module/kvm_pvm") {
            return .emulated(reason: "the kvm_pvm module (paravirtual nested KVM) provides \(kvmPath)")
        }
        let flags = cpuFlags()
        if !flags.contains("vmx") && !flags.contains("svm") {
            return .emulated(reason: "the CPU has no vmx or svm flag in /proc/cpuinfo")
        }
        return .hardware
    }

    static func cpuFlags() -> Set<Substring> {
        guard let f = fopen("/proc/cpuinfo", "r") else { return [] }
        defer { fclose(f) }
        var line: UnsafeMutablePointer<CChar>?
        var cap = 0
        defer { free(line) }
        while getline(&line, &cap, f) > 0 {
            guard let line else { break }
            let s = String(cString: line)
            if s.hasPrefix("flags") {
                let parts = s.split(separator: ":", maxSplits: 1)
                if parts.count == 2 { return Set(parts[1].split(whereSeparator: { $0 == " " || $0 == "\n" })) }
            }
        }
        return []
    }
}
