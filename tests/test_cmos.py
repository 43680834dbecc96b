"""CMOS RAM and RTC, tested register by register against the MC146818 datasheet and the PC's
CMOS memory-size conventions. The clock is fixed: Sunday 17 March 2024, 21:05:09 UTC.
"""

from __future__ import annotations

import calendar
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.devices.cmos import (
    B_24H,
    B_DM,
    BASE,
    CENTURY,
    DAY_OF_MONTH,
    DAY_OF_WEEK,
    HOURS,
    LENGTH,
    MINUTES,
    MONTH,
    REG_A,
    REG_B,
    REG_C,
    REG_D,
    SECONDS,
    YEAR,
    Cmos,
    to_bcd,
)

MiB = 1 << 20
GiB = 1 << 30
INDEX, DATA = 0, 1

SUNDAY_EVENING = time.gmtime(calendar.timegm((2024, 3, 17, 21, 5, 9, 0, 0, 0)))


def fixed(t: time.struct_time):
    """A host clock stopped at ``t`` (a quarter second into that second)."""
    return lambda: calendar.timegm(t) + 0.25


def inb(cmos: Cmos, index: int) -> int:
    cmos.write(INDEX, 1, index)
    return cmos.read(DATA, 1)


def outb(cmos: Cmos, index: int, value: int) -> None:
    cmos.write(INDEX, 1, index)
    cmos.write(DATA, 1, value)


def word(cmos: Cmos, index: int, width: int = 2) -> int:
    return int.from_bytes(bytes(inb(cmos, index + i) for i in range(width)), "little")


@pytest.fixture
def cmos() -> Cmos:
    return Cmos(128 * MiB, now=fixed(SUNDAY_EVENING))


def test_ports() -> None:
    assert (BASE, LENGTH) == (0x70, 2)


# ---- time and date --------------------------------------------------------------------------

def test_default_mode_is_bcd_24_hour(cmos: Cmos) -> None:
    assert inb(cmos, REG_B) == 0x02
    assert inb(cmos, SECONDS) == 0x09
    assert inb(cmos, MINUTES) == 0x05
    assert inb(cmos, HOURS) == 0x21
    assert inb(cmos, DAY_OF_WEEK) == 1        # Sunday
    assert inb(cmos, DAY_OF_MONTH) == 0x17
    assert inb(cmos, MONTH) == 0x03
    assert inb(cmos, YEAR) == 0x24
    assert inb(cmos, CENTURY) == 0x20


def test_binary_mode(cmos: Cmos) -> None:
    outb(cmos, REG_B, B_24H | B_DM)
    assert [inb(cmos, r) for r in (SECONDS, MINUTES, HOURS, DAY_OF_MONTH, MONTH, YEAR, CENTURY)] == \
        [9, 5, 21, 17, 3, 24, 20]


def test_12_hour_mode_marks_pm_in_bit_7(cmos: Cmos) -> None:
    outb(cmos, REG_B, 0)                      # BCD, 12-hour
    assert inb(cmos, HOURS) == 0x80 | 0x09    # 9 PM
    outb(cmos, REG_B, B_DM)                   # binary, 12-hour
    assert inb(cmos, HOURS) == 0x80 | 9


@pytest.mark.parametrize(("hour", "bcd12"), [(0, 0x12), (1, 0x01), (11, 0x11), (12, 0x92), (13, 0x81), (23, 0x91)])
def test_12_hour_mode_midnight_and_noon(hour: int, bcd12: int) -> None:
    t = time.gmtime(calendar.timegm((2024, 1, 1, hour, 0, 0, 0, 0, 0)))
    cmos = Cmos(MiB, now=fixed(t))
    outb(cmos, REG_B, 0)
    assert inb(cmos, HOURS) == bcd12


@pytest.mark.parametrize(("date", "rtc_wday"), [((2024, 3, 17), 1), ((2024, 3, 18), 2), ((2024, 3, 23), 7)])
def test_day_of_week_counts_from_sunday_as_1(date: tuple[int, int, int], rtc_wday: int) -> None:
    cmos = Cmos(MiB, now=fixed(time.gmtime(calendar.timegm((*date, 12, 0, 0, 0, 0, 0)))))
    assert inb(cmos, DAY_OF_WEEK) == rtc_wday


def test_the_clock_is_read_at_each_access() -> None:
    now = [calendar.timegm(SUNDAY_EVENING) + 0.5]
    cmos = Cmos(MiB, now=lambda: now[0])
    assert inb(cmos, SECONDS) == 0x09
    now[0] += 50
    assert inb(cmos, SECONDS) == 0x59


def test_writes_to_time_registers_set_the_guests_clock(cmos: Cmos) -> None:
    outb(cmos, MINUTES, 0x42)
    assert inb(cmos, MINUTES) == 0x42
    assert inb(cmos, HOURS) == 0x21


def test_default_clock_is_the_hosts_utc() -> None:
    before = time.gmtime()
    cmos = Cmos(MiB)
    outb(cmos, REG_B, B_24H | B_DM)
    assert inb(cmos, YEAR) in (before.tm_year % 100, (before.tm_year + 1) % 100)


@given(st.integers(0, 2**32 - 1), st.booleans())
def test_any_instant_reads_back_as_valid_fields(epoch: int, binary: bool) -> None:
    t = time.gmtime(epoch)
    cmos = Cmos(MiB, now=fixed(t))
    outb(cmos, REG_B, B_24H | (B_DM if binary else 0))
    enc = (lambda n: n) if binary else to_bcd
    assert inb(cmos, SECONDS) == enc(min(t.tm_sec, 59))
    assert inb(cmos, HOURS) == enc(t.tm_hour)
    assert inb(cmos, MONTH) == enc(t.tm_mon)
    assert 1 <= inb(cmos, DAY_OF_WEEK) <= 7
    assert inb(cmos, CENTURY) == enc(t.tm_year // 100)


# ---- status registers -----------------------------------------------------------------------

def test_register_a_stores_rate_and_divider_but_not_uip(cmos: Cmos) -> None:
    assert inb(cmos, REG_A) == 0x26           # a quarter second into the second: no update near
    outb(cmos, REG_A, 0xFF)
    assert inb(cmos, REG_A) == 0x7F           # rate and divider stored, UIP is read-only


def test_register_b_is_writable(cmos: Cmos) -> None:
    outb(cmos, REG_B, 0x46)
    assert inb(cmos, REG_B) == 0x46


def test_register_c_reads_zero_while_no_time_passes_and_d_reports_valid_ram_and_time(cmos: Cmos) -> None:
    outb(cmos, REG_C, 0xFF)
    outb(cmos, REG_D, 0x00)
    assert inb(cmos, REG_C) == 0
    assert inb(cmos, REG_D) == 0x80


# ---- the index port -------------------------------------------------------------------------

def test_nmi_disable_bit_is_not_part_of_the_index(cmos: Cmos) -> None:
    assert inb(cmos, 0x80 | REG_D) == 0x80
    assert cmos.nmi_disabled
    assert inb(cmos, SECONDS) == 0x09
    assert not cmos.nmi_disabled


def test_index_port_reads_all_ones(cmos: Cmos) -> None:
    assert cmos.read(INDEX, 1) == 0xFF


def test_wider_accesses_act_on_the_low_byte(cmos: Cmos) -> None:
    cmos.write(INDEX, 2, 0xAB00 | 0x40)
    cmos.write(DATA, 4, 0x12345678)
    assert inb(cmos, 0x40) == 0x78
    cmos.write(INDEX, 1, 0x40)
    assert cmos.read(DATA, 2) == 0x78


# ---- CMOS RAM -------------------------------------------------------------------------------

def test_ram_is_plain_storage(cmos: Cmos) -> None:
    for index in (0x01, 0x0E, 0x3F, 0x7F):
        outb(cmos, index, index ^ 0x5A)
    for index in (0x01, 0x0E, 0x3F, 0x7F):
        assert inb(cmos, index) == index ^ 0x5A


def test_no_floppy_drives(cmos: Cmos) -> None:
    assert inb(cmos, 0x10) == 0


def test_memory_size_registers_for_32_mib() -> None:
    cmos = Cmos(32 * MiB)
    assert word(cmos, 0x15) == 640
    assert word(cmos, 0x17) == 31 * 1024           # KiB above 1 MiB
    assert word(cmos, 0x30) == 31 * 1024
    assert word(cmos, 0x34) == (32 - 16) * 16      # 64 KiB units above 16 MiB
    assert word(cmos, 0x5B, 3) == 0


def test_extended_memory_in_kib_is_capped_at_0xffff() -> None:
    cmos = Cmos(128 * MiB)                         # 127 MiB above 1 MiB does not fit in 16 bits
    assert word(cmos, 0x17) == 0xFFFF
    assert word(cmos, 0x30) == 0xFFFF
    assert word(cmos, 0x34) == (128 - 16) * 16


def test_memory_above_4g_in_64_kib_units() -> None:
    cmos = Cmos(3 * GiB, ram_above_4g=5 * GiB)
    assert word(cmos, 0x34) == (3 * GiB - 16 * MiB) // (64 * 1024)
    assert word(cmos, 0x5B, 3) == 5 * GiB // (64 * 1024)


def test_tiny_guests_report_what_they_have() -> None:
    cmos = Cmos(512 * 1024)
    assert word(cmos, 0x15) == 512
    assert word(cmos, 0x17) == 0
    assert word(cmos, 0x34) == 0


@given(st.integers(0, 4 * GiB), st.integers(0, 1 << 40))
def test_memory_registers_follow_the_formulas(below: int, above: int) -> None:
    cmos = Cmos(below, above)
    assert word(cmos, 0x15) == min(below // 1024, 640)
    assert word(cmos, 0x17) == word(cmos, 0x30) == min(max(below - MiB, 0) // 1024, 0xFFFF)
    assert word(cmos, 0x34) == min(max(below - 16 * MiB, 0) // 65536, 0xFFFF)
    assert word(cmos, 0x5B, 3) == (above // 65536) & 0xFFFFFF


@given(st.lists(st.tuples(st.integers(0, 1), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFF_FFFF)), max_size=50))
def test_random_port_traffic_never_raises_and_reads_are_bytes(ops) -> None:
    cmos = Cmos(64 * MiB, now=fixed(SUNDAY_EVENING))
    for offset, size, value in ops:
        cmos.write(offset, size, value)
        assert 0 <= cmos.read(DATA, 1) <= 0xFF
        assert 0 <= cmos.read(INDEX, 1) <= 0xFF
