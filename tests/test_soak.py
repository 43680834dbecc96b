"""A soak (issue 9, part 8): 300 VMs created, booted to their end and closed in one process. Open
descriptors and threads must come back to where they were, and the resident set may grow only by
a small bound (allocator noise, caches filled once). Every tenth VM is a Multiboot kernel on the
in-kernel irqchip with the virtio entropy device and an RTC interrupt source enabled by the
kernel's fw_cfg/CMOS traffic; the rest are the 64-bit hello. The figures are printed
(``pytest -s``)."""

from __future__ import annotations

import threading

from conftest import ROOT, needs_kvm
from fuzz_guests import open_fds, rss_kib

from pykvm.boot import bundled
from pykvm.boot.detect import load_kernel
from pykvm.boot.flat import load_flat
from pykvm.devices.virtio import attach_virtio
from pykvm.machine import Machine

pytestmark = needs_kvm
VMS = 300
WARMUP = 20
RSS_BOUND_KIB = 24 * 1024
MEM = 16 << 20


def boot_one(i: int, hello: bytes, mbinfo: bytes) -> int:
    out = bytearray()
    with Machine(mem_size=MEM, irqchip=i % 10 == 0, serial_out=out.extend) as machine:
        if i % 10 == 0:
            attach_virtio(machine, rng=True)
            machine.load(load_kernel(mbinfo, MEM, name="mbinfo.elf", cmdline=f"soak {i}"))
            # an RTC interrupt source (update-ended, IRQ 8), so its timer thread runs and must stop
            machine.cmos.write(0, 1, 0x0B)
            machine.cmos.write(1, 1, 0x12)
        else:
            machine.load(load_flat(hello, bundled.LOAD_ADDR, bundled.find("hello-long64").mode, MEM,
                                   name="hello-long64"))
        result = machine.run(timeout=30)
    expected = (0x10 << 1) | 1 if i % 10 == 0 else 0
    assert result.status == expected, f"VM {i}: {result.reason}\n{out.decode(errors='replace')}"
    assert out, f"VM {i} printed nothing"
    return result.status


def test_300_vms_leave_no_descriptor_thread_or_memory_behind():
    hello = bundled.find("hello-long64").path.read_bytes()
    mbinfo = (ROOT / "guests" / "mbinfo.elf").read_bytes()
    for i in range(WARMUP):
        boot_one(i, hello, mbinfo)
    fds, threads, rss = open_fds(), threading.active_count(), rss_kib()
    for i in range(WARMUP, WARMUP + VMS):
        boot_one(i, hello, mbinfo)
    fds_after, threads_after, rss_after = open_fds(), threading.active_count(), rss_kib()
    print(f"\nsoak: {VMS} VMs after {WARMUP} warm-up ones: open fds {len(fds)} -> {len(fds_after)}, "
          f"threads {threads} -> {threads_after}, RSS {rss / 1024:.1f} -> {rss_after / 1024:.1f} MiB "
          f"(+{(rss_after - rss) / 1024:.1f} MiB; bound {RSS_BOUND_KIB / 1024:.0f} MiB)")
    assert fds_after == fds, f"descriptors left open: {sorted(fds_after - fds)}"
    assert threads_after == threads
    assert rss_after - rss < RSS_BOUND_KIB
