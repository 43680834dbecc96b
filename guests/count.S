/*
 * count.S - a guest that counts on the serial port forever (64-bit long mode),
 * one decimal number per line: 1, 2, 3, ... The counter lives in guest RAM, so
 * a snapshot that loses memory, registers or the UART shows as a gap or a
 * repeat in the sequence (pause/resume and snapshot/restore tests).
 */

        .set    DELAY, 20000            /* spin iterations between lines */

        .code64
        .text
        .globl  _start
_start:
        cld                             /* lodsb in puts must walk forwards */
next:
        mov     counter, %rax
        inc     %rax
        mov     %rax, counter
        mov     $bufend, %edi           /* digits are written backwards from here */
        movb    $0, (%rdi)
        dec     %rdi
        movb    $'\n', (%rdi)
        mov     $10, %ecx
1:      xor     %edx, %edx
        div     %rcx                    /* RAX = RAX / 10, RDX = the digit */
        add     $'0', %dl
        dec     %rdi
        mov     %dl, (%rdi)
        test    %rax, %rax
        jnz     1b
        mov     %edi, %esi
        call    puts
        mov     $DELAY, %ecx
2:      dec     %ecx
        jnz     2b
        jmp     next

        .include "uart.inc"

        .data
        .balign 8
counter: .quad  0
buf:    .skip   24
bufend: .byte   0
