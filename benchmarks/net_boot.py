"""What the network costs the small Linux's boot under pykvm (issue 14, part 3), in one run.

The same initramfs and kernel command line, timed from launch to the shell's answer to
`echo $((6*7))` (benchmarks/boot_linux.py's ``time_boot``: the banner, the /init marker, the answer),
in up to three variants, all inside one network namespace (benchmarks/netns.py: ``tap0`` at
192.0.2.1/24, no route out) so that they differ only in what is named:

    plain    guests/linux/build/vmlinux (the kernel with IPv4, virtio-net and IP_PNP), no card
    net      the same kernel with ``--net tap=tap0`` and ``ip=192.0.2.2:::255.255.255.0::eth0:off``:
             the card is probed and eth0 configured before /init
    nonet    --nonet-kernel PATH: a kernel built from the config without the network options
             (guests/linux/pykvm.config without its networking section), no card

Runs rotate the order of the variants every repeat; medians, and each variant's ratio to the
baseline (``nonet`` when given, else ``plain``). Issue 14's target: within 10 %.

    python -m benchmarks.net_boot [--repeat 3] [--nonet-kernel PATH] [--json]

Needs root (the namespace and the TAP) and the built guest (make -C guests/linux).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from . import netns
from .boot_linux import EVENTS, time_boot

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "guests" / "linux" / "build"
KERNEL, INITRD = BUILD / "vmlinux", BUILD / "initramfs.cpio"
CMDLINE = "console=ttyS0 earlyprintk=ttyS0 panic=-1"
IP_ARG = "ip=192.0.2.2:::255.255.255.0::eth0:off"


def commands(nonet_kernel: Path | None) -> dict[str, list[str]]:
    def run(kernel: Path, cmdline: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "pykvm", "run", "-q", "-k", str(kernel), "-i", str(INITRD), "-m", "64M",
                "-p", cmdline, *extra]
    cmds = {"plain": run(KERNEL, CMDLINE),
            "net": run(KERNEL, f"{CMDLINE} {IP_ARG}", "--net", "tap=tap0,mac=02:00:00:00:00:02")}
    if nonet_kernel is not None:
        cmds["nonet"] = run(nonet_kernel, CMDLINE)
    return cmds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nonet-kernel", type=Path, help="a vmlinux built without the network options")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    problem = netns.problem()
    missing = [p for p in (KERNEL, INITRD, args.nonet_kernel) if p is not None and not p.exists()]
    if problem or missing:
        print(problem or f"missing: {', '.join(map(str, missing))} (make -C guests/linux)", file=sys.stderr)
        return 2
    cmds = commands(args.nonet_kernel)
    names = list(cmds)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in cmds}
    with netns.Netns("pykvm-bench") as ns:
        ns.add_tap("tap0", "192.0.2.1/24")
        ns.run(["sysctl", "-qw", "net.ipv6.conf.tap0.disable_ipv6=1"])
        for i in range(args.repeat):
            for name in names[i % len(names):] + names[:i % len(names)]:
                samples[name].append(time_boot(ns.command(cmds[name])))
                print(f"{name} run {i + 1}: " + ", ".join(f"{e} {samples[name][-1][e]:.1f} s" for e in EVENTS),
                      file=sys.stderr)
    base = "nonet" if "nonet" in cmds else "plain"
    result = {e: {name: statistics.median(s[e] for s in samples[name]) for name in cmds} for e in EVENTS}
    if args.json:
        print(json.dumps({"repeat": args.repeat, "baseline": base, "samples": samples,
                          **{e: {**r, **{f"{n}/{base}": r[n] / r[base] for n in cmds if n != base}}
                             for e, r in result.items()}}))
    else:
        print(f"launch -> event, median of {args.repeat}   " + "".join(f"{n:>9}" for n in names)
              + "".join(f"{n + '/' + base:>13}" for n in names if n != base))
        for e, r in result.items():
            print(f"{e:<32}" + "".join(f"{r[n]:8.1f}s" for n in names)
                  + "".join(f"{r[n] / r[base]:13.3f}" for n in names if n != base))
        print(f"target: the network's cost within 10 % ({base} is the baseline)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
