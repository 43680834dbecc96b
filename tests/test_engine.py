"""The engine end to end: `pykvm daemon`, the docker-style client and `curl --unix-socket` (issue 12)."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from conftest import needs_kvm
from engine_helpers import Daemon, attach_session, crash_guest, echo_guest, ndjson, state_of, wait_for

from pykvm.engine.backend import MAX_ATTACH


@pytest.fixture
def daemon():
    d = Daemon()
    d.start()
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def unjailed_daemon():
    """A daemon with --no-jail, for the tests of what the VMM's own API gives (pause, stats, snapshots, top's
    exit counts) on unjailed VMMs; tests/test_engine_jail.py shows the same for jailed ones."""
    d = Daemon("--no-jail")
    d.start()
    try:
        yield d
    finally:
        d.close()


def curl(daemon: Daemon, *args: str) -> tuple[int, str]:
    """``curl --unix-socket``: (HTTP status, body)."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    out = subprocess.run(["curl", "-sS", "--unix-socket", str(daemon.socket), "-w", "\n%{http_code}", *args],
                         capture_output=True, text=True, timeout=60)
    body, _, code = out.stdout.rpartition("\n")
    return int(code), body


def test_curl_ping_version_info_openapi(daemon):
    assert curl(daemon, "http://pykvm/_ping") == (200, "OK")
    code, body = curl(daemon, "http://pykvm/version")
    assert code == 200 and json.loads(body)["ApiVersion"]
    code, body = curl(daemon, "http://pykvm/info")
    info = json.loads(body)
    assert code == 200 and info["VMs"] == 0 and info["MemoryBudget"] > 0 and info["KvmBackend"]
    code, body = curl(daemon, "http://pykvm/openapi.json")
    paths = json.loads(body)["paths"]
    for path in ("/vms/create", "/vms/json", "/vms/{ref}/json", "/vms/{ref}/start", "/vms/{ref}/logs", "/events"):
        assert path in paths


def test_socket_modes(daemon):
    st = os.stat(daemon.socket)
    if os.geteuid() == 0:
        assert st.st_mode & 0o777 == 0o660
        assert st.st_uid == 0 and st.st_gid == grp.getgrnam("pykvm").gr_gid
    else:
        assert st.st_mode & 0o777 == 0o600
    assert os.stat(daemon.state).st_mode & 0o077 == 0


def test_errors_are_clean(daemon):
    code, body = curl(daemon, "http://pykvm/vms/0123abc/json")
    assert code == 404 and "no such VM" in json.loads(body)["message"]
    for data in ("{not json", '{"Image": "hello-long64", "Bogus": 1}', '{"MemoryMiB": "lots"}', "[]",
                 '{"Image": "spin", "Vcpus": 65}', '{"Image": "spin", "MemoryMiB": 65537}',   # what run -c/-m refuse
                 '{"Image": "spin", "MemoryMiB": 0}'):
        code, body = curl(daemon, "-X", "POST", "-H", "Content-Type: application/json", "-d", data,
                          "http://pykvm/vms/create")
        assert code == 400, data
        assert json.loads(body)["message"]
    code, body = curl(daemon, "-X", "POST", "-d", '{"Image": "spin"}', "http://pykvm/vms/create")   # curl -d: a form
    assert code == 400 and "Content-Type: application/json" in json.loads(body)["message"], body
    for name in ("../etc", "a/b", "..", ".hidden"):
        code, body = curl(daemon, "-X", "POST", "-H", "Content-Type: application/json", "-d", "{}",
                          "--url-query", f"name={name}", "http://pykvm/vms/create")
        assert code == 400 and "invalid VM name" in json.loads(body)["message"], name
    code, body = curl(daemon, "-X", "POST", "-H", "Content-Type: application/json", "-d", '{"Image": "spin"}',
                      "--url-query", "name=snapname-test", "http://pykvm/vms/create")
    assert code == 201, body
    for name in ("../etc", "a/b", ".."):        # a snapshot's name is a directory's: said as a snapshot's
        code, body = curl(daemon, "-X", "POST", "--url-query", f"name={name}", "http://pykvm/vms/snapname-test/snapshot")
        assert code == 400 and "invalid snapshot name" in json.loads(body)["message"], body
        code, body = curl(daemon, "-X", "POST", "-H", "Content-Type: application/json",
                          "-d", json.dumps({"FromSnapshot": {"Vm": "snapname-test", "Snapshot": name}}),
                          "http://pykvm/vms/create")
        assert code == 400 and "invalid snapshot name" in json.loads(body)["message"], body
    code, _ = curl(daemon, "-X", "DELETE", "http://pykvm/vms/snapname-test")
    assert code == 204
    big = daemon.dir / "big.json"
    big.write_bytes(b"x" * (2 << 20))
    code, body = curl(daemon, "-X", "POST", "-H", "Content-Type: application/json", "--data-binary", f"@{big}",
                      "http://pykvm/vms/create")
    assert code == 413 and "body over" in json.loads(body)["message"]
    code, body = curl(daemon, "-X", "POST", "-H", "Content-Type: application/json",
                      "-d", '{"Kernel": "relative/vmlinux"}', "http://pykvm/vms/create")
    assert code == 400 and "absolute" in json.loads(body)["message"]
    code, body = curl(daemon, "-X", "POST", "-H", "Content-Type: application/json",
                      "-d", '{"Kernel": "/nonexistent/vmlinux"}', "http://pykvm/vms/create")
    assert code == 400 and "No such file" in json.loads(body)["message"]
    for query in ("since=nan", "until=inf", "since=-inf&until=0"):      # floats FastAPI takes, not times
        code, body = curl(daemon, f"http://pykvm/events?{query}")
        assert code == 400 and "seconds since the epoch" in json.loads(body)["message"], query
    assert daemon.vms() == []       # nothing half-created


def test_names_ids_and_prefixes(daemon):
    r = daemon.pykvm("create", "--name", "first", "hello-long64")
    assert r.returncode == 0, r.stderr
    vm_id = r.stdout.decode().strip()
    assert len(vm_id) == 64 and all(c in "0123456789abcdef" for c in vm_id)
    r = daemon.pykvm("create", "--name", "first", "hello-long64")
    assert r.returncode == 1 and b"already in use" in r.stderr
    for ref in (vm_id, vm_id[:5], "first", "/first"):
        r = daemon.pykvm("inspect", ref)
        assert r.returncode == 0 and json.loads(r.stdout)[0]["Id"] == vm_id
    r = daemon.pykvm("ps", "-a", "--format", "json")
    assert [json.loads(line)["Names"] for line in r.stdout.decode().splitlines()] == [["/first"]]
    r = daemon.pykvm("ps")               # not running: only with -a
    assert b"first" not in r.stdout and b"VM ID" in r.stdout
    r = daemon.pykvm("rm", "first")
    assert r.returncode == 0
    assert daemon.pykvm("inspect", vm_id).returncode == 1


@needs_kvm
def test_run_logs_ps_and_crash_status(daemon, tmp_path):
    r = daemon.pykvm("run", "-d", "--name", "hello", "hello-long64")
    assert r.returncode == 0, r.stderr
    crash = daemon.pykvm("run", "-d", "--name", "crash", str(crash_guest(tmp_path)))
    assert crash.returncode == 0, crash.stderr
    assert daemon.pykvm("wait", "hello").stdout.strip() == b"0"
    assert daemon.pykvm("wait", "crash").stdout.strip() == b"4"
    logs = daemon.pykvm("logs", "hello").stdout.decode()
    assert "Hello from 64-bit long mode!" in logs
    tail = daemon.pykvm("logs", "--tail", "1", "-t", "hello").stdout.decode().splitlines()
    assert len(tail) == 1 and tail[0][:4].isdigit() and "T" in tail[0].split()[0]
    assert "triple fault" in daemon.pykvm("logs", "crash").stdout.decode()
    ps = daemon.pykvm("ps", "-a").stdout.decode()
    assert "Exited (4)" in ps and "Exited (0)" in ps
    state = state_of(daemon, "crash")
    assert state["Status"] == "exited" and state["ExitCode"] == 4
    with daemon.http() as c:
        evs = ndjson(c.get("/events", params={"since": "0", "until": str(time.time()),
                                              "filters": json.dumps({"vm": ["crash"]})}).text)
    assert [e["Action"] for e in evs] == ["create", "start", "die"]
    assert evs[-1]["Actor"]["Attributes"]["exitCode"] == "4"
    printed = daemon.pykvm("events", "--since", "600s", "--until", "0s", "-f", "vm=crash").stdout.decode()
    assert [line.split()[2] for line in printed.splitlines()] == ["create", "start", "die"]
    code, _ = curl(daemon, "-X", "POST", "http://pykvm/vms/crash/stop")
    assert code == 304


@needs_kvm
def test_attach_both_ways_and_lifecycle_conflicts(daemon, tmp_path):
    r = daemon.pykvm("run", "-d", "--name", "echo", str(echo_guest(tmp_path)))
    assert r.returncode == 0, r.stderr
    code, body = curl(daemon, "-X", "POST", "http://pykvm/vms/echo/start")
    assert code == 409 and "already running" in json.loads(body)["message"]
    code, body = curl(daemon, "-X", "DELETE", "http://pykvm/vms/echo")
    assert code == 409 and "force" in json.loads(body)["message"]
    # the console through the real client: what goes in comes back; 'q' ends the guest (status 7)
    out, err, _ = attach_session(daemon, "echo", b"ping-pong" + b"q", b"ping-pong")
    assert b"ping-pong" in out, err
    wait_for(lambda: state_of(daemon, "echo")["Status"] == "exited", what="the echo guest's end")
    assert state_of(daemon, "echo")["ExitCode"] == 7
    assert b"ping-pong" in daemon.pykvm("logs", "echo").stdout
    # start again, then stop: SIGTERM-or-Ctrl-Alt-Del, then kill
    assert daemon.pykvm("start", "echo").returncode == 0
    r = daemon.pykvm("stop", "-t", "1", "echo")
    assert r.returncode == 0
    assert state_of(daemon, "echo")["Status"] == "exited"
    assert daemon.pykvm("restart", "-t", "1", "echo").returncode == 0
    assert state_of(daemon, "echo")["Status"] == "running"
    assert daemon.pykvm("kill", "echo").returncode == 0
    assert state_of(daemon, "echo")["ExitCode"] == 128 + signal.SIGKILL
    r = daemon.pykvm("attach", "echo")
    assert r.returncode == 1 and b"not running" in r.stderr


def _pykvm() -> list[str]:
    import sys
    return [sys.executable, "-m", "pykvm"]


@needs_kvm
def test_daemon_restart_readopts_running_vms_and_records_the_dead(tmp_path):
    d = Daemon()
    d.start()
    try:
        guest = str(echo_guest(tmp_path))
        for name in ("survivor", "victim"):
            assert d.pykvm("run", "-d", "--name", name, guest).returncode == 0
        d.remember_shims()
        victim_pid = state_of(d, "victim")["Pid"]
        assert victim_pid
        d.stop()                                   # the daemon goes; the VMs stay
        os.kill(victim_pid, signal.SIGKILL)        # one VM dies while nobody watches
        wait_for(lambda: not os.path.exists(f"/proc/{victim_pid}"), what="the victim's end")
        d.start()
        assert state_of(d, "survivor")["Status"] == "running"
        victim = state_of(d, "victim")
        assert victim["Status"] == "exited" and victim["ExitCode"] == 128 + signal.SIGKILL
        # the re-adopted VM is fully usable: its console answers, and its end is noticed
        out, _, _ = attach_session(d, "survivor", b"still here" + b"q", b"still here")
        assert b"still here" in out
        wait_for(lambda: state_of(d, "survivor")["Status"] == "exited", what="the survivor's end")
        assert state_of(d, "survivor")["ExitCode"] == 7
    finally:
        d.close()


@needs_kvm
def test_memory_budget_refuses_over_commit():
    d = Daemon("--memory-budget", "160M")
    d.start()
    try:
        r = d.pykvm("create", "--name", "big", "-m", "128M", "hello-long64")
        assert r.returncode == 0
        r = d.pykvm("start", "big")
        assert r.returncode == 1 and b"memory budget" in r.stderr
        assert state_of(d, "big")["Status"] == "created"
        code, body = curl(d, "-X", "POST", "http://pykvm/vms/big/start")
        assert code == 409 and "memory budget" in json.loads(body)["message"]
    finally:
        d.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_non_root_caller_is_refused_a_root_only_file(daemon):
    files = daemon.dir / "files"        # pytest's tmp_path lies under a root-only directory
    files.mkdir(mode=0o755)
    secret = files / "root-only.bin"
    secret.write_bytes(b"\x0f\x0b")
    secret.chmod(0o600)
    public = crash_guest(files)
    gid = grp.getgrnam("pykvm").gr_gid

    def as_nobody():
        os.setgroups([gid])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)

    def as_nobody_curl(*args):       # curl, since this interpreter may live where nobody cannot run it
        out = subprocess.run(["curl", "-sS", "--unix-socket", str(daemon.socket), "-w", "\n%{http_code}", *args],
                             capture_output=True, text=True, cwd="/", preexec_fn=as_nobody, timeout=60)
        body, _, code = out.stdout.rpartition("\n")
        return int(code), body

    def create(path):
        return as_nobody_curl("-X", "POST", "-H", "Content-Type: application/json", "-d",
                              json.dumps({"ImageFile": str(path)}), "http://pykvm/vms/create")

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    code, body = create(secret)
    assert code == 403
    assert "permission denied" in json.loads(body)["message"] and "65534" in json.loads(body)["message"]
    code, body = create(public)
    assert code == 201, body
    nobodys = json.loads(body)["Id"]
    # root's VMs are not nobody's to see or touch
    root_vm = daemon.pykvm("create", "hello-long64").stdout.decode().strip()
    code, body = as_nobody_curl("http://pykvm/vms/json?all=1")
    assert [vm["Id"] for vm in json.loads(body)] == [nobodys]
    # nor are their events: nobody's stream has its own VM's create, not root's (root's has both)
    until = time.time() + 1
    code, body = as_nobody_curl(f"http://pykvm/events?since=0&until={until}")
    assert code == 200 and {ev["id"] for ev in ndjson(body)} == {nobodys}, body
    with daemon.http() as c:
        assert {ev["id"] for ev in ndjson(c.get("/events", params={"since": 0, "until": until}).text)} == {
            nobodys, root_vm}
    code, body = as_nobody_curl("-X", "DELETE", f"http://pykvm/vms/{root_vm}")
    assert code == 403 and "belongs to uid 0" in json.loads(body)["message"]
    assert len(daemon.vms()) == 2       # root sees both


def test_concurrent_clients(daemon):
    errors = []

    def worker(n):
        try:
            with daemon.http() as c:
                for i in range(5):
                    r = c.post("/vms/create", params={"name": f"w{n}-{i}"}, json={"Image": "hello-long64"})
                    assert r.status_code == 201, r.text
                    assert c.get("/vms/json", params={"all": "1"}).status_code == 200
        except Exception as e:      # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors
    names = sorted(vm["Names"][0] for vm in daemon.vms())
    assert names == sorted(f"/w{n}-{i}" for n in range(20) for i in range(5))


def test_half_open_and_slow_clients_do_not_stop_the_daemon(daemon):
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    partial = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        idle.connect(str(daemon.socket))
        partial.connect(str(daemon.socket))
        partial.sendall(b"POST /vms/create HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"Ima")
        assert curl(daemon, "http://pykvm/_ping") == (200, "OK")       # others are still served
        idle.settimeout(60)
        assert idle.recv(1) == b""              # the idle connection is closed by the daemon, not kept forever
        partial.settimeout(60)
        answer = b""                        # a stalled body gets a clean error, then the connection ends
        while chunk := partial.recv(4096):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 4") and b'"message"' in answer
    finally:
        idle.close()
        partial.close()
    assert daemon.proc.poll() is None


@needs_kvm
def test_pause_stats_snapshot_and_restore_in_a_new_vmm(unjailed_daemon, tmp_path):
    daemon = unjailed_daemon
    with daemon.http() as c:
        if not c.get("/info").json()["VmmApi"]:
            pytest.skip("this pykvm has no per-VM API (pykvm run --api-sock)")
    assert daemon.pykvm("run", "-d", "--name", "src", str(echo_guest(tmp_path))).returncode == 0
    assert daemon.pykvm("pause", "src").returncode == 0
    assert state_of(daemon, "src")["Status"] == "paused"
    assert "(Paused)" in daemon.pykvm("ps").stdout.decode()
    assert daemon.pykvm("pause", "src").returncode == 1          # already paused: 409
    stats = json.loads(daemon.pykvm("stats", "--no-stream", "--format", "json", "src").stdout)
    assert stats["exits"]["reasons"]["IO"]["count"] > 0 and stats["memory_stats"]["uss"] > 0
    assert daemon.pykvm("unpause", "src").returncode == 0
    assert state_of(daemon, "src")["Status"] == "running"
    r = daemon.pykvm("snapshot", "src", "snap1")
    assert r.returncode == 0, r.stderr
    assert state_of(daemon, "src")["Status"] == "running"      # resumed after the snapshot
    r = daemon.pykvm("create", "--name", "copy", "--from-snapshot", "src:snap1")
    assert r.returncode == 0, r.stderr
    assert daemon.pykvm("rm", "-f", "src").returncode == 0      # the copy keeps its own files
    assert daemon.pykvm("start", "copy").returncode == 0
    out, _, _ = attach_session(daemon, "copy", b"restored" + b"q", b"restored")
    assert b"restored" in out
    wait_for(lambda: state_of(daemon, "copy")["Status"] == "exited", what="the restored guest's end")
    assert state_of(daemon, "copy")["ExitCode"] == 7
    code, body = curl(daemon, "-X", "POST", "-H", "Content-Type: application/json", "-d",
                      json.dumps({"FromSnapshot": {"Vm": "copy", "Snapshot": "../x"}}), "http://pykvm/vms/create")
    assert code == 400 and "invalid" in json.loads(body)["message"]


@needs_kvm
def test_follow_logs_live_events_and_top(unjailed_daemon, tmp_path):
    daemon = unjailed_daemon
    env = dict(os.environ, **daemon.env)
    # --since replays what happened before the stream was connected, then it goes on live
    events = subprocess.Popen([*_pykvm(), "events", "--since", str(time.time() - 1), "-f", "vm=live"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert daemon.pykvm("run", "-d", "--name", "live", str(echo_guest(tmp_path))).returncode == 0
        follow = subprocess.Popen([*_pykvm(), "logs", "-f", "live"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=env)
        top = daemon.pykvm("top", "-n", "2", "-d", "0.2").stdout.decode()
        assert "live" in top and "IO" in top
        attach_session(daemon, "live", b"followed" + b"q", b"followed")
        out, _ = follow.communicate(timeout=60)      # logs -f ends when the VM does
        assert b"followed" in out
        seen = b""
        while b" die " not in seen:
            line = events.stdout.readline()
            assert line, "the events stream ended"
            seen += line
        assert b"exitCode=7" in seen and b" create " in seen and b" start " in seen
    finally:
        events.kill()
        events.wait()



@needs_kvm
def test_attach_over_plain_http_with_curl(daemon, tmp_path):
    """POST /vms/{id}/attach: the request body is the console's input while the response streams its output."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    assert daemon.pykvm("run", "-d", "--name", "plain", str(echo_guest(tmp_path))).returncode == 0
    curl_attach = subprocess.Popen(["curl", "-sS", "-N", "-T", "-", "-X", "POST", "--unix-socket", str(daemon.socket),
                                    "http://pykvm/vms/plain/attach"],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = curl_attach.communicate(b"over-http" + b"q", timeout=60)
    finally:
        curl_attach.kill()
    assert b"over-http" in out, err
    wait_for(lambda: state_of(daemon, "plain")["Status"] == "exited", what="the guest's end")
    assert state_of(daemon, "plain")["ExitCode"] == 7


def _sockets(pid: int) -> int:
    """How many sockets process ``pid`` holds open."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


@needs_kvm
def test_http_attach_client_that_disconnects_leaves_nothing_open(daemon):
    """A curl attach killed mid-session ends its session in the daemon: its console connection is closed,
    not kept (discarding output) for as long as the VM runs."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    assert daemon.pykvm("run", "-d", "--name", "quiet", "spin").returncode == 0
    wait_for(lambda: b"spinning" in daemon.pykvm("logs", "quiet").stdout, what="the guest's first line")
    before = _sockets(daemon.proc.pid)
    for _ in range(3):
        curl_attach = subprocess.Popen(["curl", "-sS", "-N", "-T", "-", "-X", "POST", "--unix-socket",
                                        str(daemon.socket), "http://pykvm/vms/quiet/attach?logs=1"],
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert b"spinning" in curl_attach.stdout.readline()     # the session is up (the replayed log)
        finally:
            curl_attach.kill()
            curl_attach.communicate()
    wait_for(lambda: _sockets(daemon.proc.pid) <= before, timeout=15,
             what=f"the daemon's sockets back to {before} (now {_sockets(daemon.proc.pid)})")
    assert state_of(daemon, "quiet")["Status"] == "running"


@needs_kvm
def test_console_sessions_per_vm_are_capped(daemon):
    """A VM takes MAX_ATTACH console sessions at once; one more is refused with 409 and a message, and a
    slot is free again once a session ends. A session whose client vanished while the guest was not reading
    its input lasts until the guest reads or the VM ends, so without the cap a client could run the daemon
    out of descriptors."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    assert daemon.pykvm("run", "-d", "--name", "busy", "spin").returncode == 0
    wait_for(lambda: b"spinning" in daemon.pykvm("logs", "busy").stdout, what="the guest's first line")

    def curl_attach():
        proc = subprocess.Popen(["curl", "-sS", "-N", "-T", "-", "-X", "POST", "-w", "\n%{http_code}", "--unix-socket",
                                 str(daemon.socket), "http://pykvm/vms/busy/attach?logs=1"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        sessions.append(proc)
        return proc

    sessions: list[subprocess.Popen] = []
    try:
        for _ in range(MAX_ATTACH):
            assert b"spinning" in curl_attach().stdout.readline()      # up: the replayed log came back
        refused = curl_attach()
        out, _ = refused.communicate(timeout=30)
        body, _, code = out.decode().rpartition("\n")
        assert code == "409" and f"already has {MAX_ATTACH} console sessions" in json.loads(body)["message"], out
        sessions[0].kill()
        sessions[0].communicate()
        # the daemon frees the slot when it sees the disconnect: try again until it has
        wait_for(lambda: b"spinning" in curl_attach().stdout.readline(), timeout=15,
                 what="a session accepted again after one ended")
    finally:
        for proc in sessions:
            proc.kill()
            proc.communicate()


@needs_kvm
def test_requests_in_flight_when_the_daemon_stops_get_an_answer_not_a_traceback(daemon):
    """SIGTERM while a `wait` and a `logs -f` are open: uvicorn cancels them after its grace period. The wait gets
    503 with a message (it was a bare 500), the log stream is cut (its client says the daemon went), the
    daemon's log has no traceback, and the VM runs on."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    assert daemon.pykvm("run", "-d", "--name", "longrun", "spin").returncode == 0
    before = _sockets(daemon.proc.pid)
    waiter = subprocess.Popen(["curl", "-sS", "-X", "POST", "--unix-socket", str(daemon.socket), "-w", "\n%{http_code}",
                               "http://pykvm/vms/longrun/wait"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    follower = subprocess.Popen([sys.executable, "-m", "pykvm", "logs", "-f", "longrun"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=dict(os.environ, **daemon.env))
    try:
        wait_for(lambda: _sockets(daemon.proc.pid) >= before + 2, what="both requests at the daemon")
        daemon.remember_shims()
        daemon.stop()
        out, _ = waiter.communicate(timeout=60)
        body, _, code = out.decode().rpartition("\n")
        assert code == "503" and "shutting down" in json.loads(body)["message"], out
        _, err = follower.communicate(timeout=60)
        assert follower.returncode == 2 and b"cannot reach the pykvm daemon" in err, err
    finally:
        for proc in (waiter, follower):
            proc.kill()
            proc.wait()
    log = (daemon.dir / "daemon.log").read_text()
    assert "Traceback" not in log, log
    daemon.start()                                   # the VM ran on; close() removes it
    assert state_of(daemon, "longrun")["Status"] == "running"


@needs_kvm
def test_attach_says_so_when_the_daemon_ends_the_session(daemon):
    """`pykvm attach` whose daemon stops mid-session ends at once with status 2 and a sentence, not with
    status 0 and nothing, as if the user had detached or the VM had ended."""
    assert daemon.pykvm("run", "-d", "--name", "attached", "spin").returncode == 0
    before = _sockets(daemon.proc.pid)
    attach = subprocess.Popen([sys.executable, "-m", "pykvm", "attach", "attached"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, **daemon.env))
    try:
        wait_for(lambda: _sockets(daemon.proc.pid) >= before + 2, what="the session at the daemon")  # + console
        daemon.remember_shims()
        daemon.stop()
        _, err = attach.communicate(timeout=60)        # stdin still open: only the daemon's close ends it
    finally:
        attach.kill()
        attach.wait()
    assert attach.returncode == 2 and "ended the console session" in " ".join(err.decode().split()), err
    daemon.start()
    assert state_of(daemon, "attached")["Status"] == "running"
