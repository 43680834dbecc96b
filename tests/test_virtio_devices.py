"""virtio-blk, virtio-console and virtio-rng behind the transport, driven like a guest driver."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import LevelLine, Rings, r, start, w

from pykvm.devices.virtio import blk, mmio
from pykvm.devices.virtio import console as console_module
from pykvm.devices.virtio.blk import (
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    Block,
)
from pykvm.devices.virtio.console import VirtioConsole
from pykvm.devices.virtio.mmio import VIRTIO_F_VERSION_1, VirtioMmio
from pykvm.devices.virtio.rng import Entropy
from pykvm.memory import GuestMemory

MiB = 1 << 20
SECTORS = 64


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


@pytest.fixture
def mem():
    with GuestMemory(4 * MiB) as m:
        yield m


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(bytes([s]) * 512 for s in range(SECTORS)))
    return path


def blk_device(mem, image, readonly=False, features=None):
    device = Block(str(image), readonly=readonly)
    transport = VirtioMmio(device, mem, LevelLine())
    (rings,) = start(transport, mem, features=features)
    return device, transport, rings


def request(transport, rings, readable, writable, indirect=False):
    """Submit one chain, notify, return (used length, [written buffers' bytes])."""
    _, gpas = rings.chain(readable, writable, indirect=indirect)
    w(transport, mmio.QUEUE_NOTIFY, 0)
    (used,) = rings.take_used()
    return used[1], [rings.memory.read(gpa, n) for gpa, n in zip(gpas, writable, strict=True)]


def test_blk_config_and_features(mem, image):
    device, transport, _ = blk_device(mem, image)
    assert transport.read(0x100, 8) == SECTORS                # capacity in 512-byte sectors
    assert transport.read(0x10C, 4) == blk.QUEUE_SIZE - 2     # seg_max
    assert device.features & VIRTIO_BLK_F_FLUSH and not device.features & VIRTIO_BLK_F_RO
    assert Block(str(image), readonly=True).features & VIRTIO_BLK_F_RO


def test_blk_read_across_segments(mem, image):
    _, transport, rings = blk_device(mem, image)
    used, (a, b, status) = request(transport, rings, [header(VIRTIO_BLK_T_IN, 3)], [512, 1024, 1])
    assert used == 1537 and status == bytes([VIRTIO_BLK_S_OK])
    assert a == bytes([3]) * 512 and b == bytes([4]) * 512 + bytes([5]) * 512


def test_blk_write_reaches_the_file(mem, image):
    _, transport, rings = blk_device(mem, image)
    data = bytes(range(256)) * 4
    used, (status,) = request(transport, rings, [header(VIRTIO_BLK_T_OUT, 10), data[:100], data[100:]], [1],
                              indirect=True)
    assert used == 1 and status == bytes([VIRTIO_BLK_S_OK])
    assert image.read_bytes()[10 * 512:11 * 512 + 512] == data
    assert image.stat().st_size == SECTORS * 512


def test_blk_header_and_data_may_share_a_descriptor(mem, image):
    _, transport, rings = blk_device(mem, image)
    used, (status,) = request(transport, rings, [header(VIRTIO_BLK_T_OUT, 0) + b"\x42" * 512], [1])
    assert status == bytes([VIRTIO_BLK_S_OK]) and image.read_bytes()[:512] == b"\x42" * 512
    used, (both,) = request(transport, rings, [header(VIRTIO_BLK_T_IN, 0)], [513])
    assert used == 513 and both == b"\x42" * 512 + bytes([VIRTIO_BLK_S_OK])


def test_blk_read_only_refuses_writes(mem, image):
    before = image.read_bytes()
    _, transport, rings = blk_device(mem, image, readonly=True)
    assert transport.negotiated(VIRTIO_BLK_F_RO)
    used, (status,) = request(transport, rings, [header(VIRTIO_BLK_T_OUT, 1), b"x" * 512], [1])
    assert status == bytes([VIRTIO_BLK_S_IOERR])
    assert image.read_bytes() == before
    _, (_, status) = request(transport, rings, [header(VIRTIO_BLK_T_IN, 1)], [512, 1])
    assert status == bytes([VIRTIO_BLK_S_OK])
    _, (status,) = request(transport, rings, [header(VIRTIO_BLK_T_FLUSH)], [1])
    assert status == bytes([VIRTIO_BLK_S_OK])


@pytest.mark.parametrize("sector, n", [(SECTORS, 512), (SECTORS - 1, 1024), (1 << 63, 512), (0, 100)])
def test_blk_out_of_range_is_an_io_error(mem, image, sector, n):
    before = image.read_bytes()
    _, transport, rings = blk_device(mem, image)
    used, (*_, status) = request(transport, rings, [header(VIRTIO_BLK_T_IN, sector)], [n, 1])
    assert status == bytes([VIRTIO_BLK_S_IOERR]) and used == 1
    _, (status,) = request(transport, rings, [header(VIRTIO_BLK_T_OUT, sector), b"\xff" * n], [1])
    assert status == bytes([VIRTIO_BLK_S_IOERR])
    assert image.read_bytes() == before


def test_blk_last_sector_is_in_range(mem, image):
    _, transport, rings = blk_device(mem, image)
    _, (data, status) = request(transport, rings, [header(VIRTIO_BLK_T_IN, SECTORS - 1)], [512, 1])
    assert status == bytes([VIRTIO_BLK_S_OK]) and data == bytes([SECTORS - 1]) * 512


def test_blk_flush_really_syncs(mem, image, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(blk.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    device, transport, rings = blk_device(mem, image)
    _, (status,) = request(transport, rings, [header(VIRTIO_BLK_T_FLUSH)], [1])
    assert status == bytes([VIRTIO_BLK_S_OK]) and synced == [device.fd]


def test_blk_is_write_through_without_flush_negotiated(mem, image, monkeypatch):
    synced = []
    monkeypatch.setattr(blk.os, "fdatasync", synced.append)
    device, transport, rings = blk_device(mem, image, features=VIRTIO_F_VERSION_1)
    request(transport, rings, [header(VIRTIO_BLK_T_OUT, 2), b"w" * 512], [1])
    assert synced == [device.fd]


def test_blk_get_id_and_unknown_requests(mem, image):
    _, transport, rings = blk_device(mem, image)
    used, (ident, status) = request(transport, rings, [header(VIRTIO_BLK_T_GET_ID)], [20, 1])
    assert ident == b"disk.img".ljust(20, b"\0") and status == bytes([VIRTIO_BLK_S_OK]) and used == 21
    _, (status,) = request(transport, rings, [header(11)], [1])         # DISCARD: not offered
    assert status == bytes([VIRTIO_BLK_S_UNSUPP])
    _, (status,) = request(transport, rings, [b"short"], [1])
    assert status == bytes([VIRTIO_BLK_S_IOERR])


def test_blk_request_without_status_byte(mem, image):
    device, transport, rings = blk_device(mem, image)
    used, _ = request(transport, rings, [header(VIRTIO_BLK_T_IN)], [])
    assert used == 0 and device.bad_requests == 1
    assert not r(transport, mmio.STATUS) & mmio.DEVICE_NEEDS_RESET


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, (1 << 64) - 1))
def test_blk_random_requests_never_escape(tmp_path, seed):
    rnd = random.Random(seed)
    path = tmp_path / f"fuzz{seed}.img"
    path.write_bytes(bytes(SECTORS * 512))
    with GuestMemory(4 * MiB) as mem:
        device, transport, rings = blk_device(mem, path, readonly=rnd.random() < 0.3)
        try:
            for _ in range(rnd.randrange(1, 6)):
                kind = rnd.choice([0, 1, 4, 8, 11, rnd.getrandbits(32)])
                sector = rnd.choice([0, 1, SECTORS - 1, SECTORS, rnd.getrandbits(64)])
                readable = [header(kind, sector)[:rnd.choice([16, 16, 16, 8])]]
                readable += [rnd.randbytes(rnd.choice([512, 100, 1024])) for _ in range(rnd.randrange(3))]
                writable = [rnd.choice([1, 20, 512, 513, 1024]) for _ in range(rnd.randrange(3))]
                _, gpas = rings.chain(readable, writable, indirect=rnd.random() < 0.3)
                w(transport, mmio.QUEUE_NOTIFY, 0)
                used = rings.take_used()
                assert len(used) == 1
                if writable:
                    assert mem.read(gpas[-1] + writable[-1] - 1, 1)[0] in (0, 1, 2)   # a status byte
            assert path.stat().st_size == SECTORS * 512
            assert not transport.status & mmio.DEVICE_NEEDS_RESET
        finally:
            device.close()


# --- console ------------------------------------------------------------------------------------

def test_console_transmits_to_the_sink(mem):
    out = []
    transport = VirtioMmio(VirtioConsole(out.append), mem, LevelLine())
    _, tx = start(transport, mem, size=8)
    tx.chain([b"Hello ", b"hvc0\n"])
    w(transport, mmio.QUEUE_NOTIFY, 1)
    assert b"".join(out) == b"Hello hvc0\n" and tx.take_used()[0][1] == 0


def test_console_input_waits_for_buffers_and_is_never_lost(mem):
    console = VirtioConsole(lambda data: None)
    transport = VirtioMmio(console, mem, LevelLine())
    assert console.feed(b"early") == 0 and not console.listening
    rx, tx = start(transport, mem, size=8)
    assert not console.listening                      # the guest has not written to it yet
    tx.chain([b"login: "])
    w(transport, mmio.QUEUE_NOTIFY, 1)
    console._first_output -= console_module.LISTEN_DELAY
    assert console.listening
    assert console.feed(b"abc") == 0                  # no receive buffers yet
    _, (a,) = rx.chain([], [4])
    _, (b,) = rx.chain([], [4])
    assert console.feed(b"hello world") == 8          # two 4-byte buffers: the rest stays with the caller
    assert rx.take_used() == [(0, 4), (1, 4)]
    assert mem.read(a, 4) + mem.read(b, 4) == b"hello wo"
    assert r(transport, mmio.INTERRUPT_STATUS) == mmio.INT_VRING
    _, (c,) = rx.chain([], [16])
    w(transport, mmio.QUEUE_NOTIFY, 0)                # a notification alone delivers nothing
    assert rx.take_used() == []
    assert console.feed(b"rld") == 3 and mem.read(c, 3) == b"rld"


# --- entropy ------------------------------------------------------------------------------------

def test_rng_fills_writable_buffers(mem):
    rng = Entropy(source=lambda n: bytes(range(n)))
    transport = VirtioMmio(rng, mem, LevelLine())
    (rings,) = start(transport, mem, size=8)
    _, (a, b) = rings.chain([b"ignored"], [8, 4])
    w(transport, mmio.QUEUE_NOTIFY, 0)
    assert rings.take_used() == [(0, 12)]
    assert mem.read(a, 8) + mem.read(b, 4) == bytes(range(12))


def test_rng_request_is_capped(mem):
    transport = VirtioMmio(Entropy(), mem, LevelLine())
    (rings,) = start(transport, mem, size=8)
    rings.heap = 0x200000
    rings.chain([], [200 * 1024])
    w(transport, mmio.QUEUE_NOTIFY, 0)
    assert rings.take_used() == [(0, 64 * 1024)]


def test_rng_bytes_are_not_constant(mem):
    transport = VirtioMmio(Entropy(), mem, LevelLine())
    (rings,) = start(transport, mem, size=8)
    _, (gpa,) = rings.chain([], [64])
    w(transport, mmio.QUEUE_NOTIFY, 0)
    assert len(set(mem.read(gpa, 64))) > 8


def test_rings_helper_layout():
    with GuestMemory(4 * MiB) as m:
        rings = Rings(m, size=8)
        assert rings.used % 4 == 0 and rings.avail == rings.desc + 128
