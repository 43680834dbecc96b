"""The PC's CMOS RAM and real-time clock (a Motorola MC146818 and its descendants).

Two ports: 0x70 takes the index of a register (bit 7 of that write is the PC's NMI-disable
gate, not part of the index, so it is masked off), 0x71 reads or writes the indexed register.
Attach at :data:`BASE` with length 2. Reading the index port returns all ones (it is write-only).
Wider accesses act as byte accesses (reads zero-extend, writes use the low byte).

Registers, as the datasheet lays them out:

* 0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week (1 = Sunday), 0x07 day of month,
  0x08 month, 0x09 year within the century, and 0x32 the century (a PC/AT convention, not in the
  MC146818 itself). They are read from the host's clock at every access (``clock`` returns a
  :class:`time.struct_time`, :func:`time.gmtime` by default), encoded in BCD unless register B's
  DM bit (bit 2) asks for binary, and in 24-hour form when register B bit 1 is set; in 12-hour
  form bit 7 of the hour marks PM. Writes to them are ignored: the guest's RTC follows the host.
* 0x01, 0x03, 0x05 (alarm seconds/minutes/hours) are stored but never fire.
* Register A (0x0A): bits 0-6 (rate and divider select) are stored; bit 7, UIP (update in
  progress), always reads 0, so a guest never waits for an update cycle to finish.
* Register B (0x0B): stored as written. Its SET bit does not freeze the clock and its interrupt
  enables have no effect: no interrupt line is wired.
* Register C (0x0C), the interrupt flags, always reads 0. Register D (0x0D) reads 0x80: VRT,
  the RAM and time are valid (the battery is good). Both are read-only.
* Everything else up to 0x7F is plain battery-backed RAM (128 bytes in all), preset the way
  QEMU's PC sets it up for firmware: 0x15-0x16 base memory in KiB (at most 640); 0x17-0x18 and
  again 0x30-0x31 extended memory above 1 MiB in KiB; 0x34-0x35 memory between 16 MiB and 4 GiB
  in 64 KiB units; these three capped at 0xFFFF; 0x5B-0x5D memory above 4 GiB in 64 KiB units.
  All multi-byte values are little-endian. 0x10 (floppy drive types) is 0: no drives.

Thread safety: a lock keeps the index and the register file consistent between vCPU threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from .bus import all_ones

BASE = 0x70
LENGTH = 2

# Clock and calendar registers
SECONDS = 0x00
MINUTES = 0x02
HOURS = 0x04
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
CENTURY = 0x32
# Status registers
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D

NMI_DISABLE = 0x80          # bit 7 of an index write
A_UIP = 0x80                # register A: update in progress
B_24H = 0x02                # register B: 24-hour mode
B_DM = 0x04                 # register B: data mode, 1 = binary, 0 = BCD
D_VRT = 0x80                # register D: valid RAM and time

REG_A_DEFAULT = 0x26        # 32.768 kHz time base, 1024 Hz periodic rate: what PC BIOSes program
REG_B_DEFAULT = B_24H       # 24-hour, BCD, no interrupts

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

_TIME_REGS = frozenset({SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY})


def to_bcd(n: int) -> int:
    """Two decimal digits packed in one byte: 59 -> 0x59."""
    return (n // 10) << 4 | (n % 10)


class Cmos:
    """The RTC and its 128 bytes of CMOS RAM.

    ``ram_below_4g`` and ``ram_above_4g`` are the guest RAM sizes in bytes, for the memory size
    registers firmware reads; ``clock`` supplies the time of day.
    """

    def __init__(self, ram_below_4g: int, ram_above_4g: int = 0,
                 clock: Callable[[], time.struct_time] = time.gmtime) -> None:
        self._clock = clock
        self._index = 0
        self.nmi_disabled = False       # the NMI gate that shares the index port; only recorded
        self._ram = bytearray(128)
        self._ram[REG_A] = REG_A_DEFAULT
        self._ram[REG_B] = REG_B_DEFAULT
        self._lock = threading.Lock()

        base_kib = min(ram_below_4g // KiB, 640)
        extended_kib = min(max(ram_below_4g - 1 * MiB, 0) // KiB, 0xFFFF)
        above_16m = min(max(ram_below_4g - 16 * MiB, 0) // (64 * KiB), 0xFFFF)
        above_4g = ram_above_4g // (64 * KiB)
        self._set(0x15, base_kib, 2)
        self._set(0x17, extended_kib, 2)
        self._set(0x30, extended_kib, 2)
        self._set(0x34, above_16m, 2)
        self._set(0x5B, above_4g, 3)

    def _set(self, index: int, value: int, width: int) -> None:
        self._ram[index:index + width] = (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")

    # ---- the clock ----------------------------------------------------------------------

    def _encode(self, n: int) -> int:
        return n if self._ram[REG_B] & B_DM else to_bcd(n)

    def _time_register(self, index: int) -> int:
        now = self._clock()
        if index == HOURS:
            hour = now.tm_hour
            if self._ram[REG_B] & B_24H:
                return self._encode(hour)
            return self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)
        value = {
            SECONDS: min(now.tm_sec, 59),              # a leap second reads as :59
            MINUTES: now.tm_min,
            DAY_OF_WEEK: (now.tm_wday + 1) % 7 + 1,    # struct_time: Monday = 0; RTC: Sunday = 1
            DAY_OF_MONTH: now.tm_mday,
            MONTH: now.tm_mon,
            YEAR: now.tm_year % 100,
            CENTURY: now.tm_year // 100 % 100,
        }[index]
        return self._encode(value)

    # ---- the two ports ------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset != 1:
            return all_ones(size)
        with self._lock:
            index = self._index
            if index in _TIME_REGS:
                return self._time_register(index)
            if index == REG_A:
                return self._ram[REG_A] & ~A_UIP
            if index == REG_C:
                return 0
            if index == REG_D:
                return D_VRT
            return self._ram[index]

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == 0:
                self._index = value & ~NMI_DISABLE
                self.nmi_disabled = bool(value & NMI_DISABLE)
                return
            if offset != 1:
                return
            index = self._index
            if index in _TIME_REGS or index in (REG_C, REG_D):
                return
            if index == REG_A:
                value &= ~A_UIP
            self._ram[index] = value
