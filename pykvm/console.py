"""The host side of the guest's serial console: the terminal (or a pipe) wired to the UART.

Output is written unbuffered as the guest transmits. Input is read on a thread and fed to the
UART without losing bytes: the UART's FIFO is small and the guest may be slow (its CPL0 code is
emulated on some backends), so bytes the FIFO cannot take yet are kept and offered again. With
``wait_for_driver`` (set for Linux, whose 8250 driver empties the FIFO when it opens the port),
nothing is offered before the driver listens (IER "received data" interrupt enabled), so a
piped-in script is not thrown away during boot; polling guests get input at once.

When stdin is a terminal it is put in raw mode (restored on every way out) and, as in QEMU,
Ctrl-A starts an escape: Ctrl-A x quits, Ctrl-A h lists the keys, Ctrl-A Ctrl-A sends a Ctrl-A.

Output goes through :class:`HostOutput`: the guest's device appends to a bounded buffer and a
writer thread does the (possibly blocking) writes, so a slow or stuck reader of stdout never
blocks a vCPU thread. The devices ask :meth:`HostOutput.room` and hold the guest back when it is
0, as hardware does with a busy line (the UART keeps THRE clear, the virtio console leaves its
transmit buffers in the ring); the writer tells them when room comes back. A write error
(ENOSPC, EIO, EPIPE, ...) is reported once through ``on_error``, which ends the run.
"""

from __future__ import annotations

import os
import select
import stat
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable

from .devices.quiesce import PARK_TIMEOUT, ParkPoint

ESCAPE = 0x01   # Ctrl-A
HIGH_WATER = 64 * 1024   # bytes of guest output buffered before the devices hold the guest back
LIMIT = 1 << 20          # most ever buffered: past it, output of a guest that ignores THRE is dropped
GRACE = 1.0              # seconds without progress after which the end of a run stops waiting for stdout
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
        self._wake: tuple[int, int] | None = None    # a pipe whose byte ends the pump's wait at once
        self._park = ParkPoint(self._poke)

    def __enter__(self) -> HostConsole:
        if self.fd is None:
            return self
        self._wake = os.pipe()
        if self.interactive:
            self._saved_tty = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        self._thread = threading.Thread(target=self._pump, name="console", daemon=True)
        self._thread.start()
        feeders = getattr(self.uart, "feeders", None)
        if feeders is not None:
            feeders.add(self)       # paused with the device it feeds (pykvm.devices.quiesce)
        return self

    def pause(self, timeout: float | None = PARK_TIMEOUT) -> bool:
        """Quiesce (:mod:`pykvm.devices.quiesce`): the input thread parks; input stays in its pipe (and what
        was read already, in this console) until :meth:`resume`. True once it has parked (or does not run)."""
        return self._park.pause(timeout)

    def resume(self) -> None:
        """The input thread feeds the device again, what waited first."""
        self._park.resume()

    def _poke(self) -> None:
        if self._wake is not None:
            try:
                os.write(self._wake[1], b"\0")
            except OSError:
                pass

    def __exit__(self, *exc) -> None:
        feeders = getattr(self.uart, "feeders", None)
        if feeders is not None:
            feeders.remove(self)
        self._stop.set()
        self._park.stop()
        if self._wake is not None:
            os.write(self._wake[1], b"\0")     # the pump is in select: end it now, not after POLL
        if self._thread is not None:
            self._thread.join()
        if self._wake is not None:
            for end in self._wake:
                os.close(end)
            self._wake = None
        if self._saved_tty is not None:
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved_tty)
            except termios.error:
                pass        # the terminal hung up (SIGHUP): there is nothing left to restore
            self._saved_tty = None

    def _pump(self) -> None:
        with self._park.running():
            self._pump_loop()

    def _pump_loop(self) -> None:
        eof = False
        wake = self._wake[0]
        park = self._park
        while not self._stop.is_set():
            park.park()
            if park.requested:
                continue
            if self._pending and (self.uart.listening or not self.wait_for_driver):
                taken = self.uart.feed(bytes(self._pending))
                del self._pending[:taken]
            wait = POLL / 10 if self._pending else POLL
            if eof or len(self._pending) >= 4096:   # back-pressure: stop reading until the guest catches up
                if select.select([wake], [], [], wait)[0]:
                    _drain_pipe(wake)
                continue
            ready, _, _ = select.select([self.fd, wake], [], [], wait)
            if wake in ready:
                _drain_pipe(wake)
            if self.fd not in ready or park.requested:
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


def _drain_pipe(fd: int) -> None:
    """Take the wake-up bytes select said are there (never blocks: at least one is)."""
    try:
        os.read(fd, 64)
    except OSError:
        pass


def _stdin_fd() -> int | None:
    """stdin's descriptor, or None when the process was started without one (`<&-`)."""
    try:
        fd = sys.stdin.fileno() if sys.stdin is not None else None
        if fd is not None:
            os.fstat(fd)
        return fd
    except (OSError, ValueError, AttributeError):
        return None


class HostOutput:
    """Guest output to the host file descriptor ``fd`` (stdout) through a writer thread.

    :meth:`write` never blocks: bytes are appended to a buffer the thread writes out. :meth:`room`
    is how many more bytes may come before the devices should hold the guest back (0 from
    :data:`HIGH_WATER` buffered on); listeners added with :meth:`add_listener` are called (on the
    writer thread) when room comes back after someone saw none. Bytes beyond :data:`LIMIT` (a
    guest that ignores back-pressure) and bytes left when :meth:`close` gives up are counted in
    :attr:`dropped`. The first write error calls ``on_error(sentence)`` once; from then on output
    is dropped and counted, and :meth:`room` never holds the guest back.
    """

    def __init__(self, fd: int, on_error: Callable[[str], None] | None = None, *,
                 high_water: int = HIGH_WATER, limit: int = LIMIT) -> None:
        self.fd = fd
        self.on_error = on_error
        self.high_water = high_water
        self.limit = limit
        self.dropped = 0
        self.written = 0
        self.error: str | None = None
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._closing = False
        self._starved = False        # someone saw no room: tell the listeners when it comes back
        self._listeners: list[Callable[[], None]] = []
        self._listener_lock = threading.Lock()
        try:
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except OSError:
            regular = False
        # A pipe takes PIPE_BUF bytes atomically once poll says it is writable; files take more.
        self._chunk = 1 << 16 if regular else select.PIPE_BUF
        self._thread = threading.Thread(target=self._run, name="output", daemon=True)

    def __enter__(self) -> HostOutput:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the writer thread, no buffer lock held) when room comes back."""
        with self._listener_lock:
            self._listeners.append(callback)

    def remove_listeners(self) -> None:
        """Forget every listener; returns once none is running (before their devices close)."""
        with self._listener_lock:
            self._listeners = []

    def room(self) -> int:
        """Bytes that may still be written before the guest should wait (0: hold it back)."""
        if self.error is not None:
            return self.high_water
        room = self.high_water - len(self._buf)
        if room > 1:
            return room
        # Decide "no room" under the writer's lock: otherwise the writer could drain the buffer
        # and see nobody starved between our look and our flag, and never tell the device.
        with self._cond:
            room = self.high_water - len(self._buf)
            if room <= 1:
                self._starved = True
            return max(room, 0)

    def write(self, data: bytes) -> None:
        """Queue ``data`` for the writer thread; never blocks. Past :data:`LIMIT` buffered, or
        after a write error, the bytes are dropped and counted."""
        with self._cond:
            if self.error is not None or self._closing or len(self._buf) + len(data) > self.limit:
                self.dropped += len(data)
                return
            self._buf += data
            self._cond.notify()

    def pending(self) -> int:
        """Bytes buffered and not yet written."""
        return len(self._buf)

    def close(self, grace: float = GRACE) -> None:
        """Write out what is buffered, waiting while the reader makes progress; after ``grace``
        seconds without progress (a stuck reader) give up and count the rest in :attr:`dropped`.
        The writer thread may then stay blocked in its last write until the process exits."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if not self._thread.is_alive():
            return
        last, since = self.written, time.monotonic()
        while self._thread.is_alive():
            self._thread.join(min(0.05, grace))
            if self.written != last:
                last, since = self.written, time.monotonic()
            elif time.monotonic() - since >= grace:
                break
        with self._cond:
            if self._buf:
                self.dropped += len(self._buf)
                self._buf.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._buf and not self._closing:
                    self._cond.wait()
                if not self._buf:
                    return
                chunk = bytes(self._buf[:self._chunk])
            try:
                n = os.write(self.fd, chunk)
            except BlockingIOError:      # a non-blocking stdout we inherited: wait until writable
                select.select([], [self.fd], [], POLL)
                continue
            except OSError as e:
                self._fail(e)
                return
            with self._cond:
                del self._buf[:n]
                self.written += n
                tell = self._starved and self.high_water - len(self._buf) > 1
                if tell:
                    self._starved = False
            if tell:
                self._tell()

    def _fail(self, e: OSError) -> None:
        with self._cond:
            self.error = f"cannot write the guest's output to stdout: {e.strerror or e}"
            self.dropped += len(self._buf)
            self._buf.clear()
        self._tell()               # nobody waits for an output that is gone
        if self.on_error is not None:
            self.on_error(self.error)

    def _tell(self) -> None:
        with self._listener_lock:
            for callback in self._listeners:
                callback()


class _StdoutDrops:
    """What :func:`stdout_write` could not write: bytes dropped, and the first error's sentence."""

    dropped = 0
    error: str | None = None


stdout_drops = _StdoutDrops()


def stdout_write(data: bytes) -> None:
    """Guest output to the host's stdout, unbuffered, on the calling thread (Machine's default when
    used as a library; ``pykvm run`` uses :class:`HostOutput`). Output that cannot be written (a
    closed pipe, ENOSPC, EIO, a closed or missing sys.stdout) is not an error of the guest's: it is
    dropped and counted in ``stdout_drops.dropped``, the first error's sentence kept in
    ``stdout_drops.error``."""
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except (OSError, ValueError, AttributeError) as e:
        if stdout_drops.error is None:
            stdout_drops.error = f"cannot write the guest's output to stdout: {getattr(e, 'strerror', None) or e}"
        stdout_drops.dropped += len(data)
