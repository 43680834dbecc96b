"""The gdb Remote Serial Protocol's framing, without I/O: bytes in, events out.

On the wire (gdb manual, "Overview" of the remote protocol)::

    $<data>#<two hex digits: sum of the data bytes mod 256>     a packet
    +  /  -                                                     ack / please resend (until QStartNoAckMode)
    0x03                                                        interrupt (Ctrl-C), outside any packet

Inside a packet, ``}`` escapes the next byte (XOR 0x20) in binary data (``X``, ``qXfer`` replies);
escaping is left to the commands that carry binary data, the framing passes bytes through.

:class:`PacketReader` is fed whatever the socket delivered, in any slicing, and returns events:
:class:`Packet` (checksum good), :class:`BadPacket` (checksum wrong or not hex, or too long:
answer ``-``), :data:`ACK`, :data:`NACK` and :data:`INTERRUPT`. Bytes between packets that mean
nothing are skipped, and a ``$`` anywhere starts a new packet (the sender gave up on the previous
one), so whatever came before, a complete packet is always recognised.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_PACKET = 0x4000          # what we announce as PacketSize (bytes of data)


@dataclass(frozen=True)
class Packet:
    data: bytes


@dataclass(frozen=True)
class BadPacket:
    why: str


@dataclass(frozen=True)
class _Marker:
    name: str


ACK = _Marker("ack")
NACK = _Marker("nack")
INTERRUPT = _Marker("interrupt")

_HEX = b"0123456789abcdefABCDEF"


def checksum(data: bytes) -> int:
    """The RSP checksum of a packet's data: the sum of its bytes modulo 256."""
    return sum(data) & 0xFF


def frame(data: bytes) -> bytes:
    """``$data#cs``: one packet, ready to send."""
    return b"$" + data + b"#" + b"%02x" % checksum(data)


def escape_binary(data: bytes) -> bytes:
    """Escape the bytes the framing reserves (``#$}*``) for binary payloads."""
    out = bytearray()
    for b in data:
        if b in b"#$}*":
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape_binary(data: bytes) -> bytes:
    """Undo :func:`escape_binary`. Raises ValueError on a trailing lone ``}``."""
    out = bytearray()
    it = iter(data)
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                raise ValueError("binary data ends with an escape byte")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


class PacketReader:
    """Reassembles packets from a byte stream; see the module docstring."""

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._state = "idle"          # idle -> data -> cs1 -> cs2 -> idle
        self._data = bytearray()
        self._cs = bytearray()
        self._overflow = False

    def feed(self, chunk: bytes) -> list:
        """Parse ``chunk`` of the byte stream; returns the acks, packets and interrupts it completed."""
        events: list = []
        for b in chunk:
            state = self._state
            if state == "idle":
                if b == 0x24:                       # $
                    self._start()
                elif b == 0x2B:
                    events.append(ACK)
                elif b == 0x2D:
                    events.append(NACK)
                elif b == 0x03:
                    events.append(INTERRUPT)
                # anything else between packets is noise
            elif state == "data":
                if b == 0x23:                       # #
                    self._state = "cs"
                elif b == 0x24:                     # a new packet: the previous one was abandoned
                    self._start()
                elif len(self._data) < self.max_packet:
                    self._data.append(b)
                else:
                    self._overflow = True
            elif b == 0x24:                         # $ where a checksum digit belongs: start over
                self._start()
            else:                                   # the two checksum digits
                self._cs.append(b)
                if len(self._cs) == 2:
                    events.append(self._finish())
        return events

    def _start(self) -> None:
        self._state = "data"
        self._data = bytearray()
        self._cs = bytearray()
        self._overflow = False

    def _finish(self):
        self._state = "idle"
        data, cs = bytes(self._data), bytes(self._cs)
        if self._overflow:
            return BadPacket(f"packet longer than {self.max_packet} bytes")
        if cs[0] not in _HEX or cs[1] not in _HEX:
            return BadPacket(f"checksum {cs!r} is not two hex digits")
        if int(cs, 16) != checksum(data):
            return BadPacket(f"checksum {cs.decode()} does not match the data ({checksum(data):02x})")
        return Packet(data)
