/*
 * mbinfo.S - a Multiboot v1 kernel that prints what its boot loader gave it.
 *
 * Written for `qemu-system-x86_64 -kernel mbinfo.elf` and runs unchanged under
 * `pykvm run --kernel`: an ELF32 image loaded at 1 MiB, header flags
 * "page-align modules" + "memory info", no a.out kludge. Entered in 32-bit
 * protected mode, paging off, EAX = 0x2badb002, EBX = the Multiboot
 * information structure. It prints on COM1, one fact per line, each line only
 * when the info structure's flags say the field is valid:
 *
 *     mbinfo: magic=2badb002
 *     flags: <8 hex>                                      (the info flags word)
 *     cmdline: <string>                                   (flags bit 2)
 *     loader: <boot_loader_name>                          (bit 9)
 *     mem_lower=<dec KiB> mem_upper=<dec KiB>             (bit 0)
 *     boot_device: <8 hex>                                (bit 1)
 *     mmap: base=<16 hex> len=<16 hex> type=<dec>         (bit 6, one line per entry)
 *     module: start=<8 hex> end=<8 hex> string=<string> first=<up to 16 bytes>
 *                                                         (bit 3, one line per module)
 *     fw_cfg: signature=QEMU ram=<16 hex> cpus=<dec>      (or "fw_cfg: absent signature=<4 chars>")
 *     mbinfo: done
 *
 * Strings and module bytes are printed with non-printable bytes as '.'. Then
 * it writes 0x10 to the debug-exit port 0xf4 (status 33). A wrong magic prints
 * "mbinfo: bad magic" after the first line and exits with 0x7e (status 253).
 */

        .set    MB_FLAGS, MB_PAGE_ALIGN | MB_MEMORY_INFO

        /* Multiboot information structure: flags bits and field offsets */
        .set    MBI_FLAGS, 0
        .set    MBI_MEM_LOWER, 4                /* bit 0: KiB below 1 MiB */
        .set    MBI_MEM_UPPER, 8                /*        KiB from 1 MiB up to the first hole */
        .set    MBI_BOOT_DEVICE, 12             /* bit 1 */
        .set    MBI_CMDLINE, 16                 /* bit 2: physical address of a C string */
        .set    MBI_MODS_COUNT, 20              /* bit 3 */
        .set    MBI_MODS_ADDR, 24               /*        array of 16-byte module entries */
        .set    MBI_MMAP_LENGTH, 44             /* bit 6: bytes of the buffer */
        .set    MBI_MMAP_ADDR, 48
        .set    MBI_LOADER_NAME, 64             /* bit 9: C string */

        .set    F_MEM, 0
        .set    F_BOOT_DEVICE, 1
        .set    F_CMDLINE, 2
        .set    F_MODS, 3
        .set    F_MMAP, 6
        .set    F_LOADER_NAME, 9

        /* module entry: mod_start, mod_end, string, reserved */
        .set    MOD_START, 0
        .set    MOD_END, 4
        .set    MOD_STRING, 8
        .set    MOD_SIZE, 16

        /* mmap entry: size (of the rest, not counting itself), base u64, length u64, type */
        .set    MMAP_SIZE, 0
        .set    MMAP_BASE, 4
        .set    MMAP_LEN, 12
        .set    MMAP_TYPE, 20

        .set    MAX_MMAP_ENTRIES, 128           /* guards against a corrupt map */
        .set    MAX_MODULES, 64
        .set    FIRST_BYTES, 16

        .code32
        .text
        .include "uart.inc"
        .include "kernel.inc"

        multiboot_header MB_FLAGS

        .globl  _start
_start:
        cli
        cld                             /* lodsb must walk forwards */
        mov     $stack_top, %esp
        mov     %ebx, %ebp              /* EBP = info structure for the whole run */
        mov     %eax, %edi              /* EDI = magic until checked */

        print   "mbinfo: magic="
        mov     %edi, %eax
        call    puthex8
        call    newline
        cmp     $MB_BOOT_MAGIC, %edi
        je      1f
        print   "mbinfo: bad magic\n"
        debug_exit 0x7e
1:
        print   "flags: "
        mov     MBI_FLAGS(%ebp), %eax
        call    puthex8
        call    newline

        btl     $F_CMDLINE, MBI_FLAGS(%ebp)
        jnc     1f
        print   "cmdline: "
        mov     MBI_CMDLINE(%ebp), %esi
        call    putstr_safe
        call    newline
1:
        btl     $F_LOADER_NAME, MBI_FLAGS(%ebp)
        jnc     1f
        print   "loader: "
        mov     MBI_LOADER_NAME(%ebp), %esi
        call    putstr_safe
        call    newline
1:
        btl     $F_MEM, MBI_FLAGS(%ebp)
        jnc     1f
        print   "mem_lower="
        mov     MBI_MEM_LOWER(%ebp), %eax
        call    putdec
        print   " mem_upper="
        mov     MBI_MEM_UPPER(%ebp), %eax
        call    putdec
        call    newline
1:
        btl     $F_BOOT_DEVICE, MBI_FLAGS(%ebp)
        jnc     1f
        print   "boot_device: "
        mov     MBI_BOOT_DEVICE(%ebp), %eax
        call    puthex8
        call    newline
1:
        btl     $F_MMAP, MBI_FLAGS(%ebp)
        jnc     1f
        call    print_mmap
1:
        btl     $F_MODS, MBI_FLAGS(%ebp)
        jnc     1f
        call    print_modules
1:
        call    print_fw_cfg
        print   "mbinfo: done\n"
        debug_exit 0x10

/* print_mmap: one "mmap:" line per entry of the memory map. Each entry starts
 * with its size, not counting the size field itself; the next entry follows. */
print_mmap:
        mov     MBI_MMAP_ADDR(%ebp), %edi       /* EDI = entry */
        mov     MBI_MMAP_LENGTH(%ebp), %ecx
        add     %edi, %ecx
        mov     %ecx, mmap_end
        movl    $MAX_MMAP_ENTRIES, entries_left
1:      cmp     mmap_end, %edi
        jae     2f
        print   "mmap: base="
        mov     MMAP_BASE(%edi), %eax
        mov     MMAP_BASE+4(%edi), %edx
        call    puthex16
        print   " len="
        mov     MMAP_LEN(%edi), %eax
        mov     MMAP_LEN+4(%edi), %edx
        call    puthex16
        print   " type="
        mov     MMAP_TYPE(%edi), %eax
        call    putdec
        call    newline
        mov     MMAP_SIZE(%edi), %eax
        lea     4(%edi,%eax), %edi
        decl    entries_left
        jnz     1b
2:      ret

/* print_modules: one "module:" line per module entry. */
print_modules:
        mov     MBI_MODS_ADDR(%ebp), %edi       /* EDI = module entry */
        mov     MBI_MODS_COUNT(%ebp), %ecx
        cmp     $MAX_MODULES, %ecx
        jbe     1f
        mov     $MAX_MODULES, %ecx
1:      test    %ecx, %ecx
        jz      4f
        push    %ecx
        print   "module: start="
        mov     MOD_START(%edi), %eax
        call    puthex8
        print   " end="
        mov     MOD_END(%edi), %eax
        call    puthex8
        print   " string="
        mov     MOD_STRING(%edi), %esi
        call    putstr_safe
        print   " first="
        mov     MOD_START(%edi), %esi
        mov     MOD_END(%edi), %ecx
        sub     %esi, %ecx                      /* module length */
        jbe     3f                              /* empty (or end <= start) */
        cmp     $FIRST_BYTES, %ecx
        jbe     2f
        mov     $FIRST_BYTES, %ecx
2:      lodsb
        call    putchar_safe
        dec     %ecx
        jnz     2b
3:      call    newline
        add     $MOD_SIZE, %edi
        pop     %ecx
        dec     %ecx
        jmp     1b
4:      ret

/* print_fw_cfg: the QEMU firmware configuration device's signature, RAM size
 * and CPU count, read through the legacy I/O ports. */
print_fw_cfg:
        mov     $FW_CFG_SIGNATURE, %ax
        call    fw_cfg_select
        mov     $4, %ecx
        call    fw_cfg_read
        mov     %eax, %edi                      /* the 4 signature bytes */
        cmp     $0x554d4551, %eax               /* "QEMU", little-endian */
        je      1f
        print   "fw_cfg: absent signature="
        call    put4chars
        jmp     newline
1:      print   "fw_cfg: signature="
        call    put4chars
        print   " ram="
        mov     $FW_CFG_RAM_SIZE, %ax
        call    fw_cfg_select
        mov     $4, %ecx
        call    fw_cfg_read                     /* low half first */
        push    %eax
        mov     $4, %ecx
        call    fw_cfg_read
        mov     %eax, %edx
        pop     %eax
        call    puthex16
        print   " cpus="
        mov     $FW_CFG_NB_CPUS, %ax
        call    fw_cfg_select
        mov     $2, %ecx
        call    fw_cfg_read
        call    putdec
        jmp     newline

/* put4chars: print the 4 bytes of EDI, lowest first, non-printables as '.'. */
put4chars:
        mov     $4, %ecx
1:      mov     %edi, %eax
        call    putchar_safe
        shr     $8, %edi
        dec     %ecx
        jnz     1b
        ret

        .bss
mmap_end:       .skip   4
entries_left:   .skip   4

        .balign 16
stack:  .skip   4096
stack_top:
