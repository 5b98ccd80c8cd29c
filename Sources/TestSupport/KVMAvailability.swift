import Glibc
import VMMSys

/// Whether the KVM device at `path` can be used by this process: it opens read-write (what
/// creating a VM needs). The condition of every test suite that needs /dev/kvm:
/// `.enabled(if: kvmAvailable(), "needs /dev/kvm")`.
public func kvmAvailable(at path: String = "/dev/kvm") -> Bool {
    do {
        _ = try OwnedFD.open(path, flags: O_RDWR)
        return true
    } catch {
        return false
    }
}
