"""virtio-mmio transports and their devices through a snapshot, without a VM: the driver's rings continue in a
fresh transport, and a state file describing queues or features the transport would refuse from a driver is
refused the same way."""

from __future__ import annotations

import struct

import pytest
from virtio_driver import LevelLine, r, start, w

from pykvm.devices.virtio import mmio
from pykvm.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, Block
from pykvm.devices.virtio.console import VirtioConsole
from pykvm.devices.virtio.mmio import VirtioMmio
from pykvm.devices.virtio.net import Net
from pykvm.devices.virtio.rng import Entropy
from pykvm.memory import GuestMemory

MiB = 1 << 20
SIZE = 4 * MiB


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"".join(bytes([s]) * 512 for s in range(64)))
    return path


@pytest.fixture
def memories():
    with GuestMemory(SIZE) as a, GuestMemory(SIZE) as b:
        yield a, b


def copy_memory(src: GuestMemory, dst: GuestMemory) -> None:
    dst.write(0, src.read(0, SIZE))


def serve(transport, rings, readable, writable):
    _, gpas = rings.chain(readable, writable)
    w(transport, mmio.QUEUE_NOTIFY, 0)
    return rings.take_used(), [rings.memory.read(gpa, n) for gpa, n in zip(gpas, writable, strict=True)]


def snapshot_blk(memories, image):
    """A running virtio-blk that served two requests and has one chain offered but not yet notified."""
    old, new = memories
    device = Block(str(image))
    transport = VirtioMmio(device, old, LevelLine())
    (rings,) = start(transport, old)
    serve(transport, rings, [header(VIRTIO_BLK_T_IN, 1)], [512, 1])
    serve(transport, rings, [header(VIRTIO_BLK_T_OUT, 2), b"\x77" * 512], [1])
    return device, transport, rings


def test_blk_continues_in_a_fresh_transport_with_the_rings_where_they_were(memories, image):
    old, new = memories
    device, transport, rings = snapshot_blk(memories, image)
    _, pending = rings.chain([header(VIRTIO_BLK_T_IN, 2)], [512, 1])   # offered just before the pause
    state = transport.state()
    copy_memory(old, new)
    transport.close()
    line = LevelLine()
    fresh = VirtioMmio(Block(str(image)), new, line)
    fresh.load_state(state)
    rings.memory = new
    assert r(fresh, mmio.STATUS) == r(transport, mmio.STATUS) and fresh.running
    w(fresh, mmio.QUEUE_SEL, 0)
    assert r(fresh, mmio.QUEUE_READY) == 1 and r(fresh, mmio.INTERRUPT_STATUS) == 1 and line.level
    fresh.resume_after_restore()                                     # the pending chain is served now
    (used,) = rings.take_used()
    assert used[1] == 513                                            # 512 bytes and the status byte
    assert new.read(pending[0], 512) == b"\x77" * 512                # the write before the snapshot
    assert rings.used_idx() == 3                                     # used.idx continues, no repeat
    got, (data, status) = serve(fresh, rings, [header(VIRTIO_BLK_T_IN, 5)], [512, 1])
    assert [len(got), data, status] == [1, bytes([5]) * 512, bytes([VIRTIO_BLK_S_OK])]
    fresh.close()


def test_an_idle_device_and_a_reset_one_round_trip(memories):
    old, new = memories
    rng = VirtioMmio(Entropy(), old)
    start(rng, old)
    fresh = VirtioMmio(Entropy(), new)
    fresh.load_state(rng.state())
    assert fresh.state() == rng.state()
    cold = VirtioMmio(VirtioConsole(out=lambda b: None), old)
    other = VirtioMmio(VirtioConsole(out=lambda b: None), new)
    other.load_state(cold.state())
    assert other.state() == cold.state() and r(other, mmio.STATUS) == 0


def _bad(state, change):
    state = {**state, "queues": [dict(q) for q in state["queues"]], "device": dict(state["device"])}
    change(state)
    return state


HOSTILE = {
    "descriptor table outside RAM": lambda s: s["queues"][0].update(desc=SIZE - 16),
    "descriptor table misaligned": lambda s: s["queues"][0].update(desc=0x10008),
    "used ring in the last bytes": lambda s: s["queues"][0].update(device=SIZE - 8),
    "address of 65 bits": lambda s: s["queues"][0].update(driver=1 << 64),
    "size not a power of 2": lambda s: s["queues"][0].update(num=12),
    "size above QueueNumMax": lambda s: s["queues"][0].update(num=1 << 15),
    "too many chains in flight": lambda s: s["queues"][0].update(last_avail=100, used_idx=0),
    "index not a number": lambda s: s["queues"][0].update(last_avail="2"),
    "ready not a bool": lambda s: s["queues"][0].update(ready=1),
    "features not offered": lambda s: s.update(driver_features=s["driver_features"] | 1 << 60),
    "features without VERSION_1": lambda s: s.update(driver_features=s["driver_features"] & ~(1 << 32)),
    "status with undefined bits": lambda s: s.update(status=s["status"] | 0x30),
    "interrupt status out of range": lambda s: s.update(interrupt_status=4),
    "another device type": lambda s: s.update(device_id=4),
    "a queue missing": lambda s: s.update(queues=[]),
    "a field missing": lambda s: s.pop("queue_sel"),
    "the drive grew": lambda s: s["device"].update(capacity=65),
    "another drive": lambda s: s["device"].update(path="/etc/passwd"),
    "a device state that is not a dict": lambda s: s.update(device=[1]),
}


@pytest.mark.parametrize("what", HOSTILE)
def test_hostile_transport_state_is_refused_and_changes_nothing(memories, image, what):
    old, new = memories
    _, transport, _ = snapshot_blk(memories, image)
    bad = _bad(transport.state(), HOSTILE[what])
    fresh = VirtioMmio(Block(str(image)), new, LevelLine())
    before = fresh.state()
    with pytest.raises(ValueError, match="virtio|drive"):
        fresh.load_state(bad)
    assert fresh.state() == before and not fresh.running
    transport.close()
    fresh.close()


def test_a_console_part_way_through_output_cannot_be_saved(memories):
    old, _ = memories
    room = [3]
    console = VirtioConsole(out=lambda b: room.__setitem__(0, room[0] - len(b)), room=lambda: room[0])
    transport = VirtioMmio(console, old)
    rings = start(transport, old)
    rings[1].chain([b"hello"], [])
    w(transport, mmio.QUEUE_NOTIFY, 1)
    with pytest.raises(ValueError, match="part-way"):     # "hel" went out, "lo" waits for the host
        transport.state()
    room[0] = 10
    console.host_ready()
    assert transport.state()["device"] == {}


class FakeTap:
    name = "tap-snap0"

    def set_offload(self, flags: int) -> None:
        pass

    def close(self) -> None:
        pass


def test_net_state_names_its_tap_and_mac_and_a_mismatch_is_refused():
    net = Net(FakeTap(), bytes.fromhex("020000000001"))
    try:
        assert net.state() == {"tap": "tap-snap0", "mac": "020000000001"}
        net.load_state(net.state())
        with pytest.raises(ValueError, match="MAC"):
            net.load_state({"tap": "tap-snap0", "mac": "020000000002"})
    finally:
        net.close()
