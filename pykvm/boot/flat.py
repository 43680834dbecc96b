"""Flat binaries: raw bytes copied to a load address and entered at its first byte in a chosen
CPU mode. No header, so the checks are about where the bytes go."""

from __future__ import annotations

from ..errors import BootError
from ..x86.modes import CpuMode, initial_state, reserved_ranges
from . import BootPlan, check_fits, check_no_overlap

DEFAULT_STACK = 0x7000


def load_flat(image: bytes, load_addr: int, mode: CpuMode, mem_size: int, name: str = "image") -> BootPlan:
    """A flat binary at ``load_addr`` entered in ``mode`` -> BootPlan. Raises BootError if it does not fit in RAM."""
    if not image:
        raise BootError(f"{name} is empty: a flat binary needs at least one instruction")
    if image[:4] == b"\x7fELF":
        raise BootError(f"{name} is an ELF file, not a flat binary: pass it with --kernel")
    check_fits(name, load_addr, len(image), mem_size)
    check_no_overlap(name, load_addr, len(image), reserved_ranges(mode))
    try:
        cpu, writes = initial_state(mode, entry=load_addr, stack=DEFAULT_STACK)
    except ValueError as e:
        raise BootError(f"{name}: {e}") from None
    return BootPlan(cpu=cpu, writes=writes + [(load_addr, bytes(image))],
                    description=f"{name}: {len(image)} bytes at {load_addr:#x}, {mode.description}")
