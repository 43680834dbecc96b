"""What a hostile driver can make the host spend, and a slow host's back-pressure (issue 9 parts 2, 7).

A chain may name the same guest memory many times over (overlapping buffers, or an indirect table
of 1,024 entries all pointing at one region): what the chain adds up to can be far more than the
guest's RAM. Every device must handle it piecewise, so the host memory one request costs is
bounded by a constant. Measured with tracemalloc (the peak of Python allocations while the device
works), never by time.
"""

from __future__ import annotations

import tracemalloc

import pytest
from virtio_driver import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    LevelLine,
    start,
    w,
)

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, Block
from pykvm.devices.virtio.console import PIECE, RECEIVEQ, TRANSMITQ, VirtioConsole
from pykvm.devices.virtio.rng import MAX_REQUEST, Entropy
from pykvm.memory import GuestMemory

MiB = 1 << 20
GUEST_RAM = 16 * MiB
REGION = 0x400000           # the buffer every descriptor points at
BOUND = 1 * MiB              # what one request may cost the host, whatever the chain adds up to


@pytest.fixture
def mem():
    with GuestMemory(GUEST_RAM) as m:
        yield m


def overlapping_chain(rings, count: int, length: int, flags: int = 0, indirect: bool = False,
                      head_buffers: tuple[tuple[int, int, int], ...] = (),
                      tail_buffers: tuple[tuple[int, int, int], ...] = ()) -> int:
    """Offer one chain of ``count`` descriptors that all point at REGION (``length`` bytes each),
    with optional other buffers (gpa, length, flags) before and after. Returns the head."""
    bufs = [*head_buffers, *[(REGION, length, flags)] * count, *tail_buffers]
    if indirect:
        table = 0x200000
        for i, (gpa, n, f) in enumerate(bufs):
            more = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
            rings.put_desc(i, gpa, n, f | more, i + 1, table=table)
        rings.put_desc(0, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
    else:
        assert len(bufs) <= rings.size
        for i, (gpa, n, f) in enumerate(bufs):
            more = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
            rings.put_desc(i, gpa, n, f | more, i + 1)
    rings.offer(0)
    return 0


def peak_while(action) -> int:
    """The peak of Python allocations (bytes) while ``action()`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        action()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


class CountingSink:
    """The host's output: counts bytes and remembers the largest single write."""

    def __init__(self) -> None:
        self.total = 0
        self.largest = 0

    def __call__(self, data: bytes) -> None:
        self.total += len(data)
        self.largest = max(self.largest, len(data))


@pytest.mark.parametrize("indirect", [False, True])
def test_console_transmit_of_overlapping_buffers_costs_a_constant(mem, indirect):
    sink = CountingSink()
    transport = mmio.VirtioMmio(VirtioConsole(sink), mem, LevelLine())
    _, tx = start(transport, mem, size=64)
    # 64 MiB of output named by a 16 MiB guest: 64 x 1 MiB direct, or 1,024 x 64 KiB indirect.
    count, length = (1024, 64 * 1024) if indirect else (64, MiB)
    overlapping_chain(tx, count, length, indirect=indirect)
    peak = peak_while(lambda: w(transport, mmio.QUEUE_NOTIFY, TRANSMITQ))
    assert sink.total == count * length                      # every byte went out ...
    assert sink.largest <= PIECE                              # ... a piece at a time
    assert tx.take_used() == [(0, 0)]
    assert peak < BOUND, f"{peak} bytes allocated for one transmit chain"


@pytest.mark.parametrize("kind", [VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT])
def test_blk_request_over_overlapping_buffers_costs_a_constant(mem, tmp_path, kind):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(64 * MiB)                                  # sparse: 64 MiB of zeros
    device = Block(str(image))
    try:
        transport = mmio.VirtioMmio(device, mem, LevelLine())
        (rings,) = start(transport, mem, size=16)
        header_gpa, status_gpa = 0x300000, 0x300100
        mem.write(header_gpa, kind.to_bytes(4, "little") + bytes(12))     # type, reserved, sector 0
        mem.write(status_gpa, b"\xee")
        data_flags = VIRTQ_DESC_F_WRITE if kind == VIRTIO_BLK_T_IN else 0
        # 1,022 x 64 KiB of data (the indirect table's limit is 1,024 with header and status).
        overlapping_chain(rings, 1022, 64 * 1024, flags=data_flags, indirect=True,
                          head_buffers=((header_gpa, 16, 0),),
                          tail_buffers=((status_gpa, 1, VIRTQ_DESC_F_WRITE),))
        peak = peak_while(lambda: w(transport, mmio.QUEUE_NOTIFY, 0))
        assert mem.read(status_gpa, 1) == bytes([VIRTIO_BLK_S_OK])
        assert peak < BOUND, f"{peak} bytes allocated for one 64 MiB request"
    finally:
        device.close()


def test_rng_request_over_overlapping_buffers_costs_a_constant(mem):
    transport = mmio.VirtioMmio(Entropy(), mem, LevelLine())
    (rings,) = start(transport, mem, size=16)
    overlapping_chain(rings, 1024, 64 * 1024, flags=VIRTQ_DESC_F_WRITE, indirect=True)
    peak = peak_while(lambda: w(transport, mmio.QUEUE_NOTIFY, 0))
    assert rings.take_used() == [(0, MAX_REQUEST)]
    assert peak < BOUND


# --- back-pressure: a host that cannot take the output yet --------------------------------------

class SlowHost:
    """Takes output only while it has room; the test plays the reader draining it."""

    def __init__(self, room: int) -> None:
        self.got = bytearray()
        self.capacity = room

    def room(self) -> int:
        return self.capacity - len(self.got)

    def out(self, data: bytes) -> None:
        assert len(data) <= self.room(), "the device wrote more than the host had room for"
        self.got += data

    def drain(self) -> bytes:
        data, self.got = bytes(self.got), bytearray()
        return data


def test_console_stops_using_buffers_while_the_host_has_no_room(mem):
    host = SlowHost(room=3000)
    console = VirtioConsole(host.out, host.room)
    transport = mmio.VirtioMmio(console, mem, LevelLine())
    _, tx = start(transport, mem, size=8)
    first = bytes(range(256)) * 40                            # 10,240 bytes in one chain
    second = b"second chain"
    tx.chain([first[:5000], first[5000:]])
    tx.chain([second])
    w(transport, mmio.QUEUE_NOTIFY, TRANSMITQ)
    assert len(host.got) == 3000                              # as much as the host could take ...
    assert tx.take_used() == []                               # ... and the chain is not returned yet
    received = host.drain()
    while len(received) < len(first) + len(second):
        console.host_ready()                                  # the reader drained: carry on
        more = host.drain()
        assert more, "no progress after host_ready()"
        received += more
    assert received == first + second                         # nothing lost, nothing repeated
    assert tx.take_used() == [(0, 0), (2, 0)]


def test_console_receive_is_unaffected_by_a_full_host(mem):
    host = SlowHost(room=0)
    console = VirtioConsole(host.out, host.room)
    transport = mmio.VirtioMmio(console, mem, LevelLine())
    rx, _ = start(transport, mem, size=8)
    _, (gpa,) = rx.chain([], [8])
    assert console.feed(b"input") == 5 and mem.read(gpa, 5) == b"input"
    assert rx.take_used() == [(0, 5)]
    assert RECEIVEQ == 0
