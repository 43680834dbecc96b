"""Buses: address -> (device, offset), unclaimed accesses read all ones and are counted."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.devices.bus import Bus, BusError
from pykvm.devices.debug_exit import DebugExit, status_for
from pykvm.devices.mmio_test import ID, MmioTestDevice


class Recorder:
    def __init__(self):
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return offset

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def test_routes_to_device_with_offset():
    bus, a, b = Bus("t"), Recorder(), Recorder()
    bus.attach(a, 0x3F8, 8)
    bus.attach(b, 0x80, 1)
    assert bus.read(0x3FD, 1) == 5
    bus.write(0x80, 1, 0x42)
    assert a.log == [("r", 5, 1)] and b.log == [("w", 0, 1, 0x42)]


@given(addr=st.integers(0, 0xFFFF), size=st.sampled_from([1, 2, 4, 8]))
def test_unclaimed_reads_all_ones_and_is_counted(addr, size):
    bus = Bus("t")
    bus.attach(Recorder(), 0x1000, 0x10)
    if 0x1000 <= addr < 0x1010:
        return
    assert bus.read(addr, size) == (1 << (8 * size)) - 1
    bus.write(addr, size, 0)
    assert bus.unclaimed[addr] == 2


def test_overlap_is_refused():
    bus = Bus("t")
    bus.attach(Recorder(), 0x100, 0x10)
    with pytest.raises(BusError):
        bus.attach(Recorder(), 0x10F, 1)
    with pytest.raises(BusError):
        bus.attach(Recorder(), 0x0, 0)
    bus.attach(Recorder(), 0x110, 1)   # adjacent is fine


def test_debug_exit_status_is_qemu_convention():
    seen = []
    dev = DebugExit(lambda value, status: seen.append((value, status)))
    for size, value in ((1, 0), (1, 0x2A), (2, 0x1234), (4, 7)):
        dev.write(0, size, value)
    assert seen == [(0, 1), (0x2A, 85), (0x1234, 0x69), (7, 15)]
    assert status_for(1) == 3


def test_debug_exit_status_is_what_the_shell_sees():
    """A wide write's (v << 1) | 1 passes 255; the status is its low 8 bits, as QEMU's exit() gives the shell."""
    for value in (0x3130, 0x80, 0xFF, 0xFFFF, 0xFFFFFFFF, 0x7F, 0x12345678):
        assert status_for(value) == ((value << 1) | 1) % 256
        assert 1 <= status_for(value) <= 255 and status_for(value) & 1
    assert status_for(0x3130) == 97


def test_mmio_test_device_registers():
    dev = MmioTestDevice()
    assert dev.read(0, 4) == ID and dev.read(0, 1) == ord("M")
    dev.write(8, 8, 0x1122334455667788)
    assert dev.read(8, 8) == 0x1122334455667788 and dev.read(8, 2) == 0x7788
    assert dev.read(0x10, 4) == (~0x55667788) & 0xFFFFFFFF
    dev.write(0, 4, 0)   # ID is read-only
    assert dev.read(0, 4) == ID


def test_a_sink_claims_its_ports_reads_all_ones_and_keeps_the_last_write():
    from pykvm.devices.sink import POST_PORT, Sink
    bus = Bus("port I/O")
    post = Sink("POST")
    bus.attach(post, POST_PORT, 1)
    bus.attach(Sink("PIT"), 0x40, 4)
    assert [bus.read(POST_PORT, n) for n in (1, 2, 4)] == [0xFF, 0xFFFF, 0xFFFF_FFFF]
    assert bus.read(0x41, 1) == 0xFF
    bus.write(POST_PORT, 1, 0x42)
    bus.write(0x43, 1, 0x34)
    assert post.last == 0x42 and bus.unclaimed == {}     # claimed: probing it is not a stray access
    bus.read(0x44, 1)
    assert bus.unclaimed == {0x44: 1}
