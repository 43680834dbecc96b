"""The exit loop's dispatch without /dev/kvm: canned exits (pykvm.kvm.exits tuples) fed to the
handlers of pykvm.machine and to the loop itself, around a stand-in machine and vCPU.

What a user would see: port and MMIO accesses reach the right device with the right value, reads
land in the kvm_run data area where KVM picks them up, odd-width MMIO (lds, page-split) works, the
rare exits end the run with the documented status and reason, and every exit is counted and
charged to its statistics record."""

from __future__ import annotations

import struct
import threading
from collections import Counter
from types import SimpleNamespace

import pytest

from pykvm.debug.stats import BUCKETS, VcpuStats
from pykvm.devices.bus import MAX_UNCLAIMED, Bus
from pykvm.devices.mmio_test import MmioTestDevice
from pykvm.errors import STATUS_CRASH, STATUS_OK
from pykvm.kvm.abi import ffi
from pykvm.kvm.constants import (
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_SYSTEM_EVENT_RESET,
    ExitReason,
)
from pykvm.kvm.exits import INTR_EXIT, MMIO_DATA, InternalErrorExit, IoExit, MmioExit, SystemEventExit, decode
from pykvm.machine import ExitHandlers, Machine
from pykvm.x86 import emulate
from pykvm.x86.registers import Vector

DATA = 0x1000     # where KVM puts port I/O data in the kvm_run mapping (io.data_offset)


class Recorder:
    """A device that remembers every access and answers reads from a table."""

    def __init__(self, answers=None) -> None:
        self.log: list[tuple] = []
        self.answers = answers or {}

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return self.answers.get((offset, size), 0)

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


class FakeVcpu:
    def __init__(self, exits=()) -> None:
        self.id = 0
        self.run_buffer = memoryview(bytearray(0x3000))
        self.run_struct = SimpleNamespace(immediate_exit=0, if_flag=0)
        self.exits = list(exits)
        self.rip_moves: list[int] = []
        self.injected: list[int] = []
        self.sregs = ffi.new("struct kvm_sregs *")
        self.sregs.idt.limit = 0xFFF
        self.sregs.cs.db = 1
        self.sregs.cr0 = 1

    def run(self):
        return self.exits.pop(0)

    def run_data(self, offset, length):
        return self.run_buffer[offset:offset + length]

    def get_sregs(self):
        return self.sregs

    def get_mp_state(self):
        return 0

    def advance_rip(self, n):
        self.rip_moves.append(n)

    def inject_exception(self, vector):
        self.injected.append(vector)


class FakeMachine:
    """Exactly the parts of a Machine the handlers and the loop use."""

    _exit_loop = Machine._exit_loop

    def __init__(self) -> None:
        self.pio, self.mmio = Bus("port I/O"), Bus("MMIO")
        self.stats = [VcpuStats()]
        self.exit_counts = [[0] * 64]
        self.emulated: Counter[str] = Counter()
        self.debug = self.tracer = self.memory = None
        self.ends: list[tuple] = []
        self._done = threading.Event()
        self._probe, self._idle = [False], [None]
        self._pause_requested = False

    def end(self, status, reason, report=""):
        self.ends.append((status, reason))
        self._done.set()

    def describe_vcpu(self, vcpu):
        return "registers..."

    def _hold_if_paused(self):
        return False


@pytest.fixture
def rig():
    machine, vcpu = FakeMachine(), FakeVcpu()
    return machine, vcpu, ExitHandlers(machine, vcpu)


def count_of(rec) -> int:
    return sum(rec[:BUCKETS])


def test_port_write_reaches_the_device_with_the_guests_value(rig):
    machine, vcpu, h = rig
    dev = Recorder()
    machine.pio.attach(dev, 0x3F8, 8)
    struct.pack_into("<H", vcpu.run_buffer, DATA, 0xBEEF)
    rec = h.table[ExitReason.IO](IoExit(ExitReason.IO, KVM_EXIT_IO_OUT, 2, 0x3FA, 1, DATA))
    assert dev.log == [("w", 2, 2, 0xBEEF)]
    assert rec is machine.stats[0].pio[0x3FA]


def test_port_read_lands_in_the_data_area(rig):
    machine, vcpu, h = rig
    machine.pio.attach(Recorder({(0, 4): 0x12345678}), 0x510, 2)
    h.table[ExitReason.IO](IoExit(ExitReason.IO, KVM_EXIT_IO_IN, 4, 0x510, 1, DATA))
    assert struct.unpack_from("<I", vcpu.run_buffer, DATA)[0] == 0x12345678
    h.table[ExitReason.IO](IoExit(ExitReason.IO, KVM_EXIT_IO_IN, 1, 0x1234, 1, DATA))   # nobody there
    assert vcpu.run_buffer[DATA] == 0xFF and machine.pio.unclaimed[0x1234] == 1


def test_string_io_goes_element_by_element(rig):
    machine, vcpu, h = rig
    dev = Recorder()
    machine.pio.attach(dev, 0x80, 1)
    vcpu.run_buffer[DATA:DATA + 3] = b"abc"
    h.table[ExitReason.IO](IoExit(ExitReason.IO, KVM_EXIT_IO_OUT, 1, 0x80, 3, DATA))
    assert dev.log == [("w", 0, 1, ord("a")), ("w", 0, 1, ord("b")), ("w", 0, 1, ord("c"))]


def test_mmio_write_and_read_of_every_width(rig):
    machine, vcpu, h = rig
    dev = MmioTestDevice()
    machine.mmio.attach(dev, 0xD000_0000, 0x1000)
    vcpu.run_buffer[MMIO_DATA:MMIO_DATA + 8] = (0x0018_1234_5678).to_bytes(8, "little")
    h.table[ExitReason.MMIO](MmioExit(ExitReason.MMIO, 0xD000_0008, 8, 1))
    assert dev.scratch == 0x0018_1234_5678
    # lds eax, [scratch] in 32-bit mode: one 6-byte read (offset, then the selector)
    vcpu.run_buffer[MMIO_DATA:MMIO_DATA + 8] = bytes(8)
    rec = h.table[ExitReason.MMIO](MmioExit(ExitReason.MMIO, 0xD000_0008, 6, 0))
    assert bytes(vcpu.run_buffer[MMIO_DATA:MMIO_DATA + 6]) == (0x0018_1234_5678).to_bytes(6, "little")
    assert rec is machine.stats[0].mmio[0xD000_0008]
    # a 4-byte read at 0xcfffffff is split by KVM at the page boundary: 1 byte unclaimed, then 3
    h.table[ExitReason.MMIO](MmioExit(ExitReason.MMIO, 0xCFFF_FFFF, 1, 0))
    assert vcpu.run_buffer[MMIO_DATA] == 0xFF
    h.table[ExitReason.MMIO](MmioExit(ExitReason.MMIO, 0xD000_0000, 3, 0))
    assert bytes(vcpu.run_buffer[MMIO_DATA:MMIO_DATA + 3]) == b"MMI"
    for width in (3, 5, 7):   # unclaimed reads are all ones of the access's width
        vcpu.run_buffer[MMIO_DATA:MMIO_DATA + 8] = bytes(8)
        h.table[ExitReason.MMIO](MmioExit(ExitReason.MMIO, 0xE000_0000, width, 0))
        assert bytes(vcpu.run_buffer[MMIO_DATA:MMIO_DATA + 8]) == b"\xff" * width + bytes(8 - width)


def test_an_impossible_width_is_a_clear_error(rig):
    _, _, h = rig
    with pytest.raises(Exception, match="access of 9 bytes"):
        h.table[ExitReason.MMIO](MmioExit(ExitReason.MMIO, 0xD000_0000, 9, 0))


def test_unclaimed_addresses_are_bounded_and_counted(rig):
    machine, _, h = rig
    for i in range(MAX_UNCLAIMED + 100):
        h.table[ExitReason.MMIO](MmioExit(ExitReason.MMIO, 0xE000_0000 + 8 * i, 4, 1))
    assert len(machine.mmio.unclaimed) == MAX_UNCLAIMED and machine.mmio.unclaimed_overflow == 100


def test_halt_shutdown_and_system_events_end_the_run(rig):
    machine, _, h = rig
    h.table[ExitReason.HLT]((int(ExitReason.HLT),))
    h.table[ExitReason.SHUTDOWN]((int(ExitReason.SHUTDOWN),))
    h.table[ExitReason.SYSTEM_EVENT](SystemEventExit(ExitReason.SYSTEM_EVENT, KVM_SYSTEM_EVENT_RESET, 0))
    h.on_unknown((99,))
    statuses = [s for s, _ in machine.ends]
    assert statuses == [STATUS_OK, STATUS_CRASH, STATUS_OK, STATUS_CRASH]
    assert "halted with interrupts disabled" in machine.ends[0][1]
    assert "triple fault" in machine.ends[1][1] and "reset" in machine.ends[2][1]
    assert "unhandled exit reason 99" in machine.ends[3][1]


def _emulation_failure(insn: bytes) -> InternalErrorExit:
    return InternalErrorExit(ExitReason.INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION, 3,
                             KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES, len(insn),
                             insn.ljust(15, b"\0"))


def test_emulation_failures_are_completed_or_reported(rig):
    machine, vcpu, h = rig
    h.table[ExitReason.INTERNAL_ERROR](_emulation_failure(b"\xcc"))         # int3: past it, then #BP
    assert vcpu.rip_moves == [1] and vcpu.injected == [Vector.BP] and not machine.ends
    h.table[ExitReason.INTERNAL_ERROR](_emulation_failure(b"\x9b"))         # fwait: past it
    assert vcpu.rip_moves == [1, 1] and vcpu.injected == [Vector.BP]
    vcpu.sregs.idt.limit = 0
    h.table[ExitReason.INTERNAL_ERROR](_emulation_failure(b"\xcc"))         # int3, no IDT: a reset
    assert machine.ends[-1][0] == STATUS_OK and "reboot" in machine.ends[-1][1]
    h.table[ExitReason.INTERNAL_ERROR](_emulation_failure(b"\xf3\x0f\xb8\xc3"))   # popcnt eax, ebx
    assert machine.ends[-1][0] == STATUS_CRASH and "popcnt" in machine.ends[-1][1]
    assert machine.emulated == {"int3: #BP injected": 1, "fwait: completed": 1,
                                "int3 with an empty IDT: the guest is forcing a reboot": 1,
                                "not an instruction pykvm completes": 1}


def test_emulate_decides_and_does_no_io():
    assert emulate.complete(b"\x66\xcc", idt_limit=0xFFF) == emulate.Outcome(True, "int3: #BP injected",
                                                                            advance=2, inject=Vector.BP)
    assert emulate.complete(b"", idt_limit=0xFFF).resumed is False


def test_the_loop_dispatches_counts_and_charges_every_exit():
    machine = FakeMachine()
    dev = Recorder({(0, 1): 0x41})
    machine.pio.attach(dev, 0x3F8, 8)
    vcpu = FakeVcpu([IoExit(ExitReason.IO, KVM_EXIT_IO_OUT, 1, 0x3F8, 1, DATA),
                     IoExit(ExitReason.IO, KVM_EXIT_IO_IN, 1, 0x3F8, 1, DATA),
                     (int(ExitReason.HLT),),
                     INTR_EXIT])           # the kick that end() sends: the loop leaves
    machine._exit_loop(vcpu)
    assert not vcpu.exits and dev.log == [("w", 0, 1, 0), ("r", 0, 1)]
    counts = machine.exit_counts[0]
    assert (counts[ExitReason.IO], counts[ExitReason.HLT], counts[ExitReason.INTR], sum(counts)) == (2, 1, 1, 4)
    stats = machine.stats[0]
    assert count_of(stats.pio[0x3F8]) == 2 and count_of(stats.reasons[ExitReason.HLT]) == 1
    assert machine.ends == [(STATUS_OK, "vCPU 0 halted with interrupts disabled")]


def test_a_kick_without_an_end_runs_on(rig):
    machine, _, h = rig
    assert h.table[ExitReason.INTR](INTR_EXIT) is machine.stats[0].reasons[ExitReason.INTR]
    machine.end(STATUS_OK, "done")
    assert h.table[ExitReason.INTR](INTR_EXIT) is None


def test_decode_reads_the_kvm_run_layout():
    buf = bytearray(4096)
    run = ffi.from_buffer("struct kvm_run *", buf)
    run.exit_reason = ExitReason.IO
    run.io.direction, run.io.size, run.io.port, run.io.count, run.io.data_offset = 1, 2, 0x3F8, 1, 0x1000
    assert decode(buf) == IoExit(ExitReason.IO, 1, 2, 0x3F8, 1, 0x1000)
    run.exit_reason = ExitReason.MMIO
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xD000_0008, 6, 0
    assert decode(buf) == MmioExit(ExitReason.MMIO, 0xD000_0008, 6, 0)
    run.exit_reason = ExitReason.HLT
    assert decode(buf) == (ExitReason.HLT,)
    ffi.release(run)


def test_odd_widths_reach_a_device_as_natural_pieces(rig):
    machine, vcpu, h = rig
    dev = Recorder({(0, 4): 0x44332211, (4, 2): 0x6655, (6, 1): 0x77})
    machine.mmio.attach(dev, 0xE000_0000, 16)
    h.table[ExitReason.MMIO](MmioExit(ExitReason.MMIO, 0xE000_0000, 7, 0))
    assert dev.log == [("r", 0, 4), ("r", 4, 2), ("r", 6, 1)]
    assert bytes(vcpu.run_buffer[MMIO_DATA:MMIO_DATA + 7]) == bytes.fromhex("11223344556677")
    vcpu.run_buffer[MMIO_DATA:MMIO_DATA + 3] = b"\x01\x02\x03"
    h.table[ExitReason.MMIO](MmioExit(ExitReason.MMIO, 0xE000_0008, 3, 1))
    assert dev.log[3:] == [("w", 8, 2, 0x0201), ("w", 10, 1, 0x03)]


def test_a_vcpu_seen_running_is_probed_again_until_it_is_seen_halted_with_interrupts_off():
    """Linux's halt: its last console write (an exit), then cli; hlt inside KVM with no exit. A probe that
    caught it between the two saw it running; without another probe the run never ended (a timeout
    after 240 s in a loaded CI run)."""
    from pykvm.kvm.constants import KVM_MP_STATE_HALTED, KVM_MP_STATE_RUNNABLE
    machine = FakeMachine()
    machine.vcpus, machine.debug, kicked = [FakeVcpu()], None, []
    machine._kick = kicked.append
    machine._idle = [(KVM_MP_STATE_RUNNABLE, 0, 0)]            # seen running, no exit since
    Machine._check_idle(machine)
    assert kicked == [0] and machine._probe == [True] and not machine.ends
    machine._idle = [(KVM_MP_STATE_HALTED, 0, 0)]              # the probe's answer: halted, IF clear
    Machine._check_idle(machine)
    assert kicked == [0] and machine.ends == [(STATUS_OK, "every vCPU halted with interrupts disabled")]
