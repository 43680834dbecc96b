/*
 * hello.S - "Hello" in every x86 CPU mode, and proof of which mode it ran in.
 *
 * Assembled five times with `as --defsym MODE=n` (see the Makefile). The VMM
 * puts the vCPU in the mode before the first instruction, so this file never
 * switches modes: it only picks the matching .code16/.code32/.code64 and name.
 * Output (two lines), then `cli; hlt`:
 *     Hello from <mode>!
 *     cr0=XXXXXXXX cr4=XXXXXXXX efer=XXXXXXXX
 * The register line lets a test check that the VMM really set the mode up
 * (CR0.PE/PG, CR4.PSE/PAE, EFER.LME/LMA).
 */

        .set    REAL, 0
        .set    PROT32, 1
        .set    PAGED32, 2
        .set    PAE, 3
        .set    LONG64, 4

        .set    MSR_EFER, 0xc0000080

.if MODE == REAL
        .code16                         /* CS=DS=SS=0, IP=0x8000, SP=0x7000 */
.elseif MODE == LONG64
        .code64
.else
        .code32                         /* flat 4 GiB segments, paging on or off */
.endif

/* read_cr: copy control register \cr to EAX (in 64-bit mode only the 64-bit
 * form `mov %crN, %rax` exists; we print the low 32 bits either way). */
.macro  read_cr cr
.if MODE == LONG64
        mov     %\cr, %rax
.else
        mov     %\cr, %eax
.endif
.endm

        .text
        .globl  _start
_start:                                 /* loaded and entered at 0x8000 */
        cld                             /* lodsb in puts must walk forwards */
        mov     $hello, %esi
        call    puts

        mov     $s_cr0, %esi
        call    puts
        read_cr cr0
        call    puthex

        mov     $s_cr4, %esi
        call    puts
        read_cr cr4
        call    puthex

        mov     $s_efer, %esi
        call    puts
        mov     $MSR_EFER, %ecx         /* rdmsr: EDX:EAX = MSR[ECX] */
        rdmsr
        call    puthex

        mov     $'\n', %al
        call    putc

        cli                             /* halt with interrupts off: the VMM ends the run, status 0 */
1:      hlt
        jmp     1b

/* puthex: print EAX as 8 lowercase hex digits, most significant first.
 * 32-bit registers work in every mode (16-bit code gets a 0x66 prefix). */
puthex:
        mov     %eax, %edi
        mov     $8, %ecx
1:      rol     $4, %edi                /* next nibble into the low 4 bits */
        mov     %edi, %eax
        and     $0xf, %al
        add     $'0', %al
        cmp     $'9', %al
        jbe     2f
        add     $('a' - '9' - 1), %al   /* 10..15 -> 'a'..'f' */
2:      call    putc
        dec     %ecx
        jnz     1b
        ret

        .include "uart.inc"

        .section .rodata
hello:
.if MODE == REAL
        .ascii  "Hello from real mode!\n"
.elseif MODE == PROT32
        .ascii  "Hello from 32-bit protected mode!\n"
.elseif MODE == PAGED32
        .ascii  "Hello from 32-bit paging!\n"
.elseif MODE == PAE
        .ascii  "Hello from PAE paging!\n"
.elseif MODE == LONG64
        .ascii  "Hello from 64-bit long mode!\n"
.else
        .error  "MODE must be 0..4"
.endif
        .byte   0
s_cr0:  .asciz  "cr0="
s_cr4:  .asciz  " cr4="
s_efer: .asciz  " efer="
