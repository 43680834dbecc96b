/*
 * gdbalias.S - a 64-bit long-mode guest that maps one page of code twice, for
 * gdb breakpoints on two virtual addresses of one physical byte
 * (`pykvm run gdbalias --gdb :1234`; its ELF with symbols, gdbalias.elf, is
 * committed too).
 *
 * It builds its own 4-level page tables at TABLES (1 MiB): the first 2 MiB
 * identity-mapped with 4 KiB pages, and the virtual page ALIAS (2 MiB) mapped
 * to the physical page of `shared`. Then:
 *
 *     call shared                 through its identity address (a_count = 1)
 *     call ALIAS                  the same bytes through the alias (a_count = 2)
 *   remap:                        ALIAS now maps the page of `other`; CR3 reloaded
 *   remapped:
 *     call ALIAS                  `other` through the alias (b_count = 1)
 *     call shared                 identity again (a_count = 3)
 *
 * and checks that the first byte of `shared` and of `other` is still the
 * opcode it assembled there (0xff, incl): a debugger that left an int3 (0xcc)
 * behind fails it ("gdbalias: int3 left in memory", exit 0x7e, status 253).
 * Otherwise it exits with (a_count << 4) | b_count = 0x31: status 99.
 * `shared` and `other` use absolute addresses only, so they run the same at
 * either virtual address.
 */

        .set    DEBUG_EXIT, 0xf4
        .set    TABLES, 0x100000        /* PML4, PDPT, PD, PT0, PT1: five pages */
        .set    PML4, TABLES
        .set    PDPT, TABLES + 0x1000
        .set    PD, TABLES + 0x2000
        .set    PT0, TABLES + 0x3000    /* 0 .. 2 MiB, identity */
        .set    PT1, TABLES + 0x4000    /* 2 MiB .. 4 MiB: only ALIAS */
        .set    ALIAS, 0x200000
        .set    PRESENT_RW, 0x3
        .set    INCL, 0xff              /* first byte of `incl abs32` */

        .code64
        .text
        .globl  _start
_start:
        cld
        mov     $banner, %esi
        call    puts

        /* the page tables: zero five pages, then link them */
        mov     $TABLES, %edi
        xor     %eax, %eax
        mov     $(5 * 4096 / 8), %ecx
        rep stosq
        movq    $(PDPT + PRESENT_RW), PML4
        movq    $(PD + PRESENT_RW), PDPT
        movq    $(PT0 + PRESENT_RW), PD
        movq    $(PT1 + PRESENT_RW), PD + 8
        xor     %ecx, %ecx
1:      mov     %rcx, %rax
        shl     $12, %rax
        or      $PRESENT_RW, %rax
        mov     %rax, PT0(,%rcx,8)
        inc     %ecx
        cmp     $512, %ecx
        jb      1b
        movq    $(shared_page + PRESENT_RW), PT1
        mov     $PML4, %eax
        mov     %rax, %cr3

        .globl  main
main:
        call    shared
        mov     $ALIAS, %eax
        call    *%rax

        .globl  remap
remap:
        movq    $(other_page + PRESENT_RW), PT1
        mov     %cr3, %rax
        mov     %rax, %cr3              /* flush the TLB */
        .globl  remapped
remapped:
        mov     $ALIAS, %eax
        call    *%rax
        call    shared

        .globl  check
check:
        cmpb    $INCL, shared
        jne     1f
        cmpb    $INCL, other
        jne     1f
        mov     a_count, %eax
        shl     $4, %eax
        or      b_count, %eax
        out     %al, $DEBUG_EXIT
        cli
2:      hlt
        jmp     2b
1:      mov     $broken, %esi
        call    puts
        mov     $0x7e, %al
        out     %al, $DEBUG_EXIT
        cli
3:      hlt
        jmp     3b

        .include "uart.inc"

banner: .asciz  "gdbalias: one page, two addresses\n"
broken: .asciz  "gdbalias: int3 left in memory\n"

        .balign 4
        .globl  a_count, b_count
a_count: .long  0
b_count: .long  0

/* The two code pages: each starts with its function; absolute addressing. */
        .balign 4096
        .globl  shared
        .type   shared, @function
shared_page:
shared:
        incl    a_count
        ret
        .size   shared, . - shared

        .balign 4096
        .globl  other
        .type   other, @function
other_page:
other:
        incl    b_count
        ret
        .size   other, . - other
