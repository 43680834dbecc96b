"""Split virtqueues (virtio 1.x, section 2.7), sans-I/O over :class:`~pykvm.memory.GuestMemory`.

A split virtqueue is three areas of guest RAM that the driver sets up and the device only reads
or writes through GuestMemory:

* the **descriptor table**: ``size`` entries of 16 bytes ``{le64 addr; le32 len; le16 flags;
  le16 next}``; flags NEXT (the chain goes on at ``next``), WRITE (device-writable buffer),
  INDIRECT (``addr``/``len`` is a table of further descriptors);
* the **available ring** (driver area): ``{le16 flags; le16 idx; le16 ring[size]; le16
  used_event}`` where the driver publishes the heads of chains it offers;
* the **used ring** (device area): ``{le16 flags; le16 idx; {le32 id; le32 len} ring[size];
  le16 avail_event}`` where the device returns them with the number of bytes it wrote.

``idx`` fields are free-running 16-bit counters; ``ring[idx % size]`` is the slot.

The guest writes all of this, so nothing in it is trusted (the hostile-guest rules):

* every buffer is checked to lie inside guest memory (``GuestMemory.contains``; a device-writable
  one, and the used ring, inside RAM: ``GuestMemory.writable``, never ROM) before the device gets
  it, and every access goes through GuestMemory;
* a chain in the descriptor table is at most ``size`` descriptors long, an indirect table at most
  its own ``len / 16`` entries (and never more than :data:`MAX_INDIRECT`): anything longer is a
  loop, and is refused;
* device-readable descriptors come first, device-writable ones after them; a :class:`Chain`
  exposes the two parts separately, so a device cannot write into a readable buffer nor read a
  write-only one;
* the available index may run ahead of the device by at most ``size`` entries.

A breach raises :class:`VirtqueueError`. The transport catches it, stops using the device and
sets DEVICE_NEEDS_RESET in its status (as QEMU does for a modern device): nothing escapes to the
vCPU thread.

Memory ordering. The driver runs on other CPUs while the device works, so the order in which
the two see each other's stores matters. pykvm runs on x86, whose memory model (TSO) keeps
stores in program order as seen by other CPUs, and loads in program order too; CPython performs
each ``GuestMemory`` call as separate plain loads/stores, in the order of the Python statements.
So reading ``avail.idx`` before ``avail.ring[]`` and the descriptors needs no barrier (the
driver wrote them in the opposite order, with its own write barrier), and writing the used
element before ``used.idx`` is seen by the driver in that order. The one reordering TSO allows
is a later load passing an earlier store (the store waits in the store buffer): where the device
stores and then must see the driver's newest value (``used.idx`` then ``used_event``;
``avail_event`` or ``used.flags`` then ``avail.idx``), :func:`full_barrier` orders them.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

from ...memory import GuestMemory

# Descriptor flags (virtq_desc.flags)
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
# Ring flags
VIRTQ_AVAIL_F_NO_INTERRUPT = 1     # driver -> device: do not interrupt me (without EVENT_IDX)
VIRTQ_USED_F_NO_NOTIFY = 1         # device -> driver: do not notify me (without EVENT_IDX)

MAX_QUEUE_SIZE = 32768             # section 2.7: the largest split-queue size
MAX_INDIRECT = 1024                # longest indirect table accepted (QEMU's VIRTQUEUE_MAX_SIZE)

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")

# Area alignments the driver must respect (2.7, "Virtqueue Alignment")
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4

_fence = threading.Lock()


def full_barrier() -> None:
    """Order an earlier store to guest memory before a later load (x86 ``mfence`` semantics).

    Taking a lock is an atomic read-modify-write (a LOCK-prefixed instruction on x86), which is a
    full barrier; Python offers no cheaper way to emit one."""
    _fence.acquire()
    _fence.release()


class VirtqueueError(Exception):
    """The driver broke the virtqueue rules (a bad chain, index or address)."""


def avail_area_size(size: int) -> int:
    """Bytes of the available ring (driver area) of a queue of ``size`` entries (2.7)."""
    return 6 + 2 * size            # flags, idx, ring[size], used_event


def used_area_size(size: int) -> int:
    """Bytes of the used ring (device area) of a queue of ``size`` entries (2.7)."""
    return 6 + 8 * size            # flags, idx, ring[size], avail_event


@dataclass
class Chain:
    """One descriptor chain, checked: its head index and its buffers as (gpa, length) pairs.

    ``readable`` are the device-readable buffers in chain order, ``writable`` the
    device-writable ones. Each lies inside guest RAM. The device reads and writes them through
    the methods below, which address each part as one contiguous byte stream."""

    memory: GuestMemory
    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        """Total bytes of the device-readable buffers (overlapping ones counted each time)."""
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        """Total bytes of the device-writable buffers (overlapping ones counted each time)."""
        return sum(n for _, n in self.writable)

    def read(self, offset: int = 0, n: int | None = None) -> bytes:
        """``n`` bytes (default: all the rest) of the readable part from ``offset``; fewer if it
        ends sooner. Bound ``n``: buffers may overlap, so a chain can name far more bytes than
        the guest has RAM (1,024 indirect entries over one region); read it piecewise."""
        return b"".join(self.memory.read(gpa, length) for gpa, length in _slice(self.readable, offset, n))

    def write(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Write ``data`` into the writable part at ``offset``; returns the bytes written (fewer
        than ``len(data)`` if the part ends sooner)."""
        done = 0
        for gpa, length in _slice(self.writable, offset, len(data)):
            self.memory.write(gpa, data[done:done + length])
            done += length
        return done

    def readable_segments(self, offset: int = 0, n: int | None = None) -> list[tuple[int, int]]:
        """The (gpa, length) pieces of the readable part's byte range [offset, offset+n)."""
        return _slice(self.readable, offset, n)

    def writable_segments(self, offset: int = 0, n: int | None = None) -> list[tuple[int, int]]:
        """The (gpa, length) pieces of the writable part's byte range [offset, offset+n)."""
        return _slice(self.writable, offset, n)


def _slice(buffers: list[tuple[int, int]], offset: int, n: int | None) -> list[tuple[int, int]]:
    """The pieces of the byte range [offset, offset+n) of the stream formed by ``buffers``."""
    out = []
    left = None if n is None else n
    for gpa, length in buffers:
        if left == 0:
            break
        if offset >= length:
            offset -= length
            continue
        take = length - offset if left is None else min(length - offset, left)
        out.append((gpa + offset, take))
        offset = 0
        if left is not None:
            left -= take
    return out


class SplitQueue:
    """The device's side of one split virtqueue.

    ``desc``, ``avail`` and ``used`` are the guest-physical addresses of the three areas;
    ``indirect`` and ``event_idx`` say whether VIRTIO_F_RING_INDIRECT_DESC and
    VIRTIO_F_RING_EVENT_IDX were negotiated. The constructor checks the layout (size a power of
    two, areas aligned and inside RAM) and raises :class:`VirtqueueError` if it is wrong.

    The device calls :meth:`pop` for the next chain, :meth:`push` to return it, and after a batch
    :meth:`needs_interrupt` to learn whether the driver wants an interrupt. Around a batch,
    :meth:`disable_notifications` / :meth:`enable_notifications` tell the driver whether to
    notify (the latter returns True if buffers arrived meanwhile: process again).
    """

    def __init__(self, memory: GuestMemory, size: int, desc: int, avail: int, used: int, *,
                 indirect: bool = False, event_idx: bool = False) -> None:
        if not (0 < size <= MAX_QUEUE_SIZE and size & (size - 1) == 0):
            raise VirtqueueError(f"queue size {size} is not a power of 2 between 1 and {MAX_QUEUE_SIZE}")
        for name, addr, align, length, inside in (
                ("descriptor table", desc, DESC_ALIGN, DESC_SIZE * size, memory.contains),
                ("available ring", avail, AVAIL_ALIGN, avail_area_size(size), memory.contains),
                ("used ring", used, USED_ALIGN, used_area_size(size), memory.writable)):
            if addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not inside(addr, length):
                raise VirtqueueError(f"{name} at {addr:#x}+{length:#x} is not inside guest RAM")
        self.memory = memory
        self.size = size
        self.desc, self.avail, self.used = desc, avail, used
        self.indirect = indirect
        self.event_idx = event_idx
        self.last_avail = 0          # next available-ring entry to take
        self.used_idx = 0            # our copy of used.idx (only the device writes it)
        self.signalled_used = 0      # used.idx when the driver was last considered for an interrupt
        self._used_event_at = avail + 4 + 2 * size
        self._avail_event_at = used + 4 + 8 * size

    # --- taking chains -----------------------------------------------------------------------
    def avail_idx(self) -> int:
        """The driver's ``avail.idx`` as it is in guest memory now (a free-running 16-bit count)."""
        return self.memory.read_u16(self.avail + 2)

    def has_available(self) -> bool:
        """Whether the driver made chains available that the device has not taken yet."""
        return self.avail_idx() != self.last_avail

    def pop(self) -> Chain | None:
        """The next chain the driver made available, or None. Raises VirtqueueError if the ring
        or the chain breaks the rules (the entry is consumed either way)."""
        avail_idx = self.avail_idx()
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(f"available index jumped from {self.last_avail} to {avail_idx}, "
                                 f"more than the queue size {self.size}")
        # No read barrier: x86 does not reorder loads, and the driver stored the ring entry
        # before the index (see the module docstring).
        head = self.memory.read_u16(self.avail + 4 + 2 * (self.last_avail % self.size))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return self.walk(head)

    def walk(self, head: int) -> Chain:
        """Follow the chain starting at descriptor ``head``; check it and return its buffers."""
        memory = self.memory
        if head >= self.size:
            raise VirtqueueError(f"chain head {head} is outside the descriptor table (size {self.size})")
        chain = Chain(memory, head)
        table, table_size, index, steps, nested = self.desc, self.size, head, 0, False
        seen_writable = False
        while True:
            if index >= table_size:
                raise VirtqueueError(f"descriptor {index} is outside its table (size {table_size})")
            steps += 1
            if steps > table_size:
                raise VirtqueueError(f"descriptor chain from head {head} is longer than its table "
                                     f"({table_size}): a loop")
            addr, length, flags, nxt = _DESC.unpack(memory.read(table + DESC_SIZE * index, DESC_SIZE))
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError("indirect descriptor, but VIRTIO_F_RING_INDIRECT_DESC was not negotiated")
                if nested:
                    raise VirtqueueError("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("indirect descriptor with the NEXT flag")
                if length == 0 or length % DESC_SIZE or length // DESC_SIZE > MAX_INDIRECT:
                    raise VirtqueueError(f"indirect table of {length} bytes: must be 1 to {MAX_INDIRECT} "
                                         f"descriptors of {DESC_SIZE} bytes")
                if addr % DESC_ALIGN or not memory.contains(addr, length):
                    raise VirtqueueError(f"indirect table at {addr:#x}+{length:#x} is misaligned or "
                                         "not inside guest RAM")
                table, table_size, index, steps, nested = addr, length // DESC_SIZE, 0, 0, True
                continue
            if length:
                writable = flags & VIRTQ_DESC_F_WRITE
                if not (memory.writable if writable else memory.contains)(addr, length):
                    raise VirtqueueError(f"{'device-writable ' if writable else ''}buffer {addr:#x}+{length:#x} "
                                         f"is not inside guest {'RAM' if writable else 'memory'}")
                if writable:
                    chain.writable.append((addr, length))
                    seen_writable = True
                elif seen_writable:
                    raise VirtqueueError("device-readable descriptor after a device-writable one")
                else:
                    chain.readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            index = nxt

    # --- returning chains --------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written into it."""
        slot = self.used + 4 + 8 * (self.used_idx % self.size)
        self.memory.write(slot, _USED_ELEM.pack(head, written & 0xFFFF_FFFF))
        # No write barrier needed: x86 keeps these two stores in order (see the module docstring).
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.memory.write_u16(self.used + 2, self.used_idx)

    def needs_interrupt(self) -> bool:
        """Whether the driver wants a used-buffer interrupt for what was pushed since the last
        call: VIRTQ_AVAIL_F_NO_INTERRUPT, or with EVENT_IDX the driver's ``used_event``."""
        old, new = self.signalled_used, self.used_idx
        if old == new:
            return False
        self.signalled_used = new
        full_barrier()    # our used.idx store before the load of the driver's flags / used_event
        if self.event_idx:
            used_event = self.memory.read_u16(self._used_event_at)
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF   # vring_need_event
        return not self.memory.read_u16(self.avail) & VIRTQ_AVAIL_F_NO_INTERRUPT

    # --- notification suppression ------------------------------------------------------------
    def disable_notifications(self) -> None:
        """Ask the driver not to notify while the device is already processing."""
        if not self.event_idx:
            self.memory.write_u16(self.used, VIRTQ_USED_F_NO_NOTIFY)
        # With EVENT_IDX, avail_event stays behind: the driver's vring_need_event is then false.

    def enable_notifications(self) -> bool:
        """Ask for a notification on the next buffer; True if one arrived already (process again)."""
        if self.event_idx:
            self.memory.write_u16(self._avail_event_at, self.last_avail)
        else:
            self.memory.write_u16(self.used, 0)
        full_barrier()    # our store before the load of avail.idx, or a notification could be lost
        return self.has_available()
