"""A jailed VMM's API socket (issue 13, parts 1 and 3, with the per-VM API of issue 11): bound and
listened on before the jail, published by the supervisor only once the VMM is in it, served from the
jail with accept() alone, removed when the VMM ends; the API threads (started before the jail) write
only inside the jail's root, and the main/vCPU threads keep the short filter. The first part runs
jailed test targets (pykvm.jail.spawn); the second `pykvm jail -- run --api-sock` as a user would."""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import ROOT, needs_kvm
from jail_helpers import assert_nothing_left, mounts, needs_jail

from pykvm.jail import JailConfig, spawn

pytestmark = needs_jail


@pytest.fixture
def jail(tmp_path, request):
    base = tmp_path / "base"
    base.mkdir()
    before = mounts()
    vm_id = f"a-{os.getpid()}-{request.node.name[-16:].replace('_', '-').strip('-')}"

    def run(target, **options):
        return spawn(JailConfig(id=vm_id, chroot_base=str(base), memory=128 << 20, pids=16, **options), target)

    yield run
    assert_nothing_left(base, vm_id, before)


def _listen(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)       # 0600, as pykvm.api.server.bind_unix makes it
    try:
        s.bind(path)
    finally:
        os.umask(old)
    s.listen(4)
    return s


def test_socket_is_published_only_once_jailed_and_served_by_accept_alone(jail, tmp_path):
    api = str(tmp_path / "api.sock")
    seen = {}

    def target(entry):
        listener = _listen(entry.api_sock_staging)     # before the jail, as the VMM's ApiServer does

        def serve():                                  # the API's thread, started before the jail too
            conn, _ = listener.accept()               # accept4, recvfrom, sendto: its filter allows them
            data = conn.recv(100)
            conn.sendall(b"jailed:" + data + b":" + str(entry.uid).encode())
            conn.close()
            listener.close()      # (an unclosed socket's ResourceWarning would call getsockname on this thread)
        server = threading.Thread(target=serve)
        server.start()
        seen["early"] = os.path.exists(api)           # not yet published: we are not in the jail
        entry.enter()
        server.join()
        return 1 if seen["early"] else 0

    result = {}
    thread = threading.Thread(target=lambda: result.update(r=jail(target, api_sock=api)))
    thread.start()
    deadline = time.monotonic() + 30
    while not os.path.exists(api) and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    info = os.lstat(api)
    assert stat.S_ISSOCK(info.st_mode) and info.st_mode & 0o777 == 0o600 and info.st_uid == 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(30)
        c.connect(api)
        c.sendall(b"hello")
        answer = c.recv(100)
    thread.join(60)
    assert result["r"].status == 0, result["r"].describe()
    assert answer.startswith(b"jailed:hello:") and answer != b"jailed:hello:0"
    assert not os.path.lexists(api) and os.listdir(tmp_path) == ["base"]   # removed with the VMM, staging too


def test_a_vmm_that_dies_before_its_jail_publishes_nothing(jail, tmp_path):
    api = str(tmp_path / "api.sock")

    def target(entry):
        _listen(entry.api_sock_staging)
        os._exit(9)

    assert jail(target, api_sock=api).status == 9
    assert os.listdir(tmp_path) == ["base"]


def test_the_jailed_api_may_not_make_sockets(jail, tmp_path):
    def target(entry):
        _listen(entry.api_sock_staging)
        entry.enter()
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        return 1

    result = jail(target, api_sock=str(tmp_path / "api.sock"))
    assert result.signal is not None and "socket" in (result.syscall or ""), result.describe()


def _api_thread_writes(path: str, done: threading.Event, out: dict):
    """An 'API thread': started before the jail, writes ``path`` when asked (what the controller does)."""
    def run():
        done.wait()
        try:
            with open(path, "w") as f:
                f.write("snapshot")
            out["wrote"] = True
        except OSError as e:
            out["errno"] = e.errno
        out["finished"] = True
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_api_threads_write_only_inside_the_jail_and_vcpu_threads_not_at_all(jail, tmp_path):
    def target(entry):
        _listen(entry.api_sock_staging)
        results = [{}, {}, {}]
        events = [threading.Event() for _ in results]
        threads = [_api_thread_writes(p, e, r) for p, e, r in
                   zip(("/run/state", "/etc/escaped", str(tmp_path / "escaped")), events, results, strict=True)]
        entry.enter()
        for e, t in zip(events, threads, strict=True):
            e.set()
            t.join()
        if not results[0].get("wrote") or not os.path.getsize("/run/state"):
            return 1                                  # the jail's /run is writable from an API thread
        if results[1].get("errno") != errno.ENOENT or results[2].get("errno") != errno.ENOENT:
            return 2                                  # no host path resolves: every thread's root is the jail's
        # the main thread (the vCPU filter, like the threads it starts from now on): no openat at all
        open("/run/from-the-vcpu-kind", "w")
        return 3

    result = jail(target, api_sock=str(tmp_path / "api.sock"))
    assert result.status is None, result.describe()
    assert result.signal is not None and (result.syscall or "").startswith("openat"), result.describe()
    assert not (tmp_path / "escaped").exists()


# --- `pykvm jail -- run --api-sock` --------------------------------------------------------------------------
@needs_kvm
def test_pykvm_run_jailed_serves_its_api_and_snapshots_inside_its_root(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    api = tmp_path / "api.sock"
    before = mounts()
    vmm = subprocess.Popen([sys.executable, "-m", "pykvm", "jail", "--chroot-base", str(base), "--id", "api-cli",
                            "--", "run", "--timeout", "60", "--api-sock", str(api), "guests/count.bin"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not api.exists() and vmm.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        root = base / "pykvm" / "api-cli" / "root"
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(api)), base_url="http://localhost",
                          timeout=60) as c:
            assert c.get("/").json()["state"] == "Running"
            assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
            assert c.get("/").json()["state"] == "Paused"
            assert c.get("/pykvm/stats").json()["reasons"]["IO"]["count"] > 0
            r = c.put("/snapshot/create", json={"snapshot_path": "/run/vm.state", "mem_file_path": "/run/vm.mem"})
            assert r.status_code == 204, r.text
            assert (root / "run" / "vm.mem").stat().st_size == 64 << 20       # the jail's /run, on the host
            assert (root / "run" / "vm.state").read_bytes()[:4] != b""
            # every path is the jail's: the host's /etc is not there, the root is read-only
            assert "does not exist" in c.put("/snapshot/create", json={
                "snapshot_path": "/etc/vm.state", "mem_file_path": "/run/m"}).json()["fault_message"]
            assert "Read-only" in c.put("/snapshot/create", json={
                "snapshot_path": "/vm.state", "mem_file_path": "/vm.mem"}).json()["fault_message"]
            assert c.patch("/vm", json={"state": "Resumed"}).status_code == 204
            assert c.put("/actions", json={"action_type": "SendCtrlAltDel"}).status_code == 204
            assert c.put("/metrics", json={"metrics_path": "/run/metrics"}).status_code == 204
            assert c.put("/actions", json={"action_type": "FlushMetrics"}).status_code == 204
            assert json.loads((root / "run" / "metrics").read_text())["state"] == "Running"
        vmm.terminate()
        out, err = vmm.communicate(timeout=60)
    finally:
        if vmm.poll() is None:
            vmm.kill()
            vmm.communicate()
    assert b"SIGSYS" not in err and b"seccomp" not in err, err
    assert not api.exists()
    time.sleep(0.5)       # the supervisor cleans up after the VMM it outlives
    assert_nothing_left(base, "api-cli", before)


def test_a_jailed_restore_refuses_a_snapshot_that_names_host_files(tmp_path):
    """The restore opens a state file's drives and TAPs before the jail, as root; a snapshot a jailed
    (untrusted) VMM wrote could name /etc/shadow as a drive, so a jail restores only snapshots naming none."""
    from jail_helpers import one_paragraph_error

    from pykvm.snapshot import write_state
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    write_state(str(state), {"machine": {"mem_size": 1 << 20, "vcpu_count": 1, "irqchip": False}, "vcpus": [{}],
                             "virtio": {"drives": [["/etc/shadow", False]], "console": False, "rng": False,
                                        "nets": []}})
    mem.write_bytes(bytes(1 << 20))
    base = tmp_path / "base"
    base.mkdir()
    r = subprocess.run([sys.executable, "-m", "pykvm", "jail", "--chroot-base", str(base), "--id", "restore-check",
                        "--", "run", "--restore", str(state), "--mem-file", str(mem)], cwd=ROOT, capture_output=True,
                       timeout=60)
    assert r.returncode == 2
    message = one_paragraph_error(r.stderr)
    assert "names host files (drive /etc/shadow)" in message and "--no-jail" in message
    assert os.listdir(base) == []
