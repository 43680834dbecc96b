"""virtio-net throughput and latency: our small Linux on a TAP, pykvm against QEMU, in one run.

Each run creates a network namespace (benchmarks/netns.py) with one TAP, ``tap0`` at 192.0.2.1/24,
and boots the guest inside it with ``ip=192.0.2.2`` (kernel IP autoconfiguration):

* pykvm: ``pykvm run -k vmlinux-qemu -i initramfs.cpio --net tap=tap0``;
* QEMU: ``-M microvm,acpi=off`` with ``-netdev tap,ifname=tap0,vhost=off`` and ``-device
  virtio-net-device`` (virtio-mmio, modern: ``-global virtio-mmio.force-legacy=false``), the flags
  PLATFORM.md gives for this host. ``acpi=off`` because our kernel has no ACPI: with microvm's
  default (ACPI on) the guest's ping got no answer here; with it off, QEMU appends
  ``virtio_mmio.device=512@0xfeb00e00:12`` to the command line and eth0 works (I/O APIC pin 12).
  Both boot the same kernel (guests/linux/build/vmlinux-qemu, which QEMU can run
  here) and initramfs with the same command line.

Once the shell answers, three measurements, all driven from the host side inside the namespace:

    ping       host -> guest, ``busybox ping -c 10 -i 0.2``: the average round trip (ms)
    to host    the guest pipes --mib MiB of zeros through busybox ``nc`` to a host listener,
               timed on the host from accept to end of stream
    to guest   the host sends --mib MiB to ``nc -l`` in the guest (output to /dev/null), timed
               from connect to the guest closing the connection (so all data was received)

Runs alternate between the VMMs (order flipped each repeat); medians of --repeat runs, MiB/s, and
the ratio pykvm / QEMU (target >= 0.5 for throughput).

    make -C guests/linux qemu && python -m benchmarks.net_throughput [--mib 2] [--repeat 3] [--json]

Needs root (namespaces, TAPs), qemu-system-x86_64 and the built guest.
"""

from __future__ import annotations

import argparse
import json
import re
import select
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from . import netns

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "guests" / "linux" / "build"
KERNEL, INITRD = BUILD / "vmlinux-qemu", BUILD / "initramfs.cpio"
HOST, GUEST = "192.0.2.1", "192.0.2.2"
MAC = "02:00:00:00:00:02"
CMDLINE = f"console=ttyS0 panic=-1 ip={GUEST}:::255.255.255.0::eth0:off"
QUIRKS = "noxsave clearcpuid=smap,popcnt,erms,fsrm,cx16"     # pykvm adds these itself on kvm_pvm
TO_HOST_PORT, TO_GUEST_PORT = 5001, 5002
TARGET = 0.5
BOOT_LIMIT = 300.0


def commands(qemu: str) -> dict[str, list[str]]:
    return {
        "pykvm": [sys.executable, "-m", "pykvm", "run", "-q", "-k", str(KERNEL), "-i", str(INITRD), "-m", "128M",
                  "-p", CMDLINE, "--net", f"tap=tap0,mac={MAC}"],
        "qemu": [qemu, "-accel", "kvm", "-cpu", "host,-arch-capabilities,-cx16", "-M", "microvm,acpi=off",
                 "-nodefaults", "-no-user-config", "-serial", "stdio", "-display", "none", "-no-reboot", "-m", "128M",
                 "-global", "virtio-mmio.force-legacy=false",
                 "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,vhost=off",
                 "-device", f"virtio-net-device,netdev=n0,mac={MAC}",
                 "-kernel", str(KERNEL), "-initrd", str(INITRD), "-append", f"{CMDLINE} {QUIRKS}"],
    }


class Console:
    """The guest's serial console through the VMM's stdin/stdout."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.buf = b""

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait_for(self, pattern: bytes, limit: float) -> re.Match:
        deadline = time.monotonic() + limit
        regex = re.compile(pattern)
        while not (m := regex.search(self.buf)):
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"never saw {pattern!r}:\n{self.buf[-1500:].decode(errors='replace')}")
            if select.select([self.proc.stdout], [], [], min(left, 1.0))[0]:
                self.buf += self.proc.stdout.read1(65536)
        return m


def one_run(name: str, cmd: list[str], mib: int) -> dict[str, float]:
    with netns.Netns("pykvm-bench") as ns:
        ns.add_tap("tap0", f"{HOST}/24")
        ns.run(["sysctl", "-qw", "net.ipv6.conf.tap0.disable_ipv6=1"])
        proc = ns.popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        con = Console(proc)
        try:
            con.wait_for(b"pykvm-linux: init ready", BOOT_LIMIT)
            time.sleep(0.5)
            con.send("echo up-$((40+2))\n")
            con.wait_for(b"up-42", 60)
            ping = ns.run(["busybox", "ping", "-c", "10", "-i", "0.2", "-W", "5", GUEST], timeout=60)
            m = re.search(rb"= [\d.]+/([\d.]+)/", ping.stdout)
            if ping.returncode or not m:
                raise RuntimeError(f"{name}: ping failed: {ping.stdout.decode()}{ping.stderr.decode()}")
            # guest -> host: the listener first, then the guest's sender
            listener = ns.popen([sys.executable, "-m", "benchmarks.net_throughput", "--host-side", "recv"],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert listener.stdout.readline().strip() == b"listening"
            con.send(f"dd if=/dev/zero bs=65536 count={mib * 16} 2>/dev/null | nc {HOST} {TO_HOST_PORT}; "
                     f"echo sent-$((40+2))\n")
            out, err = listener.communicate(timeout=600)
            to_host = json.loads(out)
            con.wait_for(b"sent-42", 60)
            # host -> guest
            con.send(f"nc -l -p {TO_GUEST_PORT} >/dev/null; echo got-$((40+2))\n")
            sender = ns.run([sys.executable, "-m", "benchmarks.net_throughput", "--host-side", "send", str(mib)],
                            cwd=ROOT, timeout=600)
            to_guest = json.loads(sender.stdout)
            con.wait_for(b"got-42", 60)
        finally:
            proc.kill()
            proc.wait()
    for what, r in (("to host", to_host), ("to guest", to_guest)):
        if r["bytes"] != mib << 20:
            raise RuntimeError(f"{name}: {what}: {r['bytes']} bytes arrived, not {mib << 20}")
    return {"ping_ms": float(m.group(1)),
            "to_host_mib_s": mib / to_host["seconds"], "to_guest_mib_s": mib / to_guest["seconds"]}


# --- the host side, run inside the namespace -----------------------------------------------------

def host_recv() -> None:
    """Accept one connection on TO_HOST_PORT, read to its end; print bytes and seconds (JSON)."""
    srv = socket.create_server((HOST, TO_HOST_PORT))
    print("listening", flush=True)
    conn, _ = srv.accept()
    start, total = time.perf_counter(), 0
    while data := conn.recv(1 << 20):
        total += len(data)
    print(json.dumps({"bytes": total, "seconds": time.perf_counter() - start}))


def host_send(mib: int) -> None:
    """Connect to the guest's TO_GUEST_PORT (retrying until nc listens), send ``mib`` MiB, and wait
    for the guest to close; print bytes and seconds (JSON)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = socket.create_connection((GUEST, TO_GUEST_PORT), timeout=60)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    chunk = bytes(1 << 20)
    start = time.perf_counter()
    for _ in range(mib):
        conn.sendall(chunk)
    conn.shutdown(socket.SHUT_WR)
    while conn.recv(65536):
        pass
    print(json.dumps({"bytes": mib << 20, "seconds": time.perf_counter() - start}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=2, help="MiB per transfer (default 2)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--host-side", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.host_side:
        if args.host_side[0] == "recv":
            host_recv()
        else:
            host_send(int(args.host_side[1]))
        return 0
    qemu = shutil.which("qemu-system-x86_64")
    problem = netns.problem()
    if problem or qemu is None or not KERNEL.exists() or not INITRD.exists():
        print(problem or "needs qemu-system-x86_64 (Debian: qemu-system-x86) and `make -C guests/linux qemu`",
              file=sys.stderr)
        return 2
    cmds = commands(qemu)
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in cmds}
    for i in range(args.repeat):
        for name in (list(cmds) if i % 2 == 0 else list(reversed(cmds))):
            samples[name].append(one_run(name, cmds[name], args.mib))
            s = samples[name][-1]
            print(f"{name} run {i + 1}: ping {s['ping_ms']:.2f} ms, to host {s['to_host_mib_s']:.2f} MiB/s, "
                  f"to guest {s['to_guest_mib_s']:.2f} MiB/s", file=sys.stderr)
    keys = ("to_host_mib_s", "to_guest_mib_s", "ping_ms")
    result = {k: {name: statistics.median(s[k] for s in samples[name]) for name in cmds} for k in keys}
    for row in result.values():
        row["ratio"] = row["pykvm"] / row["qemu"]
    if args.json:
        print(json.dumps({"mib": args.mib, "repeat": args.repeat, **result}))
    else:
        print(f"median of {args.repeat}, {args.mib} MiB per transfer      pykvm       QEMU   pykvm/QEMU")
        for k, label in (("to_host_mib_s", "guest -> host TCP (MiB/s)"),
                         ("to_guest_mib_s", "host -> guest TCP (MiB/s)"),
                         ("ping_ms", "ping host -> guest RTT (ms)")):
            r = result[k]
            print(f"{label:<36} {r['pykvm']:9.2f} {r['qemu']:10.2f} {r['ratio']:12.2f}")
        print(f"target: throughput ratio >= {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
