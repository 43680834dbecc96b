"""QEMU's firmware configuration device (fw_cfg), legacy I/O-port interface only.

fw_cfg is how a QEMU-style VMM hands numbered blobs ("items") to guest firmware and guest
kernels: RAM size, CPU count, the kernel, initrd and command line for direct boot, and named
"files" listed in a directory. The guest-visible interface follows QEMU's docs/specs/fw_cfg.rst:

* Selector register, port 0x510, 16-bit little-endian write: picks the item by key and rewinds
  the data offset to 0. It is write-only; reading it returns all ones here.
* Data register, port 0x511, 8-bit: each read returns the byte at the current offset of the
  selected item and advances the offset; past the end of the item (or for a key with no item)
  reads return 0x00. Writes are ignored, as QEMU has done since v2.4 (writes now go only through
  the DMA interface, which this model does not offer: ``FW_CFG_ID`` reports bit 0 only).

Attach at :data:`BASE` with length 2: offset 0 is the selector, offset 1 the data register.
A byte-wide write at offset 0 is not a selector write (QEMU treats it as a data write, so it is
ignored here too); a 2- or 4-byte write at offset 0 selects its low 16 bits. A read of N > 1
bytes at offset 1 returns the next N bytes of the item, packed little-endian so that storing the
register puts them in memory in item order (as a wide data read does on fw_cfg's MMIO variant).

Well-known items (keys from QEMU's qemu_fw_cfg.h; integers little-endian unless noted):
``FW_CFG_SIGNATURE`` ``b"QEMU"``, ``FW_CFG_ID`` u32 1, ``FW_CFG_RAM_SIZE`` u64,
``FW_CFG_NB_CPUS`` and ``FW_CFG_MAX_CPUS`` u16, kernel / initrd sizes (u32) and data, the command
line size (u32, counting the NUL) and data (NUL-terminated).

Files (:meth:`FwCfg.add_file`) get keys from ``FW_CFG_FILE_FIRST`` (0x20) up, in the order
added, and are listed in ``FW_CFG_FILE_DIR``: a big-endian u32 count, then per file a 64-byte
record {u32 BE size, u16 BE key, u16 reserved, char name[56] NUL-padded}. The spec does not
require any order; the directory is sorted by name because that is how current QEMU presents it.
(QEMU also renumbers the keys to follow that sorted order; pykvm keeps each key stable from the
moment it is handed out. Guests look files up by name, never by assumed key.)

Thread safety: a lock covers the selector, the offset and the item table, since any vCPU thread
may access the ports.
"""

from __future__ import annotations

import struct
import threading

from .bus import all_ones

BASE = 0x510          # selector; the data register is BASE + 1
LENGTH = 2

FW_CFG_SIGNATURE = 0x0000
FW_CFG_ID = 0x0001
FW_CFG_RAM_SIZE = 0x0003
FW_CFG_NB_CPUS = 0x0005
FW_CFG_KERNEL_SIZE = 0x0008
FW_CFG_INITRD_SIZE = 0x000B
FW_CFG_MAX_CPUS = 0x000F
FW_CFG_KERNEL_DATA = 0x0011
FW_CFG_INITRD_DATA = 0x0012
FW_CFG_CMDLINE_SIZE = 0x0014
FW_CFG_CMDLINE_DATA = 0x0015
FW_CFG_FILE_DIR = 0x0019
FW_CFG_FILE_FIRST = 0x0020

FW_CFG_ID_TRADITIONAL = 1 << 0   # the selector/data port interface; bit 1 (DMA) stays clear

MAX_NAME = 55                     # name[56] holds the name and its NUL
LAST_KEY = 0x3FFF                 # generic keys are 0x0000-0x3fff; bit 14 is the write channel

_FILE_DIR_COUNT = struct.Struct(">I")
_FILE_DIR_ENTRY = struct.Struct(">IHH56s")   # size, select, reserved, name


class FwCfg:
    """The fw_cfg item table and the selector/data register pair.

    ``ram_size`` is the guest's RAM in bytes; ``nb_cpus`` the CPUs present at boot, ``max_cpus``
    the most there can be. ``kernel``, ``initrd`` and ``cmdline`` are offered for direct boot.
    """

    def __init__(self, ram_size: int, nb_cpus: int, max_cpus: int, kernel: bytes = b"",
                 initrd: bytes = b"", cmdline: str = "") -> None:
        self._items: dict[int, bytes] = {
            FW_CFG_SIGNATURE: b"QEMU",
            FW_CFG_ID: struct.pack("<I", FW_CFG_ID_TRADITIONAL),
            FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
            FW_CFG_NB_CPUS: struct.pack("<H", nb_cpus),
            FW_CFG_MAX_CPUS: struct.pack("<H", max_cpus),
        }
        self._files: dict[bytes, int] = {}   # name -> key
        self._items[FW_CFG_FILE_DIR] = self._directory()
        self._key = FW_CFG_SIGNATURE
        self._offset = 0
        self._lock = threading.Lock()
        self.set_boot(kernel, initrd, cmdline)

    # ---- host side ------------------------------------------------------------------------

    def set_boot(self, kernel: bytes = b"", initrd: bytes = b"", cmdline: str = "") -> None:
        """Offer the kernel, initrd and command line of a direct boot (sizes and data items)."""
        cmdline_data = cmdline.encode("utf-8", "surrogateescape") + b"\0"   # non-UTF-8 argv bytes as given
        with self._lock:
            self._items.update({
                FW_CFG_KERNEL_SIZE: struct.pack("<I", len(kernel)),
                FW_CFG_KERNEL_DATA: bytes(kernel),
                FW_CFG_INITRD_SIZE: struct.pack("<I", len(initrd)),
                FW_CFG_INITRD_DATA: bytes(initrd),
                FW_CFG_CMDLINE_SIZE: struct.pack("<I", len(cmdline_data)),
                FW_CFG_CMDLINE_DATA: cmdline_data,
            })

    def add_file(self, name: str, data: bytes) -> int:
        """Offer ``data`` as the named file; returns its selector key."""
        raw = name.encode()
        if not raw or len(raw) > MAX_NAME or b"\0" in raw:
            raise ValueError(f"fw_cfg file name {name!r} must be 1 to {MAX_NAME} bytes, without NUL")
        with self._lock:
            if raw in self._files:
                raise ValueError(f"fw_cfg already has a file named {name!r}")
            key = FW_CFG_FILE_FIRST + len(self._files)
            if key > LAST_KEY:
                raise ValueError(f"fw_cfg has no free key for file {name!r}")
            self._files[raw] = key
            self._items[key] = bytes(data)
            self._items[FW_CFG_FILE_DIR] = self._directory()
        return key

    def item(self, key: int) -> bytes:
        """The bytes the guest reads after selecting ``key`` (empty for an unknown key)."""
        with self._lock:
            return bytes(self._items.get(key, b""))

    def _directory(self) -> bytes:
        records = [_FILE_DIR_COUNT.pack(len(self._files))]
        for raw in sorted(self._files):
            key = self._files[raw]
            records.append(_FILE_DIR_ENTRY.pack(len(self._items[key]), key, 0, raw))
        return b"".join(records)

    # ---- the two registers ----------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        """A data-port read: the next ``size`` bytes of the selected item (all ones past its end or at the selector)."""
        if offset != 1:
            return all_ones(size)          # the selector is write-only
        with self._lock:
            data = self._items.get(self._key, b"")
            chunk = data[self._offset:self._offset + size]
            self._offset += size
        return int.from_bytes(bytes(chunk).ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """A 16-bit selector write picks an item and rewinds it; data writes are ignored (QEMU >= 2.4)."""
        if offset != 0 or size < 2:
            return                         # data writes are ignored, as in QEMU >= 2.4
        with self._lock:
            self._key = value & 0xFFFF
            self._offset = 0

    # ---- snapshots ------------------------------------------------------------------------
    def state(self) -> dict:
        """Every item (bytes), the file names (hex) with their keys, the selected key and the read offset, as plain
        data (for a snapshot). The kernel and initrd items make this as large as they are."""
        with self._lock:
            return {"items": {str(k): v for k, v in self._items.items()},
                    "files": {name.hex(): key for name, key in self._files.items()},
                    "key": self._key, "offset": self._offset}

    def load_state(self, state: dict) -> None:
        """Take the items and registers from :meth:`state`'s record; ValueError if it is malformed."""
        try:
            items = {int(k): _as_bytes(v) for k, v in state["items"].items()}
            files = {bytes.fromhex(name): key for name, key in state["files"].items()}
            key, offset = state["key"], state["offset"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"fw_cfg state is malformed: {e!r}") from None
        if (type(key) is not int or not 0 <= key <= 0xFFFF or type(offset) is not int or offset < 0
                or not all(0 <= k <= LAST_KEY for k in items)
                or not all(type(v) is int and v in items and 0 < len(n) <= MAX_NAME for n, v in files.items())):
            raise ValueError("fw_cfg state is malformed: a key, offset or file name is out of range")
        with self._lock:
            self._items, self._files, self._key, self._offset = items, files, key, offset

    @classmethod
    def from_state(cls, state: dict) -> FwCfg:
        """A device in the state :meth:`state` recorded."""
        device = cls(ram_size=0, nb_cpus=1, max_cpus=1)
        device.load_state(state)
        return device


def _as_bytes(value) -> bytes | memoryview:
    """An item's data: bytes, or a read-only memoryview (a snapshot's, kept without copying megabytes)."""
    if not isinstance(value, (bytes, memoryview)):
        raise TypeError(f"a fw_cfg item must be bytes, not {type(value).__name__}")
    return value
