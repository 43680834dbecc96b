"""Random code as a guest, and random port/MMIO access programs against every device with the
virtio devices attached (issue 9, part 8). Seeded and reproducible: ``PYKVM_FUZZ_SEED`` (default
9) picks the batch, a failure names the case's seed and mode, and ``PYKVM_FUZZ_SCALE`` multiplies
the case counts (default 1: 1,050 random-code guests, 40 access programs in-process and 40 more
with virtio-net too, through the CLI in a network namespace; about a minute here). Every run must
end with a documented status (0, an odd debug-exit status of at most 255, 2, 4, 124), never with a
pykvm exception, never past its timeout, and leave no thread or descriptor behind (in-process
runs). The tally of statuses and reasons is printed (``pytest -s``)."""

from __future__ import annotations

import os
import random
import struct
import sys
import threading
import time
from collections import Counter

import pytest
from conftest import ROOT, needs_kvm, run_pykvm
from fuzz_guests import (
    FUZZ_RAM,
    LOAD_ADDR,
    Tally,
    check_clean,
    descriptor_soup,
    documented,
    open_fds,
    random_code,
    virtio_program,
)

from benchmarks import netns
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


NETNS_PROBLEM = netns.problem()
SOUP_AT = 0x20000           # where the CLI image carries FUZZ_RAM's contents


@pytest.mark.skipif(NETNS_PROBLEM is not None, reason=NETNS_PROBLEM or "")
def test_random_port_and_mmio_programs_with_virtio_net_through_the_cli(tmp_path) -> None:
    """The same programs against all four virtio devices, virtio-net included: pykvm run with
    --drive, --console virtio, --rng and --net on a TAP (up, no address) in a namespace of its own,
    so no frame the guest sends can leave it. The devices sit in that order in the virtio windows."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    mem = 16 << 20
    statuses: Counter = Counter()
    cases = int(40 * SCALE)
    with netns.Netns() as ns:
        ns.add_tap("tap0")
        for case in range(cases):
            label = f"seed {SEED} net program {case}"
            rng = random.Random(f"{SEED}/virtio-net/{case}")
            # The boot page tables of a flat long-mode guest sit at 0x70000, below FUZZ_RAM: the image
            # carries the soup lower down and its first instructions copy it there (rep movsb).
            copy = (b"\xbe" + struct.pack("<I", SOUP_AT) + b"\xbf" + struct.pack("<I", FUZZ_RAM[0])
                    + b"\xb9" + struct.pack("<I", FUZZ_RAM[1] - FUZZ_RAM[0]) + b"\xfc\xf3\xa4")
            image = bytearray(copy + virtio_program(rng, n_devices=4))
            image += bytes(SOUP_AT - LOAD_ADDR - len(image))
            image += descriptor_soup(rng, mem)
            path = tmp_path / f"net-{case}.bin"
            path.write_bytes(bytes(image))
            proc = ns.run([sys.executable, "-m", "pykvm", "run", str(path), "--mode", "long64", "--mem", "16M",
                           "--drive", str(disk), "--console", "virtio", "--rng", "--net", "tap=tap0",
                           "--timeout", "5"], cwd=ROOT, timeout=60)
            err = proc.stderr.decode(errors="replace")
            assert documented(proc.returncode), f"{label}: status {proc.returncode}: {err}"
            assert "Traceback" not in err and "internal error" not in err, f"{label}: {err}"
            statuses[proc.returncode] += 1
    print(f"\nport/MMIO programs with virtio-blk, -console, -rng, -net (CLI): {cases} runs; "
          f"statuses {dict(sorted(statuses.items()))}")
    assert statuses[(0x2A << 1) | 1] > 0, "no program ran to its end"


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
