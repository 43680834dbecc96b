"""Stopping, stepping and resuming vCPUs: what the gdb stub and ``--step`` need from the Machine.

The exit loop consults this object in exactly three places, none of them on the I/O fast path:

* :meth:`DebugControl.checkpoint` before the first KVM_RUN and after every kick (an INTR exit):
  a vCPU the debugger holds *parks* there, waiting on a condition variable. A parked vCPU is not
  in KVM_RUN, so the stub's thread may issue its vCPU ioctls (registers, guest debug).
* :meth:`DebugControl.on_debug_exit` for KVM_EXIT_DEBUG: a single-step trap, a hardware
  breakpoint (debug registers), or a software breakpoint's #BP.
* :meth:`DebugControl.on_int3` when KVM's emulator gave up on an ``int3`` (kvm_pvm runs CPL0
  code in KVM's emulator, which does not deliver it as a debug exit): a breakpoint of ours stops
  the vCPU with RIP at the int3; the guest's own int3 goes on to pykvm.x86.emulate, which injects #BP.

All-stop, as gdb expects: when one vCPU stops (breakpoint, step), every other vCPU is kicked out
of KVM_RUN and parks too; the first event is the one reported. An event that loses that race is
not lost for good: the vCPU is parked *at* its breakpoint and hits it again when resumed.

What each vCPU runs with is applied by its own thread when it leaves the park (KVM_SET_GUEST_DEBUG
with ENABLE, USE_SW_BP, USE_HW_BP + DR0-3/DR7, SINGLESTEP). A step also gets a *guard*: a hardware
breakpoint on the next sequential instruction (when the instruction at RIP is not a jump, call,
return or interrupt, and a debug register is free). On kvm_pvm the single-step trap is lost when
the stepped instruction ends in a port or MMIO write exit (the backend completes the instruction
before exiting); the guard stops the vCPU where the trap should have. On hardware KVM the trap
comes first and the guard never fires.

``--step N`` uses the same machinery without gdb: the boot vCPU runs with SINGLESTEP for its
first N instructions and each step prints the instruction executed and the registers it changed.
With ``--step-from ADDR`` a hardware breakpoint at ADDR (the *trigger*) starts the stepping.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

from ..kvm.constants import (
    KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_HW_BP,
    KVM_GUESTDBG_USE_SW_BP,
)
from ..memory import GuestMemoryError
from ..x86.modes import linear_rip
from ..x86.paging import PageFault
from ..x86.registers import Vector
from .breakpoints import SoftwareBreakpoints
from .disasm import transfers_control
from .step import StepPrinter, instruction_at

SIGINT, SIGTRAP = 2, 5
DB_VECTOR, BP_VECTOR = Vector.DB, Vector.BP
DR6_BS = 1 << 14              # DR6: single-step trap
DR7_FIXED = 1 << 10           # DR7 bit 10 reads as 1
NSLOTS = 4                    # DR0-DR3
# DR7 R/W field per kind of hardware breakpoint (gdb's Z1..Z4)
HW_EXEC, HW_WRITE, HW_ACCESS = 0, 1, 3
_LEN_BITS = {1: 0, 2: 1, 8: 2, 4: 3}


@dataclass
class StopEvent:
    """Why the machine stopped: the vCPU, the signal gdb is told, and what happened."""

    vcpu: int
    signal: int = SIGTRAP
    kind: str = ""          # "swbreak", "hwbreak", "watch", "awatch", "step", "" (interrupt, attach)
    addr: int = 0


@dataclass
class HwBreakpoint:
    addr: int
    kind: int = HW_EXEC     # HW_EXEC, HW_WRITE, HW_ACCESS
    length: int = 1


class DebugError(Exception):
    """A debugger request that cannot be done (no free debug register, unmapped address...)."""


class DebugControl:
    """Shared by the vCPU threads and the debugger's thread; see the module docstring."""

    def __init__(self, machine, wait: bool = False, step: int = 0, step_from: int | None = None,
                 out=None) -> None:
        self.machine = machine
        self.memory = machine.memory
        self.vcpus = machine.vcpus
        self.out = out if out is not None else sys.stderr
        self._cond = threading.Condition()
        ids = [v.id for v in self.vcpus]
        # The vCPUs allowed to run. Read without the lock on the exit loop's INTR path (a set
        # membership test); changed only under it.
        self._go: set[int] = set() if wait else set(ids)
        self._parked: set[int] = set()
        self._started: set[int] = set()
        self.event: StopEvent | None = StopEvent(ids[0]) if wait else None
        self.ended = None                    # the RunResult, once the machine ended
        self.listener = None                 # called (any thread) when all vCPUs stopped, or the run ended
        self.sw = SoftwareBreakpoints(self.memory)          # keyed by the physical byte they patch
        self._over: dict[int, int] = {}      # vCPU -> physical byte it is stepping over (an alias hit)
        self.hw: list[HwBreakpoint | None] = [None] * NSLOTS
        self._stepping: set[int] = set()     # vCPUs the debugger is single-stepping
        self._guard: dict[int, int] = {}     # vCPU -> debug register slot of its step guard
        self._steps_left: dict[int, int] = {ids[0]: step} if step > 0 else {}
        # --step-from: stepping starts when the boot vCPU reaches this linear address (a hardware
        # breakpoint in a free debug register, "the trigger")
        self._trigger = step_from if step > 0 else None
        self._trigger_slot: int | None = None
        self._printer = StepPrinter(self.memory, self._say)     # --step's lines
        # Data breakpoints (watchpoints in DR0-3): kvm_pvm never reports them (measured: the
        # emulator that runs CPL0 code does not check them), so there they are refused.
        from ..kvm.host import host_backend
        self.data_breakpoints = host_backend() != "kvm_pvm"

    # --- called by the vCPU threads -----------------------------------------------------------
    def checkpoint(self, vcpu) -> bool:
        """Before the first KVM_RUN and after each kick: park while held. True if it parked."""
        if vcpu.id not in self._started:
            self._started.add(vcpu.id)
            if vcpu.id in self._steps_left and self._trigger is None:
                self._printer.begin(vcpu, self._steps_left[vcpu.id])
            self._apply(vcpu)
        if vcpu.id in self._go:
            return False
        self._park(vcpu)
        return True

    def on_debug_exit(self, vcpu) -> bool:
        """KVM_EXIT_DEBUG. True if the vCPU was parked for the debugger."""
        arch = vcpu.run_struct.debug.arch
        exception, dr6, pc = arch.exception, arch.dr6, arch.pc
        if exception == BP_VECTOR:
            whose = self._our_int3(vcpu, pc)
            if whose == "break":
                return self._stop(vcpu, StopEvent(vcpu.id, SIGTRAP, "swbreak", pc))
            if whose is None:
                vcpu.inject_exception(BP_VECTOR)   # the guest's own int3: KVM delivers it as a soft exception
            return False
        if exception != DB_VECTOR:
            return False
        if self._trigger_slot is not None and vcpu.id in self._steps_left and dr6 & (1 << self._trigger_slot):
            self._trigger = self._trigger_slot = None          # --step-from: the address is reached
            self._printer.begin(vcpu, self._steps_left[vcpu.id])
            self._apply(vcpu)
            return False
        guard = self._guard.get(vcpu.id)
        stepped = bool(dr6 & DR6_BS) or (guard is not None and bool(dr6 & (1 << guard)))
        if stepped and vcpu.id in self._over:       # stepped over an aliased breakpoint: re-plant it
            self.sw.restore(self._over.pop(vcpu.id))
            if vcpu.id not in self._stepping:
                self._apply(vcpu)
                return False
        if stepped and vcpu.id in self._stepping:
            return self._stop(vcpu, StopEvent(vcpu.id, SIGTRAP, "step"))
        if stepped and self._steps_left.get(vcpu.id):
            self._print_step(vcpu)
            self._apply(vcpu)
            return False
        for slot, bp in enumerate(self.hw):
            if bp is not None and dr6 & (1 << slot):
                kind = {HW_EXEC: "hwbreak", HW_WRITE: "watch", HW_ACCESS: "awatch"}[bp.kind]
                return self._stop(vcpu, StopEvent(vcpu.id, SIGTRAP, kind, bp.addr))
        if not stepped:             # not ours: the guest's own debug exception
            vcpu.inject_exception(DB_VECTOR)
        return False

    def on_int3(self, vcpu) -> bool:
        """KVM could not emulate an int3 (kvm_pvm, CPL0). True if it is one of our breakpoints
        (the vCPU was parked, RIP still at the int3); False lets the caller inject #BP."""
        if not self.sw.patches:
            return False
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        linear = linear_rip(regs, sregs)
        whose = self._our_int3(vcpu, linear)
        if whose is None:
            return False
        if whose == "alias":
            return True         # handled: the vCPU re-executes the original instruction, stepping
        return self._stop(vcpu, StopEvent(vcpu.id, SIGTRAP, "swbreak", linear))

    def _our_int3(self, vcpu, linear: int) -> str | None:
        """Whose int3 the vCPU executed at ``linear`` (pykvm.debug.breakpoints): "break", one of
        gdb's breakpoints (stop there); "alias", a byte we patched reached through a mapping gdb
        did not name (stepped over: the original byte goes back for one single-step, then the
        0xCC); None, the guest's own."""
        paging = self.paging(vcpu)
        whose = self.sw.hit(paging, linear)
        if whose == "alias":
            phys = self.sw.lift(paging, linear)
            if phys is not None:
                self._over[vcpu.id] = phys
                self._apply(vcpu)
        return whose

    def _stop(self, vcpu, event: StopEvent) -> bool:
        with self._cond:
            if self.event is None:
                self.event = event
            self._go.clear()
            self._stepping.discard(vcpu.id)
        self.machine.kick_all()
        self._park(vcpu)
        return True

    def _park(self, vcpu) -> None:
        with self._cond:
            self._parked.add(vcpu.id)
            self._notify_if_stopped()
            while vcpu.id not in self._go and self.ended is None:
                self._cond.wait()
            self._parked.discard(vcpu.id)
        if self.ended is None:
            self._apply(vcpu)

    def _notify_if_stopped(self) -> None:
        if len(self._parked) == len(self.vcpus) and self.listener is not None:
            self.listener()

    # --- called by the machine ----------------------------------------------------------------
    def machine_ended(self, result) -> None:
        """Record how the run ended and wake the debugger's waits (any thread)."""
        with self._cond:
            self.ended = result
            self._cond.notify_all()
        if self.listener is not None:
            self.listener()

    def pending_trigger(self) -> int | None:
        """The --step-from address, while it has not been reached."""
        return self._trigger

    def holding(self) -> bool:
        """True while the debugger keeps some vCPU from running."""
        return len(self._go) < len(self.vcpus)

    # --- called by the debugger's thread ------------------------------------------------------
    def stopped(self) -> bool:
        """Every vCPU parked (so their registers may be read), or the run is over."""
        with self._cond:
            return self.ended is not None or (not self._go and len(self._parked) == len(self.vcpus))

    def interrupt(self, vcpu_id: int | None = None, signal: int = SIGINT) -> None:
        """Stop every vCPU (Ctrl-C in gdb, or gdb attaching); the listener hears when they have."""
        with self._cond:
            if self.event is None:
                self.event = StopEvent(self.vcpus[0].id if vcpu_id is None else vcpu_id, signal)
            self._go.clear()
            self._notify_if_stopped()
        self.machine.kick_all()

    def wait_stopped(self, timeout: float | None = None) -> bool:
        """Block until every vCPU is parked or the run ended; False on ``timeout`` (seconds)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self.ended is not None or (not self._go and len(self._parked) == len(self.vcpus)),
                timeout)

    def resume(self, actions: dict[int, str]) -> None:
        """Let vCPUs run again: ``actions`` maps a vCPU id to "c" (continue) or "s" (one step);
        vCPUs not named stay stopped."""
        self.sw.replant(self.paging)     # the guest may have changed its page tables meanwhile
        with self._cond:
            self.event = None
            self._stepping = {vid for vid, action in actions.items() if action == "s"}
            self._go = set(actions)
            self._cond.notify_all()

    def detach(self) -> None:
        """Remove every breakpoint and let every vCPU run with no guest debugging."""
        self.clear_breakpoints()
        self.resume({v.id: "c" for v in self.vcpus})

    def kill(self) -> None:
        """gdb's ``k``: drop every breakpoint and end the run (STATUS_INTERRUPTED)."""
        self.clear_breakpoints()
        from ..errors import STATUS_INTERRUPTED
        self.machine.end(STATUS_INTERRUPTED, "killed from gdb")

    # --- breakpoints and memory (debugger's thread, vCPUs stopped) ----------------------------
    def paging(self, vcpu) -> tuple[int, int, int, int]:
        """``vcpu``'s (CR0, CR3, CR4, EFER): what a guest-virtual address walk needs."""
        sregs = vcpu.get_sregs()
        return sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer

    def read_memory(self, vcpu, addr: int, n: int) -> bytes:
        """Guest-virtual memory as the guest would see it without our int3s (may be short)."""
        return self.sw.read(self.paging(vcpu), addr, n)

    def write_memory(self, vcpu, addr: int, data: bytes) -> None:
        """Write guest-virtual memory; bytes under our breakpoints update the saved original."""
        self.sw.write(self.paging(vcpu), addr, data)

    def insert_sw(self, vcpu, addr: int) -> None:
        """Plant an int3 at guest-virtual ``addr`` (keyed by its physical byte); DebugError if unmapped."""
        try:
            self.sw.insert(vcpu, self.paging(vcpu), addr)
        except (GuestMemoryError, PageFault) as e:
            raise DebugError(str(e)) from None

    def remove_sw(self, addr: int) -> None:
        """Remove the software breakpoint at guest-virtual ``addr``, restoring the byte."""
        self.sw.remove(addr)

    def insert_hw(self, addr: int, kind: int = HW_EXEC, length: int = 1) -> None:
        """A hardware breakpoint or watchpoint in a free DR0-3 (SDM vol. 3 §17.2); DebugError if none."""
        if kind != HW_EXEC and length not in _LEN_BITS:
            raise DebugError(f"a watchpoint covers 1, 2, 4 or 8 bytes, not {length}")
        if kind != HW_EXEC and addr % length:
            raise DebugError(f"a {length}-byte watchpoint must be aligned")
        length = length if kind != HW_EXEC else 1
        if any(bp is not None and (bp.addr, bp.kind, bp.length) == (addr, kind, length) for bp in self.hw):
            return
        for slot, bp in enumerate(self.hw):
            if bp is None:
                self.hw[slot] = HwBreakpoint(addr, kind, length)
                return
        raise DebugError("all four debug registers are in use")

    def remove_hw(self, addr: int, kind: int = HW_EXEC, length: int = 1) -> None:
        """Free the debug register holding the breakpoint at ``addr`` of ``kind``, if any."""
        for slot, bp in enumerate(self.hw):
            if bp is not None and bp.addr == addr and bp.kind == kind:
                self.hw[slot] = None
                return

    def clear_breakpoints(self) -> None:
        """Remove every software and hardware breakpoint (guest memory restored)."""
        self.sw.clear()
        self.hw = [None] * NSLOTS

    # --- guest debug state --------------------------------------------------------------------
    def _apply(self, vcpu) -> None:
        """KVM_SET_GUEST_DEBUG for this vCPU from the breakpoints and its stepping state (its own
        thread, outside KVM_RUN)."""
        control, debugreg, dr7 = 0, [0] * 8, 0
        if self.sw:
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP
        for slot, bp in enumerate(self.hw):
            if bp is not None:
                debugreg[slot] = bp.addr
                dr7 |= _dr7_bits(slot, bp)
        self._guard.pop(vcpu.id, None)
        free = [slot for slot in range(NSLOTS) if self.hw[slot] is None]
        if self._trigger is not None and vcpu.id in self._steps_left:
            if not free:
                raise DebugError("--step-from needs a free debug register")
            self._trigger_slot = free.pop(0)
            debugreg[self._trigger_slot] = self._trigger
            dr7 |= _dr7_bits(self._trigger_slot, HwBreakpoint(self._trigger))
        elif vcpu.id in self._stepping or vcpu.id in self._over or self._steps_left.get(vcpu.id):
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP
            guard = self._guard_address(vcpu) if free else None
            if guard is not None:
                debugreg[free[0]] = guard
                dr7 |= _dr7_bits(free[0], HwBreakpoint(guard))
                self._guard[vcpu.id] = free[0]
        if dr7:
            control |= KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP
            debugreg[7] = dr7 | DR7_FIXED
        vcpu.set_guest_debug(control, debugreg)

    def _guard_address(self, vcpu) -> int | None:
        """The linear address of the instruction after the one at RIP, if execution must go there."""
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        linear, insn = instruction_at(self.memory, regs, sregs)
        if insn is None or transfers_control(insn):
            return None
        return linear + insn.size

    def _print_step(self, vcpu) -> None:
        """One --step line for ``vcpu``'s last instruction; the last of its N steps says so."""
        self._printer.step(vcpu)
        self._steps_left[vcpu.id] -= 1
        if not self._steps_left[vcpu.id]:
            del self._steps_left[vcpu.id]
            self._printer.done(vcpu)

    def _say(self, text: str) -> None:
        try:
            self.out.write(text + "\n")
            self.out.flush()
        except (BrokenPipeError, ValueError):
            pass


def _dr7_bits(slot: int, bp: HwBreakpoint) -> int:
    """DR7: local enable L<slot>, R/W and LEN for the slot (exec breakpoints: R/W 00, LEN 00)."""
    rw, length = (0, 0) if bp.kind == HW_EXEC else (bp.kind, _LEN_BITS[bp.length])
    return (1 << (2 * slot)) | (rw << (16 + 4 * slot)) | (length << (18 + 4 * slot))
