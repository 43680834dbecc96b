"""The Machine: a VM, its memory, its devices and its vCPU threads, and the VM-exit loop.

Life of a run::

    Machine(...)            open /dev/kvm, create the VM, map RAM, attach devices
    .load(plan)             copy a BootPlan's bytes into RAM and set the boot vCPU's registers
    .run(timeout)           one thread per vCPU loops on KVM_RUN; the calling thread waits
                            for the end (debug-exit, halt, shutdown, timeout, Ctrl-C, error)
    .close()                every thread joined, every descriptor closed

``KVM_RUN`` releases the GIL, so vCPUs run in parallel and Python runs only while an exit is
handled. That path is :meth:`Machine._exit_loop`: ``exit = vcpu.run()`` (a typed exit, one
``struct`` unpack), ``table[reason](exit)`` (:class:`ExitHandlers`), the time charged to the
exit's statistics record. A run can be paused and resumed from any thread (:meth:`Machine.pause`).
"""

from __future__ import annotations

import math
import signal
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from . import board
from .boot import BIOS_AREA, BootPlan
from .boot.firmware import HANDOFF_ADDR, handoff_block
from .console import stdout_write
from .debug.stats import VcpuStats
from .devices.bus import Bus
from .devices.cmos import Cmos
from .devices.debug_exit import DebugExit
from .devices.fw_cfg import FwCfg
from .devices.i8042 import I8042
from .devices.mmio_test import MmioTestDevice
from .devices.pci import PciConfigIo
from .devices.poweroff import PowerOff
from .devices.sink import Sink
from .devices.uart import Uart16550
from .errors import (
    STATUS_CRASH,
    STATUS_INTERRUPTED,
    STATUS_OK,
    STATUS_TIMEOUT,
    KvmUnsupported,
    PykvmError,
    UsageError,
)
from .kvm import ExitReason, Kvm
from .kvm.abi import ffi
from .kvm.constants import (
    KVM_EXIT_IO_OUT,
    KVM_INTERNAL_ERROR_EMULATION,
    KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES,
    KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED,
    KVM_MP_STATE_UNINITIALIZED,
    KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
)
from .kvm.exits import MMIO_DATA, NREASONS
from .kvm.host import host_backend
from .kvm.irq import KvmIrqLine
from .memory import MMIO_HOLE_START, GuestMemory
from .x86 import emulate
from .x86.cpuid import vcpu_cpuid
from .x86.mptable import build_mptable
from .x86.registers import CR0, CR4, EFER, INT3

MAX_CPUS = 64
IDLE_POLL = 0.2     # seconds between idle probes when HLT is handled inside KVM


KICK_SIGNAL = signal.SIGUSR1   # sent to a vCPU thread to make KVM_RUN return (never delivered: see below)
JOIN_POLL = 0.1     # seconds: how often the end of a run re-kicks vCPU threads it is joining
_PARKED = (KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_INIT_RECEIVED)


@dataclass
class RunResult:
    """How a run ended: the exit status pykvm reports, why, and (for crashes) a vCPU report."""

    status: int
    reason: str
    report: str = ""


class Machine:
    """A PC-like VM: RAM, legacy devices, the MMIO test device, N vCPUs, optional firmware."""

    def __init__(self, mem_size: int = 64 << 20, cpus: int = 1, irqchip: bool = False,
                 serial_out: Callable[[bytes], None] | None = None, firmware: bytes | None = None) -> None:
        if not 1 <= cpus <= MAX_CPUS:
            raise UsageError(f"--cpus must be between 1 and {MAX_CPUS}, not {cpus}")
        self._closing: list[Callable[[], None]] = []
        self._threads: list[threading.Thread] = []
        self.kvm = Kvm()
        self._closing.append(self.kvm.close)
        try:
            # Application processors are started with INIT/SIPI through the local APIC.
            self._build(mem_size, cpus, irqchip or cpus > 1, serial_out, firmware)
        except BaseException:
            self.close()
            raise

    def _build(self, mem_size, cpus, irqchip, serial_out, firmware) -> None:
        self.vm = self.kvm.create_vm()
        self._closing.insert(0, self.vm.close)
        self.irqchip = irqchip
        if irqchip:
            # Intel needs three pages for a real-mode TSS and one for an identity map; any
            # guest-physical space that is not RAM will do: just below the firmware.
            self.vm.set_tss_addr(board.TSS_ADDR)
            self.vm.set_identity_map_addr(board.IDENTITY_MAP_ADDR)
            self.vm.create_irqchip()
            self.vm.create_pit2()
        self.memory = GuestMemory(mem_size)
        self._closing.insert(0, self.memory.close)
        self.firmware = firmware
        if firmware is not None:
            self.memory.add_rom(board.FIRMWARE_END - len(firmware), firmware)
        self.memory.register(self.vm)

        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.uart = Uart16550(irq=KvmIrqLine(self.vm, board.COM1_IRQ) if irqchip else None,
                              out=serial_out or stdout_write)
        i8042 = I8042(on_reset=self._on_reset)
        self.fw_cfg = FwCfg(ram_size=mem_size, nb_cpus=cpus, max_cpus=cpus)
        self.mmio_test = MmioTestDevice()
        self.cmos = cmos = Cmos(ram_below_4g=min(mem_size, MMIO_HOLE_START),
                                ram_above_4g=max(0, mem_size - MMIO_HOLE_START),
                                irq=KvmIrqLine(self.vm, board.RTC_IRQ) if irqchip else None)
        self._closing.insert(0, cmos.close)    # its timer thread, if an interrupt was enabled
        for device, place in [(self.uart, board.COM1), (DebugExit(self._on_debug_exit), board.DEBUG_EXIT),
                              (Sink("POST"), board.POST), (cmos, board.CMOS), (i8042.data, board.I8042_DATA),
                              (i8042.command, board.I8042_COMMAND), (PciConfigIo(), board.PCI_CONFIG),
                              (PowerOff(on_poweroff=self._on_poweroff), board.POWEROFF), (self.fw_cfg, board.FW_CFG)]:
            self.pio.attach(device, place.base, place.length)
        for port, length, name in board.PROBED_PORTS:
            self.pio.attach(Sink(name), port, length)
        self.mmio.attach(self.mmio_test, board.MMIO_TEST.base, board.MMIO_TEST.length)

        self.vcpus = [self.vm.create_vcpu(i) for i in range(cpus)]
        supported = self.kvm.get_supported_cpuid()
        for vcpu in self.vcpus:
            vcpu.set_cpuid2(vcpu_cpuid(supported, apic_id=vcpu.id, ncpus=cpus))
        self.exit_counts = [[0] * NREASONS for _ in self.vcpus]   # per vCPU, per exit reason
        self.emulated: Counter[str] = Counter()   # instructions completed by pykvm.x86.emulate
        # Seeing inside (pykvm/debug): statistics are always collected, per vCPU; the tracer and the
        # debug control (single-step, gdb) are set by the caller before run(), or stay None.
        self.stats = [VcpuStats() for _ in self.vcpus]
        self.tracer = None
        self.debug = None
        # Idle detection (in-kernel irqchip only): what each vCPU reported when last probed.
        self._probe = [False] * cpus
        self._idle: list[tuple[int, int, int] | None] = [None] * cpus   # (mp_state, if_flag, exits)
        self._results: list[RunResult] = []    # why the run ended; the first one counts
        self._done = threading.Event()
        # Pause (Machine.pause): vCPU threads hold on this condition while _pause_requested.
        self._hold = threading.Condition()
        self._pause_requested = False
        self._held = 0          # vCPU threads holding
        self._running = 0       # vCPU threads in their exit loop
        # Devices paused and resumed with the vCPUs (pykvm.devices.quiesce), in the order added.
        self._quiescables: list = [self.uart, cmos]

    def close(self) -> None:
        """Join every vCPU thread, then close devices, memory, the VM and /dev/kvm (idempotent)."""
        self.stop_threads()
        for close in self._closing:
            close()
        self._closing = []

    def on_close(self, close: Callable[[], None]) -> None:
        """Call ``close`` first when the machine closes (e.g. a debugger's listening socket)."""
        self._closing.insert(0, close)

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- boot ------------------------------------------------------------------------------
    def load(self, plan: BootPlan) -> None:
        """Place a BootPlan's bytes in RAM and start the boot vCPU in the plan's state.

        With firmware, the vCPU keeps its reset state (real mode at 0xFFFFFFF0) and the firmware
        finds the plan's entry state in a hand-off block instead, and fw_cfg offers the plan's kernel and
        initrd (items 0x08-0x12) for it to read; a direct boot offers only the command line. Application
        processors stay parked until the guest sends them INIT/SIPI, as on hardware."""
        for gpa, data in plan.writes:
            self.memory.write(gpa, data)
        if self.irqchip:
            # KVM's default GSI routing wires the PIT (GSI 0) to IOAPIC pin 0, so the table says so.
            self.memory.write(BIOS_AREA[0], build_mptable(len(self.vcpus), BIOS_AREA[0], irq0_pin=0))
        if self.firmware is None:
            # A direct boot: the kernel and initrd are in guest RAM already and no firmware will load them, so
            # fw_cfg offers only the command line. (QEMU offers the kernel and initrd items for its firmware to
            # load; Firecracker, which boots directly, has no fw_cfg.) Keeping them would cost their size in
            # this process for the VM's life: 16 MiB for the small Linux.
            self.fw_cfg.set_boot(cmdline=plan.cmdline)
            _apply_cpu_state(self.vcpus[0], plan.cpu)
        else:
            self.fw_cfg.set_boot(kernel=plan.kernel, initrd=plan.initrd, cmdline=plan.cmdline)
            self.memory.write(HANDOFF_ADDR, handoff_block(plan.cpu))

    # --- ending a run ----------------------------------------------------------------------
    def end(self, status: int, reason: str, report: str = "") -> None:
        """Record why the run ends (the first reason wins) and make every vCPU leave KVM_RUN.

        Callable from any thread, any number of times; takes no lock a signal could leave held
        (the first of the appended results wins: ``list.append`` is atomic)."""
        self._results.append(RunResult(status, reason, report))
        self._done.set()
        self._wake_held()
        self.kick_all()
        if self.debug is not None:   # vCPUs stopped for a debugger must wake up to leave
            self.debug.machine_ended(self._results[0])

    @property
    def _result(self) -> RunResult | None:
        return self._results[0] if self._results else None

    def _on_reset(self) -> None:
        self.end(STATUS_OK, "the guest reset the machine (i8042 reset line)")

    def _on_poweroff(self) -> None:
        self.end(STATUS_OK, "the guest powered off (Bochs/QEMU shutdown port)")

    def _on_debug_exit(self, value: int, status: int) -> None:
        self.end(status, f"guest wrote {value:#x} to the debug-exit port")

    def kick_all(self) -> None:
        """Force every vCPU thread out of KVM_RUN (see :meth:`_kick`); any thread."""
        for i in range(len(self._threads)):
            self._kick(i)

    def _kick(self, i: int) -> None:
        """Force vCPU i's thread out of KVM_RUN: immediate_exit covers a thread about to enter,
        KICK_SIGNAL one already inside (KVM_RUN returns EINTR; see :func:`_start_vcpu_thread`)."""
        threads = self._threads
        if i >= len(threads):
            return
        run, thread = self.vcpus[i].run_struct, threads[i]
        if run is not None:
            run.immediate_exit = 1
        if thread.is_alive() and thread.ident is not None and thread is not threading.current_thread():
            try:
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def stop_threads(self) -> None:
        """End the run (if any) and join every vCPU thread."""
        if self._threads:
            self.end(STATUS_CRASH, "stopped")
            self._join_all()

    # --- pause and resume --------------------------------------------------------------------
    def add_quiescable(self, device) -> None:
        """Pause and resume ``device`` with the vCPUs: an object with ``pause(timeout) -> bool`` and
        ``resume()`` (the protocol of :mod:`pykvm.devices.quiesce`). The UART and the RTC are added at
        build; :func:`pykvm.devices.virtio.attach_virtio` adds the virtio devices."""
        self._quiescables.append(device)

    def pause(self, timeout: float | None = None) -> bool:
        """Make every vCPU leave KVM_RUN and stay out, then quiesce the devices: returns True once all
        vCPUs are out (or the run ended) and every device thread is parked, so that nothing writes guest
        memory or raises an interrupt until :meth:`resume` (:mod:`pykvm.devices.quiesce`); False after
        ``timeout`` seconds if given (some vCPU has not left yet, or a device thread has not parked:
        call :meth:`resume`).

        Callable from any thread but a vCPU's. A paused vCPU waits on a condition variable and a parked
        device thread on its own (no CPU). The guest's state stays in KVM, so :meth:`resume` continues
        exactly where it was; device work that arrived meanwhile (notifications, frames, console input,
        RTC events) waits where it arrived and is done after resume."""
        with self._hold:
            self._pause_requested = True
        self.kick_all()
        with self._hold:
            if not self._hold.wait_for(lambda: self._done.is_set() or self._held >= self._running, timeout):
                return False
        ok = True
        for device in list(self._quiescables):
            ok = device.pause(timeout) and ok
        return ok

    def resume(self) -> None:
        """Let the devices work and the paused vCPUs run again (a no-op when not paused); any thread."""
        for device in list(self._quiescables):
            device.resume()
        with self._hold:
            self._pause_requested = False
            self._hold.notify_all()

    @property
    def paused(self) -> bool:
        """True between pause() and resume()."""
        return self._pause_requested

    def _hold_if_paused(self) -> bool:
        """vCPU thread, out of KVM_RUN: wait while the machine is paused. True if it waited."""
        if not self._pause_requested:
            return False
        with self._hold:
            self._held += 1
            self._hold.notify_all()
            while self._pause_requested and not self._done.is_set():
                self._hold.wait()
            self._held -= 1
        return True

    def _wake_held(self) -> None:
        with self._hold:
            self._hold.notify_all()

    # --- running ---------------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> RunResult:
        """Run until the guest ends; returns how it ended. Callable from any thread.

        ``timeout`` is in seconds (None: no limit); expiry ends the run with status 124. Ctrl-C
        (KeyboardInterrupt in the calling thread) ends it with status 130. Raises UsageError for a
        timeout that is not a finite number >= 0."""
        if timeout is not None and not (isinstance(timeout, (int, float)) and math.isfinite(timeout)
                                        and timeout >= 0):
            raise UsageError(f"the timeout must be a finite number of seconds >= 0, not {timeout!r}")
        # Threads inherit the signal mask: block the kick signal before creating them, so that
        # no kick can ever reach a vCPU thread unblocked (see _start_vcpu_thread).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        try:
            self._threads = [threading.Thread(target=self._vcpu_thread, args=(vcpu,), name=f"vcpu{vcpu.id}",
                                              daemon=True) for vcpu in self.vcpus]
            self._running = len(self._threads)
            for thread in self._threads:
                thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        try:
            self._wait(timeout)
        except KeyboardInterrupt:
            self.end(STATUS_INTERRUPTED, "interrupted (Ctrl-C)")
        finally:
            self._join_all()
        assert self._result is not None
        return self._result

    def _join_all(self) -> None:
        """Kick and join every vCPU thread; a second Ctrl-C meanwhile cannot leave one behind."""
        while self._threads:
            try:
                if not self._done.is_set():
                    self.end(STATUS_CRASH, "stopped")
                self.kick_all()
                for thread in self._threads:
                    thread.join(JOIN_POLL)
                if not any(thread.is_alive() for thread in self._threads):
                    self._threads = []
            except KeyboardInterrupt:
                self.end(STATUS_INTERRUPTED, "interrupted (Ctrl-C)")

    def _wait(self, timeout: float | None) -> None:
        """Wait for the end; meanwhile enforce the timeout and look for a machine that went idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = IDLE_POLL if self.irqchip else JOIN_POLL * 10
            if deadline is not None:
                wait = min(wait, max(deadline - time.monotonic(), 0.0))
            if self._done.wait(wait):
                return
            if deadline is not None and time.monotonic() >= deadline:
                self.end(STATUS_TIMEOUT, f"timed out after {timeout:g} s; the guest was still running")
                return
            if self.irqchip:
                self._check_idle()

    def _check_idle(self) -> None:
        """With an in-kernel irqchip, HLT never reaches us: a vCPU that halts with interrupts off
        just sleeps inside KVM_RUN. So every IDLE_POLL seconds, probe each vCPU that took no exit
        since it was last seen halted with interrupts off (kick it out; it reports its MP state). When
        every vCPU is halted with interrupts off, or parked waiting for a SIPI, and none has run since
        saying so, the machine can never do anything again: the run ends, as it would on a HLT exit.
        A vCPU seen running, or halted with interrupts on, is probed again even without an exit since:
        it can reach ``cli; hlt`` without one (Linux's halt after its last console write)."""
        if self._pause_requested or (self.debug is not None and self.debug.holding()):
            return    # paused or stopped in the debugger: not idle, and the vCPUs cannot answer a probe
        dead = 0
        for i in range(len(self.vcpus)):
            idle = self._idle[i]
            if idle is not None and idle[2] == sum(self.exit_counts[i]):
                state, if_flag, _ = idle
                if (state == KVM_MP_STATE_HALTED and not if_flag) or state in _PARKED:
                    dead += 1
                    continue
            self._probe[i] = True
            self._kick(i)
        if dead == len(self.vcpus) and any(idle[0] == KVM_MP_STATE_HALTED for idle in self._idle):
            self.end(STATUS_OK, "every vCPU halted with interrupts disabled")

    def _vcpu_thread(self, vcpu) -> None:
        try:
            _start_vcpu_thread(vcpu)
            self._exit_loop(vcpu)
        except PykvmError as e:
            self.end(STATUS_CRASH, f"vCPU {vcpu.id}: {e}", self.describe_vcpu(vcpu))
        except Exception as e:   # a bug in pykvm: report it like a crash, never hang
            import traceback
            self.end(STATUS_CRASH, f"vCPU {vcpu.id}: internal error in pykvm: {e!r}",
                     traceback.format_exc())
        finally:
            with self._hold:
                self._running -= 1
                self._hold.notify_all()

    def _exit_loop(self, vcpu) -> None:
        """The VM-exit loop of one vCPU: run to the next exit, hand it to its handler, repeat.

        A handler (:class:`ExitHandlers`) returns the statistics record the exit is charged to,
        or None to leave the loop. The time charged is pykvm's handling of the exit, from
        KVM_RUN's return to the next KVM_RUN (pykvm.debug.stats). Kicks, pause, idle probes and
        the debugger's checkpoint are all in the handler of an interrupted run (INTR)."""
        handlers = ExitHandlers(self, vcpu)
        table, run = handlers.by_reason(), vcpu.run      # table[reason]: a handler for every reason
        counts, record, now = self.exit_counts[vcpu.id], self.stats[vcpu.id].record, time.perf_counter_ns
        trace = None if self.tracer is None else self.tracer.for_vcpu(vcpu)
        if handlers.checkpoint():
            return                          # ended while held before the first instruction
        while True:
            exit = run()
            t0 = now()
            reason = exit[0]
            counts[reason] += 1
            rec = table[reason](exit)
            if rec is None:
                return
            if trace is not None:
                trace()
            record(rec, now() - t0)

    # --- reports ---------------------------------------------------------------------------
    def describe_vcpu(self, vcpu) -> str:
        """Registers, CPU mode and the instructions at RIP, for a report after an abnormal end."""
        from .debug.report import describe_vcpu
        try:
            return describe_vcpu(vcpu, self.memory)
        except Exception as e:   # the report must never hide the original problem
            return f"(could not read vCPU {vcpu.id} state: {e})"


class _BySize(dict):
    """size -> accessor of the kvm_run data area; a size KVM should never report is a clear error."""

    def __missing__(self, size):
        raise PykvmError(f"an access of {size} bytes: KVM reports port I/O of 1, 2 or 4 and MMIO of 1 to 8")


def _get_bytes(n: int):
    def get(buf, at: int) -> tuple[int]:
        return (int.from_bytes(buf[at:at + n], "little"),)
    return get


def _put_bytes(n: int):
    def put(buf, at: int, value: int) -> None:
        buf[at:at + n] = value.to_bytes(n, "little")
    return put


_STRUCTS = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}
_GET = _BySize({n: _STRUCTS[n].unpack_from if n in _STRUCTS else _get_bytes(n) for n in range(1, 9)})
_PUT = _BySize({n: _STRUCTS[n].pack_into if n in _STRUCTS else _put_bytes(n) for n in range(1, 9)})


class ExitHandlers:
    """What each kind of exit does, for one vCPU: ``table[reason](exit)``.

    ``exit`` is the tuple :meth:`pykvm.kvm.Vcpu.run` returns (pykvm.kvm.exits). A handler returns
    the statistics record to charge the exit to, or None when the vCPU must leave its loop (the run
    is over). Only the parts of the machine an exit touches are used (``pio``, ``mmio``, ``stats``,
    ``exit_counts``, ``end``, ``debug``, ``memory``, ``emulated``, ``describe_vcpu``, pause and
    idle-probe state), so tests/test_dispatch.py builds one around stand-ins and feeds it canned
    exits without /dev/kvm."""

    def __init__(self, machine, vcpu) -> None:
        self.machine, self.vcpu = machine, vcpu
        self.stats = machine.stats[vcpu.id]
        self.table: dict[int, Callable[[tuple], list[int] | None]] = {
            ExitReason.IO: self._io_handler(),
            ExitReason.MMIO: self._mmio_handler(),
            ExitReason.INTR: self.on_interrupted,
            ExitReason.HLT: self.on_hlt,
            ExitReason.SHUTDOWN: self.on_shutdown,
            ExitReason.FAIL_ENTRY: self.on_fail_entry,
            ExitReason.INTERNAL_ERROR: self.on_internal_error,
            ExitReason.SYSTEM_EVENT: self.on_system_event,
            ExitReason.DEBUG: self.on_debug,
        }

    def by_reason(self) -> list[Callable[[tuple], list[int] | None]]:
        """The table as a list indexed by exit reason (0..NREASONS-1), on_unknown where none."""
        return [self.table.get(reason, self.on_unknown) for reason in range(NREASONS)]

    # --- the frequent exits: closures over what they need, one Bus lookup (its cache) each ---
    def _io_handler(self) -> Callable[[tuple], list[int]]:
        buf, read, write = self.vcpu.run_buffer, self.machine.pio.read, self.machine.pio.write
        records, new_record, string_io = self.stats.pio, self.stats.pio_record, self.string_io
        get, put, OUT = _GET, _PUT, KVM_EXIT_IO_OUT

        def on_io(exit: tuple) -> list[int]:
            """KVM_EXIT_IO: the data is at data_offset in the kvm_run mapping."""
            _, direction, size, port, count, offset = exit
            if count != 1:
                string_io(direction == OUT, size, port, count, offset)
            elif direction == OUT:
                write(port, size, get[size](buf, offset)[0])
            else:
                put[size](buf, offset, read(port, size))
            return records.get(port) or new_record(port)
        return on_io

    def _mmio_handler(self) -> Callable[[tuple], list[int]]:
        buf, read, write = self.vcpu.run_buffer, self.machine.mmio.read, self.machine.mmio.write
        records, new_record = self.stats.mmio, self.stats.mmio_record
        get, put, DATA = _GET, _PUT, MMIO_DATA

        def on_mmio(exit: tuple) -> list[int]:
            """KVM_EXIT_MMIO: 1 to 8 bytes, the data in kvm_run's mmio.data."""
            _, addr, size, is_write = exit
            if is_write:
                write(addr, size, get[size](buf, DATA)[0])
            else:
                put[size](buf, DATA, read(addr, size))
            return records.get(addr) or new_record(addr)
        return on_mmio

    def string_io(self, out: bool, size: int, port: int, count: int, offset: int) -> None:
        """rep outs/ins: ``count`` elements of ``size`` bytes in the kvm_run data area, one by one."""
        data, bus = self.vcpu.run_data(offset, size * count), self.machine.pio
        get, put = _GET[size], _PUT[size]
        for i in range(count):
            if out:
                bus.write(port, size, get(data, i * size)[0])
            else:
                put(data, i * size, bus.read(port, size))

    # --- an interrupted run: kicks, pause, idle probes, the debugger ---------------------------
    def checkpoint(self) -> bool:
        """Before the first KVM_RUN and after a kick: hold while paused or stopped in the debugger.
        Returns True if the run is over."""
        machine, vcpu = self.machine, self.vcpu
        machine._hold_if_paused()
        if machine.debug is not None:
            machine.debug.checkpoint(vcpu)
        return machine._done.is_set()

    def on_interrupted(self, exit: tuple) -> list[int] | None:
        """KVM_EXIT_INTR (KVM_RUN returned EINTR/EAGAIN): someone wants this vCPU's attention."""
        machine, vcpu, rec = self.machine, self.vcpu, self.stats.reasons[ExitReason.INTR]
        vcpu.run_struct.immediate_exit = 0
        _drain_kicks()
        if machine._done.is_set():
            return None
        if machine._probe[vcpu.id]:
            machine._probe[vcpu.id] = False
            machine._idle[vcpu.id] = (vcpu.get_mp_state(), vcpu.run_struct.if_flag,
                                      sum(machine.exit_counts[vcpu.id]))
        if machine._pause_requested or (machine.debug is not None and machine.debug.holding()):
            handled = time.perf_counter_ns()
            if self.checkpoint():
                return None
            self.stats.record(rec, time.perf_counter_ns() - handled)  # not the time held
            return self.stats.scratch
        if machine.debug is not None and machine.debug.checkpoint(vcpu):
            return self.stats.scratch
        return rec

    # --- the rarer exits ---------------------------------------------------------------------
    def on_unknown(self, exit: tuple) -> None:
        """Any exit reason pykvm has no handler for: the run ends with status 4."""
        self.machine.end(STATUS_CRASH, f"vCPU {self.vcpu.id}: unhandled exit reason {_reason_name(exit[0])}",
                         self.machine.describe_vcpu(self.vcpu))
        return None

    def on_debug(self, exit: tuple) -> list[int]:
        """KVM_EXIT_DEBUG: a single-step, hardware or software breakpoint of the debug control."""
        machine, vcpu = self.machine, self.vcpu
        if machine.debug is None:   # nobody asked for guest debugging: KVM should never exit so
            machine.end(STATUS_CRASH, f"vCPU {vcpu.id}: unexpected KVM_EXIT_DEBUG", machine.describe_vcpu(vcpu))
        elif machine.debug.on_debug_exit(vcpu):
            return self.stats.scratch     # stopped for the debugger: that time is not handling
        return self.stats.reasons[ExitReason.DEBUG]

    def on_hlt(self, exit: tuple) -> list[int]:
        """KVM_EXIT_HLT, seen only without an in-kernel irqchip: nothing can ever wake the vCPU."""
        vcpu = self.vcpu
        if vcpu.run_struct.if_flag:
            self.machine.end(STATUS_OK, f"vCPU {vcpu.id} halted with interrupts enabled, but this machine has "
                                        "no interrupt source to wake it")
        else:
            self.machine.end(STATUS_OK, f"vCPU {vcpu.id} halted with interrupts disabled")
        return self.stats.reasons[ExitReason.HLT]

    def on_shutdown(self, exit: tuple) -> list[int]:
        """KVM_EXIT_SHUTDOWN: a triple fault."""
        self.machine.end(STATUS_CRASH, f"vCPU {self.vcpu.id}: triple fault (KVM_EXIT_SHUTDOWN): the guest took "
                         "an exception it could not handle", self.machine.describe_vcpu(self.vcpu))
        return self.stats.reasons[ExitReason.SHUTDOWN]

    def on_fail_entry(self, exit: tuple) -> list[int]:
        """KVM_EXIT_FAIL_ENTRY: the vCPU state is one the hardware refuses to enter."""
        _, reason, _cpu = exit
        self.machine.end(STATUS_CRASH, f"vCPU {self.vcpu.id}: KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, "
                         f"hardware reason {reason:#x}): the vCPU state is invalid",
                         self.machine.describe_vcpu(self.vcpu))
        return self.stats.reasons[ExitReason.FAIL_ENTRY]

    def on_system_event(self, exit: tuple) -> list[int]:
        """KVM_EXIT_SYSTEM_EVENT: shutdown, reset or a crash the guest reported."""
        kind, machine = exit[1], self.machine
        if kind == KVM_SYSTEM_EVENT_SHUTDOWN:
            machine.end(STATUS_OK, "the guest powered off")
        elif kind == KVM_SYSTEM_EVENT_RESET:
            machine.end(STATUS_OK, "the guest asked for a reset")
        elif kind == KVM_SYSTEM_EVENT_CRASH:
            machine.end(STATUS_CRASH, "the guest reported a crash", machine.describe_vcpu(self.vcpu))
        else:
            machine.end(STATUS_CRASH, f"unhandled system event {kind}", machine.describe_vcpu(self.vcpu))
        return self.stats.reasons[ExitReason.SYSTEM_EVENT]

    def on_internal_error(self, exit: tuple) -> list[int]:
        """KVM_EXIT_INTERNAL_ERROR: emulation failures go to pykvm.x86.emulate, the rest end the run."""
        machine, vcpu, rec = self.machine, self.vcpu, self.stats.reasons[ExitReason.INTERNAL_ERROR]
        _, suberror, ndata, flags, insn_size, insn_bytes = exit
        if suberror != KVM_INTERNAL_ERROR_EMULATION:
            machine.end(STATUS_CRASH, f"vCPU {vcpu.id}: KVM internal error, suberror {suberror}"
                        + _suberror_text(suberror), machine.describe_vcpu(vcpu))
            return rec
        if ndata >= 3 and flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            insn = insn_bytes[:min(insn_size, len(insn_bytes))]
        else:
            insn = _instruction_at_rip(vcpu, machine.memory)
        if machine.debug is not None and insn[:1] == bytes([INT3]) and machine.debug.on_int3(vcpu):
            return self.stats.scratch    # one of gdb's breakpoints (kvm_pvm: int3 at CPL0 is an emulation failure)
        outcome = emulate.complete(insn, vcpu.get_sregs().idt.limit if insn[:1] == bytes([INT3]) else 1)
        machine.emulated[outcome.reason] += 1
        if outcome.resumed:
            if outcome.advance:
                vcpu.advance_rip(outcome.advance)
            if outcome.inject is not None:
                vcpu.inject_exception(outcome.inject)
        elif outcome.reset:
            machine.end(STATUS_OK, f"vCPU {vcpu.id}: {outcome.reason}")
        else:
            machine.end(STATUS_CRASH, f"vCPU {vcpu.id}: KVM could not emulate {_name_instruction(vcpu, insn)} at "
                        "RIP, and it is not one of the instructions pykvm completes (int3, fwait)",
                        machine.describe_vcpu(vcpu))
        return rec


def _instruction_at_rip(vcpu, memory) -> bytes:
    """Up to 15 bytes at the vCPU's RIP, read through the guest's page tables; b"" if unreadable."""
    from .debug.report import code_at_rip
    try:
        return code_at_rip(vcpu, memory, 15)[1]
    except Exception:   # RIP may point anywhere: then there is nothing to complete
        return b""


def _drain_kicks() -> None:
    """Consume a pending kick signal, so that the next KVM_RUN does not return EINTR at once."""
    while signal.sigtimedwait((KICK_SIGNAL,), 0) is not None:
        pass


def _start_vcpu_thread(vcpu) -> None:
    """How kicks reach a vCPU thread without any signal handler (so any thread may run a Machine).

    The thread was created with KICK_SIGNAL blocked (Machine.run blocks it before starting the
    threads, which inherit the mask). KVM_SET_SIGNAL_MASK makes KVM_RUN run with it *unblocked*:
    a kick sent while the thread is inside KVM_RUN interrupts it (EINTR); outside, it stays
    pending, and the INTR handler consumes it with sigtimedwait. It is never delivered, so the
    signal's default action (terminate) and any handler an embedder set are never involved."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, ())
    vcpu.set_signal_mask({int(s) for s in blocked} - {int(KICK_SIGNAL)})


def _apply_cpu_state(vcpu, cpu) -> None:
    sregs = vcpu.get_sregs()
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = cpu.cs if name == "cs" else cpu.ds
        target = getattr(sregs, name)
        for key in ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl", "unusable"):
            setattr(target, key, getattr(seg, key))
    sregs.gdt.base, sregs.gdt.limit = cpu.gdt
    sregs.idt.base, sregs.idt.limit = cpu.idt
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer
    vcpu.set_sregs(sregs)
    _check_mode_taken(vcpu, cpu)
    regs = ffi.new("struct kvm_regs *")
    for key, value in cpu.regs.items():
        setattr(regs, key, value)
    vcpu.set_regs(regs)


def _check_mode_taken(vcpu, cpu) -> None:
    """Read the control registers back: a KVM backend may accept KVM_SET_SREGS yet drop a mode bit
    (kvm_pvm keeps CR0.PG clear outside long mode), and the guest would then die on its first
    instruction with a confusing triple fault. Say so plainly instead."""
    got = vcpu.get_sregs()
    wanted = {"CR0.PE": (cpu.cr0, got.cr0, CR0.PE), "CR0.PG": (cpu.cr0, got.cr0, CR0.PG),
              "CR4.PAE": (cpu.cr4, got.cr4, CR4.PAE), "EFER.LME": (cpu.efer, got.efer, EFER.LME)}
    dropped = [name for name, (want, have, bit) in wanted.items() if want & bit and not have & bit]
    if dropped:
        backend = host_backend()
        raise KvmUnsupported(
            f"this host's KVM ({backend}) does not support {cpu.mode.description}: it accepted "
            f"the vCPU state but cleared {', '.join(dropped)}. "
            + ("kvm_pvm supports paging only in 64-bit long mode. " if backend == "kvm_pvm" else "")
            + "Use a mode this host supports (real, prot32, long64) or a host with hardware KVM.")


def _name_instruction(vcpu, insn: bytes) -> str:
    """'`popcnt rbx, rax` (f3 48 0f b8 d8)': the first instruction of ``insn``, decoded in the
    vCPU's current code size, or its raw bytes if it cannot be decoded."""
    from .debug.disasm import disassemble
    from .x86.modes import code_bits
    try:
        decoded = disassemble(insn, 0, code_bits(vcpu.get_sregs()), limit=1)
    except PykvmError:
        decoded = []
    if not decoded:
        return f"the instruction with bytes {insn.hex(' ') or '(unavailable)'}"
    _, raw, text = decoded[0]
    return f"`{text}` ({raw.hex(' ')})"


def _reason_name(reason: int) -> str:
    try:
        return f"KVM_EXIT_{ExitReason(reason).name} ({reason})"
    except ValueError:
        return str(reason)


def _suberror_text(suberror: int) -> str:
    return {
        1: " (emulation: KVM could not emulate the instruction at RIP)",
        2: " (an exception occurred while delivering another)",
        3: " (an event could not be delivered)",
        4: " (unexpected exit reason inside KVM)",
    }.get(suberror, "")

