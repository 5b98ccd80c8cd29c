// CKVM: the Linux KVM userspace API (linux/kvm.h) for Swift.
//
// Swift cannot import function-like macros such as KVM_RUN, so every ioctl number we use is
// exported as an `extern const unsigned long` named after the macro. Accessors give typed access
// to the unions inside `struct kvm_run` that Swift imports poorly.
#ifndef CKVM_H
#define CKVM_H

#include <linux/kvm.h>
#include <stdint.h>

// System ioctls (on /dev/kvm).
extern const unsigned long CKVM_GET_API_VERSION;
extern const unsigned long CKVM_CREATE_VM;
extern const unsigned long CKVM_CHECK_EXTENSION;
extern const unsigned long CKVM_GET_VCPU_MMAP_SIZE;
extern const unsigned long CKVM_GET_SUPPORTED_CPUID;
extern const unsigned long CKVM_GET_MSR_INDEX_LIST;

// VM ioctls.
extern const unsigned long CKVM_CREATE_VCPU;
extern const unsigned long CKVM_SET_USER_MEMORY_REGION;
extern const unsigned long CKVM_SET_TSS_ADDR;
extern const unsigned long CKVM_SET_IDENTITY_MAP_ADDR;
extern const unsigned long CKVM_CREATE_IRQCHIP;
extern const unsigned long CKVM_CREATE_PIT2;
extern const unsigned long CKVM_IRQ_LINE;
extern const unsigned long CKVM_IRQ_LINE_STATUS;

// vCPU ioctls.
extern const unsigned long CKVM_RUN;
extern const unsigned long CKVM_GET_REGS;
extern const unsigned long CKVM_SET_REGS;
extern const unsigned long CKVM_GET_SREGS;
extern const unsigned long CKVM_SET_SREGS;
extern const unsigned long CKVM_SET_CPUID2;
extern const unsigned long CKVM_SET_MSRS;
extern const unsigned long CKVM_GET_MSRS;
extern const unsigned long CKVM_SET_FPU;
extern const unsigned long CKVM_GET_LAPIC;
extern const unsigned long CKVM_SET_LAPIC;
extern const unsigned long CKVM_GET_TSC_KHZ;

// Capabilities we check.
extern const int CKVM_CAP_IRQCHIP;
extern const int CKVM_CAP_USER_MEMORY;
extern const int CKVM_CAP_SET_TSS_ADDR;
extern const int CKVM_CAP_EXT_CPUID;
extern const int CKVM_CAP_PIT2;
extern const int CKVM_CAP_IMMEDIATE_EXIT;
extern const int CKVM_CAP_NR_VCPUS;
extern const int CKVM_CAP_MAX_VCPUS;
extern const int CKVM_CAP_READONLY_MEM;
extern const unsigned int CKVM_MEM_READONLY;

// kvm_run accessors (the exit-reason union).
static inline struct kvm_run_io { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; }
ckvm_run_io(const struct kvm_run *run) {
    struct kvm_run_io io = { run->io.direction, run->io.size, run->io.port, run->io.count, run->io.data_offset };
    return io;
}
static inline uint64_t ckvm_run_mmio_addr(const struct kvm_run *run) { return run->mmio.phys_addr; }
static inline uint32_t ckvm_run_mmio_len(const struct kvm_run *run) { return run->mmio.len; }
static inline uint8_t ckvm_run_mmio_is_write(const struct kvm_run *run) { return run->mmio.is_write; }
static inline uint8_t *ckvm_run_mmio_data(struct kvm_run *run) { return run->mmio.data; }
static inline uint32_t ckvm_run_system_event_type(const struct kvm_run *run) { return run->system_event.type; }
static inline uint64_t ckvm_run_fail_entry_reason(const struct kvm_run *run) {
    return run->fail_entry.hardware_entry_failure_reason;
}
static inline uint32_t ckvm_run_fail_entry_cpu(const struct kvm_run *run) { return run->fail_entry.cpu; }
static inline uint32_t ckvm_run_internal_suberror(const struct kvm_run *run) { return run->internal.suberror; }
static inline uint32_t ckvm_run_internal_ndata(const struct kvm_run *run) { return run->internal.ndata; }
static inline uint64_t ckvm_run_internal_data(const struct kvm_run *run, uint32_t i) {
    return i < 16 ? run->internal.data[i] : 0;
}
static inline uint32_t ckvm_run_exception_nr(const struct kvm_run *run) { return run->ex.exception; }
static inline uint32_t ckvm_run_exception_error(const struct kvm_run *run) { return run->ex.error_code; }
static inline void ckvm_run_set_immediate_exit(struct kvm_run *run, uint8_t value) {
    __atomic_store_n(&run->immediate_exit, value, __ATOMIC_SEQ_CST);
}

// Sizes of the variable-length structures (header only).
static inline unsigned long ckvm_cpuid2_header_size(void) { return sizeof(struct kvm_cpuid2); }
static inline unsigned long ckvm_msrs_header_size(void) { return sizeof(struct kvm_msrs); }

#endif
