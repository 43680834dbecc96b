"""Holding every vCPU out of KVM_RUN (pause) and letting them go again (resume).

Until the exit loop has its own ``Machine.pause()``/``resume()`` (the exit-path work), this uses the loop's one
existing place where a vCPU can wait between two KVM_RUNs: the debug control's checkpoint, which the loop calls
before the first KVM_RUN and after every kick (KVM_RUN returning EINTR). A kick sets ``immediate_exit``, so KVM
completes any pending I/O or MMIO before returning (api.rst, KVM_RUN): once every vCPU is parked here, its
state is consistent and may be read for a snapshot. A parked vCPU thread waits on a condition variable and uses
no CPU. A machine under gdb or --step has its own debug control, and cannot be paused this way.
"""

from __future__ import annotations

import threading


class PauseControl:
    """Installed as ``machine.debug``: :meth:`pause` parks every vCPU, :meth:`resume` releases them."""

    def __init__(self, machine, paused: bool = False) -> None:
        self.machine = machine
        self._cond = threading.Condition()
        self._paused = paused
        self._parked: set[int] = set()
        self._ended = False

    @classmethod
    def install(cls, machine, paused: bool = False) -> PauseControl:
        """Attach to a machine before its run starts; ``paused`` parks the vCPUs before their first instruction."""
        if machine.debug is not None and not isinstance(machine.debug, cls):
            raise ValueError("this machine is under a debugger (--gdb or --step); it cannot also be paused")
        control = cls(machine, paused)
        machine.debug = control
        return control

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self, timeout: float = 5.0) -> bool:
        """Park every vCPU; returns when all are out of KVM_RUN (True), or False if the run ended or ``timeout``
        seconds passed first."""
        with self._cond:
            self._paused = True
        self.machine.kick_all()
        with self._cond:
            return self._cond.wait_for(lambda: self._ended or len(self._parked) == len(self.machine.vcpus),
                                       timeout) and not self._ended

    def resume(self) -> None:
        """Let every parked vCPU continue where it stopped."""
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    # --- the debug-control interface the exit loop calls ------------------------------------------------
    def checkpoint(self, vcpu) -> bool:
        """Called by a vCPU thread between two KVM_RUNs: park while paused. True if it parked."""
        with self._cond:
            if not self._paused or self._ended:
                return False
            self._parked.add(vcpu.id)
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._paused or self._ended)
            self._parked.discard(vcpu.id)
            return True

    def holding(self) -> bool:
        """True while paused: the idle probe must not mistake parked vCPUs for a dead machine."""
        return self._paused

    def machine_ended(self, result) -> None:
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def on_debug_exit(self, vcpu) -> bool:
        self.machine.end(4, f"vCPU {vcpu.id}: unexpected KVM_EXIT_DEBUG", self.machine.describe_vcpu(vcpu))
        return False

    def on_int3(self, vcpu) -> bool:
        return False   # not a breakpoint of ours: the machine completes it as usual
