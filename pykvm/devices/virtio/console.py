"""virtio-console (virtio 1.x, section 5.3): one port, the guest's ``hvc0``.

Two queues: receiveq 0 (host -> guest: the driver offers device-writable buffers, the device
fills them with input) and transmitq 0 (guest -> host: device-readable buffers of output). No
feature is offered, so there is no MULTIPORT control queue, no SIZE and no EMERG_WRITE; the
configuration space (``cols``, ``rows``, ``max_nr_ports``, ``emerg_wr``) reads as zeros.

Output goes to ``out`` (a callable taking bytes: the terminal, a file, a test's list), in
pieces of at most :data:`PIECE` bytes however long the guest's chain is (its buffers may even
overlap: host memory stays bounded by a constant, not by what the chain adds up to). With
``room`` (how many bytes the host can take now) the device stops using transmit buffers while
it is 0: the chain in progress is kept, the rest stay in the ring, and :meth:`VirtioConsole.host_ready`
carries on where it stopped, so a slow reader slows the guest down and nothing is lost. Input is
pushed by the host with :meth:`VirtioConsole.feed`, which has the same contract as the UART's: it takes
only as many bytes as the guest has buffers for and returns that count, so the caller keeps the
rest and nothing is lost. :class:`pykvm.console.HostConsole` drives either device.

:attr:`listening` (a console that waits for the guest's driver asks it before feeding) is True
once the driver runs, the receive queue is ready, and the guest wrote to the console at least
:data:`LISTEN_DELAY` seconds ago. The last condition is for Linux: its virtio_console offers
receive buffers as soon as the port exists, but throws away input that arrives before the port
is hooked up to its hvc console (``in_intr``: ``guest_connected`` is still false).
``init_port_console`` sets ``guest_connected`` right after it adds the port to the list the hvc
output path looks ports up in, so nothing can be printed through the port before that point: the
first output means the port is connected, unless an interrupt ran between the two stores; the
delay is the margin for that. Input is never lost after it: hvc leaves data in the port until a
tty is open. Input that arrives later waits in the driver
until a program opens hvc0. A guest that never writes can still be fed by a console that does
not wait for the driver (bare-metal guests).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..quiesce import PARK_TIMEOUT, FeederSet
from .mmio import ID_CONSOLE, VirtioDevice
from .queue import Chain, SplitQueue

RECEIVEQ = 0
TRANSMITQ = 1
QUEUE_SIZE = 64
CONFIG_SIZE = 12         # le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr
LISTEN_DELAY = 0.2       # seconds after the guest's first output before a waiting console feeds it
PIECE = 4096             # most bytes of a transmit chain read from guest memory at once


def _unlimited() -> int:
    return 1 << 30


class VirtioConsole(VirtioDevice):
    """A virtio console with one port: ``out`` gets its output, :meth:`feed` gives it input."""

    device_id = ID_CONSOLE
    name = "virtio-console"
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, out: Callable[[bytes], None], room: Callable[[], int] | None = None) -> None:
        self.set_output(out, room)
        self._input = b""
        self._taken = 0
        self.feeders = FeederSet()     # the host console's input thread (pykvm.devices.quiesce)
        self.transmitted = 0
        self._first_output: float | None = None
        # The transmit chain in progress when the host ran out of room: (queue, chain, buffer
        # index, offset in that buffer).
        self._tx: tuple[SplitQueue, Chain, int, int] | None = None

    def set_output(self, out: Callable[[bytes], None], room: Callable[[], int] | None = None) -> None:
        """Send the guest's output to ``out``; ``room()`` is how many bytes the host takes now."""
        self.out = out
        self.room = room if room is not None else _unlimited

    def config(self) -> bytes:
        """The 12-byte virtio_console_config, all zeros (no feature offered)."""
        return bytes(CONFIG_SIZE)

    @property
    def listening(self) -> bool:
        """Whether a console that waits for the driver may feed input now (module docstring)."""
        t, first = self.transport, self._first_output
        return (t.running and t.queues[RECEIVEQ].queue is not None and first is not None
                and time.monotonic() - first >= LISTEN_DELAY)

    def reset(self) -> None:
        """The driver reset the device: forget its output state (the chain in progress too)."""
        self._first_output = None
        self._tx = None

    def state(self) -> dict:
        """No state of its own beyond the transport's ({}). ValueError while a transmit chain is half sent (the
        host's output was full): that chain is not in the rings any more, so a snapshot now would lose it."""
        if self._tx is not None:
            raise ValueError("the virtio console is part-way through the guest's output (the host's output is "
                             "full): resume, let the output drain and snapshot again")
        return {}

    def pause(self, timeout: float | None = PARK_TIMEOUT) -> bool:
        """Quiesce the host side: the feeders (the host console's input thread) park with their bytes; the
        transport (paused by :class:`pykvm.devices.virtio.VirtioSet`) defers ``host_ready`` and ``feed``."""
        return self.feeders.pause(timeout)

    def resume(self) -> None:
        """The feeders run again."""
        self.feeders.resume()

    def host_ready(self) -> None:
        """The host has room for output again: carry on with the transmit queue."""
        self.transport.process_queue(TRANSMITQ)

    def feed(self, data: bytes) -> int:
        """Deliver host input into the guest's receive buffers; returns the bytes taken."""
        if not data:
            return 0
        with self.transport.lock:
            self._input, self._taken = bytes(data), 0
            try:
                self.transport.process_queue(RECEIVEQ)
                return self._taken
            finally:
                self._input = b""

    def process(self, index: int, queue: SplitQueue) -> None:
        """Transmit the guest's output (transmitq) or fill receive buffers with input (receiveq)."""
        if index == TRANSMITQ:
            self._transmit(queue)
        elif index == RECEIVEQ:
            # Buffers wait in the ring until there is input; only then is one taken.
            while self._taken < len(self._input) and (chain := queue.pop()) is not None:
                n = chain.write(self._input[self._taken:self._taken + chain.writable_len])
                self._taken += n
                queue.push(chain.head, n)

    def _transmit(self, queue: SplitQueue) -> None:
        """Output chain after chain, :data:`PIECE` bytes at a time, while the host has room."""
        tx, self._tx = self._tx, None
        if tx is not None and tx[0] is not queue:
            tx = None                  # the queue was set up again: that chain is gone
        chain, index, offset = (tx[1], tx[2], tx[3]) if tx is not None else (None, 0, 0)
        read, out = queue.memory.read, self.out
        while True:
            if chain is None:
                if self.room() <= 0:
                    return             # leave the buffers in the ring: the guest waits for us
                chain, index, offset = queue.pop(), 0, 0
                if chain is None:
                    return
            buffers = chain.readable
            while index < len(buffers):
                gpa, length = buffers[index]
                while offset < length:
                    room = self.room()
                    if room <= 0:
                        self._tx = (queue, chain, index, offset)
                        return
                    n = min(PIECE, room, length - offset)
                    data = read(gpa + offset, n)
                    offset += n
                    if self._first_output is None:
                        self._first_output = time.monotonic()
                    self.transmitted += n
                    out(data)
                index, offset = index + 1, 0
            queue.push(chain.head, 0)
            chain = None
