"""The 16550A UART (COM1 at 0x3f8, IRQ 4) as a sans-I/O register model.

The device holds only register state. The outside world comes in through three doors:

* ``irq`` (an :class:`~pykvm.devices.bus.IrqLine`): driven as a *level* — high while an enabled
  interrupt is pending and the PC's OUT2 gate is open. ``set()`` is called only when the level
  changes; the machine may turn rising levels into edges for the ISA PIC.
* ``out``: receives every byte the guest transmits, one call per THR write, each as a 1-byte
  ``bytes`` object (no batching: the guest writes THR one byte per exit anyway).
* :meth:`Uart16550.feed`: host input for the receiver, with back-pressure;
  :attr:`Uart16550.listening` says whether a driver has finished setting up its receiver.

Modelled from the National Semiconductor PC16550D datasheet, as Linux's 8250 driver probes it:

* Registers at offsets 0-7: RBR/THR, IER, IIR/FCR, LCR, MCR, LSR, MSR, SCR; LCR.DLAB (bit 7)
  turns offsets 0/1 into the divisor latch DLL/DLM. IER keeps bits 0-3, MCR bits 0-4.
* Transmission is instantaneous while the host takes bytes: THR and the transmitter are empty
  again after each write, so LSR.THRE and LSR.TEMT read 1 (LSR is 0x60, 0x61 with received
  data). When the host cannot take more (``out_room()`` says 0: a slow or stuck reader of the
  host's stdout), the last byte written stays "in the transmitter": THRE and TEMT read 0 and no
  THR-empty interrupt is armed until the host has room again (:meth:`Uart16550.host_ready`, or
  an LSR read that finds room), as a real UART holds back a driver while its line is busy.
  A driver that writes THR anyway (it ignores THRE) is not stopped: the byte goes to ``out``,
  whose owner decides what to do beyond its own limit.
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
from pykvm.devices.quiesce import PARK_TIMEOUT, FeederSet

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
    """IER bits: which interrupt sources the driver enables."""

    RDI = 1 << 0   # received data available
    THRI = 1 << 1  # transmitter holding register empty
    RLSI = 1 << 2  # receiver line status
    MSI = 1 << 3   # modem status


class Iir(enum.IntEnum):
    """IIR bits 0-3, the interrupt identification (datasheet table 4), and bits 6-7."""

    MSI = 0x00      # modem status
    NO_INT = 0x01   # no interrupt pending
    THRI = 0x02     # transmitter holding register empty
    RDI = 0x04      # received data available (at or above the trigger level)
    RLSI = 0x06     # receiver line status
    TIMEOUT = 0x0C  # character timeout: data below the trigger level
    FIFO = 0xC0     # both bits set when FCR.0 enabled the FIFOs


class Fcr(enum.IntFlag):
    """FCR bits: FIFO enable, FIFO resets, DMA mode, receive trigger level (bits 6-7)."""

    ENABLE = 1 << 0
    CLEAR_RX = 1 << 1
    CLEAR_TX = 1 << 2
    DMA = 1 << 3
    TRIG_4 = 0x40
    TRIG_8 = 0x80
    TRIG_14 = 0xC0


class Lcr(enum.IntFlag):
    """LCR bits: word length, stop bits, parity, break, divisor latch access."""

    WLEN8 = 0x03
    STOP = 1 << 2
    PARITY = 1 << 3
    BREAK = 1 << 6
    DLAB = 1 << 7  # divisor latch access: offsets 0/1 become DLL/DLM


class Mcr(enum.IntFlag):
    """MCR bits: the modem-control outputs and loopback."""

    DTR = 1 << 0
    RTS = 1 << 1
    OUT1 = 1 << 2
    OUT2 = 1 << 3  # on a PC, gates the UART's interrupt onto the ISA IRQ line
    LOOP = 1 << 4


class Lsr(enum.IntFlag):
    """LSR bits: receiver data and errors, transmitter state."""

    DR = 1 << 0    # data ready
    OE = 1 << 1    # overrun error
    PE = 1 << 2
    FE = 1 << 3
    BI = 1 << 4
    THRE = 1 << 5  # transmitter holding register empty
    TEMT = 1 << 6  # transmitter empty
    FIFO_ERR = 1 << 7


class Msr(enum.IntFlag):
    """MSR bits: modem-status inputs (4-7) and their delta bits (0-3)."""

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
_IIR_FIFO = int(Iir.FIFO)
_DLAB = int(Lcr.DLAB)
_FCR_ENABLE, _FCR_CLEAR_RX = int(Fcr.ENABLE), int(Fcr.CLEAR_RX)
_OUT2, _LOOP = int(Mcr.OUT2), int(Mcr.LOOP)
_LSR_IDLE = int(Lsr.THRE | Lsr.TEMT)  # the transmitter is empty
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


def _unlimited() -> int:
    return 1 << 30


class Uart16550:
    """A 16550A UART: attach at 0x3f8 with length 8. See the module docstring for the model."""

    def __init__(
        self,
        irq: IrqLine | None = None,
        out: Callable[[bytes], None] | None = None,
        out_room: Callable[[], int] | None = None,
    ) -> None:
        self._irq = irq if irq is not None else IrqLine()
        self._lock = threading.Lock()
        self._irq_level = False  # the line is assumed low until first driven
        self._rx = bytearray()
        self.set_output(out if out is not None else _discard, out_room)
        self.feeders = FeederSet()   # the host console's input thread (pykvm.devices.quiesce)
        self._paused = False
        self._ready_deferred = False  # host_ready() came while paused
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
        self._tx_busy = False
        self._msr_inputs = _modem_inputs(0)
        self._msr_deltas = 0
        self._listening = False

    # ---- host side -------------------------------------------------------------------------

    def set_output(self, out: Callable[[bytes], None], room: Callable[[], int] | None = None) -> None:
        """Send transmitted bytes to ``out``; ``room()`` says how many more the host can take now
        (default: always room). While it says 0 the transmitter stays busy (LSR.THRE/TEMT clear,
        no THR-empty interrupt) until :meth:`host_ready` or an LSR read finds room again."""
        self._out = out
        self._out_room = room if room is not None else _unlimited
        self._out_limited = room is not None   # skips a call per THR write when there is no limit

    def host_ready(self) -> None:
        """The host took transmitted bytes: a busy transmitter empties (THRE and its interrupt). While paused
        the interrupt waits for :meth:`resume`."""
        with self._lock:
            if self._paused:
                self._ready_deferred = True
                return
            self._check_tx()

    # ---- quiescing (pykvm.devices.quiesce) ---------------------------------------------------

    def pause(self, timeout: float | None = PARK_TIMEOUT) -> bool:
        """Stop taking host input and changing IRQ 4 from host threads (``feed``, ``host_ready``): the
        feeders (the host console's input thread) park, their bytes stay with them. True once they have."""
        with self._lock:
            self._paused = True
        return self.feeders.pause(timeout)

    def resume(self) -> None:
        """Take host input again; a ``host_ready`` that came while paused takes effect now."""
        with self._lock:
            self._paused = False
            if self._ready_deferred:
                self._ready_deferred = False
                self._check_tx()
        self.feeders.resume()

    def feed(self, data: bytes) -> int:
        """Push host input into the receiver; return how many bytes were accepted.

        Never overruns: only as many bytes as the FIFO (or the 16450 holding register) has room
        for are taken; the caller keeps the rest and retries later. In loopback the receiver is
        disconnected from the outside, so nothing is accepted.
        """
        with self._lock:
            if self._paused:
                return 0           # paused (pykvm.devices.quiesce): the caller keeps the bytes
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
        """Whether :meth:`feed` would accept at least one byte now."""
        return self.rx_space() > 0

    @property
    def irq_level(self) -> bool:
        """The level last driven onto the IRQ line."""
        return self._irq_level

    @property
    def listening(self) -> bool:
        """True once a driver showed that it reads input: it read IIR (its interrupt handler or
        poll routine ran) while the received-data interrupt (IER.0) was enabled, and it has not
        emptied the receive FIFO since (FCR.1, or FCR.0 switching FIFO mode, which the datasheet
        says clears the FIFO).

        A console holds host input until then rather than feed a driver that is still setting the
        port up: Linux's set_termios() enables IER.0 *before* it turns the FIFOs on, and turning
        them on throws away a byte that arrived in between (issue 9: the lost first byte).
        """
        return self._listening

    def reset(self) -> None:
        """Return to the power-on state (a machine reset), lowering the IRQ line if raised."""
        with self._lock:
            self._power_on()
            self._update_irq()

    # ---- snapshots ---------------------------------------------------------------------------

    def state(self) -> dict:
        """The registers as plain data (for a snapshot, like vm-superio's ``SerialState``): IER, LCR, MCR,
        SCR, the divisor latch, FIFO enable and receive trigger level, the received bytes not yet read
        (hex), overrun, the armed THR-empty interrupt, the transmitter held busy by host back-pressure,
        the MSR inputs and deltas, the IRQ level last driven and whether a driver is listening."""
        with self._lock:
            return {"ier": self._ier, "lcr": self._lcr, "mcr": self._mcr, "scr": self._scr,
                    "divisor": self._divisor, "fifo": self._fifo, "trigger": self._trigger,
                    "rx": self._rx.hex(), "overrun": self._overrun, "thre_armed": self._thre_armed,
                    "tx_busy": self._tx_busy, "msr_inputs": self._msr_inputs, "msr_deltas": self._msr_deltas,
                    "irq_level": self._irq_level, "listening": self._listening}

    def load_state(self, state: dict) -> None:
        """Take the registers from :meth:`state`'s record; ValueError (one sentence) if a field is missing,
        of the wrong type or out of range. The IRQ level the registers imply is driven onto the line again
        (the recorded ``irq_level`` must agree with it), so the interrupt controller, restored after the
        devices, sees the same input level."""
        try:
            ints = {name: state[name] for name in ("ier", "lcr", "mcr", "scr", "divisor", "trigger",
                                                   "msr_inputs", "msr_deltas")}
            flags = {name: state[name] for name in ("fifo", "overrun", "thre_armed", "tx_busy", "irq_level",
                                                    "listening")}
            rx = bytes.fromhex(state["rx"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"16550 UART state is malformed: {e!r}") from None
        limits = {"ier": 0x0F, "lcr": 0xFF, "mcr": 0x1F, "scr": 0xFF, "divisor": 0xFFFF, "trigger": 14,
                  "msr_inputs": 0xF0, "msr_deltas": 0x0F}
        bad = [n for n, v in ints.items() if type(v) is not int or not 0 <= v <= limits[n]
               or (n != "trigger" and v & ~limits[n])]
        bad += [n for n, v in flags.items() if type(v) is not bool]
        if ints["trigger"] not in _TRIGGER_LEVELS:
            bad.append("trigger")
        if type(flags["fifo"]) is bool and len(rx) > (FIFO_DEPTH if flags["fifo"] else 1):
            bad.append("rx")
        if bad:
            raise ValueError(f"16550 UART state is malformed: {', '.join(sorted(set(bad)))} out of range")
        probe = Uart16550()
        probe._take(ints, flags, rx)
        if probe._irq_level != flags["irq_level"]:
            raise ValueError("16550 UART state is malformed: its irq_level disagrees with its registers")
        with self._lock:
            self._take(ints, flags, rx)

    def _take(self, ints: dict, flags: dict, rx: bytes) -> None:
        """Set the checked registers of :meth:`load_state` (lock held) and drive the line to match."""
        self._ier, self._lcr, self._mcr, self._scr = ints["ier"], ints["lcr"], ints["mcr"], ints["scr"]
        self._divisor, self._trigger = ints["divisor"], ints["trigger"]
        self._msr_inputs, self._msr_deltas = ints["msr_inputs"], ints["msr_deltas"]
        self._fifo, self._overrun = flags["fifo"], flags["overrun"]
        self._thre_armed, self._tx_busy, self._listening = flags["thre_armed"], flags["tx_busy"], flags["listening"]
        self._rx[:] = rx
        self._irq_level = False   # the fresh line is low: drive it to what the registers say
        self._update_irq()

    @classmethod
    def from_state(cls, state: dict, irq: IrqLine | None = None, out: Callable[[bytes], None] | None = None,
                   out_room: Callable[[], int] | None = None) -> Uart16550:
        """A UART in the state :meth:`state` recorded, with its host doors (see the constructor)."""
        uart = cls(irq, out, out_room)
        uart.load_state(state)
        return uart

    # ---- guest side: one handler per register, by its datasheet name -------------------------

    def read(self, offset: int, size: int) -> int:
        """A guest read of register ``offset`` (0-7; an access of any size acts on one byte);
        offsets past 7 read 0xFF."""
        handler = self._READ.get(offset)
        if handler is None:
            return 0xFF
        with self._lock:
            return handler(self)

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write of the low byte of ``value`` to register ``offset``; offsets past 7 and
        the read-only LSR/MSR ignore writes (their writes are factory-test only on real parts)."""
        handler = self._WRITE.get(offset)
        if handler is None:
            return
        with self._lock:
            transmitted = handler(self, value & 0xFF)
        if transmitted is not None:
            self._out(transmitted)

    def _read_rbr(self) -> int:
        if self._lcr & _DLAB:
            return self._divisor & 0xFF
        rx = self._rx
        if not rx:
            return 0  # undefined on hardware; nothing received
        value = rx.pop(0)
        self._update_irq()
        return value

    def _read_ier(self) -> int:
        if self._lcr & _DLAB:
            return self._divisor >> 8
        return self._ier

    def _read_iir(self) -> int:
        if self._ier & _RDI:
            self._listening = True
        iid = self._identify()
        if iid == Iir.THRI:
            self._thre_armed = False  # reading IIR acknowledges THR empty
            self._update_irq()
        return (iid | _IIR_FIFO) if self._fifo else iid

    def _read_lcr(self) -> int:
        return self._lcr

    def _read_mcr(self) -> int:
        return self._mcr

    def _read_lsr(self) -> int:
        if self._tx_busy:
            self._check_tx()
        value = 0 if self._tx_busy else _LSR_IDLE
        if self._rx:
            value |= _DR
        if self._overrun:
            value |= _OE
            self._overrun = False  # error bits clear on read
            self._update_irq()
        return value

    def _read_msr(self) -> int:
        value = self._msr_inputs | self._msr_deltas
        if self._msr_deltas:
            self._msr_deltas = 0  # delta bits clear on read
            self._update_irq()
        return value

    def _read_scr(self) -> int:
        return self._scr

    def _write_thr(self, value: int) -> bytes | None:
        if self._lcr & _DLAB:
            self._divisor = (self._divisor & 0xFF00) | value
            return None
        if self._mcr & _LOOP:
            self._loop_receive(value)
            transmitted = None
        else:
            transmitted = _BYTES[value]
            if self._out_limited and self._out_room() <= 1:
                # This byte fills what the host can take: THR stays full until the host drains.
                self._tx_busy = True
                self._thre_armed = False
                self._update_irq()
                return transmitted
        # The byte left at once, so THR is empty again: THRE re-arms.
        self._thre_armed = True
        self._update_irq()
        return transmitted

    def _write_ier(self, value: int) -> None:
        if self._lcr & _DLAB:
            self._divisor = (self._divisor & 0x00FF) | value << 8
            return
        value &= 0x0F
        if value & _THRI:
            if not self._ier & _THRI and not self._tx_busy:
                self._thre_armed = True  # enabled while THR is empty: interrupt at once
        else:
            self._thre_armed = False
        self._ier = value
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & _FCR_ENABLE)
        if enable != self._fifo:
            self._clear_rx()  # switching between 16450 and FIFO mode empties the FIFOs
            self._fifo = enable
        if enable:  # the other FCR bits are programmed only together with FCR.0
            if value & _FCR_CLEAR_RX:
                self._clear_rx()
            # FCR.2 (clear transmit FIFO): the transmit side is always empty here.
            self._trigger = _TRIGGER_LEVELS[value >> 6]
        self._update_irq()

    def _write_lcr(self, value: int) -> None:
        self._lcr = value

    def _write_mcr(self, value: int) -> None:
        value &= 0x1F
        self._mcr = value
        old, new = self._msr_inputs, _modem_inputs(value)
        if old != new:
            self._msr_inputs = new
            changed = old ^ new
            # DCTS, DDSR, DDCD follow any change of CTS, DSR, DCD; TERI only RI going 1 -> 0.
            deltas = (changed >> 4) & 0x0B
            if old & _RI and not new & _RI:
                deltas |= 0x04
            self._msr_deltas |= deltas
        self._update_irq()

    def _write_scr(self, value: int) -> None:
        self._scr = value

    def _write_read_only(self, value: int) -> None:
        pass

    _READ = {Reg.RBR_THR: _read_rbr, Reg.IER: _read_ier, Reg.IIR_FCR: _read_iir, Reg.LCR: _read_lcr,
             Reg.MCR: _read_mcr, Reg.LSR: _read_lsr, Reg.MSR: _read_msr, Reg.SCR: _read_scr}
    _WRITE = {Reg.RBR_THR: _write_thr, Reg.IER: _write_ier, Reg.IIR_FCR: _write_fcr, Reg.LCR: _write_lcr,
              Reg.MCR: _write_mcr, Reg.LSR: _write_read_only, Reg.MSR: _write_read_only, Reg.SCR: _write_scr}

    # ---- internals (called with the lock held) ---------------------------------------------

    def _check_tx(self) -> None:
        """A busy transmitter empties once the host has room: THRE, TEMT and its interrupt."""
        if self._tx_busy and self._out_room() > 0:
            self._tx_busy = False
            self._thre_armed = True
            self._update_irq()

    def _clear_rx(self) -> None:
        self._rx.clear()
        self._listening = False  # a driver that empties its FIFO is (re)starting: hold input

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

    def _identify(self) -> Iir:
        """The IIR interrupt identification (bits 0-3) for the highest-priority source."""
        ier = self._ier
        if ier & _RLSI and self._overrun:
            return Iir.RLSI
        if ier & _RDI and self._rx:
            if self._fifo and len(self._rx) < self._trigger:
                return Iir.TIMEOUT  # character timeout: below the trigger level
            return Iir.RDI
        if ier & _THRI and self._thre_armed:
            return Iir.THRI
        if ier & _MSI and self._msr_deltas:
            return Iir.MSI
        return Iir.NO_INT

    def _update_irq(self) -> None:
        mcr = self._mcr
        # The PC's OUT2 gate; loopback forces the OUT2 pin inactive, closing it.
        level = (mcr & (_OUT2 | _LOOP)) == _OUT2 and self._identify() is not Iir.NO_INT
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set(level)


def _discard(data: bytes) -> None:
    pass
