"""Numbers defined by the KVM API: exit reasons, capabilities, flags, and the ioctl requests.

Ioctl request numbers are computed with the kernel's _IO/_IOR/_IOW/_IOWR encoding from the sizes
cffi gives the argument structs, never written in as magic numbers.
"""

from __future__ import annotations

import enum

from .abi import ffi

# --- ioctl encoding (include/uapi/asm-generic/ioctl.h) ----------------------------------------
_NRBITS, _TYPEBITS, _SIZEBITS = 8, 8, 14
_NRSHIFT = 0
_TYPESHIFT = _NRSHIFT + _NRBITS
_SIZESHIFT = _TYPESHIFT + _TYPEBITS
_DIRSHIFT = _SIZESHIFT + _SIZEBITS
_NONE, _WRITE, _READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, ctype: str | None) -> int:
    size = ffi.sizeof(ctype) if ctype else 0
    return (direction << _DIRSHIFT) | (KVMIO << _TYPESHIFT) | (nr << _NRSHIFT) | (size << _SIZESHIFT)


def _io(nr: int) -> int:
    return _ioc(_NONE, nr, None)


def _ior(nr: int, ctype: str) -> int:
    return _ioc(_READ, nr, ctype)


def _iow(nr: int, ctype: str) -> int:
    return _ioc(_WRITE, nr, ctype)


def _iowr(nr: int, ctype: str) -> int:
    return _ioc(_READ | _WRITE, nr, ctype)


class Ioctl(enum.IntEnum):
    """The ioctl requests pykvm issues, named as in the KVM API documentation."""

    # system ioctls (/dev/kvm)
    KVM_GET_API_VERSION = _io(0x00)
    KVM_CREATE_VM = _io(0x01)
    KVM_GET_MSR_INDEX_LIST = _iowr(0x02, "struct kvm_msr_list")
    KVM_CHECK_EXTENSION = _io(0x03)
    KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
    KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
    # VM ioctls
    KVM_CREATE_VCPU = _io(0x41)
    KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
    KVM_SET_TSS_ADDR = _io(0x47)
    KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "uint64_t")
    KVM_CREATE_IRQCHIP = _io(0x60)
    KVM_IRQ_LINE = _iow(0x61, "struct kvm_irq_level")
    KVM_IRQFD = _iow(0x76, "struct kvm_irqfd")
    KVM_CREATE_PIT2 = _iow(0x77, "struct kvm_pit_config")
    KVM_IOEVENTFD = _iow(0x79, "struct kvm_ioeventfd")
    KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")
    # vCPU ioctls
    KVM_RUN = _io(0x80)
    KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
    KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
    KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
    KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
    KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
    KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
    KVM_SET_SIGNAL_MASK = _iow(0x8B, "struct kvm_signal_mask")
    KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
    KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
    KVM_GET_LAPIC = _ior(0x8E, "struct kvm_lapic_state")
    KVM_SET_LAPIC = _iow(0x8F, "struct kvm_lapic_state")
    KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
    KVM_GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
    KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
    KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
    KVM_SET_GUEST_DEBUG = _iow(0x9B, "struct kvm_guest_debug")
    KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
    KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
    # snapshot state (api.rst 4.x: KVM_GET_XSAVE ... KVM_GET_CLOCK, KVM_GET_DIRTY_LOG)
    KVM_GET_DEBUGREGS = _ior(0xA1, "struct kvm_debugregs")
    KVM_SET_DEBUGREGS = _iow(0xA2, "struct kvm_debugregs")
    KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
    KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")
    KVM_GET_XCRS = _ior(0xA6, "struct kvm_xcrs")
    KVM_SET_XCRS = _iow(0xA7, "struct kvm_xcrs")
    KVM_GET_IRQCHIP = _iowr(0x62, "struct kvm_irqchip")
    KVM_SET_IRQCHIP = _ior(0x63, "struct kvm_irqchip")   # _IOR in the header, although it writes
    KVM_GET_PIT2 = _ior(0x9F, "struct kvm_pit_state2")
    KVM_SET_PIT2 = _iow(0xA0, "struct kvm_pit_state2")
    KVM_SET_CLOCK = _iow(0x7B, "struct kvm_clock_data")
    KVM_GET_CLOCK = _ior(0x7C, "struct kvm_clock_data")
    KVM_GET_DIRTY_LOG = _iow(0x42, "struct kvm_dirty_log")


class ExitReason(enum.IntEnum):
    """kvm_run.exit_reason (KVM_EXIT_*)."""

    UNKNOWN = 0
    EXCEPTION = 1
    IO = 2
    HYPERCALL = 3
    DEBUG = 4
    HLT = 5
    MMIO = 6
    IRQ_WINDOW_OPEN = 7
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTR = 10
    SET_TPR = 11
    TPR_ACCESS = 12
    NMI = 16
    INTERNAL_ERROR = 17
    WATCHDOG = 21
    SYSTEM_EVENT = 24
    IOAPIC_EOI = 26
    HYPERV = 27
    X86_RDMSR = 29
    X86_WRMSR = 30
    DIRTY_RING_FULL = 31
    AP_RESET_HOLD = 32
    X86_BUS_LOCK = 33
    XEN = 34
    NOTIFY = 37


class Cap(enum.IntEnum):
    """Capabilities pykvm checks with KVM_CHECK_EXTENSION (KVM_CAP_*)."""

    IRQCHIP = 0
    HLT = 1
    USER_MEMORY = 3
    SET_TSS_ADDR = 4
    EXT_CPUID = 7
    NR_VCPUS = 9
    NR_MEMSLOTS = 10
    MP_STATE = 14
    COALESCED_MMIO = 15
    SET_GUEST_DEBUG = 23
    IRQ_INJECT_STATUS = 26
    IRQFD = 32
    PIT2 = 33
    IOEVENTFD = 36
    SET_IDENTITY_MAP_ADDR = 37
    INTERNAL_ERROR_DATA = 40
    VCPU_EVENTS = 41
    DEBUGREGS = 50
    MAX_VCPUS = 66
    SYNC_REGS = 74
    READONLY_MEM = 81
    MAX_VCPU_ID = 128
    IMMEDIATE_EXIT = 136
    EXIT_ON_EMULATION_FAILURE = 204


KVM_API_VERSION = 12

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_INTERNAL_ERROR_EMULATION = 1
KVM_INTERNAL_ERROR_SIMUL_EX = 2
KVM_INTERNAL_ERROR_DELIVERY_EV = 3
KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON = 4
KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_MEM_READONLY = 1 << 1

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_UNINITIALIZED = 1
KVM_MP_STATE_INIT_RECEIVED = 2
KVM_MP_STATE_HALTED = 3
KVM_MP_STATE_SIPI_RECEIVED = 4

KVM_GUESTDBG_ENABLE = 0x1
KVM_GUESTDBG_SINGLESTEP = 0x2
KVM_GUESTDBG_USE_SW_BP = 0x10000
KVM_GUESTDBG_USE_HW_BP = 0x20000

KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4

# struct kvm_ioeventfd.flags (api.rst, KVM_IOEVENTFD)
KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2
# struct kvm_irqfd.flags (api.rst, KVM_IRQFD)
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0

# struct kvm_userspace_memory_region.flags: KVM_MEM_LOG_DIRTY_PAGES (api.rst, KVM_SET_USER_MEMORY_REGION)
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
# struct kvm_irqchip.chip_id (api.rst, KVM_GET_IRQCHIP)
KVM_IRQCHIP_PIC_MASTER = 0
KVM_IRQCHIP_PIC_SLAVE = 1
KVM_IRQCHIP_IOAPIC = 2
