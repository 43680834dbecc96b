/*
 * spin.S - a guest that never ends (64-bit long mode), for timeout tests.
 * Prints "spinning forever", then loops without exiting to the VMM, so only
 * the VMM's timeout (or a signal) can end the run.
 */

        .code64
        .text
        .globl  _start
_start:
        cld                             /* lodsb in puts must walk forwards */
        mov     $msg, %esi
        call    puts
1:      jmp     1b

        .include "uart.inc"

        .section .rodata
msg:    .asciz  "spinning forever\n"
