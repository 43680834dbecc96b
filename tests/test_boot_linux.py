"""The Linux loaders (bzImage 64-bit boot protocol, PVH vmlinux) on synthetic images: every
header check, and the boot_params / hvm_start_info they build, read back from guest memory."""

from __future__ import annotations

import struct

import pytest
from conftest import assert_plan_in_ram
from hypothesis import given, settings
from hypothesis import strategies as st
from test_boot_elf import build_elf, note, seg

from pykvm.boot import memory_map
from pykvm.boot.detect import load_kernel
from pykvm.boot.linux import linux_quirks, load_linux
from pykvm.boot.pvh import START_INFO_MAGIC, XEN_ELFNOTE_PHYS32_ENTRY, load_pvh
from pykvm.errors import BootError
from pykvm.memory import GuestMemory, MiB
from pykvm.x86.modes import CpuMode

MEM = 64 * MiB


def bzimage(*, setup_sects=4, version=0x020F, xloadflags=1, pref=0x1000000, align=0x200000, init_size=0x400000,
            cmdline_size=2048, initrd_max=0x7FFFFFFF, kernel=b"\x90" * 4096, boot_flag=0xAA55, magic=b"HdrS",
            relocatable=1) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<I", setup, 0x1F4, len(kernel) // 16)
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200:0x202] = b"\xeb\x66"                 # jmp past the header: header ends at 0x268
    setup[0x202:0x206] = magic
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<I", setup, 0x22C, initrd_max)
    struct.pack_into("<I", setup, 0x230, align)
    struct.pack_into("<B", setup, 0x234, relocatable)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + kernel


def apply(plan) -> GuestMemory:
    mem = GuestMemory(MEM)
    for gpa, data in plan.writes:
        mem.write(gpa, data)
    return mem


def test_bzimage_boot_params():
    image = bzimage()
    plan = load_linux(image, MEM, cmdline="console=ttyS0", initrd=b"INITRD" * 100, name="bz")
    assert plan.cpu.mode is CpuMode.LONG64
    assert plan.cpu.regs["rip"] == 0x1000000 + 0x200
    params = plan.cpu.regs["rsi"]
    with apply(plan) as mem:
        assert mem.read(0x1000000, 4096) == image[5 * 512:]
        assert mem.read(params + 0x202, 4) == b"HdrS"          # the header copied into the zero page
        assert mem.read_u8(params + 0x210) == 0xFF              # type_of_loader: undefined
        cmd = mem.read_u32(params + 0x228)
        assert mem.read(cmd, 14) == b"console=ttyS0\0"
        start, size = mem.read_u32(params + 0x218), mem.read_u32(params + 0x21C)
        assert mem.read(start, size) == b"INITRD" * 100 and start % 4096 == 0
        count = mem.read_u8(params + 0x1E8)
        entries = [struct.unpack("<QQI", mem.read(params + 0x2D0 + 20 * i, 20)) for i in range(count)]
        assert entries == memory_map(MEM)


@pytest.mark.parametrize("kwargs,message", [
    (dict(magic=b"NOPE"), "not a Linux bzImage"),
    (dict(version=0x0204), "too old"),
    (dict(xloadflags=0), "XLF_KERNEL_64"),
    (dict(boot_flag=0x1234), "boot_flag"),
    (dict(align=3), "kernel_alignment"),
    (dict(pref=0x1000, relocatable=0, align=0x200000), "not aligned"),
    (dict(init_size=512 * MiB), "does not fit in guest RAM"),
])
def test_bad_bzimage_is_a_clear_boot_error(kwargs, message):
    with pytest.raises(BootError, match=message):
        load_linux(bzimage(**kwargs), MEM, name="bz")


def test_setup_sects_beyond_the_file():
    image = bytearray(bzimage())
    image[0x1F1] = 200
    with pytest.raises(BootError, match="beyond the"):
        load_linux(bytes(image), MEM, name="bz")


def test_truncated_bzimage():
    image = bzimage()
    with pytest.raises(BootError, match="truncated"):
        load_linux(image[:-100], MEM, name="bz")
    with pytest.raises(BootError, match="not a Linux bzImage"):
        load_linux(image[:0x100], MEM, name="bz")


def test_command_line_over_the_kernel_limit():
    with pytest.raises(BootError, match="over bz's limit of 16"):
        load_linux(bzimage(cmdline_size=16), MEM, cmdline="x" * 17, name="bz")
    load_linux(bzimage(cmdline_size=16), MEM, cmdline="x" * 16, name="bz")


def test_initrd_that_does_not_fit():
    with pytest.raises(BootError, match="initrd"):
        load_linux(bzimage(), MEM, initrd=bytes(70 * MiB), name="bz")
    with pytest.raises(BootError, match="initrd"):
        load_linux(bzimage(initrd_max=0x10FFFF), MEM, initrd=bytes(MiB), name="bz")


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_setup_headers_load_cleanly_or_fail_cleanly(data):
    image = bytearray(bzimage())
    for _ in range(data.draw(st.integers(1, 6))):
        image[data.draw(st.integers(0x1F1, 0x26F))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.just(len(image)), st.integers(0, len(image))))
    try:
        plan = load_linux(bytes(image[:cut]), MEM, cmdline="a b", initrd=b"x" * 5000, name="bz")
    except BootError:
        return
    assert_plan_in_ram(plan, MEM)


def pvh_kernel(entry=0x1000000, extra_notes=b"", with_pvh=True) -> bytes:
    notes = extra_notes + (note(b"Xen", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<I", entry)) if with_pvh else b"")
    return build_elf(64, entry=0xFFFFFFFF81000000, segments=[
        seg(0x1000000, b"\x90" * 64, 0x2000, vaddr=0xFFFFFFFF81000000),
        seg(0, notes, type=4, align=4),
    ])


def test_pvh_start_info():
    plan = load_pvh(pvh_kernel(), MEM, cmdline="console=ttyS0 quiet", initrd=b"RAMDISK!" * 64, name="vmlinux")
    assert plan.cpu.mode is CpuMode.PROT32 and plan.cpu.regs["rip"] == 0x1000000
    info = plan.cpu.regs["rbx"]
    with apply(plan) as mem:
        magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, _ = struct.unpack(
            "<IIIIQQQQII", mem.read(info, 56))
        assert (magic, version, nr_modules, rsdp) == (START_INFO_MAGIC, 1, 1, 0)
        assert mem.read(cmdline, 20) == b"console=ttyS0 quiet\0"
        paddr, size, _, _ = struct.unpack("<QQQQ", mem.read(modlist, 32))
        assert mem.read(paddr, size) == b"RAMDISK!" * 64
        table = [struct.unpack("<QQII", mem.read(memmap + 24 * i, 24))[:3] for i in range(entries)]
        assert table == memory_map(MEM)


def test_vmlinux_without_pvh_note_is_refused():
    image = pvh_kernel(with_pvh=False, extra_notes=note(b"Linux", 6, b"\0" * 4))
    with pytest.raises(BootError, match="without a PVH entry note"):
        load_kernel(image, MEM, name="vmlinux")
    with pytest.raises(BootError, match="without a PVH entry note"):
        load_pvh(image, MEM, name="vmlinux")


def test_initrd_needs_a_linux_kernel():
    with pytest.raises(BootError, match="cannot take --initrd"):
        load_kernel(build_elf(32), MEM, name="k.elf", initrd=b"x")


def test_platform_quirks_reach_only_linux_command_lines():
    quirks = linux_quirks("kvm_pvm")
    assert "noxsave" in quirks and "clearcpuid=" in quirks and linux_quirks("kvm_intel") == ""
    plan = load_kernel(pvh_kernel(), MEM, name="vmlinux", cmdline="console=ttyS0", linux_quirks=quirks)
    assert plan.cmdline == f"console=ttyS0 {quirks}"
    plan = load_kernel(bzimage(), MEM, name="bz", linux_quirks=quirks)
    assert plan.cmdline == quirks
    plan = load_kernel(build_elf(32), MEM, name="k.elf", cmdline="x", linux_quirks=quirks)
    assert plan.cmdline == "x"
