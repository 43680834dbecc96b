"""Linux boot time: our small kernel to a shell answer, pykvm against QEMU microvm, in one run.

Both VMMs boot the same kernel (guests/linux/build/vmlinux-qemu: built without the int3 self-test
and the fwait that QEMU cannot get past on kvm_pvm, see guests/linux/README.md) with the same
uncompressed initramfs and command line, PVH-style (the uncompressed vmlinux). Three moments are
timed from launch, as a user sees them on the serial console:

    banner   "Linux version" appears
    marker   the initramfs's /init prints "pykvm-linux: init ready"
    answer   the shell answers `echo $((6*7))` (sent once the marker is seen) with 42

Runs alternate between the two VMMs; medians of --repeat runs each, and pykvm / QEMU ratios.

    make -C guests/linux qemu && python -m benchmarks.boot_linux [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "guests" / "linux" / "build"
KERNEL, INITRD = BUILD / "vmlinux-qemu", BUILD / "initramfs.cpio"
# The kvm_pvm parameters (pykvm adds them itself on that backend; QEMU is given them explicitly).
CMDLINE = "console=ttyS0 earlyprintk=ttyS0 panic=-1"
QUIRKS = "noxsave clearcpuid=smap,popcnt,erms,fsrm,cx16"
EVENTS = ("banner", "marker", "answer")


def commands(qemu: str) -> dict[str, list[str]]:
    return {
        "pykvm": [sys.executable, "-m", "pykvm", "run", "-q", "-k", str(KERNEL), "-i", str(INITRD), "-m", "64M",
                  "-p", CMDLINE],
        "qemu": [qemu, "-accel", "kvm", "-cpu", "host,-arch-capabilities,-cx16", "-M", "microvm", "-nodefaults",
                 "-no-user-config", "-serial", "stdio", "-display", "none", "-no-reboot", "-m", "64M",
                 "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", f"{CMDLINE} {QUIRKS}"],
    }


def time_boot(cmd: list[str], limit: float = 300) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    seen: dict[str, float] = {}
    buf = b""
    try:
        while len(seen) < len(EVENTS) and time.perf_counter() - start < limit:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            now = time.perf_counter() - start
            if "banner" not in seen and b"Linux version" in buf:
                seen["banner"] = now
            if "marker" not in seen and b"pykvm-linux: init ready" in buf:
                seen["marker"] = now
                time.sleep(0.5)                       # let the shell open the console, then type
                proc.stdin.write(b"echo $((6*7))\n")
                proc.stdin.flush()
            if "marker" in seen and "answer" not in seen and b"\n42\r\n" in buf.replace(b"\r\r", b"\r"):
                seen["answer"] = now
    finally:
        proc.kill()
        proc.wait()
    missing = [e for e in EVENTS if e not in seen]
    if missing:
        raise SystemExit(f"{cmd[0]}: never saw {', '.join(missing)} within {limit:.0f} s:\n"
                         f"{buf[-1500:].decode(errors='replace')}")
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or not KERNEL.exists() or not INITRD.exists():
        print("needs qemu-system-x86_64 (Debian: qemu-system-x86) and `make -C guests/linux qemu`", file=sys.stderr)
        return 2
    cmds = commands(qemu)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in cmds}
    for i in range(args.repeat):
        for name in (list(cmds) if i % 2 == 0 else list(reversed(cmds))):
            samples[name].append(time_boot(cmds[name]))
            print(f"{name} run {i + 1}: " + ", ".join(f"{e} {samples[name][-1][e]:.1f} s" for e in EVENTS),
                  file=sys.stderr)
    result = {e: {name: statistics.median(s[e] for s in samples[name]) for name in cmds} for e in EVENTS}
    for row in result.values():
        row["ratio"] = row["pykvm"] / row["qemu"]
    if args.json:
        print(json.dumps({e: {"pykvm_s": r["pykvm"], "qemu_s": r["qemu"], "ratio": r["ratio"]}
                          for e, r in result.items()}))
    else:
        print(f"launch -> event, median of {args.repeat}      pykvm      QEMU   pykvm/QEMU")
        for e, r in result.items():
            print(f"{e:<32} {r['pykvm']:8.1f} s {r['qemu']:8.1f} s {r['ratio']:10.2f}")
        print("target: pykvm <= 1.0x QEMU to the shell answer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
