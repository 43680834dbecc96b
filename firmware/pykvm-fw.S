/*
 * pykvm-fw.S - from the reset vector to long mode: a minimal x86 firmware.
 *
 * A VMM can write any CPU state straight into a vCPU (pykvm's direct boot does).
 * Real hardware cannot: after reset the CPU is in 16-bit real mode and some code
 * has to walk it, instruction by instruction, to the mode the OS wants. This is
 * that code, and nothing else: no BIOS services, no device setup.
 *
 * The image is 64 KiB and mapped read-only so that it ends at 4 GiB, at
 * 0xFFFF0000..0xFFFFFFFF. The vCPU starts in the architectural reset state:
 *
 *     CS.selector = 0xF000 but CS.base = 0xFFFF0000 (the hidden part of CS is
 *     not selector*16 after reset), IP = 0xFFF0  ->  first fetch at 0xFFFFFFF0,
 *     the last 16 bytes of this image. CR0 = 0x60000010 (CD, NW: caches off),
 *     DS = ES = SS = 0, interrupts off, EDX = CPU signature, no usable stack.
 *
 * As long as CS is not reloaded, real-mode code runs at CS.base + IP, so all 64
 * KiB of this image are reachable from real mode with 16-bit offsets. Nothing
 * below 1 MiB is firmware here (RAM only), so ROM data is read with a %cs:
 * override while in real mode.
 *
 * The VMM leaves a hand-off block in RAM at 0x6000 (see README.md):
 *     +0  u32 magic  0x4d564b50 ("PKVM")
 *     +4  u32 mode   0 real, 1 prot32, 2 paged32, 3 pae, 4 long64
 *     +8  u64 entry  where to jump
 *     +16 u64 stack  the stack pointer to hand over
 *     +24 u64 rax, +32 u64 rbx, +40 u64 rsi: registers the boot protocol passes
 *         (Multiboot: EAX magic, EBX info; Linux: RSI boot_params; PVH: EBX start info);
 *         ignored in real mode
 * The firmware builds exactly the state pykvm's direct boot gives a guest in
 * that mode (pykvm/x86/modes.py) and jumps to entry. On a bad block it prints a
 * line on COM1 and writes 0x7e to the debug-exit port 0xf4 (host status 253).
 *
 * The firmware itself never uses a stack (it has none that it could trust):
 * no call/ret, no push/pop - except the real-mode hand-off's final far return.
 */

        .set    ROM_BASE, 0xffff0000    /* guest-physical address of this image */

        .set    HANDOFF, 0x6000
        .set    HO_MAGIC, HANDOFF + 0
        .set    HO_MODE, HANDOFF + 4
        .set    HO_ENTRY, HANDOFF + 8
        .set    HO_STACK, HANDOFF + 16
        .set    HO_RAX, HANDOFF + 24
        .set    HO_RBX, HANDOFF + 32
        .set    HO_RSI, HANDOFF + 40
        .set    MAGIC, 0x4d564b50       /* "PKVM" read as a little-endian u32 */

        .set    MODE_REAL, 0
        .set    MODE_PROT32, 1
        .set    MODE_PAGED32, 2
        .set    MODE_PAE, 3
        .set    MODE_LONG64, 4

        /* Where pykvm's direct boot puts its structures; the firmware uses the same places. */
        .set    GDT_ADDR, 0x500
        .set    PT_ADDR, 0x70000

        /* Selectors of the boot GDT (Linux's boot protocol uses 0x10/0x18 too). */
        .set    SEL_CODE32, 0x08        /* always 32-bit code: the firmware's own protected-mode code */
        .set    SEL_CODE, 0x10          /* the mode's code segment: 32-bit, or 64-bit for long64 */
        .set    SEL_DATA, 0x18

        .set    CR0_PE, 1 << 0
        .set    CR0_ET, 1 << 4
        .set    CR0_PG, 1 << 31
        .set    CR4_PSE, 1 << 4
        .set    CR4_PAE, 1 << 5
        .set    MSR_EFER, 0xc0000080
        .set    EFER_LME, 1 << 8

        /* Page-table entry bits. */
        .set    PTE_P, 1 << 0
        .set    PTE_RW, 1 << 1
        .set    PTE_PS, 1 << 7          /* large page: 4 MiB (32-bit PDE) or 2 MiB (PAE/long PDE) */

        .set    UART_THR, 0x3f8
        .set    UART_LSR, 0x3fd
        .set    LSR_THRE, 0x20
        .set    DEBUG_EXIT, 0xf4
        .set    FAIL_CODE, 0x7e         /* host status (0x7e << 1) | 1 = 253 */

/* In real mode a ROM label x is reached as %cs:(x - rom_start): its 16-bit offset
 * from CS.base = ROM_BASE. A difference of two labels in one section is an
 * assembly-time constant, so no 16-bit relocation is needed. */

        .text
        .code16
rom_start:

/* ---------------------------------------------------------------------------
 * 1. Real mode, straight from the reset vector (CS.base = 0xFFFF0000).
 * ------------------------------------------------------------------------ */
start16:
        cli                             /* already off after reset; say so */
        cld                             /* string instructions walk upwards */

        /* No IDT: with limit 0 any exception or interrupt shuts the VM down
         * (a triple fault) instead of vectoring through whatever RAM holds at 0.
         * This is also the IDT the payload gets. */
        lidtl   %cs:(null_idt - rom_start)

        /* Reset leaves the caches disabled (CR0.CD|NW). Turn them on: CR0 = ET,
         * the value a direct boot gives a real-mode guest. */
        mov     $CR0_ET, %eax
        mov     %eax, %cr0

        xor     %ax, %ax                /* DS = ES = 0: addresses below 64 KiB are physical */
        mov     %ax, %ds
        mov     %ax, %es

        /* Validate the hand-off block before leaving real mode, so there is one
         * error path, and it can talk to the UART with 16-bit code. */
        mov     $(msg_no_block - rom_start), %si
        cmpl    $MAGIC, HO_MAGIC
        jne     fail
        mov     $(msg_bad_mode - rom_start), %si
        mov     HO_MODE, %eax
        cmp     $MODE_LONG64, %eax
        ja      fail
        cmp     $MODE_REAL, %eax
        je      real_handoff
        cmp     $MODE_LONG64, %eax
        je      check_long_mode

        /* 32-bit modes: entry and stack must lie below 4 GiB. */
        mov     $(msg_bad_entry - rom_start), %si
        cmpl    $0, HO_ENTRY + 4
        jne     fail
        cmpl    $0, HO_STACK + 4
        jne     fail
        jmp     enter_protected

check_long_mode:
        /* CPUID 0x80000001: EDX bit 29 (LM) says whether the CPU has long mode. */
        mov     $(msg_no_lm - rom_start), %si
        mov     $0x80000000, %eax
        cpuid
        cmp     $0x80000001, %eax
        jb      fail
        mov     $0x80000001, %eax
        cpuid
        bt      $29, %edx
        jnc     fail
        jmp     enter_protected

/* ---------------------------------------------------------------------------
 * fail: print the NUL-terminated ROM string at %cs:SI on COM1, then end the
 * run through the debug-exit port. Polls LSR.THRE before each byte.
 * ------------------------------------------------------------------------ */
fail:
1:      mov     %cs:(%si), %bl
        inc     %si
        test    %bl, %bl
        jz      3f
        mov     $UART_LSR, %dx
2:      in      %dx, %al
        test    $LSR_THRE, %al
        jz      2b
        mov     %bl, %al
        mov     $UART_THR, %dx
        out     %al, %dx
        jmp     1b
3:      mov     $FAIL_CODE, %al
        out     %al, $DEBUG_EXIT
4:      hlt                             /* no debug-exit device: stop here */
        jmp     4b

/* ---------------------------------------------------------------------------
 * 2a. Mode 0, real: stay in real mode. CS:IP = 0:entry below 64 KiB, otherwise
 * (entry >> 4):0 (entry 16-byte aligned, below 1 MiB); DS = ES = FS = GS = SS
 * = CS; SP = stack (0xFFFE when CS != 0), as pykvm/x86/modes.py does.
 * ------------------------------------------------------------------------ */
real_handoff:
        mov     $(msg_bad_entry - rom_start), %si
        cmpl    $0, HO_ENTRY + 4
        jne     fail
        mov     HO_ENTRY, %eax
        cmp     $0x10000, %eax
        jb      1f
        test    $0xf, %al               /* a paragraph boundary below 1 MiB */
        jnz     fail
        cmp     $0x100000, %eax
        jae     fail
        shr     $4, %eax
        mov     %eax, %ebx              /* EBX = segment */
        xor     %ecx, %ecx              /* ECX = offset 0 */
        mov     $0xfffe, %edx           /* EDX = SP: the top of the payload's segment */
        jmp     2f
1:      xor     %ebx, %ebx              /* segment 0, offset = entry */
        mov     %eax, %ecx
        movzwl  HO_STACK, %edx
2:
        /* The only way to load CS is a far jump/call/return. The target is only
         * known at run time and the ROM is not writable, so push CS:IP on the
         * payload's own stack and far-return to it: SP ends where it started. */
        mov     %bx, %ss                /* a mov to SS holds off interrupts for one instruction */
        mov     %edx, %esp
        push    %bx
        push    %cx
        mov     %bx, %ds
        mov     %bx, %es
        mov     %bx, %fs
        mov     %bx, %gs
        xor     %eax, %eax              /* general-purpose registers 0, like a direct boot */
        xor     %ebx, %ebx
        xor     %ecx, %ecx
        xor     %edx, %edx              /* (EDX held the CPU signature since reset) */
        xor     %esi, %esi
        xor     %edi, %edi
        xor     %ebp, %ebp
        sahf                            /* AH = 0: clear SF ZF AF PF CF (xor cleared OF): FLAGS = 0x0002 */
        lret                            /* pops IP, then CS */

/* ---------------------------------------------------------------------------
 * 2b. Modes 1..4: into 32-bit protected mode.
 * ------------------------------------------------------------------------ */
enter_protected:
        /* Copy the GDT to RAM at 0x500, where pykvm's direct boot puts it: the
         * payload may reload a segment register at any time, so the table must
         * stay valid and writable after the hand-off. 16 words, ROM -> RAM. */
        mov     $(gdt_prot - rom_start), %si
        cmpl    $MODE_LONG64, HO_MODE
        jne     1f
        mov     $(gdt_long - rom_start), %si
1:      mov     $GDT_ADDR, %di
        mov     $16, %cx
        rep movsw %cs:(%si), %es:(%di)

        /* lgdtl (with the operand-size prefix) loads all 32 bits of the base. */
        lgdtl   %cs:(gdtr - rom_start)

        /* CR0.PE: from now on segment registers hold selectors into the GDT. CD
         * and NW stay clear: CR0 = PE | ET. */
        mov     $(CR0_PE | CR0_ET), %eax
        mov     %eax, %cr0

        /* CS still holds its real-mode hidden state; a far jump loads a 32-bit
         * code descriptor. The target is a linear address (the descriptor's base
         * is 0), so this is ROM_BASE + offset: the linker placed us there. */
        ljmpl   $SEL_CODE32, $start32

        .code32
start32:
        mov     $SEL_DATA, %eax         /* flat 4 GiB data for every data segment register */
        mov     %eax, %ds
        mov     %eax, %es
        mov     %eax, %fs
        mov     %eax, %gs
        mov     %eax, %ss

        mov     HO_MODE, %eax
        cmp     $MODE_PROT32, %eax
        je      enter32
        cmp     $MODE_PAGED32, %eax
        je      paged32
        cmp     $MODE_PAE, %eax
        je      pae
        jmp     long64

/* ---------------------------------------------------------------------------
 * Page tables: all three formats identity-map the low 4 GiB with large pages,
 * at 0x70000 like pykvm/x86/paging.py. The firmware itself runs at 0xFFFFxxxx,
 * so that top page must be mapped too, or the instruction after "CR0.PG = 1"
 * could not be fetched.
 * ------------------------------------------------------------------------ */

/* fill_directories base: at \base, four contiguous page directories of 512
 * 8-byte entries, entry k mapping k * 2 MiB (a 2 MiB page): 4 GiB in all. 2048
 * iterations: a few ms even where every instruction is emulated. */
.macro  fill_directories base
        mov     $\base, %edi
        mov     $(PTE_PS | PTE_RW | PTE_P), %eax
        mov     $2048, %ecx
1:      mov     %eax, (%edi)
        movl    $0, 4(%edi)             /* physical address bits 32..63: 0 */
        add     $8, %edi
        add     $0x200000, %eax
        dec     %ecx
        jnz     1b
.endm

/* 2c. Mode 2, paged32: one page directory of 1024 4 MiB pages (needs CR4.PSE). */
paged32:
        mov     $PT_ADDR, %edi
        mov     $(PTE_PS | PTE_RW | PTE_P), %eax        /* entry i maps i * 4 MiB */
        mov     $1024, %ecx
1:      stosl
        add     $0x400000, %eax
        dec     %ecx
        jnz     1b
        mov     $CR4_PSE, %eax
        mov     %eax, %cr4
        mov     $PT_ADDR, %eax
        mov     %eax, %cr3
        mov     $(CR0_PG | CR0_PE | CR0_ET), %eax
        mov     %eax, %cr0
        jmp     enter32

/* 2d. Mode 3, pae: a 4-entry PDPT at PT_ADDR over four directories at
 * PT_ADDR + 0x1000.. (2048 2 MiB pages). In PAE PDPTEs only P may be set. */
pae:
        fill_directories PT_ADDR + 0x1000
        mov     $PT_ADDR, %edi
        mov     $(PT_ADDR + 0x1000 + PTE_P), %eax
        mov     $4, %ecx
1:      stosl                           /* low half: directory address | P */
        movl    $0, (%edi)              /* high half: 0 */
        add     $4, %edi
        add     $0x1000, %eax
        dec     %ecx
        jnz     1b
        mov     $CR4_PAE, %eax
        mov     %eax, %cr4
        mov     $PT_ADDR, %eax
        mov     %eax, %cr3
        mov     $(CR0_PG | CR0_PE | CR0_ET), %eax
        mov     %eax, %cr0
        jmp     enter32

/* 2e. Mode 4, long64: PML4 at PT_ADDR -> PDPT at PT_ADDR + 0x1000 (4 entries)
 * -> four directories at PT_ADDR + 0x2000.. . Long mode needs paging, and
 * paging in long mode needs these PAE-format (64-bit entry) tables. */
long64:
        /* RAM is not zero after a real reset: clear the PML4 and PDPT pages so
         * that only the entries written below are present. 2 x 4 KiB. */
        mov     $PT_ADDR, %edi
        xor     %eax, %eax
        mov     $(0x2000 / 4), %ecx
        rep stosl

        fill_directories PT_ADDR + 0x2000
        mov     $(PT_ADDR + 0x1000), %edi               /* PDPT[0..3] -> the directories */
        mov     $(PT_ADDR + 0x2000 + PTE_RW + PTE_P), %eax
        mov     $4, %ecx
1:      mov     %eax, (%edi)            /* high halves are already 0 */
        add     $8, %edi
        add     $0x1000, %eax
        dec     %ecx
        jnz     1b
        movl    $(PT_ADDR + 0x1000 + PTE_RW + PTE_P), PT_ADDR   /* PML4[0] -> PDPT */

        /* The architectural order: CR4.PAE, CR3, EFER.LME, then CR0.PG. Setting
         * PG with LME set activates long mode (the CPU sets EFER.LMA); we are
         * then in compatibility mode, still running this 32-bit code. */
        mov     $CR4_PAE, %eax
        mov     %eax, %cr4
        mov     $PT_ADDR, %eax
        mov     %eax, %cr3
        mov     $MSR_EFER, %ecx
        mov     $EFER_LME, %eax         /* EFER = LME exactly (EDX:EAX = 0:0x100) */
        xor     %edx, %edx
        wrmsr
        mov     $(CR0_PG | CR0_PE | CR0_ET), %eax
        mov     %eax, %cr0

        /* A far jump to the 64-bit code descriptor (L=1) enters 64-bit mode. */
        ljmp    $SEL_CODE, $start64

/* ---------------------------------------------------------------------------
 * 3. The hand-off in 32-bit modes (prot32, paged32, pae): CS = 0x10.
 * ------------------------------------------------------------------------ */
enter32:
        ljmp    $SEL_CODE, $1f          /* CS = 0x10, the selector a direct boot loads */
1:      mov     HO_STACK, %esp
        xor     %eax, %eax
        xor     %ebx, %ebx
        xor     %ecx, %ecx
        xor     %edx, %edx
        xor     %esi, %esi
        xor     %edi, %edi
        xor     %ebp, %ebp
        sahf                            /* EFLAGS = 0x00000002, as after reset */
        mov     HO_RAX, %eax            /* the boot protocol's registers (mov leaves flags alone) */
        mov     HO_RBX, %ebx
        mov     HO_RSI, %esi
        jmp     *HO_ENTRY               /* a near jump through memory: no register, no stack */

/* ---------------------------------------------------------------------------
 * 3'. The hand-off in long64: 64-bit mode, CS = 0x10, data segments = 0x18
 * (loaded in start32; 64-bit mode ignores their base and limit).
 * ------------------------------------------------------------------------ */
        .code64
start64:
        mov     HO_STACK, %rsp          /* absolute address 0x6010 (not RIP-relative) */
        xor     %eax, %eax              /* 32-bit writes zero the upper halves too */
        xor     %ebx, %ebx
        xor     %ecx, %ecx
        xor     %edx, %edx
        xor     %esi, %esi
        xor     %edi, %edi
        xor     %ebp, %ebp
        xor     %r8d, %r8d
        xor     %r9d, %r9d
        xor     %r10d, %r10d
        xor     %r11d, %r11d
        xor     %r12d, %r12d
        xor     %r13d, %r13d
        xor     %r14d, %r14d
        xor     %r15d, %r15d
        sahf                            /* RFLAGS = 0x2 */
        mov     HO_RAX, %rax            /* the boot protocol's registers (mov leaves flags alone) */
        mov     HO_RBX, %rbx
        mov     HO_RSI, %rsi
        jmp     *HO_ENTRY

/* ---------------------------------------------------------------------------
 * Read-only data. The GDTs are copied to GDT_ADDR; their bytes are those of
 * pykvm/x86/segments.py flat_gdt(): base 0, limit 0xFFFFF with G=1 (4 GiB),
 * access 0x9B (present, code, execute/read, accessed) or 0x93 (present, data,
 * read/write, accessed), flags 0xC (G, D=32-bit) or 0xA (G, L=64-bit; L needs D=0).
 * ------------------------------------------------------------------------ */
        .balign 8
gdt_prot:
        .quad   0                       /* 0x00 null */
        .quad   0x00cf9b000000ffff      /* 0x08 32-bit code */
        .quad   0x00cf9b000000ffff      /* 0x10 the mode's code: 32-bit */
        .quad   0x00cf93000000ffff      /* 0x18 data */
gdt_long:
        .quad   0                       /* 0x00 null */
        .quad   0x00cf9b000000ffff      /* 0x08 32-bit code (the firmware's, until long mode) */
        .quad   0x00af9b000000ffff      /* 0x10 the mode's code: 64-bit */
        .quad   0x00cf93000000ffff      /* 0x18 data */

gdtr:   .word   32 - 1                  /* limit: 4 descriptors */
        .long   GDT_ADDR                /* base: the RAM copy */

null_idt:
        .word   0                       /* limit 0: no vector is valid */
        .long   0

msg_no_block:   .asciz  "pykvm-fw: no hand-off block\n"
msg_bad_mode:   .asciz  "pykvm-fw: bad mode in the hand-off block\n"
msg_bad_entry:  .asciz  "pykvm-fw: entry or stack out of range for the mode\n"
msg_no_lm:      .asciz  "pykvm-fw: this CPU has no long mode\n"

/* ---------------------------------------------------------------------------
 * The reset vector: the last 16 bytes, at 0xFFFFFFF0. Real mode, CS.base =
 * 0xFFFF0000, IP = 0xFFF0: a near jump stays in this 64 KiB segment.
 * ------------------------------------------------------------------------ */
        .code16
        .org    0xfff0, 0xff            /* unused ROM reads as 0xff, like erased flash */
        .globl  reset_vector
reset_vector:
        jmp     start16
        .org    0x10000, 0xff           /* the image is exactly 64 KiB and ends at 4 GiB */
