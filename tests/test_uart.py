"""Register-level tests of the 16550A model, written against the PC16550D datasheet.

The first part reads like the datasheet, one behaviour per test; then the exact register
sequences Linux's 8250 driver runs (autoconfig and start-up, transcribed from
drivers/tty/serial/8250/8250_port.c); last, a hypothesis state machine drives random register
accesses and host input against an independent model of what the datasheet says.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pykvm.devices.bus import IrqLine
from pykvm.devices.uart import (
    DEFAULT_DIVISOR,
    FIFO_DEPTH,
    Fcr,
    Ier,
    Iir,
    Lcr,
    Lsr,
    Mcr,
    Msr,
    Reg,
    Uart16550,
)

RBR = THR = DLL = Reg.RBR_THR
IER = DLM = Reg.IER
IIR = FCR = Reg.IIR_FCR
LCR, MCR, LSR, MSR, SCR = Reg.LCR, Reg.MCR, Reg.LSR, Reg.MSR, Reg.SCR


class RecordingIrq(IrqLine):
    """Remembers every level driven onto the line."""

    def __init__(self) -> None:
        self.levels: list[bool] = []

    def set(self, level: bool) -> None:
        self.levels.append(bool(level))

    @property
    def level(self) -> bool:
        return self.levels[-1] if self.levels else False


class Port:
    """A UART with its line and output recorded, accessed like `inb`/`outb` on the port."""

    def __init__(self) -> None:
        self.irq = RecordingIrq()
        self.sent: list[bytes] = []
        self.uart = Uart16550(irq=self.irq, out=self.sent.append)

    def inb(self, reg: int) -> int:
        return self.uart.read(reg, 1)

    def outb(self, reg: int, value: int) -> None:
        self.uart.write(reg, 1, value)

    @property
    def output(self) -> bytes:
        return b"".join(self.sent)

    def drain(self) -> bytes:
        """Read RBR while LSR.DR says there is data (bounded, so a broken model cannot hang us)."""
        got = bytearray()
        for _ in range(64):
            if not self.inb(LSR) & Lsr.DR:
                break
            got.append(self.inb(RBR))
        return bytes(got)


@pytest.fixture
def port() -> Port:
    return Port()


# ---- registers at power-on, DLAB, scratch ---------------------------------------------------


def test_power_on_values(port: Port) -> None:
    assert port.inb(IER) == 0
    assert port.inb(IIR) == Iir.NO_INT
    assert port.inb(LCR) == 0
    assert port.inb(MCR) == 0
    assert port.inb(LSR) == Lsr.THRE | Lsr.TEMT == 0x60
    assert port.inb(MSR) == Msr.CTS | Msr.DSR | Msr.DCD == 0xB0
    assert port.irq.levels == []


def test_dlab_turns_offsets_0_and_1_into_the_divisor_latch(port: Port) -> None:
    port.outb(IER, Ier.RDI)
    port.outb(LCR, Lcr.DLAB | Lcr.WLEN8)
    assert (port.inb(DLM) << 8 | port.inb(DLL)) == DEFAULT_DIVISOR
    port.outb(DLL, 0x01)  # 115200 baud
    port.outb(DLM, 0x02)
    assert port.sent == []  # a DLL write is not a transmitted byte
    assert (port.inb(DLL), port.inb(DLM)) == (0x01, 0x02)

    port.outb(LCR, Lcr.WLEN8)
    assert port.inb(IER) == Ier.RDI  # IER was untouched by the DLM write
    port.outb(THR, ord("A"))
    assert port.output == b"A"
    port.outb(LCR, Lcr.DLAB)
    assert (port.inb(DLL), port.inb(DLM)) == (0x01, 0x02)


def test_dlab_leaves_the_other_registers_in_place(port: Port) -> None:
    port.outb(LCR, Lcr.DLAB)
    port.outb(SCR, 0x5A)
    assert port.inb(IIR) == Iir.NO_INT
    assert port.inb(LSR) == 0x60
    assert port.inb(SCR) == 0x5A
    assert port.inb(LCR) == Lcr.DLAB


@pytest.mark.parametrize("value", [0x00, 0xA5, 0x5A, 0xFF])
def test_scratch_register_round_trip(port: Port, value: int) -> None:
    port.outb(SCR, value)
    assert port.inb(SCR) == value


def test_ier_keeps_bits_0_to_3_and_mcr_bits_0_to_4(port: Port) -> None:
    port.outb(IER, 0xFF)
    assert port.inb(IER) == 0x0F
    port.outb(MCR, 0xFF)
    assert port.inb(MCR) == 0x1F
    port.outb(LCR, 0xFF)
    assert port.inb(LCR) == 0xFF


# ---- receiver, LSR, FIFO ------------------------------------------------------------------


def test_lsr_without_and_with_data(port: Port) -> None:
    assert port.inb(LSR) == 0x60
    assert port.uart.feed(b"x") == 1
    assert port.inb(LSR) == 0x61
    assert port.inb(RBR) == ord("x")
    assert port.inb(LSR) == 0x60


def test_received_bytes_come_out_of_rbr_in_order(port: Port) -> None:
    port.outb(FCR, Fcr.ENABLE)
    assert port.uart.feed(b"hello") == 5
    assert port.drain() == b"hello"


def test_empty_rbr_reads_zero(port: Port) -> None:
    assert port.inb(RBR) == 0


def test_16450_mode_holds_one_byte(port: Port) -> None:
    assert port.uart.rx_space() == 1
    assert port.uart.feed(b"ab") == 1
    assert port.uart.feed(b"b") == 0
    assert not port.uart.can_accept()
    assert port.inb(RBR) == ord("a")
    assert port.uart.feed(b"b") == 1


def test_feed_back_pressure_when_the_fifo_is_full(port: Port) -> None:
    port.outb(FCR, Fcr.ENABLE)
    data = bytes(range(20))
    assert port.uart.rx_space() == FIFO_DEPTH == 16
    assert port.uart.feed(data) == 16
    assert port.uart.rx_space() == 0
    assert port.uart.feed(data[16:]) == 0
    assert port.inb(RBR) == 0
    assert port.uart.feed(data[16:]) == 1
    assert port.inb(LSR) & Lsr.OE == 0  # back-pressure, never an overrun
    rest = bytes(port.inb(RBR) for _ in range(16))
    assert rest == data[1:17]


def test_fcr_clear_rx_empties_the_fifo(port: Port) -> None:
    port.outb(FCR, Fcr.ENABLE)
    port.uart.feed(b"abc")
    port.outb(FCR, Fcr.ENABLE | Fcr.CLEAR_TX)
    assert port.inb(LSR) & Lsr.DR  # clearing the transmit FIFO leaves received data alone
    port.outb(FCR, Fcr.ENABLE | Fcr.CLEAR_RX)
    assert port.inb(LSR) == 0x60
    assert port.uart.rx_space() == 16


def test_switching_fifo_mode_empties_the_fifo(port: Port) -> None:
    port.uart.feed(b"a")
    port.outb(FCR, Fcr.ENABLE)
    assert port.inb(LSR) == 0x60
    port.uart.feed(b"abc")
    port.outb(FCR, 0)
    assert port.inb(LSR) == 0x60
    assert port.inb(IIR) == 0x01


def test_fcr_bits_1_to_7_need_fcr0(port: Port) -> None:
    port.uart.feed(b"a")  # 16450 mode
    port.outb(FCR, Fcr.CLEAR_RX)
    assert port.inb(LSR) == 0x61
    assert port.inb(IIR) == 0x01  # still no FIFO bits


@pytest.mark.parametrize(
    ("fcr", "level"),
    [(Fcr.ENABLE, 1), (Fcr.ENABLE | Fcr.TRIG_4, 4), (Fcr.ENABLE | Fcr.TRIG_8, 8),
     (Fcr.ENABLE | Fcr.TRIG_14, 14)],
)
def test_rx_trigger_level(port: Port, fcr: int, level: int) -> None:
    port.outb(FCR, fcr)
    port.outb(IER, Ier.RDI)
    port.uart.feed(bytes(level - 1))
    # Below the trigger level the character timeout reports the data (no clock: always expired).
    expected = 0xC0 | (Iir.TIMEOUT if level > 1 else Iir.NO_INT)
    assert port.inb(IIR) == expected
    port.uart.feed(b"!")
    assert port.inb(IIR) == 0xC0 | Iir.RDI
    port.inb(RBR)
    assert port.inb(IIR) == 0xC0 | (Iir.TIMEOUT if level > 1 else Iir.NO_INT)


# ---- IIR and interrupts -------------------------------------------------------------------


def test_iir_fifo_bits(port: Port) -> None:
    assert port.inb(IIR) == 0x01
    port.outb(FCR, Fcr.ENABLE)
    assert port.inb(IIR) == 0xC1
    port.outb(FCR, 0)
    assert port.inb(IIR) == 0x01


def test_iir_priority(port: Port) -> None:
    # Arrange all four sources at once: an overrun (in loopback), data, THR empty, MSR deltas.
    port.outb(FCR, Fcr.ENABLE)
    port.outb(MCR, Mcr.LOOP | Mcr.DTR)  # DSR follows DTR: a modem-status change
    for value in range(FIFO_DEPTH + 1):
        port.outb(THR, value)  # the 17th byte overruns; every write re-arms THRE
    port.outb(MCR, 0)
    port.outb(IER, Ier.RDI | Ier.THRI | Ier.RLSI | Ier.MSI)

    assert port.inb(IIR) == 0xC0 | Iir.RLSI
    assert port.inb(LSR) == 0x63  # reading LSR clears OE, and with it the line-status source
    assert port.inb(IIR) == 0xC0 | Iir.RDI
    for _ in range(FIFO_DEPTH):
        port.inb(RBR)
    assert port.inb(IIR) == 0xC0 | Iir.THRI
    assert port.inb(IIR) == 0xC0 | Iir.MSI  # the THRI read above acknowledged THR empty
    assert port.inb(MSR) & 0x0F
    assert port.inb(IIR) == 0xC1


def test_thre_interrupt_on_ier_set_and_cleared_by_iir_read(port: Port) -> None:
    port.outb(IER, Ier.THRI)
    assert port.inb(IIR) == Iir.THRI
    assert port.inb(IIR) == Iir.NO_INT
    port.outb(IER, Ier.THRI)  # already enabled: no new interrupt
    assert port.inb(IIR) == Iir.NO_INT
    port.outb(IER, 0)
    port.outb(IER, Ier.THRI)  # 0 -> 1 with THR empty: interrupt again
    assert port.inb(IIR) == Iir.THRI


def test_thre_interrupt_rearmed_by_each_thr_write(port: Port) -> None:
    port.outb(IER, Ier.THRI)
    assert port.inb(IIR) == Iir.THRI
    port.outb(THR, ord("a"))
    assert port.inb(IIR) == Iir.THRI
    assert port.inb(IIR) == Iir.NO_INT


def test_thre_interrupt_cleared_by_disabling_it(port: Port) -> None:
    port.outb(IER, Ier.THRI)
    port.outb(IER, 0)
    assert port.inb(IIR) == Iir.NO_INT
    port.outb(IER, Ier.RDI)
    assert port.inb(IIR) == Iir.NO_INT


def test_rx_interrupt_on_feed_until_drained(port: Port) -> None:
    port.outb(MCR, Mcr.OUT2)
    port.outb(IER, Ier.RDI)
    assert port.inb(IIR) == Iir.NO_INT
    port.uart.feed(b"k")
    assert port.irq.levels == [True]
    assert port.inb(IIR) == Iir.RDI
    assert port.inb(IIR) == Iir.RDI  # reading IIR does not acknowledge received data
    assert port.inb(RBR) == ord("k")
    assert port.inb(IIR) == Iir.NO_INT
    assert port.irq.levels == [True, False]


def test_listening_needs_an_iir_read_with_receive_interrupts_enabled(port: Port) -> None:
    assert not port.uart.listening
    port.outb(IER, Ier.THRI)
    port.inb(IIR)
    assert not port.uart.listening          # an IIR read, but receive interrupts are off
    port.outb(IER, Ier.RLSI | Ier.RDI)
    assert not port.uart.listening          # enabled, but the driver may still be setting up
    port.inb(IIR)
    assert port.uart.listening              # its interrupt handler (or poll routine) ran
    port.outb(IER, 0)
    assert port.uart.listening              # a console write masks IER for a moment: still listening
    port.outb(LCR, Lcr.DLAB)
    port.outb(DLM, 0)
    port.outb(LCR, 0)
    assert port.uart.listening


@pytest.mark.parametrize("fcr_writes", [[Fcr.ENABLE], [Fcr.ENABLE, Fcr.ENABLE | Fcr.CLEAR_RX]])
def test_emptying_the_receive_fifo_stops_listening(port: Port, fcr_writes) -> None:
    port.outb(IER, Ier.RDI)
    port.inb(IIR)
    assert port.uart.listening
    for value in fcr_writes:
        port.outb(FCR, value)
    assert not port.uart.listening          # a driver that clears its FIFO is (re)starting
    port.inb(IIR)
    assert port.uart.listening


def test_reset_stops_listening(port: Port) -> None:
    port.outb(IER, Ier.RDI)
    port.inb(IIR)
    port.uart.reset()
    assert not port.uart.listening


def test_rx_interrupt_needs_ier(port: Port) -> None:
    port.outb(MCR, Mcr.OUT2)
    port.uart.feed(b"k")
    assert port.inb(IIR) == Iir.NO_INT
    assert port.irq.levels == []
    port.outb(IER, Ier.RDI)
    assert port.irq.levels == [True]
    port.outb(IER, 0)
    assert port.irq.levels == [True, False]


def test_out2_gates_the_irq_line(port: Port) -> None:
    port.outb(IER, Ier.THRI)
    assert port.inb(IIR) & 1 == 0  # pending inside the UART ...
    port.outb(IER, 0)
    port.outb(IER, Ier.THRI)
    assert port.irq.levels == []   # ... but the line stays low without OUT2
    port.outb(MCR, Mcr.OUT2)
    assert port.irq.levels == [True]
    port.outb(MCR, Mcr.DTR | Mcr.RTS)
    assert port.irq.levels == [True, False]
    port.outb(MCR, Mcr.DTR | Mcr.RTS | Mcr.OUT2)
    assert port.irq.levels == [True, False, True]
    assert port.uart.irq_level
    port.inb(IIR)
    assert port.irq.levels == [True, False, True, False]


def test_loopback_closes_the_out2_gate(port: Port) -> None:
    # The datasheet forces the modem-control output pins (OUT2 too) inactive in loopback.
    port.outb(MCR, Mcr.OUT2)
    port.outb(IER, Ier.RDI)
    port.uart.feed(b"x")
    assert port.irq.levels == [True]
    port.outb(MCR, Mcr.OUT2 | Mcr.LOOP)
    assert port.irq.levels == [True, False]
    assert port.inb(IIR) == Iir.RDI  # the interrupt itself is still pending
    port.outb(MCR, Mcr.OUT2)
    assert port.irq.levels == [True, False, True]


def test_irq_line_is_driven_only_on_changes(port: Port) -> None:
    port.outb(MCR, Mcr.OUT2)
    port.outb(FCR, Fcr.ENABLE)
    port.outb(IER, Ier.RDI | Ier.THRI)
    for _ in range(3):
        port.uart.feed(b"ab")
        port.outb(THR, ord("z"))
        port.inb(LSR)
    assert port.irq.levels == [True]
    assert port.inb(IIR) == 0xC0 | Iir.RDI
    assert port.drain() == b"ab" * 3
    assert port.inb(IIR) == 0xC0 | Iir.THRI
    assert port.irq.levels == [True, False]


def test_modem_status_interrupt(port: Port) -> None:
    port.outb(IER, Ier.MSI)
    port.outb(MCR, Mcr.OUT2)
    assert port.irq.levels == []  # outside loopback the modem inputs never change
    port.outb(MCR, Mcr.OUT2 | Mcr.LOOP | Mcr.OUT1)  # DSR and CTS drop, RI rises
    assert port.inb(IIR) == Iir.MSI
    assert port.inb(MSR) == Msr.RI | Msr.DCD | Msr.DCTS | Msr.DDSR
    assert port.inb(IIR) == Iir.NO_INT
    port.outb(MCR, Mcr.OUT2 | Mcr.LOOP)  # RI falls: trailing edge
    assert port.inb(MSR) == Msr.DCD | Msr.TERI
    port.outb(MCR, Mcr.OUT2 | Mcr.LOOP | Mcr.OUT1)  # RI rises: no delta
    assert port.inb(MSR) == Msr.RI | Msr.DCD


# ---- loopback -------------------------------------------------------------------------------


def test_loopback_echoes_thr_into_rbr(port: Port) -> None:
    port.outb(FCR, Fcr.ENABLE)
    port.outb(MCR, Mcr.LOOP)
    for b in b"ping":
        port.outb(THR, b)
    assert port.sent == []
    assert port.inb(LSR) == 0x61
    assert bytes(port.inb(RBR) for _ in range(4)) == b"ping"
    assert port.inb(LSR) == 0x60


def test_loopback_disconnects_host_input(port: Port) -> None:
    port.outb(MCR, Mcr.LOOP)
    assert port.uart.feed(b"x") == 0
    assert port.uart.rx_space() == 0
    port.outb(MCR, 0)
    assert port.uart.feed(b"x") == 1


@pytest.mark.parametrize(
    ("mcr", "msr_high"),
    [(0, 0), (Mcr.DTR, Msr.DSR), (Mcr.RTS, Msr.CTS), (Mcr.OUT1, Msr.RI), (Mcr.OUT2, Msr.DCD),
     (0x0F, 0xF0), (Mcr.RTS | Mcr.OUT2, 0x90)],
)
def test_loopback_msr_mirrors_mcr(port: Port, mcr: int, msr_high: int) -> None:
    port.outb(MCR, Mcr.LOOP | mcr)
    assert port.inb(MSR) & 0xF0 == msr_high
    port.outb(MCR, mcr)
    assert port.inb(MSR) & 0xF0 == 0xB0


def test_loopback_overrun_in_fifo_mode_drops_the_new_byte(port: Port) -> None:
    port.outb(FCR, Fcr.ENABLE)
    port.outb(MCR, Mcr.LOOP)
    port.outb(IER, Ier.RLSI)
    for value in range(20):
        port.outb(THR, value)
    assert port.inb(IIR) == 0xC0 | Iir.RLSI
    assert port.inb(LSR) == Lsr.THRE | Lsr.TEMT | Lsr.OE | Lsr.DR
    assert port.inb(LSR) == 0x61  # OE clears on read
    assert port.inb(IIR) == 0xC1
    assert bytes(port.inb(RBR) for _ in range(FIFO_DEPTH)) == bytes(range(16))
    assert port.inb(LSR) == 0x60


def test_loopback_overrun_in_16450_mode_overwrites(port: Port) -> None:
    port.outb(MCR, Mcr.LOOP)
    port.outb(THR, 1)
    port.outb(THR, 2)
    assert port.inb(LSR) == 0x63
    assert port.inb(RBR) == 2
    assert port.inb(LSR) == 0x60


# ---- transmitter ----------------------------------------------------------------------------


def test_transmitted_bytes_reach_out_in_order(port: Port) -> None:
    for b in b"Hello, world!\n":
        port.outb(THR, b)
    assert port.sent == [bytes((b,)) for b in b"Hello, world!\n"]
    assert port.inb(LSR) == 0x60  # transmission is instantaneous


class Host:
    """The host side of the transmitter: how many more bytes it can take now."""

    def __init__(self, room: int = 1 << 20) -> None:
        self.room = room

    def __call__(self) -> int:
        return self.room


def test_a_host_that_cannot_take_more_keeps_thre_and_temt_clear(port: Port) -> None:
    host = Host(room=2)
    port.uart.set_output(port.sent.append, host)
    port.outb(MCR, Mcr.OUT2)
    port.outb(IER, Ier.THRI)
    assert port.inb(IIR) == Iir.THRI
    port.outb(THR, ord("a"))                 # room for it and more: THR empty again at once
    assert port.inb(LSR) == Lsr.THRE | Lsr.TEMT
    assert port.inb(IIR) == Iir.THRI
    host.room = 1
    port.outb(THR, ord("b"))                 # this byte fills the host: the transmitter is busy
    host.room = 0
    assert port.inb(LSR) & (Lsr.THRE | Lsr.TEMT) == 0
    assert port.inb(IIR) == Iir.NO_INT and not port.irq.level
    port.outb(IER, 0)
    port.outb(IER, Ier.THRI)                 # re-enabling THRI does not fake an empty THR
    assert port.inb(IIR) == Iir.NO_INT and not port.irq.level
    assert port.output == b"ab"              # nothing lost, nothing duplicated
    host.room = 100
    port.uart.host_ready()                   # the host drained: THR empties, its interrupt fires
    assert port.irq.level
    assert port.inb(LSR) == Lsr.THRE | Lsr.TEMT
    assert port.inb(IIR) == Iir.THRI


def test_a_polling_driver_sees_thre_when_the_host_has_room_again(port: Port) -> None:
    host = Host(room=1)
    port.uart.set_output(port.sent.append, host)
    port.outb(THR, ord("x"))
    host.room = 0                            # the host took it and is full now
    assert not port.inb(LSR) & Lsr.THRE
    host.room = 10                           # no host_ready() call: the LSR read looks itself
    assert port.inb(LSR) & Lsr.THRE


def test_loopback_bytes_never_wait_for_the_host(port: Port) -> None:
    port.uart.set_output(port.sent.append, Host(room=0))
    port.outb(MCR, Mcr.LOOP)
    port.outb(THR, 0x55)
    assert port.inb(LSR) == Lsr.THRE | Lsr.TEMT | Lsr.DR


def test_default_out_and_irq_do_nothing() -> None:
    uart = Uart16550()
    uart.write(MCR, 1, Mcr.OUT2)
    uart.write(IER, 1, Ier.THRI)
    uart.write(THR, 1, 0x41)
    assert uart.irq_level
    assert uart.read(IIR, 1) == Iir.THRI


# ---- access sizes, offsets, reset ---------------------------------------------------------


def test_wide_accesses_act_on_one_byte(port: Port) -> None:
    assert port.uart.read(LSR, 2) == 0x60
    assert port.uart.read(LSR, 4) == 0x60
    port.uart.write(THR, 4, 0x12345641)
    assert port.output == b"A"
    port.uart.write(SCR, 2, 0xBEEF)
    assert port.inb(SCR) == 0xEF


def test_offsets_past_the_registers(port: Port) -> None:
    assert port.uart.read(8, 1) == 0xFF
    port.uart.write(8, 1, 0x41)
    assert port.sent == []


def test_reset_returns_to_power_on(port: Port) -> None:
    port.outb(FCR, Fcr.ENABLE)
    port.outb(MCR, Mcr.OUT2)
    port.outb(IER, 0x0F)
    port.outb(LCR, 0x83)
    port.uart.feed(b"abc")
    assert port.irq.level
    port.uart.reset()
    assert port.irq.levels[-1] is False
    assert [port.inb(r) for r in (IER, IIR, LCR, MCR, LSR, MSR)] == [0, 1, 0, 0, 0x60, 0xB0]


def test_concurrent_feed_and_guest_reads() -> None:
    port = Port()
    port.outb(FCR, Fcr.ENABLE)
    data = bytes(i & 0xFF for i in range(3000))

    def feeder() -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 10
        while view and time.monotonic() < deadline:
            accepted = port.uart.feed(view)
            if not accepted:
                time.sleep(0)  # back-pressure: let the guest side drain
            view = view[accepted:]

    thread = threading.Thread(target=feeder)
    thread.start()
    got = bytearray()
    deadline = time.monotonic() + 10
    while len(got) < len(data) and time.monotonic() < deadline:
        if port.inb(LSR) & Lsr.DR:
            got.append(port.inb(RBR))
        else:
            time.sleep(0)
    thread.join()
    assert bytes(got) == data


# ---- Linux's 8250 driver, step by step ----------------------------------------------------

UART_LCR_CONF_MODE_A = Lcr.DLAB  # 0x80
UART_LCR_CONF_MODE_B = 0xBF
UART_FCR7_64BYTE = 0x20
UART_IER_UUE = 0x40


def linux_size_fifo(p: Port) -> int:
    """size_fifo(): count how many bytes a loopback burst leaves in the receive FIFO."""
    old_lcr = p.inb(LCR)
    p.outb(LCR, 0)
    old_fcr = p.inb(FCR)  # (reads IIR; Linux writes it back as FCR below)
    old_mcr = p.inb(MCR)
    p.outb(FCR, Fcr.ENABLE | Fcr.CLEAR_RX | Fcr.CLEAR_TX)
    p.outb(MCR, Mcr.LOOP)
    p.outb(LCR, UART_LCR_CONF_MODE_A)
    old_dl = p.inb(DLL) | p.inb(DLM) << 8
    p.outb(DLL, 1)
    p.outb(DLM, 0)
    p.outb(LCR, 0x03)
    for count in range(256):
        p.outb(THR, count)
    count = 0
    while p.inb(LSR) & Lsr.DR and count < 256:
        p.inb(RBR)
        count += 1
    p.outb(FCR, old_fcr)
    p.outb(MCR, old_mcr)
    p.outb(LCR, UART_LCR_CONF_MODE_A)
    p.outb(DLL, old_dl & 0xFF)
    p.outb(DLM, old_dl >> 8)
    p.outb(LCR, old_lcr)
    return count


def linux_autoconfig_16550a(p: Port) -> str:
    """autoconfig_16550a(): rule out the 16550A's many relatives."""
    p.outb(LCR, UART_LCR_CONF_MODE_A)
    if p.inb(IIR) == 0:  # an EFR where IIR should be: ST16C650V1
        return "ST16650"
    p.outb(LCR, UART_LCR_CONF_MODE_B)
    if p.inb(IIR) == 0:
        return "EFR"
    p.outb(LCR, 0)
    status1 = p.inb(MCR)
    p.outb(LCR, 0xE0)
    status2 = p.inb(0x02)  # EXCR1 on a National SuperIO
    if not (status2 ^ status1) & Mcr.LOOP:
        p.outb(LCR, 0)
        p.outb(MCR, status1 ^ Mcr.LOOP)
        p.outb(LCR, 0xE0)
        status2 = p.inb(0x02)
        p.outb(LCR, 0)
        p.outb(MCR, status1)
        if (status2 ^ status1) & Mcr.LOOP:
            return "NS16550A"
    p.outb(LCR, 0)
    p.outb(FCR, Fcr.ENABLE | UART_FCR7_64BYTE)
    status1 = p.inb(IIR) >> 5
    p.outb(FCR, Fcr.ENABLE)
    p.outb(LCR, UART_LCR_CONF_MODE_A)
    p.outb(FCR, Fcr.ENABLE | UART_FCR7_64BYTE)
    status2 = p.inb(IIR) >> 5
    p.outb(FCR, Fcr.ENABLE)
    p.outb(LCR, 0)
    if status1 == 6 and status2 == 7:
        return "TI16750"
    iersave = p.inb(IER)
    p.outb(IER, iersave & ~UART_IER_UUE)
    if not p.inb(IER) & UART_IER_UUE:
        p.outb(IER, iersave | UART_IER_UUE)
        if p.inb(IER) & UART_IER_UUE:
            return "XScale"
    p.outb(IER, iersave)
    if linux_size_fifo(p) == 64:
        return "U6_16550A"
    return "16550A"


def linux_autoconfig(p: Port) -> str:
    """autoconfig() for a port probed without UPF_SKIP_TEST (so the loopback test runs)."""
    scratch = p.inb(IER)
    p.outb(IER, 0)
    scratch2 = p.inb(IER) & 0x0F
    p.outb(IER, 0x0F)
    scratch3 = p.inb(IER) & 0x0F
    p.outb(IER, scratch)
    if scratch2 != 0 or scratch3 != 0x0F:
        return "IER test failed"
    save_mcr = p.inb(MCR)
    save_lcr = p.inb(LCR)
    p.outb(MCR, Mcr.LOOP | 0x0A)  # RTS | OUT2 looped back to CTS | DCD
    status1 = p.inb(MSR) & 0xF0
    p.outb(MCR, save_mcr)
    if status1 != 0x90:
        return "LOOP test failed"
    p.outb(LCR, UART_LCR_CONF_MODE_B)
    p.outb(FCR, 0)  # the EFR on chips that have one
    p.outb(LCR, 0)
    p.outb(FCR, Fcr.ENABLE)
    kind = {0: "8250", 1: "unknown", 2: "16550", 3: None}[p.inb(IIR) >> 6]
    if kind is None:
        kind = linux_autoconfig_16550a(p)
    p.outb(LCR, save_lcr)
    # Reset the UART: serial8250_clear_fifos(), drain RX, interrupts off.
    p.outb(MCR, save_mcr)
    p.outb(FCR, Fcr.ENABLE)
    p.outb(FCR, Fcr.ENABLE | Fcr.CLEAR_RX | Fcr.CLEAR_TX)
    p.outb(FCR, 0)
    p.inb(RBR)
    p.outb(IER, 0)
    return kind


def test_linux_autoconfig_finds_a_16550a(port: Port) -> None:
    assert linux_autoconfig(port) == "16550A"
    assert port.sent == []         # everything the probe sent stayed in loopback
    assert port.irq.levels == []   # and no interrupt escaped
    assert port.inb(LSR) == 0x60
    assert port.inb(IIR) == 0x01
    assert port.inb(MCR) == 0


def test_linux_size_fifo_counts_16(port: Port) -> None:
    assert linux_size_fifo(port) == 16


def test_linux_startup_and_console_traffic(port: Port) -> None:
    """serial8250_do_startup() for a port with an IRQ, then set_termios() and some I/O."""
    p = port
    p.outb(FCR, Fcr.ENABLE)  # serial8250_clear_fifos()
    p.outb(FCR, Fcr.ENABLE | Fcr.CLEAR_RX | Fcr.CLEAR_TX)
    p.outb(FCR, 0)
    for reg in (LSR, RBR, IIR, MSR):  # clear the interrupt registers
        p.inb(reg)
    assert p.inb(LSR) != 0xFF  # "LSR safety check"

    # UART_BUG_THRE test: THRE must be re-asserted when IER.THRI is set again.
    assert p.inb(LSR) & Lsr.THRE
    p.outb(IER, Ier.THRI)
    iir1 = p.inb(IIR)
    p.outb(IER, 0)
    p.outb(IER, Ier.THRI)
    iir = p.inb(IIR)
    p.outb(IER, 0)
    assert iir1 & Iir.NO_INT == 0 and iir & Iir.NO_INT == 0
    assert p.irq.levels == []  # OUT2 is still off

    p.outb(LCR, Lcr.WLEN8)
    p.outb(MCR, Mcr.DTR | Mcr.RTS | Mcr.OUT2)  # "Most PC uarts need OUT2 raised"

    # UART_BUG_TXEN test: an interrupt must follow IER.THRI with the transmitter empty.
    p.outb(IER, Ier.THRI)
    lsr = p.inb(LSR)
    iir = p.inb(IIR)
    p.outb(IER, 0)
    assert not (lsr & Lsr.TEMT and iir & Iir.NO_INT)
    assert p.irq.levels == [True, False]
    for reg in (LSR, RBR, IIR, MSR):
        p.inb(reg)

    # set_termios() of Linux 6.1: 115200 8N1, IER with RX interrupts written *before* the
    # divisor and the FCR that turns the 16550A FIFO on (trigger level 8). A console that fed
    # a byte as soon as IER.RDI was set lost it here: turning the FIFO on empties it.
    assert not p.uart.listening
    p.outb(IER, Ier.RLSI | Ier.RDI)
    assert not p.uart.listening
    p.outb(LCR, Lcr.DLAB | Lcr.WLEN8)
    p.outb(DLL, 1)
    p.outb(DLM, 0)
    p.outb(LCR, Lcr.WLEN8)
    p.outb(FCR, Fcr.ENABLE)
    p.outb(FCR, Fcr.ENABLE | Fcr.TRIG_8)
    assert p.irq.levels == [True, False]
    assert not p.uart.listening

    # The tty's first write (init's "init ready") starts interrupt-driven transmit: the handler
    # reads IIR with RX interrupts on, and from then on the driver is listening.
    p.outb(IER, Ier.RLSI | Ier.RDI | Ier.THRI)
    assert p.inb(IIR) == 0xC0 | Iir.THRI
    p.outb(THR, ord("i"))
    p.outb(IER, Ier.RLSI | Ier.RDI)      # __stop_tx()
    assert p.inb(IIR) == 0xC1
    assert p.uart.listening
    p.sent.clear()

    # One typed key, below the trigger level: the character timeout still interrupts.
    assert p.uart.feed(b"l") == 1
    assert p.irq.level
    assert p.inb(IIR) == 0xC0 | Iir.TIMEOUT
    assert p.drain() == b"l"
    assert p.inb(IIR) == 0xC1
    assert not p.irq.level

    # Interrupt-driven transmit: start_tx sets THRI, the handler fills the FIFO until stop_tx.
    message = b"ls: not found\n"
    pending = deque(message)
    p.outb(IER, Ier.RLSI | Ier.RDI | Ier.THRI)
    assert p.irq.level
    for _ in range(len(message)):  # one interrupt per FIFO load at most
        iir = p.inb(IIR)
        if iir & Iir.NO_INT:
            break
        assert iir == 0xC0 | Iir.THRI
        for _ in range(16):
            if not pending:
                p.outb(IER, Ier.RLSI | Ier.RDI)  # __stop_tx()
                break
            p.outb(THR, pending.popleft())
    assert p.output == message
    assert not p.irq.level


# ---- hypothesis: random register traffic against the datasheet -----------------------------

# MCR outputs looped back to MSR inputs in loopback mode, and the delta bit of each input.
LOOPBACK_WIRING = {Mcr.DTR: Msr.DSR, Mcr.RTS: Msr.CTS, Mcr.OUT1: Msr.RI, Mcr.OUT2: Msr.DCD}
DELTA_OF = {Msr.CTS: Msr.DCTS, Msr.DSR: Msr.DDSR, Msr.DCD: Msr.DDCD}

byte_values = st.integers(0, 255)
# Values drivers write, mixed with arbitrary bytes: mostly DLAB off, OUT2 on, FIFOs at each trigger.
lcr_values = st.sampled_from([0x03, 0x03, 0x00, 0x83]) | byte_values
mcr_values = st.sampled_from([0x0B, 0x0B, 0x08, 0x03, 0x1B, 0x1F, 0x10]) | byte_values
fcr_values = st.sampled_from([0x01, 0x41, 0x81, 0xC1, 0x07, 0x00]) | byte_values


class UartMachine(RuleBasedStateMachine):
    """Random register accesses and host input, checked against a model of the datasheet."""

    def __init__(self) -> None:
        super().__init__()
        self.port = Port()
        self.uart = self.port.uart
        # The model: what the datasheet says each access must have done.
        self.ier = self.lcr = self.mcr = self.scr = 0
        self.divisor = DEFAULT_DIVISOR
        self.fifo = False
        self.trigger = 1
        self.rx: deque[int] = deque()
        self.overrun = False
        self.thre = False       # THR-empty interrupt armed
        self.deltas = 0         # MSR bits 0-3
        self.transmitted = bytearray()
        self.host = Host()      # how many bytes the host can take now
        self.uart.set_output(self.port.sent.append, self.host)
        self.busy = False       # the transmitter holds a byte the host could not take yet
        self.listening = False  # a driver read IIR with IER.RDI on, and kept its FIFO since

    # -- model helpers --

    @property
    def dlab(self) -> bool:
        return bool(self.lcr & Lcr.DLAB)

    @property
    def loop(self) -> bool:
        return bool(self.mcr & Mcr.LOOP)

    @property
    def depth(self) -> int:
        return 16 if self.fifo else 1

    def modem_inputs(self) -> int:
        if not self.loop:
            return 0xB0
        return sum(int(msr) for mcr, msr in LOOPBACK_WIRING.items() if self.mcr & mcr)

    def interrupt_id(self) -> int:
        if self.ier & Ier.RLSI and self.overrun:
            return Iir.RLSI
        if self.ier & Ier.RDI and self.rx:
            below = self.fifo and len(self.rx) < self.trigger
            return Iir.TIMEOUT if below else Iir.RDI
        if self.ier & Ier.THRI and self.thre:
            return Iir.THRI
        if self.ier & Ier.MSI and self.deltas:
            return Iir.MSI
        return Iir.NO_INT

    def some_interrupt_enabled_and_active(self) -> bool:
        return bool(
            (self.ier & Ier.RLSI and self.overrun)
            or (self.ier & Ier.RDI and self.rx)
            or (self.ier & Ier.THRI and self.thre)
            or (self.ier & Ier.MSI and self.deltas)
        )

    # -- writes --

    @rule(data=st.binary(min_size=1, max_size=20))
    def write_thr(self, data: bytes) -> None:
        for value in data:  # a driver's burst: one THR write per byte
            self.uart.write(THR, 1, value)
            if self.dlab:
                self.divisor = (self.divisor & 0xFF00) | value
                continue
            if not self.loop:
                self.transmitted.append(value)
                if self.host.room <= 1:
                    self.busy, self.thre = True, False
                    continue
            elif len(self.rx) < self.depth:
                self.rx.append(value)
            else:
                self.overrun = True
                if not self.fifo:
                    self.rx[0] = value
            self.thre = True

    @rule(value=byte_values)
    def write_ier(self, value: int) -> None:
        self.uart.write(IER, 1, value)
        if self.dlab:
            self.divisor = (self.divisor & 0xFF) | value << 8
            return
        new = value & 0x0F
        if not new & Ier.THRI:
            self.thre = False
        elif not self.ier & Ier.THRI and not self.busy:
            self.thre = True
        self.ier = new

    @rule(value=fcr_values)
    def write_fcr(self, value: int) -> None:
        self.uart.write(FCR, 1, value)
        enable = bool(value & Fcr.ENABLE)
        if enable != self.fifo:
            self.rx.clear()
            self.fifo = enable
            self.listening = False
        if enable:
            if value & Fcr.CLEAR_RX:
                self.rx.clear()
                self.listening = False
            self.trigger = (1, 4, 8, 14)[value >> 6]

    @rule(value=lcr_values)
    def write_lcr(self, value: int) -> None:
        self.uart.write(LCR, 1, value)
        self.lcr = value

    @rule(value=mcr_values)
    def write_mcr(self, value: int) -> None:
        self.uart.write(MCR, 1, value)
        before = self.modem_inputs()
        self.mcr = value & 0x1F
        after = self.modem_inputs()
        for line, delta in DELTA_OF.items():
            if (before ^ after) & line:
                self.deltas |= delta
        if before & Msr.RI and not after & Msr.RI:
            self.deltas |= Msr.TERI

    @rule(value=byte_values)
    def write_scr(self, value: int) -> None:
        self.uart.write(SCR, 1, value)
        self.scr = value

    @rule(offset=st.sampled_from([LSR, MSR]), value=byte_values)
    def write_read_only(self, offset: int, value: int) -> None:
        self.uart.write(offset, 1, value)

    @rule(data=st.binary(max_size=20))
    def feed(self, data: bytes) -> None:
        space = 0 if self.loop else self.depth - len(self.rx)
        assert self.uart.rx_space() == space
        accepted = self.uart.feed(data)
        assert accepted == min(len(data), space)
        self.rx.extend(data[:accepted])

    # -- reads --

    @rule()
    def read_rbr(self) -> None:
        value = self.uart.read(RBR, 1)
        if self.dlab:
            assert value == self.divisor & 0xFF
        elif self.rx:
            assert value == self.rx.popleft()
        else:
            assert value == 0

    @rule()
    def read_ier(self) -> None:
        expected = self.divisor >> 8 if self.dlab else self.ier
        assert self.uart.read(IER, 1) == expected

    @rule()
    def read_iir(self) -> None:
        value = self.uart.read(IIR, 1)
        if self.ier & Ier.RDI:
            self.listening = True
        assert (value & Iir.NO_INT == 0) == self.some_interrupt_enabled_and_active()
        iid = self.interrupt_id()
        assert value == iid | (Iir.FIFO if self.fifo else 0)
        if iid == Iir.THRI:
            self.thre = False

    @rule()
    def read_lcr_mcr_scr(self) -> None:
        assert self.uart.read(LCR, 1) == self.lcr
        assert self.uart.read(MCR, 1) == self.mcr
        assert self.uart.read(SCR, 1) == self.scr

    @rule()
    def read_lsr(self) -> None:
        value = self.uart.read(LSR, 1)
        self.host_drained()
        assert bool(value & Lsr.DR) == bool(self.rx)
        idle = 0 if self.busy else 0x60
        assert value == idle | (Lsr.DR if self.rx else 0) | (Lsr.OE if self.overrun else 0)
        self.overrun = False

    @rule(room=st.sampled_from([0, 1, 2, 100]), tell=st.booleans())
    def host_room_changes(self, room: int, tell: bool) -> None:
        self.host.room = room
        if tell:
            self.uart.host_ready()
            self.host_drained()

    def host_drained(self) -> None:
        if self.busy and self.host.room > 0:
            self.busy, self.thre = False, True

    @rule()
    def read_msr(self) -> None:
        assert self.uart.read(MSR, 1) == self.modem_inputs() | self.deltas
        self.deltas = 0

    @rule()
    def drain_like_a_driver(self) -> None:
        if self.dlab:
            return
        for _ in range(FIFO_DEPTH + 1):
            lsr = self.uart.read(LSR, 1)
            self.host_drained()
            if not lsr & Lsr.DR:
                break
            assert self.rx, "LSR.DR set with nothing received"
            assert self.uart.read(RBR, 1) == self.rx.popleft()
        assert not self.rx
        self.overrun = False

    # -- invariants (one method: hypothesis charges per invariant, and this runs every step) --

    @invariant()
    def datasheet_invariants(self) -> None:
        # The IRQ line is high iff an enabled interrupt is pending and the OUT2 gate is open.
        gate_open = self.mcr & Mcr.OUT2 and not self.loop
        expected = bool(gate_open and self.some_interrupt_enabled_and_active())
        levels = self.port.irq.levels
        assert self.port.irq.level == self.uart.irq_level == expected
        # ... and is driven only when its level changes.
        assert all(a != b for a, b in itertools.pairwise(levels))
        assert not levels or levels[0] is True
        # Every byte written to THR outside loopback reaches `out` exactly once, in order.
        assert self.port.output == self.transmitted
        assert all(len(chunk) == 1 for chunk in self.port.sent)
        assert self.uart.listening == self.listening
        # The receiver never holds more than its depth (16 with FIFOs, else 1).
        held = self.depth - self.uart.rx_space() if not self.loop else len(self.rx)
        assert held == len(self.rx) <= self.depth


UartMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestUartMachine = UartMachine.TestCase
