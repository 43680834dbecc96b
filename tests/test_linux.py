"""Booting Linux: our small kernel (guests/linux/build) via PVH and as a bzImage, to a shell that
answers through the serial console; Debian's stock kernel via PVH (`pykvm fetch linux`); and the
bad inputs a user can hand the Linux loaders. Each boot costs 20-90 s here: CPL0 code is emulated
by kvm_pvm (PLATFORM.md), so the number of boots is kept to one per thing shown."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys

import pytest
from conftest import ROOT, backend, needs_kvm, run_pykvm

LINUX = ROOT / "guests" / "linux" / "build"
VMLINUX, BZIMAGE, INITRD = LINUX / "vmlinux", LINUX / "bzImage", LINUX / "initramfs.cpio"
MARKER = "pykvm-linux: init ready"

pytestmark = [needs_kvm, pytest.mark.skipif(
    not (VMLINUX.exists() and BZIMAGE.exists() and INITRD.exists()),
    reason="our small Linux is not built: run `make -C guests/linux` (.ci/run does)")]


def boot(kernel, script: str, *extra: str, timeout: float = 240, append: str = ""):
    return run_pykvm("run", "-k", str(kernel), "-i", str(INITRD), "-m", "64M",
                     "-p", f"console=ttyS0 earlyprintk=ttyS0 panic=-1 {append}".strip(), "--timeout", str(timeout),
                     *extra, input=script.encode(), timeout=timeout + 60)


def test_pvh_vmlinux_to_a_shell_that_answers_then_poweroff():
    r = boot(VMLINUX, "echo $((6*7))\npoweroff -f\n")
    out, err = r.stdout.decode(errors="replace"), " ".join(r.stderr.decode().split())
    assert r.returncode == 0, out[-2000:] + err
    assert MARKER in out
    assert re.search(r"^42\r?$", out, re.M), out[-1500:]          # the answer, not the echoed command
    assert "reboot: System halted" in out                        # no ACPI: poweroff halts the CPU
    assert "halted with interrupts disabled" in err
    if backend() == "kvm_pvm":
        assert "added 'noxsave clearcpuid=" in err               # the platform's parameters, said once
        assert err.count("added '") == 1


def test_init_hands_the_shell_its_environment_reaps_orphans_and_powers_off_when_the_shell_exits():
    # guests/linux/init.c: the kernel passes a NAME=value it does not know to init's environment, and
    # init to the shell; an orphan (the subshell's background sleep) is init's to reap, so its /proc
    # entry goes once it has exited (unreaped, it stays a zombie: the loop gives it >= 6 s); `exit`
    # powers off.
    script = ('echo "G=$pykvmgreeting H=$HOME P=$PATH"\n'
              "(sleep 0 & echo $! >/tmp/orphan); p=$(cat /tmp/orphan)\n"
              "for i in $(seq 30); do [ -e /proc/$p ] || break; sleep 0.2; done\n"
              "[ -e /proc/$p ] && echo ORPHAN=STAYED || echo ORPHAN=REAPED\n"
              "exit\n")
    r = boot(VMLINUX, script, append="pykvmgreeting=hello")
    out, err = r.stdout.decode(errors="replace"), " ".join(r.stderr.decode().split())
    assert r.returncode == 0, out[-2000:] + err
    assert re.search(r"^G=hello H=/root P=/bin:/sbin:/usr/bin:/usr/sbin\r?$", out, re.M), out[-1500:]
    assert re.search(r"^ORPHAN=REAPED\r?$", out, re.M), out[-1500:]
    assert "pykvm-linux: shell exited, powering off" in out
    assert "reboot: System halted" in out


def test_bzimage_reaches_the_marker_and_reboot_ends_the_run():
    r = boot(BZIMAGE, "uname -r\nreboot -f\n")
    out, err = r.stdout.decode(errors="replace"), r.stderr.decode()
    assert r.returncode == 0, out[-2000:] + err
    assert MARKER in out and "Linux version 6.1" in out
    assert "reboot: Restarting system" in out
    assert "reset" in err                                     # i8042 reset line (or int3 with no IDT)


@pytest.fixture(scope="module")
def debian_vmlinux():
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        pytest.skip("Debian's apt-get and dpkg-deb are needed to fetch the stock kernel")
    r = run_pykvm("fetch", "linux", timeout=600)
    assert r.returncode == 0, r.stderr
    return dict(line.split(" ", 1) for line in r.stdout.decode().splitlines())["vmlinux"]


def test_debian_stock_kernel_via_pvh(debian_vmlinux):
    """Banner, the command line as passed, the e820 map exactly as pykvm laid out RAM, and the int3
    self-test (an int3 at CPL0 that kvm_pvm cannot emulate, completed by pykvm's fallback): the
    kernel frees the alternatives memory only after that self-test passed."""
    from pykvm.boot import memory_map
    cmdline = "console=ttyS0 earlyprintk=ttyS0"
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "-k", debian_vmlinux, "-m", "256M",
                             "-p", cmdline, "--stats", "--timeout", "400"], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines = []
    try:
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace").rstrip("\r\n"))
            if "Freeing SMP alternatives memory" in lines[-1] or "int3 selftest" in lines[-1]:
                break
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    out = "\n".join(lines)
    assert re.search(r"Linux version 6\.1\.\S+-amd64 .*Debian", out), out[:2000]
    (seen,) = re.findall(r"Command line: (.*)", out)
    expected = cmdline + (" noxsave clearcpuid=smap,popcnt,erms,fsrm,cx16" if backend() == "kvm_pvm" else "")
    assert seen.strip() == expected
    e820 = re.findall(r"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (\w+)", out)
    ours = [(start, start + length - 1, "usable" if kind == 1 else "reserved")
            for start, length, kind in memory_map(256 << 20)]
    assert [(int(a, 16), int(b, 16), t) for a, b, t in e820] == ours
    assert "Freeing SMP alternatives memory" in out, out[-2000:]
    if backend() == "kvm_pvm":
        assert "int3: #BP injected" in err.decode()           # the self-test went through the fallback


@pytest.mark.parametrize("case", ["truncated-bzimage", "vmlinux-without-pvh", "initrd-too-big", "cmdline-too-long"])
def test_bad_linux_input_is_one_clear_error(case, tmp_path):
    kernel, initrd, extra = BZIMAGE, INITRD, []
    if case == "truncated-bzimage":
        kernel = tmp_path / "bzImage"
        kernel.write_bytes(BZIMAGE.read_bytes()[:200_000])
        message = "truncated"
    elif case == "vmlinux-without-pvh":
        kernel = tmp_path / "vmlinux"
        image = bytearray(VMLINUX.read_bytes())
        # Rename the owner of the PVH note (namesz 4, type 18, "Xen"): the note is gone, the ELF valid.
        pattern = re.compile(rb"\x04\x00\x00\x00.\x00\x00\x00\x12\x00\x00\x00Xen\x00", re.S)
        hits = [m.start() + 12 for m in pattern.finditer(image)]
        assert hits, "no PVH note found to remove"
        for at in hits:
            image[at:at + 3] = b"Xxx"
        kernel.write_bytes(bytes(image))
        message = "without a PVH entry note"
    elif case == "initrd-too-big":
        initrd = tmp_path / "big.cpio"
        initrd.write_bytes(bytes(60 << 20))        # smaller than RAM, but not beside the kernel
        message = "does not fit"
    else:
        extra = ["-p", "x" * 5000]
        message = "over"
    r = run_pykvm("run", "-k", str(kernel), "-i", str(initrd), "-m", "64M", *extra)
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("pykvm:")]) == 1
