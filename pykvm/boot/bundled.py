"""The guests that ship with pykvm (built from guests/ by `make -C guests`).

In an installed pykvm the images are package data in ``pykvm/guests/``; in a source checkout they
are in the top-level ``guests/`` folder. Both hold the same committed files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..x86.modes import CpuMode

LOAD_ADDR = 0x8000


@dataclass(frozen=True)
class BundledGuest:
    """A guest image shipped with pykvm: name, CPU mode, description."""
    name: str
    mode: CpuMode
    about: str

    @property
    def path(self) -> Path:
        """The image file of this guest."""
        return images_dir() / f"{self.name}.bin"


GUESTS = [
    BundledGuest("hello-long64", CpuMode.LONG64, "prints its mode and CR0/CR4/EFER in 64-bit long mode (default)"),
    BundledGuest("hello-real", CpuMode.REAL, "the same program in 16-bit real mode"),
    BundledGuest("hello-prot32", CpuMode.PROT32, "the same program in 32-bit protected mode, paging off"),
    BundledGuest("hello-paged32", CpuMode.PAGED32, "the same program under 32-bit paging (4 MiB pages)"),
    BundledGuest("hello-pae", CpuMode.PAE, "the same program under PAE paging (2 MiB pages)"),
    BundledGuest("mmio", CpuMode.LONG64, "reads and writes the MMIO test device at 0xd0000000, checks the answers"),
    BundledGuest("int3", CpuMode.LONG64, "builds an IDT, executes int3 and returns from its #BP handler"),
    BundledGuest("spin", CpuMode.LONG64, "prints a line, then loops forever (try --timeout 2)"),
    BundledGuest("exitloop", CpuMode.PROT32, "takes N exits of one kind, silently (exit-latency benchmark guest)"),
    BundledGuest("gdbtest", CpuMode.LONG64, "calls bump() 3 times, exits with counter: to debug with gdb (symbols in "
                                            "gdbtest.elf)"),
]
DEFAULT = GUESTS[0]


def images_dir() -> Path:
    """The installed package's guests/ directory, or the checkout's when running from source."""
    here = Path(__file__).resolve().parent.parent   # pykvm/
    installed = here / "guests"
    return installed if installed.is_dir() else here.parent / "guests"


def find(name: str) -> BundledGuest:
    """The bundled guest called ``name``. Raises UsageError listing the names."""
    for guest in GUESTS:
        if guest.name == name:
            return guest
    names = ", ".join(g.name for g in GUESTS)
    raise UsageError(f"no bundled guest or file named {name!r}. Bundled guests: {names} (see `pykvm run --list`)")
