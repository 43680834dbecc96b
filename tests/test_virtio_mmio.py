"""The virtio-mmio transport, register by register (virtio 1.x, 4.2.2), with a toy device."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import LevelLine, Rings, negotiate, r, setup_queue, start, w

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.mmio import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    INT_CONFIG,
    INT_VRING,
    VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
    VirtioMmio,
)
from pykvm.devices.virtio.queue import VIRTQ_DESC_F_NEXT, SplitQueue
from pykvm.memory import GuestMemory

MiB = 1 << 20
TOY_FEATURE = 1 << 3


class Toy(VirtioDevice):
    """Queue 0 echoes the readable part into the writable part; queue 1 does not exist (size 0)
    ... and queue 2 raises, as a buggy device model would."""

    device_id = 0x2A
    name = "toy"
    features = TOY_FEATURE
    queue_sizes = (16, 0, 16)

    def __init__(self) -> None:
        self.resets = self.activations = 0
        self.cfg = bytearray(b"\x11\x22\x33\x44\x55\x66\x77\x88")

    def config(self) -> bytes:
        return bytes(self.cfg)

    def write_config(self, offset: int, data: bytes) -> None:
        self.cfg[offset:offset + len(data)] = data

    def reset(self) -> None:
        self.resets += 1

    def activate(self) -> None:
        self.activations += 1

    def process(self, index: int, queue: SplitQueue) -> None:
        while (chain := queue.pop()) is not None:
            if index == 2:
                raise RuntimeError("device model bug")
            queue.push(chain.head, chain.write(chain.read()))


@pytest.fixture
def mem():
    with GuestMemory(4 * MiB) as m:
        yield m


@pytest.fixture
def dev(mem):
    line = LevelLine()
    errors = []
    t = VirtioMmio(Toy(), mem, line, on_error=errors.append)
    t.line, t.errors = line, errors
    return t


def test_identity_registers(dev):
    assert r(dev, mmio.MAGIC_VALUE) == 0x74726976
    assert r(dev, mmio.VERSION_REG) == 2
    assert r(dev, mmio.DEVICE_ID) == 0x2A
    assert r(dev, mmio.VENDOR_ID_REG).to_bytes(4, "little") == b"PYKV"


def test_device_features_in_two_halves(dev):
    w(dev, mmio.DEVICE_FEATURES_SEL, 0)
    low = r(dev, mmio.DEVICE_FEATURES)
    w(dev, mmio.DEVICE_FEATURES_SEL, 1)
    high = r(dev, mmio.DEVICE_FEATURES)
    w(dev, mmio.DEVICE_FEATURES_SEL, 2)
    assert r(dev, mmio.DEVICE_FEATURES) == 0
    assert low == TOY_FEATURE | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX
    assert high == VIRTIO_F_VERSION_1 >> 32


def test_status_bits_in_order(dev):
    w(dev, mmio.STATUS, DRIVER)                       # DRIVER before ACKNOWLEDGE: dropped
    assert r(dev, mmio.STATUS) == 0
    w(dev, mmio.STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK)   # DRIVER_OK before FEATURES_OK: dropped
    assert r(dev, mmio.STATUS) == ACKNOWLEDGE | DRIVER
    w(dev, mmio.STATUS, ACKNOWLEDGE)                  # clearing a bit: ignored
    assert r(dev, mmio.STATUS) == ACKNOWLEDGE | DRIVER


@pytest.mark.parametrize("features, ok", [
    (VIRTIO_F_VERSION_1, True),
    (VIRTIO_F_VERSION_1 | TOY_FEATURE | VIRTIO_F_RING_EVENT_IDX, True),
    (TOY_FEATURE, False),                             # no VERSION_1: a legacy driver
    (VIRTIO_F_VERSION_1 | 1 << 5, False),             # a feature that was not offered
    (VIRTIO_F_VERSION_1 | 1 << 40, False),
])
def test_features_ok_only_for_a_valid_subset_with_version_1(dev, features, ok):
    status = negotiate(dev, features)
    assert bool(status & FEATURES_OK) == ok
    assert dev.driver_features == features


def test_driver_features_frozen_after_features_ok(dev):
    negotiate(dev, VIRTIO_F_VERSION_1)
    w(dev, mmio.DRIVER_FEATURES_SEL, 0)
    w(dev, mmio.DRIVER_FEATURES, TOY_FEATURE)
    assert dev.driver_features == VIRTIO_F_VERSION_1
    assert not dev.negotiated(TOY_FEATURE)


def test_queue_registers(dev, mem):
    w(dev, mmio.QUEUE_SEL, 0)
    assert r(dev, mmio.QUEUE_NUM_MAX) == 16
    w(dev, mmio.QUEUE_SEL, 1)
    assert r(dev, mmio.QUEUE_NUM_MAX) == 0            # no such queue
    w(dev, mmio.QUEUE_SEL, 7)
    assert r(dev, mmio.QUEUE_NUM_MAX) == 0 and r(dev, mmio.QUEUE_READY) == 0
    negotiate(dev)
    rings = Rings(mem, size=8)
    setup_queue(dev, 0, rings)
    assert r(dev, mmio.QUEUE_READY) == 1
    q = dev.queues[0].queue
    assert (q.size, q.desc, q.avail, q.used) == (8, rings.desc, rings.avail, rings.used)
    assert q.indirect and q.event_idx
    w(dev, mmio.QUEUE_NUM, 4)                         # ignored while the queue is ready
    w(dev, mmio.QUEUE_DESC_LOW, 0x5000)
    assert dev.queues[0].num == 8 and dev.queues[0].desc == rings.desc
    w(dev, mmio.QUEUE_READY, 0)
    assert r(dev, mmio.QUEUE_READY) == 0 and dev.queues[0].queue is None


def test_queue_address_high_halves(dev):
    negotiate(dev)
    w(dev, mmio.QUEUE_SEL, 0)
    w(dev, mmio.QUEUE_DESC_LOW, 0x1000)
    w(dev, mmio.QUEUE_DESC_HIGH, 0x1)
    w(dev, mmio.QUEUE_DRIVER_HIGH, 0x2)
    w(dev, mmio.QUEUE_DEVICE_LOW, 0x3000)
    assert dev.queues[0].desc == 0x1_0000_1000
    assert dev.queues[0].driver == 0x2_0000_0000 and dev.queues[0].device == 0x3000
    w(dev, mmio.QUEUE_READY, 1)                       # above guest RAM: refused
    assert r(dev, mmio.QUEUE_READY) == 0
    assert r(dev, mmio.STATUS) & DEVICE_NEEDS_RESET and dev.errors


def test_queue_enabled_before_features_ok_needs_reset(dev, mem):
    w(dev, mmio.STATUS, ACKNOWLEDGE | DRIVER)
    setup_queue(dev, 0, Rings(mem))
    assert r(dev, mmio.QUEUE_READY) == 0 and r(dev, mmio.STATUS) & DEVICE_NEEDS_RESET


@pytest.mark.parametrize("num", [0, 3, 32])
def test_bad_queue_size_needs_reset(dev, mem, num):
    negotiate(dev)
    rings = Rings(mem)
    setup_queue(dev, 0, rings)
    w(dev, mmio.QUEUE_READY, 0)
    w(dev, mmio.QUEUE_NUM, num)
    w(dev, mmio.QUEUE_READY, 1)
    assert r(dev, mmio.QUEUE_READY) == 0 and r(dev, mmio.STATUS) & DEVICE_NEEDS_RESET


def test_notify_processes_and_interrupts(dev, mem):
    (rings, _, _) = start(dev, mem, size=8)
    assert dev.device.activations == 1
    head, (out,) = rings.chain([b"ping"], [4])
    assert dev.line.changes == []
    w(dev, mmio.QUEUE_NOTIFY, 0)
    assert rings.take_used() == [(head, 4)] and mem.read(out, 4) == b"ping"
    assert r(dev, mmio.INTERRUPT_STATUS) == INT_VRING and dev.line.level
    w(dev, mmio.INTERRUPT_ACK, INT_VRING)
    assert r(dev, mmio.INTERRUPT_STATUS) == 0 and not dev.line.level
    assert dev.line.changes == [True, False]


def test_nothing_happens_before_driver_ok(dev, mem):
    negotiate(dev)
    rings = Rings(mem, size=8)
    setup_queue(dev, 0, rings)
    rings.chain([b"early"], [5])
    w(dev, mmio.QUEUE_NOTIFY, 0)
    assert rings.take_used() == [] and r(dev, mmio.INTERRUPT_STATUS) == 0
    w(dev, mmio.STATUS, r(dev, mmio.STATUS) | DRIVER_OK)   # now the waiting buffer is served
    assert len(rings.take_used()) == 1 and r(dev, mmio.INTERRUPT_STATUS) == INT_VRING


def test_bad_chain_sets_needs_reset_and_stops(dev, mem):
    (rings, _, _) = start(dev, mem, size=8)
    buf = rings.alloc(4)
    rings.put_desc(0, buf, 4, VIRTQ_DESC_F_NEXT, 0)      # a loop onto itself
    rings.offer(0)
    w(dev, mmio.QUEUE_NOTIFY, 0)                        # must not raise
    status = r(dev, mmio.STATUS)
    assert status & DEVICE_NEEDS_RESET and status & DRIVER_OK
    assert r(dev, mmio.INTERRUPT_STATUS) == INT_CONFIG and dev.line.level
    assert len(dev.errors) == 1 and "loop" in dev.errors[0]
    rings.chain([b"x"], [1])
    w(dev, mmio.QUEUE_NOTIFY, 0)
    assert rings.take_used() == []                      # stopped until reset
    w(dev, mmio.STATUS, status | FAILED)                # writing back NEEDS_RESET changes nothing
    assert r(dev, mmio.STATUS) == status | FAILED


def test_device_fault_never_escapes(dev, mem):
    (_, _, rings) = start(dev, mem, size=8)
    rings.chain([b"boom"])
    w(dev, mmio.QUEUE_NOTIFY, 2)
    assert r(dev, mmio.STATUS) & DEVICE_NEEDS_RESET and "internal error" in dev.errors[0]


def test_reset_returns_everything_to_initial_state(dev, mem):
    (rings, _, _) = start(dev, mem, size=8)
    rings.chain([b"a"], [1])
    w(dev, mmio.QUEUE_NOTIFY, 0)
    w(dev, mmio.QUEUE_SEL, 2)
    assert dev.line.level
    resets = dev.device.resets
    w(dev, mmio.STATUS, 0)
    assert r(dev, mmio.STATUS) == 0 and r(dev, mmio.INTERRUPT_STATUS) == 0 and not dev.line.level
    assert dev.queue_sel == 0 and dev.driver_features == 0
    assert all(not q.ready and q.queue is None for q in dev.queues)
    assert dev.queues[0].num == 16 and dev.device.resets == resets + 1
    start(dev, mem, size=8)                             # and it comes up again
    assert dev.running


def test_failed_stops_the_device(dev, mem):
    (rings, _, _) = start(dev, mem, size=8)
    w(dev, mmio.STATUS, r(dev, mmio.STATUS) | FAILED)
    rings.chain([b"a"], [1])
    w(dev, mmio.QUEUE_NOTIFY, 0)
    assert rings.take_used() == [] and not dev.running


def test_registers_take_only_aligned_32_bit_accesses(dev):
    assert dev.read(mmio.MAGIC_VALUE, 2) == 0 and dev.read(mmio.MAGIC_VALUE + 1, 4) == 0
    assert dev.read(mmio.MAGIC_VALUE, 8) == 0
    dev.write(mmio.STATUS, 1, ACKNOWLEDGE)
    assert r(dev, mmio.STATUS) == 0
    assert r(dev, 0x0FF0 & 0xFC) == 0                     # an unused register reads 0


def test_config_space_any_width_and_generation(dev):
    assert dev.read(0x100, 1) == 0x11
    assert dev.read(0x102, 2) == 0x4433
    assert dev.read(0x104, 4) == 0x88776655
    assert dev.read(0x100, 8) == 0x8877665544332211
    assert dev.read(0x106, 4) == 0x8877                  # beyond the end reads as zeros
    assert dev.read(0x1FC, 4) == 0
    dev.write(0x101, 1, 0xAB)
    assert dev.read(0x100, 2) == 0xAB11
    gen = r(dev, mmio.CONFIG_GENERATION)
    dev.config_changed()
    assert r(dev, mmio.CONFIG_GENERATION) != gen
    assert r(dev, mmio.INTERRUPT_STATUS) == 0             # no driver running: no interrupt


def test_config_change_interrupts_a_running_driver(dev, mem):
    start(dev, mem)
    dev.config_changed()
    assert r(dev, mmio.INTERRUPT_STATUS) == INT_CONFIG and dev.line.level


def test_no_interrupt_when_the_driver_suppresses_it(dev, mem):
    (rings, _, _) = start(dev, mem, size=8, features=VIRTIO_F_VERSION_1)   # no EVENT_IDX
    mem.write_u16(rings.avail, 1)                       # VIRTQ_AVAIL_F_NO_INTERRUPT
    rings.chain([b"q"], [1])
    w(dev, mmio.QUEUE_NOTIFY, 0)
    assert len(rings.take_used()) == 1 and r(dev, mmio.INTERRUPT_STATUS) == 0


def test_event_idx_asks_for_notification_after_processing(dev, mem):
    (rings, _, _) = start(dev, mem, size=8)
    for _ in range(3):
        rings.chain([b"q"], [1])
    w(dev, mmio.QUEUE_NOTIFY, 0)
    assert len(rings.take_used()) == 3
    assert mem.read_u16(rings.avail_event_at) == 3      # avail_event: "notify me after entry 3"


def test_notify_of_an_unknown_queue_is_ignored(dev, mem):
    start(dev, mem)
    for q in (1, 3, 0xFFFF_FFFF):
        w(dev, mmio.QUEUE_NOTIFY, q)
    assert r(dev, mmio.STATUS) & DEVICE_NEEDS_RESET == 0


# --- random register traffic ------------------------------------------------------------------

OFFSETS = [mmio.DEVICE_FEATURES_SEL, mmio.DRIVER_FEATURES, mmio.DRIVER_FEATURES_SEL, mmio.QUEUE_SEL,
           mmio.QUEUE_NUM, mmio.QUEUE_READY, mmio.QUEUE_NOTIFY, mmio.INTERRUPT_ACK, mmio.STATUS,
           mmio.QUEUE_DESC_LOW, mmio.QUEUE_DESC_HIGH, mmio.QUEUE_DRIVER_LOW, mmio.QUEUE_DRIVER_HIGH,
           mmio.QUEUE_DEVICE_LOW, mmio.QUEUE_DEVICE_HIGH, 0x100, 0x104, 0x0FC, 0x000]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, (1 << 64) - 1), steps=st.integers(1, 80), setup=st.booleans())
def test_random_register_traffic_keeps_the_invariants(seed, steps, setup):
    rnd = random.Random(seed)
    with GuestMemory(4 * MiB) as mem:
        mem.write(0x10000, rnd.randbytes(0x2000))       # rings full of junk
        line = LevelLine()
        dev = VirtioMmio(Toy(), mem, line, on_error=lambda reason: None)
        if setup:
            start(dev, mem, size=8)
        for _ in range(steps):
            offset = rnd.choice(OFFSETS)
            size = rnd.choice([4, 4, 4, 4, 1, 2, 8])
            value = rnd.choice([0, 1, 2, 3, 8, 0xF, 0x10000, rnd.getrandbits(32), rnd.getrandbits(8)])
            if rnd.random() < 0.3:
                dev.read(offset, size)
            else:
                dev.write(offset, size, value & ((1 << (8 * size)) - 1))
            status = dev.status
            assert r(dev, mmio.MAGIC_VALUE) == mmio.MAGIC
            assert line.level == (dev.interrupt_status != 0)
            assert not status & DRIVER_OK or status & FEATURES_OK
            assert not status & FEATURES_OK or dev.driver_features & VIRTIO_F_VERSION_1
            assert not dev.driver_features & ~dev.offered or not status & FEATURES_OK
            for q in dev.queues:
                assert q.queue is None or q.ready
