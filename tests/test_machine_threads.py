"""A Machine run from any thread, paused and resumed from another, and ended cleanly.

A guest that counts on the serial port (one THR write per number, 0, 1, 2, ... mod 256) shows
whether pause/resume lose or repeat anything; a worker thread running a Machine shows that the
kick needs no signal handler on the main thread (it used to kill the process with SIGUSR1)."""

from __future__ import annotations

import math
import os
import threading
import time

import pytest
from conftest import needs_kvm

from pykvm.boot.flat import load_flat
from pykvm.errors import STATUS_OK, STATUS_TIMEOUT, UsageError
from pykvm.machine import Machine
from pykvm.x86.modes import CpuMode

MEM = 16 << 20
# 32-bit: dx = 0x3f8; eax = 0; loop: out dx, al; inc eax; jmp loop
COUNTER = bytes.fromhex("66baf803" "31c0" "ee" "40" "ebfc")
# 32-bit: mov al, 5; out 0xf4, al (debug-exit: status (5 << 1) | 1); then hlt
DEBUG_EXIT_5 = bytes.fromhex("b005" "e6f4" "f4")
SPIN = bytes.fromhex("ebfe")   # jmp $


def _machine(code: bytes, out=None) -> Machine:
    machine = Machine(mem_size=MEM, serial_out=out or (lambda b: None))
    machine.load(load_flat(code, 0x8000, CpuMode.PROT32, MEM, name="t"))
    return machine


def _run_in_thread(machine: Machine, timeout: float | None) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(machine.run(timeout=timeout)))
    thread.start()
    return thread, result


@needs_kvm
def test_a_worker_thread_runs_a_machine_to_its_timeout():
    before = set(threading.enumerate())           # (other tests' threads are not this test's business)
    with _machine(SPIN) as machine:
        thread, result = _run_in_thread(machine, 0.3)
        thread.join(30)
        assert not thread.is_alive() and result[0].status == STATUS_TIMEOUT
        left = set(threading.enumerate()) - before
        assert not left, f"threads the run left behind: {[t.name for t in left]}"     # every vCPU thread joined


@needs_kvm
def test_a_worker_thread_runs_a_machine_to_its_debug_exit():
    with _machine(DEBUG_EXIT_5) as machine:
        thread, result = _run_in_thread(machine, 30)
        thread.join(30)
        assert result[0].status == (5 << 1) | 1


@needs_kvm
@pytest.mark.parametrize("timeout", [math.nan, math.inf, -1.0, "3"])
def test_a_timeout_that_is_not_a_finite_number_of_seconds_is_refused(timeout):
    with _machine(SPIN) as machine:
        with pytest.raises(UsageError, match="finite number of seconds"):
            machine.run(timeout=timeout)


def _cpu_ticks(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])     # utime + stime, in clock ticks


@needs_kvm
def test_pause_and_resume_many_times_without_gap_or_repeat():
    seen = bytearray()
    with _machine(COUNTER, out=seen.extend) as machine:
        thread, result = _run_in_thread(machine, None)
        idle_ticks = []
        try:
            while len(seen) < 100:
                time.sleep(0.01)
            for i in range(40):
                assert machine.pause(timeout=10) and machine.paused
                held = len(seen)
                if i % 10 == 0:   # a paused vCPU is out of KVM_RUN and waits without using the CPU
                    vcpu_thread = machine._threads[0]
                    before = _cpu_ticks(vcpu_thread.native_id)
                    time.sleep(0.3)
                    idle_ticks.append(_cpu_ticks(vcpu_thread.native_id) - before)
                else:
                    time.sleep(0.005)
                assert len(seen) == held               # nothing ran while paused
                machine.resume()
                time.sleep(0.005)
        finally:
            machine.end(STATUS_OK, "test over")
            thread.join(30)
    assert result[0].status == STATUS_OK and result[0].reason == "test over"
    assert len(seen) > 200
    gaps = [i for i in range(1, len(seen)) if seen[i] != (seen[i - 1] + 1) % 256]
    assert seen[0] == 0 and gaps == []
    assert max(idle_ticks) <= 2, idle_ticks     # clock ticks (10 ms each) over 0.3 s paused


@needs_kvm
def test_pause_before_the_run_and_end_while_paused():
    with _machine(SPIN) as machine:
        machine.pause()                            # nothing runs yet: returns at once
        thread, result = _run_in_thread(machine, None)
        time.sleep(0.2)
        assert thread.is_alive() and machine._held == 1
        machine.end(STATUS_OK, "ended while paused")
        thread.join(30)
        assert result[0].reason == "ended while paused" and os.getpid()
