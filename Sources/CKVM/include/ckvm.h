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
extern const unsigned long CKVM_IOEVENTFD;
extern const unsigned long CKVM_IRQFD;
extern const unsigned long CKVM_GET_IRQCHIP;
extern const unsigned long CKVM_SET_IRQCHIP;
extern const unsigned long CKVM_GET_PIT2;
extern const unsigned long CKVM_SET_PIT2;
extern const unsigned long CKVM_GET_CLOCK;
extern const unsigned long CKVM_SET_CLOCK;

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
extern const unsigned long CKVM_GET_FPU;
extern const unsigned long CKVM_GET_CPUID2;
extern const unsigned long CKVM_GET_XSAVE;
extern const unsigned long CKVM_GET_XSAVE2;
extern const unsigned long CKVM_SET_XSAVE;
extern const unsigned long CKVM_GET_XCRS;
extern const unsigned long CKVM_SET_XCRS;
extern const unsigned long CKVM_GET_VCPU_EVENTS;
extern const unsigned long CKVM_SET_VCPU_EVENTS;
extern const unsigned long CKVM_GET_MP_STATE;
extern const unsigned long CKVM_SET_MP_STATE;
extern const unsigned long CKVM_GET_DEBUGREGS;
extern const unsigned long CKVM_SET_DEBUGREGS;
extern const unsigned long CKVM_GET_LAPIC;
extern const unsigned long CKVM_SET_LAPIC;
extern const unsigned long CKVM_GET_TSC_KHZ;
extern const unsigned long CKVM_SET_TSC_KHZ;

// Capabilities we check.
extern const int CKVM_CAP_IRQCHIP;
extern const int CKVM_CAP_USER_MEMORY;
extern const int CKVM_CAP_SET_TSS_ADDR;
extern const int CKVM_CAP_EXT_CPUID;
extern const int CKVM_CAP_PIT2;
extern const int CKVM_CAP_IMMEDIATE_EXIT;
extern const int CKVM_CAP_NR_VCPUS;
extern const int CKVM_CAP_MAX_VCPUS;
extern const int CKVM_CAP_TSC_DEADLINE_TIMER;
extern const int CKVM_CAP_READONLY_MEM;
extern const int CKVM_CAP_XSAVE;
extern const int CKVM_CAP_XSAVE2;       // KVM_CHECK_EXTENSION on the VM fd: the XSAVE buffer size
extern const int CKVM_CAP_XCRS;
extern const int CKVM_CAP_VCPU_EVENTS;
extern const int CKVM_CAP_DEBUGREGS;
extern const int CKVM_CAP_MP_STATE;
extern const int CKVM_CAP_IOEVENTFD;
extern const int CKVM_CAP_IRQFD;
extern const int CKVM_CAP_PIT_STATE2;
extern const int CKVM_CAP_ADJUST_CLOCK;
extern const int CKVM_CAP_TSC_CONTROL;   // KVM_SET_TSC_KHZ can run a vCPU's TSC at another rate (TSC scaling)
extern const int CKVM_CAP_CHECK_EXTENSION_VM;
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
static inline unsigned long ckvm_msr_list_header_size(void) { return sizeof(struct kvm_msr_list); }
// The fixed part of struct kvm_xsave (KVM_GET_XSAVE); KVM_GET_XSAVE2 may use a larger buffer.
static inline unsigned long ckvm_xsave_size(void) { return sizeof(struct kvm_xsave); }
static inline unsigned long ckvm_lapic_size(void) { return sizeof(((struct kvm_lapic_state *)0)->regs); }

// Fixed-size arrays inside state structures, which Swift imports as tuples: indexed accessors that
// check the bound (an out-of-range index reads 0 and writes nothing).
static inline uint64_t ckvm_sregs_interrupt_bitmap(const struct kvm_sregs *s, unsigned i) {
    return i < 4 ? s->interrupt_bitmap[i] : 0;
}
static inline void ckvm_sregs_set_interrupt_bitmap(struct kvm_sregs *s, unsigned i, uint64_t v) {
    if (i < 4) s->interrupt_bitmap[i] = v;
}
static inline uint64_t ckvm_debugregs_db(const struct kvm_debugregs *d, unsigned i) { return i < 4 ? d->db[i] : 0; }
static inline void ckvm_debugregs_set_db(struct kvm_debugregs *d, unsigned i, uint64_t v) {
    if (i < 4) d->db[i] = v;
}
static inline unsigned ckvm_xcrs_max(void) { return KVM_MAX_XCRS; }
static inline struct kvm_xcr ckvm_xcrs_entry(const struct kvm_xcrs *x, unsigned i) {
    struct kvm_xcr none = { 0, 0, 0 };
    return i < KVM_MAX_XCRS ? x->xcrs[i] : none;
}
static inline void ckvm_xcrs_set_entry(struct kvm_xcrs *x, unsigned i, uint32_t xcr, uint64_t value) {
    if (i < KVM_MAX_XCRS) { x->xcrs[i].xcr = xcr; x->xcrs[i].reserved = 0; x->xcrs[i].value = value; }
}

// struct kvm_irqchip: the chip union.
static inline struct kvm_pic_state *ckvm_irqchip_pic(struct kvm_irqchip *c) { return &c->chip.pic; }
static inline struct kvm_ioapic_state *ckvm_irqchip_ioapic(struct kvm_irqchip *c) { return &c->chip.ioapic; }
static inline unsigned ckvm_ioapic_pins(void) { return KVM_IOAPIC_NUM_PINS; }
static inline uint64_t ckvm_ioapic_redirection(const struct kvm_ioapic_state *s, unsigned i) {
    return i < KVM_IOAPIC_NUM_PINS ? s->redirtbl[i].bits : 0;
}
static inline void ckvm_ioapic_set_redirection(struct kvm_ioapic_state *s, unsigned i, uint64_t v) {
    if (i < KVM_IOAPIC_NUM_PINS) s->redirtbl[i].bits = v;
}

#endif
