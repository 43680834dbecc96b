"""Pause quiesces the devices (pykvm.devices.quiesce), without /dev/kvm: once pause() returns, a notification, a
TAP frame, console input, room for output or an RTC tick does not touch guest memory or an interrupt line; after
resume() it is processed, exactly once."""

from __future__ import annotations

import fcntl
import os
import select
import struct
import termios
import time

import pytest
from test_virtio_net import BASIC, MAC, FakeTap, frame, hdr
from virtio_driver import LevelLine, RecordingMemory, Rings, r, start

from pykvm.console import HostConsole
from pykvm.devices.cmos import B_PIE, REG_B, REG_C, Cmos
from pykvm.devices.quiesce import ParkPoint
from pykvm.devices.uart import Lsr, Reg, Uart16550
from pykvm.devices.virtio import FastPath, NotifyThread, VirtioSet
from pykvm.devices.virtio import mmio as m
from pykvm.devices.virtio.blk import Block
from pykvm.devices.virtio.console import VirtioConsole
from pykvm.devices.virtio.net import HDR_SIZE, Net

MiB = 1 << 20
QUIET = 0.3      # seconds a paused device is given to (wrongly) do something


def wait_for(predicate, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


@pytest.fixture
def blk_set(tmp_path):
    """A virtio-blk transport whose notifications arrive through a NotifyThread's eventfds, as with
    KVM_IOEVENTFD; the VirtioSet that pauses them. Yields (set, thread, transport, device, memory, line, rings)."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"".join(bytes([i]) * 512 for i in range(8)))
    memory = RecordingMemory(4 * MiB)
    device = Block(str(image))
    line = LevelLine()
    transport = m.VirtioMmio(device, memory, line)
    thread = NotifyThread(transport, "test-notify")
    transport.notify = thread.kick
    vset = VirtioSet([], [transport], FastPath(True, False), [], None, [device], [thread])
    (rings,) = start(transport, memory)
    thread.start()
    yield vset, thread, transport, device, memory, line, rings
    vset.close()
    memory.close()


def offer_read(rings: Rings, sector: int) -> tuple[int, int]:
    """A read request of one sector; returns the gpas of the data buffer and of the status byte."""
    _, (data, status) = rings.chain([struct.pack("<IIQ", 0, 0, sector)], [512, 1])
    return data, status


def test_a_notification_while_paused_waits_in_its_eventfd_and_is_processed_once_on_resume(blk_set):
    vset, thread, transport, device, memory, line, rings = blk_set
    data, status = offer_read(rings, 3)
    assert vset.pause(timeout=5)
    memory.log.clear()
    os.eventfd_write(thread.fds[0], 1)           # what KVM does on the guest's QueueNotify write
    time.sleep(QUIET)
    assert memory.log == [] and line.changes == [] and device.requests == 0
    assert readable(thread.fds[0])               # the notification is still there
    vset.resume()
    assert wait_for(lambda: rings.used_idx() == 1)
    time.sleep(0.05)
    assert rings.take_used() == [(0, 513)] and device.requests == 1
    assert memory.read(data, 512) == bytes([3]) * 512 and memory.read(status, 1) == b"\0"
    assert line.changes == [True] and r(transport, m.INTERRUPT_STATUS) == m.INT_VRING


def test_a_pause_waits_for_processing_in_progress_and_defers_what_others_ask(blk_set):
    """Work that reaches the transport from other threads while paused (an MMIO-exit notification, host input,
    room for output) is not done then, and is done once after resume; the interrupt is raised then too."""
    vset, thread, transport, device, memory, line, rings = blk_set
    assert vset.pause(timeout=5)
    data, _ = offer_read(rings, 5)
    memory.log.clear()
    transport.process_queue(0)                   # e.g. a console feed's or host_ready's way in
    transport.raise_interrupt(m.INT_CONFIG)      # e.g. a configuration change
    assert memory.log == [] and line.changes == []
    vset.resume()
    assert wait_for(lambda: rings.used_idx() == 1)
    time.sleep(0.05)
    assert device.requests == 1 and memory.read(data, 512) == bytes([5]) * 512
    assert line.changes == [True]


def test_pause_of_a_notification_thread_returns_when_it_is_parked(blk_set):
    vset, thread, transport, device, memory, line, rings = blk_set
    for i in range(200):                          # many quick cycles: never a lost or repeated request
        assert thread.pause(timeout=5)
        offer_read(rings, 1)
        os.eventfd_write(thread.fds[0], 1)
        thread.resume()
        assert wait_for(lambda: rings.used_idx() == i + 1)   # noqa: B023 (used at once)
    time.sleep(0.05)
    assert device.requests == 200 and len(rings.take_used()) == 200


def test_a_frame_arriving_while_paused_stays_in_the_tap_and_is_delivered_once_after_resume():
    memory = RecordingMemory(8 * MiB)
    tap = FakeTap()
    device = Net(tap, MAC)
    line = LevelLine()
    transport = m.VirtioMmio(device, memory, line)
    vset = VirtioSet([], [transport], FastPath(False, False), [], None, [device])
    try:
        rx, _ = start(transport, memory, features=BASIC)
        rx.heap = 0x100000
        _, (a, b) = rx.chain([], [HDR_SIZE, 2000])
        device.start()
        assert vset.pause(timeout=5)
        memory.log.clear()
        tries = []                               # the receive thread's attempts at the queue
        process_queue = transport.process_queue
        transport.process_queue = lambda index: (tries.append(index), process_queue(index))
        f = frame(700, seed=9)
        tap.host.send(hdr() + f)
        time.sleep(QUIET)
        # parked: it does not even try (it would spin on the readable TAP)
        assert tries == [] and memory.log == [] and line.changes == [] and device.rx_packets == 0
        assert readable(tap.sock.fileno())       # the frame waits in the TAP
        vset.resume()
        assert wait_for(lambda: rx.used_idx() == 1)
        time.sleep(0.05)
        assert rx.take_used() == [(0, HDR_SIZE + 700)] and device.rx_packets == 1
        assert memory.read(b, 700) == f and not readable(tap.sock.fileno())
        assert line.changes == [True]
    finally:
        vset.close()
        memory.close()


def _pipe_bytes(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def test_console_input_while_paused_stays_in_the_pipe_and_arrives_once_after_resume():
    line = LevelLine()
    uart = Uart16550(irq=line)
    uart.write(Reg.MCR, 1, 0x08)                 # OUT2: the interrupt reaches the line
    uart.write(Reg.IER, 1, 0x01)                 # received-data interrupt
    uart.write(Reg.IIR_FCR, 1, 0x01)             # FIFO on: room for all five bytes
    rfd, wfd = os.pipe()
    try:
        with HostConsole(uart, on_quit=lambda: None, fd=rfd):
            assert uart.pause(timeout=5)
            changes = len(line.changes)
            os.write(wfd, b"hello")
            time.sleep(QUIET)
            assert _pipe_bytes(rfd) == 5         # not read: still in the pipe
            assert not uart.read(Reg.LSR, 1) & Lsr.DR and len(line.changes) == changes
            assert uart.feed(b"x") == 0          # nothing is taken while paused
            uart.resume()
            assert wait_for(lambda: uart.rx_space() == 16 - 5)
            got = bytearray()
            while uart.read(Reg.LSR, 1) & Lsr.DR:
                got.append(uart.read(Reg.RBR_THR, 1))
            assert bytes(got) == b"hello" and line.level is False
    finally:
        os.close(rfd)
        os.close(wfd)


def test_room_for_output_while_paused_raises_the_thr_interrupt_only_after_resume():
    line = LevelLine()
    room = [0]
    uart = Uart16550(irq=line, out=lambda data: None, out_room=lambda: room[0])
    uart.write(Reg.MCR, 1, 0x08)
    uart.write(Reg.IER, 1, 0x02)                 # THR-empty interrupt
    uart.read(Reg.IIR_FCR, 1)                        # the driver takes the one IER just armed
    uart.write(Reg.RBR_THR, 1, ord("a"))             # no room: the transmitter stays busy
    assert line.level is False
    assert uart.pause()
    room[0] = 100
    uart.host_ready()
    assert line.level is False
    uart.resume()
    assert line.level is True


def test_virtio_console_feed_while_paused_takes_nothing():
    memory = RecordingMemory(4 * MiB)
    console = VirtioConsole(lambda data: None)
    transport = m.VirtioMmio(console, memory, LevelLine())
    vset = VirtioSet([], [transport], FastPath(False, False), [], console, [console])
    try:
        rx, _ = start(transport, memory)
        _, (buf,) = rx.chain([], [64])
        assert vset.pause()
        memory.log.clear()
        assert console.feed(b"abc") == 0 and memory.log == []
        vset.resume()
        assert console.feed(b"abc") == 3 and memory.read(buf, 3) == b"abc"
    finally:
        vset.close()
        memory.close()


def test_the_rtc_timer_raises_no_interrupt_while_paused():
    line = LevelLine()
    cmos = Cmos(ram_below_4g=64 * MiB, irq=line)
    try:
        cmos.write(0, 1, REG_B)
        cmos.write(1, 1, B_PIE)                   # periodic interrupt at 1024 Hz (register A's default)
        assert wait_for(lambda: line.level)
        assert cmos.pause(timeout=5)
        cmos.write(0, 1, REG_C)
        cmos.read(1, 1)                           # the guest's last read before the pause lowers IRQ 8
        assert line.level is False
        changes = len(line.changes)
        time.sleep(QUIET)                         # ~300 ticks would have raised it again
        assert len(line.changes) == changes
        cmos.resume()
        assert wait_for(lambda: line.level)
    finally:
        cmos.close()


def test_park_point_pause_does_not_wait_for_a_thread_that_is_not_running_and_stop_releases_it():
    import threading
    point = ParkPoint(lambda: None)
    assert point.pause(timeout=0.1)               # no thread: parked by definition
    point.resume()
    woke = threading.Event()
    ran = threading.Event()

    def worker():
        with point.running():
            ran.set()
            while not woke.is_set():
                point.park()
                time.sleep(0.001)

    thread = threading.Thread(target=worker)
    thread.start()
    assert ran.wait(5)
    assert point.pause(timeout=5)                 # the worker parks at its next park()
    woke.set()
    point.stop()                                  # a parked worker is released for good
    thread.join(5)
    assert not thread.is_alive()

