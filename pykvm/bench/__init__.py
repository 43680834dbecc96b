"""Exit latency (``pykvm bench``): pykvm's VM-exit round trip against a minimal C KVM_RUN loop and
QEMU, in one run.

All three run the bundled ``exitloop`` guest (32-bit protected mode at 0x8000), patched to loop
``count`` times over one kind of exit: ``pio_out`` (outb to port 0x80), ``pio_in`` (inb from 0x80),
``mmio_write`` / ``mmio_read`` (4 bytes at 0xd0000008), ``cpuid`` (an exit KVM handles in the
kernel: the floor below which no VMM can go) and ``hlt``: the guest arms its local APIC timer
one-shot with an initial count of 1, executes ``sti; hlt``, and the timer interrupt wakes it (its
handler writes EOI); with an in-kernel irqchip all of that happens inside KVM, so ``hlt`` is the
cost of one interrupt-woken HLT (two APIC register writes, the HLT, the interrupt's delivery) in
which no VMM code runs -- like ``cpuid``, the three should measure the same. The guest ends every
run by writing 0 to the debug-exit port 0xf4.

- pykvm: ``Machine.run`` (an in-kernel irqchip for ``hlt`` only), timed in this process;
- C: ``kvm_loop.c`` (next to this file, installed with the package), compiled here with
  ``gcc -O2`` into a cache directory, timing its own KVM_RUN loop; skipped without gcc;
- QEMU: ``qemu-system-x86_64 -M microvm -accel kvm -kernel`` with the same patched image wrapped in
  a PVH ELF (entry note XEN_ELFNOTE_PHYS32_ENTRY = 0x8000) and ``isa-debug-exit`` at 0xf4, timed
  around the whole process; skipped when QEMU is not installed.

Fixed costs (process and VM start-up, the first entry, the end) cancel because each sample pairs a
run of ``count`` iterations with one of 0: µs per exit = (t(count) - t(0)) / count. Every repeat
runs every kind under every side, the order of the sides rotating from kind to kind and repeat to
repeat, so drift on the host hits all alike. The table gives, per kind and side, the median over
the repeats and the range (min-max), and the ratios pykvm/C and pykvm/QEMU of the medians.
Guest code at CPL0 is emulated on some backends (kvm_pvm), so the loop around each exit costs the
same few µs on every side.

    pykvm bench [--count N] [--repeat R] [--cpu N] [--json] [--plot FILE.png]
    python -m benchmarks.exit_latency ...     (the same, from a checkout)

``--json`` prints exactly one JSON object on stdout (the table then goes to stderr). Exit status 2
when /dev/kvm is missing (or gcc, with ``--require-c``), 1 when a run goes wrong. ``--plot
FILE.png`` also draws, per kind, the distribution of the per-repeat µs per exit, side by side; it
needs matplotlib (``pip install 'pykvm[plot]'``).
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
END_DEBUG_EXIT = 1          # the guest's `end` parameter: write 0 to the debug-exit port when done
DEBUG_EXIT_STATUS = 1       # ... which ends pykvm and QEMU with status (0 << 1) | 1
HLT_KIND = 5                # the kind that needs an in-kernel irqchip (the local APIC timer)
# (name, guest kind, the KVM exit reason user space sees; None: KVM handles it in the kernel)
KINDS = [
    ("pio_out", 0, ExitReason.IO),
    ("pio_in", 1, ExitReason.IO),
    ("mmio_write", 2, ExitReason.MMIO),
    ("mmio_read", 3, ExitReason.MMIO),
    ("cpuid", 4, None),
    ("hlt", HLT_KIND, None),
]
SIDES = ("pykvm", "c", "qemu")
TARGET = 1.15      # pykvm / C, for port I/O and MMIO (issue 10)
TARGET_QEMU = 1.05  # pykvm / QEMU, the same kinds
TARGET_KINDS = ("pio_out", "pio_in", "mmio_write", "mmio_read")
DEFAULT_COUNT = 20_000
DEFAULT_REPEAT = 5
# QEMU as PLATFORM.md says it runs here (plain -cpu host aborts on MSR 0x10a with kvm_pvm)
QEMU_ARGS = ["-M", "microvm,pcie=off", "-accel", "kvm", "-cpu", "host,-arch-capabilities,-cx16", "-m", "16M",
             "-nodefaults", "-no-user-config", "-display", "none", "-serial", "none", "-no-reboot",
             "-device", "isa-debug-exit,iobase=0xf4,iosize=4"]


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
    proc = subprocess.run([str(exe), str(image_path), str(kind), str(count), str(END_DEBUG_EXIT)],
                          capture_output=True, text=True, timeout=timeout)
    match = _C_LINE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        raise BenchError(f"C baseline (kind {kind}, count {count}) failed with status {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()}")
    elapsed, exits, io, mmio = float(match[1]), int(match[2]), int(match[3]), int(match[4])
    got = io if kind in (0, 1) else mmio if kind in (2, 3) else io + mmio
    if got != (count if kind < 4 else 0) or exits != got + 1:
        raise BenchError(f"C baseline (kind {kind}): expected {count} exits and an end, got {proc.stdout.strip()}")
    return elapsed


# --- QEMU -------------------------------------------------------------------------------------
def pvh_elf(image: bytes, load: int = LOAD_ADDR) -> bytes:
    """``image`` as an ELF32 executable QEMU's ``-kernel`` boots through PVH: one PT_LOAD segment
    placing it at guest-physical ``load``, and a PT_NOTE holding the Xen note
    XEN_ELFNOTE_PHYS32_ENTRY (18) = ``load``, so it is entered in 32-bit protected mode with flat
    segments and paging off, as pykvm's flat loader enters it (PVH boot ABI, xen/include/public/
    elfnote.h; the ELF layout: System V ABI, chapter 5)."""
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", load)
    ehsize, phentsize = 52, 32
    note_at = ehsize + 2 * phentsize
    image_at = (note_at + len(note) + 15) & ~15
    # e_ident (ELFCLASS32, ELFDATA2LSB, EV_CURRENT), ET_EXEC, EM_386, version, entry, phoff, shoff, flags,
    # ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    header = struct.pack("<4sBBB9xHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 2, 3, 1, load, ehsize, 0, 0,
                         ehsize, phentsize, 2, 40, 0, 0)
    # p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_flags, p_align
    load_ph = struct.pack("<8I", 1, image_at, load, load, len(image), len(image), 7, 16)   # PT_LOAD, RWX
    note_ph = struct.pack("<8I", 4, note_at, 0, 0, len(note), len(note), 4, 4)             # PT_NOTE, R
    head = header + load_ph + note_ph + note
    return head + bytes(image_at - len(head)) + image


def find_qemu() -> str | None:
    """The qemu-system-x86_64 on PATH, or None."""
    return shutil.which("qemu-system-x86_64")


def run_qemu(qemu: str, elf_path: Path, timeout: float) -> float:
    """One QEMU run of a PVH-wrapped exitloop; returns the seconds the whole process took."""
    t0 = time.perf_counter()
    proc = subprocess.run([qemu, *QEMU_ARGS, "-kernel", str(elf_path)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)
    t1 = time.perf_counter()
    if proc.returncode != DEBUG_EXIT_STATUS:
        raise BenchError(f"QEMU ({elf_path.name}) ended with status {proc.returncode}, not "
                         f"{DEBUG_EXIT_STATUS} (the guest's debug-exit write): {proc.stderr.strip()[-500:]}")
    return t1 - t0


# --- pykvm ------------------------------------------------------------------------------------
def patch(image: bytes, kind: int, count: int, end: int = 0) -> bytes:
    """The exitloop image with its parameter block (u32 count at +8, kind at +12, end at +16) set;
    ``end`` 0 halts when done, END_DEBUG_EXIT writes the debug-exit port (what the benchmark uses)."""
    patched = bytearray(image)
    struct.pack_into("<III", patched, 8, count, kind, end)
    return bytes(patched)


def run_pykvm(image: bytes, kind: int, reason: int | None, count: int, timeout: float) -> float:
    """One pykvm run of the patched image; returns the seconds Machine.run took."""
    from ..machine import Machine
    plan = load_flat(patch(image, kind, count, END_DEBUG_EXIT), LOAD_ADDR, CpuMode.PROT32, MEM_SIZE, name="exitloop")
    with Machine(mem_size=MEM_SIZE, irqchip=kind == HLT_KIND, serial_out=lambda b: None) as machine:
        machine.load(plan)
        t0 = time.perf_counter()
        result = machine.run(timeout=timeout)
        t1 = time.perf_counter()
        counts = machine.exit_counts[0]
        io, mmio = counts[ExitReason.IO] - 1, counts[ExitReason.MMIO]    # less the debug-exit write
    if result.status != DEBUG_EXIT_STATUS:
        raise BenchError(f"pykvm (kind {kind}, count {count}) ended with status {result.status}: {result.reason}"
                         + (f"\n{result.report}" if result.report else ""))
    exits = io if reason == ExitReason.IO else mmio if reason == ExitReason.MMIO else io + mmio
    if exits != (count if reason is not None else 0):
        raise BenchError(f"pykvm (kind {kind}): expected {count} exits of reason {reason}, counted {exits}")
    return t1 - t0


# --- the benchmark ----------------------------------------------------------------------------
def per_exit_us(zero: list[float], full: list[float], count: int) -> float:
    """µs per exit from the medians of runs with count 0 and count ``count`` (benchmarks/jail.py)."""
    t_full, t_zero = statistics.median(full), statistics.median(zero)
    return max(t_full - t_zero, 0.0) / count * 1e6


def per_exit_samples_us(zero: list[float], full: list[float], count: int) -> list[float]:
    """µs per exit, one per repeat: (t_i(count) - t_i(0)) / count, each repeat's two runs paired."""
    return [max(f - z, 0.0) / count * 1e6 for z, f in zip(zero, full, strict=True)]


def summary(samples: list[float]) -> dict[str, float]:
    """{"us": median, "min": ..., "max": ...} of per-exit samples in µs, rounded to ns."""
    return {"us": round(statistics.median(samples), 3), "min": round(min(samples), 3),
            "max": round(max(samples), 3)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def measure(count: int, repeat: int, progress=None, require_c: bool = True, qemu: bool = True,
            distributions: dict | None = None) -> dict[str, dict]:
    """Run every kind under pykvm, C and QEMU, ``repeat`` times, interleaved; return the table:
    {kind: {"pykvm_us", "c_us", "qemu_us" (medians, µs per exit; None for a side not measured),
    "pykvm_range", "c_range", "qemu_range" ([min, max] µs), "ratio_c", "ratio_qemu" (pykvm over
    each, of the medians)}}. C is skipped without gcc unless ``require_c`` (then Unavailable);
    QEMU without qemu-system-x86_64 or with ``qemu`` False. ``distributions``, if given, is filled
    with {kind: {side: [µs per exit, one per repeat]}}."""
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
    qemu_exe = find_qemu() if qemu else None
    image_path = find_guest("exitloop").path
    image = image_path.read_bytes()
    timeout = 30.0 + count * 1e-3   # 1 ms per exit is ~40x slower than expected: something is wrong

    sides = [side for side, there in zip(SIDES, (True, exe is not None, qemu_exe is not None), strict=True)
             if there]
    samples = {name: {side: ([], []) for side in sides} for name, _, _ in KINDS}   # (t(0) list, t(N) list)
    with tempfile.TemporaryDirectory(prefix="pykvm-bench-") as tmp:
        elves = {}
        for _, kind, _ in KINDS:        # QEMU's kernels: the same patched images, PVH-wrapped
            for n in (0, count):
                elves[kind, n] = Path(tmp) / f"exitloop-{kind}-{n}.elf"
                elves[kind, n].write_bytes(pvh_elf(patch(image, kind, n, END_DEBUG_EXIT)))
        runners = {
            "pykvm": lambda kind, reason, n: run_pykvm(image, kind, reason, n, timeout),
            "c": lambda kind, reason, n: run_c(exe, image_path, kind, n, timeout),
            "qemu": lambda kind, reason, n: run_qemu(qemu_exe, elves[kind, n], timeout),
        }
        for r in range(repeat):
            if progress:
                progress(f"repeat {r + 1}/{repeat}")
            for i, (name, kind, reason) in enumerate(KINDS):
                shift = (r + i) % len(sides)
                for side in sides[shift:] + sides[:shift]:
                    zero, full = samples[name][side]
                    zero.append(runners[side](kind, reason, 0))
                    full.append(runners[side](kind, reason, count))

    table = {}
    for name, _, _ in KINDS:
        per_side = {side: per_exit_samples_us(*samples[name][side], count) for side in sides}
        row: dict = {}
        for side in SIDES:
            s = summary(per_side[side]) if side in per_side else None
            row[f"{side}_us"] = s["us"] if s else None
            row[f"{side}_range"] = [s["min"], s["max"]] if s else None
        row["ratio_c"] = _ratio(row["pykvm_us"], row["c_us"])
        row["ratio_qemu"] = _ratio(row["pykvm_us"], row["qemu_us"])
        table[name] = row
        if distributions is not None:
            distributions[name] = per_side
    return table


def check_plotting() -> None:
    """Unavailable (status 2) unless matplotlib can be imported: checked before the benchmark runs."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise Unavailable("--plot needs matplotlib, which is not installed: pip install 'pykvm[plot]' "
                          "(or pip install matplotlib)") from None


_LABELS = {"pykvm": "pykvm", "c": "C KVM_RUN loop", "qemu": "QEMU microvm"}


def plot_latencies(distributions: dict[str, dict[str, list[float]]], path: str, title: str = "") -> None:
    """Write a PNG to ``path``: per kind, a box plot of the µs-per-exit samples of each side
    ({kind: {"pykvm"|"c"|"qemu": [µs, ...]}}), with every sample drawn as a dot. OSError if unwritable."""
    import matplotlib
    matplotlib.use("Agg")                      # files only: no display needed
    import matplotlib.pyplot as plt
    kinds = list(distributions)
    sides = [side for side in SIDES if any(side in distributions[k] for k in kinds)]
    fig, ax = plt.subplots(figsize=(1.8 * len(kinds) + 2, 4.5))
    width = 0.8 / len(sides)
    for j, side in enumerate(sides):
        positions = [i + (j - (len(sides) - 1) / 2) * width for i in range(len(kinds))]
        data = [distributions[k].get(side, []) for k in kinds]
        box = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True, showfliers=False)
        color = ("tab:blue", "tab:orange", "tab:green")[j]
        for patch_ in box["boxes"]:
            patch_.set_facecolor(color)
            patch_.set_alpha(0.35)
        for x, values in zip(positions, data, strict=True):
            ax.plot([x] * len(values), values, ".", color=color)
        ax.plot([], [], "s", color=color, alpha=0.6, label=_LABELS[side])
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


def format_table(table: dict[str, dict]) -> str:
    """The result as a text table: per kind, each side's median µs per exit and its [min-max]
    over the repeats, then pykvm/C and pykvm/QEMU ("-" where a side was not measured)."""
    def num(value) -> str:
        return "-" if value is None else f"{value:.2f}"

    def cell(row, side) -> str:
        rng = row[f"{side}_range"]
        return "-" if rng is None else f"{row[f'{side}_us']:.2f} [{rng[0]:.2f}-{rng[1]:.2f}]"
    lines = [f"{'kind':<11}{'pykvm µs [range]':>22}{'C µs [range]':>22}{'QEMU µs [range]':>22}"
             f"{'pykvm/C':>9}{'pykvm/QEMU':>12}"]
    for name, row in table.items():
        lines.append(f"{name:<11}{cell(row, 'pykvm'):>22}{cell(row, 'c'):>22}{cell(row, 'qemu'):>22}"
                     f"{num(row['ratio_c']):>9}{num(row['ratio_qemu']):>12}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, shared by ``pykvm bench`` and ``python -m benchmarks.exit_latency``."""
    parser.add_argument("--count", type=int, default=DEFAULT_COUNT,
                        help=f"exits per timed run (default {DEFAULT_COUNT})")
    parser.add_argument("--repeat", type=int, default=DEFAULT_REPEAT,
                        help=f"runs per kind and side; the median is used (default {DEFAULT_REPEAT})")
    parser.add_argument("--cpu", type=int, default=None,
                        help="pin this process, its vCPU thread, the C loop and QEMU to this host CPU")
    parser.add_argument("--no-qemu", action="store_true", help="leave QEMU out even when it is installed")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="also draw each kind's latency distribution to this PNG (needs pykvm[plot])")
    parser.add_argument("--require-c", action="store_true",
                        help="fail (status 2) when gcc cannot build the C baseline instead of measuring without it")


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks.exit_latency",
         require_c: bool = True) -> int:
    """Run the benchmark with command-line ``argv``; returns the exit status (0, 1 or 2)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args, require_c=require_c or args.require_c)


def run(args, require_c: bool = False) -> int:
    """The benchmark for parsed ``args`` (count, repeat, json, plot, cpu, no_qemu); returns the exit status."""
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
    cpu = getattr(args, "cpu", None)
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})     # inherited by the vCPU thread and the child processes
        except (OSError, ValueError) as e:
            note(f"exit_latency: cannot pin to CPU {cpu}: {e}")
            return 2
    note(f"host backend: {host_backend()}; targets for port I/O and MMIO ({', '.join(TARGET_KINDS)}): "
         f"pykvm/C <= {TARGET}, pykvm/QEMU <= {TARGET_QEMU}; count {args.count}, repeat {args.repeat}"
         + (f", pinned to CPU {cpu}" if cpu is not None else ", not pinned"))
    try:
        distributions: dict = {}
        table = measure(args.count, args.repeat, progress=note, require_c=require_c,
                        qemu=not getattr(args, "no_qemu", False), distributions=distributions)
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
    for key, side, target in (("ratio_c", "C", TARGET), ("ratio_qemu", "QEMU", TARGET_QEMU)):
        ratios = [table[kind][key] for kind in TARGET_KINDS if table[kind][key] is not None]
        if ratios:
            worst = max(ratios)
            note(f"port I/O and MMIO: worst pykvm/{side} {worst:.3f} -> target <= {target} "
                 + ("met" if worst <= target else "NOT met"))
        else:
            note(f"{side} was not measured (not installed): no pykvm/{side} ratio")
    if plot is not None:
        try:
            plot_latencies(distributions, plot, f"exit latency on {host_backend()}, count {args.count}, "
                                                f"{args.repeat} repeats")
        except OSError as e:
            note(f"exit_latency: cannot write the plot {plot}: {e.strerror or e}")
            return 2
        note(f"latency distributions drawn to {plot}")
    return 0
