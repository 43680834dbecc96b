"""Ports that guests touch but that need no behaviour: claimed, so they are not counted as
unclaimed accesses, reading as all ones and ignoring writes.

Port 0x80 is the POST diagnostic port: BIOSes and kernels write progress codes there, and Linux
uses an ``out`` to it as a short I/O delay. The exit-latency benchmark uses it too, because its
handling costs nothing beyond the exit itself.
"""

from __future__ import annotations

from .bus import all_ones

POST_PORT = 0x80
_ALL_ONES = {n: all_ones(n) for n in (1, 2, 4, 8)}


class Sink:
    def __init__(self, name: str) -> None:
        self.name = name
        self.last = 0   # the last value written (a POST code, for the curious)

    def read(self, offset: int, size: int) -> int:
        """All ones of ``size`` bytes."""
        return _ALL_ONES[size]

    def write(self, offset: int, size: int, value: int) -> None:
        """Keep ``value`` as :attr:`last` and nothing else."""
        self.last = value

    def state(self) -> dict:
        """The last value written, as plain data (for a snapshot)."""
        return {"last": self.last}

    def load_state(self, state: dict) -> None:
        """Take the last value from :meth:`state`'s record; ValueError if it is malformed."""
        last = state.get("last") if isinstance(state, dict) else None
        if type(last) is not int or not 0 <= last < 1 << 64:
            raise ValueError(f"sink state is malformed: last {last!r}")
        self.last = last

    @classmethod
    def from_state(cls, state: dict, name: str) -> Sink:
        """A sink in the state :meth:`state` recorded."""
        device = cls(name)
        device.load_state(state)
        return device
