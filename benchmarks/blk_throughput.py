"""virtio-blk read throughput: the bundled virtio-blk guest reads 64 MiB, pykvm against QEMU.

The guest (guests/virtio-blk.elf, a Multiboot kernel with its own virtio-mmio driver) runs in
benchmark mode (``bench=<MiB>`` on its command line): it reads the image from sector 0 in
256 KiB requests, 4 in flight (``req=``, ``depth=``), checks that each request's first sector
starts with its sector number, and prints ``bench: start`` before the first request and
``bench: done`` after the last. The benchmark timestamps those two lines as they arrive on the
VMM's stdout, so boot and shutdown costs are left out: throughput = MiB / (t_done - t_start).

The same guest, the same image (in the page cache for both), the same RAM:

* pykvm: ``pykvm run -k guests/virtio-blk.elf --drive IMAGE -m 128M -p bench=64``, with its fast
  path (ioeventfd notifications, irqfd interrupts) and again with ``PYKVM_VIRTIO_FASTPATH=0``
  (notifications as MMIO exits handled on the vCPU thread);
* QEMU: ``-M microvm`` with ``-device virtio-blk-device`` (virtio-mmio, modern interface:
  ``-global virtio-mmio.force-legacy=false``) and the raw image as ``-drive if=none,format=raw``
  (QEMU's defaults: ioeventfd on, cache=writeback, aio=threads); the guest finds the device by
  probing microvm's virtio-mmio windows.

Runs alternate between the VMMs (order flipped each repeat); medians are reported.

    python -m benchmarks.blk_throughput [--mib 64] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .boot_tiny import QEMU_CPU, find_qemu

ROOT = Path(__file__).resolve().parent.parent
KERNEL = ROOT / "guests" / "virtio-blk.elf"
STATUS = 33          # the guest writes 0x10 to the debug-exit port when done
MEM = "128M"
TARGET = 0.5         # pykvm throughput / QEMU throughput


def make_image(path: Path, mib: int) -> None:
    """``mib`` MiB where every 512-byte sector starts with its sector number (le32)."""
    data = bytearray(mib << 20)
    for sector in range(len(data) // 512):
        struct.pack_into("<I", data, sector * 512, sector)
    path.write_bytes(data)


def commands(qemu: str | None, image: Path, guest_args: str) -> dict[str, tuple[list[str], dict]]:
    pykvm = [sys.executable, "-m", "pykvm", "run", "-q", "-k", str(KERNEL), "--drive", str(image), "-m", MEM,
             "-p", guest_args]
    cmds = {
        "pykvm": (pykvm, {}),
        "pykvm-no-fastpath": (pykvm, {"PYKVM_VIRTIO_FASTPATH": "0"}),
    }
    if qemu is not None:
        cmds["qemu"] = ([qemu, "-accel", "kvm", "-cpu", QEMU_CPU, "-M", "microvm", "-m", MEM, "-nodefaults",
                         "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
                         "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
                         "-global", "virtio-mmio.force-legacy=false",
                         "-drive", f"id=disk,file={image},format=raw,if=none",
                         "-device", "virtio-blk-device,drive=disk",
                         "-kernel", str(KERNEL), "-append", guest_args], {})
    return cmds


def time_once(cmd: list[str], env: dict) -> float:
    """Seconds between the guest's 'bench: start' and 'bench: done' lines."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            cwd=ROOT, env=dict(os.environ, **env))
    start = done = None
    output = []
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter()
        output.append(line)
        if line.startswith(b"bench: start"):
            start = now
        elif line.startswith(b"bench: done"):
            done = now
    _, err = proc.communicate(timeout=300)
    if proc.returncode != STATUS or start is None or done is None:
        raise SystemExit(f"{cmd[0]} did not run the benchmark guest (status {proc.returncode}):\n"
                         f"{b''.join(output).decode(errors='replace')}{err.decode(errors='replace')[-800:]}")
    return done - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="MiB to read (default 64)")
    parser.add_argument("--req", type=int, default=256, help="KiB per request (default 256)")
    parser.add_argument("--depth", type=int, default=4, help="requests in flight (default 4, at most 16)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("/dev/kvm is not usable here", file=sys.stderr)
        return 2
    qemu = find_qemu()
    if qemu is None:
        print("qemu-system-x86_64 is not installed: pykvm alone is measured, no ratio", file=sys.stderr)
    guest_args = f"bench={args.mib} req={args.req} depth={args.depth}"
    with tempfile.TemporaryDirectory(prefix="pykvm-blk-") as tmp:
        image = Path(tmp) / "bench.img"
        make_image(image, args.mib)
        cmds = commands(qemu, image, guest_args)
        samples: dict[str, list[float]] = {name: [] for name in cmds}
        for i in range(args.repeat):
            order = list(cmds) if i % 2 == 0 else list(reversed(cmds))
            for name in order:
                samples[name].append(time_once(*cmds[name]))
    mibs = {name: args.mib / statistics.median(times) for name, times in samples.items()}
    result = {f"{name}_mib_s": round(value, 1) for name, value in mibs.items()}
    result.update(mib=args.mib, req_kib=args.req, depth=args.depth, repeat=args.repeat)
    if "qemu" in mibs:
        result["ratio"] = round(mibs["pykvm"] / mibs["qemu"], 3)
        result["ratio_no_fastpath"] = round(mibs["pykvm-no-fastpath"] / mibs["qemu"], 3)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"virtio-blk sequential read, {args.mib} MiB in {args.req} KiB requests, {args.depth} in flight, "
          f"median of {args.repeat}:")
    for name, value in mibs.items():
        print(f"  {name:<18} {value:8.1f} MiB/s   ({statistics.median(samples[name]) * 1000:.1f} ms)")
    if "ratio" in result:
        print(f"  ratio pykvm/QEMU {result['ratio']:.2f} (target >= {TARGET}); "
              f"without the fast path {result['ratio_no_fastpath']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
