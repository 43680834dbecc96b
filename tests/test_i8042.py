"""The 8042 keyboard controller with nothing attached, tested as the 8042 documentation and
Linux's i8042 probe use it: commands to 0x64, results polled via status bit 0 and read from 0x60.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.devices.bus import Bus
from pykvm.devices.i8042 import (
    COMMAND_PORT,
    CTR_AUXDIS,
    CTR_DEFAULT,
    CTR_KBDDIS,
    CTR_SYS,
    DATA_PORT,
    I8042,
    STATUS_A2,
    STATUS_IBF,
    STATUS_INH,
    STATUS_OBF,
    STATUS_SYS,
)


class Kbc:
    """A controller on a port bus, with its resets counted."""

    def __init__(self) -> None:
        self.resets = 0
        self.dev = I8042(on_reset=self._reset)
        self.bus = Bus("pio")
        self.bus.attach(self.dev.data, DATA_PORT, 1)
        self.bus.attach(self.dev.command, COMMAND_PORT, 1)

    def _reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        return self.bus.read(COMMAND_PORT, 1)

    def command(self, cmd: int) -> None:
        self.bus.write(COMMAND_PORT, 1, cmd)

    def write_data(self, value: int) -> None:
        self.bus.write(DATA_PORT, 1, value)

    def read_data(self) -> int:
        return self.bus.read(DATA_PORT, 1)

    def result(self, cmd: int) -> int | None:
        """Issue ``cmd`` and poll for its one-byte result, as i8042_command() does."""
        self.command(cmd)
        if not self.status() & STATUS_OBF:
            return None
        return self.read_data()


@pytest.fixture
def kbc() -> Kbc:
    return Kbc()


# ---- status ---------------------------------------------------------------------------------

def test_idle_status_after_post(kbc: Kbc) -> None:
    status = kbc.status()
    assert status == STATUS_SYS | STATUS_INH == 0x14
    assert not status & (STATUS_OBF | STATUS_IBF)


def test_input_buffer_is_never_full(kbc: Kbc) -> None:
    for cmd in (0x20, 0x60, 0xAA, 0xAD, 0xD1):
        kbc.command(cmd)
        assert not kbc.status() & STATUS_IBF


def test_a2_tells_which_port_was_written_last(kbc: Kbc) -> None:
    kbc.command(0xAE)
    assert kbc.status() & STATUS_A2
    kbc.write_data(0xF4)
    assert not kbc.status() & STATUS_A2


def test_port_0x61_is_left_for_port_b(kbc: Kbc) -> None:
    assert kbc.bus.find(0x61) is None


# ---- command results ------------------------------------------------------------------------

def test_self_test_answers_0x55(kbc: Kbc) -> None:
    assert kbc.result(0xAA) == 0x55
    assert not kbc.status() & STATUS_OBF      # reading the result empties the buffer


def test_self_test_sets_the_system_flag(kbc: Kbc) -> None:
    kbc.command(0x60)
    kbc.write_data(CTR_DEFAULT & ~CTR_SYS)
    assert not kbc.status() & STATUS_SYS
    kbc.result(0xAA)
    assert kbc.status() & STATUS_SYS


def test_read_command_byte(kbc: Kbc) -> None:
    kbc.command(0x20)
    assert kbc.status() & STATUS_OBF
    assert kbc.read_data() == CTR_DEFAULT
    assert not kbc.status() & STATUS_OBF


def test_write_command_byte_takes_the_next_data_write(kbc: Kbc) -> None:
    kbc.command(0x60)
    kbc.write_data(0x47)
    assert kbc.result(0x20) == 0x47
    assert kbc.dev.command_byte == 0x47


def test_system_flag_in_status_mirrors_the_command_byte(kbc: Kbc) -> None:
    kbc.command(0x60)
    kbc.write_data(0x00)
    assert not kbc.status() & STATUS_SYS
    kbc.command(0x60)
    kbc.write_data(CTR_SYS)
    assert kbc.status() & STATUS_SYS


def test_internal_ram_bytes_1_to_31(kbc: Kbc) -> None:
    kbc.command(0x60 + 5)
    kbc.write_data(0xA5)
    assert kbc.result(0x20 + 5) == 0xA5
    assert kbc.result(0x20) == CTR_DEFAULT


@pytest.mark.parametrize(("cmd", "bit", "set_"), [(0xAD, CTR_KBDDIS, True), (0xAE, CTR_KBDDIS, False),
                                                   (0xA7, CTR_AUXDIS, True), (0xA8, CTR_AUXDIS, False)])
def test_enable_and_disable_commands_are_accepted_and_show_in_the_command_byte(
        kbc: Kbc, cmd: int, bit: int, set_: bool) -> None:
    kbc.command(0x60)
    kbc.write_data(0 if set_ else bit)
    assert kbc.result(cmd) is None            # no result byte
    assert bool(kbc.result(0x20) & bit) == set_


@pytest.mark.parametrize("cmd", [0xA9, 0xAB])
def test_interface_tests_report_nothing_connected(kbc: Kbc, cmd: int) -> None:
    assert kbc.result(cmd) == 0x02            # clock line stuck high


def test_unknown_commands_give_no_result(kbc: Kbc) -> None:
    assert kbc.result(0xD3) is None           # AUX loopback: a PS/2-only command
    kbc.write_data(0x5A)                      # its parameter goes nowhere
    assert not kbc.status() & STATUS_OBF


def test_data_written_without_a_command_goes_to_the_absent_keyboard(kbc: Kbc) -> None:
    kbc.write_data(0xFF)                      # keyboard reset
    assert not kbc.status() & STATUS_OBF
    assert kbc.dev.command_byte == CTR_DEFAULT


def test_empty_output_buffer_reads_the_last_byte(kbc: Kbc) -> None:
    assert kbc.read_data() == 0x00            # nothing ever in it
    kbc.result(0xAA)
    assert kbc.read_data() == 0x55            # the latch keeps the last byte
    assert not kbc.status() & STATUS_OBF


def test_a_new_command_drops_a_pending_parameter(kbc: Kbc) -> None:
    kbc.command(0x60)
    kbc.command(0xAE)
    kbc.write_data(0x00)                      # a keyboard byte now, not the command byte
    assert kbc.dev.command_byte == CTR_DEFAULT


# ---- the reset line -------------------------------------------------------------------------

def test_0xfe_pulses_reset(kbc: Kbc) -> None:
    kbc.command(0xFE)
    assert kbc.resets == 1


@pytest.mark.parametrize("cmd", range(0xF0, 0x100))
def test_pulse_commands_reset_when_bit_0_is_pulsed(kbc: Kbc, cmd: int) -> None:
    kbc.command(cmd)
    assert kbc.resets == (0 if cmd & 1 else 1)


def test_writing_output_port_bit_0_low_resets(kbc: Kbc) -> None:
    kbc.command(0xD1)
    assert kbc.resets == 0                    # waits for the data byte
    kbc.write_data(0xDE)                      # A20 on, reset line low
    assert kbc.resets == 1
    assert kbc.dev.a20


def test_writing_output_port_with_reset_high_only_sets_a20(kbc: Kbc) -> None:
    kbc.command(0xD1)
    kbc.write_data(0xDD)                      # A20 off, reset line high
    assert kbc.resets == 0
    assert not kbc.dev.a20
    assert kbc.result(0xD0) == 0xDD


def test_output_port_reads_back_with_reset_released_after_a_reset(kbc: Kbc) -> None:
    assert kbc.result(0xD0) & 0x03 == 0x03    # reset line high, A20 enabled
    kbc.command(0xD1)
    kbc.write_data(0x02)
    assert kbc.result(0xD0) == 0x03


def test_on_reset_may_call_back_into_the_controller() -> None:
    seen: list[int] = []
    dev = I8042(on_reset=lambda: seen.append(dev.read_status()))
    dev.write_command(0xFE)
    assert seen == [0x14 | STATUS_A2]


# ---- Linux's probe, in order ----------------------------------------------------------------

def test_linux_i8042_probe_sequence(kbc: Kbc) -> None:
    # i8042_flush(): drain the output buffer
    for _ in range(16):
        if not kbc.status() & STATUS_OBF:
            break
        kbc.read_data()
    else:
        pytest.fail("output buffer never empties")
    # i8042_controller_selftest()
    assert kbc.result(0xAA) == 0x55
    # i8042_controller_init(): keylock open, two equal CTR reads, write it back
    assert kbc.status() & STATUS_INH
    ctr = kbc.result(0x20)
    assert kbc.result(0x20) == ctr
    ctr = (ctr | CTR_KBDDIS) & ~0x01
    kbc.command(0x60)
    kbc.write_data(ctr)
    assert kbc.result(0x20) == ctr
    # i8042_check_aux(): the loopback test finds no echo, the interface test an error
    assert kbc.result(0xD3) is None
    kbc.write_data(0x5A)
    assert kbc.result(0xA9) == 0x02
    assert kbc.resets == 0


# ---- random use -----------------------------------------------------------------------------

@given(st.lists(st.tuples(st.booleans(), st.booleans(), st.integers(0, 0xFF)), max_size=80))
def test_random_traffic_keeps_status_consistent(ops) -> None:
    kbc = Kbc()
    for is_command, is_write, value in ops:
        port = COMMAND_PORT if is_command else DATA_PORT
        if is_write:
            kbc.bus.write(port, 1, value)
        else:
            assert 0 <= kbc.bus.read(port, 1) <= 0xFF
        status = kbc.status()
        assert status & STATUS_INH
        assert not status & (STATUS_IBF | 0xE0)
        assert bool(status & STATUS_SYS) == bool(kbc.dev.command_byte & CTR_SYS)
        if is_write:
            assert bool(status & STATUS_A2) == is_command
