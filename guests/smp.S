/*
 * smp.S - a Multiboot v1 kernel that starts every application processor (AP)
 * with the local APIC, one at a time, and has each CPU report its APIC ID.
 *
 * Written for `qemu-system-x86_64 -smp N -kernel smp.elf` and runs unchanged
 * under `pykvm run --kernel smp.elf --cpus N`: an ELF32 image loaded at 1 MiB,
 * entered in 32-bit protected mode, paging off. Output on COM1:
 *
 *     cpu 0: apic id 0 (cpuid 0)
 *     cpu 1: apic id 1 (cpuid 1)
 *     ...
 *     smp: N cpus up
 *
 * then 0x11 to the debug-exit port 0xf4 (status 35). In each line the first id
 * is the local APIC ID register (0xfee00020 bits 31:24), the one in
 * parentheses CPUID leaf 1 EBX[31:24] (the initial APIC ID): on a correct
 * machine they are equal.
 *
 * How: the number of CPUs N comes from fw_cfg item 0x0005 (FW_CFG_NB_CPUS).
 * The BSP copies a real-mode trampoline to 0x8000 and, for n = 1..N-1, sends
 * INIT, then SIPI (vector 0x08: start at 0x0800:0000) twice to APIC ID n -
 * QEMU and pykvm number the CPUs' APIC IDs 0..N-1 - and waits, with a bounded
 * spin loop, until that AP has printed its line. The AP loads the flat GDT,
 * enters 32-bit protected mode, takes its own stack, prints, signals, and
 * halts with interrupts off forever. Only one CPU prints at a time, so the
 * output is deterministic.
 *
 * Failures: no fw_cfg -> "smp: no fw_cfg", exit 0x7e (status 253); a CPU count
 * of 0 or more than MAX_CPUS -> "smp: bad cpu count <N>", exit 0x7c (249); an
 * AP that does not answer in time -> "smp: cpu <n> did not start", exit 0x7d
 * (251).
 *
 * Timing: on the machines pykvm is developed on, KVM emulates CPL0 code at
 * ~0.5 us per instruction, so the delays are loop counts sized for that (the
 * INIT/SIPI delays are short; KVM needs none, hardware wants 10 ms / 200 us).
 */

        .set    MAX_CPUS, 64
        .set    AP_STACK_SIZE, 1024

        .set    TRAMPOLINE, 0x8000              /* 4 KiB-aligned, below 1 MiB */
        .set    SIPI_VECTOR, TRAMPOLINE >> 12   /* the AP starts at CS:IP = 0x0800:0000 */

        .set    LAPIC_BASE, 0xfee00000
        .set    LAPIC_ID, LAPIC_BASE + 0x20     /* bits 31:24 */
        .set    LAPIC_SVR, LAPIC_BASE + 0xf0    /* spurious vector register */
        .set    LAPIC_ICR_LOW, LAPIC_BASE + 0x300   /* writing it sends the IPI */
        .set    LAPIC_ICR_HIGH, LAPIC_BASE + 0x310  /* destination in bits 31:24 */
        .set    SVR_ENABLE, 1 << 8
        .set    ICR_INIT, 5 << 8                /* delivery mode INIT */
        .set    ICR_STARTUP, 6 << 8             /* delivery mode start-up (SIPI) */
        .set    ICR_PENDING, 1 << 12            /* delivery status: send pending */
        .set    ICR_ASSERT, 1 << 14
        .set    ICR_LEVEL, 1 << 15

        /* spin loop counts: one iteration (with a pause) takes ~6-8 us emulated,
         * tens of ns on hardware */
        .set    INIT_DELAY, 10000               /* ~70 ms emulated */
        .set    SIPI_DELAY, 2000                /* ~15 ms emulated */
        .set    ICR_TIMEOUT, 100000
        .set    AP_TIMEOUT, 1500000             /* ~10 s emulated (measured under QEMU) */

        .set    CODE_SEL, gdt_code - gdt
        .set    DATA_SEL, gdt_data - gdt

        .code32
        .text
        .include "uart.inc"
        .include "kernel.inc"

        multiboot_header MB_PAGE_ALIGN | MB_MEMORY_INFO

        .globl  _start
_start:                                 /* the BSP, from the Multiboot loader */
        cli
        cld
        mov     $bsp_stack_top, %esp
        lgdt    gdt_desc                /* the loader's GDT may be anywhere: use ours */
        ljmp    $CODE_SEL, $1f
1:      call    load_data_segments
        orl     $SVR_ENABLE, LAPIC_SVR  /* software-enable the local APIC */

        mov     $FW_CFG_SIGNATURE, %ax
        call    fw_cfg_select
        mov     $4, %ecx
        call    fw_cfg_read
        cmp     $0x554d4551, %eax       /* "QEMU", little-endian */
        je      1f
        print   "smp: no fw_cfg\n"
        debug_exit 0x7e
1:      mov     $FW_CFG_NB_CPUS, %ax
        call    fw_cfg_select
        mov     $2, %ecx
        call    fw_cfg_read
        mov     %eax, ncpus
        test    %eax, %eax
        jz      bad_count
        cmp     $MAX_CPUS, %eax
        ja      bad_count

        mov     $ap_trampoline, %esi    /* the AP's first instructions, below 1 MiB */
        mov     $TRAMPOLINE, %edi
        mov     $(ap_trampoline_end - ap_trampoline), %ecx
        rep movsb

        xor     %eax, %eax
        call    report_cpu              /* cpu 0: the BSP */

        mov     $1, %ebp                /* EBP = n, the AP to start */
1:      cmp     ncpus, %ebp
        jae     2f
        call    start_ap
        inc     %ebp
        jmp     1b

2:      print   "smp: "
        mov     ncpus, %eax
        call    putdec
        print   " cpus up\n"
        debug_exit 0x11

bad_count:
        print   "smp: bad cpu count "
        mov     ncpus, %eax
        call    putdec
        call    newline
        debug_exit 0x7c

/* start_ap: start CPU EBP (APIC ID EBP) and wait until it has printed. */
start_ap:
        mov     %ebp, ap_index
        lea     1(%ebp), %eax
        imul    $AP_STACK_SIZE, %eax
        add     $ap_stacks, %eax
        mov     %eax, ap_stack          /* top of this AP's stack */
        movl    $0, ap_ready

        mov     $(ICR_INIT | ICR_ASSERT | ICR_LEVEL), %eax
        call    send_ipi
        mov     $INIT_DELAY, %ecx
        call    spin
        mov     $(ICR_STARTUP | SIPI_VECTOR), %eax
        call    send_ipi
        mov     $SIPI_DELAY, %ecx
        call    spin
        mov     $(ICR_STARTUP | SIPI_VECTOR), %eax  /* the second SIPI (ignored if the first worked) */
        call    send_ipi

        mov     $AP_TIMEOUT, %ecx
1:      cmpl    $0, ap_ready
        jne     2f
        pause
        dec     %ecx
        jnz     1b
        print   "smp: cpu "
        mov     %ebp, %eax
        call    putdec
        print   " did not start\n"
        debug_exit 0x7d
2:      ret

/* send_ipi: send the IPI whose ICR low word is EAX to APIC ID EBP, then wait
 * (bounded) until the local APIC has sent it. Clobbers EAX, ECX. */
send_ipi:
        mov     %ebp, %ecx
        shl     $24, %ecx
        mov     %ecx, LAPIC_ICR_HIGH    /* destination first: the low write sends */
        mov     %eax, LAPIC_ICR_LOW
        mov     $ICR_TIMEOUT, %ecx
1:      testl   $ICR_PENDING, LAPIC_ICR_LOW
        jz      2f
        pause
        dec     %ecx
        jnz     1b
2:      ret

/* spin: busy-wait ECX iterations. Clobbers ECX. */
spin:
        pause
        dec     %ecx
        jnz     spin
        ret

/* report_cpu: print "cpu <EAX>: apic id <LAPIC ID> (cpuid <initial APIC ID>)".
 * Preserves all registers. */
report_cpu:
        pusha
        mov     %eax, %edi
        print   "cpu "
        mov     %edi, %eax
        call    putdec
        print   ": apic id "
        mov     LAPIC_ID, %eax
        shr     $24, %eax
        call    putdec
        print   " (cpuid "
        mov     $1, %eax
        cpuid                           /* EBX[31:24]: initial APIC ID */
        mov     %ebx, %eax
        shr     $24, %eax
        call    putdec
        print   ")\n"
        popa
        ret

load_data_segments:
        mov     $DATA_SEL, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %ax, %ss
        ret

/* The AP trampoline: assembled here, copied to TRAMPOLINE and run there in
 * real mode (CS = 0x0800, IP = 0), so every address in it is computed as
 * TRAMPOLINE + offset. It loads the flat GDT and far-jumps to ap_start32. */
        .code16
ap_trampoline:
        cli
        xor     %ax, %ax
        mov     %ax, %ds
        lgdtl   TRAMPOLINE + (ap_gdt_desc - ap_trampoline)
        mov     %cr0, %eax
        or      $1, %eax                /* CR0.PE */
        mov     %eax, %cr0
        ljmpl   $CODE_SEL, $ap_start32
        .balign 4
ap_gdt_desc:                            /* the same GDT, 32-bit base */
        .word   gdt_end - gdt - 1
        .long   gdt
ap_trampoline_end:
        .code32

/* ap_start32: an AP in 32-bit protected mode. */
ap_start32:
        mov     $DATA_SEL, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %ax, %ss
        mov     ap_stack, %esp
        cld
        mov     ap_index, %eax
        call    report_cpu
        movl    $1, ap_ready            /* the BSP may start the next AP */
        cli
1:      hlt
        jmp     1b

        .section .rodata
        .balign 8
gdt:    .quad   0                       /* null */
gdt_code:
        .quad   0x00cf9a000000ffff      /* flat 4 GiB code, 32-bit, DPL 0 */
gdt_data:
        .quad   0x00cf92000000ffff      /* flat 4 GiB data, DPL 0 */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt

        .bss
ncpus:          .skip   4               /* from fw_cfg */
ap_index:       .skip   4               /* the AP being started: its CPU number */
ap_stack:       .skip   4               /* and the top of its stack */
ap_ready:       .skip   4               /* set by that AP once it has printed */

        .balign 16
bsp_stack:
        .skip   4096
bsp_stack_top:
ap_stacks:
        .skip   MAX_CPUS * AP_STACK_SIZE
