"""Choosing the loader for a ``--kernel`` file by what is inside it, as QEMU's -kernel does."""

from __future__ import annotations

from ..x86.modes import CpuMode
from . import BootPlan
from .elf import is_elf, load_elf
from .flat import load_flat
from .multiboot import find_header, load_multiboot


def load_kernel(image: bytes, mem_size: int, *, name: str, cmdline: str = "",
                modules: list[tuple[str, bytes, str]] | None = None,
                mode: CpuMode = CpuMode.LONG64, load_addr: int = 0x8000) -> BootPlan:
    """A Multiboot header wins (the kernel asked for it), then ELF, then a flat binary entered
    in ``mode`` at ``load_addr``. The command line reaches every kind through fw_cfg."""
    if find_header(image) is not None:
        return load_multiboot(image, mem_size, cmdline=cmdline, modules=modules or [], name=name)
    if modules:
        from ..errors import BootError
        raise BootError(f"{name} is not a Multiboot kernel, so it cannot take --module")
    plan = load_elf(image, mem_size, name=name) if is_elf(image) else load_flat(image, load_addr, mode, mem_size,
                                                                                name=name)
    plan.cmdline = cmdline
    plan.kernel = image
    return plan
