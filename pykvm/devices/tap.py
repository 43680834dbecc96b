"""The host side of a guest's network card: a Linux TAP device opened through /dev/net/tun.

pykvm attaches to a TAP that already exists (``ip tuntap add NAME mode tap``, made by the user,
a test or the engine); it never creates one, so a misspelt name is an error rather than a new
interface nobody routes to. The TAP is opened with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR``
(Documentation/networking/tuntap.rst): each read returns one Ethernet frame, each write sends
one, and every frame is preceded by a virtio-net header of :data:`VNET_HDR_SIZE` bytes
(``TUNSETVNETHDRSZ``): the 12-byte ``virtio_net_hdr_v1`` of the virtio spec (5.1.6), so the
guest's headers pass through unchanged. ``TUNSETOFFLOAD`` tells the kernel which offloads the
reader accepts (partial checksums, TSO): it then hands over large unsegmented frames, and
otherwise segments and checksums them itself.

:class:`Tap` is what :class:`pykvm.devices.virtio.net.Net` is handed (its host I/O is injected):
``fileno()`` for polling, :meth:`Tap.recv_into`, :meth:`Tap.send` and :meth:`Tap.set_offload`.
Any object with those methods serves (the tests use a datagram socket pair).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from collections.abc import Sequence

from ..errors import UsageError

TUN_PATH = "/dev/net/tun"

# <linux/if_tun.h>
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01          # the reader accepts frames with a partial checksum (NEEDS_CSUM)
TUN_F_TSO4 = 0x02          # ... and TCPv4 segmentation left undone (GSO_TCPV4)
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08

VNET_HDR_SIZE = 12         # struct virtio_net_hdr_v1 (virtio 1.x, 5.1.6)
IFNAMSIZ = 16

_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")      # struct ifreq: ifr_name, ifr_flags (40 bytes)


def _iow(kind: str, nr: int, size: int) -> int:
    """_IOW(kind, nr, size) of <asm-generic/ioctl.h>: direction write (1) in bits 30-31, size in
    bits 16-29, type in 8-15, number in 0-7."""
    return (1 << 30) | (size << 16) | (ord(kind) << 8) | nr


TUNSETIFF = _iow("T", 202, struct.calcsize("i"))
TUNSETOFFLOAD = _iow("T", 208, struct.calcsize("I"))
TUNSETVNETHDRSZ = _iow("T", 216, struct.calcsize("i"))


class TapError(UsageError):
    """The TAP cannot be used: missing, not a TAP, not ours to open, busy. Status 2."""


def check_name(name: str) -> None:
    """Refuse a name Linux could not give an interface (empty, too long, '/', blanks)."""
    if not name or len(name.encode("utf-8", "surrogateescape")) >= IFNAMSIZ or name in (".", "..") \
            or any(c in name for c in "/: \t\n\0"):
        raise TapError(f"{name!r} is not a network interface name (1 to {IFNAMSIZ - 1} characters, "
                       "no '/', ':' or blanks)")


class Tap:
    """One open TAP queue: a non-blocking fd carrying ``virtio_net_hdr_v1`` + Ethernet frame."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    @classmethod
    def open(cls, name: str) -> Tap:
        """Attach to the existing TAP ``name`` in this network namespace.

        Raises :class:`TapError` (one paragraph, exit status 2) if there is no such interface, it
        is not a TAP, the caller may not open it (needs CAP_NET_ADMIN or to be its owner/group),
        another process has it open, or /dev/net/tun is missing."""
        check_name(name)
        try:
            socket.if_nametoindex(name)
        except OSError:
            raise TapError(f"there is no network interface {name} in this network namespace; create the "
                           f"TAP first (ip tuntap add {name} mode tap)") from None
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise TapError(f"cannot open {TUN_PATH} for TAP {name}: {e.strerror} (is the tun module "
                           "loaded, and may this user open it?)") from None
        try:
            raw = name.encode("utf-8", "surrogateescape")
            fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        except OSError as e:
            os.close(fd)
            raise TapError(_attach_error(name, e)) from None
        return cls(fd, name)

    def fileno(self) -> int:
        """The TAP's file descriptor (-1 once closed), for select/poll."""
        return self.fd

    def recv_into(self, buffer: memoryview) -> int:
        """Read one frame (header + Ethernet frame) into ``buffer``; returns its length. Raises
        BlockingIOError when none is waiting. A frame longer than ``buffer`` comes back cut to
        its length: callers size the buffer above the largest frame they accept."""
        return os.readv(self.fd, [buffer])

    def send(self, pieces: Sequence[memoryview | bytes]) -> int:
        """Write one frame, given as pieces (header first), with one ``writev``; returns the bytes
        taken. Raises OSError if the kernel refuses it (a bad header, the interface down)."""
        return os.writev(self.fd, pieces)

    def set_offload(self, flags: int) -> None:
        """TUNSETOFFLOAD: the TUN_F_* offloads the reader (the guest) accepts."""
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)

    def close(self) -> None:
        """Close the TAP's descriptor; idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _attach_error(name: str, e: OSError) -> str:
    if e.errno == errno.EINVAL:
        return f"network interface {name} is not a TAP device (or is a multi-queue one): make one with " \
               f"ip tuntap add {name} mode tap"
    if e.errno == errno.EPERM:
        return f"may not open TAP {name}: it belongs to another user or group (ip tuntap add ... user U), " \
               "or this process lacks CAP_NET_ADMIN"
    if e.errno == errno.EBUSY:
        return f"TAP {name} is busy: another process (another VM?) has it open"
    return f"cannot attach to TAP {name}: {e.strerror}"
