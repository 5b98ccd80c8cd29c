import CKVM
import Glibc
import VMMSys

/// The /dev/kvm system handle: API version, capabilities, supported CPUID, VM creation.
public final class KVMSystem: @unchecked Sendable {
    let fd: OwnedFD
    public let path: String

    public init(path: String = "/dev/kvm") throws(KVMError) {
        self.path = path
        do {
            fd = try OwnedFD.open(path, flags: O_RDWR)
        } catch {
            throw .deviceMissing(path: path, error)
        }
        let version: Int32
        do { version = try fd.ioctl(CKVM_GET_API_VERSION, value: 0, name: "KVM_GET_API_VERSION") } catch { throw .ioctl(error) }
        guard version == KVM_API_VERSION else { throw .apiVersion(version) }
    }

    /// Returns the value KVM_CHECK_EXTENSION reports for `capability` (0 = absent).
    public func check(_ capability: Int32) -> Int32 {
        (try? fd.ioctl(CKVM_CHECK_EXTENSION, value: UInt(capability), name: "KVM_CHECK_EXTENSION")) ?? 0
    }

    /// Throws when any capability swiftvmm relies on is missing.
    public func requireCapabilities() throws(KVMError) {
        let needed: [(Int32, String)] = [
            (CKVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"),
            (CKVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
            (CKVM_CAP_SET_TSS_ADDR, "KVM_CAP_SET_TSS_ADDR"),
            (CKVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"),
            (CKVM_CAP_PIT2, "KVM_CAP_PIT2"),
            (CKVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"),
        ]
        for (cap, name) in needed where check(cap) <= 0 {
            throw .missingCapability(name)
        }
    }

    /// The largest vCPU count the host allows (KVM_CAP_MAX_VCPUS, falling back to NR_VCPUS, then 4).
    public var maxVCPUs: Int {
        let max = check(CKVM_CAP_MAX_VCPUS)
        if max > 0 { return Int(max) }
        let nr = check(CKVM_CAP_NR_VCPUS)
        return nr > 0 ? Int(nr) : 4
    }

    public func vcpuMmapSize() throws(KVMError) -> Int {
        do { return Int(try fd.ioctl(CKVM_GET_VCPU_MMAP_SIZE, value: 0, name: "KVM_GET_VCPU_MMAP_SIZE")) } catch { throw .ioctl(error) }
    }

    /// The CPUID entries KVM can offer a guest (KVM_GET_SUPPORTED_CPUID).
    public func supportedCPUID() throws(KVMError) -> [CPUIDEntry] {
        var capacity = 128
        while true {
            let bytes = Int(ckvm_cpuid2_header_size()) + capacity * MemoryLayout<kvm_cpuid_entry2>.stride
            let raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
            defer { raw.deallocate() }
            raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
            let header = raw.assumingMemoryBound(to: kvm_cpuid2.self)
            header.pointee.nent = UInt32(capacity)
            do {
                _ = try fd.ioctl(CKVM_GET_SUPPORTED_CPUID, raw, name: "KVM_GET_SUPPORTED_CPUID")
            } catch {
                if error.errno == E2BIG && capacity < 4096 { capacity *= 2; continue }
                throw .ioctl(error)
            }
            let count = Int(header.pointee.nent)
            // SAFETY: the entries follow the header inside the buffer allocated above for `capacity` entries.
            let entries = (raw + Int(ckvm_cpuid2_header_size())).assumingMemoryBound(to: kvm_cpuid_entry2.self)
            return (0..<min(count, capacity)).map { CPUIDEntry(entries[$0]) }
        }
    }

    /// Creates a VM.
    public func createVM() throws(KVMError) -> VirtualMachine {
        let vmfd: Int32
        do { vmfd = try fd.ioctl(CKVM_CREATE_VM, value: 0, name: "KVM_CREATE_VM") } catch { throw .ioctl(error) }
        return VirtualMachine(fd: OwnedFD(adopting: vmfd), system: self)
    }
}

/// One CPUID leaf/subleaf as KVM reports or accepts it.
public struct CPUIDEntry: Sendable, Equatable, Codable {
    public var function: UInt32
    public var index: UInt32
    public var flags: UInt32
    public var eax: UInt32
    public var ebx: UInt32
    public var ecx: UInt32
    public var edx: UInt32

    public init(function: UInt32, index: UInt32 = 0, flags: UInt32 = 0, eax: UInt32 = 0, ebx: UInt32 = 0, ecx: UInt32 = 0, edx: UInt32 = 0) {
        self.function = function
        self.index = index
        self.flags = flags
        self.eax = eax
        self.ebx = ebx
        self.ecx = ecx
        self.edx = edx
    }

    init(_ e: kvm_cpuid_entry2) {
        self.init(function: e.function, index: e.index, flags: e.flags, eax: e.eax, ebx: e.ebx, ecx: e.ecx, edx: e.edx)
    }

    var raw: kvm_cpuid_entry2 {
        var e = kvm_cpuid_entry2()
        e.function = function
        e.index = index
        e.flags = flags
        e.eax = eax
        e.ebx = ebx
        e.ecx = ecx
        e.edx = edx
        return e
    }
}
