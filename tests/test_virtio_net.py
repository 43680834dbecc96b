"""virtio-net behind the transport, driven like a guest driver, with a datagram socket pair in
place of the TAP (one datagram = one header + frame, as a TAP opened with IFF_VNET_HDR)."""

from __future__ import annotations

import errno
import random
import select
import socket
import struct
import time

import pytest
from conftest import needs_kvm, run_pykvm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import LevelLine, Rings, r, start, w

from pykvm.devices import tap as tap_module
from pykvm.devices.virtio import NetSpec, mmio, parse_mac, parse_net
from pykvm.devices.virtio.mmio import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, VirtioMmio
from pykvm.devices.virtio.net import (
    HDR_SIZE,
    MAX_FRAME,
    RECEIVEQ,
    TRANSMITQ,
    VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
    Net,
)
from pykvm.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from pykvm.errors import UsageError
from pykvm.memory import GuestMemory

MiB = 1 << 20
MAC = bytes.fromhex("020000000001")
BASIC = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
ALL = None     # accept every feature offered


class FakeTap:
    """The device's end of a SOCK_DGRAM pair; the test holds the host's end in ``host``."""

    def __init__(self) -> None:
        self.sock, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.host.settimeout(5)
        for s in (self.sock, self.host):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.offloads: list[int] = []

    def fileno(self) -> int:
        return self.sock.fileno()

    def recv_into(self, buffer) -> int:
        return self.sock.recv_into(buffer)

    def send(self, pieces) -> int:
        return self.sock.sendmsg(pieces)

    def set_offload(self, flags: int) -> None:
        self.offloads.append(flags)

    def close(self) -> None:
        self.sock.close()
        self.host.close()

    def waiting(self) -> bool:
        return bool(select.select([self.host], [], [], 0)[0])


def hdr(flags: int = 0, gso_type: int = 0, num_buffers: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso_type, 0, 0, 0, 0, num_buffers)


def frame(n: int, seed: int = 0) -> bytes:
    """An Ethernet frame of n bytes: broadcast destination, our source, IPv4 type, then a pattern."""
    body = bytes((seed + i * 7) & 0xFF for i in range(max(0, n - 14)))
    return (b"\xff" * 6 + MAC + b"\x08\x00" + body)[:n]


@pytest.fixture
def mem():
    with GuestMemory(8 * MiB) as m:
        yield m


@pytest.fixture
def net(mem):
    """(device, transport, fake tap); rings come from up(...)."""
    tap = FakeTap()
    device = Net(tap, MAC)
    transport = VirtioMmio(device, mem, LevelLine())
    yield device, transport, tap
    device.close()


def up(transport, mem, features=BASIC, size=16) -> tuple[Rings, Rings]:
    rx, tx = start(transport, mem, features=features, size=size)
    rx.heap, tx.heap = 0x100000, 0x400000        # room for 64 KiB frames
    return rx, tx


def send_from_guest(transport, tx: Rings, pieces) -> list:
    tx.chain(pieces)
    w(transport, mmio.QUEUE_NOTIFY, TRANSMITQ)
    return tx.take_used()


# --- configuration ------------------------------------------------------------------------------

def test_identity_config_and_features(net, mem):
    device, transport, _ = net
    assert r(transport, mmio.DEVICE_ID) == 1
    assert bytes(transport.read(0x100 + i, 1) for i in range(6)) == MAC
    assert transport.read(0x106, 2) == VIRTIO_NET_S_LINK_UP
    offered = transport.offered
    for bit in (VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_MRG_RXBUF):
        assert offered & bit
    assert len(transport.queues) == 2


def test_offloads_follow_what_the_driver_accepted(net, mem):
    device, transport, tap = net
    up(transport, mem, features=BASIC)
    assert tap.offloads[-1] == 0
    up(transport, mem, features=BASIC | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4)
    assert tap.offloads[-1] == tap_module.TUN_F_CSUM | tap_module.TUN_F_TSO4
    w(transport, mmio.STATUS, 0)                     # a reset takes them back
    assert tap.offloads[-1] == 0


# --- transmit -----------------------------------------------------------------------------------

def test_transmit_reaches_the_tap_byte_for_byte(net, mem):
    device, transport, tap = net
    _, tx = up(transport, mem)
    f = frame(1000)
    used = send_from_guest(transport, tx, [hdr()[:5], hdr()[5:] + f[:100], f[100:]])   # split anywhere
    assert used == [(0, 0)]
    assert tap.host.recv(70000) == hdr() + f
    assert (device.tx_packets, device.tx_bytes) == (1, 1000)


@pytest.mark.parametrize("pieces, why", [
    ([b""], "empty"),
    ([hdr()], "a header without a frame"),
    ([hdr() + frame(13)], "shorter than an Ethernet header"),
    ([hdr(gso_type=1) + frame(100)], "TSO without HOST_TSO4"),
    ([hdr(flags=1) + frame(100)], "a partial checksum without CSUM"),
    ([hdr(gso_type=3) + frame(100)], "UDP fragmentation offload, never offered"),
])
def test_malformed_transmit_is_counted_not_sent(net, mem, pieces, why):
    device, transport, tap = net
    _, tx = up(transport, mem)
    assert send_from_guest(transport, tx, pieces) == [(0, 0)], why
    assert device.tx_malformed == 1 and not tap.waiting()
    assert not r(transport, mmio.STATUS) & mmio.DEVICE_NEEDS_RESET


def test_oversized_transmit_is_not_sent(net, mem):
    device, transport, tap = net
    _, tx = up(transport, mem, features=ALL)
    send_from_guest(transport, tx, [hdr(), frame(MAX_FRAME)])
    assert tap.host.recv(MAX_FRAME + 100) == hdr() + frame(MAX_FRAME)     # the largest one goes
    send_from_guest(transport, tx, [hdr(), frame(MAX_FRAME + 1)])
    assert device.tx_malformed == 1 and not tap.waiting()


def test_offloaded_transmit_passes_its_header_through(net, mem):
    device, transport, tap = net
    _, tx = up(transport, mem, features=ALL)
    h = struct.pack("<BBHHHHH", 1, 1, 54, 1448, 34, 16, 0)      # NEEDS_CSUM, GSO_TCPV4
    send_from_guest(transport, tx, [h, frame(3000)])
    assert tap.host.recv(70000) == h + frame(3000)


def test_transmit_loop_is_refused_and_nothing_escapes(net, mem):
    device, transport, tap = net
    _, tx = up(transport, mem)
    gpa = tx.alloc(64, hdr() + frame(52))
    tx.put_desc(0, gpa, 64, VIRTQ_DESC_F_NEXT, 1)
    tx.put_desc(1, gpa, 64, VIRTQ_DESC_F_NEXT, 0)      # 0 -> 1 -> 0 -> ...
    tx.offer(0)
    w(transport, mmio.QUEUE_NOTIFY, TRANSMITQ)
    assert r(transport, mmio.STATUS) & mmio.DEVICE_NEEDS_RESET
    assert "loop" in transport.last_error and not tap.waiting()


def test_transmit_buffer_outside_ram_is_refused(net, mem):
    device, transport, tap = net
    _, tx = up(transport, mem)
    tx.put_desc(0, 8 * MiB - 16, 64, 0)
    tx.offer(0)
    w(transport, mmio.QUEUE_NOTIFY, TRANSMITQ)
    assert r(transport, mmio.STATUS) & mmio.DEVICE_NEEDS_RESET and not tap.waiting()


# --- receive ------------------------------------------------------------------------------------

def host_sends(tap: FakeTap, data: bytes) -> None:
    tap.host.send(data)


def test_receive_into_one_chain(net, mem):
    device, transport, tap = net
    rx, _ = up(transport, mem)
    _, (a, b) = rx.chain([], [HDR_SIZE, 2000])
    f = frame(1500, seed=3)
    host_sends(tap, hdr(num_buffers=0) + f)
    transport.process_queue(RECEIVEQ)
    assert rx.take_used() == [(0, HDR_SIZE + 1500)]
    got = mem.read(a, HDR_SIZE) + mem.read(b, 1500)
    assert got == hdr(num_buffers=1) + f             # num_buffers is 1 without MRG_RXBUF
    assert mem.read(b + 1500, 500) == b"\xee" * 500
    assert r(transport, mmio.INTERRUPT_STATUS) & mmio.INT_VRING
    assert (device.rx_packets, device.rx_bytes) == (1, 1500)


def test_receive_merges_buffers(net, mem):
    device, transport, tap = net
    rx, _ = up(transport, mem, features=BASIC | VIRTIO_NET_F_MRG_RXBUF)
    gpas = [rx.chain([], [1536])[1][0] for _ in range(4)]
    f = frame(4000, seed=5)
    host_sends(tap, hdr() + f)
    transport.process_queue(RECEIVEQ)
    total = HDR_SIZE + 4000
    assert rx.take_used() == [(0, 1536), (1, 1536), (2, total - 3072)]
    got = b"".join(mem.read(g, 1536) for g in gpas[:3])[:total]
    assert got == hdr(num_buffers=3) + f
    assert mem.read(gpas[2] + total - 3072, 1) == b"\xee"
    host_sends(tap, hdr() + frame(60))                 # the fourth buffer takes the next frame
    transport.process_queue(RECEIVEQ)
    assert rx.take_used() == [(3, HDR_SIZE + 60)]


def test_frame_larger_than_the_chain_is_dropped_never_written_past(net, mem):
    device, transport, tap = net
    rx, _ = up(transport, mem)
    _, (gpa,) = rx.chain([], [200])
    host_sends(tap, hdr() + frame(1000))
    host_sends(tap, hdr() + frame(100, seed=9))
    transport.process_queue(RECEIVEQ)
    assert device.rx_dropped == 1
    assert rx.take_used() == [(0, HDR_SIZE + 100)]     # the chain went to the next frame that fits
    assert mem.read(gpa, HDR_SIZE + 100) == hdr(num_buffers=1) + frame(100, seed=9)
    assert mem.read(gpa + HDR_SIZE + 100, 200 - HDR_SIZE - 100) == b"\xee" * (200 - HDR_SIZE - 100)


def test_frame_longer_than_any_frame_may_be_is_dropped_not_cut(net, mem):
    device, transport, tap = net
    rx, _ = up(transport, mem, features=BASIC | VIRTIO_NET_F_MRG_RXBUF, size=64)
    for _ in range(64):
        rx.chain([], [2048])                            # 128 KiB of buffers: room for it
    host_sends(tap, hdr() + frame(MAX_FRAME + 1))
    host_sends(tap, hdr() + frame(60))
    transport.process_queue(RECEIVEQ)
    assert device.rx_dropped == 1
    assert rx.take_used() == [(0, HDR_SIZE + 60)]


def test_frame_larger_than_a_queue_of_buffers_is_dropped(net, mem):
    device, transport, tap = net
    rx, _ = up(transport, mem, features=BASIC | VIRTIO_NET_F_MRG_RXBUF, size=4)
    gpas = [rx.chain([], [64])[1][0] for _ in range(4)]
    host_sends(tap, hdr() + frame(300))                 # 4 x 64 bytes cannot hold 312
    host_sends(tap, hdr() + frame(100, seed=1))
    transport.process_queue(RECEIVEQ)
    assert device.rx_dropped == 1
    assert rx.take_used() == [(0, 64), (1, 48)]
    assert (mem.read(gpas[0], 64) + mem.read(gpas[1], 48)) == hdr(num_buffers=2) + frame(100, seed=1)
    assert mem.read(gpas[1] + 48, 16) == b"\xee" * 16


def test_frame_waits_for_buffers_and_is_not_lost(net, mem):
    device, transport, tap = net
    rx, _ = up(transport, mem, features=BASIC | VIRTIO_NET_F_MRG_RXBUF)
    f = frame(3000, seed=2)
    host_sends(tap, hdr() + f)
    transport.process_queue(RECEIVEQ)                   # no buffers at all
    assert device.rx_stalled and rx.take_used() == []
    _, (a,) = rx.chain([], [2000])
    w(transport, mmio.QUEUE_NOTIFY, RECEIVEQ)           # not enough yet: held, nothing returned
    assert device.rx_stalled and rx.take_used() == []
    _, (b,) = rx.chain([], [2000])
    w(transport, mmio.QUEUE_NOTIFY, RECEIVEQ)
    assert not device.rx_stalled
    assert rx.take_used() == [(0, 2000), (1, HDR_SIZE + 3000 - 2000)]
    assert (mem.read(a, 2000) + mem.read(b, 1012)) == hdr(num_buffers=2) + f


def test_receive_chain_without_room_for_a_header_is_returned_unused(net, mem):
    device, transport, tap = net
    rx, _ = up(transport, mem)
    rx.chain([b"readable only"], [])
    rx.chain([], [4])
    _, (gpa,) = rx.chain([], [200])
    host_sends(tap, hdr() + frame(60))
    transport.process_queue(RECEIVEQ)
    assert rx.take_used() == [(0, 0), (1, 0), (2, HDR_SIZE + 60)]
    assert device.rx_bad_buffers == 2


def test_receive_loop_is_refused(net, mem):
    device, transport, tap = net
    rx, _ = up(transport, mem)
    gpa = rx.alloc(64)
    rx.put_desc(0, gpa, 64, VIRTQ_DESC_F_NEXT | 2, 0)    # WRITE, NEXT -> itself
    rx.offer(0)
    host_sends(tap, hdr() + frame(60))
    transport.process_queue(RECEIVEQ)
    assert r(transport, mmio.STATUS) & mmio.DEVICE_NEEDS_RESET
    assert mem.read(gpa, 64) == bytes(64)


def test_receive_thread_delivers_and_follows_the_driver(net, mem):
    """The TAP drives receive: the thread takes a frame and raises the interrupt; a frame that
    finds no buffers is delivered once the driver offers some and notifies."""
    device, transport, tap = net
    rx, _ = up(transport, mem, features=BASIC | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_F_RING_EVENT_IDX)
    device.start()
    _, (a,) = rx.chain([], [1600])
    w(transport, mmio.QUEUE_NOTIFY, RECEIVEQ)
    host_sends(tap, hdr() + frame(500, seed=4))
    assert wait_used(rx) == [(0, HDR_SIZE + 500)]
    assert mem.read(a + HDR_SIZE, 500) == frame(500, seed=4)
    host_sends(tap, hdr() + frame(600, seed=6))          # no buffer now
    deadline = time.monotonic() + 5
    while not device.rx_stalled and time.monotonic() < deadline:
        time.sleep(0.01)
    assert device.rx_stalled
    _, (b,) = rx.chain([], [1600])
    w(transport, mmio.QUEUE_NOTIFY, RECEIVEQ)
    assert wait_used(rx) == [(1, HDR_SIZE + 600)]
    assert mem.read(b + HDR_SIZE, 600) == frame(600, seed=6)
    device.stop()
    assert device._thread is None


def wait_used(rings: Rings, timeout: float = 5.0) -> list:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        used = rings.take_used()
        if used:
            return used
        time.sleep(0.01)
    return []


def deleted_tap(tap: FakeTap) -> list:
    """Make ``tap`` behave as a TAP whose interface was deleted under the VM (``ip link del``): always
    ready to poll, every read fails with EBADFD. Returns the list that each read attempt appends to."""
    calls = []

    def recv_into(buffer) -> int:
        calls.append(1)
        raise OSError(errno.EBADFD, "File descriptor in bad state")
    tap.recv_into = recv_into
    tap.host.send(b"x" * 64)          # never read: the fd stays readable, as a deleted TAP's polls POLLERR
    return calls


def test_tap_that_fails_a_read_takes_the_link_down(net, mem):
    """A failed TAP read is counted, the link goes down in the config space and the driver gets a
    configuration-change interrupt (5.1.4); the card does not read that TAP again."""
    device, transport, tap = net
    rx, _ = up(transport, mem)
    rx.chain([], [2000])
    calls = deleted_tap(tap)
    transport.process_queue(RECEIVEQ)
    assert (device.rx_fails, len(calls)) == (1, 1)
    assert transport.read(0x106, 2) & VIRTIO_NET_S_LINK_UP == 0
    assert r(transport, mmio.INTERRUPT_STATUS) & mmio.INT_CONFIG
    assert not r(transport, mmio.STATUS) & mmio.DEVICE_NEEDS_RESET


def test_receive_thread_stops_reading_a_deleted_tap(net, mem):
    """A deleted TAP reports an error to every poll: the receive thread must not spin on it (it did,
    keeping a host CPU busy until the VM ended)."""
    device, transport, tap = net
    rx, _ = up(transport, mem)
    rx.chain([], [2000])
    calls = deleted_tap(tap)
    device.start()
    deadline = time.monotonic() + 5
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)                   # a spinning thread reads thousands of times in this while
    assert len(calls) == 1 and device.rx_fails == 1
    device.stop()
    assert device._thread is None


def test_close_with_the_transport_lock_held_does_not_hang(net, mem):
    device, transport, tap = net
    up(transport, mem)
    device.start()
    transport.close()                    # closes the device under its lock
    assert device._thread is None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, (1 << 64) - 1))
def test_random_buffers_and_frames_never_escape(seed):
    """Whatever buffers the driver offers and frames the host sends: nothing is written outside
    the writable buffers, a used length never exceeds its chain, and the device keeps running."""
    rnd = random.Random(seed)
    with GuestMemory(8 * MiB) as mem:
        tap = FakeTap()
        device = Net(tap, MAC)
        transport = VirtioMmio(device, mem, LevelLine())
        try:
            features = BASIC | (VIRTIO_NET_F_MRG_RXBUF if rnd.random() < 0.5 else 0)
            rx, tx = up(transport, mem, features=features, size=16)
            chains = {}
            for _ in range(rnd.randrange(1, 6)):          # at most 15 descriptors: no reuse
                lengths = [rnd.choice([1, 11, 12, 13, 60, 1514, 3000]) for _ in range(rnd.randrange(0, 3))]
                readable = [b"r" * 8] if rnd.random() < 0.1 or not lengths else []
                head, gpas = rx.chain(readable, lengths, indirect=False)
                chains[head] = list(zip(gpas, lengths, strict=True))
            for _ in range(rnd.randrange(1, 6)):
                host_sends(tap, hdr() + frame(rnd.choice([1, 14, 60, 1500, 2990, 9000]), seed=rnd.randrange(256)))
                send_from_guest(transport, tx, [hdr() + frame(rnd.choice([0, 13, 14, 60, 1500]))])
            transport.process_queue(RECEIVEQ)
            for head, length in rx.take_used():
                room = sum(n for _, n in chains[head])
                assert length <= room
                written, left = b"", length
                for gpa, n in chains[head]:
                    data = mem.read(gpa, n)
                    assert data[min(n, left):] == b"\xee" * (n - min(n, left))   # nothing past the used length
                    written += data[:min(n, left)]
                    left -= min(n, left)
            assert not r(transport, mmio.STATUS) & mmio.DEVICE_NEEDS_RESET
        finally:
            device.close()


# --- the command line's pieces ------------------------------------------------------------------

@pytest.mark.parametrize("text, spec", [
    ("tap=tap0", NetSpec("tap0")),
    ("tap=vm1,mac=02:00:00:00:00:07", NetSpec("vm1", bytes.fromhex("020000000007"))),
    ("mac=02-AA-bb-0c-0d-0e,tap=t", NetSpec("t", bytes.fromhex("02aabb0c0d0e"))),
])
def test_parse_net(text, spec):
    assert parse_net(text) == spec


@pytest.mark.parametrize("text", ["", "tap0", "tap=", "mac=02:00:00:00:00:01", "tap=t,mac=01:00:00:00:00:01",
                                  "tap=t,mac=02:00:00:00:00", "tap=t,mac=zz:00:00:00:00:01", "tap=t,speed=10",
                                  "tap=t,mac= 2:00:00:00:00:01", "tap=t,mac=+2:00:00:00:00:01",
                                  "tap=t,mac=\u0660\u0662:00:00:00:00:01", "tap=t,mac=00:00:00:00:00:00"])
def test_parse_net_refuses(text):
    with pytest.raises(UsageError):
        parse_net(text)


def test_parse_mac_refuses_the_all_zero_address():
    """Linux's virtio_net takes the MAC from the config space as it is, and then cannot bring the card up
    (is_valid_ether_addr: not multicast, not all zeros): refused before the VM starts."""
    with pytest.raises(UsageError, match="all zeros"):
        parse_mac("00:00:00:00:00:00")


def test_parse_mac_refuses_multicast():
    with pytest.raises(UsageError, match="multicast"):
        parse_mac("03:00:00:00:00:01")


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", "a b", "eth0:1"])
def test_tap_name_is_checked(name):
    with pytest.raises(tap_module.TapError):
        tap_module.check_name(name)


def test_tap_that_does_not_exist_is_one_clear_error():
    with pytest.raises(tap_module.TapError, match="no network interface pykvmnone0.*ip tuntap add") as e:
        tap_module.Tap.open("pykvmnone0")
    assert e.value.exit_status == 2


def test_ioctl_numbers_match_linux():
    # <linux/if_tun.h>: TUNSETIFF _IOW('T', 202, int), TUNSETOFFLOAD _IOW('T', 208, unsigned int),
    # TUNSETVNETHDRSZ _IOW('T', 216, int)
    assert (tap_module.TUNSETIFF, tap_module.TUNSETOFFLOAD, tap_module.TUNSETVNETHDRSZ) == \
        (0x400454CA, 0x400454D0, 0x400454D8)


def test_cards_come_after_the_other_devices_and_are_announced_to_linux():
    from pykvm.devices.virtio import DriveSpec, fw_cfg_table, layout, linux_cmdline
    args = linux_cmdline([DriveSpec("disk.img")], rng=True, nets=[NetSpec("tap0"), NetSpec("tap1")])
    assert args == ["virtio_mmio.device=0x200@0xd0001000:5", "virtio_mmio.device=0x200@0xd0001200:6",
                    "virtio_mmio.device=0x200@0xd0001400:7", "virtio_mmio.device=0x200@0xd0001600:9"]
    table = fw_cfg_table(layout([2, 4, 1, 1]))
    assert [struct.unpack_from("<QIHH", table, 16 * i)[3] for i in range(4)] == [2, 4, 1, 1]


@needs_kvm
@pytest.mark.parametrize("value, message", [("tap0", "unknown or empty option 'tap0'"),
                                            ("mac=02:00:00:00:00:01", "no TAP named"),
                                            ("tap=t,mac=1:2", "not a MAC address"),
                                            ("bridge", "for `pykvm run -d`")])
def test_malformed_net_option_is_one_clear_error(value, message):
    r = run_pykvm("run", "hello-long64", "--net", value, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 2 and message in err and "Traceback" not in err, err
