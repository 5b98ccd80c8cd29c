import CKVM
import Glibc
import VMMSys

/// A KVM virtual machine (the VM fd).
public final class VirtualMachine: @unchecked Sendable {
    let fd: OwnedFD
    public let system: KVMSystem
    private var nextSlot: UInt32 = 0

    init(fd: consuming OwnedFD, system: KVMSystem) {
        self.fd = fd
        self.system = system
    }

    /// Registers host memory at `hostAddress` as guest-physical memory at `guestAddress`. A read-only
    /// region (a ROM) traps guest writes as MMIO exits.
    public func setUserMemoryRegion(guestAddress: UInt64, size: UInt64, hostAddress: UnsafeMutableRawPointer,
                                    readOnly: Bool = false) throws(KVMError) {
        var region = kvm_userspace_memory_region(
            slot: nextSlot, flags: readOnly ? CKVM_MEM_READONLY : 0, guest_phys_addr: guestAddress, memory_size: size,
            userspace_addr: UInt64(UInt(bitPattern: hostAddress)))
        do {
            _ = try fd.ioctl(CKVM_SET_USER_MEMORY_REGION, &region, name: "KVM_SET_USER_MEMORY_REGION")
        } catch { throw .ioctl(error) }
        nextSlot += 1
    }

    public func setTSSAddress(_ address: UInt64) throws(KVMError) {
        do { _ = try fd.ioctl(CKVM_SET_TSS_ADDR, value: UInt(address), name: "KVM_SET_TSS_ADDR") } catch { throw .ioctl(error) }
    }

    public func setIdentityMapAddress(_ address: UInt64) throws(KVMError) {
        var a = address
        do { _ = try fd.ioctl(CKVM_SET_IDENTITY_MAP_ADDR, &a, name: "KVM_SET_IDENTITY_MAP_ADDR") } catch { throw .ioctl(error) }
    }

    /// Creates the in-kernel PIC pair, IOAPIC and per-vCPU local APICs.
    public func createIRQChip() throws(KVMError) {
        do { _ = try fd.ioctl(CKVM_CREATE_IRQCHIP, value: 0, name: "KVM_CREATE_IRQCHIP") } catch { throw .ioctl(error) }
    }

    /// Creates the in-kernel i8254 PIT.
    public func createPIT2() throws(KVMError) {
        var config = kvm_pit_config()
        do { _ = try fd.ioctl(CKVM_CREATE_PIT2, &config, name: "KVM_CREATE_PIT2") } catch { throw .ioctl(error) }
    }

    /// Sets the level of interrupt line `gsi` on the in-kernel irqchip. Safe from any thread.
    public func setIRQLine(_ gsi: UInt32, level: Bool) throws(KVMError) {
        var irq = kvm_irq_level()
        irq.irq = gsi
        irq.level = level ? 1 : 0
        do { _ = try fd.ioctl(CKVM_IRQ_LINE, &irq, name: "KVM_IRQ_LINE") } catch { throw .ioctl(error) }
    }

    /// Has KVM signal `event` when the guest writes `length` bytes at MMIO `address` (any value),
    /// instead of exiting to userspace: the write costs the guest no exit of ours.
    public func addIOEventFD(_ event: borrowing EventFD, mmio address: UInt64, length: UInt32) throws(KVMError) {
        var req = kvm_ioeventfd()
        req.addr = address
        req.len = length
        req.fd = event.fd.rawValue
        do { _ = try fd.ioctl(CKVM_IOEVENTFD, &req, name: "KVM_IOEVENTFD") } catch { throw .ioctl(error) }
    }

    /// Has a signal of `event` raise interrupt `gsi` (an edge: the line goes up and down again).
    public func addIRQFD(_ event: borrowing EventFD, gsi: UInt32) throws(KVMError) {
        var req = kvm_irqfd()
        req.fd = UInt32(bitPattern: event.fd.rawValue)
        req.gsi = gsi
        do { _ = try fd.ioctl(CKVM_IRQFD, &req, name: "KVM_IRQFD") } catch { throw .ioctl(error) }
    }

    /// Creates vCPU `id` and maps its kvm_run area.
    public func createVCPU(id: UInt32) throws(KVMError) -> VCPU {
        let vcpufd: Int32
        do { vcpufd = try fd.ioctl(CKVM_CREATE_VCPU, value: UInt(id), name: "KVM_CREATE_VCPU \(id)") } catch { throw .ioctl(error) }
        let owned = OwnedFD(adopting: vcpufd)
        let size = try system.vcpuMmapSize()
        let mapping: MemoryMapping
        do { mapping = try MemoryMapping.shared(fd: owned, size: size) } catch { throw .ioctl(error) }
        return VCPU(id: id, fd: owned, run: mapping, vm: self)
    }
}
