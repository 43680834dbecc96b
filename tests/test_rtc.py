"""The RTC as the MC146818 datasheet describes it, in the datasheet's order: the update cycle and
UIP, register B's SET, setting the time (kept as an offset from the host's), data modes, the
periodic, alarm and update-ended interrupts on IRQ 8, register C, register D. The host clock is
injected (a list the test moves by hand), so nothing here waits for real time except the last
test, which checks that the timer thread delivers an interrupt on its own."""

from __future__ import annotations

import calendar
import re
import threading

import pytest
from conftest import ROOT, needs_kvm, run_pykvm
from hypothesis import given
from hypothesis import strategies as st

from pykvm.devices.cmos import (
    B_24H,
    B_AIE,
    B_DM,
    B_PIE,
    B_SET,
    B_UIE,
    C_AF,
    C_IRQF,
    C_PF,
    C_UF,
    CENTURY,
    DAY_OF_MONTH,
    DAY_OF_WEEK,
    HOURS,
    HOURS_ALARM,
    MINUTES,
    MINUTES_ALARM,
    MONTH,
    REG_A,
    REG_B,
    REG_C,
    REG_D,
    SECONDS,
    SECONDS_ALARM,
    YEAR,
    Cmos,
    periodic_period,
)
from pykvm.kvm.irq import IrqLine

MiB = 1 << 20
# Sunday 17 March 2024, 21:05:09 UTC, and a quarter of a second
T0 = calendar.timegm((2024, 3, 17, 21, 5, 9, 0, 0, 0)) + 0.25


class Line(IrqLine):
    """IRQ 8 as the test sees it: its level and every change."""

    def __init__(self) -> None:
        self.level = False
        self.changes: list[bool] = []
        self.raised = threading.Event()

    def set(self, level: bool) -> None:
        self.level = level
        self.changes.append(level)
        if level:
            self.raised.set()


class Rtc:
    """A Cmos with a hand-moved clock and a recorded IRQ 8."""

    def __init__(self, start: float = T0) -> None:
        self.t = start
        self.irq = Line()
        self.cmos = Cmos(MiB, now=lambda: self.t, irq=self.irq, timer=False)

    def at(self, t: float) -> Rtc:
        self.t = t
        self.cmos.poll()
        return self

    def inb(self, index: int) -> int:
        self.cmos.write(0, 1, index)
        return self.cmos.read(1, 1)

    def outb(self, index: int, value: int) -> None:
        self.cmos.write(0, 1, index)
        self.cmos.write(1, 1, value)

    def clock(self) -> tuple[int, ...]:
        return tuple(self.inb(r) for r in (CENTURY, YEAR, MONTH, DAY_OF_MONTH, HOURS, MINUTES, SECONDS))


@pytest.fixture
def rtc() -> Rtc:
    return Rtc()


# ---- the update cycle ----------------------------------------------------------------------

def test_uip_is_set_for_the_last_244_us_before_each_update(rtc: Rtc) -> None:
    second = T0 - 0.25                           # 21:05:09.000
    assert not rtc.at(second + 0.5).inb(REG_A) & 0x80
    assert not rtc.at(second + 1 - 250e-6).inb(REG_A) & 0x80
    assert rtc.at(second + 1 - 240e-6).inb(REG_A) & 0x80
    assert rtc.inb(SECONDS) == 0x09              # the update has not happened yet
    assert rtc.at(second + 1 - 1e-6).inb(REG_A) & 0x80
    assert not rtc.at(second + 1 + 1e-6).inb(REG_A) & 0x80
    assert rtc.inb(SECONDS) == 0x10              # the update advanced the time


def test_a_guest_polling_uip_sees_it_rise_and_fall_once_a_second(rtc: Rtc) -> None:
    edges, previous = [], 0
    for step in range(40_000):                   # 2 s in 50 us polls
        uip = rtc.at(T0 + step * 50e-6).inb(REG_A) & 0x80
        if uip != previous:
            edges.append((step, bool(uip)))
        previous = uip
    assert [rising for _, rising in edges] == [True, False, True, False]


def test_the_time_advances_across_minute_hour_day_month_and_year() -> None:
    rtc = Rtc(calendar.timegm((1999, 12, 31, 23, 59, 58, 0, 0, 0)) + 0.5)
    assert rtc.clock() == (0x19, 0x99, 0x12, 0x31, 0x23, 0x59, 0x58)
    assert rtc.at(rtc.t + 2).clock() == (0x20, 0x00, 0x01, 0x01, 0x00, 0x00, 0x00)


# ---- register B: SET, and setting the time ------------------------------------------------

def test_set_stops_updates_and_clears_uip_and_uie(rtc: Rtc) -> None:
    rtc.outb(REG_B, B_24H | B_UIE)
    rtc.outb(REG_B, B_24H | B_UIE | B_SET)
    assert rtc.inb(REG_B) == B_24H | B_SET       # UIE cleared by SET
    rtc.at(T0 + 5.75 - 100e-6)                   # inside where the update window would be
    assert rtc.inb(SECONDS) == 0x09
    assert not rtc.inb(REG_A) & 0x80
    assert not rtc.inb(REG_C) & C_UF             # no update cycle, no update-ended flag


def test_clearing_set_resumes_from_the_held_time_at_the_dividers_phase(rtc: Rtc) -> None:
    rtc.outb(REG_B, B_24H | B_SET)
    rtc.at(T0 + 10)
    rtc.outb(REG_B, B_24H)
    assert rtc.inb(SECONDS) == 0x09              # ten seconds were not counted while held
    assert rtc.at(T0 + 10.7).inb(SECONDS) == 0x09
    assert rtc.at(T0 + 10.76).inb(SECONDS) == 0x10   # the divider's rollover, as before SET


def test_hwclock_systohc_reads_back_what_it_wrote_and_the_clock_runs_on(rtc: Rtc) -> None:
    # Linux's mc146818_set_time: SET, divider reset, the fields year first, then release both
    rtc.outb(REG_B, rtc.inb(REG_B) | B_SET)
    rtc.outb(REG_A, 0x70 | (rtc.inb(REG_A) & 0x0F))
    for index, value in ((YEAR, 0x31), (MONTH, 0x02), (DAY_OF_MONTH, 0x28), (HOURS, 0x23), (MINUTES, 0x59),
                         (SECONDS, 0x58), (CENTURY, 0x20)):
        rtc.outb(index, value)
    rtc.at(T0 + 3)                               # time passes while held: not counted
    rtc.outb(REG_B, B_24H)
    rtc.outb(REG_A, 0x26)
    assert rtc.clock() == (0x20, 0x31, 0x02, 0x28, 0x23, 0x59, 0x58)
    assert rtc.at(T0 + 3.49).clock()[-1] == 0x58    # first update 500 ms after the divider reset
    assert rtc.at(T0 + 3.51).clock()[-1] == 0x59
    assert rtc.at(T0 + 4.51).clock() == (0x20, 0x31, 0x03, 0x01, 0x00, 0x00, 0x00)   # 2031 is no leap year


def test_under_set_each_field_is_kept_as_written_whatever_the_order() -> None:
    rtc = Rtc(calendar.timegm((2024, 2, 10, 12, 0, 0, 0, 0, 0)))
    rtc.outb(REG_B, B_24H | B_SET)
    rtc.outb(DAY_OF_MONTH, 0x31)                 # "31 February" for a moment
    rtc.outb(MONTH, 0x03)
    rtc.outb(REG_B, B_24H)
    assert (rtc.inb(MONTH), rtc.inb(DAY_OF_MONTH)) == (0x03, 0x31)


def test_without_set_a_write_takes_effect_at_once_keeping_the_phase(rtc: Rtc) -> None:
    rtc.outb(HOURS, 0x07)
    assert rtc.clock()[4:] == (0x07, 0x05, 0x09)
    assert rtc.at(T0 + 0.76).clock()[4:] == (0x07, 0x05, 0x10)


def test_the_guests_time_is_an_offset_from_the_hosts(rtc: Rtc) -> None:
    rtc.outb(REG_B, B_24H | B_SET)
    rtc.outb(YEAR, 0x01)                         # one year earlier... than 2024: 2001
    rtc.outb(REG_B, B_24H)
    rtc.at(T0 + 3600)                            # an hour of host time later
    assert rtc.clock() == (0x20, 0x01, 0x03, 0x17, 0x22, 0x05, 0x09)


def test_day_of_week_is_a_counter_of_its_own(rtc: Rtc) -> None:
    assert rtc.inb(DAY_OF_WEEK) == 1             # Sunday
    rtc.outb(DAY_OF_WEEK, 4)
    assert rtc.inb(DAY_OF_WEEK) == 4
    rtc.at(T0 + 3 * 3600)                        # past midnight: the counter moves on with the date
    assert (rtc.inb(DAY_OF_MONTH), rtc.inb(DAY_OF_WEEK)) == (0x18, 5)


# ---- data modes ----------------------------------------------------------------------------

def test_binary_and_12_hour_writes_read_back_in_any_mode(rtc: Rtc) -> None:
    rtc.outb(REG_B, B_DM)                        # binary, 12-hour
    rtc.outb(HOURS, 0x80 | 12)                   # 12 PM: noon
    rtc.outb(MINUTES, 30)
    assert (rtc.inb(HOURS), rtc.inb(MINUTES)) == (0x80 | 12, 30)
    rtc.outb(REG_B, B_24H)                       # BCD, 24-hour: the same time
    assert (rtc.inb(HOURS), rtc.inb(MINUTES)) == (0x12, 0x30)
    rtc.outb(REG_B, 0)                           # BCD, 12-hour
    rtc.outb(HOURS, 0x12)                        # 12 AM: midnight
    rtc.outb(REG_B, B_24H | B_DM)
    assert rtc.inb(HOURS) == 0


def test_values_out_of_range_are_clamped(rtc: Rtc) -> None:
    rtc.outb(SECONDS, 0x99)
    rtc.outb(MINUTES, 0xFA)                      # not BCD at all
    rtc.outb(MONTH, 0x13)
    assert (rtc.inb(SECONDS), rtc.inb(MINUTES), rtc.inb(MONTH)) == (0x59, 0x59, 0x12)


# ---- the periodic interrupt ----------------------------------------------------------------

@pytest.mark.parametrize(("rs", "period"), [(0, None), (1, 3.90625e-3), (2, 7.8125e-3), (3, 122.0703125e-6),
                                            (6, 976.5625e-6), (15, 0.5)])
def test_periodic_rates_follow_the_datasheets_table(rs: int, period: float | None) -> None:
    assert periodic_period(rs) == period


def test_periodic_interrupt_raises_irq8_until_register_c_is_read(rtc: Rtc) -> None:
    rtc.outb(REG_A, 0x2F)                        # 2 Hz: ticks at .0 and .5
    rtc.outb(REG_B, B_24H | B_PIE)
    assert rtc.cmos.next_event() == pytest.approx(T0 + 0.25)
    assert not rtc.at(T0 + 0.2).irq.level
    assert rtc.at(T0 + 0.3).irq.level
    assert rtc.cmos.next_event() is None         # high until the guest reads register C
    assert rtc.inb(REG_C) == C_IRQF | C_PF
    assert not rtc.irq.level
    assert rtc.inb(REG_C) == 0                   # cleared by the read
    assert rtc.at(T0 + 0.8).irq.level and rtc.irq.changes == [True, False, True]


def test_flags_are_set_without_their_enable_but_raise_nothing(rtc: Rtc) -> None:
    rtc.outb(REG_A, 0x2F)
    rtc.at(T0 + 1.0)
    assert rtc.inb(REG_C) == C_PF | C_UF
    assert rtc.irq.changes == []
    assert rtc.cmos.next_event() is None


def test_enabling_an_interrupt_whose_flag_is_set_raises_it_at_once(rtc: Rtc) -> None:
    rtc.outb(REG_A, 0x2F)
    rtc.at(T0 + 0.3)
    rtc.outb(REG_B, B_24H | B_PIE)
    assert rtc.irq.level


# ---- the alarm -----------------------------------------------------------------------------

def test_alarm_two_seconds_out_fires_at_that_update(rtc: Rtc) -> None:
    rtc.outb(REG_A, 0x20)                        # no periodic ticks (PF would be set too)
    rtc.outb(HOURS_ALARM, 0x21)
    rtc.outb(MINUTES_ALARM, 0x05)
    rtc.outb(SECONDS_ALARM, 0x11)
    rtc.outb(REG_B, B_24H | B_AIE)
    assert rtc.cmos.next_event() == pytest.approx(T0 - 0.25 + 2)
    assert not rtc.at(T0 + 1).irq.level
    assert rtc.inb(REG_C) == C_UF                # an update, not yet the alarm
    assert rtc.at(T0 + 1.8).irq.level
    assert rtc.inb(REG_C) == C_IRQF | C_AF | C_UF
    assert not rtc.at(T0 + 30).irq.level         # the next match is a day later


@pytest.mark.parametrize(("alarm", "expected"), [
    ((0xFF, 0xFF, 0xFF), (21, 5, 10)),           # all "don't care": every second
    ((0xC0, 0xC0, 0x30), (21, 5, 30)),           # every minute at :30
    ((0xC3, 0x00, 0x00), (22, 0, 0)),            # every hour on the hour
    ((0x21, 0x04, 0xC0), (21, 4, 0)),            # 21:04 has passed: tomorrow
])
def test_alarm_dont_care_values_match_anything(rtc: Rtc, alarm, expected) -> None:
    for index, value in zip((HOURS_ALARM, MINUTES_ALARM, SECONDS_ALARM), alarm, strict=True):
        rtc.outb(index, value)
    due = rtc.cmos.next_alarm(int(T0))
    day = 86400 if expected < (21, 5, 9) else 0
    assert due == int(T0) - (21 * 3600 + 5 * 60 + 9) + day + expected[0] * 3600 + expected[1] * 60 + expected[2]


def test_an_alarm_that_encodes_no_time_never_fires(rtc: Rtc) -> None:
    rtc.outb(SECONDS_ALARM, 0x75)                # 75 seconds
    rtc.outb(REG_B, B_24H | B_AIE)
    assert rtc.cmos.next_alarm(int(T0)) is None
    rtc.at(T0 + 2 * 86400)
    assert not rtc.inb(REG_C) & C_AF


def test_alarm_in_12_hour_binary_mode() -> None:
    rtc = Rtc(calendar.timegm((2024, 3, 17, 13, 0, 0, 0, 0, 0)) + 0.5)
    rtc.outb(REG_B, B_DM | B_AIE)                # binary, 12-hour
    for index, value in ((HOURS_ALARM, 0x80 | 1), (MINUTES_ALARM, 0), (SECONDS_ALARM, 1)):
        rtc.outb(index, value)                   # 1:00:01 PM
    assert rtc.at(rtc.t + 1).irq.level


# ---- the update-ended interrupt ------------------------------------------------------------

def test_update_ended_interrupt_once_a_second(rtc: Rtc) -> None:
    rtc.outb(REG_A, 0x20)
    rtc.outb(REG_B, B_24H | B_UIE)
    assert rtc.cmos.next_event() == pytest.approx(T0 + 0.75)
    for second in range(1, 4):
        assert rtc.at(T0 + second).irq.level
        assert rtc.inb(REG_C) == C_IRQF | C_UF
        assert not rtc.irq.level


def test_a_held_divider_stops_updates_and_periodic_ticks(rtc: Rtc) -> None:
    rtc.outb(REG_A, 0x60 | 0x0F)                 # DV = 110: divider reset
    rtc.outb(REG_B, B_24H | B_PIE | B_UIE)
    assert rtc.cmos.next_event() is None
    rtc.at(T0 + 5)
    assert rtc.inb(REG_C) == 0 and rtc.inb(SECONDS) == 0x09


# ---- register D, and anything a guest may do -----------------------------------------------

def test_register_d_reports_valid_ram_and_time_and_is_read_only(rtc: Rtc) -> None:
    rtc.outb(REG_D, 0)
    assert rtc.inb(REG_D) == 0x80


@given(st.lists(st.tuples(st.integers(0, 0x7F), st.integers(0, 0xFF), st.floats(0, 3)), max_size=40))
def test_any_register_traffic_keeps_irq8_equal_to_irqf(ops) -> None:
    rtc = Rtc()
    for index, value, dt in ops:
        rtc.outb(index, value)
        rtc.at(rtc.t + dt)
        level = rtc.irq.level
        c = rtc.inb(REG_C)
        assert level == bool(c & C_IRQF)
        assert not rtc.irq.level
        assert 0 <= rtc.inb(index) <= 0xFF


def test_the_timer_delivers_an_interrupt_while_the_guest_does_nothing() -> None:
    line = Line()
    cmos = Cmos(MiB, irq=line)                   # the host's clock and the timer thread
    try:
        cmos.write(0, 1, REG_B)
        cmos.write(1, 1, B_24H | B_UIE)
        assert line.raised.wait(timeout=10), "no update-ended interrupt within 10 s"
    finally:
        cmos.close()
    assert not [t for t in threading.enumerate() if t.name == "rtc-timer"]


# ---- a bare-metal guest on the in-kernel irqchip -------------------------------------------

@needs_kvm
def test_a_guest_sees_uip_edges_and_takes_irq8_for_its_alarm():
    """guests/rtc.elf: UIP rises and falls, the alarm programmed two seconds out arrives as IRQ 8
    (IOAPIC pin 8 -> local APIC) at exactly the programmed time."""
    proc = run_pykvm("run", "--kernel", str(ROOT / "guests" / "rtc.elf"), "--timeout", "60", timeout=90)
    out = proc.stdout.decode()
    assert proc.returncode == 33, out + proc.stderr.decode()
    assert re.search(r"^rtc: uip rose after \d+ polls and fell after \d+$", out, re.M), out
    programmed = re.search(r"^rtc: time (\S+), alarm set for (\S+)$", out, re.M)
    fired = re.search(r"^rtc: irq 8: alarm, (\S+)$", out, re.M)
    assert programmed and fired and fired[1] == programmed[2], out
    start, alarm = (_seconds(t) for t in programmed.groups())
    assert (alarm - start) % 86400 == 2
    assert out.endswith("rtc: alarm ok\n")


def _seconds(hhmmss: str) -> int:
    h, m, s = (int(x) for x in hhmmss.split(":"))
    return h * 3600 + m * 60 + s
