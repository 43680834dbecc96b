"""The 16550A UART (COM1 at 0x3f8, IRQ 4) as a sans-I/O register model.

The device holds only register state. The outside world comes in through three doors:

* ``irq`` (an :class:`~pykvm.devices.bus.IrqLine`): driven as a *level* — high while an enabled
  interrupt is pending and the PC's OUT2 gate is open. ``set()`` is called only when the level
  changes; the machine may turn rising levels into edges for the ISA PIC.
* ``out``: receives every byte the guest transmits, one call per THR write, each as a 1-byte
  ``bytes`` object (no batching: the guest writes THR one byte per exit anyway).
* :meth:`Uart16550.feed`: host input for the receiver, with back-pressure;
  :attr:`Uart16550.listening` says whether a driver has enabled receive interrupts yet.

Modelled from the National Semiconductor PC16550D datasheet, as Linux's 8250 driver probes it:

* Registers at offsets 0-7: RBR/THR, IER, IIR/FCR, LCR, MCR, LSR, MSR, SCR; LCR.DLAB (bit 7)
  turns offsets 0/1 into the divisor latch DLL/DLM. IER keeps bits 0-3, MCR bits 0-4.
* Transmission is instantaneous: THR and the transmitter are always empty, so LSR.THRE and
  LSR.TEMT always read 1 (LSR is 0x60, 0x61 with received data).
* Receive FIFO of 16 bytes when FCR.0 enables FIFOs, else the 16450's 1-byte holding register.
  Changing FCR.0 empties the FIFO; FCR bits 1-7 only take effect with FCR.0 set; FCR.1 clears
  the receive FIFO; FCR bits 6-7 choose the receive trigger level (1, 4, 8 or 14 bytes).
* IIR reports the highest-priority pending interrupt: receiver line status (0x06, on overrun) >
  received data (0x04 at or above the trigger level; character timeout 0x0C below it, FIFO mode
  only) > THR empty (0x02) > modem status (0x00); 0x01 when none. Bits 6-7 read 0xC0 with FIFOs.
  The character timeout fires "after four character times": with no clock in the model that time
  has always elapsed, so any received data raises an interrupt.
* THR-empty interrupt: armed by each THR write (the byte leaves at once) and by IER.1 going
  0 -> 1; disarmed by an IIR read that reports it or by clearing IER.1. Linux's start-up test
  depends on exactly this re-assertion.
* Loopback (MCR.4): THR bytes enter the receiver instead of ``out``; host input is refused (the
  serial input pin is disconnected); MSR's upper nibble mirrors MCR (DTR->DSR, RTS->CTS,
  OUT1->RI, OUT2->DCD). Outside loopback the modem inputs read CTS|DSR|DCD (0xB0). Changes of
  those inputs set the MSR delta bits (0-3; RI only on its trailing edge), which raise the modem
  status interrupt and are cleared by reading MSR.
* Overrun (only possible in loopback, since ``feed`` never overfills): LSR.OE is set and
  cleared by reading LSR; in FIFO mode the new byte is lost, in 16450 mode it replaces the
  unread one.
* The IRQ output reaches the PIC only through the OUT2 gate of the PC's serial port (MCR.3). In
  loopback the datasheet forces the modem-control output pins, OUT2 among them, inactive, so the
  gate is closed and the line stays low.

Left out: baud timing (the divisor latch is stored but never used), parity/framing/break errors
(LSR bits 2-4 and 7 never set), LCR break control, the transmit FIFO, DMA mode (FCR.3).

Access sizes: an access of 2, 4 or 8 bytes at an offset acts as a 1-byte access there (reads
zero-extend, writes use the low byte). Offsets past 7 read 0xFF and ignore writes.

Thread safety: an internal lock serialises the vCPU thread's register accesses and a console
thread's :meth:`~Uart16550.feed`. ``irq.set`` is called with the lock held (so levels reach the
line in order) and must not call back into the device; ``out`` is called after the lock is
released, so it may block or feed input back.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable

from pykvm.devices.bus import IrqLine

__all__ = ["Fcr", "Ier", "Iir", "Lcr", "Lsr", "Mcr", "Msr", "Reg", "Uart16550"]

BASE, LENGTH, IRQ = 0x3F8, 8, 4   # COM1 on a PC: eight registers from port 0x3f8, ISA interrupt 4


class Reg(enum.IntEnum):
    """Register offsets from the base port (DLAB-dependent names in comments)."""

    RBR_THR = 0  # DLL with LCR.DLAB
    IER = 1      # DLM with LCR.DLAB
    IIR_FCR = 2
    LCR = 3
    MCR = 4
    LSR = 5
    MSR = 6
    SCR = 7


class Ier(enum.IntFlag):
    RDI = 1 << 0   # received data available
    THRI = 1 << 1  # transmitter holding register empty
    RLSI = 1 << 2  # receiver line status
    MSI = 1 << 3   # modem status


class Iir(enum.IntFlag):
    NO_INT = 0x01
    MSI = 0x00
    THRI = 0x02
    RDI = 0x04
    RLSI = 0x06
    TIMEOUT = 0x0C
    FIFO = 0xC0    # both bits set when FCR.0 enabled the FIFOs


class Fcr(enum.IntFlag):
    ENABLE = 1 << 0
    CLEAR_RX = 1 << 1
    CLEAR_TX = 1 << 2
    DMA = 1 << 3
    TRIG_4 = 0x40
    TRIG_8 = 0x80
    TRIG_14 = 0xC0


class Lcr(enum.IntFlag):
    WLEN8 = 0x03
    STOP = 1 << 2
    PARITY = 1 << 3
    BREAK = 1 << 6
    DLAB = 1 << 7  # divisor latch access: offsets 0/1 become DLL/DLM


class Mcr(enum.IntFlag):
    DTR = 1 << 0
    RTS = 1 << 1
    OUT1 = 1 << 2
    OUT2 = 1 << 3  # on a PC, gates the UART's interrupt onto the ISA IRQ line
    LOOP = 1 << 4


class Lsr(enum.IntFlag):
    DR = 1 << 0    # data ready
    OE = 1 << 1    # overrun error
    PE = 1 << 2
    FE = 1 << 3
    BI = 1 << 4
    THRE = 1 << 5  # transmitter holding register empty
    TEMT = 1 << 6  # transmitter empty
    FIFO_ERR = 1 << 7


class Msr(enum.IntFlag):
    DCTS = 1 << 0
    DDSR = 1 << 1
    TERI = 1 << 2  # trailing edge of RI
    DDCD = 1 << 3
    CTS = 1 << 4
    DSR = 1 << 5
    RI = 1 << 6
    DCD = 1 << 7


# Plain ints for the exit path: IntFlag arithmetic costs a Python-level call per operator.
_RDI, _THRI, _RLSI, _MSI = int(Ier.RDI), int(Ier.THRI), int(Ier.RLSI), int(Ier.MSI)
_IIR_NONE, _IIR_FIFO = int(Iir.NO_INT), int(Iir.FIFO)
_DLAB = int(Lcr.DLAB)
_OUT2, _LOOP = int(Mcr.OUT2), int(Mcr.LOOP)
_LSR_IDLE = int(Lsr.THRE | Lsr.TEMT)  # the transmitter is always empty
_DR, _OE = int(Lsr.DR), int(Lsr.OE)
_RI = int(Msr.RI)
_MODEM_INPUTS_IDLE = int(Msr.CTS | Msr.DSR | Msr.DCD)  # a cable with the far end ready

FIFO_DEPTH = 16
_TRIGGER_LEVELS = (1, 4, 8, 14)  # FCR bits 6-7
DEFAULT_DIVISOR = 12  # 9600 baud from the PC's 1.8432 MHz clock; the datasheet leaves it undefined

_BYTES = tuple(bytes((i,)) for i in range(256))  # no allocation per transmitted byte


def _modem_inputs(mcr: int) -> int:
    """MSR bits 4-7 for a given MCR: mirrored outputs in loopback, an idle cable otherwise."""
    if not mcr & _LOOP:
        return _MODEM_INPUTS_IDLE
    return (
        (mcr & 0x01) << 5     # DTR  -> DSR
        | (mcr & 0x02) << 3   # RTS  -> CTS
        | (mcr & 0x0C) << 4   # OUT1 -> RI, OUT2 -> DCD
    )


class Uart16550:
    """A 16550A UART: attach at 0x3f8 with length 8. See the module docstring for the model."""

    def __init__(
        self,
        irq: IrqLine | None = None,
        out: Callable[[bytes], None] | None = None,
    ) -> None:
        self._irq = irq if irq is not None else IrqLine()
        self._out = out if out is not None else _discard
        self._lock = threading.Lock()
        self._irq_level = False  # the line is assumed low until first driven
        self._rx = bytearray()
        self._power_on()

    def _power_on(self) -> None:
        # Master-reset values from the datasheet; SCR and the divisor latch are not reset there.
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._scr = 0
        self._divisor = DEFAULT_DIVISOR
        self._fifo = False
        self._trigger = 1
        self._rx.clear()
        self._overrun = False
        self._thre_armed = False
        self._msr_inputs = _modem_inputs(0)
        self._msr_deltas = 0

    # ---- host side -------------------------------------------------------------------------

    def feed(self, data: bytes) -> int:
        """Push host input into the receiver; return how many bytes were accepted.

        Never overruns: only as many bytes as the FIFO (or the 16450 holding register) has room
        for are taken; the caller keeps the rest and retries later. In loopback the receiver is
        disconnected from the outside, so nothing is accepted.
        """
        with self._lock:
            n = min(len(data), self._space())
            if n > 0:
                self._rx += data[:n]
                self._update_irq()
            return n

    def rx_space(self) -> int:
        """How many bytes :meth:`feed` would accept now."""
        with self._lock:
            return self._space()

    def can_accept(self) -> bool:
        return self.rx_space() > 0

    @property
    def irq_level(self) -> bool:
        """The level last driven onto the IRQ line."""
        return self._irq_level

    @property
    def listening(self) -> bool:
        """True once the guest enabled the received-data interrupt (IER.0): a driver reads input.

        A console can hold host input until then rather than fill the FIFO for nobody.
        """
        return bool(self._ier & _RDI)

    def reset(self) -> None:
        """Return to the power-on state (a machine reset), lowering the IRQ line if raised."""
        with self._lock:
            self._power_on()
            self._update_irq()

    # ---- guest side ------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        with self._lock:
            if offset == 0:
                if self._lcr & _DLAB:
                    return self._divisor & 0xFF
                rx = self._rx
                if not rx:
                    return 0  # undefined on hardware; nothing received
                value = rx.pop(0)
                self._update_irq()
                return value
            if offset == 1:
                if self._lcr & _DLAB:
                    return self._divisor >> 8
                return self._ier
            if offset == 2:
                iid = self._identify()
                if iid == 0x02:
                    self._thre_armed = False  # reading IIR acknowledges THR empty
                    self._update_irq()
                return (iid | _IIR_FIFO) if self._fifo else iid
            if offset == 3:
                return self._lcr
            if offset == 4:
                return self._mcr
            if offset == 5:
                value = _LSR_IDLE
                if self._rx:
                    value |= _DR
                if self._overrun:
                    value |= _OE
                    self._overrun = False  # error bits clear on read
                    self._update_irq()
                return value
            if offset == 6:
                value = self._msr_inputs | self._msr_deltas
                if self._msr_deltas:
                    self._msr_deltas = 0  # delta bits clear on read
                    self._update_irq()
                return value
            if offset == 7:
                return self._scr
            return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        transmitted = None
        with self._lock:
            if offset == 0:
                if self._lcr & _DLAB:
                    self._divisor = (self._divisor & 0xFF00) | value
                    return
                if self._mcr & _LOOP:
                    self._loop_receive(value)
                else:
                    transmitted = _BYTES[value]
                # The byte left at once, so THR is empty again: THRE re-arms.
                self._thre_armed = True
                self._update_irq()
            elif offset == 1:
                if self._lcr & _DLAB:
                    self._divisor = (self._divisor & 0x00FF) | value << 8
                    return
                value &= 0x0F
                if value & _THRI:
                    if not self._ier & _THRI:
                        self._thre_armed = True  # enabled while THR is empty: interrupt at once
                else:
                    self._thre_armed = False
                self._ier = value
                self._update_irq()
            elif offset == 2:
                self._write_fcr(value)
                self._update_irq()
            elif offset == 3:
                self._lcr = value
            elif offset == 4:
                self._write_mcr(value & 0x1F)
                self._update_irq()
            elif offset == 7:
                self._scr = value
            # LSR and MSR are read-only (their writes are factory-test only on real parts).
        if transmitted is not None:
            self._out(transmitted)

    # ---- internals (called with the lock held) ---------------------------------------------

    def _space(self) -> int:
        if self._mcr & _LOOP:
            return 0
        return (FIFO_DEPTH if self._fifo else 1) - len(self._rx)

    def _loop_receive(self, value: int) -> None:
        rx = self._rx
        if len(rx) < (FIFO_DEPTH if self._fifo else 1):
            rx.append(value)
            return
        self._overrun = True
        if not self._fifo:
            rx[0] = value  # 16450 mode: the new character overwrites the unread one
        # FIFO mode: the character stays in the shift register and is lost.

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & 0x01)
        if enable != self._fifo:
            self._rx.clear()  # switching between 16450 and FIFO mode empties the FIFOs
            self._fifo = enable
        if not enable:
            return  # the other FCR bits are programmed only together with FCR.0
        if value & 0x02:
            self._rx.clear()
        # FCR.2 (clear transmit FIFO): the transmit side is always empty here.
        self._trigger = _TRIGGER_LEVELS[value >> 6]

    def _write_mcr(self, value: int) -> None:
        self._mcr = value
        old, new = self._msr_inputs, _modem_inputs(value)
        if old == new:
            return
        self._msr_inputs = new
        changed = old ^ new
        # DCTS, DDSR, DDCD follow any change of CTS, DSR, DCD; TERI only RI going 1 -> 0.
        deltas = (changed >> 4) & 0x0B
        if old & _RI and not new & _RI:
            deltas |= 0x04
        self._msr_deltas |= deltas

    def _identify(self) -> int:
        """The IIR interrupt identification (bits 0-3) for the highest-priority source."""
        ier = self._ier
        if ier & _RLSI and self._overrun:
            return 0x06
        if ier & _RDI and self._rx:
            if self._fifo and len(self._rx) < self._trigger:
                return 0x0C  # character timeout: below the trigger level
            return 0x04
        if ier & _THRI and self._thre_armed:
            return 0x02
        if ier & _MSI and self._msr_deltas:
            return 0x00
        return _IIR_NONE

    def _update_irq(self) -> None:
        mcr = self._mcr
        # The PC's OUT2 gate; loopback forces the OUT2 pin inactive, closing it.
        level = (mcr & (_OUT2 | _LOOP)) == _OUT2 and self._identify() != _IIR_NONE
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set(level)


def _discard(data: bytes) -> None:
    pass
