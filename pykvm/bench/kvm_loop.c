/*
 * kvm_loop.c - the C baseline of the exit-latency benchmark: the smallest KVM_RUN loop that runs
 * guests/exitloop.bin exactly as pykvm does, so that the two per-exit times can be compared.
 *
 *     kvm_loop IMAGE KIND COUNT [END]
 *
 * Builds the same machine as `Machine(mem_size=16 MiB)` + `load_flat(image, 0x8000, PROT32)`:
 * one anonymous 16 MiB RAM slot at guest-physical 0, the flat boot GDT at 0x500 (null, 0x08 code32,
 * 0x10 code32, 0x18 data; see pykvm/x86/segments.py), CS=0x10 / DS=ES=FS=GS=SS=0x18 flat 4 GiB,
 * CR0 = PE|ET, no IDT, RIP = 0x8000, RSP = 0x7000, RFLAGS = 2. The image's parameter block is
 * patched in guest memory (u32 count at +8, u32 kind at +12, u32 end at +16). Kind 5 (HLT woken
 * by the local APIC timer) gets an in-kernel irqchip (KVM_CREATE_IRQCHIP), as
 * `Machine(irqchip=True)` does.
 *
 * Exits: port I/O OUT is ignored, IN reads 0xff (an unclaimed/sink port); MMIO writes are ignored,
 * reads return 0; KVM_EXIT_HLT or an OUT to the debug-exit port 0xf4 (END=1) ends the run; that
 * last exit is counted in `exits`, not in `io`. Only the KVM_RUN loop is timed (CLOCK_MONOTONIC).
 * Prints one line: `elapsed_s=<seconds> exits=<n> io=<n> mmio=<n>`. Exit status 0 on a clean end.
 *
 * Built by pykvm.bench (`pykvm bench`, `python -m benchmarks.exit_latency`) with `gcc -O2`.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define MEM_SIZE (16u << 20)
#define LOAD_ADDR 0x8000u
#define GDT_ADDR 0x500u
#define STACK 0x7000u
#define DEBUG_EXIT 0xf4u
#define KIND_HLT 5u

static void die(const char *what)
{
    fprintf(stderr, "kvm_loop: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void set_flat(struct kvm_segment *seg, uint16_t selector, uint8_t type)
{
    memset(seg, 0, sizeof *seg);
    seg->base = 0;
    seg->limit = 0xffffffffu;
    seg->selector = selector;
    seg->type = type;
    seg->present = 1;
    seg->dpl = 0;
    seg->db = 1;
    seg->s = 1;
    seg->l = 0;
    seg->g = 1;
}

int main(int argc, char **argv)
{
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s IMAGE KIND COUNT [END]\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    uint32_t kind = (uint32_t)strtoul(argv[2], NULL, 0);
    uint32_t count = (uint32_t)strtoul(argv[3], NULL, 0);
    uint32_t end = argc == 5 ? (uint32_t)strtoul(argv[4], NULL, 0) : 0;

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open /dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    if (kind == KIND_HLT && ioctl(vm, KVM_CREATE_IRQCHIP, 0) < 0)
        die("KVM_CREATE_IRQCHIP");

    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .flags = 0, .guest_phys_addr = 0, .memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");

    /* The image, patched like the benchmark patches it for pykvm. */
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die(path);
    ssize_t n = read(fd, mem + LOAD_ADDR, MEM_SIZE - LOAD_ADDR);
    if (n < 20) {
        fprintf(stderr, "kvm_loop: %s: too short for the exitloop parameter block\n", path);
        return 2;
    }
    close(fd);
    memcpy(mem + LOAD_ADDR + 8, &count, 4);   /* x86: little-endian */
    memcpy(mem + LOAD_ADDR + 12, &kind, 4);
    memcpy(mem + LOAD_ADDR + 16, &end, 4);

    /* The flat boot GDT, byte for byte what pykvm.x86.segments.flat_gdt(False) writes. */
    static const uint8_t gdt[32] = {
        0, 0, 0, 0, 0, 0, 0, 0,                             /* 0x00 null */
        0xff, 0xff, 0x00, 0x00, 0x00, 0x9b, 0xcf, 0x00,     /* 0x08 code32 */
        0xff, 0xff, 0x00, 0x00, 0x00, 0x9b, 0xcf, 0x00,     /* 0x10 code32 (the mode's code segment) */
        0xff, 0xff, 0x00, 0x00, 0x00, 0x93, 0xcf, 0x00,     /* 0x18 data */
    };
    memcpy(mem + GDT_ADDR, gdt, sizeof gdt);

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (mmap_size < (int)sizeof(struct kvm_run))
        die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    set_flat(&sregs.cs, 0x10, 0xb);
    set_flat(&sregs.ds, 0x18, 0x3);
    sregs.es = sregs.fs = sregs.gs = sregs.ss = sregs.ds;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = sizeof gdt - 1;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x11;   /* PE | ET */
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");

    struct kvm_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.rip = LOAD_ADDR;
    regs.rsp = STACK;
    regs.rflags = 2;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    unsigned long exits = 0, io = 0, mmio = 0;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN");
        }
        exits++;
        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            if (run->io.port == DEBUG_EXIT && run->io.direction == KVM_EXIT_IO_OUT) {
                uint8_t value = *((uint8_t *)run + run->io.data_offset);
                if (value != 0) {
                    fprintf(stderr, "kvm_loop: the guest wrote %#x to the debug-exit port\n", value);
                    return 1;
                }
                break;   /* END=1: the guest is done */
            }
            io++;
            if (run->io.direction == KVM_EXIT_IO_IN)
                memset((uint8_t *)run + run->io.data_offset, 0xff, (size_t)run->io.size * run->io.count);
            continue;
        case KVM_EXIT_MMIO:
            mmio++;
            if (!run->mmio.is_write)
                memset(run->mmio.data, 0, run->mmio.len);
            continue;
        case KVM_EXIT_HLT:
            break;
        default:
            fprintf(stderr, "kvm_loop: unexpected exit reason %u after %lu exits\n", run->exit_reason, exits);
            return 1;
        }
        break;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double elapsed = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("elapsed_s=%.9f exits=%lu io=%lu mmio=%lu\n", elapsed, exits, io, mmio);
    return 0;
}
