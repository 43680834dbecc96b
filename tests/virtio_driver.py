"""A tiny virtio driver for the tests: sets up split rings in a GuestMemory and talks to a
transport's registers, the way a guest driver does (virtio 1.x, 3.1.1 and 2.7.13)."""

from __future__ import annotations

import struct

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from pykvm.memory import GuestMemory

DESC = struct.Struct("<QIHH")


class RecordingMemory(GuestMemory):
    """GuestMemory that logs every access (kind, gpa, n) before doing it."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.log: list[tuple[str, int, int]] = []

    def read(self, gpa, n):
        self.log.append(("r", gpa, n))
        return super().read(gpa, n)

    def write(self, gpa, data):
        self.log.append(("w", gpa, len(data)))
        return super().write(gpa, data)

    def view(self, gpa, n):
        self.log.append(("v", gpa, n))
        return super().view(gpa, n)

    def read_u16(self, gpa):
        self.log.append(("r", gpa, 2))
        return super().read_u16(gpa)

    def write_u16(self, gpa, value):
        self.log.append(("w", gpa, 2))
        return super().write_u16(gpa, value)

    def read_u32(self, gpa):
        self.log.append(("r", gpa, 4))
        return super().read_u32(gpa)

    def write_u32(self, gpa, value):
        self.log.append(("w", gpa, 4))
        return super().write_u32(gpa, value)


class Rings:
    """One split virtqueue as a driver lays it out: table, available ring, used ring, and a bump
    allocator for buffers above them."""

    def __init__(self, memory: GuestMemory, size: int = 16, base: int = 0x10000, heap: int = 0x40000) -> None:
        self.memory, self.size = memory, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.used_event_at = self.avail + 4 + 2 * size
        self.avail_event_at = self.used + 4 + 8 * size
        self.heap = heap
        self.next_desc = 0
        self.avail_idx = 0
        self.last_used = 0
        for gpa, n in ((self.desc, 16 * size), (self.avail, 6 + 2 * size), (self.used, 6 + 8 * size)):
            memory.fill(gpa, n)

    def alloc(self, n: int, data: bytes | None = None) -> int:
        gpa = self.heap
        self.heap = (self.heap + max(n, 1) + 15) & ~15
        self.memory.write(gpa, data if data is not None else bytes(n))
        return gpa

    def put_desc(self, index: int, addr: int, length: int, flags: int, nxt: int = 0, table: int | None = None) -> None:
        self.memory.write((self.desc if table is None else table) + 16 * index, DESC.pack(addr, length, flags, nxt))

    def chain(self, readable=(), writable=(), indirect: bool = False) -> tuple[int, list[int]]:
        """Offer a chain of readable buffers (their contents) and writable ones (their lengths).
        Returns (head, gpas of the writable buffers)."""
        bufs = [(self.alloc(len(b), b), len(b), 0) for b in readable]
        wgpas = []
        for n in writable:
            gpa = self.alloc(n, b"\xee" * n)
            wgpas.append(gpa)
            bufs.append((gpa, n, VIRTQ_DESC_F_WRITE))
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, (gpa, n, flags) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.put_desc(i, gpa, n, flags | more, i + 1, table=table)
            head = self._take(1)[0]
            self.put_desc(head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
        else:
            ids = self._take(len(bufs))
            for i, (gpa, n, flags) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.put_desc(ids[i], gpa, n, flags | more, ids[i + 1] if more else 0)
            head = ids[0]
        self.offer(head)
        return head, wgpas

    def _take(self, n: int) -> list[int]:
        ids = [(self.next_desc + i) % self.size for i in range(n)]
        self.next_desc = (self.next_desc + n) % self.size
        return ids

    def offer(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def used_idx(self) -> int:
        return self.memory.read_u16(self.used + 2)

    def take_used(self) -> list[tuple[int, int]]:
        out = []
        while self.last_used != self.used_idx():
            at = self.used + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack("<II", self.memory.read(at, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


def w(transport, offset: int, value: int) -> None:
    transport.write(offset, 4, value)


def r(transport, offset: int) -> int:
    return transport.read(offset, 4)


def negotiate(transport, features: int | None = None) -> int:
    """Reset, ACKNOWLEDGE, DRIVER, accept ``features`` (default: all offered), FEATURES_OK.
    Returns the status read back."""
    w(transport, mmio.STATUS, 0)
    w(transport, mmio.STATUS, mmio.ACKNOWLEDGE)
    w(transport, mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER)
    offered = 0
    for sel in (0, 1):
        w(transport, mmio.DEVICE_FEATURES_SEL, sel)
        offered |= r(transport, mmio.DEVICE_FEATURES) << (32 * sel)
    want = offered if features is None else features
    for sel in (0, 1):
        w(transport, mmio.DRIVER_FEATURES_SEL, sel)
        w(transport, mmio.DRIVER_FEATURES, (want >> (32 * sel)) & 0xFFFF_FFFF)
    w(transport, mmio.STATUS, mmio.ACKNOWLEDGE | mmio.DRIVER | mmio.FEATURES_OK)
    return r(transport, mmio.STATUS)


def setup_queue(transport, index: int, rings: Rings) -> None:
    w(transport, mmio.QUEUE_SEL, index)
    w(transport, mmio.QUEUE_NUM, rings.size)
    for low, addr in ((mmio.QUEUE_DESC_LOW, rings.desc), (mmio.QUEUE_DRIVER_LOW, rings.avail),
                      (mmio.QUEUE_DEVICE_LOW, rings.used)):
        w(transport, low, addr & 0xFFFF_FFFF)
        w(transport, low + 4, addr >> 32)
    w(transport, mmio.QUEUE_READY, 1)


def start(transport, memory: GuestMemory, features: int | None = None, size: int = 16) -> list[Rings]:
    """Bring a device up the way a driver does; one Rings per queue (spaced 64 KiB apart)."""
    status = negotiate(transport, features)
    assert status & mmio.FEATURES_OK, f"FEATURES_OK refused (status {status:#x})"
    rings = []
    for index in range(len(transport.queues)):
        ring = Rings(memory, size=size, base=0x10000 + index * 0x10000, heap=0x100000 + index * 0x40000)
        setup_queue(transport, index, ring)
        rings.append(ring)
    w(transport, mmio.STATUS, r(transport, mmio.STATUS) | mmio.DRIVER_OK)
    return rings


class LevelLine:
    """An IrqLine that records its level and every change."""

    def __init__(self) -> None:
        self.level = False
        self.changes: list[bool] = []

    def set(self, level: bool) -> None:
        self.level = level
        self.changes.append(level)

    def pulse(self) -> None:
        self.set(True)
        self.set(False)


__all__ = ["DESC", "LevelLine", "RecordingMemory", "Rings", "VIRTQ_DESC_F_INDIRECT", "VIRTQ_DESC_F_NEXT",
           "VIRTQ_DESC_F_WRITE", "negotiate", "r", "setup_queue", "start", "w"]
