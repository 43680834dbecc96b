"""The host console: Ctrl-A escapes on a terminal, back-pressure, and holding input for Linux."""

from __future__ import annotations

import os
import termios
import time

from pykvm.console import HostConsole


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
