"""A pykvm daemon for tests: temporary socket and state directory, stopped with every VM it ran."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from conftest import ROOT, assemble, run_pykvm

ECHO_GUEST = """
    mov $0x3fd, %dx
1:  in %dx, %al
    test $1, %al
    jz 1b
    mov $0x3f8, %dx
    in %dx, %al
    cmp $'q', %al
    je 2f
    out %al, %dx
    mov $0x3fd, %dx
    jmp 1b
2:  mov $0xf4, %dx
    mov $3, %al
    out %al, %dx
"""


def echo_guest(tmp_path: Path) -> Path:
    """A 64-bit guest that echoes what it reads on COM1 and ends with debug-exit 3 (status 7) on 'q'."""
    path = tmp_path / "echo.bin"
    path.write_bytes(assemble(ECHO_GUEST, 64, tmp_path))
    path.chmod(0o644)
    return path


def crash_guest(tmp_path: Path) -> Path:
    """``ud2`` with no IDT: a triple fault, so the VMM exits with status 4."""
    path = tmp_path / "crash.bin"
    path.write_bytes(b"\x0f\x0b")
    path.chmod(0o644)
    return path


class Daemon:
    """``pykvm daemon`` on a socket in a fresh short temporary directory (sun_path holds 108 bytes)."""

    def __init__(self, *extra: str, prefix: tuple[str, ...] = ()) -> None:
        """``extra``: daemon options; ``prefix``: a command the daemon runs under (``ip netns exec NS``)."""
        self.dir = Path(tempfile.mkdtemp(prefix="pkd", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.socket = self.dir / "pykvm.sock"
        self.state = self.dir / "state"
        self.extra = list(extra)
        self.prefix = list(prefix)
        self.env = {"PYKVM_HOST": f"unix://{self.socket}"}
        self.proc: subprocess.Popen | None = None
        self.shims: set[int] = set()

    def start(self) -> None:
        self.log = open(self.dir / "daemon.log", "ab")   # noqa: SIM115
        self.proc = subprocess.Popen([*self.prefix, sys.executable, "-m", "pykvm", "daemon", "--socket",
                                      str(self.socket), "--state-dir", str(self.state), *self.extra], cwd=ROOT,
                                     stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon ended: {(self.dir / 'daemon.log').read_text()}")
            if self.ping():
                return
            time.sleep(0.05)
        raise RuntimeError("the daemon did not answer within 30 s")

    def ping(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.socket))
            s.sendall(b"GET /_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return b"OK" in s.recv(4096)
        except OSError:
            return False
        finally:
            s.close()

    def stop(self) -> None:
        """SIGTERM the daemon (its VMs keep running) and wait for it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None
        self.log.close()

    def pykvm(self, *args: str, timeout: float = 60, input: bytes | None = None, **kw):
        return run_pykvm(*args, timeout=timeout, input=input, env=self.env, **kw)

    def http(self):
        import httpx
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)), base_url="http://pykvm", timeout=60)

    def vms(self) -> list[dict]:
        with self.http() as c:
            return c.get("/vms/json", params={"all": "1"}).json()

    def remember_shims(self) -> None:
        with self.http() as c:
            for vm in self.vms():
                pid = c.get(f"/vms/{vm['Id']}/json").json()["State"]["ShimPid"]
                if pid:
                    self.shims.add(pid)

    def close(self) -> None:
        """Remove every VM (killing the running ones), stop the daemon, kill any shim it left."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.remember_shims()
                with self.http() as c:
                    for vm in self.vms():
                        c.delete(f"/vms/{vm['Id']}", params={"force": "1"})
            finally:
                self.stop()
        for pid in self.shims:      # only if a test left one behind: its VMM dies with its session
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        kill_zygote(self.state)
        shutil.rmtree(self.dir, ignore_errors=True)


def kill_zygote(state: Path) -> None:
    """Kill the VM zygote (pykvm.engine.zygote) of the daemon whose state directory is ``state``, if one runs:
    it outlives its daemon by design, so a test that started a daemon must end it itself."""
    try:
        zygote = int((state / "zygote.pid").read_text())
        if str(state).encode() in Path(f"/proc/{zygote}/cmdline").read_bytes():
            os.kill(zygote, signal.SIGKILL)
    except (OSError, ValueError):
        pass


def wait_for(predicate, timeout: float = 30, what: str = "the condition"):
    """Poll ``predicate`` until it returns something true; fail (not hang) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def state_of(daemon: Daemon, ref: str) -> dict:
    with daemon.http() as c:
        return c.get(f"/vms/{ref}/json").json()["State"]


def ndjson(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def attach_session(daemon: Daemon, ref: str, data: bytes, until: bytes, timeout: float = 60):
    """`pykvm attach REF` typing ``data``, stdin kept open until ``until`` shows in its output (or attach
    ends first, as when the input ends the guest), then closed: attach detaches at that EOF. Returns
    (output, stderr, exit status); a session that outlives ``timeout`` is killed (status -9)."""
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "attach", ref], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, **daemon.env))
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    out = b""
    try:
        proc.stdin.write(data)
        proc.stdin.flush()
        while until not in out:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            out += chunk
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        proc.stdin = None
        rest, err = proc.communicate()
        return out + rest, err, proc.returncode
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
