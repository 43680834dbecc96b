/*
 * gdbtest.S - a small 64-bit long-mode guest to debug with gdb (`pykvm run gdbtest --gdb :1234`).
 *
 * Its ELF with symbols is committed next to the flat image (gdbtest.elf), so
 * `gdb guests/gdbtest.elf -ex 'target remote :1234'` knows its labels.
 * It prints a line, then calls `bump` (which increments the 32-bit variable
 * `counter`) ROUNDS times from `main_loop`, and writes `counter` to the
 * debug-exit port: alone it ends with status (3 << 1) | 1 = 7. A debugger that
 * changes `counter` on the way changes the exit status, which the tests check.
 * Register RBX counts the calls made so far.
 */

        .set    DEBUG_EXIT, 0xf4
        .set    ROUNDS, 3

        .code64
        .text
        .globl  _start
_start:
        cld                             /* lodsb in puts must walk forwards */
        mov     $banner, %esi
        call    puts
        xor     %ebx, %ebx

        .globl  main_loop
main_loop:
        call    bump
        inc     %ebx
        cmp     $ROUNDS, %ebx
        jb      main_loop

        .globl  finish
finish:
        mov     counter(%rip), %eax
        out     %al, $DEBUG_EXIT        /* the run ends here: status (counter << 1) | 1 */
        cli
1:      hlt
        jmp     1b

/* bump: counter += 1 */
        .globl  bump
        .type   bump, @function
bump:
        incl    counter(%rip)
        ret
        .size   bump, . - bump

        .include "uart.inc"

banner: .asciz  "gdbtest: counting\n"

        .data
        .balign 4
        .globl  counter
        .type   counter, @object
counter:
        .long   0
        .size   counter, 4
