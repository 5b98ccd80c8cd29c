import CKVM
import Glibc
import VMMSys

/// Why KVM_RUN returned. Buffers point into the vCPU's kvm_run area and are valid until the next `run()`.
public enum VCPUExit {
    /// Port I/O: `count` repetitions of `size`-byte accesses; `data` holds `size * count` bytes.
    case io(port: UInt16, size: Int, isWrite: Bool, count: Int, data: UnsafeMutableRawBufferPointer)
    /// MMIO: `data` holds `len` bytes (filled by the VMM for reads).
    case mmio(address: UInt64, isWrite: Bool, data: UnsafeMutableRawBufferPointer)
    case hlt
    /// The guest triple-faulted (or the CPU was otherwise reset).
    case shutdown
    case systemEvent(KVMSystemEvent)
    case failEntry(reason: UInt64, cpu: UInt32)
    case internalError(suberror: UInt32, data: [UInt64])
    case exception(number: UInt32, errorCode: UInt32)
    /// KVM_RUN returned EINTR or KVM_EXIT_INTR: a kick from another thread.
    case interrupted
    /// Any other exit reason, reported by number.
    case unexpected(reason: UInt32)
}

/// A KVM_EXIT_SYSTEM_EVENT's type (linux/kvm.h KVM_SYSTEM_EVENT_*).
public enum KVMSystemEvent: Equatable, Sendable {
    /// KVM_SYSTEM_EVENT_SHUTDOWN: the guest asked for a power-off (e.g. PSCI SYSTEM_OFF).
    case shutdown
    /// KVM_SYSTEM_EVENT_RESET: the guest asked for a reset.
    case reset
    /// KVM_SYSTEM_EVENT_CRASH: the guest reported a crash.
    case crash
    /// Any other type (WAKEUP, SUSPEND, SEV_TERM...), by number.
    case other(UInt32)

    public init(type: UInt32) {
        switch type {
        case UInt32(KVM_SYSTEM_EVENT_SHUTDOWN): self = .shutdown
        case UInt32(KVM_SYSTEM_EVENT_RESET): self = .reset
        case UInt32(KVM_SYSTEM_EVENT_CRASH): self = .crash
        default: self = .other(type)
        }
    }
}

/// One vCPU: its fd and its kvm_run mapping.
public final class VCPU: @unchecked Sendable {
    public let id: UInt32
    let fd: OwnedFD
    let runArea: MemoryMapping
    /// The VM this vCPU belongs to (for the host's MSR list and XSAVE size when saving state).
    let vm: VirtualMachine

    init(id: UInt32, fd: consuming OwnedFD, run: consuming MemoryMapping, vm: VirtualMachine) {
        self.id = id
        self.fd = fd
        self.runArea = run
        self.vm = vm
    }

    private var kvmRun: UnsafeMutablePointer<kvm_run> {
        // SAFETY: the mapping is at least sizeof(kvm_run) (KVM_GET_VCPU_MMAP_SIZE) and lives as long as self.
        runArea.base.assumingMemoryBound(to: kvm_run.self)
    }

    /// Asks a running or about-to-run KVM_RUN to return immediately. Safe from any thread; pair it
    /// with a signal to the vCPU thread to interrupt a KVM_RUN already in progress.
    public func requestImmediateExit(_ value: Bool = true) {
        ckvm_run_set_immediate_exit(kvmRun, value ? 1 : 0)
    }

    /// Enters the guest until the next exit.
    public func run() throws(KVMError) -> VCPUExit {
        do {
            _ = try fd.ioctl(CKVM_RUN, value: 0, name: "KVM_RUN on vCPU \(id)")
        } catch {
            if error.errno == EINTR || error.errno == EAGAIN { return .interrupted }
            throw .ioctl(error)
        }
        return currentExit()
    }

    /// Decodes the exit KVM_RUN just reported in the kvm_run area.
    func currentExit() -> VCPUExit {
        let run = kvmRun
        switch Int32(run.pointee.exit_reason) {
        case KVM_EXIT_IO:
            let io = ckvm_run_io(run)
            let size = Int(io.size)
            let count = Int(io.count)
            let total = size * count
            let limit = runArea.size
            // A malformed offset from the kernel would be a host bug; refuse it rather than trust it.
            guard Int(io.data_offset) + total <= limit, total > 0 else { return .unexpected(reason: UInt32(KVM_EXIT_IO)) }
            let data = UnsafeMutableRawBufferPointer(start: runArea.base + Int(io.data_offset), count: total)
            return .io(port: io.port, size: size, isWrite: io.direction == KVM_EXIT_IO_OUT, count: count, data: data)
        case KVM_EXIT_MMIO:
            let len = min(Int(ckvm_run_mmio_len(run)), 8)
            let data = UnsafeMutableRawBufferPointer(start: ckvm_run_mmio_data(run), count: len)
            return .mmio(address: ckvm_run_mmio_addr(run), isWrite: ckvm_run_mmio_is_write(run) != 0, data: data)
        case KVM_EXIT_HLT:
            return .hlt
        case KVM_EXIT_SHUTDOWN:
            return .shutdown
        case KVM_EXIT_SYSTEM_EVENT:
            return .systemEvent(KVMSystemEvent(type: ckvm_run_system_event_type(run)))
        case KVM_EXIT_FAIL_ENTRY:
            return .failEntry(reason: ckvm_run_fail_entry_reason(run), cpu: ckvm_run_fail_entry_cpu(run))
        case KVM_EXIT_INTERNAL_ERROR:
            let n = min(ckvm_run_internal_ndata(run), 16)
            return .internalError(suberror: ckvm_run_internal_suberror(run), data: (0..<n).map { ckvm_run_internal_data(run, $0) })
        case KVM_EXIT_EXCEPTION:
            return .exception(number: ckvm_run_exception_nr(run), errorCode: ckvm_run_exception_error(run))
        case KVM_EXIT_INTR:
            return .interrupted
        default:
            return .unexpected(reason: run.pointee.exit_reason)
        }
    }

    // MARK: Register state

    public func getRegisters() throws(KVMError) -> kvm_regs {
        var regs = kvm_regs()
        do { _ = try fd.ioctl(CKVM_GET_REGS, &regs, name: "KVM_GET_REGS") } catch { throw .ioctl(error) }
        return regs
    }

    public func setRegisters(_ regs: kvm_regs) throws(KVMError) {
        var r = regs
        do { _ = try fd.ioctl(CKVM_SET_REGS, &r, name: "KVM_SET_REGS") } catch { throw .ioctl(error) }
    }

    public func getSpecialRegisters() throws(KVMError) -> kvm_sregs {
        var sregs = kvm_sregs()
        do { _ = try fd.ioctl(CKVM_GET_SREGS, &sregs, name: "KVM_GET_SREGS") } catch { throw .ioctl(error) }
        return sregs
    }

    public func setSpecialRegisters(_ sregs: kvm_sregs) throws(KVMError) {
        var s = sregs
        do { _ = try fd.ioctl(CKVM_SET_SREGS, &s, name: "KVM_SET_SREGS") } catch { throw .ioctl(error) }
    }

    public func setFPU(_ fpu: kvm_fpu) throws(KVMError) {
        var f = fpu
        do { _ = try fd.ioctl(CKVM_SET_FPU, &f, name: "KVM_SET_FPU") } catch { throw .ioctl(error) }
    }

    /// The vCPU's TSC frequency in kHz (KVM_GET_TSC_KHZ).
    public func tscKHz() throws(KVMError) -> UInt32 {
        do { return UInt32(try fd.ioctl(CKVM_GET_TSC_KHZ, value: 0, name: "KVM_GET_TSC_KHZ")) } catch { throw .ioctl(error) }
    }

    /// Runs the vCPU's TSC at `khz` (KVM_SET_TSC_KHZ): needs TSC scaling (KVM_CAP_TSC_CONTROL)
    /// unless `khz` is within KVM's tolerance of the host's rate.
    public func setTSCKHz(_ khz: UInt32) throws(KVMError) {
        do { _ = try fd.ioctl(CKVM_SET_TSC_KHZ, value: UInt(khz), name: "KVM_SET_TSC_KHZ") } catch { throw .ioctl(error) }
    }

    public func getLAPIC() throws(KVMError) -> kvm_lapic_state {
        var state = kvm_lapic_state()
        do { _ = try fd.ioctl(CKVM_GET_LAPIC, &state, name: "KVM_GET_LAPIC") } catch { throw .ioctl(error) }
        return state
    }

    public func setLAPIC(_ state: kvm_lapic_state) throws(KVMError) {
        var s = state
        do { _ = try fd.ioctl(CKVM_SET_LAPIC, &s, name: "KVM_SET_LAPIC") } catch { throw .ioctl(error) }
    }

    public func setCPUID(_ entries: [CPUIDEntry]) throws(KVMError) {
        let bytes = Int(ckvm_cpuid2_header_size()) + entries.count * MemoryLayout<kvm_cpuid_entry2>.stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        raw.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent = UInt32(entries.count)
        // SAFETY: the entry array follows the header inside the buffer sized for `entries.count` entries.
        let array = (raw + Int(ckvm_cpuid2_header_size())).assumingMemoryBound(to: kvm_cpuid_entry2.self)
        for (i, entry) in entries.enumerated() { array[i] = entry.raw }
        do { _ = try fd.ioctl(CKVM_SET_CPUID2, raw, name: "KVM_SET_CPUID2") } catch { throw .ioctl(error) }
    }

    /// Sets model-specific registers; throws if KVM accepted fewer than all of them.
    public func setMSRs(_ msrs: [(index: UInt32, value: UInt64)]) throws(KVMError) {
        let bytes = Int(ckvm_msrs_header_size()) + msrs.count * MemoryLayout<kvm_msr_entry>.stride
        let raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: bytes)
        raw.assumingMemoryBound(to: kvm_msrs.self).pointee.nmsrs = UInt32(msrs.count)
        // SAFETY: the entry array follows the header inside the buffer sized for `msrs.count` entries.
        let array = (raw + Int(ckvm_msrs_header_size())).assumingMemoryBound(to: kvm_msr_entry.self)
        for (i, msr) in msrs.enumerated() {
            array[i] = kvm_msr_entry()
            array[i].index = msr.index
            array[i].data = msr.value
        }
        let set: Int32
        do { set = try fd.ioctl(CKVM_SET_MSRS, raw, name: "KVM_SET_MSRS") } catch { throw .ioctl(error) }
        if Int(set) != msrs.count {
            let failed = msrs[Int(set)].index
            throw .ioctl(SysError("KVM_SET_MSRS (MSR 0x\(String(failed, radix: 16)) refused)", errno: EINVAL))
        }
    }

    /// A human-readable register dump for failure reports.
    public func registerDump() -> String {
        guard let r = try? getRegisters(), let s = try? getSpecialRegisters() else { return "(registers unavailable)" }
        func h(_ v: UInt64) -> String {
            let s = String(v, radix: 16)
            return "0x" + String(repeating: "0", count: max(0, 16 - s.count)) + s
        }
        return """
        vCPU \(id): rip=\(h(r.rip)) rsp=\(h(r.rsp)) rflags=\(h(r.rflags))
          rax=\(h(r.rax)) rbx=\(h(r.rbx)) rcx=\(h(r.rcx)) rdx=\(h(r.rdx))
          rsi=\(h(r.rsi)) rdi=\(h(r.rdi)) rbp=\(h(r.rbp)) r8=\(h(r.r8))
          cr0=\(h(s.cr0)) cr2=\(h(s.cr2)) cr3=\(h(s.cr3)) cr4=\(h(s.cr4)) efer=\(h(s.efer))
          cs=\(String(s.cs.selector, radix: 16)) base=\(h(s.cs.base)) l=\(s.cs.l) db=\(s.cs.db)
        """
    }
}
