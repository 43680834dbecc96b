"""virtio-console (virtio 1.x, section 5.3): one port, the guest's ``hvc0``.

Two queues: receiveq 0 (host -> guest: the driver offers device-writable buffers, the device
fills them with input) and transmitq 0 (guest -> host: device-readable buffers of output). No
feature is offered, so there is no MULTIPORT control queue, no SIZE and no EMERG_WRITE; the
configuration space (``cols``, ``rows``, ``max_nr_ports``, ``emerg_wr``) reads as zeros.

Output goes to ``out`` (a callable taking bytes: the terminal, a file, a test's list). Input is
pushed by the host with :meth:`VirtioConsole.feed`, which has the same contract as the UART's: it takes
only as many bytes as the guest has buffers for and returns that count, so the caller keeps the
rest and nothing is lost. :class:`pykvm.console.HostConsole` drives either device.

:attr:`listening` (a console that waits for the guest's driver asks it before feeding) is True
once the driver runs, the receive queue is ready, and the guest wrote to the console at least
:data:`LISTEN_DELAY` seconds ago. The last condition is for Linux: its virtio_console offers
receive buffers as soon as the port exists, but throws away input that arrives before the port
is hooked up to its hvc console (``in_intr``: ``guest_connected`` is still false), which is done
only just after the kernel first prints there. Input that arrives later waits in the driver
until a program opens hvc0. A guest that never writes can still be fed by a console that does
not wait for the driver (bare-metal guests).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .mmio import ID_CONSOLE, VirtioDevice
from .queue import SplitQueue

RECEIVEQ = 0
TRANSMITQ = 1
QUEUE_SIZE = 64
CONFIG_SIZE = 12         # le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr
LISTEN_DELAY = 0.2       # seconds after the guest's first output before a waiting console feeds it


class VirtioConsole(VirtioDevice):
    device_id = ID_CONSOLE
    name = "virtio-console"
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, out: Callable[[bytes], None]) -> None:
        self.out = out
        self._input = b""
        self._taken = 0
        self.transmitted = 0
        self._first_output: float | None = None

    def config(self) -> bytes:
        return bytes(CONFIG_SIZE)

    @property
    def listening(self) -> bool:
        t, first = self.transport, self._first_output
        return (t.running and t.queues[RECEIVEQ].queue is not None and first is not None
                and time.monotonic() - first >= LISTEN_DELAY)

    def reset(self) -> None:
        self._first_output = None

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
        if index == TRANSMITQ:
            while (chain := queue.pop()) is not None:
                data = chain.read()
                if data:
                    if self._first_output is None:
                        self._first_output = time.monotonic()
                    self.transmitted += len(data)
                    self.out(data)
                queue.push(chain.head, 0)
        elif index == RECEIVEQ:
            # Buffers wait in the ring until there is input; only then is one taken.
            while self._taken < len(self._input) and (chain := queue.pop()) is not None:
                n = chain.write(self._input[self._taken:self._taken + chain.writable_len])
                self._taken += n
                queue.push(chain.head, n)
