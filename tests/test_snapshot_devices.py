"""The UART's and the CMOS/RTC's snapshot state (state()/load_state()/from_state()), register by register,
without a VM; malformed state is refused with one clear error and changes nothing."""

from __future__ import annotations

import calendar
import copy
import threading
import types

import pytest

from pykvm.devices.bus import Bus
from pykvm.devices.cmos import B_PIE, B_SET, REG_A, REG_B, SECONDS, YEAR, Cmos
from pykvm.devices.uart import Uart16550
from pykvm.kvm.irq import IrqLine
from pykvm.snapshot import SnapshotError
from pykvm.snapshot.machine_state import restore_devices

MiB = 1 << 20
T0 = calendar.timegm((2024, 3, 3, 18, 30, 10, 0, 0, 0)) + 0.25


class Line(IrqLine):
    def __init__(self) -> None:
        self.levels: list[bool] = []
        self.raised = threading.Event()

    def set(self, level: bool) -> None:
        self.levels.append(level)
        if level:
            self.raised.set()


# ---- 16550 UART -------------------------------------------------------------------------------

def busy_uart() -> Uart16550:
    """A UART the way Linux leaves it, with two received bytes unread and its interrupt pending."""
    uart = Uart16550()
    uart.write(3, 1, 0x80)           # DLAB
    uart.write(0, 1, 0x01)           # divisor 0x0301
    uart.write(1, 1, 0x03)
    uart.write(3, 1, 0x1B)           # 8 data bits, even parity, DLAB off
    uart.write(2, 1, 0x81)           # FIFOs on, trigger level 8
    uart.write(4, 1, 0x0B)           # DTR, RTS, OUT2
    uart.write(7, 1, 0x5A)
    uart.write(1, 1, 0x01)           # IER: received data
    uart.read(2, 1)                  # the driver's handler ran: listening
    assert uart.feed(b"hi") == 2
    return uart


def test_uart_round_trip_keeps_registers_fifo_and_the_pending_interrupt():
    a = busy_uart()
    line = Line()
    b = Uart16550.from_state(a.state(), irq=line)
    assert b.state() == a.state()
    assert line.levels == [True]                 # the line is high again in the new process
    assert b.listening and b.irq_level
    assert b.read(2, 1) == 0xCC                  # character timeout (2 bytes < trigger 8), FIFOs on
    assert [b.read(3, 1), b.read(4, 1), b.read(7, 1), b.read(1, 1)] == [0x1B, 0x0B, 0x5A, 0x01]
    assert b.read(5, 1) == 0x61                  # data ready, transmitter empty
    assert bytes([b.read(0, 1), b.read(0, 1)]) == b"hi"
    assert line.levels == [True, False]          # the FIFO drained: the interrupt ends
    b.write(3, 1, 0x9B)
    assert (b.read(1, 1) << 8 | b.read(0, 1)) == 0x0301
    assert b.feed(b"x" * 20) == 16               # still a 16-byte FIFO


def test_uart_round_trip_keeps_overrun_thre_and_modem_deltas():
    a = Uart16550()
    a.write(4, 1, 0x10)              # loopback, every modem output off: the inputs drop
    a.read(6, 1)                     # (those deltas read and cleared)
    a.write(4, 1, 0x1F)              # every modem output on: CTS, DSR, DCD rise (deltas), RI rises
    for byte in range(2):            # 16450 mode: the second byte overruns the first
        a.write(0, 1, byte)
    a.write(1, 1, 0x0F)              # every interrupt; THRE re-armed by IER.1 going up
    b = Uart16550.from_state(a.state())
    assert b.read(2, 1) == 0x06      # receiver line status first
    assert b.read(5, 1) & 0x02       # OE
    assert b.read(0, 1) == 1         # the overrunning byte replaced the unread one
    assert b.read(2, 1) == 0x02      # then THR empty
    assert b.read(6, 1) == 0xF0 | 0x0B   # DSR CTS RI DCD from the loop, deltas DCTS DDSR DDCD


def test_uart_held_busy_by_back_pressure_stays_busy_until_the_new_host_has_room():
    room = [1]
    a = Uart16550(out_room=lambda: room[0])
    a.write(0, 1, ord("x"))          # fills the host's room: THRE stays clear
    room[0] = 0
    assert a.read(5, 1) & 0x20 == 0
    room2 = [0]
    b = Uart16550.from_state(a.state(), out_room=lambda: room2[0])
    assert b.read(5, 1) & 0x20 == 0
    room2[0] = 10
    assert b.read(5, 1) & 0x60 == 0x60


def _uart_bad(**change):
    state = busy_uart().state()
    for k, v in change.items():
        if v is KeyError:
            del state[k]
        else:
            state[k] = v
    return state


@pytest.mark.parametrize("bad", [
    _uart_bad(ier=0x10), _uart_bad(mcr=0x20), _uart_bad(divisor=1 << 16), _uart_bad(trigger=3),
    _uart_bad(lcr=-1), _uart_bad(msr_deltas=0x10), _uart_bad(fifo="yes"), _uart_bad(overrun=1),
    _uart_bad(rx="zz"), _uart_bad(rx="00" * 17), _uart_bad(fifo=False), _uart_bad(ier=True),
    _uart_bad(irq_level=False), _uart_bad(scr=KeyError), _uart_bad(rx=None), "not a dict",
])
def test_uart_malformed_state_is_refused_and_changes_nothing(bad):
    uart = Uart16550()
    before = uart.state()
    with pytest.raises(ValueError, match="16550 UART state is malformed"):
        uart.load_state(bad)
    assert uart.state() == before


def test_a_hostile_uart_state_is_a_snapshot_error_naming_the_device():
    pio = Bus("port I/O")
    pio.attach(Uart16550(), 0x3F8, 8)
    machine = types.SimpleNamespace(pio=pio, mmio=Bus("MMIO"))
    with pytest.raises(SnapshotError, match=r"Uart16550 at pio:0x3f8 is invalid: 16550 UART state is malformed"):
        restore_devices(machine, {"pio:0x3f8": {"class": "Uart16550", "state": _uart_bad(ier=0xFF)}})


# ---- CMOS / RTC -------------------------------------------------------------------------------

def inb(cmos: Cmos, index: int) -> int:
    cmos.write(0, 1, index)
    return cmos.read(1, 1)


def outb(cmos: Cmos, index: int, value: int) -> None:
    cmos.write(0, 1, index)
    cmos.write(1, 1, value)


def test_cmos_round_trip_keeps_ram_index_nmi_and_the_guests_clock_offset():
    now = [T0]
    a = Cmos(128 * MiB, now=lambda: now[0], timer=False)
    outb(a, YEAR, 0x99)              # the guest set its clock to 1999: an offset from host time
    outb(a, 0x40, 0xAB)              # a RAM byte
    outb(a, REG_A, 0x2F)             # periodic rate 500 ms
    a.write(0, 1, 0x80 | SECONDS)    # NMI off, index at the seconds
    state = a.state()
    now[0] += 100                    # the snapshot sits on disk for 100 s of host time
    b = Cmos.from_state(state, now=lambda: now[0], timer=False)
    assert b.nmi_disabled
    assert b.read(1, 1) == 0x50      # index kept: seconds, 18:30:10 + 100 s = 18:31:50
    assert inb(b, YEAR) == 0x99 and inb(b, 0x40) == 0xAB and inb(b, REG_A) == 0x2F
    assert inb(b, 0x15) == 0x80 and inb(b, 0x16) == 0x02   # 640 KiB base memory, from the RAM bytes
    assert b.state()["offset"] == state["offset"]


def test_cmos_held_time_stays_held_and_resumes_after_restore():
    now = [T0]
    a = Cmos(MiB, now=lambda: now[0], timer=False)
    outb(a, REG_B, 0x02 | B_SET)     # SET: updates stop
    outb(a, SECONDS, 0x45)
    now[0] += 30
    b = Cmos.from_state(a.state(), now=lambda: now[0], timer=False)
    now[0] += 30
    assert inb(b, SECONDS) == 0x45   # still held
    outb(b, REG_B, 0x02)             # SET released: the clock runs from the held time
    now[0] += 2
    assert inb(b, SECONDS) == 0x47


def test_cmos_restore_restarts_the_periodic_interrupt_timer():
    a = Cmos(MiB, timer=False)
    outb(a, REG_A, 0x26)             # 1024 Hz
    outb(a, REG_B, 0x02 | B_PIE)
    inb(a, 0x0C)                     # no interrupt pending at the snapshot
    line = Line()
    b = Cmos.from_state(a.state(), irq=line)
    try:
        assert line.raised.wait(10), "no periodic interrupt after restore"
    finally:
        b.close()


def _cmos_bad(**change):
    state = Cmos(MiB, now=lambda: T0, timer=False).state()
    for k, v in change.items():
        if v is KeyError:
            del state[k]
        else:
            state[k] = v
    return state


@pytest.mark.parametrize("bad", [
    _cmos_bad(index=0x80), _cmos_bad(index="0"), _cmos_bad(ram="00" * 127), _cmos_bad(ram="zz"),
    _cmos_bad(flags=0x80), _cmos_bad(offset=float("nan")), _cmos_bad(offset=1e300), _cmos_bad(offset="0"),
    _cmos_bad(since_last=-1.0), _cmos_bad(wday_delta=7), _cmos_bad(nmi_disabled=0), _cmos_bad(irq_level=None),
    _cmos_bad(held=[0, 0, 0, 1, 1, 1, 2000]),          # a held time while updates run
    _cmos_bad(held=[0, 0, 0, 1, 1, 13, 2000]), _cmos_bad(flags=KeyError), "not a dict",
])
def test_cmos_malformed_state_is_refused_and_changes_nothing(bad):
    cmos = Cmos(MiB, now=lambda: T0, timer=False)
    before = cmos.state()
    with pytest.raises(ValueError, match="CMOS/RTC state is malformed"):
        cmos.load_state(bad)
    assert cmos.state() == before


def test_cmos_stopped_divider_needs_its_held_time():
    state = _cmos_bad()
    ram = bytearray.fromhex(state["ram"])
    ram[REG_A] = 0x60 | (ram[REG_A] & 0x0F)   # divider in reset: updates stopped, so a held time is required
    state["ram"] = ram.hex()
    with pytest.raises(ValueError, match="held"):
        Cmos(MiB, timer=False).load_state(copy.deepcopy(state))
    state["held"] = [1, 2, 3, 1, 4, 5, 2006]
    b = Cmos.from_state(state, now=lambda: T0, timer=False)
    assert inb(b, SECONDS) == 0x01


# ---- device blobs stored by reference to the boot files -----------------------------------------

def test_fw_cfg_kernel_and_initrd_are_stored_by_reference_and_mapped_back(tmp_path):
    from pykvm.devices.fw_cfg import FW_CFG_INITRD_DATA, FW_CFG_KERNEL_DATA, FwCfg
    from pykvm.snapshot import read_state, write_state
    from pykvm.snapshot.machine_state import _refer_to_files, _resolve_files
    kernel, initrd = tmp_path / "bzImage", tmp_path / "initrd"
    kernel.write_bytes(b"setup" * 100 + bytes(range(256)) * 1024)
    initrd.write_bytes(b"\x07" * (200 << 10))
    fw = FwCfg(ram_size=64 * MiB, nb_cpus=1, max_cpus=1)
    fw.set_boot(kernel=kernel.read_bytes()[500:], initrd=initrd.read_bytes(), cmdline="console=ttyS0")
    files = [(str(p), p.read_bytes(), p.stat()) for p in (kernel, initrd)]
    path = tmp_path / "vm.state"
    size = write_state(str(path), {"devices": _refer_to_files({"fw": fw.state()}, files)})
    assert size < 10_000                        # the 456 KiB of boot files are not in the state file
    restored = FwCfg.from_state(_resolve_files(read_state(str(path))["devices"], {})["fw"])
    assert restored.item(FW_CFG_KERNEL_DATA) == fw.item(FW_CFG_KERNEL_DATA)
    assert restored.item(FW_CFG_INITRD_DATA) == initrd.read_bytes()
    initrd.write_bytes(b"\x08" * (201 << 10))   # the file changed since: refused, naming it
    with pytest.raises(SnapshotError, match=f"{initrd} changed since the snapshot"):
        _resolve_files(read_state(str(path))["devices"], {})
    initrd.unlink()
    with pytest.raises(SnapshotError, match=f"cannot open {initrd}"):
        _resolve_files(read_state(str(path))["devices"], {})
    with pytest.raises(SnapshotError, match="malformed"):
        _resolve_files({"x": {"$file": ["/etc/passwd", 0, 10, 5, 0]}}, {})
