"""Exit latency (``pykvm bench``): pykvm's VM-exit round trip against a minimal C KVM_RUN loop, in one run.

Both sides run the bundled ``exitloop`` guest (32-bit protected mode at 0x8000), patched to take
``count`` exits of one kind: ``pio_out`` (outb to port 0x80), ``pio_in`` (inb from 0x80),
``mmio_write`` / ``mmio_read`` (4 bytes at 0xd0000008), and ``cpuid``: an exit KVM handles in the
kernel, the floor below which no VMM can go (both sides should measure the same there). pykvm runs
it with ``Machine.run``; the baseline is ``kvm_loop.c`` (next to this file, installed with the
package), compiled here with ``gcc -O2`` into a cache directory; without gcc only pykvm is measured.

Each sample is one fresh VM: only the run is timed (pykvm: ``Machine.run``; C: the KVM_RUN loop).
Fixed costs (thread start, first entry, the final HLT) are cancelled by also timing a run with
count 0: µs per exit = (median t(count) - median t(0)) / count. Runs of pykvm and C alternate,
kind by kind and repeat by repeat, so that drift on the host hits both alike. Guest code at CPL0
is emulated on some backends, so the loop around each exit costs the same few µs on both sides.

    pykvm bench [--count N] [--repeat R] [--json] [--plot FILE.png]   (or: python -m benchmarks.exit_latency ...)

Prints a table ``kind pykvm_us c_us ratio``; with ``--json`` exactly one JSON object on stdout
(the table then goes to stderr). Exit status 2 when /dev/kvm is missing (or gcc, with
``--require-c``), 1 when a run goes wrong. ``--plot FILE.png`` also draws, per kind, the
distribution of the per-exit latency over the repeats (each repeat's t(count) less the median
t(0), divided by count), pykvm beside C; it needs matplotlib (``pip install 'pykvm[plot]'``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..boot.bundled import find as find_guest
from ..boot.flat import load_flat
from ..errors import KvmUnavailable
from ..kvm import ExitReason, Kvm
from ..kvm.host import host_backend
from ..x86.modes import CpuMode

HERE = Path(__file__).resolve().parent
C_SOURCE = HERE / "kvm_loop.c"   # package data
MEM_SIZE = 16 << 20
LOAD_ADDR = 0x8000
# (name, guest kind, the KVM exit reason user space sees; None: KVM handles it in the kernel)
KINDS = [
    ("pio_out", 0, ExitReason.IO),
    ("pio_in", 1, ExitReason.IO),
    ("mmio_write", 2, ExitReason.MMIO),
    ("mmio_read", 3, ExitReason.MMIO),
    ("cpuid", 4, None),
]
TARGET = 1.15      # pykvm / C, for port I/O and MMIO (issue 10)
TARGET_KINDS = ("pio_out", "pio_in", "mmio_write", "mmio_read")
DEFAULT_COUNT = 50_000
DEFAULT_REPEAT = 5


class BenchError(Exception):
    """A run did not end as the benchmark expects (wrong status, wrong number of exits)."""


class Unavailable(Exception):
    """Something the benchmark needs is missing (gcc, /dev/kvm): exit status 2."""


# --- the C baseline ---------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where the compiled C baseline is kept ($XDG_CACHE_HOME or ~/.cache, then pykvm/bench)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pykvm" / "bench"


def build_c_loop(gcc: str | None = None) -> Path:
    """Compile kvm_loop.c (once per source version) and return the executable's path."""
    gcc = gcc or shutil.which("gcc")
    if gcc is None:
        raise Unavailable("gcc is not installed: the C baseline (benchmarks/kvm_loop.c) cannot be built, so no "
                          "ratio can be measured. Install gcc (e.g. `apt-get install gcc`) and run again.")
    source = C_SOURCE.read_bytes()
    digest = hashlib.sha256(source).hexdigest()[:16]
    out_dir = cache_dir()
    exe = out_dir / f"kvm_loop-{digest}"
    if exe.exists():
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="kvm_loop-", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run([gcc, "-O2", "-o", tmp, str(C_SOURCE)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise Unavailable(f"gcc could not build {C_SOURCE} (are the Linux headers, <linux/kvm.h>, "
                              f"installed?):\n{proc.stderr.strip()}")
        os.replace(tmp, exe)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return exe


_C_LINE = re.compile(r"elapsed_s=([0-9.]+) exits=(\d+) io=(\d+) mmio=(\d+)")


def run_c(exe: Path, image_path: Path, kind: int, count: int, timeout: float) -> float:
    """One C run; returns the seconds its KVM_RUN loop took."""
    proc = subprocess.run([str(exe), str(image_path), str(kind), str(count)], capture_output=True, text=True,
                          timeout=timeout)
    match = _C_LINE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        raise BenchError(f"C baseline (kind {kind}, count {count}) failed with status {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()}")
    elapsed, exits, io, mmio = float(match[1]), int(match[2]), int(match[3]), int(match[4])
    got = io if kind in (0, 1) else mmio if kind in (2, 3) else 0
    if got != (count if kind < 4 else 0) or exits != got + 1:
        raise BenchError(f"C baseline (kind {kind}): expected {count} exits and a halt, got {proc.stdout.strip()}")
    return elapsed


# --- pykvm ------------------------------------------------------------------------------------
def patch(image: bytes, kind: int, count: int) -> bytes:
    """The exitloop image with its parameter block (u32 count at +8, u32 kind at +12) set."""
    patched = bytearray(image)
    struct.pack_into("<II", patched, 8, count, kind)
    return bytes(patched)


def run_pykvm(image: bytes, kind: int, reason: int | None, count: int, timeout: float) -> float:
    """One pykvm run of the patched image; returns the seconds Machine.run took."""
    from ..machine import Machine
    plan = load_flat(patch(image, kind, count), LOAD_ADDR, CpuMode.PROT32, MEM_SIZE, name="exitloop")
    with Machine(mem_size=MEM_SIZE, serial_out=lambda b: None) as machine:
        machine.load(plan)
        t0 = time.perf_counter()
        result = machine.run(timeout=timeout)
        t1 = time.perf_counter()
        counts = machine.exit_counts[0]
        exits = counts[reason] if reason is not None else counts[ExitReason.IO] + counts[ExitReason.MMIO]
    if result.status != 0:
        raise BenchError(f"pykvm (kind {kind}, count {count}) ended with status {result.status}: {result.reason}"
                         + (f"\n{result.report}" if result.report else ""))
    if exits != (count if reason is not None else 0):
        raise BenchError(f"pykvm (kind {kind}): expected {count} exits of reason {reason}, counted {exits}")
    return t1 - t0


# --- the benchmark ----------------------------------------------------------------------------
def per_exit_us(zero: list[float], full: list[float], count: int) -> float:
    """µs per exit from runs with count 0 and count ``count`` (medians; fixed costs cancel)."""
    t_full, t_zero = statistics.median(full), statistics.median(zero)
    if count == 0:
        return 0.0
    if t_full <= t_zero:   # only with tiny counts on a noisy host: fall back to the plain quotient
        return t_full / count * 1e6
    return (t_full - t_zero) / count * 1e6


def per_exit_samples_us(zero: list[float], full: list[float], count: int) -> list[float]:
    """One µs-per-exit figure per repeat: (t_i(count) - median t(0)) / count, for a distribution."""
    t_zero = statistics.median(zero)
    return [max(t - t_zero, 0.0) / count * 1e6 for t in full]


def measure(count: int, repeat: int, progress=None, require_c: bool = True,
            distributions: dict | None = None) -> dict[str, dict[str, float]]:
    """Run every kind under pykvm and C, ``repeat`` times, interleaved; return the result table
    (µs per exit per kind; ``c_us`` and ``ratio`` None when gcc is missing and not required).
    ``distributions``, if given, is filled with {kind: {"pykvm"|"c": [µs per exit, one per repeat]}}."""
    if count < 1 or repeat < 1:
        raise ValueError("count and repeat must be at least 1")
    try:
        exe = build_c_loop()
    except Unavailable:
        if require_c:
            raise
        exe = None
    try:
        Kvm().close()
    except KvmUnavailable as e:
        raise Unavailable(str(e)) from None
    image_path = find_guest("exitloop").path
    image = image_path.read_bytes()
    timeout = 30.0 + count * 1e-3   # 1 ms per exit is ~40x slower than expected: something is wrong

    impls = ("pykvm", "c") if exe is not None else ("pykvm",)
    samples = {name: {impl: ([], []) for impl in impls} for name, _, _ in KINDS}   # (t(0) list, t(N) list)
    runners = {
        "pykvm": lambda kind, reason, n: run_pykvm(image, kind, reason, n, timeout),
        "c": lambda kind, reason, n: run_c(exe, image_path, kind, n, timeout),
    }
    for r in range(repeat):
        if progress:
            progress(f"repeat {r + 1}/{repeat}")
        for i, (name, kind, reason) in enumerate(KINDS):
            order = impls if (r + i) % 2 == 0 else impls[::-1]
            for impl in order:
                zero, full = samples[name][impl]
                zero.append(runners[impl](kind, reason, 0))
                full.append(runners[impl](kind, reason, count))

    table = {}
    for name, _, _ in KINDS:
        py_us = round(per_exit_us(*samples[name]["pykvm"], count), 3)
        c_us = round(per_exit_us(*samples[name]["c"], count), 3) if exe is not None else None
        table[name] = {"pykvm_us": py_us, "c_us": c_us, "ratio": round(py_us / c_us, 3) if c_us else None}
        if distributions is not None:
            distributions[name] = {impl: per_exit_samples_us(*samples[name][impl], count) for impl in impls}
    return table


def check_plotting() -> None:
    """Unavailable (status 2) unless matplotlib can be imported: checked before the benchmark runs."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise Unavailable("--plot needs matplotlib, which is not installed: pip install 'pykvm[plot]' "
                          "(or pip install matplotlib)") from None


def plot_latencies(distributions: dict[str, dict[str, list[float]]], path: str, title: str = "") -> None:
    """Write a PNG to ``path``: per kind, a box plot of the µs-per-exit samples of each side
    ({kind: {"pykvm"|"c": [µs, ...]}}), with every sample drawn as a dot. OSError if unwritable."""
    import matplotlib
    matplotlib.use("Agg")                      # files only: no display needed
    import matplotlib.pyplot as plt
    kinds = list(distributions)
    sides = [side for side in ("pykvm", "c") if any(side in distributions[k] for k in kinds)]
    fig, ax = plt.subplots(figsize=(1.8 * len(kinds) + 2, 4.5))
    width = 0.8 / len(sides)
    for j, side in enumerate(sides):
        positions = [i + (j - (len(sides) - 1) / 2) * width for i in range(len(kinds))]
        data = [distributions[k].get(side, []) for k in kinds]
        box = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=False)
        color = ("tab:blue", "tab:orange")[j]
        for patch in box["boxes"]:
            patch.set_facecolor(color)
            patch.set_alpha(0.35)
        for x, values in zip(positions, data, strict=True):
            ax.plot([x] * len(values), values, ".", color=color)
        ax.plot([], [], "s", color=color, alpha=0.6, label="C KVM_RUN loop" if side == "c" else "pykvm")
    ax.set_xticks(range(len(kinds)), kinds)
    ax.set_ylabel("µs per exit")
    ax.set_ylim(bottom=0)
    ax.set_title(title or "exit latency per kind (one dot per repeat)")
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)


def format_table(table: dict[str, dict[str, float]]) -> str:
    """The result as a text table: kind, pykvm µs, C µs, ratio ("-" where C was not measured)."""
    def num(value) -> str:
        return "-" if value is None else f"{value:.3f}"
    lines = [f"{'kind':<12}{'pykvm_us':>10}{'c_us':>10}{'ratio(pykvm/c)':>16}"]
    for name, row in table.items():
        lines.append(f"{name:<12}{num(row['pykvm_us']):>10}{num(row['c_us']):>10}{num(row['ratio']):>16}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, shared by ``pykvm bench`` and ``python -m benchmarks.exit_latency``."""
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT,
                        help=f"exits per timed run (default {DEFAULT_COUNT}: the whole benchmark takes ~30-60 s)")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT,
                        help=f"runs per kind and side; the median is used (default {DEFAULT_REPEAT})")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="also draw each kind's latency distribution to this PNG (needs pykvm[plot])")
    parser.add_argument("--require-c", action="store_true",
                        help="fail (status 2) when gcc cannot build the C baseline instead of measuring pykvm alone")


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks.exit_latency",
         require_c: bool = True) -> int:
    """Run the benchmark with command-line ``argv``; returns the exit status (0, 1 or 2)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args, require_c=require_c or args.require_c)


def run(args, require_c: bool = False) -> int:
    """The benchmark for parsed ``args`` (count, repeat, json); returns the exit status."""
    if args.count < 1 or args.repeat < 1:
        print("exit_latency: --count and --repeat must be at least 1", file=sys.stderr)
        return 2

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    plot = getattr(args, "plot", None)
    if plot is not None:
        try:
            check_plotting()
        except Unavailable as e:
            note(f"exit_latency: {e}")
            return 2
    note(f"host backend: {host_backend()}; target: ratio(pykvm/c) <= {TARGET} for port I/O and MMIO "
         f"({', '.join(TARGET_KINDS)}); count {args.count}, repeat {args.repeat}")
    try:
        distributions: dict = {}
        table = measure(args.count, args.repeat, progress=note, require_c=require_c, distributions=distributions)
    except Unavailable as e:
        note(f"exit_latency: {e}")
        return 2
    except (BenchError, subprocess.TimeoutExpired) as e:
        note(f"exit_latency: {e}")
        return 1

    if args.json:
        note(format_table(table))
        print(json.dumps(table))
    else:
        print(format_table(table))
    ratios = [table[kind]["ratio"] for kind in TARGET_KINDS if table[kind]["ratio"] is not None]
    if ratios:
        worst = max(ratios)
        note(f"port I/O and MMIO: worst ratio {worst:.3f} -> target <= {TARGET} "
             + ("met" if worst <= TARGET else "NOT met"))
    else:
        note("gcc is missing: pykvm alone was measured (no C baseline, no ratio)")
    if plot is not None:
        try:
            plot_latencies(distributions, plot, f"exit latency on {host_backend()}, count {args.count}, "
                                                f"{args.repeat} repeats")
        except OSError as e:
            note(f"exit_latency: cannot write the plot {plot}: {e.strerror or e}")
            return 2
        note(f"latency distributions drawn to {plot}")
    return 0
