"""`pykvm run` and the host around it (issue 9 parts 2, 5, 7): output that cannot be written or is
read slowly, free-text options that start with a dash, and every way a run on a terminal ends.

The processes here are real `pykvm run`s. Waits have generous subprocess timeouts that only catch
a hang; nothing asserts a duration.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import threading
import time

import pytest
from conftest import ROOT, assemble, needs_kvm, run_pykvm

from pykvm.cli import bind_free_text, build_parser

PYKVM = [sys.executable, "-m", "pykvm"]
HANG = 60        # seconds: only a hang reaches this


# --- free text that begins with a dash (no KVM needed) ----------------------------------------

@pytest.mark.parametrize("argv,dest,value", [
    (["run", "-k", "k", "-p", "-x"], "append", "-x"),
    (["run", "-k", "k", "--append", "-pause -verbose"], "append", "-pause -verbose"),
    (["run", "-k", "-kernel.elf"], "kernel", "-kernel.elf"),
    (["run", "--kernel", "-kernel.elf"], "kernel", "-kernel.elf"),
    (["run", "-k", "k", "-i", "-initrd"], "initrd", "-initrd"),
    (["run", "-k", "k", "--initrd", "-initrd"], "initrd", "-initrd"),
    (["run", "-k", "k", "--module", "-m.bin,-args"], "module", ["-m.bin,-args"]),
    (["run", "--drive", "-disk.img,readonly"], "drive", ["-disk.img,readonly"]),
    (["run", "--stats-json", "-stats.json"], "stats_json", "-stats.json"),
    (["run", "--trace-filter", "-x"], "trace_filter", "-x"),
    (["run", "--net", "tap=-tap0,mac=02:00:00:00:00:01"], "net", ["tap=-tap0,mac=02:00:00:00:00:01"]),
    (["run", "--net", "-tap0"], "net", ["-tap0"]),
    (["run", "--config-file", "-vm.json"], "config_file", "-vm.json"),
    (["run", "--restore", "-vm.state", "--mem-file", "-vm.mem"], "mem_file", "-vm.mem"),
    (["run", "--restore", "-vm.state", "--mem-file", "-vm.mem"], "restore", "-vm.state"),
    (["vmm", "--api-sock", "-api.sock"], "api_sock", "-api.sock"),
    (["vmm", "--api-sock", "a.sock", "--id", "-vm1"], "id", "-vm1"),
    (["run", "--api-sock", "a.sock", "--id", "-vm1"], "id", "-vm1"),
    (["run", "-d", "-H", "-d.sock", "spin"], "host", "-d.sock"),
    (["run", "-d", "--host", "-d.sock", "spin"], "host", "-d.sock"),
])
def test_free_text_options_take_a_value_that_starts_with_a_dash(argv, dest, value):
    args = build_parser().parse_args(bind_free_text(argv))
    assert getattr(args, dest) == value


def test_binding_keeps_everything_else_in_place():
    argv = ["run", "-k", "k", "-p", "-a -b", "-m", "32M", "--module", "x,-y", "--module", "z", "--", "-p"]
    args = build_parser().parse_args(bind_free_text(argv))
    assert (args.kernel, args.append, args.mem, args.module) == ("k", "-a -b", 32 << 20, ["x,-y", "z"])
    assert bind_free_text(["run", "-p"]) == ["run", "-p"]         # argparse reports the missing value
    assert bind_free_text(["run", "--", "-p", "-x"]) == ["run", "--", "-p", "-x"]


@needs_kvm
@pytest.mark.parametrize("args,expected", [
    (["-p", "-x"], b"cmdline: guests/mbinfo.elf -x"),
    (["--append", "-pause -verbose"], b"cmdline: guests/mbinfo.elf -pause -verbose"),
    (["--module", "guests/README.md,-first -second"], b"string=guests/README.md -first -second"),
])
def test_a_kernel_gets_text_that_starts_with_a_dash(args, expected):
    r = run_pykvm("run", "-k", "guests/mbinfo.elf", *args, "--timeout", "30")
    assert r.returncode == 33, r.stderr       # mbinfo ends with debug-exit 0x10
    assert expected in r.stdout


@needs_kvm
def test_file_names_that_start_with_a_dash(tmp_path):
    (tmp_path / "-kernel.elf").write_bytes((ROOT / "guests" / "mbinfo.elf").read_bytes())
    (tmp_path / "-mod").write_bytes(b"module text")
    r = subprocess.run([*PYKVM, "run", "-k", "-kernel.elf", "--module", "-mod,-arg", "--timeout", "30"],
                       cwd=tmp_path, capture_output=True, timeout=HANG,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert r.returncode == 33, r.stderr
    assert b"string=-mod -arg first=module text" in r.stdout


# --- output that cannot be written ---------------------------------------------------------------

@needs_kvm
def test_a_full_disk_ends_the_run_with_one_sentence():
    with open("/dev/full", "wb") as full:
        r = subprocess.run([*PYKVM, "run"], cwd=ROOT, stdout=full, stderr=subprocess.PIPE, timeout=HANG)
    err = r.stderr.decode()
    assert r.returncode == 74, err
    assert "cannot write the guest's output to stdout: No space left on device (exit status 74)" in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


@needs_kvm
def test_a_reader_that_went_away_ends_the_run_with_one_sentence():
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run([*PYKVM, "run", "spin"], cwd=ROOT, stdout=w, stderr=subprocess.PIPE, timeout=HANG)
    finally:
        os.close(w)
    err = p.stderr.decode()
    assert p.returncode == 74, err
    assert "Broken pipe" in err and "Traceback" not in err


# Guests that print forever: one ignores THRE (as `rep outsb` would), one waits for it as a
# driver does. The second prints a counter, so a lost byte shows as a gap in the sequence.
BLAST = """
    mov $0x3f8, %dx
1:  mov $'x', %al
    out %al, %dx
    jmp 1b
"""
COUNTER = """
    xor %ebx, %ebx
1:  mov $0x3fd, %dx
2:  in %dx, %al
    test $0x20, %al
    jz 2b
    mov $0x3f8, %dx
    mov %bl, %al
    out %al, %dx
    inc %bl
    jmp 1b
"""


def _kill_if_running(proc: subprocess.Popen) -> None:
    """A pykvm that did not end (the hang a test found): end it, so no spinning guest outlives the test."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def guest(tmp_path, source: str) -> str:
    path = tmp_path / "printer.bin"
    path.write_bytes(assemble(source, 64, tmp_path))
    return str(path)


@needs_kvm
def test_a_stuck_reader_does_not_stop_the_timeout(tmp_path):
    image = guest(tmp_path, BLAST)
    r, w = os.pipe()            # nobody reads r until pykvm has ended
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)    # full after a page: the guest prints far more in 2 s
    try:
        proc = subprocess.Popen([*PYKVM, "run", image, "--timeout", "2"], cwd=ROOT, stdout=w,
                                stderr=subprocess.PIPE)
        os.close(w)
        _, err = proc.communicate(timeout=HANG)
    finally:
        os.close(r)
    err = err.decode()
    assert proc.returncode == 124, err
    assert "timed out after 2 s" in err
    assert "bytes of the guest's output were dropped" in err and "Traceback" not in err


@needs_kvm
@pytest.mark.parametrize("how,status,says", [
    (signal.SIGTERM, 143, b"ended by SIGTERM"),
    (signal.SIGINT, 130, b"interrupted (Ctrl-C)"),
    ("ctrl-a x", 0, b"quit from the console (Ctrl-A x)"),
])
@pytest.mark.parametrize("console", ["uart", "virtio"])
def test_a_stuck_reader_does_not_stop_signals_or_ctrl_a_x(tmp_path, console, how, status, says):
    image = guest(tmp_path, BLAST)
    r, w = os.pipe()                                    # nobody reads r until pykvm has ended
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    master, slave = os.openpty()                        # the console: Ctrl-A x comes from here
    try:
        proc = subprocess.Popen([*PYKVM, "run", image, "--console", console], cwd=ROOT, stdin=slave,
                                stdout=w, stderr=subprocess.PIPE)
        os.close(w)
        assert select.select([r], [], [], HANG)[0]      # the guest runs and the pipe fills
        time.sleep(0.5)
        if how == "ctrl-a x":
            os.write(master, b"\x01x")
        else:
            proc.send_signal(how)
        _, err = proc.communicate(timeout=HANG)
    finally:
        _kill_if_running(proc)
        os.close(r)
        os.close(master)
        os.close(slave)
    assert proc.returncode == status, err
    assert says in err and b"Traceback" not in err


@needs_kvm
def test_a_slow_reader_gets_every_byte_in_order(tmp_path):
    image = guest(tmp_path, COUNTER)
    proc = subprocess.Popen([*PYKVM, "run", image, "--timeout", "4"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    got = bytearray()

    def slow_reader():
        while chunk := proc.stdout.read1(4096):
            got.extend(chunk)
            time.sleep(0.02)     # ~200 KB/s: slower than the guest writes, so the pipe fills

    reader = threading.Thread(target=slow_reader)
    reader.start()
    err = proc.stderr.read()
    proc.wait(timeout=HANG)
    reader.join(timeout=HANG)
    assert proc.returncode == 124, err
    assert b"dropped" not in err
    assert len(got) > 4096
    gaps = [i for i in range(1, len(got)) if got[i] != (got[i - 1] + 1) & 0xFF]
    assert gaps == [], f"{len(gaps)} gaps in the counter, first at byte {gaps[0]}"
    assert got[0] == 0


# --- every way a run on a terminal ends ----------------------------------------------------------

class TerminalRun:
    """`pykvm run ARGS` with stdin on a pty (its console, raw while the guest runs)."""

    def __init__(self, *args: str) -> None:
        self.master, self.slave = os.openpty()
        self.before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen([*PYKVM, "run", *args], cwd=ROOT, stdin=self.slave,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait_for_output(self, text: bytes) -> None:
        assert self.proc.stdout.readline() == text

    def finish(self) -> tuple[int, str, list]:
        try:
            _, err = self.proc.communicate(timeout=HANG)
            return self.proc.returncode, err.decode(), termios.tcgetattr(self.slave)
        finally:
            _kill_if_running(self.proc)
            os.close(self.master)
            os.close(self.slave)


@needs_kvm
@pytest.mark.parametrize("how,status,says", [
    (signal.SIGTERM, 143, "ended by SIGTERM"),
    (signal.SIGHUP, 129, "ended by SIGHUP"),
    (signal.SIGINT, 130, "interrupted (Ctrl-C)"),
    ("ctrl-a x", 0, "quit from the console (Ctrl-A x)"),
])
def test_ending_a_run_on_a_terminal_restores_it_and_says_how(how, status, says):
    run = TerminalRun("spin")
    run.wait_for_output(b"spinning forever\n")
    assert termios.tcgetattr(run.slave) != run.before      # raw while the guest runs
    if how == "ctrl-a x":
        os.write(run.master, b"\x01x")
    else:
        run.proc.send_signal(how)
    code, err, after = run.finish()
    assert code == status, err
    assert f"{says} (exit status {status})" in err and "Traceback" not in err
    assert after == run.before


@needs_kvm
def test_a_guest_that_ends_on_a_terminal_restores_it():
    run = TerminalRun("hello-long64")
    code, err, after = run.finish()
    assert code == 0, err
    assert "halted with interrupts disabled (exit status 0)" in err
    assert after == run.before


def test_dashed_values_are_bound_only_for_the_commands_that_take_them():
    """`create --net` (the engine's client) is a flag: the word after it is not its value."""
    assert bind_free_text(["create", "--net", "-k", "vmlinux"]) == ["create", "--net", "-k", "vmlinux"]
    assert bind_free_text(["run", "--net", "-x"]) == ["run", "--net=-x"]


@pytest.mark.parametrize("argv", [
    ["-H", "unix:///srv/d.sock", "ps", "-a"], ["--host", "unix:///srv/d.sock", "ps", "-a"],
    ["--host=unix:///srv/d.sock", "ps", "-a"], ["ps", "-H", "unix:///srv/d.sock", "-a"]])
def test_the_daemons_socket_may_come_before_the_verb_as_in_docker(argv):
    """`pykvm -H SOCK ps` (docker's order, the README's example) is `pykvm ps -H SOCK`."""
    from pykvm.cli import parse_args
    args = parse_args(argv)
    assert (args.command, args.host, args.all) == ("ps", "unix:///srv/d.sock", True)
