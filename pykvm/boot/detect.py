"""Choosing the loader for a ``--kernel`` file by what is inside it, as QEMU's -kernel does."""

from __future__ import annotations

from ..errors import BootError
from ..x86.modes import CpuMode
from . import BootPlan
from .elf import find_note, is_elf, load_elf
from .flat import load_flat
from .linux import is_bzimage, load_linux
from .multiboot import find_header, load_multiboot
from .pvh import load_pvh, pvh_entry

LINUX_NOTE_OWNER = b"Linux"


def load_kernel(image: bytes, mem_size: int, *, name: str, cmdline: str = "", initrd: bytes = b"",
                modules: list[tuple[str, bytes, str]] | None = None,
                mode: CpuMode = CpuMode.LONG64, load_addr: int = 0x8000, linux_quirks: str = "") -> BootPlan:
    """In order: a Linux bzImage ("HdrS"), an ELF with a PVH entry note (vmlinux), a Multiboot
    kernel, a plain ELF, and finally a flat binary entered in ``mode`` at ``load_addr``. The
    command line reaches every kind (through fw_cfg at least). ``linux_quirks`` is appended to a
    Linux kernel's command line (parameters the host's KVM backend needs, see linux.linux_quirks)."""
    if is_bzimage(image) or (is_elf(image) and pvh_entry(image, name) is not None):
        cmdline = " ".join(part for part in (cmdline, linux_quirks) if part)
    if is_bzimage(image):
        _no_modules(name, modules, "a Linux bzImage")
        return load_linux(image, mem_size, cmdline=cmdline, initrd=initrd, name=name)
    if is_elf(image) and pvh_entry(image, name) is not None:
        _no_modules(name, modules, "a PVH kernel")
        return load_pvh(image, mem_size, cmdline=cmdline, initrd=initrd, name=name)
    if is_elf(image) and _is_linux_vmlinux(image, name):
        raise BootError(f"{name} is a Linux vmlinux without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY), so pykvm "
                        "cannot enter it directly: build it with CONFIG_PVH=y or boot its bzImage")
    if initrd:
        raise BootError(f"{name} is not a Linux kernel (bzImage or PVH vmlinux), so it cannot take --initrd; "
                        "a Multiboot kernel takes --module instead")
    if find_header(image) is not None:
        return load_multiboot(image, mem_size, cmdline=cmdline, modules=modules or [], name=name)
    _no_modules(name, modules, "not a Multiboot kernel")
    if is_elf(image):
        plan = load_elf(image, mem_size, name=name)
    else:
        plan = load_flat(image, load_addr, mode, mem_size, name=name)
    plan.cmdline = cmdline
    plan.kernel = image
    return plan


def _no_modules(name: str, modules, what: str) -> None:
    if modules:
        raise BootError(f"{name} is {what}, so it cannot take --module (only Multiboot kernels do)")


def _is_linux_vmlinux(image: bytes, name: str) -> bool:
    """Linux's vmlinux carries ELF notes from owner "Linux" (e.g. the build salt)."""
    return find_note(image, LINUX_NOTE_OWNER, None, name) is not None
