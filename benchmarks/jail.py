"""What the jail costs (issue 13): exit latency jailed vs unjailed against the C loop, the CPU a
spinning guest gets under a CPU quota, and the VMM's peak memory in its cgroup -- in one run.

    python -m benchmarks.jail [--count N] [--repeat R] [--seconds S] [--quota Q]

1. Exit latency: the ``exitloop`` guest of benchmarks/exit_latency.py (its functions, unchanged),
   run by pykvm in this process, by pykvm in a jail (pykvm.jail.spawn: the VM is built, the jail
   entered, then only Machine.run is timed and sent back over a pipe) and by the C loop,
   interleaved; µs per exit = (median t(N) - median t(0)) / N; prints both ratios to C.
2. CPU quota: the bundled ``spin`` guest jailed for S seconds at --cpus Q and without a quota;
   CPU time of the jailed process (getrusage of waited children) / wall time.
3. Peak memory (cgroup max usage) of the jailed runs: with guests that touch little of their RAM,
   mostly the VMM's own (what it allocates or copies on write after the fork; the interpreter's
   pages it shares with its parent stay charged to the parent's cgroup).
Needs root, cgroups, libseccomp, gcc and /dev/kvm. Run it under the heavy lock.
"""

from __future__ import annotations

import argparse
import os
import resource
import struct
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.exit_latency import KINDS, LOAD_ADDR, MEM_SIZE, build_c_loop, patch, per_exit_us, run_c, run_pykvm  # noqa: E402
from pykvm.boot.bundled import find as find_guest  # noqa: E402
from pykvm.boot.flat import load_flat  # noqa: E402
from pykvm.jail import JailConfig, spawn  # noqa: E402
from pykvm.machine import Machine  # noqa: E402
from pykvm.x86.modes import CpuMode  # noqa: E402

BASE = "/tmp/pykvm-bench-jail"


def jailed(target_body, **options):
    """Run ``target_body(entry, out_fd)`` jailed; returns (JailResult, bytes it wrote to out_fd)."""
    os.makedirs(BASE, exist_ok=True)
    r, w = os.pipe()
    try:
        result = spawn(JailConfig(id=f"bench-{os.getpid()}", chroot_base=BASE, **options),
                       lambda entry: target_body(entry, w), keep_fds=(w,))
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    return result, data


def run_pykvm_jailed(image: bytes, kind: int, reason: int, count: int) -> tuple[float, int]:
    def body(entry, out):
        plan = load_flat(patch(image, kind, count), LOAD_ADDR, CpuMode.PROT32, MEM_SIZE, name="exitloop")
        with Machine(mem_size=MEM_SIZE, serial_out=lambda b: None) as machine:
            machine.load(plan)
            entry.enter()
            t0 = time.perf_counter()
            result = machine.run(timeout=60)
            t1 = time.perf_counter()
            ok = result.status == 0 and machine.exit_counts[0][reason] == count
        os.write(out, struct.pack("<d?", t1 - t0, ok))
        return 0
    result, data = jailed(body, memory=MEM_SIZE + (96 << 20))
    if result.status != 0 or len(data) != 9 or not struct.unpack("<d?", data)[1]:
        raise SystemExit(f"jailed exitloop run failed: {result.describe()}")
    return struct.unpack("<d?", data)[0], result.peak_memory or 0


def exit_latency(count: int, repeat: int) -> tuple[dict, int]:
    exe = build_c_loop()
    image_path = find_guest("exitloop").path
    image = image_path.read_bytes()
    kinds = [k for k in KINDS if k[0] in ("pio_out", "mmio_read")]
    samples = {name: {impl: ([], []) for impl in ("c", "pykvm", "jailed")} for name, _, _ in kinds}
    peak = 0
    for r in range(repeat):
        for i, (name, kind, reason) in enumerate(kinds):
            order = ["c", "pykvm", "jailed"]
            order = order[(r + i) % 3:] + order[:(r + i) % 3]
            for impl in order:
                zero, full = samples[name][impl]
                for n, into in ((0, zero), (count, full)):
                    if impl == "c":
                        into.append(run_c(exe, image_path, kind, n, 60))
                    elif impl == "pykvm":
                        into.append(run_pykvm(image, kind, reason, n, 60))
                    else:
                        t, p = run_pykvm_jailed(image, kind, reason, n)
                        into.append(t)
                        peak = max(peak, p)
    table = {}
    for name, _, _ in kinds:
        c, py, jl = (per_exit_us(*samples[name][impl], count) for impl in ("c", "pykvm", "jailed"))
        table[name] = (c, py, jl)
    return table, peak


def cpu_share(seconds: float, quota: float | None) -> tuple[float, int]:
    image = find_guest("spin").path.read_bytes()

    def body(entry, out):
        plan = load_flat(image, LOAD_ADDR, CpuMode.LONG64, MEM_SIZE, name="spin")
        with Machine(mem_size=MEM_SIZE, serial_out=lambda b: None) as machine:
            machine.load(plan)
            entry.enter()
            machine.run(timeout=seconds)
        return 0
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    result, _ = jailed(body, memory=MEM_SIZE + (96 << 20), cpus=quota)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if result.status != 0:
        raise SystemExit(f"jailed spin failed: {result.describe()}")
    return cpu / wall, result.peak_memory or 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jail", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--quota", type=float, default=0.5)
    args = parser.parse_args(argv)
    table, peak = exit_latency(args.count, args.repeat)
    print(f"{'kind':<12}{'c_us':>8}{'pykvm_us':>10}{'jailed_us':>11}{'pykvm/c':>9}{'jailed/c':>10}{'jailed/pykvm':>14}")
    for name, (c, py, jl) in table.items():
        print(f"{name:<12}{c:>8.2f}{py:>10.2f}{jl:>11.2f}{py / c:>9.3f}{jl / c:>10.3f}{jl / py:>14.3f}")
    share, peak2 = cpu_share(args.seconds, args.quota)
    free, peak3 = cpu_share(args.seconds, None)
    print(f"spin for {args.seconds:g} s: CPU share at --cpus {args.quota:g}: {share:.1%} of one CPU; "
          f"without a quota: {free:.1%}; ratio {share / free:.3f}")
    top = max(peak, peak2, peak3)
    print(f"peak cgroup memory of the jailed runs: {top / 2**20:.1f} MiB (guest RAM {MEM_SIZE >> 20} MiB, of which "
          "these guests touch little: this is mostly the VMM's own)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
