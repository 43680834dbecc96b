/*
 * mmio.S - MMIO exits of every width (64-bit long mode).
 *
 * The VMM's test device sits at guest-physical 0xd0000000, in the MMIO hole
 * where there is no RAM, so every access below leaves the guest as a
 * KVM_EXIT_MMIO with its address, width and data:
 *     +0x0   ID, read-only, reads 0x4f494d4d ("MMIO" as little-endian bytes)
 *     +0x8   scratch, read/write, 1/2/4/8 bytes, reads back zero-extended
 *     +0x10  reads ~scratch, same width as the access
 * and, as odd widths KVM reports (3, 5, 6, 7 bytes), a far-pointer load (lfs,
 * 6 bytes) and a read that straddles the page boundary below the device.
 * Success: prints "mmio: id=MMIO scratch ok", then `cli; hlt` (status 0).
 * Check n failing: prints "mmio: FAIL <n>" and writes n to the debug-exit port.
 */

        .set    MMIO_BASE, 0xd0000000
        .set    REG_ID, 0x0
        .set    REG_SCRATCH, 0x8
        .set    REG_NOT, 0x10
        .set    DEBUG_EXIT, 0xf4

        .code64
        .text
        .globl  _start
_start:
        cld                             /* lodsb in puts must walk forwards */
        mov     $MMIO_BASE, %ebx        /* zero-extends into RBX */

        mov     $1, %edi                /* check 1: the ID register */
        mov     REG_ID(%rbx), %eax
        cmp     $0x4f494d4d, %eax
        jne     fail

        movabs  $0x1122334455667788, %rax
        mov     %rax, REG_SCRATCH(%rbx) /* one 8-byte MMIO write */

        mov     $2, %edi                /* check 2: 8-byte read back */
        mov     REG_SCRATCH(%rbx), %rdx
        cmp     %rax, %rdx
        jne     fail

        mov     $3, %edi                /* check 3: 4-byte read = low dword */
        mov     REG_SCRATCH(%rbx), %edx
        cmp     $0x55667788, %edx
        jne     fail

        mov     $4, %edi                /* check 4: 2-byte read = low word */
        mov     REG_SCRATCH(%rbx), %dx
        cmp     $0x7788, %dx
        jne     fail

        mov     $5, %edi                /* check 5: 1-byte read = low byte */
        mov     REG_SCRATCH(%rbx), %dl
        cmp     $0x88, %dl
        jne     fail

        mov     $6, %edi                /* check 6: 4-byte read of ~scratch */
        mov     REG_NOT(%rbx), %edx
        cmp     $~0x55667788 & 0xffffffff, %edx
        jne     fail

        mov     $7, %edi                /* check 7: a far-pointer load, one 6-byte MMIO read */
        movabs  $0x0000001812345678, %rax   /* offset 0x12345678, selector 0x18 (boot GDT data) */
        mov     %rax, REG_SCRATCH(%rbx)
        lfs     REG_SCRATCH(%rbx), %edx /* m16:32: 4-byte offset then 2-byte selector */
        cmp     $0x12345678, %edx
        jne     fail
        mov     %fs, %eax
        cmp     $0x18, %eax
        jne     fail

        mov     $8, %edi                /* check 8: a read split at a page boundary: the last */
        mov     -1(%rbx), %edx          /* byte below the device (unclaimed: 0xff), then "MMI" */
        cmp     $0x494d4dff, %edx
        jne     fail

        mov     $ok, %esi
        call    puts
        cli
1:      hlt
        jmp     1b

/* fail: EDI = number of the failed check (1..9). Print it, then report it
 * through the debug-exit port (the VMM exits with status (n << 1) | 1). */
fail:
        mov     $s_fail, %esi
        call    puts
        mov     %edi, %eax
        add     $'0', %al
        call    putc
        mov     $'\n', %al
        call    putc
        mov     %edi, %eax
        out     %al, $DEBUG_EXIT
        cli                             /* not reached if the VMM honours the port */
1:      hlt
        jmp     1b

        .include "uart.inc"

        .section .rodata
ok:     .asciz  "mmio: id=MMIO scratch ok\n"
s_fail: .asciz  "mmio: FAIL "
