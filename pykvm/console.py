"""The host side of the guest's serial console: the terminal (or a pipe) wired to the UART.

Output is written unbuffered as the guest transmits. Input is read on a thread and fed to the
UART without losing bytes: the UART's FIFO is small and the guest may be slow (its CPL0 code is
emulated on some backends), so bytes the FIFO cannot take yet are kept and offered again. With
``wait_for_driver`` (set for Linux, whose 8250 driver empties the FIFO when it opens the port),
nothing is offered before the driver listens (IER "received data" interrupt enabled), so a
piped-in script is not thrown away during boot; polling guests get input at once.

When stdin is a terminal it is put in raw mode (restored on every way out) and, as in QEMU,
Ctrl-A starts an escape: Ctrl-A x quits, Ctrl-A h lists the keys, Ctrl-A Ctrl-A sends a Ctrl-A.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable

ESCAPE = 0x01   # Ctrl-A
HELP = (b"\r\nC-a h    print this help\r\n"
        b"C-a x    quit pykvm (the guest is stopped)\r\n"
        b"C-a C-a  send C-a to the guest\r\n")
POLL = 0.05     # seconds between checks of the stop flag and of FIFO room


class HostConsole:
    """Feeds ``fd`` (stdin by default) into ``uart``; ``on_quit`` is called for Ctrl-A x."""

    def __init__(self, uart, on_quit: Callable[[], None], fd: int | None = None,
                 wait_for_driver: bool = False) -> None:
        self.uart = uart
        self.wait_for_driver = wait_for_driver
        self.on_quit = on_quit
        self.fd = _stdin_fd() if fd is None else fd      # None: no input at all (stdin closed)
        self.interactive = self.fd is not None and os.isatty(self.fd)
        self._saved_tty = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending = bytearray()
        self._escape = False

    def __enter__(self) -> HostConsole:
        if self.fd is None:
            return self
        if self.interactive:
            self._saved_tty = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        self._thread = threading.Thread(target=self._pump, name="console", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._saved_tty is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved_tty)
            self._saved_tty = None

    def _pump(self) -> None:
        eof = False
        while not self._stop.is_set():
            if self._pending and (self.uart.listening or not self.wait_for_driver):
                taken = self.uart.feed(bytes(self._pending))
                del self._pending[:taken]
            if eof or len(self._pending) >= 4096:   # back-pressure: stop reading until the guest catches up
                time.sleep(POLL / 10 if self._pending else POLL)
                continue
            ready, _, _ = select.select([self.fd], [], [], POLL / 10 if self._pending else POLL)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 1024)
            except OSError:
                data = b""
            if not data:
                eof = True      # the pipe ended; what is pending still goes in
                continue
            self._accept(data)

    def _accept(self, data: bytes) -> None:
        if not self.interactive:
            self._pending += data
            return
        for byte in data:
            if self._escape:
                self._escape = False
                if byte in (ord("x"), ord("X")):
                    self.on_quit()
                    return
                if byte in (ord("h"), ord("H"), ord("?")):
                    os.write(sys.stderr.fileno(), HELP)
                    continue
                if byte != ESCAPE:
                    continue       # unknown escape: dropped, as QEMU does
            elif byte == ESCAPE:
                self._escape = True
                continue
            self._pending.append(byte)


def _stdin_fd() -> int | None:
    """stdin's descriptor, or None when the process was started without one (`<&-`)."""
    try:
        fd = sys.stdin.fileno() if sys.stdin is not None else None
        if fd is not None:
            os.fstat(fd)
        return fd
    except (OSError, ValueError, AttributeError):
        return None


def stdout_write(data: bytes) -> None:
    """Guest output to the host's stdout, unbuffered; a closed pipe is not an error of the guest's."""
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except (BrokenPipeError, ValueError):
        pass
