"""The debug-exit port (QEMU's isa-debug-exit, at 0xf4 by default).

A guest writes a value v to the port and the VM ends; pykvm then exits with status
``((v << 1) | 1) & 0xff``. The shift-and-set-bit-0 is QEMU's convention: QEMU calls
``exit((v << 1) | 1)`` and the kernel keeps the low 8 bits of an exit status (wait(2)), so a test
kernel written for ``qemu -device isa-debug-exit`` gives the shell the same status under pykvm, and
an odd status can never be mistaken for pykvm's own (even) error statuses. 8-, 16- and 32-bit writes
all count, but only the value's low 7 bits reach the status (a 16-bit write of 0x3130 gives 0x61,
97, under QEMU and pykvm alike); the run's reason still names the whole value written. Reads return
all ones, as an empty ISA port does.
"""

from __future__ import annotations

from collections.abc import Callable

from .bus import all_ones

PORT = 0xF4
STATUS_MASK = 0xFF   # a process exit status is 8 bits (POSIX wait(2): WEXITSTATUS)


def status_for(value: int) -> int:
    """pykvm's exit status (odd, 1..255) for a guest that wrote ``value`` (any width) to the port:
    ``(value << 1) | 1`` truncated to the 8 bits a process status has, as QEMU's isa-debug-exit gives."""
    return ((value << 1) | 1) & STATUS_MASK


class DebugExit:
    def __init__(self, on_exit: Callable[[int, int], None]) -> None:
        self._on_exit = on_exit   # called with (value, status)

    def read(self, offset: int, size: int) -> int:
        """All ones of ``size`` bytes: the port reads as an empty ISA port."""
        return all_ones(size)

    def write(self, offset: int, size: int, value: int) -> None:
        """End the run with :func:`status_for` of ``value`` (any width)."""
        self._on_exit(value, status_for(value))

    def state(self) -> dict:
        """The port has no state: an empty record, so a snapshot lists it like every other device."""
        return {}

    def load_state(self, state: dict) -> None:
        """Nothing to take; ValueError unless the record is the empty one :meth:`state` writes."""
        if state != {}:
            raise ValueError(f"debug-exit state is malformed: {state!r:.80}")

    @classmethod
    def from_state(cls, state: dict, on_exit: Callable[[int, int], None]) -> DebugExit:
        """A port with its host hook (it has no state of its own)."""
        device = cls(on_exit)
        device.load_state(state)
        return device
