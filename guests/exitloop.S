/*
 * exitloop.S - a tight loop of VM exits, for the exit-latency benchmark
 * (32-bit protected mode, paging off). Prints nothing. The same image runs
 * under pykvm, the C loop (pykvm/bench/kvm_loop.c) and QEMU (wrapped by the
 * benchmark in a PVH ELF whose entry is `_start`).
 *
 * Image layout (the benchmark patches the words in the file bytes):
 *     offset 0    short jmp over the parameter block
 *     offset 8    u32 count  number of iterations (default 1000)
 *     offset 12   u32 kind   0 = OUT  1 byte to port 0x80
 *                            1 = IN   1 byte from port 0x80
 *                            2 = MMIO 4-byte write to 0xd0000008
 *                            3 = MMIO 4-byte read from 0xd0000008
 *                            4 = CPUID leaf 0: an exit KVM handles in
 *                                the kernel (the floor: no VMM involved)
 *                            5 = HLT woken by the local APIC timer: arm
 *                                it one-shot (initial count TIMER_TICKS),
 *                                sti; hlt; the interrupt's handler writes
 *                                EOI and goes on with the loop (no iret:
 *                                kvm_pvm cannot emulate it at CPL0).
 *                                Needs an in-kernel irqchip; KVM handles
 *                                all of it (no VMM code runs)
 *     offset 16   u32 end    0 = `cli; hlt` when done (status 0 under
 *                            pykvm), 1 = write 0 to the debug-exit port
 *                            0xf4 (a VMM with an in-kernel irqchip never
 *                            sees that HLT; QEMU needs isa-debug-exit)
 * Each loop iteration of kinds 0-4 is exactly one exiting instruction plus
 * dec/jnz. An unknown kind writes 0x7f to the debug-exit port (status 0xff).
 */

        .set    PORT, 0x80              /* the POST-code port: harmless everywhere */
        .set    MMIO_SCRATCH, 0xd0000008
        .set    DEBUG_EXIT, 0xf4
        .set    STACK, 0x7000           /* the interrupt frame of kind 5 goes here */
        .set    LAPIC, 0xfee00000       /* the local APIC's default base (SDM vol. 3, 11.4.1) */
        .set    LAPIC_EOI, 0xb0
        .set    LAPIC_SVR, 0xf0         /* spurious-interrupt vector register: bit 8 enables the APIC */
        .set    LAPIC_LVT_TIMER, 0x320  /* vector, mode bits 17-18 = 0: one-shot */
        .set    LAPIC_TIMER_INIT, 0x380
        .set    LAPIC_TIMER_DIV, 0x3e0  /* 0xb: divide by 1 */
        .set    TIMER_VECTOR, 0x20
        .set    TIMER_TICKS, 1          /* the one-shot's initial count: expire at once */

        .code32
        .text
        .globl  _start
_start:
        jmp     start                   /* 2-byte short jmp */

        .org    8                       /* parameter block at fixed offsets */
count:  .long   1000
kind:   .long   0
end:    .long   0

start:
        mov     $STACK, %esp
        mov     count, %ecx
        mov     kind, %eax
        mov     $MMIO_SCRATCH, %ebx
        test    %ecx, %ecx              /* count 0: no exits (and no 2^32 loop) */
        jz      done
        cmp     $0, %eax
        je      out_loop
        cmp     $1, %eax
        je      in_loop
        cmp     $2, %eax
        je      mmio_write_loop
        cmp     $3, %eax
        je      mmio_read_loop
        cmp     $4, %eax
        je      cpuid_loop
        cmp     $5, %eax
        je      hlt_setup
        mov     $0x7f, %al              /* unknown kind */
        out     %al, $DEBUG_EXIT
        jmp     done

out_loop:
        out     %al, $PORT
        dec     %ecx
        jnz     out_loop
        jmp     done

in_loop:
        in      $PORT, %al
        dec     %ecx
        jnz     in_loop
        jmp     done

mmio_write_loop:
        mov     %eax, (%ebx)
        dec     %ecx
        jnz     mmio_write_loop
        jmp     done

mmio_read_loop:
        mov     (%ebx), %eax
        dec     %ecx
        jnz     mmio_read_loop
        jmp     done

cpuid_loop:                             /* CPUID writes EAX-EDX: count in ESI */
        mov     %ecx, %esi
1:      xor     %eax, %eax
        cpuid
        dec     %esi
        jnz     1b
        jmp     done

hlt_setup:                              /* an interrupt gate for TIMER_VECTOR, in our own CS */
        mov     $timer_isr, %eax
        mov     %ax, idt + 8 * TIMER_VECTOR
        shr     $16, %eax
        mov     %ax, idt + 8 * TIMER_VECTOR + 6
        mov     %cs, %ax
        mov     %ax, idt + 8 * TIMER_VECTOR + 2
        movb    $0x8e, idt + 8 * TIMER_VECTOR + 5   /* present, DPL 0, 32-bit interrupt gate */
        lidt    idt_ptr
        movl    $0x1ff, LAPIC + LAPIC_SVR
        movl    $0xb, LAPIC + LAPIC_TIMER_DIV
        movl    $TIMER_VECTOR, LAPIC + LAPIC_LVT_TIMER
hlt_loop:
        movl    $TIMER_TICKS, LAPIC + LAPIC_TIMER_INIT
        sti
        hlt                             /* sti's shadow: the interrupt can only end this hlt */
        jmp     hlt_loop                /* (not reached: the handler goes on at hlt_next) */
hlt_next:
        dec     %ecx
        jnz     hlt_loop
        jmp     done

timer_isr:                              /* the gate cleared IF, as the loop wants it */
        movl    $0, LAPIC + LAPIC_EOI
        add     $12, %esp               /* drop the frame: kvm_pvm cannot emulate iret at CPL0 */
        jmp     hlt_next

done:
        cmpl    $0, end
        je      1f
        xor     %eax, %eax
        out     %al, $DEBUG_EXIT
1:      cli
2:      hlt
        jmp     2b

        .p2align 3
idt_ptr:
        .word   8 * TIMER_VECTOR + 7
        .long   idt
        .p2align 3
idt:    .fill   TIMER_VECTOR + 1, 8, 0
