"""The Bochs/QEMU shutdown port: "Shutdown", one byte at a time, to port 0x8900."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.devices.poweroff import MAGIC, PORT, PowerOff


class Recorder:
    def __init__(self) -> None:
        self.poweroffs = 0
        self.dev = PowerOff(on_poweroff=self.fire)

    def fire(self) -> None:
        self.poweroffs += 1

    def outsb(self, data: bytes) -> None:
        for b in data:
            self.dev.write(0, 1, b)


@pytest.fixture
def port() -> Recorder:
    return Recorder()


def test_port_and_word() -> None:
    assert PORT == 0x8900
    assert MAGIC == b"Shutdown"


def test_the_whole_word_powers_off(port: Recorder) -> None:
    port.outsb(b"Shutdow")
    assert port.poweroffs == 0
    port.outsb(b"n")
    assert port.poweroffs == 1


def test_a_wrong_byte_restarts_the_match(port: Recorder) -> None:
    port.outsb(b"Shutxdown")
    assert port.poweroffs == 0
    port.outsb(b"Shutdown")
    assert port.poweroffs == 1


def test_an_s_inside_a_broken_match_starts_a_new_one(port: Recorder) -> None:
    port.outsb(b"ShutSShutdown")
    assert port.poweroffs == 1


def test_the_s_that_breaks_a_match_is_itself_a_new_start(port: Recorder) -> None:
    port.outsb(b"ShutShutdown")       # the second S both breaks "Shut..." and begins "Shutdown"
    assert port.poweroffs == 1


def test_case_matters(port: Recorder) -> None:
    port.outsb(b"shutdown")
    port.outsb(b"SHUTDOWN")
    assert port.poweroffs == 0


def test_repeated_words_power_off_each_time(port: Recorder) -> None:
    port.outsb(b"ShutdownShutdown")
    assert port.poweroffs == 2


def test_wider_writes_count_their_low_byte(port: Recorder) -> None:
    for b in MAGIC:
        port.dev.write(0, 2, 0x1200 | b)
    assert port.poweroffs == 1


def test_reads_are_all_ones(port: Recorder) -> None:
    assert port.dev.read(0, 1) == 0xFF
    assert port.dev.read(0, 2) == 0xFFFF


@given(st.binary(max_size=64))
def test_powers_off_exactly_once_per_occurrence(data: bytes) -> None:
    port = Recorder()
    port.outsb(data)
    # "Shutdown" cannot overlap itself, so occurrences are counted without overlap
    assert port.poweroffs == data.count(MAGIC)


@given(st.binary(max_size=32), st.binary(max_size=32))
def test_the_word_after_any_prefix_powers_off(prefix: bytes, suffix: bytes) -> None:
    port = Recorder()
    port.outsb(prefix + MAGIC + suffix)
    assert port.poweroffs >= 1
