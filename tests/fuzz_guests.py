"""Hostile guest code for the fuzz and soak tests: seeded, reproducible byte soups and port/MMIO
access programs, encoded by hand (no assembler needed), and a harness that runs them in-process
through :class:`pykvm.machine.Machine` and checks that every run ends the documented way.

Documented ends (README, "Exit status of pykvm run"): 0, an odd debug-exit status (1..255), 2, 4, 124.
A run whose reason says "internal error in pykvm" is a pykvm bug (a Python exception in the
exit loop) and never acceptable, whatever its status.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from pykvm.x86.modes import CpuMode

LOAD_ADDR = 0x8000
DEBUG_EXIT = 0xF4
MMIO_TEST = 0xD000_0000
VIRTIO_BASE = 0xD000_1000
VIRTIO_WINDOW = 0x200
# Every port range pykvm claims (machine.py), and a few nobody claims.
PORTS = [
    *range(0x3F8, 0x400),           # COM1
    0x70, 0x71,                     # CMOS/RTC
    0x60, 0x64,                     # i8042
    *range(0xCF8, 0xD00),           # PCI configuration mechanism 1
    0x510, 0x511,                   # fw_cfg
    0x80,                           # POST
    0x20, 0x21, 0xA0, 0xA1, 0x40, 0x41, 0x42, 0x43, 0x61, 0x87, 0xED,   # probed sinks (or in-kernel)
    *range(0x2F8, 0x300), *range(0x3E8, 0x3F0), *range(0x2E8, 0x2F0),
    0x0, 0x1F0, 0x378, 0xFFFF,      # unclaimed
]
# Ports that end the run at once: used rarely, so that most programs run to their end.
ENDING_PORTS = [DEBUG_EXIT, 0x8900, 0x64]
# virtio-mmio registers (virtio 1.x, 4.2.2)
VIRTIO_REGS = [0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044, 0x050,
               0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0FC, 0x100, 0x104, 0x108]
FUZZ_RAM = (0x100000, 0x140000)     # RAM the virtio programs point their queues into (random bytes)


def documented(status: int) -> bool:
    """A status `pykvm run` documents: 0, 2, 4, 124, or a debug-exit status: odd and within the 8 bits
    a process status has (((v << 1) | 1) & 0xff, whatever the write's width)."""
    return status in (0, 2, 4, 124) or (status & 1 == 1 and 0 < status <= 0xFF)


# --- encodings ---------------------------------------------------------------------------------
def _mov_dx(port: int, bits: int) -> bytes:
    return (b"" if bits == 16 else b"\x66") + b"\xba" + struct.pack("<H", port)


def _mov_eax(value: int, bits: int) -> bytes:
    if bits == 16:
        return b"\xb8" + struct.pack("<H", value & 0xFFFF)
    return b"\xb8" + struct.pack("<I", value & 0xFFFFFFFF)


def port_access(port: int, size: int, write: bool, value: int, bits: int) -> bytes:
    """mov dx, port; [mov (e)ax, value]; out dx, al/ax/eax or in al/ax/eax, dx."""
    wide = {1: b"", 2: b"" if bits == 16 else b"\x66", 4: b"\x66" if bits == 16 else b""}[size]
    op = (0xEE if size == 1 else 0xEF) if write else (0xEC if size == 1 else 0xED)
    return _mov_dx(port, bits) + (_mov_eax(value, bits) if write else b"") + wide + bytes([op])


def mmio_access(addr: int, size: int, write: bool, value: int, bits: int) -> bytes:
    """mov (r/e)bx, addr; [mov (r/e)ax, value]; mov [(r/e)bx], al/ax/eax/rax or the load."""
    if bits == 64:
        setup = b"\x48\xbb" + struct.pack("<Q", addr) + (b"\x48\xb8" + struct.pack("<Q", value) if write else b"")
    else:
        size = min(size, 4)
        setup = b"\xbb" + struct.pack("<I", addr & 0xFFFFFFFF) + (_mov_eax(value, 32) if write else b"")
    prefix = {1: b"", 2: b"\x66", 4: b"", 8: b"\x48"}[size]
    op = (0x88 if size == 1 else 0x89) if write else (0x8A if size == 1 else 0x8B)
    return setup + prefix + bytes([op, 0x03])


def debug_exit(value: int, bits: int) -> bytes:
    """mov al, value; out 0xf4, al; cli; hlt."""
    return bytes([0xB0, value & 0xFF, 0xE6, DEBUG_EXIT, 0xFA, 0xF4])


# --- random code --------------------------------------------------------------------------------
MODES = {CpuMode.REAL: 16, CpuMode.PROT32: 32, CpuMode.LONG64: 64}


def random_code(rng: random.Random, mode: CpuMode) -> bytes:
    """Random bytes, or (half the time) a soup of random bytes and port/MMIO accesses."""
    bits = MODES[mode]
    if rng.random() < 0.5:
        return rng.randbytes(rng.randint(1, 512))
    out = bytearray()
    for _ in range(rng.randint(1, 40)):
        pick = rng.random()
        if pick < 0.4:
            out += rng.randbytes(rng.randint(1, 8))
        elif pick < 0.8:
            port = rng.choice(ENDING_PORTS) if rng.random() < 0.02 else rng.choice(PORTS)
            out += port_access(port, rng.choice((1, 2, 4)), rng.random() < 0.6, rng.getrandbits(32), bits)
        elif bits != 16:
            addr = MMIO_TEST + rng.randrange(0, 0x2000) if rng.random() < 0.7 else rng.getrandbits(32)
            out += mmio_access(addr, rng.choice((1, 2, 4, 8)), rng.random() < 0.5, rng.getrandbits(64), bits)
    return bytes(out)


def virtio_program(rng: random.Random, n_devices: int, ops: int = 200) -> bytes:
    """A long-mode program of ``ops`` accesses: random port I/O on every device, random MMIO on the
    test device and the virtio windows, and drivers that bring a random queue live with its rings
    in random RAM (FUZZ_RAM) and notify it. Ends with debug-exit 0x2a (status 85)."""
    out = bytearray()
    lo, hi = FUZZ_RAM
    for _ in range(ops):
        pick = rng.random()
        if pick < 0.05:     # an RTC register (A, B, C: rates and interrupt enables), then its value
            out += port_access(0x70, 1, True, rng.choice((0x0A, 0x0B, 0x0C)), 64)
            out += port_access(0x71, 1, rng.random() < 0.7, rng.getrandbits(8), 64)
        elif pick < 0.3:
            port = rng.choice(ENDING_PORTS) if rng.random() < 0.005 else rng.choice(PORTS)
            out += port_access(port, rng.choice((1, 2, 4)), rng.random() < 0.6, rng.getrandbits(32), 64)
        elif pick < 0.45:
            addr = MMIO_TEST + rng.randrange(0, 0x20)
            out += mmio_access(addr, rng.choice((1, 2, 4, 8)), rng.random() < 0.5, rng.getrandbits(64), 64)
        elif pick < 0.75:
            base = VIRTIO_BASE + VIRTIO_WINDOW * rng.randrange(n_devices)
            reg = rng.choice(VIRTIO_REGS) if rng.random() < 0.9 else rng.randrange(VIRTIO_WINDOW)
            value = rng.getrandbits(32) if rng.random() < 0.5 else rng.choice((0, 1, 2, 3, 4, 7, 0xF, 0x80))
            out += mmio_access(base + reg, 4 if rng.random() < 0.9 else rng.choice((1, 2, 8)),
                               rng.random() < 0.7, value, 64)
        else:
            base = VIRTIO_BASE + VIRTIO_WINDOW * rng.randrange(n_devices)
            queue = rng.randrange(3)
            aligned = rng.random() < 0.9         # mostly rings a device accepts, so chains get walked
            size = rng.choice((1, 2, 4, 8, 16, 32, 64)) if aligned else rng.getrandbits(16)
            desc, avail, used = (rng.randrange(lo, hi - 0x1000) & (~(a - 1) if aligned else ~0) for a in (16, 2, 4))
            steps = [(0x070, 0), (0x070, 1), (0x070, 3), (0x024, 1), (0x020, 1), (0x070, 0xB), (0x030, queue),
                     (0x038, size), (0x080, desc), (0x084, 0), (0x090, avail), (0x094, 0),
                     (0x0A0, used), (0x0A4, 0), (0x044, 1), (0x070, 0xF)]
            for reg, value in steps:
                out += mmio_access(base + reg, 4, True, value, 64)
            for _ in range(rng.randint(1, 4)):
                out += mmio_access(base + 0x050, 4, True, rng.choice((queue, rng.randrange(4))), 64)
            out += mmio_access(base + 0x064, 4, True, 0xFFFFFFFF, 64)
    out += debug_exit(0x2A, 64)
    return bytes(out)


def descriptor_soup(rng: random.Random, mem_size: int) -> bytes:
    """FUZZ_RAM's contents: 16-byte records that read as split-virtqueue descriptors (virtio 1.x,
    2.7.5) with addresses mostly in guest RAM, lengths up to 1 MiB, random flags (NEXT, WRITE,
    INDIRECT) and next indexes below 64, so that rings pointed anywhere in it hold chains that
    loop, overlap, nest indirect tables and cross the end of RAM."""
    out = bytearray()
    for _ in range((FUZZ_RAM[1] - FUZZ_RAM[0]) // 16):
        addr = rng.randrange(mem_size) if rng.random() < 0.8 else rng.getrandbits(64)
        length = rng.choice((0, 1, 2, 16, 512, 4096, rng.randrange(1 << 20)))
        out += struct.pack("<QIHH", addr, length, rng.getrandbits(3), rng.randrange(64))
    return bytes(out)


# --- the harness --------------------------------------------------------------------------------
def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@dataclass
class Tally:
    """What a batch of runs did: statuses, reasons (their first words), and problems found."""

    runs: int = 0
    statuses: Counter = field(default_factory=Counter)
    reasons: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def add(self, label: str, result, elapsed: float, timeout: float) -> None:
        self.runs += 1
        self.statuses[result.status] += 1
        self.reasons[_kind(result.reason)] += 1
        self.slowest = max(self.slowest, elapsed)
        if not documented(result.status):
            self.problems.append(f"{label}: undocumented status {result.status}: {result.reason}")
        if "internal error in pykvm" in result.reason:
            self.problems.append(f"{label}: {result.reason}\n{result.report}")
        if elapsed > timeout + 10:
            self.problems.append(f"{label}: ran {elapsed:.1f} s with a {timeout} s timeout")

    def summary(self) -> str:
        top = ", ".join(f"{k} x{n}" for k, n in self.reasons.most_common(8))
        return (f"{self.runs} runs; statuses {dict(sorted(self.statuses.items()))}; slowest {self.slowest:.2f} s; "
                f"reasons: {top}")


def _kind(reason: str) -> str:
    """'vCPU 0: triple fault (KVM_EXIT_SHUTDOWN): ...' -> 'triple fault'."""
    text = reason.split(": ", 1)[1] if reason.startswith("vCPU") and ": " in reason else reason
    for stop in (" (", ":", ",", " at "):
        text = text.split(stop, 1)[0]
    return " ".join(text.split()[:6])


def check_clean(before_fds: set[str], before_threads: set[threading.Thread], label: str) -> list[str]:
    """Descriptors and threads left over after a machine closed (with a short grace period for
    threads that are finishing their last instruction)."""
    problems = []
    deadline = time.monotonic() + 5
    while True:
        extra_threads = [t for t in threading.enumerate() if t not in before_threads and t.is_alive()]
        if not extra_threads or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    if extra_threads:
        problems.append(f"{label}: threads left running: {[t.name for t in extra_threads]}")
    extra_fds = open_fds() - before_fds
    if extra_fds:
        targets = []
        for fd in sorted(extra_fds):
            try:
                targets.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass            # the listing's own descriptor, closed already
        if targets:
            problems.append(f"{label}: descriptors left open: {targets}")
    return problems
