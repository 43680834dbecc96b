"""What the network costs the small Linux's boot under pykvm (issue 14, part 3), in one run.

The same initramfs and kernel command line, timed from launch to the shell's answer to
`echo $((6*7))` (benchmarks/boot_linux.py's ``time_boot``: the banner, the /init marker, the answer),
in up to four variants, all inside one network namespace (benchmarks/netns.py: ``tap0`` at
192.0.2.1/24, no route out) so that they differ only in what is named:

    plain    guests/linux/build/vmlinux (the kernel with IPv4, virtio-net and IP_PNP), no card
    net      the same kernel with ``--net tap=tap0`` and ``ip=192.0.2.2:::255.255.255.0::eth0:off``:
             the card is probed and eth0 configured before /init
    nonet    --nonet-kernel PATH: a kernel built from the config without the network options
             (guests/linux/pykvm.config without its networking section), no card, the same
             initramfs: what the network options alone cost
    today    --today-initrd PATH as well: that kernel with the initramfs of the guest before the
             network (its /init a shell script, guests/linux/init.sh until this benchmark's
             commit): the boot issue 14 compares with

Runs rotate the order of the variants every repeat; medians, and each variant's ratio to the
baseline (``today`` when given, else ``nonet``, else ``plain``) and to ``nonet``. Issue 14's target:
the network guest's boot within 10 % of today's. The old initramfs:

    git show 19c216e:guests/linux/init.sh >/tmp/init.sh
    python3 guests/linux/mkinitramfs.py --init /tmp/init.sh -o /tmp/today.cpio

    python -m benchmarks.net_boot [--repeat 3] [--nonet-kernel PATH [--today-initrd PATH]] [--json]

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


def commands(nonet_kernel: Path | None, today_initrd: Path | None = None) -> dict[str, list[str]]:
    def run(kernel: Path, cmdline: str, *extra: str, initrd: Path = INITRD) -> list[str]:
        return [sys.executable, "-m", "pykvm", "run", "-q", "-k", str(kernel), "-i", str(initrd), "-m", "64M",
                "-p", cmdline, *extra]
    cmds = {"plain": run(KERNEL, CMDLINE),
            "net": run(KERNEL, f"{CMDLINE} {IP_ARG}", "--net", "tap=tap0,mac=02:00:00:00:00:02")}
    if nonet_kernel is not None:
        cmds["nonet"] = run(nonet_kernel, CMDLINE)
        if today_initrd is not None:
            cmds["today"] = run(nonet_kernel, CMDLINE, initrd=today_initrd)
    return cmds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--nonet-kernel", type=Path, help="a vmlinux built without the network options")
    parser.add_argument("--today-initrd", type=Path, help="the initramfs of the guest before the network")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.today_initrd is not None and args.nonet_kernel is None:
        parser.error("--today-initrd needs --nonet-kernel: today's guest is that kernel with that initramfs")
    problem = netns.problem()
    missing = [p for p in (KERNEL, INITRD, args.nonet_kernel, args.today_initrd) if p is not None and not p.exists()]
    if problem or missing:
        print(problem or f"missing: {', '.join(map(str, missing))} (make -C guests/linux)", file=sys.stderr)
        return 2
    cmds = commands(args.nonet_kernel, args.today_initrd)
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
    base = next(b for b in ("today", "nonet", "plain") if b in cmds)
    ratios = [(n, b) for b in dict.fromkeys((base, "nonet")) if b in cmds for n in ("plain", "net") if n != b]
    result = {e: {name: statistics.median(s[e] for s in samples[name]) for name in cmds} for e in EVENTS}
    if args.json:
        print(json.dumps({"repeat": args.repeat, "baseline": base, "samples": samples,
                          **{e: {**r, **{f"{n}/{b}": r[n] / r[b] for n, b in ratios}}
                             for e, r in result.items()}}))
    else:
        print(f"launch -> event, median of {args.repeat}   " + "".join(f"{n:>9}" for n in names)
              + "".join(f"{n + '/' + b:>13}" for n, b in ratios))
        for e, r in result.items():
            print(f"{e:<32}" + "".join(f"{r[n]:8.1f}s" for n in names)
                  + "".join(f"{r[n] / r[b]:13.3f}" for n, b in ratios))
        print(f"target: the network guest's boot within 10 % of {base}'s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
