"""`pykvm jail` and `pykvm run --jail/--no-jail` as a user runs them: bundled guests behave exactly
as unjailed (issue 13, part 5, positive side), and bad input is one clear error, status 2, with
nothing left behind (part 6)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, needs_kvm, run_pykvm
from jail_helpers import assert_nothing_left, mounts, needs_jail, one_paragraph_error

pytestmark = [needs_kvm, needs_jail]


IDS = ("cli-test", "daemon-test", "killed", "busy")


@pytest.fixture
def base(tmp_path):
    """An empty chroot base; afterwards nothing of this file's jails may be left in it, in cgroups
    (their ids, and `pykvm run --jail`'s pykvm-<pid>) or mounts."""
    d = tmp_path / "base"
    d.mkdir()
    before = mounts()
    yield d
    assert_nothing_left(d, lambda name: name in IDS or name.startswith("pykvm-"), before)


def jailed(base, *run_args, jail_args=(), **kw):
    ids = [] if "--id" in jail_args else ["--id", "cli-test"]
    return run_pykvm("jail", "--chroot-base", str(base), *ids, *jail_args, "--", "run", *run_args, **kw)


@pytest.mark.parametrize("guest", [["hello-long64"], ["hello-real"], ["hello-prot32"], ["hello-pae"], ["mmio"],
                                   ["int3"], ["gdbtest"], ["spin", "--timeout", "1"]])
def test_bundled_guest_runs_jailed_as_unjailed(base, guest):
    plain = run_pykvm("run", *guest)
    inside = jailed(base, *guest)
    assert inside.stdout == plain.stdout
    assert inside.returncode == plain.returncode, inside.stderr.decode()
    last = (lambda r: r.stderr.decode().strip().splitlines()[-1])  # noqa: E731
    assert last(inside) == last(plain)


def test_run_jail_flag_and_a_crash_report_with_disassembly(base, tmp_path):
    crash = tmp_path / "crash.bin"
    crash.write_bytes(b"\x0f\x0b")     # ud2 with no IDT: a triple fault
    r = run_pykvm("run", "--jail", str(crash), env={"PYKVM_TEST_UNUSED": "1"})
    text = r.stderr.decode()
    assert r.returncode == 4, text
    assert "triple fault" in text and "ud2" in text    # capstone, imported before the jail


def test_no_jail_is_said(base):
    r = run_pykvm("run", "--no-jail", "hello-long64")
    assert r.returncode == 0
    assert "running without a jail (--no-jail)" in r.stderr.decode()


def test_daemonize_returns_at_once_and_cleans_up_later(base):
    r = jailed(base, "spin", "--timeout", "1", jail_args=["--id", "daemon-test", "--daemonize"])
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().startswith("jailed VMM daemon-test: pid ")
    deadline = time.monotonic() + 30
    while os.listdir(base) and time.monotonic() < deadline:    # the supervisor removes it when the VM ends
        time.sleep(0.1)


@pytest.mark.parametrize("jail_args, run_args, message", [
    (["--uid", "0"], [], "--uid 0 is root"),
    (["--gid", "0"], [], "--gid 0 is root"),
    (["--id", "../../etc"], [], "is not valid"),
    (["--id", "a/b"], [], "no '/'"),
    (["--id", ".."], [], "no '..'"),
    (["--memory", "32M"], ["-m", "64M"], "below what this guest needs"),
    (["--pids", "4"], [], "below what this VM needs"),
    (["--pids", "9"], ["--cpus", "4"], "below what this VM needs"),
    (["--cpus", "0.001"], [], "below the smallest CPU quota"),
    (["--resource-limit", "no-file=3"], [], "too small"),
    (["--netns", "/nonexistent/netns"], [], "does not exist"),
])
def test_bad_input_is_one_error_and_status_2(base, jail_args, run_args, message):
    r = jailed(base, *run_args, "hello-long64", jail_args=jail_args)
    assert r.returncode == 2, r.stderr.decode()
    assert message in one_paragraph_error(r.stderr)
    assert r.stdout == b""


def test_chroot_base_that_is_not_a_directory(base, tmp_path):
    file = tmp_path / "file"
    file.write_text("")
    for path, message in ((file, "is not a directory"), (tmp_path / "nowhere", "does not exist")):
        r = jailed(path, "hello-long64")
        assert r.returncode == 2
        assert message in one_paragraph_error(r.stderr)


def test_gdb_is_refused_in_a_jail(base):
    r = jailed(base, "hello-long64", "--gdb", ":0")
    assert r.returncode == 2
    assert "--gdb" in one_paragraph_error(r.stderr)


def test_missing_kvm_node(base):
    if not shutil.which("unshare"):
        pytest.skip("needs unshare(1) to hide /dev/kvm in a private mount namespace")
    script = ('mount -t tmpfs none /dev && ln -s /proc/self/fd /dev/fd && '
              f'exec {sys.executable} -m pykvm jail --chroot-base {base} -- run --quiet hello-long64')
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], capture_output=True,
                       timeout=60, cwd=ROOT)
    assert r.returncode == 2, r.stderr.decode()
    assert "/dev/kvm" in one_paragraph_error(r.stderr)


def test_a_vm_id_in_use_is_refused_and_kept(base):
    (base / "pykvm" / "busy" / "root").mkdir(parents=True)
    r = jailed(base, "hello-long64", jail_args=["--id", "busy"])
    assert r.returncode == 2
    assert "already exists" in one_paragraph_error(r.stderr)
    assert (base / "pykvm" / "busy" / "root").is_dir()     # someone else's: not ours to remove
    shutil.rmtree(base / "pykvm")


def test_killing_pykvm_ends_the_jailed_vm_and_cleans_up(base):
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "jail", "--chroot-base", str(base), "--id", "killed",
                             "--", "run", "spin"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        assert proc.stdout.readline() == b"spinning forever\n"
        proc.terminate()       # as `timeout` would: the VMM must not outlive it
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.stdout.close()
    deadline = time.monotonic() + 30
    while os.listdir(base) and time.monotonic() < deadline:    # the supervisor ends the VM and cleans up
        time.sleep(0.1)
