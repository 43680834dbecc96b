"""The Machine: a VM, its memory, its devices and its vCPU threads, and the VM-exit loop.

Life of a run::

    Machine(...)            open /dev/kvm, create the VM, map RAM, attach devices
    .load(plan)             copy a BootPlan's bytes into RAM and set the boot vCPU's registers
    .run(timeout)           one thread per vCPU loops on KVM_RUN; the calling thread waits
                            for the end (debug-exit, halt, shutdown, timeout, Ctrl-C, error)
    .close()                every thread joined, every descriptor closed

``KVM_RUN`` releases the GIL, so vCPUs run in parallel and Python runs only while an exit is
handled. That path (:meth:`Machine._exit_loop`) is kept short: one ``struct`` unpack of the exit,
a dict lookup of the port, the device's method.
"""

from __future__ import annotations

import errno
import signal
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from .boot import BIOS_AREA, BootPlan
from .boot.firmware import HANDOFF_ADDR, handoff_block
from .console import stdout_write
from .debug.stats import TOTAL as STATS_TOTAL
from .debug.stats import VcpuStats
from .devices.bus import Bus
from .devices.cmos import IRQ as RTC_IRQ
from .devices.cmos import Cmos
from .devices.debug_exit import PORT as DEBUG_EXIT_PORT
from .devices.debug_exit import DebugExit
from .devices.fw_cfg import FwCfg
from .devices.i8042 import I8042
from .devices.mmio_test import BASE as MMIO_TEST_BASE
from .devices.mmio_test import SIZE as MMIO_TEST_SIZE
from .devices.mmio_test import MmioTestDevice
from .devices.pci import PciConfigIo
from .devices.poweroff import PowerOff
from .devices.sink import POST_PORT, Sink
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
from .kvm import ExitReason, Ioctl, Kvm, KvmError
from .kvm.abi import ffi, libc
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
from .kvm.host import host_backend
from .kvm.irq import KvmIrqLine
from .memory import MMIO_HOLE_START, GuestMemory
from .x86 import emulate
from .x86.cpuid import vcpu_cpuid
from .x86.mptable import build_mptable
from .x86.registers import CR0, CR4, EFER

COM1_PORT, COM1_IRQ = 0x3F8, 4
CMOS_PORT = 0x70
I8042_DATA_PORT, I8042_COMMAND_PORT = 0x60, 0x64
PCI_CONFIG_PORT = 0xCF8
POWEROFF_PORT = 0x8900
FW_CFG_PORT = 0x510
# Ports that guests (Linux above all) probe and that need no behaviour: claimed as explicit sinks
# so probing is neither fatal nor counted as a stray access. With the in-kernel irqchip, KVM
# answers the PIC and PIT ports itself and these never see an access. (port, length, what)
PROBED_PORTS = [
    (0x20, 2, "PIC master"),
    (0xA0, 2, "PIC slave"),
    (0x40, 4, "PIT"),
    (0x61, 1, "PC speaker / NMI status"),
    (0x87, 1, "DMA page register"),
    (0xED, 1, "I/O delay port"),
    (0x2F8, 8, "COM2 (absent)"),
    (0x3E8, 8, "COM3 (absent)"),
    (0x2E8, 8, "COM4 (absent)"),
]
MAX_CPUS = 64
IDLE_POLL = 0.2     # seconds between idle probes when HLT is handled inside KVM
FIRMWARE_END = 1 << 32


_KICK_SIGNAL = signal.SIGUSR1
_PARKED = (KVM_MP_STATE_UNINITIALIZED, KVM_MP_STATE_INIT_RECEIVED)
_UNPACK = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}
# struct kvm_run, read in one unpack per exit (offsets proven by tests/test_abi.py):
# exit_reason at 8; io {direction, size, port, count, data_offset} at 32.
_RUN_IO = struct.Struct("<I20xBBHIQ")
_IO_AT = ffi.offsetof("struct kvm_run", "exit_reason")
# mmio {phys_addr, data[8], len, is_write} at 32.
_RUN_MMIO = struct.Struct("<Q8xIB")
_MMIO_AT = ffi.offsetof("struct kvm_run", "mmio")
_MMIO_DATA = _MMIO_AT + 8


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
            self.vm.set_tss_addr(0xFFFB_D000)
            self.vm.set_identity_map_addr(0xFFFB_C000)
            self.vm.create_irqchip()
            self.vm.create_pit2()
        self.memory = GuestMemory(mem_size)
        self._closing.insert(0, self.memory.close)
        self.firmware = firmware
        if firmware is not None:
            self.memory.add_rom(FIRMWARE_END - len(firmware), firmware)
        self.memory.register(self.vm)

        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.uart = Uart16550(irq=KvmIrqLine(self.vm, COM1_IRQ) if irqchip else None,
                              out=serial_out or stdout_write)
        self.pio.attach(self.uart, COM1_PORT, 8)
        self.pio.attach(DebugExit(self._on_debug_exit), DEBUG_EXIT_PORT, 1)
        self.pio.attach(Sink("POST"), POST_PORT, 1)
        self.cmos = Cmos(ram_below_4g=min(mem_size, MMIO_HOLE_START), ram_above_4g=max(0, mem_size - MMIO_HOLE_START),
                         irq=KvmIrqLine(self.vm, RTC_IRQ) if irqchip else None)
        self._closing.insert(0, self.cmos.close)    # its timer thread, if an interrupt was enabled
        self.pio.attach(self.cmos, CMOS_PORT, 2)
        i8042 = I8042(on_reset=self._on_reset)
        self.pio.attach(i8042.data, I8042_DATA_PORT, 1)
        self.pio.attach(i8042.command, I8042_COMMAND_PORT, 1)
        self.pio.attach(PciConfigIo(), PCI_CONFIG_PORT, 8)
        self.pio.attach(PowerOff(on_poweroff=self._on_poweroff), POWEROFF_PORT, 1)
        for port, length, name in PROBED_PORTS:
            self.pio.attach(Sink(name), port, length)
        self.fw_cfg = FwCfg(ram_size=mem_size, nb_cpus=cpus, max_cpus=cpus)
        self.pio.attach(self.fw_cfg, FW_CFG_PORT, 2)
        self.mmio_test = MmioTestDevice()
        self.mmio.attach(self.mmio_test, MMIO_TEST_BASE, MMIO_TEST_SIZE)

        self.vcpus = [self.vm.create_vcpu(i) for i in range(cpus)]
        supported = self.kvm.get_supported_cpuid()
        for vcpu in self.vcpus:
            vcpu.set_cpuid2(vcpu_cpuid(supported, apic_id=vcpu.id, ncpus=cpus))
        self.exit_counts = [[0] * 64 for _ in self.vcpus]   # per vCPU, per exit reason
        self.emulated: Counter[str] = Counter()   # instructions completed by pykvm.x86.emulate
        # Seeing inside (pykvm/debug): statistics are always collected, per vCPU; the tracer and the
        # debug control (single-step, gdb) are set by the caller before run(), or stay None.
        self.stats = [VcpuStats() for _ in self.vcpus]
        self.tracer = None
        self.debug = None
        # Idle detection (in-kernel irqchip only): what each vCPU reported when last probed.
        self._probe = [False] * cpus
        self._idle: list[tuple[int, int, int] | None] = [None] * cpus   # (mp_state, if_flag, exits)
        self._result: RunResult | None = None
        self._result_lock = threading.Lock()
        self._done = threading.Event()

    def close(self) -> None:
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
        finds the plan's entry state in a hand-off block instead. Application processors stay
        parked until the guest sends them INIT/SIPI, as on hardware."""
        for gpa, data in plan.writes:
            self.memory.write(gpa, data)
        if self.irqchip:
            # KVM's default GSI routing wires the PIT (GSI 0) to IOAPIC pin 0, so the table says so.
            self.memory.write(BIOS_AREA[0], build_mptable(len(self.vcpus), BIOS_AREA[0], irq0_pin=0))
        self.fw_cfg.set_boot(kernel=plan.kernel, initrd=plan.initrd, cmdline=plan.cmdline)
        if self.firmware is None:
            _apply_cpu_state(self.vcpus[0], plan.cpu)
        else:
            self.memory.write(HANDOFF_ADDR, handoff_block(plan.cpu))

    # --- ending a run ----------------------------------------------------------------------
    def end(self, status: int, reason: str, report: str = "") -> None:
        """Record why the run ends (the first reason wins) and make every vCPU leave KVM_RUN."""
        with self._result_lock:
            if self._result is None:
                self._result = RunResult(status, reason, report)
        self._done.set()
        self.kick_all()
        if self.debug is not None:   # vCPUs stopped for a debugger must wake up to leave
            self.debug.machine_ended(self._result)

    def _on_reset(self) -> None:
        self.end(STATUS_OK, "the guest reset the machine (i8042 reset line)")

    def _on_poweroff(self) -> None:
        self.end(STATUS_OK, "the guest powered off (Bochs/QEMU shutdown port)")

    def _on_debug_exit(self, value: int, status: int) -> None:
        self.end(status, f"guest wrote {value:#x} to the debug-exit port")

    def kick_all(self) -> None:
        for i in range(len(self._threads)):
            self._kick(i)

    def _kick(self, i: int) -> None:
        """Force vCPU i's thread out of KVM_RUN: immediate_exit covers a thread about to enter,
        the signal interrupts one already inside (KVM_RUN returns EINTR)."""
        run, thread = self.vcpus[i].run_struct, self._threads[i]
        if run is not None:
            run.immediate_exit = 1
        if thread.is_alive() and thread.ident is not None and thread is not threading.current_thread():
            try:
                signal.pthread_kill(thread.ident, _KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def stop_threads(self) -> None:
        if self._threads:
            self.end(STATUS_CRASH, "stopped")
            for thread in self._threads:
                thread.join()
            self._threads = []

    # --- running ---------------------------------------------------------------------------
    def run(self, timeout: float | None = None) -> RunResult:
        """Run until the guest ends; returns how it ended. Ctrl-C ends it with status 130."""
        in_main = threading.current_thread() is threading.main_thread()
        old_handler = signal.signal(_KICK_SIGNAL, _ignore_signal) if in_main else None
        self._threads = [threading.Thread(target=self._vcpu_thread, args=(vcpu,), name=f"vcpu{vcpu.id}",
                                          daemon=True) for vcpu in self.vcpus]
        try:
            for thread in self._threads:
                thread.start()
            self._wait(timeout)
        except KeyboardInterrupt:
            self.end(STATUS_INTERRUPTED, "interrupted (Ctrl-C)")
        finally:
            self.kick_all()
            for thread in self._threads:
                thread.join()
            self._threads = []
            if in_main:
                signal.signal(_KICK_SIGNAL, old_handler)
        assert self._result is not None
        return self._result

    def _wait(self, timeout: float | None) -> None:
        """Wait for the end; meanwhile enforce the timeout and look for a machine that went idle."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = IDLE_POLL if self.irqchip else None
            if deadline is not None:
                left = max(deadline - time.monotonic(), 0)
                wait = left if wait is None else min(wait, left)
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
        since it was last seen (kick it out; it reports its MP state). When every vCPU is halted
        with interrupts off, or parked waiting for a SIPI, and none has run since saying so, the
        machine can never do anything again: the run ends, as it would on a HLT exit."""
        if self.debug is not None and self.debug.holding():
            return    # stopped in the debugger: not idle, and the vCPUs cannot answer a probe
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
            self._exit_loop(vcpu)
        except PykvmError as e:
            self.end(STATUS_CRASH, f"vCPU {vcpu.id}: {e}", self.describe_vcpu(vcpu))
        except Exception as e:   # a bug in pykvm: report it like a crash, never hang
            import traceback
            self.end(STATUS_CRASH, f"vCPU {vcpu.id}: internal error in pykvm: {e!r}",
                     traceback.format_exc())

    def _exit_loop(self, vcpu) -> None:
        """The VM-exit loop of one vCPU: KVM_RUN, dispatch on the exit reason, repeat.

        This is the hot path, so it binds everything to locals, calls the ioctl directly rather
        than through Vcpu.run, reads each exit with a single struct unpack over the kvm_run page,
        and finds port devices in the bus's cache. Rarer exits go through a table.

        Every exit's handling time (KVM_RUN's return to the next KVM_RUN) goes into the record of
        its port, MMIO address or reason (pykvm.debug.stats): recorded at the top of the next
        iteration, or in the ``finally`` for the last one. Tracing costs one ``is not None`` test
        when off; the debug control (gdb, --step) is consulted only on INTR and DEBUG exits."""
        run = vcpu.run_struct
        data = memoryview(vcpu._map)
        counts = self.exit_counts[vcpu.id]
        ioctl, fd, request, null = libc.ioctl, vcpu.fd, int(Ioctl.KVM_RUN), ffi.NULL
        read_io, read_mmio = _RUN_IO.unpack_from, _RUN_MMIO.unpack_from
        unpack = {n: s.unpack_from for n, s in _UNPACK.items()}
        pack = {n: s.pack_into for n, s in _UNPACK.items()}
        pio, pio_cache, mmio_bus, mmio_cache = self.pio, self.pio.cache, self.mmio, self.mmio.cache
        done = self._done
        slow = self._slow_exits
        IO, MMIO, INTR = int(ExitReason.IO), int(ExitReason.MMIO), int(ExitReason.INTR)
        stats = self.stats[vcpu.id]
        by_reason, by_port, by_addr = stats.reasons, stats.pio, stats.mmio
        pio_record, mmio_record, intr_rec = stats.pio_record, stats.mmio_record, stats.reasons[INTR]
        now, TOTAL = time.perf_counter_ns, STATS_TOTAL
        tracer = None if self.tracer is None else self.tracer.for_vcpu(vcpu)
        debug = self.debug
        if debug is not None:
            debug.checkpoint(vcpu)          # --gdb-wait: stopped before the first instruction
        rec, t0 = stats.scratch, now()      # the statistics record of the exit being handled
        try:
            while True:
                dt = now() - t0
                rec[(dt * dt).bit_length()] += 1    # half-octave histogram bucket
                rec[TOTAL] += dt
                if ioctl(fd, request, null) < 0:
                    err = ffi.errno
                    t0, rec = now(), intr_rec
                    if err != errno.EINTR and err != errno.EAGAIN:
                        raise KvmError(Ioctl.KVM_RUN, err, f"vcpu {vcpu.id}")
                    counts[INTR] += 1           # a kick (or a woken AP): see whether we should stop
                    run.immediate_exit = 0
                    if done.is_set():
                        return
                    if self._probe[vcpu.id]:
                        self._probe[vcpu.id] = False
                        self._idle[vcpu.id] = (vcpu.get_mp_state(), run.if_flag, sum(counts))
                    if debug is not None and debug.checkpoint(vcpu):
                        t0 = now()              # time stopped in the debugger is not handling time
                    continue
                t0 = now()
                reason, direction, size, port, count, off = read_io(data, _IO_AT)
                counts[reason] += 1
                if reason == IO:
                    rec = by_port.get(port) or pio_record(port)
                    if count == 1:
                        hit = pio_cache.get(port)       # (device.read, device.write, offset)
                        if direction == KVM_EXIT_IO_OUT:
                            if hit is None:
                                pio.write(port, size, unpack[size](data, off)[0])
                            else:
                                hit[1](hit[2], size, unpack[size](data, off)[0])
                        else:
                            pack[size](data, off, pio.read(port, size) if hit is None else hit[0](hit[2], size))
                    else:
                        self._string_io(vcpu, port, size, count, off, direction == KVM_EXIT_IO_OUT)
                elif reason == MMIO:
                    addr, n, is_write = read_mmio(data, _MMIO_AT)
                    rec = by_addr.get(addr) or mmio_record(addr)
                    if n not in unpack:
                        raise PykvmError(f"MMIO access of {n} bytes at {addr:#x}: KVM should never report that")
                    hit = mmio_cache.get(addr)
                    if is_write:
                        if hit is None:
                            mmio_bus.write(addr, n, unpack[n](data, _MMIO_DATA)[0])
                        else:
                            hit[1](hit[2], n, unpack[n](data, _MMIO_DATA)[0])
                    else:
                        pack[n](data, _MMIO_DATA, mmio_bus.read(addr, n) if hit is None else hit[0](hit[2], n))
                else:
                    rec = by_reason[reason]
                    handler = slow.get(reason)
                    if handler is None:
                        self.end(STATUS_CRASH, f"vCPU {vcpu.id}: unhandled exit reason {_reason_name(reason)}",
                                 self.describe_vcpu(vcpu))
                        return
                    if handler(vcpu):               # True: the vCPU was stopped for the debugger
                        t0 = now()
                    # A handler that ends the run kicked this vCPU too (immediate_exit): the next
                    # KVM_RUN returns at once with EINTR and the loop leaves there.
                if tracer is not None:
                    tracer()
        finally:
            dt = now() - t0
            rec[(dt * dt).bit_length()] += 1
            rec[TOTAL] += dt

    def _string_io(self, vcpu, port: int, size: int, count: int, off: int, out: bool) -> None:
        """rep outs/ins: ``count`` elements of ``size`` bytes in the kvm_run data area, one by one."""
        buf = vcpu.run_data(off, size * count)
        unpack = _UNPACK[size]
        for i in range(count):
            if out:
                self.pio.write(port, size, unpack.unpack_from(buf, i * size)[0])
            else:
                unpack.pack_into(buf, i * size, self.pio.read(port, size))

    # --- the rarer exits -------------------------------------------------------------------
    @property
    def _slow_exits(self) -> dict[int, Callable]:
        return {
            ExitReason.HLT: self._on_hlt,
            ExitReason.SHUTDOWN: self._on_shutdown,
            ExitReason.FAIL_ENTRY: self._on_fail_entry,
            ExitReason.INTERNAL_ERROR: self._on_internal_error,
            ExitReason.SYSTEM_EVENT: self._on_system_event,
            ExitReason.DEBUG: self._on_debug,
        }

    def _on_debug(self, vcpu) -> bool:
        """KVM_EXIT_DEBUG: a single-step, hardware or software breakpoint of the debug control.
        Returns True when the vCPU was stopped for the debugger."""
        if self.debug is None:   # nobody asked for guest debugging: KVM should never exit so
            self.end(STATUS_CRASH, f"vCPU {vcpu.id}: unexpected KVM_EXIT_DEBUG", self.describe_vcpu(vcpu))
            return False
        return self.debug.on_debug_exit(vcpu)

    def _on_hlt(self, vcpu) -> None:
        # Only seen without an in-kernel irqchip: then nothing can ever wake the vCPU again.
        if vcpu.run_struct.if_flag:
            self.end(STATUS_OK, f"vCPU {vcpu.id} halted with interrupts enabled, but this machine has no "
                                "interrupt source to wake it")
        else:
            self.end(STATUS_OK, f"vCPU {vcpu.id} halted with interrupts disabled")

    def _on_shutdown(self, vcpu) -> None:
        self.end(STATUS_CRASH, f"vCPU {vcpu.id}: triple fault (KVM_EXIT_SHUTDOWN): the guest took an exception "
                               "it could not handle", self.describe_vcpu(vcpu))

    def _on_fail_entry(self, vcpu) -> None:
        reason = vcpu.run_struct.fail_entry.hardware_entry_failure_reason
        self.end(STATUS_CRASH, f"vCPU {vcpu.id}: KVM could not enter the guest (KVM_EXIT_FAIL_ENTRY, hardware "
                               f"reason {reason:#x}): the vCPU state is invalid", self.describe_vcpu(vcpu))

    def _on_internal_error(self, vcpu) -> bool | None:
        suberror = vcpu.run_struct.internal.suberror
        if suberror != KVM_INTERNAL_ERROR_EMULATION:
            self.end(STATUS_CRASH, f"vCPU {vcpu.id}: KVM internal error, suberror {suberror}"
                     + _suberror_text(suberror), self.describe_vcpu(vcpu))
            return
        insn = self._failed_instruction(vcpu)
        if self.debug is not None and insn[:1] == bytes([emulate.INT3]) and self.debug.on_int3(vcpu):
            return True   # one of gdb's breakpoints (kvm_pvm: int3 at CPL0 is an emulation failure)
        outcome = emulate.complete(vcpu, insn)
        self.emulated[outcome.reason] += 1
        if outcome.resumed:
            return
        if outcome.reset:
            self.end(STATUS_OK, f"vCPU {vcpu.id}: {outcome.reason}")
            return
        self.end(STATUS_CRASH, f"vCPU {vcpu.id}: KVM could not emulate {_name_instruction(vcpu, insn)} at RIP, "
                 "and it is not one of the instructions pykvm completes (int3, fwait)", self.describe_vcpu(vcpu))

    def _failed_instruction(self, vcpu) -> bytes:
        """The bytes of the instruction KVM gave up on: from the exit when KVM supplies them
        (KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES), else read at RIP through the
        guest's page tables."""
        failure = vcpu.run_struct.emulation_failure
        if failure.ndata >= 3 and failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES:
            return bytes(failure.insn_bytes[0:min(failure.insn_size, 15)])
        from .debug.report import code_at_rip
        try:
            return code_at_rip(vcpu, self.memory, 15)[1]
        except Exception:   # RIP may point anywhere: then there is nothing to complete
            return b""

    def _on_system_event(self, vcpu) -> None:
        kind = vcpu.run_struct.system_event.type
        if kind == KVM_SYSTEM_EVENT_SHUTDOWN:
            self.end(STATUS_OK, "the guest powered off")
        elif kind == KVM_SYSTEM_EVENT_RESET:
            self.end(STATUS_OK, "the guest asked for a reset")
        elif kind == KVM_SYSTEM_EVENT_CRASH:
            self.end(STATUS_CRASH, "the guest reported a crash", self.describe_vcpu(vcpu))
        else:
            self.end(STATUS_CRASH, f"unhandled system event {kind}", self.describe_vcpu(vcpu))

    # --- reports ---------------------------------------------------------------------------
    def describe_vcpu(self, vcpu) -> str:
        """Registers, CPU mode and the instructions at RIP, for a report after an abnormal end."""
        from .debug.report import describe_vcpu
        try:
            return describe_vcpu(vcpu, self.memory)
        except Exception as e:   # the report must never hide the original problem
            return f"(could not read vCPU {vcpu.id} state: {e})"


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
    from .debug.report import code_bits
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


def _ignore_signal(signum, frame) -> None:
    pass
