/*
 * virtio-entry.S - the Multiboot entry of the C test kernels (virtio.c):
 * the Multiboot v1 header (page-align modules + memory info, no a.out kludge),
 * a 16 KiB stack, and a call kmain(magic, info). Entered in 32-bit protected
 * mode, paging off, EAX = 0x2badb002, EBX = the Multiboot information.
 */

        .set    MB_HEADER_MAGIC, 0x1badb002
        .set    MB_FLAGS, (1 << 0) | (1 << 1)
        .set    DEBUG_EXIT, 0xf4

        .pushsection .multiboot, "a"
        .balign 4
        .long   MB_HEADER_MAGIC
        .long   MB_FLAGS
        .long   -(MB_HEADER_MAGIC + MB_FLAGS)
        .popsection

        .code32
        .text
        .globl  _start
_start:
        cli
        cld                             /* the C ABI wants DF clear */
        mov     $stack_top, %esp
        push    %ebx                    /* kmain(magic, info) */
        push    %eax
        call    kmain
        mov     $0x7f, %al              /* kmain never returns; if it did: status 255 */
        out     %al, $DEBUG_EXIT
1:      hlt
        jmp     1b

        .bss
        .balign 16
        .space  16384
stack_top:
