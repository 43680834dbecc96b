"""virtio-blk (virtio 1.x, section 5.2): a raw image file as the guest's disk.

One request queue. Each request is one chain: a 16-byte device-readable header ``{le32 type;
le32 reserved; le64 sector}``, then the data (device-readable for a write, device-writable for a
read), then one device-writable status byte, the last byte of the chain. The layout inside the
chain is free (the header and the data may share descriptors, as the spec allows).

========  ==========================================================================
type      what the device does
========  ==========================================================================
IN (0)    read ``len(data)`` bytes from ``sector * 512`` into the guest's buffers
OUT (1)   write the guest's buffers at ``sector * 512``; IOERR on a read-only drive
FLUSH (4) ``fsync`` the image (nothing to do on a read-only drive)
GET_ID(8) the device id string, 20 bytes, NUL-padded: the image file's name
other     status UNSUPP
========  ==========================================================================

IN/OUT data must be a whole number of 512-byte sectors, and the range must lie inside the
capacity (the image size in sectors, rounded down): otherwise status IOERR and nothing is
transferred. Data moves between the file and guest RAM with ``preadv``/``pwritev`` on
memoryviews of guest memory (``GuestMemory.view``): no copy in Python.

Features offered: SEG_MAX (queue size - 2 data segments per request), FLUSH (the driver sends
flushes; without it negotiated every write is followed by ``fdatasync``, as the spec wants a
write-through device then) and RO for a read-only drive. Configuration space: the 60-byte
``virtio_blk_config`` with ``capacity`` and ``seg_max`` filled in (``blk_size`` 512 too,
though BLK_SIZE is not offered).

A chain without a writable byte for the status cannot be answered: it is returned with 0 bytes
written and counted in :attr:`Block.bad_requests`.
"""

from __future__ import annotations

import os
import struct

from .mmio import ID_BLOCK, VirtioDevice
from .queue import Chain, SplitQueue

VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

SECTOR = 512
QUEUE_SIZE = 256
ID_BYTES = 20
CONFIG_SIZE = 60
IOV_MAX = 1024                  # the most buffers one preadv/pwritev takes

_HEADER = struct.Struct("<IIQ")


class BlockError(OSError):
    """A transfer between the image file and guest memory that could not complete."""

    pass


class Block(VirtioDevice):
    """A virtio-blk device over the raw image at ``path``."""

    device_id = ID_BLOCK
    name = "virtio-blk"
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, path: str, readonly: bool = False, serial: str | None = None) -> None:
        self.path = path
        self.readonly = readonly
        self.fd = os.open(path, (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            size = os.lseek(self.fd, 0, os.SEEK_END)    # works for block devices too
        except OSError:
            os.close(self.fd)
            raise
        self.capacity = size // SECTOR
        self.seg_max = QUEUE_SIZE - 2
        self.features = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH | (VIRTIO_BLK_F_RO if readonly else 0)
        ident = (serial if serial is not None else os.path.basename(path)).encode()[:ID_BYTES]
        self.ident = ident.ljust(ID_BYTES, b"\0")
        self.bad_requests = 0
        self.requests = 0
        self.flushes = 0
        self._config = _config_bytes(self.capacity, self.seg_max)

    def state(self) -> dict:
        """The drive as the guest knows it (for a snapshot): the image's path, read-only, capacity in sectors.
        A restore re-opens the image at that path (see pykvm.snapshot.machine_state)."""
        return {"path": self.path, "readonly": self.readonly, "capacity": self.capacity}

    def load_state(self, state: dict) -> None:
        """Check that this drive is the one :meth:`state` recorded; ValueError if the path, the read-only
        setting or the capacity (the image changed size since the snapshot) differ."""
        try:
            path, readonly, capacity = state["path"], state["readonly"], state["capacity"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"virtio-blk state is malformed: {e!r}") from None
        if path != self.path or readonly is not self.readonly:
            raise ValueError(f"virtio-blk state is for drive {path!r} (read-only {readonly!r}), not {self.path!r}")
        if capacity != self.capacity:
            raise ValueError(f"drive {self.path} has {self.capacity} sectors now, but the snapshot's guest knows "
                             f"it with {capacity!r}: the image was changed since the snapshot")

    def config(self) -> bytes:
        """The 60-byte virtio_blk_config: capacity in sectors, seg_max, blk_size."""
        return self._config

    def swap(self, path: str) -> None:
        """Put the image at ``path`` behind the drive in place of the current one, while the guest runs
        (Firecracker's ``PATCH /drives/{drive_id}`` after InstanceStart).

        The new file is opened as the drive is (read-only or read-write) before anything changes: OSError if it
        cannot be, and the drive keeps its image. Then, under the transport's lock (between two requests, never
        in the middle of one), the image, path and capacity change, the configuration space shows the new
        capacity, and the transport announces a configuration change (virtio 1.x 2.5 and 4.2.2:
        ConfigGeneration changes and, once the driver runs, a configuration-change interrupt; Linux then reads
        the new capacity). The device ID string stays the drive's."""
        fd = os.open(path, (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
        except OSError:
            os.close(fd)
            raise
        transport = getattr(self, "transport", None)
        lock = transport.lock if transport is not None else _NoLock()
        with lock:
            old, self.fd = self.fd, fd
            self.path = path
            self.capacity = size // SECTOR
            self._config = _config_bytes(self.capacity, self.seg_max)
            if transport is not None:
                transport.config_changed()
        if old >= 0:
            os.close(old)

    def close(self) -> None:
        """Close the image file (idempotent)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def process(self, index: int, queue: SplitQueue) -> None:
        """Carry out every request the driver made available, returning each with its status."""
        while (chain := queue.pop()) is not None:
            queue.push(chain.head, self.handle(chain))

    def handle(self, chain: Chain) -> int:
        """Carry out one request; returns the bytes written into the chain (data + status)."""
        self.requests += 1
        status_at = chain.writable_len - 1
        if status_at < 0:
            self.bad_requests += 1
            return 0
        header = chain.read(0, _HEADER.size)
        written = 0
        if len(header) < _HEADER.size:
            status = VIRTIO_BLK_S_IOERR
        else:
            kind, _, sector = _HEADER.unpack(header)
            if kind == VIRTIO_BLK_T_IN:
                status = self._transfer(chain, sector, status_at, into_guest=True)
                written = status_at if status == VIRTIO_BLK_S_OK else 0
            elif kind == VIRTIO_BLK_T_OUT:
                status = self._transfer(chain, sector, chain.readable_len - _HEADER.size, into_guest=False)
            elif kind == VIRTIO_BLK_T_FLUSH:
                status = self._flush()
            elif kind == VIRTIO_BLK_T_GET_ID:
                written = chain.write(self.ident[:status_at])
                status = VIRTIO_BLK_S_OK
            else:
                status = VIRTIO_BLK_S_UNSUPP
        chain.write(bytes((status,)), status_at)
        return written + 1

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR == 0 and sector + nbytes // SECTOR <= self.capacity

    def _transfer(self, chain: Chain, sector: int, nbytes: int, into_guest: bool) -> int:
        if not into_guest and self.readonly:
            return VIRTIO_BLK_S_IOERR
        if nbytes < 0 or not self._in_range(sector, nbytes):
            return VIRTIO_BLK_S_IOERR
        if into_guest:
            segments = chain.writable_segments(0, nbytes)
        else:
            segments = chain.readable_segments(_HEADER.size, nbytes)
        memory = chain.memory
        views = [memory.view(gpa, length) for gpa, length in segments]
        try:
            _io_all(self.fd, views, sector * SECTOR, into_guest)
            if not into_guest and not self.transport.negotiated(VIRTIO_BLK_F_FLUSH):
                os.fdatasync(self.fd)     # no FLUSH negotiated: the device must be write-through
        except OSError:
            return VIRTIO_BLK_S_IOERR
        finally:
            for view in views:
                view.release()
        return VIRTIO_BLK_S_OK

    def _flush(self) -> int:
        self.flushes += 1
        if self.readonly:
            return VIRTIO_BLK_S_OK
        try:
            os.fsync(self.fd)
        except OSError:
            return VIRTIO_BLK_S_IOERR
        return VIRTIO_BLK_S_OK


def _config_bytes(capacity: int, seg_max: int) -> bytes:
    """virtio_blk_config (5.2.4): le64 capacity, le32 size_max, le32 seg_max, geometry, le32 blk_size; the rest 0."""
    return struct.pack("<QII4xI", capacity, 0, seg_max, SECTOR).ljust(CONFIG_SIZE, b"\0")


class _NoLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def _io_all(fd: int, views: list[memoryview], offset: int, into_guest: bool) -> None:
    """preadv/pwritev all of ``views`` at ``offset``, continuing after short transfers; a read
    that meets the end of the file (the image shrank) is an error."""
    op = os.preadv if into_guest else os.pwritev
    pending = [v for v in views if len(v)]
    while pending:
        batch = pending[:IOV_MAX]
        done = op(fd, batch, offset)
        if done <= 0:
            raise BlockError(f"{'read' if into_guest else 'write'} at {offset} made no progress")
        offset += done
        while done:
            first = pending[0]
            if done >= len(first):
                done -= len(first)
                pending.pop(0)
            else:
                pending[0] = first[done:]
                done = 0
