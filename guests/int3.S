/*
 * int3.S - a breakpoint exception through a 64-bit IDT (64-bit long mode).
 *
 * Builds an IDT whose vector 3 (#BP) is a 64-bit interrupt gate to bp_handler,
 * loads it, and executes `int3` (0xCC). The handler reports the return RIP from
 * its interrupt frame and returns with `iretq`. Output:
 *
 *     int3: before
 *     int3: expected=<16 hex>                 (the address right after the int3)
 *     int3: #BP handler, rip=<16 hex>         (RIP in the frame the CPU pushed)
 *     int3: after
 *
 * then `cli; hlt` (status 0). The two addresses must be equal: #BP is a trap,
 * so the frame holds the address of the next instruction. If they differ,
 * or the handler never ran, it prints "int3: FAIL" and writes 0x7d to the
 * debug-exit port (status 251). Any other exception (vectors 0..2 are not
 * present; the IDT ends after vector 3) escalates to a triple fault.
 *
 * Where KVM cannot run `int3` itself (the kvm_pvm backend: the instruction is an
 * emulation failure at CPL0 in 64-bit mode), the VMM must step over it and
 * inject #BP; this guest tests that fallback.
 */

        .set    DEBUG_EXIT, 0xf4
        .set    BP_VECTOR, 3
        .set    IDT_ENTRIES, BP_VECTOR + 1
        .set    GATE_SIZE, 16                   /* 64-bit IDT gate descriptor */
        .set    GATE_INTR64, 0x8e               /* present, DPL 0, type 0xE: 64-bit interrupt gate */

        .code64
        .text
        .globl  _start
_start:
        cld                                     /* lodsb in puts must walk forwards */

        /* The #BP gate: offset 15:0 | selector | IST, type | offset 31:16 | offset 63:32 | 0 */
        lea     idt + BP_VECTOR * GATE_SIZE, %rdi
        mov     $bp_handler, %eax               /* zero-extends into RAX */
        mov     %ax, 0(%rdi)                    /* offset 15:0 */
        mov     %cs, %dx                        /* the VMM's code selector */
        mov     %dx, 2(%rdi)
        movb    $0, 4(%rdi)                     /* IST 0: stay on the current stack */
        movb    $GATE_INTR64, 5(%rdi)
        shr     $16, %rax
        mov     %ax, 6(%rdi)                    /* offset 31:16 */
        shr     $16, %rax
        mov     %eax, 8(%rdi)                   /* offset 63:32 */
        movl    $0, 12(%rdi)
        lidt    idt_desc

        mov     $s_before, %esi
        call    puts
        mov     $s_expected, %esi
        call    puts
        mov     $after_int3, %eax
        call    puthex64
        mov     $'\n', %al
        call    putc

        int3                                    /* 0xCC: #BP, a trap */
after_int3:
        mov     $s_after, %esi
        call    puts

        mov     seen_rip, %rax
        cmp     $after_int3, %rax
        jne     fail
        cli                                     /* halt with interrupts off: status 0 */
1:      hlt
        jmp     1b

fail:
        mov     $s_fail, %esi
        call    puts
        mov     $0x7d, %al
        out     %al, $DEBUG_EXIT
        cli
1:      hlt
        jmp     1b

/* bp_handler: the #BP handler. No error code, so the frame is RIP, CS, RFLAGS,
 * RSP, SS from the top of the stack. */
bp_handler:
        push    %rax
        push    %rbx
        push    %rcx
        push    %rdx
        push    %rsi
        push    %rdi
        mov     $s_handler, %esi
        call    puts
        mov     6*8(%rsp), %rax                 /* the frame's RIP, above the 6 saved registers */
        mov     %rax, seen_rip
        call    puthex64
        mov     $'\n', %al
        call    putc
        pop     %rdi
        pop     %rsi
        pop     %rdx
        pop     %rcx
        pop     %rbx
        pop     %rax
        iretq

/* puthex64: print RAX as 16 lowercase hex digits. Clobbers RAX, BL, ECX, DX, RDI. */
puthex64:
        mov     %rax, %rdi
        mov     $16, %ecx
1:      rol     $4, %rdi                        /* next nibble into the low 4 bits */
        mov     %edi, %eax
        and     $0xf, %al
        add     $'0', %al
        cmp     $'9', %al
        jbe     2f
        add     $('a' - '9' - 1), %al           /* 10..15 -> 'a'..'f' */
2:      call    putc
        dec     %ecx
        jnz     1b
        ret

        .include "uart.inc"

        .section .rodata
s_before:       .asciz  "int3: before\n"
s_expected:     .asciz  "int3: expected="
s_handler:      .asciz  "int3: #BP handler, rip="
s_after:        .asciz  "int3: after\n"
s_fail:         .asciz  "int3: FAIL\n"

        .balign 8
idt_desc:
        .word   IDT_ENTRIES * GATE_SIZE - 1
        .quad   idt

        .data
        .balign 8
seen_rip:       .quad   0                       /* the handler's RIP, 0 until it runs */

        .balign 16
idt:    .skip   IDT_ENTRIES * GATE_SIZE         /* zero: vectors 0..2 not present */
