"""Software breakpoints (``int3``, gdb's Z0) keyed by the guest-physical byte they patch.

gdb names a breakpoint by a guest-virtual (linear) address, but an ``int3`` lives in memory: in
the guest-physical byte that address translates to. Two linear addresses may map one physical
byte (a page mapped twice; Linux's kernel text and its direct map), and the mapping of a linear
address may change while the guest runs. So the table here has two levels:

* a **patch** per guest-physical byte: the original byte and the set of linear addresses (gdb's
  breakpoints) that asked for it. The first breakpoint on a byte saves it and writes 0xCC; the
  others only join the set; the last one to go writes the original back. Removing every
  breakpoint therefore restores memory byte for byte, whatever aliases gdb used and in whatever
  order it removes them. A byte the guest itself overwrote meanwhile (0xCC gone) is left as the
  guest wrote it.
* a **breakpoint** per linear address: the physical byte it patched and the vCPU whose page tables
  translated it. :meth:`SoftwareBreakpoints.replant` translates every breakpoint again (the debug
  control calls it whenever gdb resumes the guest) and moves a patch whose mapping changed: the
  old byte is restored, the new one patched; an address that is no longer mapped waits, unpatched,
  until it is mapped again.

An ``int3`` the guest executes is one of ours when the byte it executed is patched
(:meth:`SoftwareBreakpoints.hit`): ``"break"`` at one of gdb's addresses, ``"alias"`` through a
linear address gdb did not name. The debug control stops the guest for the first and steps the
second over its original instruction, transparently. gdb's memory reads (``m``) see the original
bytes under every patch, through any alias; its writes (``M``/``X``) over a patched byte update the
saved original and keep the 0xCC.

Guest memory is reached only through :class:`pykvm.memory.GuestMemory` and the page-table walk
of :mod:`pykvm.debug.vmem`; ``paging`` is the (CR0, CR3, CR4, EFER) tuple of the vCPU whose view
is meant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .vmem import PAGE, Unmapped, read_virtual, to_physical, write_virtual

INT3 = 0xCC

Paging = tuple[int, int, int, int]


@dataclass
class Patch:
    """One patched guest-physical byte: what it held, and the breakpoints that share it."""

    original: int
    owners: set[int] = field(default_factory=set)
    lifted: bool = False        # the original is back for a moment (a vCPU steps over it)


class SoftwareBreakpoints:
    """gdb's software breakpoints on one machine's memory. Changed only while every vCPU is
    stopped (the debugger's thread); :meth:`hit` is called by vCPU threads."""

    def __init__(self, memory) -> None:
        self.memory = memory
        self.patches: dict[int, Patch] = {}                       # physical -> patch
        self._where: dict[int, tuple[int | None, object]] = {}    # linear -> (physical or None, vcpu)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, linear: int) -> bool:
        return linear in self._where

    # --- gdb's requests ------------------------------------------------------------------------
    def insert(self, vcpu, paging: Paging, linear: int) -> None:
        """Z0: a breakpoint at guest-virtual ``linear`` as ``vcpu`` (``paging``) maps it.
        Raises :class:`Unmapped` if no RAM is mapped there."""
        if linear in self._where:
            return
        phys = self._translate(paging, linear)
        if phys is None:
            raise Unmapped(f"{linear:#x} is not mapped to RAM")
        self._plant(phys, linear)
        self._where[linear] = (phys, vcpu)

    def remove(self, linear: int) -> None:
        """z0: remove the breakpoint at ``linear`` (no error if there is none)."""
        entry = self._where.pop(linear, None)
        if entry is not None and entry[0] is not None:
            self._unplant(entry[0], linear)

    def clear(self) -> None:
        """Remove every breakpoint: every patched byte gets its original back."""
        for linear in list(self._where):
            self.remove(linear)

    def replant(self, paging_of: Callable[[object], Paging]) -> None:
        """Translate every breakpoint again through its vCPU's current page tables and move the
        patches whose mapping changed (``paging_of(vcpu)`` gives a vCPU's paging registers)."""
        for linear, (phys, vcpu) in list(self._where.items()):
            now = self._translate(paging_of(vcpu), linear)
            if now == phys:
                continue
            if phys is not None:
                self._unplant(phys, linear)
            if now is not None:
                self._plant(now, linear)
            self._where[linear] = (now, vcpu)

    # --- what the guest executed -----------------------------------------------------------------
    def hit(self, paging: Paging, linear: int) -> str | None:
        """Whose is the int3 a vCPU executed at ``linear``: "break" (a breakpoint gdb set at that
        address), "alias" (a byte we patched, reached through another address), or None (the
        guest's own int3)."""
        if not self.patches:
            return None
        phys = self._translate(paging, linear)
        patch = self.patches.get(phys) if phys is not None else None
        if patch is None:
            return None
        return "break" if linear in patch.owners else "alias"

    def lift(self, paging: Paging, linear: int) -> int | None:
        """Put the original byte under ``linear`` back for one step; returns its physical address
        for :meth:`restore`, or None if there is no patch there."""
        phys = self._translate(paging, linear)
        patch = self.patches.get(phys) if phys is not None else None
        if patch is None or patch.lifted:
            return None
        if self.memory.read_u8(phys) == INT3:
            self.memory.write_u8(phys, patch.original)
        patch.lifted = True
        return phys

    def restore(self, phys: int) -> None:
        """Write the 0xCC back after a step over a lifted patch (if the patch still exists)."""
        patch = self.patches.get(phys)
        if patch is not None and patch.lifted:
            patch.lifted = False
            if self.memory.read_u8(phys) == patch.original:
                self.memory.write_u8(phys, INT3)

    # --- gdb's view of memory --------------------------------------------------------------------
    def read(self, paging: Paging, addr: int, n: int) -> bytes:
        """Up to ``n`` bytes at guest-virtual ``addr`` as the guest would see them without our
        int3s (the readable prefix, as :func:`read_virtual`)."""
        data = bytearray(read_virtual(self.memory, paging, addr, n))
        if self.patches:
            for start, phys, length in self._pieces(paging, addr, len(data)):
                for at, patch in self.patches.items():
                    if phys <= at < phys + length:
                        data[start - addr + at - phys] = patch.original
        return bytes(data)

    def write(self, paging: Paging, addr: int, data: bytes) -> None:
        """Write guest-virtual memory (all of it, or nothing if some page is not RAM); a byte that
        lands on a patch becomes its saved original and the 0xCC stays."""
        data = bytearray(data)
        pieces = self._pieces(paging, addr, len(data))
        if sum(length for _, _, length in pieces) != len(data):
            raise Unmapped(f"{addr:#x}+{len(data)} is not all RAM")
        for start, phys, length in pieces:
            for at, patch in self.patches.items():
                if phys <= at < phys + length:
                    i = start - addr + at - phys
                    patch.original = data[i]
                    if not patch.lifted:
                        data[i] = INT3
        write_virtual(self.memory, paging, addr, bytes(data))

    # --- inside ----------------------------------------------------------------------------------
    def _translate(self, paging: Paging, linear: int) -> int | None:
        try:
            phys = to_physical(self.memory, paging, linear)
        except Unmapped:
            return None
        return phys if self.memory.contains(phys, 1) else None

    def _pieces(self, paging: Paging, addr: int, n: int) -> list[tuple[int, int, int]]:
        """(linear, physical, length) of the RAM-backed pages of [addr, addr+n), up to the first
        hole."""
        out = []
        while n > 0:
            length = min(n, PAGE - (addr & (PAGE - 1)))
            phys = self._translate(paging, addr)
            if phys is None:
                break
            while length and not self.memory.contains(phys, length):
                length -= 1
            if not length:
                break
            out.append((addr, phys, length))
            addr, n = addr + length, n - length
        return out

    def _plant(self, phys: int, linear: int) -> None:
        patch = self.patches.get(phys)
        if patch is None:
            patch = Patch(self.memory.read_u8(phys))
            self.memory.write_u8(phys, INT3)
            self.patches[phys] = patch
        patch.owners.add(linear)

    def _unplant(self, phys: int, linear: int) -> None:
        patch = self.patches.get(phys)
        if patch is None:
            return
        patch.owners.discard(linear)
        if patch.owners:
            return
        del self.patches[phys]
        if not patch.lifted and self.memory.read_u8(phys) == INT3:   # else the guest rewrote it
            self.memory.write_u8(phys, patch.original)
