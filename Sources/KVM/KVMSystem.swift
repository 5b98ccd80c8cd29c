import CKVM
import Glibc
import Synchronization
import VMMSys

/// The /dev/kvm system handle: API version, capabilities, supported CPUID, VM creation.
public final class KVMSystem: @unchecked Sendable {
    let fd: OwnedFD
    public let path: String
    /// KVM_GET_MSR_INDEX_LIST, read once.
    private let msrIndexCache = Mutex<[UInt32]?>(nil)

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

    /// Whether the in-kernel local APIC implements the TSC-deadline timer mode. KVM leaves the CPUID
    /// bit announcing it (leaf 1 ECX bit 24) out of KVM_GET_SUPPORTED_CPUID: userspace sets it.
    public var hasTSCDeadlineTimer: Bool { check(CKVM_CAP_TSC_DEADLINE_TIMER) > 0 }

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

    /// Throws when a capability that saving or restoring vCPU and VM state relies on is missing
    /// (checked by `VCPU.saveState()` / `restoreState(_:)` and the VM's, not at machine start).
    public func requireStateCapabilities() throws(KVMError) {
        let needed: [(Int32, String)] = [
            (CKVM_CAP_XSAVE, "KVM_CAP_XSAVE"),
            (CKVM_CAP_XCRS, "KVM_CAP_XCRS"),
            (CKVM_CAP_VCPU_EVENTS, "KVM_CAP_VCPU_EVENTS"),
            (CKVM_CAP_DEBUGREGS, "KVM_CAP_DEBUGREGS"),
            (CKVM_CAP_MP_STATE, "KVM_CAP_MP_STATE"),
            (CKVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"),
            (CKVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"),
            (CKVM_CAP_PIT_STATE2, "KVM_CAP_PIT_STATE2"),
            (CKVM_CAP_ADJUST_CLOCK, "KVM_CAP_ADJUST_CLOCK"),
        ]
        for (cap, name) in needed where check(cap) <= 0 {
            throw .missingCapability("\(name) (needed to save and restore VM state)")
        }
    }

    /// The MSRs KVM saves and restores for a vCPU (KVM_GET_MSR_INDEX_LIST): the architectural ones
    /// the host supports plus those KVM emulates (TSC, TSC_DEADLINE, kvmclock 0x4b564d00…). Read
    /// once and cached.
    public func msrIndexList() throws(KVMError) -> [UInt32] {
        if let cached = msrIndexCache.withLock({ $0 }) { return cached }
        let header = Int(ckvm_msr_list_header_size())
        var capacity = 0
        var list: [UInt32] = []
        for _ in 0..<4 {
            // First with room for nothing: KVM answers E2BIG and writes the count it needs.
            let bytes = header + capacity * MemoryLayout<UInt32>.stride
            let raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
            defer { raw.deallocate() }
            raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
            let msrList = raw.assumingMemoryBound(to: kvm_msr_list.self)
            msrList.pointee.nmsrs = UInt32(capacity)
            do {
                _ = try fd.ioctl(CKVM_GET_MSR_INDEX_LIST, raw, name: "KVM_GET_MSR_INDEX_LIST")
            } catch {
                let needed = Int(msrList.pointee.nmsrs)
                if error.errno == E2BIG && needed > capacity && needed <= 1 << 16 { capacity = needed; continue }
                throw .ioctl(error)
            }
            let count = min(Int(msrList.pointee.nmsrs), capacity)
            // SAFETY: the indices follow the header inside the buffer sized for `capacity` of them.
            let indices = (raw + header).assumingMemoryBound(to: UInt32.self)
            list = (0..<count).map { indices[$0] }
            msrIndexCache.withLock { $0 = list }
            return list
        }
        throw .ioctl(SysError("KVM_GET_MSR_INDEX_LIST (the list kept growing)", errno: E2BIG))
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
        try readCPUID2(fd, request: CKVM_GET_SUPPORTED_CPUID, name: "KVM_GET_SUPPORTED_CPUID")
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

/// Reads a `struct kvm_cpuid2` list through `request` (KVM_GET_SUPPORTED_CPUID on /dev/kvm,
/// KVM_GET_CPUID2 on a vCPU), growing the buffer while KVM answers E2BIG.
func readCPUID2(_ fd: borrowing OwnedFD, request: UInt, name: String) throws(KVMError) -> [CPUIDEntry] {
    var capacity = 128
    while true {
        let bytes = Int(ckvm_cpuid2_header_size()) + capacity * MemoryLayout<kvm_cpuid_entry2>.stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        let header = raw.assumingMemoryBound(to: kvm_cpuid2.self)
        header.pointee.nent = UInt32(capacity)
        do {
            _ = try fd.ioctl(request, raw, name: name)
        } catch {
            if error.errno == E2BIG && capacity < 4096 { capacity *= 2; continue }
            throw .ioctl(error)
        }
        let count = min(Int(header.pointee.nent), capacity)
        // SAFETY: the entries follow the header inside the buffer allocated for `capacity` entries.
        let entries = (raw + Int(ckvm_cpuid2_header_size())).assumingMemoryBound(to: kvm_cpuid_entry2.self)
        return (0..<count).map { CPUIDEntry(entries[$0]) }
    }
}
