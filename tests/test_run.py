"""Booting guests end to end through `pykvm run`, as a user would."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT, assemble, backend, needs_kvm, run_pykvm

pytestmark = needs_kvm

# Modes this host's KVM cannot run: kvm_pvm supports paging only in long mode (measured: it clears
# CR0.PG set by the VMM, and a guest setting it itself takes #GP). There pykvm must say so clearly.
PAGING_WITHOUT_LONG_MODE_OK = backend() != "kvm_pvm"

HELLO = {
    "hello-real": ("real mode", 0x00, 0, 0),
    "hello-prot32": ("32-bit protected mode", 0x01, 0, 0),
    "hello-paged32": ("32-bit paging", 0x80000001, 0x10, 0),
    "hello-pae": ("PAE paging", 0x80000001, 0x20, 0),
    "hello-long64": ("64-bit long mode", 0x80000001, 0x20, 0x500),
}


@pytest.mark.parametrize("name", HELLO)
def test_hello_in_each_mode(name):
    words, cr0_bits, cr4_bits, efer_bits = HELLO[name]
    r = run_pykvm("run", name, "--timeout", "30")
    if name in ("hello-paged32", "hello-pae") and not PAGING_WITHOUT_LONG_MODE_OK:
        assert r.returncode == 2, r.stderr
        err = r.stderr.decode()
        assert "does not support" in err and "CR0.PG" in err and "Traceback" not in err
        assert r.stdout == b""
        return
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == f"Hello from {words}!"
    m = re.fullmatch(r"cr0=([0-9a-f]{8}) cr4=([0-9a-f]{8}) efer=([0-9a-f]{8})", lines[1])
    assert m, lines
    cr0, cr4, efer = (int(x, 16) for x in m.groups())
    assert cr0 & 0x80000001 == cr0_bits       # PG, PE as the mode needs
    assert cr4 & 0x30 == cr4_bits             # PSE / PAE
    assert efer & 0x500 == efer_bits          # LME | LMA
    assert b"halted with interrupts disabled" in r.stderr


def test_default_guest_is_the_64bit_hello():
    r = run_pykvm("run")
    assert r.returncode == 0 and r.stdout.startswith(b"Hello from 64-bit long mode!\n")


def test_list_names_every_bundled_guest():
    r = run_pykvm("run", "--list")
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.decode().splitlines()]
    assert names == ["hello-long64", "hello-real", "hello-prot32", "hello-paged32", "hello-pae", "mmio", "int3",
                     "spin", "exitloop", "gdbtest"]


def test_mmio_guest_checks_the_device():
    r = run_pykvm("run", "mmio")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"mmio: id=MMIO scratch ok\n"


def test_int3_reaches_the_guests_own_handler():
    """KVM here cannot emulate int3 at CPL0 in 64-bit mode (an emulation-failure exit); pykvm
    completes it by injecting #BP past the instruction, as the CPU would. On hardware KVM the CPU
    does it itself. Either way the guest's handler must see the return RIP after the int3."""
    r = run_pykvm("run", "int3")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "int3: before" and lines[-1] == "int3: after"
    expected = lines[1].split("=")[1]
    assert lines[2] == f"int3: #BP handler, rip={expected}"


def test_timeout_kicks_a_spinning_guest():
    start = time.monotonic()
    r = run_pykvm("run", "spin", "--timeout", "1")
    elapsed = time.monotonic() - start
    assert r.returncode == 124
    assert r.stdout == b"spinning forever\n"
    assert b"timed out after 1 s" in r.stderr
    assert elapsed < 20     # not a timing claim: a hang would hit the subprocess timeout instead


def test_ctrl_c_ends_the_run_cleanly():
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "spin"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"spinning forever\n"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:      # a hang: the guest spins forever, so end it here
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert b"interrupted" in err and b"Traceback" not in err


def test_user_flat_binary_in_real_mode(tmp_path):
    image = assemble("""
        mov $0x3f8, %dx
        mov $'R', %al
        out %al, %dx
        mov $'M', %al
        out %al, %dx
        mov $'\\n', %al
        out %al, %dx
        cli
        hlt
    """, 16, tmp_path)
    path = tmp_path / "my.bin"
    path.write_bytes(image)
    r = run_pykvm("run", str(path), "--load-addr", "0x8000", "--mode", "real")
    assert r.returncode == 0, r.stderr
    assert r.stdout == b"RM\n"


def test_debug_exit_status_and_string_io(tmp_path):
    image = assemble("""
        mov $msg, %esi
        mov $(end - msg), %ecx
        mov $0x3f8, %dx
        rep outsb
        mov $0x2a, %al
        out %al, $0xf4
    msg: .ascii "string I/O\\n"
    end:
    """, 32, tmp_path)
    path = tmp_path / "exit42.bin"
    path.write_bytes(image)
    r = run_pykvm("run", str(path), "--mode", "prot32")
    assert r.stdout == b"string I/O\n"
    assert r.returncode == (0x2A << 1) | 1
    assert b"debug-exit" in r.stderr


@pytest.mark.parametrize("width, value", [("w", 0x3130), ("l", 0x12345678)])
def test_wide_debug_exit_reports_the_status_the_shell_sees(tmp_path, width, value):
    """(v << 1) | 1 of a 16/32-bit write passes 255: pykvm says and returns its low 8 bits, as QEMU does."""
    register = {"w": "%ax", "l": "%eax"}[width]
    image = assemble(f"""
        mov ${value:#x}, {register}
        out {register}, $0xf4
        cli
        hlt
    """, 32, tmp_path)
    path = tmp_path / "wide.bin"
    path.write_bytes(image)
    r = run_pykvm("run", str(path), "--mode", "prot32")
    status = ((value << 1) | 1) & 0xFF
    assert r.returncode == status, r.stderr
    assert f"(exit status {status})".encode() in r.stderr, r.stderr
    assert f"{value:#x}".encode() in r.stderr       # the reason names the whole value written


def test_triple_fault_is_reported_with_registers_and_disassembly(tmp_path):
    image = assemble("mov $0x1234, %rbx\nud2\n", 64, tmp_path)
    path = tmp_path / "ud2.bin"
    path.write_bytes(image)
    r = run_pykvm("run", str(path), "--mode", "long64")
    err = r.stderr.decode()
    assert r.returncode == 4
    assert "triple fault" in err
    assert "64-bit long mode" in err
    assert "rbx=0000000000001234" in err
    assert re.search(r"=> 0x0000800[0-9a-f]: 0f 0b +ud2", err), err


@pytest.mark.parametrize("args,message", [
    (["run", "{empty}"], "is empty"),
    (["run", "{hello}", "--load-addr", "0x8000000"], "does not fit in guest RAM"),
    (["run", "{hello}", "--load-addr", "0x70000"], "overlaps the boot page tables"),
    (["run", "--mem", "lots"], "not a size"),
    (["run", "-m", "-5M"], "not a size: '-5M'"),
    (["run", "--mem", "100"], "guest memory must be"),
    (["run", "--timeout", "-1"], "is not a number of seconds above 0"),
    (["run", "--timeout", "0"], "is not a number of seconds above 0"),
    (["run", "--timeout", "1e10"], "at most 2592000 (30 days)"),
    (["run", "--timeout", "inf"], "is not a number of seconds"),
    (["run", "--timeout", "nan"], "is not a number of seconds"),
    (["run", "--timeout", "soon"], "not a number of seconds"),
    (["run", "no-such-guest"], "no bundled guest"),
    (["run", "{elf}"], "is an ELF file"),
    (["run", "hello-real", "--mode", "long64"], "built for real mode"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_gives_one_clear_line_and_status_2(tmp_path, args, message):
    (tmp_path / "empty.bin").write_bytes(b"")
    (tmp_path / "kernel.elf").write_bytes(b"\x7fELF" + bytes(60))
    files = {"empty": str(tmp_path / "empty.bin"), "hello": str(ROOT / "guests" / "hello-long64.bin"),
             "elf": str(tmp_path / "kernel.elf")}
    r = run_pykvm(*[a.format(**files) for a in args])
    err = r.stderr.decode()
    assert r.returncode == 2, err
    assert message in err
    assert "Traceback" not in err
    assert err.startswith("pykvm: ")


def test_missing_kvm_device_explains_the_fix():
    r = run_pykvm("run", env={"PYKVM_DEVICE": "/nonexistent/kvm"})
    err = r.stderr.decode()
    assert r.returncode == 2
    assert "does not exist" in err and "modprobe" in err and "Traceback" not in err


def test_unpermitted_kvm_device_explains_the_fix(monkeypatch):
    # Root may open any device node, so simulate the EACCES an unprivileged user gets.
    from pykvm.errors import KvmUnavailable
    from pykvm.kvm import fd as kvm_fd

    def refuse(path, flags):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(kvm_fd.os, "open", refuse)
    with pytest.raises(KvmUnavailable, match="may not open it.*usermod -aG kvm") as info:
        kvm_fd.Kvm("/dev/kvm")
    assert info.value.exit_status == 2


def test_info_lists_capabilities():
    r = run_pykvm("info")
    out = r.stdout.decode()
    assert r.returncode == 0
    assert "KVM API version: 12" in out
    assert re.search(r"KVM_CAP_IRQCHIP +present", out)
    assert "maximum" in out


def test_instruction_kvm_cannot_emulate_is_reported_precisely(tmp_path):
    """kvm_pvm's emulator gives up on popcnt at CPL0 (KVM_EXIT_INTERNAL_ERROR, emulation) and it is
    not one of the instructions pykvm completes: the report names the bytes, the instruction and the
    mode. On hardware KVM the CPU just runs it, and the guest reports the result."""
    image = assemble("""
        mov $0xF0F0, %rax
        popcnt %rax, %rbx
        mov %bl, %al
        out %al, $0xf4
    """, 64, tmp_path)
    path = tmp_path / "popcnt.bin"
    path.write_bytes(image)
    r = run_pykvm("run", str(path))
    err = r.stderr.decode()
    if backend() != "kvm_pvm":
        assert r.returncode == (8 << 1) | 1, err
        return
    assert r.returncode == 4, err
    assert "could not emulate `popcnt rbx, rax` (f3 48 0f b8 d8)" in " ".join(err.split())
    assert re.search(r"=> 0x00008007: f3 48 0f b8 d8 +popcnt rbx, rax", err), err
    assert "64-bit long mode" in err and "rax=000000000000f0f0" in err


def test_runs_with_stdin_closed():
    """No standard input at all (`pykvm run <&-`, a service, some CI): the guest still runs."""
    r = subprocess.run(["sh", "-c", 'exec "$0" -m pykvm run <&-', sys.executable], cwd=ROOT, capture_output=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"Hello from 64-bit long mode!")


@pytest.mark.parametrize("args", [["--help"], ["run", "--list"]])
def test_help_and_list_load_neither_cffi_nor_capstone(args):
    """The commands that run no VM start fast: no KVM binding, no disassembler."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pykvm", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded = [line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "pykvm.cli" in loaded
    assert not [m for m in loaded if m.split(".")[0] in ("cffi", "_cffi_backend", "capstone")], loaded


@needs_kvm
def test_bytes_that_are_not_utf8_pass_through_to_the_guest(tmp_path):
    """A command line or a kernel file name with a byte that is not UTF-8 (Python holds it as a
    surrogate) boots, and the guest gets the byte as given: mbinfo prints its Multiboot command line,
    one '.' per byte it cannot show (so a re-encoded byte, e.g. U+FFFD's three, would show as more)."""
    import os
    kernel = os.fsencode(tmp_path) + b"/k\xff.elf"
    with open(kernel, "wb") as f:
        f.write((ROOT / "guests" / "mbinfo.elf").read_bytes())
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "-k", kernel, "-p", b"a\xffb"], capture_output=True,
                       timeout=60, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert r.returncode == 33, r.stderr.decode(errors="replace")
    assert b"/k..elf a.b\n" in r.stdout, r.stdout
