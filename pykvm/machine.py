"""The Machine: a VM, its memory, its devices and its vCPU threads, and the VM-exit loop.

Life of a run::

    Machine(...)            open /dev/kvm, create the VM, map RAM, attach devices
    .load(plan)             copy a BootPlan's bytes into RAM and set each vCPU's registers
    .run(timeout)           one thread per vCPU loops on KVM_RUN; the calling thread waits
                            for the end (debug-exit, halt, shutdown, timeout, Ctrl-C, error)
    .close()                every thread joined, every descriptor closed

``KVM_RUN`` releases the GIL, so vCPUs run in parallel and Python runs only while an exit is
handled. That path is kept short: a table lookup by exit reason, the bus lookup, the device.
"""

from __future__ import annotations

import os
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from .boot import BootPlan
from .devices.bus import Bus, IrqLine
from .devices.debug_exit import PORT as DEBUG_EXIT_PORT
from .devices.debug_exit import DebugExit
from .devices.mmio_test import BASE as MMIO_TEST_BASE
from .devices.mmio_test import SIZE as MMIO_TEST_SIZE
from .devices.mmio_test import MmioTestDevice
from .devices.sink import POST_PORT, Sink
from .devices.uart import Uart16550
from .errors import KvmUnsupported, PykvmError
from .kvm import ExitReason, Kvm
from .kvm.abi import ffi
from .kvm.constants import (
    KVM_EXIT_IO_OUT,
    KVM_SYSTEM_EVENT_CRASH,
    KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
)
from .memory import GuestMemory
from .x86.registers import CR0, CR4, EFER

COM1_PORT, COM1_IRQ = 0x3F8, 4

# Exit statuses of a run (see README "Exit status").
STATUS_OK = 0
STATUS_CRASH = 4
STATUS_TIMEOUT = 124
STATUS_INTERRUPTED = 130

_KICK_SIGNAL = signal.SIGUSR1
_UNPACK = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I"), 8: struct.Struct("<Q")}


@dataclass
class RunResult:
    """How a run ended: the exit status pykvm reports, why, and (for crashes) a vCPU report."""

    status: int
    reason: str
    report: str = ""


class KvmIrqLine(IrqLine):
    """An interrupt line backed by KVM_IRQ_LINE on the in-kernel irqchip."""

    def __init__(self, vm, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi

    def set(self, level: bool) -> None:
        self._vm.irq_line(self.gsi, 1 if level else 0)


class Machine:
    """A PC-like VM: RAM, a COM1 UART, the debug-exit port, the MMIO test device, N vCPUs."""

    def __init__(self, mem_size: int = 64 << 20, cpus: int = 1, irqchip: bool = False,
                 serial_out: Callable[[bytes], None] | None = None) -> None:
        self._closing: list[Callable[[], None]] = []
        self.kvm = Kvm()
        self._closing.append(self.kvm.close)
        try:
            self._build(mem_size, cpus, irqchip, serial_out)
        except BaseException:
            self.close()
            raise

    def _build(self, mem_size, cpus, irqchip, serial_out) -> None:
        self.vm = self.kvm.create_vm()
        self._closing.insert(0, self.vm.close)
        self.irqchip = irqchip
        if irqchip:
            self.vm.set_tss_addr(0xFFFB_D000)          # three pages just below the firmware
            self.vm.set_identity_map_addr(0xFFFB_C000)
            self.vm.create_irqchip()
            self.vm.create_pit2()
        self.memory = GuestMemory(mem_size)
        self._closing.insert(0, self.memory.close)
        self.memory.register(self.vm)

        self.pio = Bus("port I/O")
        self.mmio = Bus("MMIO")
        self.uart = Uart16550(irq=KvmIrqLine(self.vm, COM1_IRQ) if irqchip else None,
                              out=serial_out or _stdout_write)
        self.pio.attach(self.uart, COM1_PORT, 8)
        self.pio.attach(DebugExit(self._on_debug_exit), DEBUG_EXIT_PORT, 1)
        self.pio.attach(Sink("POST"), POST_PORT, 1)
        self.mmio_test = MmioTestDevice()
        self.mmio.attach(self.mmio_test, MMIO_TEST_BASE, MMIO_TEST_SIZE)

        self.vcpus = [self.vm.create_vcpu(i) for i in range(cpus)]
        self.exit_counts = [[0] * 64 for _ in self.vcpus]   # per vCPU, per exit reason
        self._result: RunResult | None = None
        self._result_lock = threading.Lock()
        self._done = threading.Event()
        self._threads: list[threading.Thread] = []

    def close(self) -> None:
        self.stop_threads()
        for close in self._closing:
            close()
        self._closing = []

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- boot ------------------------------------------------------------------------------
    def load(self, plan: BootPlan) -> None:
        """Place a BootPlan's bytes in RAM and give every vCPU its initial state."""
        for gpa, data in plan.writes:
            self.memory.write(gpa, data)
        for vcpu in self.vcpus[:1]:   # APs stay in wait-for-SIPI, as on hardware
            _apply_cpu_state(vcpu, plan.cpu)

    # --- ending a run ----------------------------------------------------------------------
    def end(self, status: int, reason: str, report: str = "") -> None:
        """Record why the run ends (the first reason wins) and make every vCPU leave KVM_RUN."""
        with self._result_lock:
            if self._result is None:
                self._result = RunResult(status, reason, report)
        self._done.set()
        self.kick_all()

    def _on_debug_exit(self, value: int, status: int) -> None:
        self.end(status, f"guest wrote {value:#x} to the debug-exit port")

    def kick_all(self) -> None:
        """Force every vCPU thread out of KVM_RUN: immediate_exit covers a thread about to enter,
        the signal interrupts one already inside (KVM_RUN returns EINTR)."""
        for vcpu, thread in zip(self.vcpus, self._threads, strict=False):
            run = vcpu.run_struct
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
            if not self._done.wait(timeout):
                self.end(STATUS_TIMEOUT, f"timed out after {timeout:g} s; the guest was still running")
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
        """The VM-exit loop of one vCPU: run, dispatch on the exit reason, repeat."""
        run = vcpu.run_struct
        io, mmio = run.io, run.mmio
        data = memoryview(vcpu._map)
        mmio_data = ffi.offsetof("struct kvm_run", "mmio") + 8
        counts = self.exit_counts[vcpu.id]
        pio, mmio_bus, done = self.pio, self.mmio, self._done
        vcpu_run = vcpu.run
        slow = self._slow_exits
        IO, MMIO = ExitReason.IO, ExitReason.MMIO
        while not done.is_set():
            reason = vcpu_run()
            counts[reason] += 1
            if reason == IO:
                port, size, count, off = io.port, io.size, io.count, io.data_offset
                if count == 1:
                    if io.direction == KVM_EXIT_IO_OUT:
                        pio.write(port, size, _UNPACK[size].unpack_from(data, off)[0])
                    else:
                        _UNPACK[size].pack_into(data, off, pio.read(port, size))
                else:
                    self._string_io(vcpu, port, size, count, off, io.direction == KVM_EXIT_IO_OUT)
            elif reason == MMIO:
                addr, n = mmio.phys_addr, mmio.len
                if mmio.is_write:
                    mmio_bus.write(addr, n, int.from_bytes(data[mmio_data:mmio_data + n], "little"))
                else:
                    data[mmio_data:mmio_data + n] = mmio_bus.read(addr, n).to_bytes(n, "little")
            elif reason == -1:          # EINTR/EAGAIN: a kick or a woken AP; check `done` and go on
                run.immediate_exit = 0
            else:
                handler = slow.get(reason)
                if handler is None:
                    self.end(STATUS_CRASH, f"vCPU {vcpu.id}: unhandled exit reason {_reason_name(reason)}",
                             self.describe_vcpu(vcpu))
                    return
                handler(vcpu)

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
        }

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

    def _on_internal_error(self, vcpu) -> None:
        internal = vcpu.run_struct.internal
        self.end(STATUS_CRASH, f"vCPU {vcpu.id}: KVM internal error, suberror {internal.suberror}"
                 + _suberror_text(internal.suberror), self.describe_vcpu(vcpu))

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
        raise KvmUnsupported(
            f"this host's KVM ({host_backend()}) does not support {cpu.mode.description}: it accepted "
            f"the vCPU state but cleared {', '.join(dropped)}. "
            + ("kvm_pvm supports paging only in 64-bit long mode. " if host_backend() == "kvm_pvm" else "")
            + "Use a mode this host supports (real, prot32, long64) or a host with hardware KVM.")


def host_backend() -> str:
    """The KVM module in use: kvm_intel, kvm_amd, kvm_pvm, or 'unknown'."""
    for module in ("kvm_intel", "kvm_amd", "kvm_pvm"):
        if os.path.exists(f"/sys/module/{module}"):
            return module
    return "unknown"


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


def _stdout_write(data: bytes) -> None:
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except (BrokenPipeError, ValueError):
        pass


def _ignore_signal(signum, frame) -> None:
    pass


def wall_time() -> float:
    return time.monotonic()
