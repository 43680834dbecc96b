"""The host console: Ctrl-A escapes on a terminal, back-pressure, and holding input for Linux; and
the host output: never blocking the guest, back-pressure through the UART, write errors."""

from __future__ import annotations

import fcntl
import os
import select
import termios
import threading
import time

from pykvm.console import HostConsole, HostOutput
from pykvm.devices.uart import Lsr, Reg, Uart16550


class SlowUart:
    """Takes at most ``room`` bytes per feed, like a FIFO the guest drains slowly."""

    def __init__(self, room: int = 3, listening: bool = True) -> None:
        self.got = bytearray()
        self.room = room
        self.listening = listening

    def feed(self, data: bytes) -> int:
        n = min(self.room, len(data))
        self.got += data[:n]
        return n


def wait_for(predicate, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_piped_input_arrives_whole_through_a_small_fifo():
    r, w = os.pipe()
    uart = SlowUart(room=3)
    data = bytes(range(256)) * 8           # Ctrl-A included: a pipe has no escapes
    with HostConsole(uart, on_quit=lambda: None, fd=r):
        os.write(w, data)
        os.close(w)
        assert wait_for(lambda: len(uart.got) == len(data))
    os.close(r)
    assert bytes(uart.got) == data


def test_input_is_held_until_the_driver_listens():
    r, w = os.pipe()
    uart = SlowUart(room=16, listening=False)
    with HostConsole(uart, on_quit=lambda: None, fd=r, wait_for_driver=True):
        os.write(w, b"echo hi\n")
        time.sleep(0.3)
        assert uart.got == b""               # Linux would empty its FIFO when it opens the port
        uart.listening = True
        assert wait_for(lambda: uart.got == b"echo hi\n")
    os.close(r)
    os.close(w)


def test_terminal_escapes_quit_help_and_literal_ctrl_a(capfd):
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    uart = SlowUart(room=64)
    quits = []
    with HostConsole(uart, on_quit=lambda: quits.append(1), fd=slave) as console:
        assert console.interactive
        assert termios.tcgetattr(slave) != before    # raw mode while the guest runs
        os.write(master, b"ab\x01\x01c\x01h")
        assert wait_for(lambda: uart.got == b"ab\x01c")
        os.write(master, b"\x01x")
        assert wait_for(lambda: quits == [1])
    assert termios.tcgetattr(slave) == before        # and the terminal restored afterwards
    assert "C-a x" in capfd.readouterr().err
    os.close(master)
    os.close(slave)


# ---- output: HostOutput between the guest's devices and stdout ------------------------------

def test_a_write_error_is_reported_once_and_never_holds_the_guest_back():
    errors = []
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with HostOutput(fd, on_error=errors.append) as output:
            output.write(b"hello")
            assert wait_for(lambda: errors)
            output.write(b"more")
            assert output.room() > 0                  # nobody waits for an output that is gone
    finally:
        os.close(fd)
    assert errors == ["cannot write the guest's output to stdout: No space left on device"]
    assert output.dropped == len(b"hellomore")


def test_a_stuck_reader_never_blocks_the_writer_and_close_gives_up():
    r, w = os.pipe()                                  # nobody ever reads r
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)          # so it cannot absorb all the buffer holds
    output = HostOutput(w, high_water=4096, limit=1 << 16)
    sent = 0
    with output:
        done = threading.Event()

        def guest():                                  # writes far more than the pipe holds
            nonlocal sent
            for _ in range(256):
                output.write(b"x" * 1024)
                sent += 1024
            done.set()

        thread = threading.Thread(target=guest)
        thread.start()
        assert done.wait(30), "write() blocked behind a stuck reader"
        thread.join()
        assert output.room() == 0, (output.error, output.written, output.dropped, output.pending(), sent)
        output.close(grace=0.2)                       # returns although the writer is stuck
    assert output.dropped > 0
    assert output.written + output.dropped == sent    # every byte accounted for
    os.close(r)
    os.close(w)


def test_room_coming_back_is_told_to_the_listeners():
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    os.write(w, b"." * 4096)                          # the pipe is full: the writer will block
    told = threading.Event()
    with HostOutput(w, high_water=8) as output:
        output.add_listener(told.set)
        output.write(b"0123456789")                   # more than the high-water mark
        assert output.room() == 0                     # a device asks, and is held back
        assert not told.wait(0.2)
        assert os.read(r, 8192) == b"." * 4096        # the reader catches up
        assert told.wait(30)
        assert wait_for(lambda: output.pending() == 0)
        assert os.read(r, 100) == b"0123456789"
    os.close(r)
    os.close(w)


def test_a_device_told_no_room_is_always_told_when_it_comes_back():
    """The lost wake-up: the device reads "full", the writer drains everything and sees nobody waiting,
    only then does the device mark itself waiting. It must be told (or not be held back at all)."""
    r, w = os.pipe()
    told = threading.Event()
    main = threading.current_thread()
    output = HostOutput(w, high_water=8)
    checks, armed = [], threading.Event()

    class SlowLook(bytearray):                        # the device's first look at the buffer is slow
        def __len__(self):
            n = super().__len__()
            if threading.current_thread() is main and armed.is_set() and not checks:
                checks.append(n)
                wait_for(lambda: output.written == 10)    # the writer drains meanwhile
            return n

    output._buf = SlowLook()
    with output:
        output.add_listener(told.set)
        output.write(b"0123456789")
        armed.set()
        if output.room() == 0:                        # held back: then it must hear that room came back
            assert told.wait(5), "room came back and nobody told the device: the guest waits forever"
        assert checks == [10]
        assert os.read(r, 100) == b"0123456789"
    os.close(r)
    os.close(w)


class PollingDriver:
    """A guest's polling UART driver: wait for LSR.THRE, write THR; bytes count up mod 256."""

    def __init__(self, uart: Uart16550, count: int) -> None:
        self.uart, self.count = uart, count

    def run(self) -> None:
        for i in range(self.count):
            for _ in range(10_000_000):
                if self.uart.read(Reg.LSR, 1) & Lsr.THRE:
                    break
                time.sleep(0.0005)
            self.uart.write(Reg.RBR_THR, 1, i & 0xFF)


def test_a_slow_reader_back_pressures_a_polling_driver_and_loses_nothing():
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    total = 64 * 1024
    output = HostOutput(w, high_water=2048, limit=4096)    # a driver ignoring THRE would lose most
    uart = Uart16550(out=output.write)
    uart.set_output(output.write, output.room)
    output.add_listener(uart.host_ready)
    got = bytearray()
    with output:
        driver = threading.Thread(target=PollingDriver(uart, total).run)
        driver.start()
        while len(got) < total:                       # a slow reader: small reads with pauses
            if not select.select([r], [], [], 5)[0]:
                break                                 # nothing more is coming: bytes were lost
            got += os.read(r, 512)
            time.sleep(0.001)
        driver.join()
    assert output.dropped == 0
    assert got == bytes(i & 0xFF for i in range(total))
    os.close(r)
    os.close(w)


def test_a_driver_that_ignores_thre_loses_bytes_only_past_the_limit():
    r, w = os.pipe()                                  # stuck reader
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    with HostOutput(w, high_water=2048, limit=8192) as output:
        uart = Uart16550()
        uart.set_output(output.write, output.room)
        for i in range(64 * 1024):
            uart.write(Reg.RBR_THR, 1, i & 0xFF)
        assert not uart.read(Reg.LSR, 1) & Lsr.THRE   # it could have known
        output.close(grace=0.1)
    assert output.written <= 4096 + 8192
    assert output.written + output.dropped == 64 * 1024
    os.close(r)
    os.close(w)


def test_stdout_write_to_a_full_disk_drops_and_counts(tmp_path):
    """Machine's default output (a library user's stdout) on ENOSPC: no exception, the bytes counted."""
    import subprocess
    import sys
    code = ("import sys\nfrom pykvm.console import stdout_write, stdout_drops\n"
            "stdout_write(b'x' * 100000)\nstdout_write(b'y' * 10)\n"
            "print(stdout_drops.dropped, stdout_drops.error, file=sys.stderr, flush=True)\n")
    with open("/dev/full", "wb") as full:
        r = subprocess.run([sys.executable, "-c", code], stdout=full, stderr=subprocess.PIPE, timeout=60)
    err = r.stderr.decode()
    first = err.splitlines()[0]
    assert "Traceback" not in first, err
    assert first.split()[0] == "100010" and "No space left on device" in first, err


def test_leaving_the_console_does_not_wait_out_its_poll(monkeypatch):
    """The input thread is woken when the run ends, whether it waits on an open pipe, at EOF, or
    with input the guest has not taken: with a poll interval of an hour, leaving still returns."""
    import pykvm.console as console
    monkeypatch.setattr(console, "POLL", 3600.0)
    for state in ("open", "eof", "full"):
        r, w = os.pipe()
        uart = SlowUart(room=0)
        if state != "open":
            os.write(w, b"x" * (5000 if state == "full" else 10))
        if state == "eof":
            os.close(w)
        host = HostConsole(uart, on_quit=lambda: None, fd=r)
        host.__enter__()
        time.sleep(0.1)                     # the pump is in its wait
        left = threading.Thread(target=host.__exit__, args=(None, None, None), daemon=True)
        left.start()
        left.join(30)                       # a hang detector: before the fix this waited an hour
        assert not left.is_alive(), state
        os.close(r)
        if state != "eof":
            os.close(w)
