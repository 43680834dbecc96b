"""Where pykvm's exit overhead goes: the same exits as ``pykvm bench``, run three ways, interleaved.

- ``pykvm``: ``Machine.run``, the whole exit path (typed exit, dispatch to the device, statistics);
- ``floor``: a Python loop over :meth:`pykvm.kvm.Vcpu.run` on the same machine that only looks for the
  debug-exit write and handles nothing: KVM_RUN through cffi plus the typed-exit decode, the least any
  Python VMM on this binding pays per exit;
- ``c``: the raw C KVM_RUN loop of ``pykvm bench`` (gcc needed).

µs per exit = (t(count) - t(0)) / count, each repeat pairing its two runs, medians over the repeats.
``pykvm - floor`` is what pykvm's handling costs in situ; ``floor / c`` what Python and cffi cost.

    flock /tmp/pykvm-heavy.lock python -m benchmarks.exit_floor [--count 20000] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):   # run as a file: make the checkout's pykvm importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pykvm.bench import (  # noqa: E402
    END_DEBUG_EXIT,
    KINDS,
    LOAD_ADDR,
    MEM_SIZE,
    TARGET_KINDS,
    BenchError,
    build_c_loop,
    patch,
    run_c,
    run_pykvm,
)
from pykvm.boot.bundled import find as find_guest  # noqa: E402
from pykvm.boot.flat import load_flat  # noqa: E402
from pykvm.kvm import ExitReason  # noqa: E402
from pykvm.kvm.constants import KVM_EXIT_IO_OUT  # noqa: E402
from pykvm.machine import Machine  # noqa: E402
from pykvm.x86.modes import CpuMode  # noqa: E402

DEBUG_EXIT_PORT = 0xF4


def run_floor(image: bytes, kind: int, count: int) -> float:
    """Seconds a bare ``Vcpu.run()`` loop takes over the patched image: nothing is handled (port reads
    get whatever KVM left in the data area), the loop ends at the guest's OUT to the debug-exit port."""
    plan = load_flat(patch(image, kind, count, END_DEBUG_EXIT), LOAD_ADDR, CpuMode.PROT32, MEM_SIZE, name="exitloop")
    with Machine(mem_size=MEM_SIZE, serial_out=lambda b: None) as machine:
        machine.load(plan)
        run = machine.vcpus[0].run
        IO, MMIO, INTR = ExitReason.IO, ExitReason.MMIO, ExitReason.INTR
        t0 = time.perf_counter()
        while True:
            exit = run()
            if exit[0] == IO:
                if exit[3] == DEBUG_EXIT_PORT and exit[1] == KVM_EXIT_IO_OUT:
                    break
            elif exit[0] not in (MMIO, INTR):
                raise BenchError(f"floor loop (kind {kind}): unexpected exit {exit}")
        return time.perf_counter() - t0


def measure(count: int, repeat: int) -> dict[str, dict]:
    """{kind: {"pykvm_us", "floor_us", "c_us", "handling_us", "floor_over_c", "pykvm_over_c"}} for the
    port-I/O and MMIO kinds, medians of µs per exit over ``repeat`` interleaved repeats."""
    guest = find_guest("exitloop")
    image, exe = guest.path.read_bytes(), build_c_loop()
    sides = {
        "pykvm": lambda kind, reason, n: run_pykvm(image, kind, reason, n, 60.0),
        "floor": lambda kind, reason, n: run_floor(image, kind, n),
        "c": lambda kind, reason, n: run_c(exe, guest.path, kind, n, 60.0),
    }
    table = {}
    for name, kind, reason in KINDS:
        if name not in TARGET_KINDS:
            continue
        per = {side: [] for side in sides}
        for r in range(repeat):
            order = list(sides)[r % 3:] + list(sides)[:r % 3]
            for side in order:
                zero, full = sides[side](kind, reason, 0), sides[side](kind, reason, count)
                per[side].append(max(full - zero, 0.0) / count * 1e6)
        med = {side: statistics.median(v) for side, v in per.items()}
        table[name] = {"pykvm_us": round(med["pykvm"], 3), "floor_us": round(med["floor"], 3),
                       "c_us": round(med["c"], 3), "handling_us": round(med["pykvm"] - med["floor"], 3),
                       "floor_over_c": round(med["floor"] / med["c"], 3) if med["c"] else None,
                       "pykvm_over_c": round(med["pykvm"] / med["c"], 3) if med["c"] else None}
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.exit_floor", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20_000, help="exits per timed run (default 20000)")
    parser.add_argument("--repeat", type=int, default=5, help="interleaved repeats; medians are used (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        parser.error("--count and --repeat must be at least 1")
    table = measure(args.count, args.repeat)
    if args.json:
        print(json.dumps(table))
        return 0
    print(f"{'kind':12s} {'pykvm µs':>9s} {'floor µs':>9s} {'C µs':>7s} {'handling µs':>12s} "
          f"{'floor/C':>8s} {'pykvm/C':>8s}")
    for name, row in table.items():
        print(f"{name:12s} {row['pykvm_us']:9.2f} {row['floor_us']:9.2f} {row['c_us']:7.2f} {row['handling_us']:12.2f} "
              f"{row['floor_over_c']:8.3f} {row['pykvm_over_c']:8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
