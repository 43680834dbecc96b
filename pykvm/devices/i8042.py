"""The PC keyboard controller (Intel 8042 and its PS/2 successors), with nothing plugged in.

pykvm has no keyboard or mouse; the controller is here because guests use it for two other
things: Linux's i8042 driver probes it at boot (and waits out timeouts if it misbehaves), and
pulsing its output-port bit 0 low is the classic way to reset a PC (Linux's ``reboot=k``, the
default fallback after ACPI).

Two ports, four registers:

* 0x64 read: the status register. 0x64 write: a controller command.
* 0x60 read: the output buffer (a command's result). 0x60 write: the parameter of the pending
  command, or else a byte for the keyboard (dropped: there is no keyboard).

Port 0x61 between them belongs to another chip (the PC's port B: speaker gate, PIT channel 2),
so the controller cannot claim one range 0x60-0x64. One :class:`I8042` holds the state and
exposes two small devices, :attr:`I8042.data` and :attr:`I8042.command`, each attached with
length 1 at :data:`DATA_PORT` and :data:`COMMAND_PORT`.

Status register bits: 0 OBF (output buffer full), 1 IBF (input buffer full: always 0, commands
complete at once), 2 SYS (a copy of the command byte's system flag), 3 A2 (the last write went
to 0x64 rather than 0x60), 4 INH (1 = the keylock is open; Linux warns "Keylock active" when it
reads 0), 5 AUX data, 6 timeout and 7 parity errors (all three always 0). An idle controller after
POST, before any write, therefore reads 0x14.

Commands:

* 0x20-0x3F read internal RAM byte ``cmd & 0x1F`` into the output buffer; byte 0 is the command
  byte (0x20 reads it). 0x60-0x7F write the next data byte there (0x60 writes the command byte).
* 0xAA self-test: answers 0x55 and sets the system flag.
* 0xAB keyboard and 0xA9 auxiliary interface test: answer 0x02, "clock line stuck high" —
  the line floats high because nothing is connected. Linux reads the failed 0xA9 as "no AUX
  port" rather than registering a mouse port and waiting for a mouse that never answers.
* 0xAD / 0xAE disable / enable the keyboard (command byte bit 4), 0xA7 / 0xA8 the auxiliary
  port (bit 5).
* 0xD0 reads the output port; 0xD1 writes the next data byte to it. Output port bit 0 is the
  CPU reset line, active low: writing it as 0 resets the machine (``on_reset()``). Bit 1 is the
  A20 gate, recorded in :attr:`I8042.a20` (KVM does not mask A20).
* 0xF0-0xFF pulse output port bits 0-3 low for each 0 in the command's low nibble: any even
  command here, 0xFE the usual one, pulses the reset line.
* Anything else is accepted and ignored, with no result (as an AT-type controller does with the
  PS/2-only commands, for instance 0xD3's AUX loopback: Linux waits out its timeout once).

Reading 0x60 with the output buffer empty returns the byte that was last in it (0 before the
first), as the hardware's latch does, and leaves OBF clear. Accesses wider than a byte act on
the low byte. ``on_reset`` is called without the lock held, after the write has completed.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

DATA_PORT = 0x60
COMMAND_PORT = 0x64

# Status register
STATUS_OBF = 0x01
STATUS_IBF = 0x02
STATUS_SYS = 0x04
STATUS_A2 = 0x08
STATUS_INH = 0x10   # 1 = keyboard not inhibited by the keylock

# Command byte (internal RAM byte 0)
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
CTR_DEFAULT = CTR_KBDINT | CTR_SYS | CTR_AUXDIS | CTR_XLATE   # as a BIOS leaves it, no mouse

# Output port
OUT_RESET = 0x01    # CPU reset line, active low
OUT_A20 = 0x02
OUT_DEFAULT = OUT_RESET | OUT_A20

# Commands
CMD_READ_RAM = 0x20       # 0x20-0x3f
CMD_WRITE_RAM = 0x60      # 0x60-0x7f
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT = 0xD0
CMD_WRITE_OUTPUT = 0xD1
CMD_PULSE = 0xF0          # 0xf0-0xff

SELF_TEST_OK = 0x55
INTERFACE_CLOCK_HIGH = 0x02


class _Port:
    """One of the controller's two ports, as a bus device (``controller`` is the I8042 it belongs to)."""

    def __init__(self, controller: I8042, read: Callable[[], int], write: Callable[[int], None]) -> None:
        self.controller = controller
        self._read = read
        self._write = write

    def read(self, offset: int, size: int) -> int:
        return self._read()

    def write(self, offset: int, size: int, value: int) -> None:
        self._write(value & 0xFF)


class I8042:
    """The controller; attach :attr:`data` at 0x60 and :attr:`command` at 0x64, length 1 each."""

    def __init__(self, on_reset: Callable[[], None]) -> None:
        self._on_reset = on_reset
        self._ram = bytearray(32)
        self._ram[0] = CTR_DEFAULT
        self._output_port = OUT_DEFAULT
        self._obf = False
        self._out = 0              # the output buffer latch
        self._a2 = False           # last write was to the command port
        self._pending: int | None = None   # a command waiting for its data byte
        self._keys: deque[int] = deque()   # keyboard bytes waiting for the output buffer
        self.keyboard_irq = None           # an IrqLine for IRQ 1, when the machine wires one
        self._lock = threading.Lock()
        self.data = _Port(self, self.read_data, self.write_data)
        self.command = _Port(self, self.read_status, self.write_command)

    @property
    def command_byte(self) -> int:
        """The controller's command byte (its RAM byte 0)."""
        return self._ram[0]

    @property
    def a20(self) -> bool:
        """Whether the output port's A20 gate bit is set."""
        return bool(self._output_port & OUT_A20)

    # ---- port 0x64 ----------------------------------------------------------------------

    def read_status(self) -> int:
        """Port 0x64 read: the status register (OBF, SYS, A2, inhibit)."""
        with self._lock:
            status = STATUS_INH
            if self._obf:
                status |= STATUS_OBF
            if self._ram[0] & CTR_SYS:
                status |= STATUS_SYS
            if self._a2:
                status |= STATUS_A2
            return status

    def write_command(self, cmd: int) -> None:
        """Port 0x64 write: a controller command (0xFE pulses the reset line)."""
        reset = False
        with self._lock:
            self._a2 = True
            self._pending = None
            if CMD_READ_RAM <= cmd < CMD_READ_RAM + 0x20:
                self._respond(self._ram[cmd & 0x1F])
            elif CMD_WRITE_RAM <= cmd < CMD_WRITE_RAM + 0x20 or cmd == CMD_WRITE_OUTPUT:
                self._pending = cmd
            elif cmd == CMD_SELF_TEST:
                self._ram[0] |= CTR_SYS
                self._respond(SELF_TEST_OK)
            elif cmd in (CMD_AUX_TEST, CMD_KBD_TEST):
                self._respond(INTERFACE_CLOCK_HIGH)
            elif cmd == CMD_KBD_DISABLE:
                self._ram[0] |= CTR_KBDDIS
            elif cmd == CMD_KBD_ENABLE:
                self._ram[0] &= ~CTR_KBDDIS
            elif cmd == CMD_AUX_DISABLE:
                self._ram[0] |= CTR_AUXDIS
            elif cmd == CMD_AUX_ENABLE:
                self._ram[0] &= ~CTR_AUXDIS
            elif cmd == CMD_READ_OUTPUT:
                self._respond(self._output_port)
            elif cmd >= CMD_PULSE:
                reset = not cmd & OUT_RESET
        if reset:
            self._on_reset()

    # ---- port 0x60 ----------------------------------------------------------------------

    def read_data(self) -> int:
        """Port 0x60 read: the output buffer (clears OBF; the next queued byte follows)."""
        with self._lock:
            self._obf = False
            value = self._out
            more = self._next_key()
        if more:
            self._keyboard_interrupt()
        return value

    # ---- the keyboard side: a key sequence as if typed ------------------------------------

    def send_ctrl_alt_del(self) -> None:
        """Type Ctrl+Alt+Del on the (otherwise absent) keyboard, as Firecracker's SendCtrlAltDel does: the make and
        break scancodes go through the output buffer one by one, each announced on IRQ 1 when the command byte
        enables keyboard interrupts. Scancode set 1 when the controller translates (command byte bit 6, the
        default), set 2 otherwise. Nothing is sent while the keyboard is disabled (command byte bit 4)."""
        with self._lock:
            if self._ram[0] & CTR_KBDDIS:
                return
            if self._ram[0] & CTR_XLATE:
                codes = [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]
            else:
                codes = [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]
            self._keys.extend(codes)
            ready = not self._obf and self._next_key()
        if ready:
            self._keyboard_interrupt()

    def _next_key(self) -> bool:
        """Move the next keyboard byte into an empty output buffer (lock held). True if one was moved."""
        if self._obf or not self._keys:
            return False
        self._respond(self._keys.popleft())
        return True

    def _keyboard_interrupt(self) -> None:
        if self.keyboard_irq is not None and self._ram[0] & CTR_KBDINT:
            self.keyboard_irq.pulse()

    def write_data(self, value: int) -> None:
        """Port 0x60 write: a pending command's parameter, else a byte for the keyboard."""
        reset = False
        with self._lock:
            self._a2 = False
            cmd, self._pending = self._pending, None
            if cmd is None:
                return                      # a byte for the keyboard, which is not there
            if cmd == CMD_WRITE_OUTPUT:
                reset = not value & OUT_RESET
                self._output_port = value | OUT_RESET   # the reset pulse ends; the line goes high again
            else:
                self._ram[cmd & 0x1F] = value
        if reset:
            self._on_reset()

    def _respond(self, value: int) -> None:
        self._out = value
        self._obf = True

    # ---- snapshots ------------------------------------------------------------------------

    def state(self) -> dict:
        """The controller's registers as plain data (for a snapshot): internal RAM (the command byte is byte 0),
        output port, output buffer and its full flag, the A2 flag, a command waiting for its data byte and the
        keyboard bytes not yet delivered."""
        with self._lock:
            return {"ram": self._ram.hex(), "output_port": self._output_port, "obf": self._obf, "out": self._out,
                    "a2": self._a2, "pending": self._pending, "keys": list(self._keys)}

    def load_state(self, state: dict) -> None:
        """Take the registers from :meth:`state`'s record; ValueError if a field is missing or out of range."""
        try:
            ram = bytes.fromhex(state["ram"])
            values = [state["output_port"], state["out"]]
            pending = state["pending"]
            flags = [state["obf"], state["a2"]]
            keys = list(state.get("keys", []))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"i8042 state is malformed: {e!r}") from None
        if (len(ram) != 32 or not all(type(v) is int and 0 <= v <= 0xFF for v in values)
                or not all(type(f) is bool for f in flags) or len(keys) > 64
                or not all(type(k) is int and 0 <= k <= 0xFF for k in keys)
                or not (pending is None or (type(pending) is int and 0 <= pending <= 0xFF))):
            raise ValueError("i8042 state is malformed: a register is out of range")
        with self._lock:
            self._ram[:] = ram
            self._output_port, self._out = values
            self._obf, self._a2 = flags
            self._pending = pending
            self._keys = deque(keys)

    @classmethod
    def from_state(cls, state: dict, on_reset: Callable[[], None]) -> I8042:
        """A controller in the state :meth:`state` recorded, with its host hook."""
        controller = cls(on_reset)
        controller.load_state(state)
        return controller
