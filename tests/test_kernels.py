"""Tiny kernels written for `qemu-system-x86_64 -kernel`, run unchanged under pykvm.

The bundled Multiboot kernels print what they were given and end through the isa-debug-exit
port, so their output and exit status can be compared with QEMU's in the same run."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import ROOT, needs_kvm, run_pykvm

pytestmark = needs_kvm

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")
# PLATFORM.md: plain -cpu host aborts on this backend (MSR 0x10a); these flags work on every host.
QEMU_CPU = "host,-arch-capabilities,-cx16"


def qemu(kernel: str, *extra: str, smp: int = 1) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU, "-accel", "kvm", "-cpu", QEMU_CPU, "-M", "pc", "-m", "128M", "-smp", str(smp),
                           "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
                           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", kernel, *extra],
                          capture_output=True, timeout=120, cwd=ROOT, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("cpus", [1, 2, 4])
def test_smp_kernel_brings_up_every_cpu(cpus):
    r = run_pykvm("run", "--kernel", "guests/smp.elf", "--cpus", str(cpus), "--timeout", "60")
    assert r.returncode == 35, r.stderr
    expected = [f"cpu {i}: apic id {i} (cpuid {i})" for i in range(cpus)] + [f"smp: {cpus} cpus up"]
    assert r.stdout.decode().splitlines() == expected


@needs_qemu
@pytest.mark.parametrize("cpus", [2, 4])
def test_smp_kernel_same_output_and_status_as_qemu(cpus):
    ours = run_pykvm("run", "-k", "guests/smp.elf", "-c", str(cpus), "-m", "128M", "--timeout", "60")
    theirs = qemu("guests/smp.elf", smp=cpus)
    assert theirs.returncode == 35, theirs.stderr
    assert ours.returncode == theirs.returncode
    assert ours.stdout == theirs.stdout


def test_multiboot_info_is_what_was_passed(tmp_path):
    module = tmp_path / "env.txt"
    module.write_bytes(b"HOME=/root PATH=/bin")
    r = run_pykvm("run", "-k", "guests/mbinfo.elf", "-p", "arg1 arg2", "--module", f"{module},first module",
                  "-m", "128M", "-c", "2")
    assert r.returncode == 33, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "mbinfo: magic=2badb002"
    assert "cmdline: guests/mbinfo.elf arg1 arg2" in lines
    assert "loader: pykvm" in lines
    assert "mem_lower=639 mem_upper=130048" in lines      # 128 MiB - 1 MiB, in KiB
    assert [line for line in lines if line.startswith("mmap:")] == [
        "mmap: base=0000000000000000 len=000000000009fc00 type=1",
        "mmap: base=000000000009fc00 len=0000000000060400 type=2",
        "mmap: base=0000000000100000 len=0000000007f00000 type=1",
    ]
    (mod,) = [line for line in lines if line.startswith("module:")]
    m = re.fullmatch(r"module: start=([0-9a-f]{8}) end=([0-9a-f]{8}) string=(.*) first=(.*)", mod)
    assert m, mod
    start, end = int(m[1], 16), int(m[2], 16)
    assert start % 4096 == 0 and end - start == len(b"HOME=/root PATH=/bin")
    assert m[3] == f"{module} first module" and m[4] == "HOME=/root PATH="
    assert "fw_cfg: signature=QEMU ram=0000000008000000 cpus=2" in lines
    assert lines[-1] == "mbinfo: done"


@needs_qemu
def test_multiboot_info_matches_qemu_where_the_machines_agree(tmp_path):
    """QEMU's PC has a BIOS (its own reserved areas, boot device) that pykvm's machine does not;
    everything the two machines share must read the same."""
    module = tmp_path / "m.txt"
    module.write_bytes(b"module contents")
    ours = run_pykvm("run", "-k", "guests/mbinfo.elf", "-p", "a b", "--module", f"{module},x", "-m", "128M")
    theirs = qemu("guests/mbinfo.elf", "-append", "a b", "-initrd", f"{module} x")
    assert ours.returncode == theirs.returncode == 33

    def shared(out: bytes) -> list[str]:
        keep = ("mbinfo:", "cmdline:", "mem_lower=", "fw_cfg:")
        lines = [line for line in out.decode().splitlines() if line.startswith(keep)]
        mods = [re.sub(r"start=\w+ end=\w+ ", "", line) for line in out.decode().splitlines()
                if line.startswith("module:")]
        return [re.sub(r"mem_upper=\d+", "", line) for line in lines] + mods

    assert shared(ours.stdout) == shared(theirs.stdout)


def test_int3_guest_through_a_kernel_flag_is_the_same_as_bundled():
    direct = run_pykvm("run", "int3")
    as_kernel = run_pykvm("run", "--kernel", "guests/int3.bin", "--mode", "long64")
    assert direct.returncode == as_kernel.returncode == 0
    assert direct.stdout == as_kernel.stdout


@pytest.mark.parametrize("args,message", [
    (["-k", "guests/smp.elf", "--initrd", "guests/README.md"], "cannot take --initrd"),
    (["-k", "guests/hello-long64.bin", "--module", "guests/README.md"], "cannot take --module"),
    (["-k", "guests/smp.elf", "-c", "0"], "-c/--cpus: '0' is out of range"),
    (["-k", "guests/nonexistent.elf"], "cannot read kernel"),
    (["--append", "x"], "need a --kernel"),
    (["-k", "/dev/zero"], "not a regular file"),
    (["-k", "guests/smp.elf", "-i", "/dev/urandom"], "not a regular file"),
])
def test_bad_kernel_options(args, message):
    r = run_pykvm("run", *args)
    assert r.returncode == 2, r.stderr
    assert message in r.stderr.decode() and b"Traceback" not in r.stderr


def test_file_larger_than_guest_ram_is_refused_before_reading(tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(3 << 20)          # sparse: 3 MiB that costs nothing
    r = run_pykvm("run", "-k", "guests/smp.elf", "-m", "2M", "--module", str(big))
    assert r.returncode == 2 and b"more than the guest's" in r.stderr and b"Traceback" not in r.stderr
