"""The PC's CMOS RAM and real-time clock: a Motorola MC146818 (datasheet: "MC146818A Real-Time Clock
Plus RAM"), as PCs have carried it since the AT.

Two ports: 0x70 takes the index of a register (bit 7 of that write is the PC's NMI-disable
gate, not part of the index, so it is masked off), 0x71 reads or writes the indexed register.
Attach at :data:`BASE` with length 2. Reading the index port returns all ones (it is write-only).
Wider accesses act as byte accesses (reads zero-extend, writes use the low byte).

The register model is sans-I/O: it never sleeps and never reads the host's clock itself. Time comes
from an injected ``now()`` (host seconds, :func:`time.time` by default) and every register access
first brings the model up to ``now()``: the update cycles, periodic ticks and alarms that fell in
between set their register C flags. IRQ 8 goes to an injected :class:`~pykvm.kvm.irq.IrqLine`. For an
interrupt to arrive while the guest does not touch the RTC, something must call :meth:`Cmos.poll` at
:meth:`Cmos.next_event`: given a line, the device starts a small timer thread that does exactly that
(started lazily, the first time an interrupt source is enabled; :meth:`Cmos.close` joins it). Unit
tests pass ``timer=False`` and an injected clock and call :meth:`Cmos.poll` themselves.

The clock, as the datasheet describes it:

* Time and date: 0x00 seconds, 0x02 minutes, 0x04 hours, 0x06 day of week (1 = Sunday), 0x07 day of
  month, 0x08 month, 0x09 year, and 0x32 the century (a PC/AT convention, not in the MC146818).
  BCD unless register B's DM bit (bit 2) asks for binary; 24-hour form when register B bit 1 is set,
  else 12-hour form with bit 7 of the hour marking PM. Changing DM or 24/12 re-encodes the current
  time (the datasheet leaves the registers to be re-initialised; guests do so anyway).
* The RTC keeps the guest's time as an offset from the host's: it starts at the host's UTC time,
  and a guest write to a time or date register moves the offset, so that ``hwclock --systohc``
  reads back what it wrote, and the clock keeps running from there (as on QEMU). A value out of
  range is clamped (the datasheet leaves it undefined); the day of week is a counter of its own,
  as on the chip. Write the fields with SET held, as the datasheet asks: with SET clear each write
  is applied at once and the date is normalised field by field (31 February becomes 28 or 29).
* Once a second an update cycle advances the time. Register A bit 7, UIP, reads 1 during the last
  244 us before the update (t_BUC); reading the time then still gives the old second.
* Register A (0x0A): DV2-0 (bits 6-4) select the time base: 000, 001 and 010 run (010 is the PC's
  32.768 kHz crystal; all are modelled as 32.768 kHz), any other value stops the divider chain: no
  updates, no periodic interrupts; after the 11x divider reset the first update comes 500 ms after it
  is released. RS3-0 (bits 3-0) select the periodic interrupt rate: 0 none, 1 and 2 as 8 and 9
  (3.90625 and 7.8125 ms), n = 3..15 every 2**(n-1)/32768 s (122.070 us .. 500 ms).
* Register B (0x0B): SET (bit 7) stops the update cycles (the time registers hold still and may be
  written; UIP reads 0) and clears UIE; PIE, AIE, UIE (bits 6, 5, 4) enable the periodic, alarm and
  update-ended interrupts; SQWE (bit 3) and DSE (bit 0) are stored and have no effect.
* Register C (0x0C), read-only: IRQF (bit 7) = PF.PIE + AF.AIE + UF.UIE; PF (bit 6) is set at each
  periodic tick, AF (bit 5) at an update whose new time matches the alarm, UF (bit 4) at the end of
  each update cycle, whether or not their interrupt is enabled. Reading register C clears all of
  them and releases IRQ 8, which is driven high while IRQF is set (level, like the chip's IRQ pin).
* Alarm: 0x01, 0x03, 0x05 (seconds, minutes, hours), in the current data mode; a value from 0xC0
  to 0xFF is "don't care" and matches every value. An alarm byte that encodes no valid value never
  matches.
* Register D (0x0D), read-only: VRT (bit 7) is 1, the RAM and time are valid (the battery is good).
* Everything else up to 0x7F is plain battery-backed RAM (128 bytes in all), preset the way
  QEMU's PC sets it up for firmware: 0x15-0x16 base memory in KiB (at most 640); 0x17-0x18 and
  again 0x30-0x31 extended memory above 1 MiB in KiB; 0x34-0x35 memory between 16 MiB and 4 GiB
  in 64 KiB units; these three capped at 0xFFFF; 0x5B-0x5D memory above 4 GiB in 64 KiB units.
  All multi-byte values are little-endian. 0x10 (floppy drive types) is 0: no drives.

Thread safety: one lock covers the index, the registers and the clock, for the vCPU threads and
the timer.
"""

from __future__ import annotations

import datetime
import math
import threading
import time
from collections.abc import Callable

from ..kvm.irq import IrqLine
from .bus import all_ones
from .quiesce import PARK_TIMEOUT, ParkPoint

BASE = 0x70
LENGTH = 2
IRQ = 8                     # the PC wires the RTC to ISA IRQ 8

# Clock and calendar registers
SECONDS = 0x00
SECONDS_ALARM = 0x01
MINUTES = 0x02
MINUTES_ALARM = 0x03
HOURS = 0x04
HOURS_ALARM = 0x05
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
A_DV = 0x70                 # register A: divider (time base) select, DV2-0
A_RS = 0x0F                 # register A: periodic rate select, RS3-0
DV_32KHZ = 0x20             # DV = 010: 32.768 kHz time base, running
DV_RESET = 0x60             # DV = 11x: divider chain held in reset
B_SET = 0x80                # register B: stop updates, allow setting the time
B_PIE = 0x40                # periodic interrupt enable
B_AIE = 0x20                # alarm interrupt enable
B_UIE = 0x10                # update-ended interrupt enable
B_SQWE = 0x08               # square-wave enable (no pin here)
B_DM = 0x04                 # data mode, 1 = binary, 0 = BCD
B_24H = 0x02                # 24-hour mode
B_DSE = 0x01                # daylight saving enable (stored only)
C_IRQF = 0x80               # register C: an enabled interrupt is pending
C_PF = 0x40                 # periodic interrupt flag
C_AF = 0x20                 # alarm flag
C_UF = 0x10                 # update-ended flag
D_VRT = 0x80                # register D: valid RAM and time
ALARM_DONT_CARE = 0xC0      # an alarm byte >= 0xC0 matches any value

REG_A_DEFAULT = 0x26        # 32.768 kHz time base, 1024 Hz periodic rate: what PC BIOSes program
REG_B_DEFAULT = B_24H       # 24-hour, BCD, no interrupts

UIP_TIME = 244e-6           # t_BUC: UIP is 1 this long before each update (32.768 kHz time base)
DIVIDER_RESET_DELAY = 0.5   # the first update comes this long after the divider leaves reset
TIME_BASE = 32768           # Hz

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
DAY = 86400

_TIME_REGS = frozenset({SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY})
_EPOCH = datetime.date(1970, 1, 1).toordinal()
_MIN_EPOCH = (datetime.date(1, 1, 1).toordinal() - _EPOCH) * DAY
_MAX_EPOCH = (datetime.date(9999, 12, 31).toordinal() - _EPOCH + 1) * DAY - 1


def to_bcd(n: int) -> int:
    """Two decimal digits packed in one byte: 59 -> 0x59."""
    return (n // 10) << 4 | (n % 10)


def from_bcd(v: int) -> int | None:
    """0x59 -> 59; None if a nibble is not a decimal digit."""
    hi, lo = v >> 4, v & 0xF
    return None if hi > 9 or lo > 9 else hi * 10 + lo


def periodic_period(rs: int) -> float | None:
    """The periodic interrupt period in seconds for rate select ``rs`` (register A bits 3-0) with
    the 32.768 kHz time base (datasheet table "Periodic Interrupt Rate"); None for 0 (off)."""
    if rs == 0:
        return None
    if rs < 3:
        rs += 7                 # 1 and 2 repeat 8 and 9 with a 32.768 kHz time base
    return (1 << (rs - 1)) / TIME_BASE


class Fields:
    """The calendar as the time registers hold it: plain integers, 24-hour, full year."""

    __slots__ = ("sec", "min", "hour", "wday", "mday", "mon", "year")

    def __init__(self, sec: int, min: int, hour: int, wday: int, mday: int, mon: int, year: int) -> None:
        self.sec, self.min, self.hour, self.wday, self.mday, self.mon, self.year = sec, min, hour, wday, mday, mon, year

    @classmethod
    def from_epoch(cls, seconds: int, wday_delta: int = 0) -> Fields:
        seconds = min(max(seconds, _MIN_EPOCH), _MAX_EPOCH)
        days, rest = divmod(seconds, DAY)
        date = datetime.date.fromordinal(_EPOCH + days)
        wday = (date.isoweekday() % 7 + wday_delta) % 7 + 1         # ISO: Monday = 1; RTC: Sunday = 1
        return cls(rest % 60, rest // 60 % 60, rest // 3600, wday, date.day, date.month, date.year)

    def epoch(self) -> int:
        """Seconds since 1970 in the RTC's calendar; fields out of range are clamped first."""
        year = min(max(self.year, 1), 9999)
        mon = min(max(self.mon, 1), 12)
        first = datetime.date(year, mon, 1)
        following = datetime.date(year + 1, 1, 1) if mon == 12 else datetime.date(year, mon + 1, 1)
        mday = min(max(self.mday, 1), (following - first).days)
        hour, minute, sec = (min(max(v, 0), top) for v, top in ((self.hour, 23), (self.min, 59), (self.sec, 59)))
        return (first.toordinal() - _EPOCH + mday - 1) * DAY + hour * 3600 + minute * 60 + sec

    def weekday_delta(self) -> int:
        """How far the day-of-week counter is from the weekday of the date (0 when they agree)."""
        return (self.wday - Fields.from_epoch(self.epoch()).wday) % 7


class Cmos:
    """The RTC and its 128 bytes of CMOS RAM.

    ``ram_below_4g`` and ``ram_above_4g`` are the guest RAM sizes in bytes, for the memory size
    registers firmware reads. ``now`` is the host clock in seconds (float); the guest's clock starts
    at it, read as UTC. ``irq`` is IRQ 8 (default: not wired). ``timer``: start the timer thread
    that delivers interrupts while the guest is not accessing the RTC (only with ``irq``).
    """

    def __init__(self, ram_below_4g: int, ram_above_4g: int = 0, now: Callable[[], float] = time.time,
                 irq: IrqLine | None = None, timer: bool = True) -> None:
        self._now = now
        self._irq = irq
        self._index = 0
        self.nmi_disabled = False       # the NMI gate that shares the index port; only recorded
        self._ram = bytearray(128)
        self._ram[REG_A] = REG_A_DEFAULT
        self._ram[REG_B] = REG_B_DEFAULT
        self._lock = threading.Lock()
        t = now()
        self._offset = 0.0              # the divider's phase: RTC seconds = host seconds + offset
        self._held: Fields | None = None    # the time registers while updates are stopped
        self._wday_delta = 0            # the day-of-week counter's distance from the date's weekday
        self._last = t                  # host time up to which events have been accounted
        self._flags = 0                 # register C: PF, AF, UF
        self._line = False              # the level IRQ 8 is driven at
        self._use_timer = timer and irq is not None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._park = ParkPoint(self._wake.set)   # the timer thread's, while paused (pykvm.devices.quiesce)

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

    def _divider_runs(self) -> bool:
        return self._ram[REG_A] & A_DV <= DV_32KHZ

    def _stopped(self) -> bool:
        """No update cycles: SET is held or the divider chain does not run."""
        return bool(self._ram[REG_B] & B_SET) or not self._divider_runs()

    def _seconds(self, now: float) -> int:
        return math.floor(now + self._offset)

    def _fields(self, now: float) -> Fields:
        if self._held is not None:
            return self._held
        return Fields.from_epoch(self._seconds(now), self._wday_delta)

    def _set_time(self, now: float, fields: Fields) -> None:
        """Make ``fields`` the current time, keeping the divider's phase."""
        if self._held is not None:
            self._held = fields
            return
        phase = (now + self._offset) % 1.0
        self._offset = fields.epoch() + phase - now
        self._wday_delta = fields.weekday_delta()

    def _stop(self, now: float) -> None:
        self._held = Fields.from_epoch(self._seconds(now), self._wday_delta)

    def _resume(self, now: float) -> None:
        """Updates run again from the held time, at the divider's phase: the next update comes
        when the divider rolls over (500 ms after a divider reset was released)."""
        held, self._held = self._held, None
        self._offset = held.epoch() + (now + self._offset) % 1.0 - now
        self._wday_delta = held.weekday_delta()

    def _encode(self, n: int) -> int:
        return n if self._ram[REG_B] & B_DM else to_bcd(n)

    def _decode(self, v: int) -> int | None:
        return v if self._ram[REG_B] & B_DM else from_bcd(v)

    def _encode_hour(self, hour: int) -> int:
        if self._ram[REG_B] & B_24H:
            return self._encode(hour)
        return self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)

    def _decode_hour(self, v: int) -> int | None:
        if self._ram[REG_B] & B_24H:
            return self._decode(v)
        h = self._decode(v & 0x7F)
        if h is None or not 1 <= h <= 12:
            return None
        return h % 12 + (12 if v & 0x80 else 0)

    def _time_register(self, index: int, now: float) -> int:
        f = self._fields(now)
        if index == HOURS:
            return self._encode_hour(f.hour)
        if index == DAY_OF_WEEK:
            return self._encode(f.wday)
        value = {SECONDS: f.sec, MINUTES: f.min, DAY_OF_MONTH: f.mday, MONTH: f.mon,
                 YEAR: f.year % 100, CENTURY: f.year // 100 % 100}[index]
        return self._encode(value)

    def _write_time_register(self, index: int, value: int, now: float) -> None:
        f = self._fields(now)
        f = Fields(f.sec, f.min, f.hour, f.wday, f.mday, f.mon, f.year)
        n = self._decode_hour(value) if index == HOURS else self._decode(value)
        if n is None:
            n = 0xFF        # not a number in this mode: clamped below like any value out of range
        if index == SECONDS:
            f.sec = min(n, 59)
        elif index == MINUTES:
            f.min = min(n, 59)
        elif index == HOURS:
            f.hour = min(n, 23)
        elif index == DAY_OF_WEEK:
            f.wday = min(max(n, 1), 7)
        elif index == DAY_OF_MONTH:
            f.mday = min(max(n, 1), 31)
        elif index == MONTH:
            f.mon = min(max(n, 1), 12)
        elif index == YEAR:
            f.year = f.year // 100 * 100 + min(n, 99)
        elif index == CENTURY:
            f.year = min(n, 99) * 100 + f.year % 100
        self._set_time(now, f)

    # ---- alarm, interrupts ----------------------------------------------------------------

    def _alarm_values(self, index: int, top: int) -> range | tuple[int, ...]:
        """The values an alarm byte matches: all (don't care), one, or none (not a valid value)."""
        v = self._ram[index]
        if v >= ALARM_DONT_CARE:
            return range(top)
        n = self._decode_hour(v) if index == HOURS_ALARM else self._decode(v)
        return (n,) if n is not None and 0 <= n < top else ()

    def next_alarm(self, after: int) -> int | None:
        """The first RTC second after ``after`` (both RTC seconds since 1970) whose time matches
        the alarm registers, or None if they can match nothing. Days are 86,400 s: the search
        looks at most one day ahead."""
        hours = self._alarm_values(HOURS_ALARM, 24)
        minutes = self._alarm_values(MINUTES_ALARM, 60)
        seconds = self._alarm_values(SECONDS_ALARM, 60)
        if not (hours and minutes and seconds):
            return None
        day = after - after % DAY
        for start in (day, day + DAY):
            for h in hours:
                hour = start + h * 3600
                if hour + 3599 <= after:
                    continue
                for m in minutes:
                    minute = hour + m * 60
                    if minute + 59 <= after:
                        continue
                    for s in seconds:
                        if minute + s > after:
                            return minute + s
        return None

    def _advance(self, now: float) -> None:
        """Account for the periodic ticks and update cycles in (last, now]: set PF, UF, AF."""
        last = self._last
        self._last = now
        if now <= last or not self._divider_runs():
            return
        before, after = last + self._offset, now + self._offset
        period = periodic_period(self._ram[REG_A] & A_RS)
        if period is not None and math.floor(after / period) > math.floor(before / period):
            self._flags |= C_PF
        if self._held is None:
            s0, s1 = math.floor(before), math.floor(after)
            if s1 > s0:
                self._flags |= C_UF
                alarm = self.next_alarm(s0)
                if alarm is not None and alarm <= s1:
                    self._flags |= C_AF

    def _irqf(self) -> bool:
        b, flags = self._ram[REG_B], self._flags
        return bool((flags & C_PF and b & B_PIE) or (flags & C_AF and b & B_AIE) or (flags & C_UF and b & B_UIE))

    def _drive_irq(self) -> None:
        level = self._irqf()
        if level != self._line:
            self._line = level
            if self._irq is not None:
                self._irq.set(level)

    def _next_event(self, now: float) -> float | None:
        if self._line or not self._divider_runs():
            return None         # IRQ 8 is already high until register C is read, or nothing runs
        b, rtc = self._ram[REG_B], now + self._offset
        due = []
        period = periodic_period(self._ram[REG_A] & A_RS)
        if b & B_PIE and period is not None:
            due.append((math.floor(rtc / period) + 1) * period)
        if self._held is None:
            if b & B_UIE:
                due.append(math.floor(rtc) + 1)
            if b & B_AIE:
                alarm = self.next_alarm(math.floor(rtc))
                if alarm is not None:
                    due.append(alarm)
        return min(due) - self._offset if due else None

    def next_event(self) -> float | None:
        """The host time (``now()`` units) at which an enabled interrupt source next fires while
        IRQ 8 is low, or None if none will before the guest touches the RTC again."""
        with self._lock:
            return self._next_event(self._now())

    def poll(self) -> None:
        """Bring the clock up to ``now()``: set the flags of what happened since, drive IRQ 8."""
        with self._lock:
            self._advance(self._now())
            self._drive_irq()

    # ---- the timer ----------------------------------------------------------------------

    def _changed(self) -> None:
        """The next event may have moved (lock held): wake the timer, starting it if needed."""
        if not self._use_timer or self._closed:
            return
        if self._thread is None:
            if self._next_event(self._last) is None:
                return
            self._thread = threading.Thread(target=self._timer, name="rtc-timer", daemon=True)
            self._thread.start()
        self._wake.set()

    def _timer(self) -> None:
        with self._park.running():
            self._timer_loop()

    def _timer_loop(self) -> None:
        while True:
            self._park.park()      # paused: events wait in the clock, accounted for on resume
            self._wake.clear()
            if self._park.requested:
                continue
            with self._lock:
                if self._closed:
                    return
                now = self._now()
                self._advance(now)
                self._drive_irq()
                due = self._next_event(now)
            # a microsecond late, so that the event has certainly happened when we look again
            self._wake.wait(None if due is None else max(due - now, 0.0) + 1e-6)

    def pause(self, timeout: float | None = PARK_TIMEOUT) -> bool:
        """Quiesce (pykvm.devices.quiesce): the timer thread parks and raises no interrupt until :meth:`resume`;
        what falls due meanwhile sets its flags then (the clock itself runs on, as a battery-backed RTC's does).
        True once the thread has parked."""
        return self._park.pause(timeout)

    def resume(self) -> None:
        """The timer thread runs again and accounts for the events of the pause."""
        self._park.resume()

    def close(self) -> None:
        """Stop the timer thread (if it runs) and wait for it."""
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        self._park.stop()
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # ---- snapshots ----------------------------------------------------------------------

    def state(self) -> dict:
        """The chip as plain data (for a snapshot): the index and NMI-disable bit, the 128 RAM bytes (hex;
        registers A and B among them), the register C flags, the guest clock as an offset from host time
        (``offset``, seconds, which also carries the divider's phase and so the alarm/periodic/update
        phase), the time held while updates are stopped ([sec, min, hour, wday, mday, mon, year] or None),
        the day-of-week counter's distance from the date, how long ago (host seconds) events were last
        accounted, and the IRQ 8 level."""
        with self._lock:
            now = self._now()
            held = self._held
            return {"index": self._index, "nmi_disabled": self.nmi_disabled, "ram": self._ram.hex(),
                    "flags": self._flags, "offset": self._offset, "wday_delta": self._wday_delta,
                    "held": None if held is None else [held.sec, held.min, held.hour, held.wday, held.mday,
                                                       held.mon, held.year],
                    "since_last": max(now - self._last, 0.0), "irq_level": self._line}

    def load_state(self, state: dict) -> None:
        """Take the chip's state from :meth:`state`'s record; ValueError (one sentence) if a field is missing,
        of the wrong type or out of range. The guest's clock keeps its recorded offset from host time. IRQ 8
        is driven to the recorded level and the timer thread starts again if an interrupt source is
        enabled."""
        try:
            index, nmi, flags = state["index"], state["nmi_disabled"], state["flags"]
            ram = bytes.fromhex(state["ram"])
            offset, since_last = state["offset"], state["since_last"]
            wday_delta, held, level = state["wday_delta"], state["held"], state["irq_level"]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"CMOS/RTC state is malformed: {e!r}") from None
        bad = []
        if type(index) is not int or not 0 <= index <= 0x7F:
            bad.append("index")
        if type(nmi) is not bool or type(level) is not bool:
            bad.append("nmi_disabled/irq_level")
        if len(ram) != 128:
            bad.append("ram")
        if type(flags) is not int or flags & ~(C_PF | C_AF | C_UF):
            bad.append("flags")
        # the offset may put the guest anywhere in years 1-9999: bounded by the calendar's range
        if type(offset) not in (int, float) or not math.isfinite(offset) or abs(offset) > _MAX_EPOCH - _MIN_EPOCH:
            bad.append("offset")
        if type(since_last) not in (int, float) or not 0 <= since_last < 1e9:
            bad.append("since_last")
        if type(wday_delta) is not int or not 0 <= wday_delta < 7:
            bad.append("wday_delta")
        fields = None
        if held is not None:
            tops = ((0, 59), (0, 59), (0, 23), (1, 7), (1, 31), (1, 12), (1, 9999))
            if (not isinstance(held, list) or len(held) != 7
                    or not all(type(v) is int and lo <= v <= hi for v, (lo, hi) in zip(held, tops, strict=False))):
                bad.append("held")
            else:
                fields = Fields(*held)
        if len(ram) == 128 and "held" not in bad:
            stopped = bool(ram[REG_B] & B_SET) or ram[REG_A] & A_DV > DV_32KHZ
            if stopped != (fields is not None):
                bad.append("held (it must be given exactly when SET or the divider stops the updates)")
        if bad:
            raise ValueError(f"CMOS/RTC state is malformed: {', '.join(bad)} out of range")
        with self._lock:
            self._index, self.nmi_disabled, self._flags = index, nmi, flags
            self._ram[:] = ram
            self._offset, self._wday_delta, self._held = float(offset), wday_delta, fields
            self._last = self._now() - since_last
            self._line = False      # the fresh line is low
            if level:
                self._line = True
                if self._irq is not None:
                    self._irq.set(True)
            self._changed()

    @classmethod
    def from_state(cls, state: dict, now: Callable[[], float] = time.time, irq: IrqLine | None = None,
                   timer: bool = True) -> Cmos:
        """A chip in the state :meth:`state` recorded, with its host doors (see the constructor)."""
        cmos = cls(ram_below_4g=0, now=now, irq=irq, timer=timer)
        cmos.load_state(state)
        return cmos

    # ---- the two ports ------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        if offset != 1:
            return all_ones(size)
        with self._lock:
            now = self._now()
            self._advance(now)
            index = self._index
            if index in _TIME_REGS:
                value = self._time_register(index, now)
            elif index == REG_A:
                value = self._ram[REG_A] & ~A_UIP
                if not self._stopped() and (now + self._offset) % 1.0 >= 1.0 - UIP_TIME:
                    value |= A_UIP
            elif index == REG_C:
                value = self._flags | (C_IRQF if self._irqf() else 0)
                self._flags = 0
                self._drive_irq()
                self._changed()
            elif index == REG_D:
                value = D_VRT
            else:
                value = self._ram[index]
            return value

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == 0:
                self._index = value & ~NMI_DISABLE
                self.nmi_disabled = bool(value & NMI_DISABLE)
                return
            if offset != 1:
                return
            now = self._now()
            self._advance(now)
            index = self._index
            if index in (REG_C, REG_D):
                return
            if index in _TIME_REGS:
                self._write_time_register(index, value, now)
            elif index in (REG_A, REG_B):
                was_stopped, divider_ran = self._stopped(), self._divider_runs()
                if index == REG_A:
                    value = value & ~A_UIP
                elif value & B_SET:
                    value &= ~B_UIE         # SET clears UIE (datasheet, register B)
                self._ram[index] = value
                if not divider_ran and self._divider_runs():
                    # the divider chain leaves reset: its phase restarts, first update in 500 ms
                    self._offset = 1.0 - DIVIDER_RESET_DELAY - now
                if not was_stopped and self._stopped():
                    self._stop(now)
                elif was_stopped and not self._stopped():
                    self._resume(now)
            else:
                self._ram[index] = value
            self._drive_irq()
            self._changed()
