"""Random code as a guest, and random port/MMIO access programs against every device with the
virtio devices attached (issue 9, part 8). Seeded and reproducible: ``PYKVM_FUZZ_SEED`` (default
9) picks the batch, a failure names the case's seed and mode, and ``PYKVM_FUZZ_SCALE`` multiplies
the case counts (default 1: 1,050 random-code guests and 40 access programs, a few tens of seconds
here). Every run must end with a documented status (0, an odd debug-exit status of at most 255, 2,
4, 124), never with a pykvm exception, never past its timeout, and leave no thread or descriptor
behind. The tally of statuses and reasons is printed (``pytest -s``)."""

from __future__ import annotations

import os
import random
import threading
import time

import pytest
from conftest import needs_kvm, run_pykvm
from fuzz_guests import (
    FUZZ_RAM,
    Tally,
    check_clean,
    descriptor_soup,
    documented,
    open_fds,
    random_code,
    virtio_program,
)

from pykvm.boot.flat import load_flat
from pykvm.devices.virtio import DriveSpec, attach_virtio
from pykvm.machine import Machine
from pykvm.x86.modes import CpuMode

pytestmark = needs_kvm
SEED = int(os.environ.get("PYKVM_FUZZ_SEED", "9"))
SCALE = float(os.environ.get("PYKVM_FUZZ_SCALE", "1"))
MEM = 2 << 20
TIMEOUT = 0.1           # seconds per random guest: most end in microseconds (a fault with no IDT)


def _sink(_data: bytes) -> None:
    pass


def run_random_guest(mode: CpuMode, case: int, tally: Tally) -> None:
    label = f"seed {SEED} mode {mode.value} case {case}"
    rng = random.Random(f"{SEED}/{mode.value}/{case}")
    code = random_code(rng, mode)
    before_fds, before_threads = open_fds(), set(threading.enumerate())
    with Machine(mem_size=MEM, serial_out=_sink) as machine:
        machine.load(load_flat(code, 0x8000, mode, MEM, name=label))
        start = time.monotonic()
        result = machine.run(timeout=TIMEOUT)
        tally.add(label + f" ({code.hex()})", result, time.monotonic() - start, TIMEOUT)
    tally.problems += check_clean(before_fds, before_threads, label)


@pytest.mark.parametrize(("mode", "cases"), [(CpuMode.REAL, 300), (CpuMode.PROT32, 350), (CpuMode.LONG64, 400)])
def test_random_code_ends_the_documented_way(mode: CpuMode, cases: int) -> None:
    tally = Tally()
    for case in range(int(cases * SCALE)):
        run_random_guest(mode, case, tally)
    print(f"\nrandom code, {mode.value}: {tally.summary()}")
    assert not tally.problems, "\n".join(tally.problems[:10])


def test_random_port_and_mmio_programs_against_every_device_with_virtio(tmp_path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    tally = Tally()
    mem = 16 << 20
    timeout = 5.0
    for case in range(int(40 * SCALE)):
        label = f"seed {SEED} program {case}"
        rng = random.Random(f"{SEED}/virtio/{case}")
        before_fds, before_threads = open_fds(), set(threading.enumerate())
        with Machine(mem_size=mem, irqchip=True, serial_out=_sink) as machine:
            attach_virtio(machine, drives=[DriveSpec(str(disk))], rng=True, console=True, console_out=_sink)
            plan = load_flat(virtio_program(rng, n_devices=3), 0x8000, CpuMode.LONG64, mem, name=label)
            plan.writes.append((FUZZ_RAM[0], descriptor_soup(rng, mem)))
            machine.load(plan)
            start = time.monotonic()
            result = machine.run(timeout=timeout)
            tally.add(label, result, time.monotonic() - start, timeout)
        tally.problems += check_clean(before_fds, before_threads, label)
    print(f"\nport/MMIO programs with virtio-blk, -console, -rng: {tally.summary()}")
    assert not tally.problems, "\n".join(tally.problems[:10])
    assert tally.statuses[(0x2A << 1) | 1] > 0, "no program ran to its end"


@pytest.mark.parametrize("mode", [CpuMode.REAL, CpuMode.PROT32, CpuMode.LONG64])
def test_random_code_through_the_cli(tmp_path, mode: CpuMode) -> None:
    for case in range(2):
        rng = random.Random(f"{SEED}/cli/{mode.value}/{case}")
        image = tmp_path / f"{mode.value}-{case}.bin"
        image.write_bytes(random_code(rng, mode))
        proc = run_pykvm("run", str(image), "--mode", mode.value, "--timeout", "2", timeout=30)
        err = proc.stderr.decode(errors="replace")
        assert documented(proc.returncode), f"{image}: status {proc.returncode}: {err}"
        assert "Traceback" not in err, err
