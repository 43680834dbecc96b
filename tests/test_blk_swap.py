"""virtio-blk's image swapped while the guest runs (Firecracker's PATCH /drives after InstanceStart): the device
reads and writes the new file from the next request on, its configuration space shows the new capacity, and the
driver is told by a configuration change (virtio 1.x 2.5, 4.2.2): ConfigGeneration changes and a
configuration-change interrupt is raised, held back while the device is paused. A file that cannot be opened as
the drive is changes nothing."""

from __future__ import annotations

import os
import struct

import pytest
from virtio_driver import LevelLine, r, start

from pykvm.devices.virtio import mmio as m
from pykvm.devices.virtio.blk import SECTOR, Block
from pykvm.memory import GuestMemory


@pytest.fixture
def drive(tmp_path):
    old, new = tmp_path / "old.img", tmp_path / "new.img"
    old.write_bytes(b"o" * 4 * SECTOR)
    new.write_bytes(b"n" * 16 * SECTOR)
    memory = GuestMemory(4 << 20)
    device = Block(str(old))
    line = LevelLine()
    transport = m.VirtioMmio(device, memory, line)
    (rings,) = start(transport, memory)
    yield device, transport, memory, line, rings, old, new
    transport.close()
    memory.close()


def read_sector(transport, memory, rings, sector: int) -> tuple[int, bytes]:
    _, (data, status) = rings.chain([struct.pack("<IIQ", 0, 0, sector)], [SECTOR, 1])
    transport.process_queue(0)
    rings.take_used()
    return memory.read(status, 1)[0], memory.read(data, SECTOR)


def capacity(transport) -> int:
    return transport.read(m.CONFIG_OFFSET, 4) | transport.read(m.CONFIG_OFFSET + 4, 4) << 32


def test_swap_takes_the_new_image_capacity_and_tells_the_driver(drive):
    device, transport, memory, line, rings, old, new = drive
    assert capacity(transport) == 4 and read_sector(transport, memory, rings, 3) == (0, b"o" * SECTOR)
    generation = r(transport, m.CONFIG_GENERATION)
    transport.write(m.INTERRUPT_ACK, 4, 3)
    line.changes.clear()
    device.swap(str(new))
    assert capacity(transport) == 16 and device.path == str(new)
    assert r(transport, m.CONFIG_GENERATION) != generation
    assert r(transport, m.INTERRUPT_STATUS) == m.INT_CONFIG and line.changes == [True]
    assert read_sector(transport, memory, rings, 15) == (0, b"n" * SECTOR)     # beyond the old end
    assert device.state()["capacity"] == 16


def test_a_file_that_cannot_be_opened_changes_nothing(drive, tmp_path):
    device, transport, memory, line, rings, old, new = drive
    with pytest.raises(OSError):
        device.swap(str(tmp_path / "missing.img"))
    assert device.path == str(old) and capacity(transport) == 4
    assert read_sector(transport, memory, rings, 0) == (0, b"o" * SECTOR)
    if os.geteuid() != 0:                 # root opens a 0444 file read-write anyway
        new.chmod(0o444)
        with pytest.raises(PermissionError):
            device.swap(str(new))         # a read-write drive needs a writable image
        assert device.path == str(old)


def test_while_paused_the_configuration_interrupt_waits_for_resume(drive):
    device, transport, memory, line, rings, old, new = drive
    transport.write(m.INTERRUPT_ACK, 4, 3)
    line.changes.clear()
    assert transport.pause()
    device.swap(str(new))
    assert capacity(transport) == 16 and line.changes == []
    transport.resume()
    assert line.changes == [True] and r(transport, m.INTERRUPT_STATUS) == m.INT_CONFIG
