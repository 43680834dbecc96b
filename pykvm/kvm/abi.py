"""cffi declarations of the parts of <linux/kvm.h> (x86) that pykvm uses.

ABI mode: nothing is compiled, so pykvm installs without a compiler. Layouts are written out by
hand from the header and proven equal to the system's by ``tests/test_abi.py``, which compiles a C
probe against ``<linux/kvm.h>`` and compares every size, field offset and ioctl number.
"""

from __future__ import annotations

import cffi

CDEF = r"""
/* x86 register files (asm/kvm.h) */
struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8,  r9,  r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t  type;
    uint8_t  present, dpl, db, s, l, g, avl;
    uint8_t  unusable;
    uint8_t  padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
};

struct kvm_fpu {
    uint8_t  fpr[8][16];
    uint16_t fcw;
    uint16_t fsw;
    uint8_t  ftwx;
    uint8_t  pad1;
    uint16_t last_opcode;
    uint64_t last_ip;
    uint64_t last_dp;
    uint8_t  xmm[16][16];
    uint32_t mxcsr;
    uint32_t pad2;
};

struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};

struct kvm_msrs {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[];
};

struct kvm_msr_list {
    uint32_t nmsrs;
    uint32_t indices[];
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    uint32_t padding[3];
};

struct kvm_cpuid2 {
    uint32_t nent;
    uint32_t padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_lapic_state {
    char regs[1024];
};

struct kvm_debug_exit_arch {
    uint32_t exception;
    uint32_t pad;
    uint64_t pc;
    uint64_t dr6;
    uint64_t dr7;
};

struct kvm_guest_debug_arch {
    uint64_t debugreg[8];
};

struct kvm_guest_debug {
    uint32_t control;
    uint32_t pad;
    struct kvm_guest_debug_arch arch;
};

struct kvm_exception_state {   /* anonymous in the header; named here for cffi */
    uint8_t injected;
    uint8_t nr;
    uint8_t has_error_code;
    uint8_t pending;
    uint32_t error_code;
};

struct kvm_vcpu_events {
    struct kvm_exception_state exception;
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t soft;
        uint8_t shadow;
    } interrupt;
    struct {
        uint8_t injected;
        uint8_t pending;
        uint8_t masked;
        uint8_t pad;
    } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct {
        uint8_t smm;
        uint8_t pending;
        uint8_t smm_inside_nmi;
        uint8_t latched_init;
    } smi;
    struct {
        uint8_t pending;
    } triple_fault;
    uint8_t reserved[26];
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};

struct kvm_sync_regs {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_vcpu_events events;
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_pit_config {
    uint32_t flags;
    uint32_t pad[15];
};

/* linux/kvm.h */
struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_irq_level {
    uint32_t irq;       /* a union with 'status' in the header */
    uint32_t level;
};

struct kvm_ioeventfd {
    uint64_t datamatch;
    uint64_t addr;
    uint32_t len;
    int32_t  fd;
    uint32_t flags;
    uint8_t  pad[36];
};

struct kvm_irqfd {
    uint32_t fd;
    uint32_t gsi;
    uint32_t flags;
    uint32_t resamplefd;
    uint8_t  pad[16];
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    uint8_t  pad[64];
};

struct kvm_run {
    /* in */
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint8_t padding1[6];
    /* out */
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    /* in (pre_kvm_run), out (post_kvm_run) */
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct { uint64_t hardware_exit_reason; } hw;
        struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } fail_entry;
        struct { uint32_t exception; uint32_t error_code; } ex;
        struct {
            uint8_t direction;
            uint8_t size;
            uint16_t port;
            uint32_t count;
            uint64_t data_offset;
        } io;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct {
            uint64_t phys_addr;
            uint8_t  data[8];
            uint32_t len;
            uint8_t  is_write;
        } mmio;
        struct {
            uint64_t nr;
            uint64_t args[6];
            uint64_t ret;
            uint32_t longmode;
            uint32_t pad;
        } hypercall;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t data[16];
        } internal;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t flags;
            uint8_t  insn_size;
            uint8_t  insn_bytes[15];
        } emulation_failure;
        struct {
            uint32_t type;
            uint32_t ndata;
            uint64_t data[16];
        } system_event;
        char padding[256];
    };
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union {
        struct kvm_sync_regs regs;
        char padding[2048];
    } s;
};

struct kvm_signal_mask {
    uint32_t len;
    uint8_t  sigset[];
};

/* snapshot state (asm/kvm.h, linux/kvm.h) */
struct kvm_xsave {
    uint32_t region[1024];
};

struct kvm_xcr {
    uint32_t xcr;
    uint32_t reserved;
    uint64_t value;
};

struct kvm_xcrs {
    uint32_t nr_xcrs;
    uint32_t flags;
    struct kvm_xcr xcrs[16];
    uint64_t padding[16];
};

struct kvm_debugregs {
    uint64_t db[4];
    uint64_t dr6;
    uint64_t dr7;
    uint64_t flags;
    uint64_t reserved[9];
};

struct kvm_pic_state {
    uint8_t last_irr;
    uint8_t irr;
    uint8_t imr;
    uint8_t isr;
    uint8_t priority_add;
    uint8_t irq_base;
    uint8_t read_reg_select;
    uint8_t poll;
    uint8_t special_mask;
    uint8_t init_state;
    uint8_t auto_eoi;
    uint8_t rotate_on_auto_eoi;
    uint8_t special_fully_nested_mode;
    uint8_t init4;
    uint8_t elcr;
    uint8_t elcr_mask;
};

struct kvm_irqchip {
    uint32_t chip_id;       /* KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE, _IOAPIC */
    uint32_t pad;
    union {
        char dummy[512];    /* the IOAPIC's state is kept as these raw bytes */
        struct kvm_pic_state pic;
    } chip;
};

struct kvm_pit_channel_state {
    uint32_t count;
    uint16_t latched_count;
    uint8_t count_latched;
    uint8_t status_latched;
    uint8_t status;
    uint8_t read_state;
    uint8_t write_state;
    uint8_t write_latch;
    uint8_t rw_mode;
    uint8_t mode;
    uint8_t bcd;
    uint8_t gate;
    int64_t count_load_time;
};

struct kvm_pit_state2 {
    struct kvm_pit_channel_state channels[3];
    uint32_t flags;
    uint32_t reserved[9];
};

struct kvm_clock_data {
    uint64_t clock;
    uint32_t flags;
    uint32_t pad0;
    uint64_t realtime;
    uint64_t host_tsc;
    uint32_t pad[4];
};

struct kvm_dirty_log {
    uint32_t slot;
    uint32_t padding1;
    union {
        void *dirty_bitmap;
        uint64_t padding2;
    };
};

int ioctl(int fd, unsigned long request, void *arg);
"""

ffi = cffi.FFI()
ffi.cdef(CDEF)
libc = ffi.dlopen(None)

# Structs the ABI test checks against the C header, with the fields it compares.
# (kvm_exception_state is pykvm's name for an anonymous struct; it is checked through
# kvm_vcpu_events.exception.)
STRUCTS = (
    "kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs", "kvm_fpu", "kvm_msr_entry", "kvm_msrs",
    "kvm_msr_list", "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_lapic_state", "kvm_debug_exit_arch",
    "kvm_guest_debug_arch", "kvm_guest_debug", "kvm_vcpu_events", "kvm_sync_regs", "kvm_mp_state", "kvm_pit_config",
    "kvm_userspace_memory_region", "kvm_irq_level", "kvm_ioeventfd", "kvm_irqfd", "kvm_enable_cap",
    "kvm_signal_mask", "kvm_run",
)
# Snapshot state (pykvm/snapshot): vCPU and VM state that KVM_GET_* / KVM_SET_* move in and out.
STRUCTS += (
    "kvm_xsave", "kvm_xcr", "kvm_xcrs", "kvm_debugregs", "kvm_pic_state", "kvm_irqchip", "kvm_pit_channel_state",
    "kvm_pit_state2", "kvm_clock_data", "kvm_dirty_log",
)
