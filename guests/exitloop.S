/*
 * exitloop.S - a tight loop of VM exits, for the exit-latency benchmark
 * (32-bit protected mode, paging off). Prints nothing.
 *
 * Image layout (the benchmark patches the two words in the file bytes):
 *     offset 0    short jmp over the parameter block
 *     offset 8    u32 count  number of exits to perform (default 1000)
 *     offset 12   u32 kind   0 = OUT  1 byte to port 0x80
 *                            1 = IN   1 byte from port 0x80
 *                            2 = MMIO 4-byte write to 0xd0000008
 *                            3 = MMIO 4-byte read from 0xd0000008
 *                            4 = CPUID leaf 0: an exit KVM handles in
 *                                the kernel (the floor: no VMM involved)
 * Each loop iteration is exactly one exiting instruction plus dec/jnz.
 * Ends with `cli; hlt` (status 0); an unknown kind writes 0x7f to the
 * debug-exit port (status 0xff).
 */

        .set    PORT, 0x80              /* the POST-code port: harmless everywhere */
        .set    MMIO_SCRATCH, 0xd0000008
        .set    DEBUG_EXIT, 0xf4

        .code32
        .text
        .globl  _start
_start:
        jmp     start                   /* 2-byte short jmp (EB 0E) */

        .org    8                       /* parameter block at fixed offsets */
count:  .long   1000
kind:   .long   0

start:
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

done:
        cli
1:      hlt
        jmp     1b
