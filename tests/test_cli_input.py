"""Bad command-line input to every verb: one clear paragraph and status 2, never a traceback, a hang, an
option silently ignored, or a file touched that the user did not name as the one to make."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, needs_kvm, run_pykvm
from engine_helpers import kill_zygote

from pykvm.errors import UsageError


def refused(*args: str, words: tuple[str, ...] = (), env: dict | None = None) -> str:
    """Run `pykvm ARGS`; assert status 2, no traceback, nothing on stdout, and ``words`` in the message."""
    r = run_pykvm(*args, timeout=30, env=env)
    err = r.stderr.decode()
    assert r.returncode == 2, (args, r.returncode, err)
    assert "Traceback" not in err and err.startswith("pykvm: "), err
    assert r.stdout == b""
    flat = " ".join(err.split())       # one paragraph, wrapped at 100 columns
    for word in words:
        assert word in flat, (word, err)
    return flat


# --- 1. options beside --config-file, --restore, -d, --list are refused, not ignored -----------------
@pytest.mark.parametrize("args, named", [
    (("run", "--config-file", "vm.json", "-m", "128M"), "-m/--mem"),
    (("run", "--config-file", "vm.json", "-c", "1"), "-c/--cpus"),          # even the default value
    (("run", "--config-file", "vm.json", "--drive", "d.img", "--rng"), "--drive, --rng"),
    (("run", "--config-file", "vm.json", "--trace"), "--trace"),
    (("run", "--config-file", "vm.json", "--firmware"), "--firmware"),
    (("run", "--restore", "s.state", "--mem-file", "s.mem", "-c", "2", "--drive", "d.img"), "-c/--cpus, --drive"),
    (("run", "--restore", "s.state", "--mem-file", "s.mem", "-p", "quiet"), "-p/--append"),
    (("run", "--restore", "s.state", "--mem-file", "s.mem", "--gdb", ":1234"), "--gdb"),
    (("run", "-d", "--timeout", "5", "spin"), "--timeout"),
    (("run", "-d", "--trace", "--stats", "spin"), "--trace, --stats"),
    (("run", "-d", "--config-file", "vm.json"), "--config-file"),
    (("run", "--list", "-m", "1G"), "-m/--mem"),
])
def test_options_that_would_be_ignored_are_refused(args, named):
    err = refused(*args, words=(named, "ignored"))
    assert "vm.json" not in err or "would be ignored" in err


@pytest.mark.parametrize("args, words", [
    (("run", "--name", "web", "spin"), ("--name", "-d")),
    (("run", "-H", "/tmp/x.sock", "spin"), ("-H", "-d")),
    (("run", "--id", "vm1", "spin"), ("--id", "--api-sock")),
])
def test_options_meaningful_only_with_another_are_refused(args, words):
    refused(*args, words=words)


def test_what_a_whole_vm_file_still_uses_is_accepted(tmp_path):
    """--api-sock, --id, --timeout, -q beside --config-file pass the check: the run gets to reading the file."""
    err = refused("run", "--config-file", str(tmp_path / "missing.json"), "--api-sock", str(tmp_path / "a.sock"),
                  "--id", "vm1", "--timeout", "5", "-q", words=("cannot read --config-file",))
    assert "ignored" not in err
    assert not (tmp_path / "a.sock").exists()


# --- 2. numeric options: 0, negative, huge, not finite ----------------------------------------------
@pytest.mark.parametrize("args", [
    ("run", "--step", "0"), ("run", "--step", "-3"), ("run", "--step-from", "-5", "--step", "1"),
    ("run", "-c", "0"), ("run", "-c", "-1"), ("run", "-c", "100000"), ("run", "--cpus", str(2**70)),
    ("run", "--load-addr", "-1"), ("run", "--load-addr", hex(2**64)),
    ("run", "-m", "0"), ("run", "-m", "-64M"), ("run", "-m", "99999999G"),
    ("run", "--timeout", "0"), ("run", "--timeout", "nan"), ("run", "--timeout", "-1"),
    ("bench", "--count", "0"), ("bench", "--count", "-5"), ("bench", "--repeat", "0"),
    ("bench", "--repeat", str(10**9)),
    ("jail", "--uid", "-1", "--", "run"), ("jail", "--gid", str(2**32), "--", "run"),
    ("jail", "--pids", "0", "--", "run"), ("jail", "--pids", str(2**40), "--", "run"),
    ("jail", "--cpus", "0", "--", "run"), ("jail", "--cpus", "nan", "--", "run"),
    ("jail", "--cpus", "inf", "--", "run"),
    ("jail", "--memory", "0", "--", "run"),
    ("daemon", "--memory-budget", "0"),
    ("create", "-c", "0"), ("create", "-m", "0"), ("create", "-c", "65"),
    ("stop", "-t", "-1", "vm"), ("stop", "-t", "nan", "vm"), ("restart", "-t", "inf", "vm"),
    ("stop", "-t", "3601", "vm"), ("restart", "-t", "4000", "vm"),      # the daemon waits at most an hour
    ("top", "-d", "0"), ("top", "-d", "-1"), ("top", "-n", "-1"),
    ("logs", "-n", "-3", "vm"), ("logs", "--tail", "lots", "vm"),
    ("events", "--since", "nan"), ("events", "--until", "-infs"),
])
def test_out_of_range_numbers_are_refused(args):
    err = refused(*args, env={"PYKVM_HOST": "unix:///nonexistent/pykvm.sock"})
    assert "cannot reach" not in err       # refused before any daemon is asked


# --- 3. drives: not a disk, or one image twice -------------------------------------------------------
@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(b"\0" * 4096)
    return path


def test_the_same_image_twice_writable_is_refused_by_any_name(tmp_path, image):
    (tmp_path / "link.img").symlink_to(image)
    os.link(image, tmp_path / "hard.img")
    kernel = str(tmp_path / "no-kernel")
    for second in (f"{image}", f"{image},readonly", f"{tmp_path / 'link.img'}", f"{tmp_path / 'hard.img'},ro"):
        refused("run", "-k", kernel, "--drive", str(image), "--drive", second, words=("same file twice",))
    # twice read-only is harmless: the check passes and the run gets to the (missing) kernel
    refused("run", "-k", kernel, "--drive", f"{image},readonly", "--drive", f"{tmp_path / 'link.img'},ro",
            words=("cannot read kernel",))
    assert image.read_bytes() == b"\0" * 4096


def test_a_fifo_a_directory_or_a_character_device_is_not_a_disk(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    kernel = str(tmp_path / "no-kernel")
    refused("run", "-k", kernel, "--drive", str(fifo), words=("FIFO", "not a disk image"))
    refused("run", "-k", kernel, "--drive", str(tmp_path), words=("directory", "not a disk image"))
    refused("run", "-k", kernel, "--drive", "/dev/zero", words=("character device", "not a disk image"))
    refused("run", "-k", kernel, "--drive", str(tmp_path / "missing.img"), words=("No such file",))


def test_the_client_checks_drives_before_asking_the_daemon(image, tmp_path):
    env = {"PYKVM_HOST": f"unix://{tmp_path}/no-daemon.sock"}
    refused("create", "--drive", str(image), "--drive", str(image), words=("same file twice",), env=env)
    refused("run", "-d", "--drive", "/dev/null", "spin", words=("character device",), env=env)


# --- 4. socket paths --------------------------------------------------------------------------------
@pytest.mark.parametrize("verb", [("vmm", "--api-sock"), ("run", "--api-sock"), ("daemon", "--socket")])
def test_unusable_socket_paths_are_refused_at_once(verb, tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    (tmp_path / "dir.sock").mkdir()
    cases = [(str(plain), "not a socket"), (str(tmp_path / "dir.sock"), "directory"),
             (str(tmp_path / ("x" * 120)), "at most 107")]
    if verb[0] != "daemon":     # the daemon makes its socket's directory
        cases += [("", "empty"), (str(tmp_path / "missing" / "s.sock"), "does not exist")]
    for path, words in cases:
        refused(*verb, path, words=(words,))
    assert plain.read_text() == "keep me"


def test_an_empty_host_is_refused():
    refused("ps", "-H", "", words=("-H/--host",))


def test_the_daemon_never_replaces_a_file_that_is_not_a_socket(tmp_path):
    """Past the option's check (a file made since): connect() to a plain file says ECONNREFUSED like a
    stale socket does, but the file is the user's."""
    from pykvm.engine.server import bind_socket
    plain = tmp_path / "pykvm.sock"
    plain.write_text("keep me")
    with pytest.raises(UsageError, match="not a socket"):
        bind_socket(plain)
    assert plain.read_text() == "keep me"


def _stale_socket(path: Path) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()          # the file stays; nobody listens


def _start(args: list[str], sock: Path, ready) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"pykvm {args} did not come up: {err.decode()}")
        time.sleep(0.02)
    return proc


def _answers(sock: Path, request: bytes) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(sock))
        s.sendall(request)
        return b"HTTP/1.1 200" in s.recv(4096)
    except OSError:
        return False
    finally:
        s.close()


# --- 5. no socket file left after an orderly end; a stale one is replaced, a live one refused --------
@needs_kvm
@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT])
def test_vmm_removes_its_socket_on_every_signal(sig, tmp_path):
    sock = tmp_path / "vmm.sock"
    _stale_socket(sock)                     # left by a VMM that was killed: replaced
    proc = _start(["vmm", "--api-sock", str(sock)], sock,
                  lambda: _answers(sock, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
    try:
        refused("vmm", "--api-sock", str(sock), words=("in use",))     # a live one is not taken over
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), err
    assert b"Traceback" not in err
    assert not sock.exists() and os.listdir(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_daemon_removes_its_socket_on_every_signal(sig, tmp_path):
    sock = tmp_path / "d.sock"
    _stale_socket(sock)
    ping = b"GET /_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    proc = _start(["daemon", "--no-jail", "--socket", str(sock), "--state-dir", str(tmp_path / "state")], sock,
                  lambda: _answers(sock, ping))
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
        kill_zygote(tmp_path / "state")
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    assert not sock.exists()


# --- 6. pykvm's own messages never go into the guest's output ---------------------------------------
def _without_stderr(*args: str) -> subprocess.CompletedProcess:
    """`pykvm ARGS 2>&-`: fd 2 closed in the child."""
    return subprocess.run([sys.executable, "-m", "pykvm", *args], cwd=ROOT, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=None, preexec_fn=lambda: os.close(2), timeout=60)


@needs_kvm
def test_with_stderr_closed_stdout_is_only_the_guests_output():
    r = _without_stderr("run", "hello-long64")
    assert r.returncode == 0
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "Hello from 64-bit long mode!" and len(lines) == 2, lines
    assert b"pykvm" not in r.stdout


def test_with_stderr_closed_a_usage_error_writes_nothing_to_stdout():
    r = _without_stderr("run", "--step", "0")
    assert r.returncode == 2 and r.stdout == b""
    r = _without_stderr("run", "--list", "-m", "1G")
    assert r.returncode == 2 and r.stdout == b""


@needs_kvm
def test_with_stdout_closed_the_lost_output_is_reported():
    r = subprocess.run([sys.executable, "-m", "pykvm", "run", "hello-long64"], cwd=ROOT, stdin=subprocess.DEVNULL,
                       stdout=None, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1), timeout=60)
    assert r.returncode == 74
    assert b"Bad file descriptor" in r.stderr and b"Traceback" not in r.stderr


# --- 7. the README tells how the client reaches a daemon elsewhere -----------------------------------
def test_readme_documents_the_clients_host_option():
    readme = (ROOT / "README.md").read_text()
    engine = readme[readme.index("## The engine"):]
    engine = engine[:engine.index("\n## ", 1)]
    assert "PYKVM_HOST" in engine and "-H" in engine


def test_a_socket_path_near_the_sun_path_limit_is_served_and_removed():
    """A path that fits sun_path is served even when the temporary name it is bound under would not."""
    from pykvm.api.controller import Vmm
    from pykvm.api.server import ApiServer
    base = Path(f"/tmp/pkl{os.getpid()}")
    base.mkdir()
    try:
        path = base / ("s" * (100 - len(str(base)) - 1))
        assert len(str(path)) == 100
        with ApiServer(Vmm("t"), str(path)):
            assert stat.S_ISSOCK(os.lstat(path).st_mode)
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            assert _answers(path, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert os.listdir(base) == []
    finally:
        base.rmdir()
