#include "ckvm.h"

const unsigned long CKVM_GET_API_VERSION = KVM_GET_API_VERSION;
const unsigned long CKVM_CREATE_VM = KVM_CREATE_VM;
const unsigned long CKVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
const unsigned long CKVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
const unsigned long CKVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
const unsigned long CKVM_GET_MSR_INDEX_LIST = KVM_GET_MSR_INDEX_LIST;

const unsigned long CKVM_CREATE_VCPU = KVM_CREATE_VCPU;
const unsigned long CKVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
const unsigned long CKVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
const unsigned long CKVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
const unsigned long CKVM_CREATE_IRQCHIP = KVM_CREATE_IRQCHIP;
const unsigned long CKVM_CREATE_PIT2 = KVM_CREATE_PIT2;
const unsigned long CKVM_IRQ_LINE = KVM_IRQ_LINE;
const unsigned long CKVM_IRQ_LINE_STATUS = KVM_IRQ_LINE_STATUS;

const unsigned long CKVM_RUN = KVM_RUN;
const unsigned long CKVM_GET_REGS = KVM_GET_REGS;
const unsigned long CKVM_SET_REGS = KVM_SET_REGS;
const unsigned long CKVM_GET_SREGS = KVM_GET_SREGS;
const unsigned long CKVM_SET_SREGS = KVM_SET_SREGS;
const unsigned long CKVM_SET_CPUID2 = KVM_SET_CPUID2;
const unsigned long CKVM_SET_MSRS = KVM_SET_MSRS;
const unsigned long CKVM_GET_MSRS = KVM_GET_MSRS;
const unsigned long CKVM_SET_FPU = KVM_SET_FPU;
const unsigned long CKVM_GET_LAPIC = KVM_GET_LAPIC;
const unsigned long CKVM_SET_LAPIC = KVM_SET_LAPIC;

const int CKVM_CAP_IRQCHIP = KVM_CAP_IRQCHIP;
const int CKVM_CAP_USER_MEMORY = KVM_CAP_USER_MEMORY;
const int CKVM_CAP_SET_TSS_ADDR = KVM_CAP_SET_TSS_ADDR;
const int CKVM_CAP_EXT_CPUID = KVM_CAP_EXT_CPUID;
const int CKVM_CAP_PIT2 = KVM_CAP_PIT2;
const int CKVM_CAP_IMMEDIATE_EXIT = KVM_CAP_IMMEDIATE_EXIT;
const int CKVM_CAP_NR_VCPUS = KVM_CAP_NR_VCPUS;
const int CKVM_CAP_MAX_VCPUS = KVM_CAP_MAX_VCPUS;
