"""Guest RAM: anonymous mmaps registered as KVM memory slots, and the only door into them.

Layout follows the PC. RAM starts at guest-physical 0. The 1 GiB below 4 GiB is the 32-bit MMIO
hole (devices, firmware); when the guest has more RAM than fits under the hole, the rest is placed
from 4 GiB up::

    0 ........ low RAM ........ min(size, 3 GiB) | hole 3..4 GiB | 4 GiB ... high RAM ...

Every access names a guest-physical address (gpa) and a length and is checked to lie wholly inside
one region; anything else raises :class:`GuestMemoryError` before a byte is touched. The guest
controls most addresses pykvm handles (descriptors, pointers in boot structures), so nothing else
in pykvm turns a guest address into host memory.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
from dataclasses import dataclass, field

from .errors import PykvmError, UsageError

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

MMIO_HOLE_START = 3 * GiB
MMIO_HOLE_END = 4 * GiB
MIN_RAM = 1 * MiB
MAX_RAM = 64 * GiB

_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemoryError(PykvmError):
    """An access to guest-physical memory outside guest RAM (or straddling two regions)."""


@dataclass
class Region:
    """One contiguous range of guest RAM backed by one host mmap (one KVM slot)."""

    gpa: int
    size: int
    slot: int
    _map: mmap.mmap = field(repr=False)
    _view: memoryview = field(repr=False)
    readonly: bool = False   # ROM: the guest's writes exit to the VMM as MMIO and are dropped

    @property
    def end(self) -> int:
        """The first guest-physical address after the region."""
        return self.gpa + self.size

    @property
    def host_addr(self) -> int:
        """The host virtual address of the region's mapping (for KVM_SET_USER_MEMORY_REGION)."""
        from .kvm.abi import ffi  # here, so that `pykvm --help` and `run --list` never load cffi
        return int(ffi.cast("uintptr_t", ffi.from_buffer(self._map)))


def ram_layout(size: int) -> list[tuple[int, int]]:
    """Guest-physical (start, length) ranges of RAM for a guest of ``size`` bytes."""
    low = min(size, MMIO_HOLE_START)
    ranges = [(0, low)]
    if size > low:
        ranges.append((MMIO_HOLE_END, size - low))
    return ranges


def check_ram_size(size: int) -> None:
    """Raise GuestMemoryError unless ``size`` (bytes) is a multiple of 4 KiB in [MIN_RAM, MAX_RAM]."""
    if not MIN_RAM <= size <= MAX_RAM or size % (4 * KiB):
        raise GuestMemoryError(
            f"guest memory must be a multiple of 4 KiB between {MIN_RAM // MiB} MiB and "
            f"{MAX_RAM // GiB} GiB, not {size} bytes")


class GuestMemory:
    """The guest's RAM. Use as a context manager, or call :meth:`close`."""

    def __init__(self, size: int) -> None:
        check_ram_size(size)
        self.size = size
        self.regions: list[Region] = []
        for slot, (gpa, length) in enumerate(ram_layout(size)):
            # MAP_NORESERVE: a large guest costs nothing until it touches its pages.
            try:
                mm = mmap.mmap(-1, length, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
            except OSError as e:   # the host's overcommit policy refused: never a traceback
                self.close()
                raise UsageError(f"the host cannot give this guest {size >> 20} MiB of RAM ({e.strerror}); "
                                       "ask for less memory") from None
            self.regions.append(Region(gpa, length, slot, mm, memoryview(mm)))
        self._starts = [r.gpa for r in self.regions]

    def close(self) -> None:
        """Unmap every region (after the VM that used them is closed); idempotent."""
        for region in self.regions:
            region._view.release()
            region._map.close()
        self.regions = []
        self._starts = []

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_rom(self, gpa: int, data: bytes) -> Region:
        """Map ``data`` read-only at ``gpa`` (firmware below 4 GiB). Call before :meth:`register`.

        The region must be page-aligned and lie outside every other region."""
        size = -(-len(data) // (4 * KiB)) * (4 * KiB)
        if gpa % (4 * KiB) or not data or any(gpa < r.end and r.gpa < gpa + size for r in self.regions):
            raise GuestMemoryError(f"cannot place a {len(data)}-byte ROM at {gpa:#x}: "
                                   "it must be page-aligned and not overlap RAM")
        mm = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mm[:len(data)] = data
        region = Region(gpa, size, len(self.regions), mm, memoryview(mm), readonly=True)
        self.regions = sorted(self.regions + [region], key=lambda r: r.gpa)
        self._starts = [r.gpa for r in self.regions]
        return region

    def register(self, vm) -> None:
        """Tell KVM about every region (KVM_SET_USER_MEMORY_REGION, one slot each)."""
        for region in self.regions:
            from .kvm.constants import KVM_MEM_READONLY
            flags = KVM_MEM_READONLY if region.readonly else 0
            vm.set_user_memory_region(region.slot, region.gpa, region.size, region.host_addr, flags)

    # --- the checked door --------------------------------------------------------------------
    def _locate(self, gpa: int, n: int) -> tuple[Region, int]:
        """The region holding all of [gpa, gpa+n) and the offset of gpa in it, or raise."""
        if type(gpa) is not int or type(n) is not int or gpa < 0 or n < 0:
            raise GuestMemoryError(f"bad guest memory access: address {gpa!r}, length {n!r}")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self.regions[i]
            if gpa + n <= region.end:
                return region, gpa - region.gpa
        raise GuestMemoryError(
            f"guest-physical range {gpa:#x}+{n:#x} is not inside guest RAM ({self.describe()})")

    def contains(self, gpa: int, n: int = 1) -> bool:
        """True if [gpa, gpa+n) lies wholly inside one RAM region."""
        try:
            self._locate(gpa, n)
        except GuestMemoryError:
            return False
        return True

    def writable(self, gpa: int, n: int = 1) -> bool:
        """True if [gpa, gpa+n) lies wholly inside one region the guest can write: RAM, not ROM.
        A device's DMA may only target such memory (on hardware, writes to ROM are lost)."""
        try:
            region, _ = self._locate(gpa, n)
        except GuestMemoryError:
            return False
        return not region.readonly

    def read(self, gpa: int, n: int) -> bytes:
        """``n`` bytes at guest-physical ``gpa``. Raises GuestMemoryError unless all lie in one region."""
        region, off = self._locate(gpa, n)
        return region._map[off:off + n]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to guest-physical ``gpa``, all or nothing. Raises GuestMemoryError (also for ROM)."""
        n = len(data)
        region, off = self._locate(gpa, n)
        region._view[off:off + n] = data

    def fill(self, gpa: int, n: int, byte: int = 0) -> None:
        """Set [gpa, gpa+n) to ``byte`` (zeroing bss, clearing page tables)."""
        region, off = self._locate(gpa, n)
        region._view[off:off + n] = bytes([byte]) * n

    def view(self, gpa: int, n: int) -> memoryview:
        """A writable memoryview of [gpa, gpa+n): zero-copy access for devices (disk I/O)."""
        region, off = self._locate(gpa, n)
        return region._view[off:off + n]

    def read_u8(self, gpa: int) -> int:
        """The byte at ``gpa``. Raises GuestMemoryError."""
        region, off = self._locate(gpa, 1)
        return region._view[off]

    def read_u16(self, gpa: int) -> int:
        """The little-endian u16 at ``gpa``. Raises GuestMemoryError."""
        region, off = self._locate(gpa, 2)
        return _U16.unpack_from(region._view, off)[0]

    def read_u32(self, gpa: int) -> int:
        """The little-endian u32 at ``gpa``. Raises GuestMemoryError."""
        region, off = self._locate(gpa, 4)
        return _U32.unpack_from(region._view, off)[0]

    def read_u64(self, gpa: int) -> int:
        """The little-endian u64 at ``gpa``. Raises GuestMemoryError."""
        region, off = self._locate(gpa, 8)
        return _U64.unpack_from(region._view, off)[0]

    def write_u8(self, gpa: int, value: int) -> None:
        """Store the low byte of ``value`` at ``gpa``. Raises GuestMemoryError."""
        region, off = self._locate(gpa, 1)
        region._view[off] = value & 0xFF

    def write_u16(self, gpa: int, value: int) -> None:
        """Store ``value`` as a little-endian u16 at ``gpa``. Raises GuestMemoryError."""
        region, off = self._locate(gpa, 2)
        _U16.pack_into(region._view, off, value & 0xFFFF)

    def write_u32(self, gpa: int, value: int) -> None:
        """Store ``value`` as a little-endian u32 at ``gpa``. Raises GuestMemoryError."""
        region, off = self._locate(gpa, 4)
        _U32.pack_into(region._view, off, value & 0xFFFF_FFFF)

    def write_u64(self, gpa: int, value: int) -> None:
        """Store ``value`` as a little-endian u64 at ``gpa``. Raises GuestMemoryError."""
        region, off = self._locate(gpa, 8)
        _U64.pack_into(region._view, off, value & 0xFFFF_FFFF_FFFF_FFFF)

    def describe(self) -> str:
        """One line per region: guest-physical range, size, RAM or ROM."""
        return ", ".join(f"{r.gpa:#x}-{r.end - 1:#x}" for r in self.regions)


def parse_size(text: str) -> int:
    """'64M', '1G', '512K', '16777216' -> bytes. Raises ValueError with a readable message."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": KiB, "M": MiB, "G": GiB}
    mult = 1
    if s and s[-1] in units:
        mult = units[s[-1]]
        s = s[:-1]
    if not s.isdigit():
        raise ValueError(f"not a size: {text!r} (use e.g. 64M, 1G, 512K)")
    return int(s) * mult


# --- snapshots: RAM backed by a file, dirty-page logging ----------------------------------------
PAGE_SIZE = 4 * KiB


def ram_regions(memory: GuestMemory) -> list[tuple[Region, int]]:
    """The RAM regions (not ROM) in guest-physical order, each with its offset in a memory file that lays them
    end to end (pykvm's snapshot memory file)."""
    out, offset = [], 0
    for region in memory.regions:
        if not region.readonly:
            out.append((region, offset))
            offset += region.size
    return out


def back_with_file(memory: GuestMemory, vm, fd: int, dirty_log: bool = False) -> None:
    """Map every RAM region from the open file ``fd`` (regions end to end, see :func:`ram_regions`) as a private
    copy-on-write mapping, and point its KVM slot there (KVM_SET_USER_MEMORY_REGION: delete, then add again).

    Nothing is read: pages come from the file when the guest touches them, and the guest's writes stay in this
    process. The file must hold at least the guest's RAM size (the caller checks). ``dirty_log`` sets
    KVM_MEM_LOG_DIRTY_PAGES on the new slots."""
    from .kvm.constants import KVM_MEM_LOG_DIRTY_PAGES
    info = os.fstat(fd)
    memory.backing_file = (info.st_dev, info.st_ino)   # never to be rewritten while it backs this RAM
    for region, offset in ram_regions(memory):
        mm = mmap.mmap(fd, region.size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        vm.set_user_memory_region(region.slot, region.gpa, 0, 0)
        old_map, old_view = region._map, region._view
        region._map, region._view = mm, memoryview(mm)
        vm.set_user_memory_region(region.slot, region.gpa, region.size, region.host_addr,
                                  KVM_MEM_LOG_DIRTY_PAGES if dirty_log else 0)
        old_view.release()
        old_map.close()


def set_dirty_logging(memory: GuestMemory, vm, on: bool) -> None:
    """Turn KVM_MEM_LOG_DIRTY_PAGES on or off for every RAM slot (api.rst, KVM_SET_USER_MEMORY_REGION)."""
    from .kvm.constants import KVM_MEM_LOG_DIRTY_PAGES
    for region, _ in ram_regions(memory):
        vm.set_user_memory_region(region.slot, region.gpa, region.size, region.host_addr,
                                  KVM_MEM_LOG_DIRTY_PAGES if on else 0)


def dirty_pages(memory: GuestMemory, vm) -> list[tuple[Region, int, list[int]]]:
    """For each RAM region: (region, its memory-file offset, the indices of the 4 KiB pages the guest wrote since
    the last call). KVM_GET_DIRTY_LOG also clears KVM's log, so each call starts a new interval."""
    from .kvm.abi import ffi
    out = []
    for region, offset in ram_regions(memory):
        pages = region.size // PAGE_SIZE
        bitmap = ffi.new("uint64_t[]", (pages + 63) // 64)
        vm.get_dirty_log(region.slot, bitmap)
        dirty = []
        for word_index in range(len(bitmap)):
            word = bitmap[word_index]
            while word:
                low = word & -word
                dirty.append(word_index * 64 + low.bit_length() - 1)
                word ^= low
        out.append((region, offset, dirty))
    return out
