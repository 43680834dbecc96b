/*
 * rtc.S - a Multiboot v1 kernel that uses the MC146818 real-time clock the way
 * a firmware or an OS does: it waits for an update-in-progress (UIP) edge,
 * programs the alarm two seconds out, and takes IRQ 8 through the IOAPIC and
 * the local APIC (the in-kernel irqchip under pykvm and QEMU).
 *
 *     pykvm run --kernel guests/rtc.elf
 *
 * Output on COM1:
 *
 *     rtc: uip rose after <n> polls and fell after <m>
 *     rtc: time hh:mm:ss, alarm set for hh:mm:ss
 *     rtc: irq 8: update-ended, hh:mm:ss
 *     rtc: irq 8: alarm, hh:mm:ss
 *     rtc: alarm ok
 *
 * then 0x10 to the debug-exit port (status 33). The interrupt handler reads
 * register C (which also lowers IRQ 8) and records its flags; the alarm line
 * prints the time read in the handler, which must be the time programmed.
 *
 * Failures: UIP never rises or never falls within POLL_LIMIT polls -> "rtc:
 * no uip edge", exit 0x7d (status 251); no alarm within MAX_UPDATES update
 * interrupts -> "rtc: no alarm", exit 0x7c (249); the alarm at another time
 * than programmed -> "rtc: alarm at the wrong time", exit 0x7b (247); any
 * other interrupt or exception -> "rtc: unexpected vector", exit 0x7e (253).
 *
 * How: a flat GDT, an IDT of 0x30 gates (vector 0x28 is the RTC's, every other
 * one reports and exits), the PIC masked, the local APIC software-enabled
 * (spurious vector 0x2f), IOAPIC pin 8 routed to vector 0x28 (edge, active
 * high, fixed delivery to APIC ID 0). The RTC runs in binary 24-hour mode
 * (register B = DM | 24/12) so that the alarm is computed with plain adds.
 */

        .set    CODE_SEL, gdt_code - gdt
        .set    DATA_SEL, gdt_data - gdt

        .set    CMOS_INDEX, 0x70
        .set    CMOS_DATA, 0x71
        .set    RTC_SECONDS, 0x00
        .set    RTC_SECONDS_ALARM, 0x01
        .set    RTC_MINUTES, 0x02
        .set    RTC_MINUTES_ALARM, 0x03
        .set    RTC_HOURS, 0x04
        .set    RTC_HOURS_ALARM, 0x05
        .set    RTC_REG_A, 0x0a
        .set    RTC_REG_B, 0x0b
        .set    RTC_REG_C, 0x0c
        .set    A_UIP, 0x80
        .set    B_AIE, 0x20
        .set    B_UIE, 0x10
        .set    B_DM, 0x04                      /* binary */
        .set    B_24H, 0x02
        .set    C_AF, 0x20
        .set    C_UF, 0x10

        .set    LAPIC_SVR, 0xfee000f0
        .set    LAPIC_EOI, 0xfee000b0
        .set    SVR_ENABLE, 1 << 8
        .set    SPURIOUS_VECTOR, 0x2f
        .set    IOAPIC_INDEX, 0xfec00000
        .set    IOAPIC_DATA, 0xfec00010
        .set    IOREDTBL8, 0x10 + 2 * 8          /* pin 8: low dword; high at +1 */
        .set    RTC_VECTOR, 0x28
        .set    NVECTORS, 0x30

        .set    POLL_LIMIT, 2000000             /* ~2 polls per 50 us: tens of seconds */
        .set    MAX_UPDATES, 5

        .code32
        .text
        .include "uart.inc"
        .include "kernel.inc"

        multiboot_header MB_PAGE_ALIGN | MB_MEMORY_INFO

        .globl  _start
_start:
        cli
        cld
        mov     $stack_top, %esp
        lgdt    gdt_desc
        ljmp    $CODE_SEL, $1f
1:      mov     $DATA_SEL, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %fs
        mov     %ax, %gs
        mov     %ax, %ss

        /* the IDT: every vector to `unexpected`, the RTC's to `rtc_irq` */
        xor     %ecx, %ecx
1:      mov     $unexpected, %eax
        cmp     $RTC_VECTOR, %ecx
        jne     2f
        mov     $rtc_irq, %eax
2:      call    set_gate
        inc     %ecx
        cmp     $NVECTORS, %ecx
        jb      1b
        lidt    idt_desc

        /* interrupt controllers: PIC off, local APIC on, IOAPIC pin 8 -> RTC_VECTOR */
        mov     $0xff, %al
        out     %al, $0x21
        out     %al, $0xa1
        movl    $(SVR_ENABLE | SPURIOUS_VECTOR), LAPIC_SVR
        movl    $(IOREDTBL8 + 1), IOAPIC_INDEX
        movl    $0, IOAPIC_DATA                 /* destination: APIC ID 0 */
        movl    $IOREDTBL8, IOAPIC_INDEX
        movl    $RTC_VECTOR, IOAPIC_DATA        /* fixed, physical, edge, high, unmasked */

        /* binary 24-hour mode, no interrupts yet */
        mov     $RTC_REG_B, %al
        mov     $(B_DM | B_24H), %ah
        call    cmos_write

        /* wait for UIP to rise, then to fall: an update has just happened */
        xor     %edi, %edi
1:      mov     $RTC_REG_A, %al
        call    cmos_read
        test    $A_UIP, %al
        jnz     2f
        inc     %edi
        cmp     $POLL_LIMIT, %edi
        jb      1b
        jmp     no_uip
2:      mov     %edi, rise_polls
        xor     %edi, %edi
3:      mov     $RTC_REG_A, %al
        call    cmos_read
        test    $A_UIP, %al
        jz      4f
        inc     %edi
        cmp     $POLL_LIMIT, %edi
        jb      3b
        jmp     no_uip
4:      mov     %edi, fall_polls

        /* the time now, and the alarm two seconds later */
        call    read_time                       /* EAX = hh:mm:ss as 0x00hhmmss */
        mov     %eax, start_time
        movzbl  %al, %ecx                       /* seconds */
        add     $2, %ecx
        mov     %eax, %edx
        shr     $8, %edx
        movzbl  %dl, %edx                       /* minutes */
        mov     %eax, %ebx
        shr     $16, %ebx                       /* hours */
        cmp     $60, %ecx
        jb      5f
        sub     $60, %ecx
        inc     %edx
        cmp     $60, %edx
        jb      5f
        xor     %edx, %edx
        inc     %ebx
        cmp     $24, %ebx
        jb      5f
        xor     %ebx, %ebx
5:      mov     %ebx, %eax                      /* pack the alarm as 0x00hhmmss */
        shl     $8, %eax
        or      %edx, %eax
        shl     $8, %eax
        or      %ecx, %eax
        mov     %eax, alarm_time
        mov     $RTC_SECONDS_ALARM, %al
        mov     %cl, %ah
        call    cmos_write
        mov     $RTC_MINUTES_ALARM, %al
        mov     %dl, %ah
        call    cmos_write
        mov     $RTC_HOURS_ALARM, %al
        mov     %bl, %ah
        call    cmos_write

        print   "rtc: uip rose after "
        mov     rise_polls, %eax
        call    putdec
        print   " polls and fell after "
        mov     fall_polls, %eax
        call    putdec
        print   "\nrtc: time "
        mov     start_time, %eax
        call    put_time
        print   ", alarm set for "
        mov     alarm_time, %eax
        call    put_time
        call    newline

        /* clear stale flags, enable the alarm and update-ended interrupts, wait */
        mov     $RTC_REG_C, %al
        call    cmos_read
        mov     $RTC_REG_B, %al
        mov     $(B_DM | B_24H | B_AIE | B_UIE), %ah
        call    cmos_write
wait_irq:
        sti
        hlt                                     /* until an interrupt: rtc_irq resumes at irq_done */
irq_done:
        cli
        mov     irq_flags, %esi
        movl    $0, irq_flags
        test    %esi, %esi
        jz      wait_irq
        test    $C_AF, %esi
        jnz     7f
        print   "rtc: irq 8: update-ended, "
        mov     irq_time, %eax
        call    put_time
        call    newline
        incl    updates
        cmpl    $MAX_UPDATES, updates
        jb      wait_irq
        print   "rtc: no alarm\n"
        debug_exit 0x7c

7:      print   "rtc: irq 8: alarm, "
        mov     irq_time, %eax
        call    put_time
        call    newline
        mov     irq_time, %eax
        cmp     alarm_time, %eax
        je      8f
        print   "rtc: alarm at the wrong time\n"
        debug_exit 0x7b
8:      print   "rtc: alarm ok\n"
        debug_exit 0x10

no_uip:
        print   "rtc: no uip edge\n"
        debug_exit 0x7d

/* rtc_irq: IRQ 8. Read register C (lowers the line), keep its flags and the
 * time, acknowledge the local APIC. It does not return with iret: kvm_pvm
 * cannot emulate a 32-bit iretd at CPL0 (KVM_EXIT_INTERNAL_ERROR, measured).
 * Interrupts are enabled only at the hlt in wait_irq and the loop there keeps
 * its state in memory, so the handler resumes it itself, with a fresh stack
 * and interrupts still off (as after iret and the cli that follows hlt). */
rtc_irq:
        mov     $RTC_REG_C, %al
        call    cmos_read
        movzbl  %al, %eax
        or      %eax, irq_flags
        call    read_time
        mov     %eax, irq_time
        movl    $0, LAPIC_EOI
        mov     $stack_top, %esp
        jmp     irq_done

unexpected:
        print   "rtc: unexpected vector\n"
        debug_exit 0x7e

/* set_gate: IDT entry ECX -> handler EAX (32-bit interrupt gate, DPL 0).
 * Clobbers EDX. */
set_gate:
        lea     idt(,%ecx,8), %edx
        movw    %ax, (%edx)
        movw    $CODE_SEL, 2(%edx)
        movw    $0x8e00, 4(%edx)                /* present, DPL 0, 32-bit interrupt gate */
        push    %eax
        shr     $16, %eax
        movw    %ax, 6(%edx)
        pop     %eax
        ret

/* cmos_read: AL = register AL. cmos_write: register AL = AH. Clobber AL. */
cmos_read:
        out     %al, $CMOS_INDEX
        in      $CMOS_DATA, %al
        ret
cmos_write:
        out     %al, $CMOS_INDEX
        mov     %ah, %al
        out     %al, $CMOS_DATA
        ret

/* read_time: EAX = 0x00hhmmss (binary). Preserves the other registers. */
read_time:
        push    %ebx
        mov     $RTC_HOURS, %al
        call    cmos_read
        movzbl  %al, %ebx
        shl     $8, %ebx
        mov     $RTC_MINUTES, %al
        call    cmos_read
        mov     %al, %bl
        shl     $8, %ebx
        mov     $RTC_SECONDS, %al
        call    cmos_read
        mov     %al, %bl
        mov     %ebx, %eax
        pop     %ebx
        ret

/* put_time: print EAX = 0x00hhmmss as hh:mm:ss. Preserves all registers. */
put_time:
        pusha
        mov     %eax, %esi
        shr     $16, %eax
        call    put2
        mov     $':', %al
        call    putc
        mov     %esi, %eax
        shr     $8, %eax
        movzbl  %al, %eax
        call    put2
        mov     $':', %al
        call    putc
        mov     %esi, %eax
        movzbl  %al, %eax
        call    put2
        popa
        ret

/* put2: EAX (0..99) as two decimal digits. Preserves all registers. */
put2:
        cmp     $10, %eax
        jae     putdec
        push    %eax
        mov     $'0', %al
        call    putc
        pop     %eax
        jmp     putdec

        .section .rodata
        .balign 8
gdt:    .quad   0
gdt_code:
        .quad   0x00cf9a000000ffff              /* flat 4 GiB code, 32-bit, DPL 0 */
gdt_data:
        .quad   0x00cf92000000ffff              /* flat 4 GiB data, DPL 0 */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
idt_desc:
        .word   NVECTORS * 8 - 1
        .long   idt

        .bss
        .balign 8
idt:            .skip   NVECTORS * 8
rise_polls:     .skip   4
fall_polls:     .skip   4
start_time:     .skip   4
alarm_time:     .skip   4
irq_flags:      .skip   4
irq_time:       .skip   4
updates:        .skip   4
        .balign 16
stack:          .skip   4096
stack_top:
