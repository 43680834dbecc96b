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
        return _ALL_ONES[size]

    def write(self, offset: int, size: int, value: int) -> None:
        self.last = value
