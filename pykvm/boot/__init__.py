"""Loaders: each turns an image into a :class:`BootPlan` and never touches KVM.

A BootPlan is everything the machine needs to start: the bytes to place in guest memory and the
initial vCPU state. Keeping loaders pure makes every header check unit-testable without a VM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import BootError
from ..memory import ram_layout
from ..x86.modes import CpuState


@dataclass
class BootPlan:
    cpu: CpuState
    writes: list[tuple[int, bytes]] = field(default_factory=list)   # (guest-physical, bytes)
    description: str = ""
    irqchip: bool = False     # does the guest expect interrupt controllers (PIC/IOAPIC/LAPIC, PIT)?


def check_fits(what: str, start: int, length: int, mem_size: int) -> None:
    """Raise BootError unless [start, start+length) lies inside guest RAM of ``mem_size`` bytes."""
    for gpa, size in ram_layout(mem_size):
        if gpa <= start and start + length <= gpa + size:
            return
    ranges = ", ".join(f"{g:#x}-{g + s - 1:#x}" for g, s in ram_layout(mem_size))
    raise BootError(
        f"{what} at {start:#x}-{start + max(length, 1) - 1:#x} does not fit in guest RAM ({ranges}); "
        "choose another address or give the guest more memory with --mem")


def check_no_overlap(what: str, start: int, length: int, reserved: list[tuple[int, int, str]]) -> None:
    for rstart, rend, rwhat in reserved:
        if start < rend and rstart < start + length:
            raise BootError(
                f"{what} at {start:#x}-{start + length - 1:#x} overlaps {rwhat} that pykvm places at "
                f"{rstart:#x}-{rend - 1:#x} for this CPU mode; load it elsewhere (--load-addr)")
