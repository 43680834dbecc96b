"""Boot time of a tiny kernel: launch to guest exit, pykvm against QEMU, in one run.

The guest is the bundled Multiboot kernel guests/mbinfo.elf (written for `qemu -kernel`): it
prints what it was given and ends through the isa-debug-exit port. Both VMMs are timed as a user
sees them, from process start to process end, alternating, median of --repeat runs each.

    python -m benchmarks.boot_tiny [--repeat 5] [--json]

QEMU is installed from Debian (qemu-system-x86) when missing and apt-get is available.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL = ROOT / "guests" / "mbinfo.elf"
STATUS = 33   # mbinfo writes 0x10 to the debug-exit port
QEMU_CPU = "host,-arch-capabilities,-cx16"   # plain `-cpu host` aborts on the kvm_pvm backend


def commands(qemu: str) -> dict[str, list[str]]:
    common_mem = "128M"
    return {
        "pykvm": [sys.executable, "-m", "pykvm", "run", "-q", "-k", str(KERNEL), "-p", "bench", "-m", common_mem],
        "qemu": [qemu, "-accel", "kvm", "-cpu", QEMU_CPU, "-M", "pc", "-m", common_mem, "-nodefaults",
                 "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
                 "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", str(KERNEL), "-append", "bench"],
    }


def find_qemu() -> str | None:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None and shutil.which("apt-get"):
        print("installing qemu-system-x86 from Debian ...", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", "qemu-system-x86"], capture_output=True)
        qemu = shutil.which("qemu-system-x86_64")
    return qemu


def time_once(cmd: list[str]) -> float:
    start = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, stdin=subprocess.DEVNULL, cwd=ROOT, timeout=300)
    elapsed = time.perf_counter() - start
    if r.returncode != STATUS or b"mbinfo: done" not in r.stdout:
        raise SystemExit(f"{cmd[0]} did not boot the kernel (status {r.returncode}): {r.stderr.decode()[-500:]}")
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    qemu = find_qemu()
    if qemu is None:
        print("qemu-system-x86_64 is not installed and could not be installed", file=sys.stderr)
        return 2
    cmds = commands(qemu)
    samples: dict[str, list[float]] = {name: [] for name in cmds}
    for i in range(args.repeat):
        order = list(cmds) if i % 2 == 0 else list(reversed(cmds))
        for name in order:
            samples[name].append(time_once(cmds[name]))
    result = {name: statistics.median(times) for name, times in samples.items()}
    result["ratio"] = result["pykvm"] / result["qemu"]
    if args.json:
        print(json.dumps({"pykvm_s": result["pykvm"], "qemu_s": result["qemu"], "ratio": result["ratio"],
                          "repeat": args.repeat}))
    else:
        print(f"launch -> guest exit, median of {args.repeat}: pykvm {result['pykvm']:.3f} s, "
              f"QEMU {result['qemu']:.3f} s, ratio pykvm/QEMU {result['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
