import Glibc
import Machine
import Testing
import TestSupport

/// The condition that gates every suite needing /dev/kvm must be able to say "unavailable".
@Suite("the /dev/kvm test condition")
struct KVMAvailabilityTests {
    @Test("a KVM device path that does not exist is unavailable")
    func missingPath() {
        let path = "/nonexistent-\(getpid())/kvm"
        #expect(access(path, F_OK) != 0)
        #expect(!kvmAvailable(at: path))
    }

    @Test("a path that cannot be opened read-write (a directory) is unavailable")
    func directory() {
        #expect(!kvmAvailable(at: "/"))
    }

    @Test("it agrees with the host probe on this machine's /dev/kvm")
    func agreesWithProbe() {
        let usable: Bool
        switch HostVirtualization.probe() {
        case .none: usable = false
        case .hardware, .emulated: usable = true
        }
        #expect(kvmAvailable() == usable)
    }
}
