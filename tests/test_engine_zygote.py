"""The daemon's VM zygote (pykvm.engine.zygote): VMMs forked from one process that has imported pykvm (issue 12,
part 5) behave as the VMMs the daemon used to execute: they survive daemon restarts, get exactly the descriptors
they should, a dead zygote is replaced, and the zygote refuses what is not a VM start."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from conftest import needs_kvm
from engine_helpers import Daemon, attach_session, echo_guest, state_of, wait_for


def _zygote_pid(d: Daemon) -> int:
    return int((d.state / "zygote.pid").read_text())


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except OSError:
        return False


def _attach_echo(d: Daemon, ref: str, text: bytes) -> bytes:
    """Type ``text`` and then 'q' on the echo guest's console through `pykvm attach`; what came back
    (stdin is kept open until the echo is back: attach detaches at the end of its input)."""
    out, _, _ = attach_session(d, ref, text + b"q", until=text)
    return out


def _fd_links(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            pass
    return out


def _identity(pid: int, fd: int) -> tuple[int, int] | None:
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _access_mode(pid: int, fd: int) -> int | None:
    """O_RDONLY, O_WRONLY or O_RDWR of ``pid``'s descriptor ``fd`` (/proc/PID/fdinfo), None if gone."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
    except (OSError, StopIteration, ValueError):
        return None
    return flags & os.O_ACCMODE


def _report_pipe(vmm: int, fd: int, shim: int, links: dict[int, str]) -> bool:
    """Whether ``vmm``'s ``fd`` is its jail's report pipe: a pipe the VMM can only write, whose read end
    the shim (the jail's supervisor) holds, read-only."""
    if not links.get(fd, "").startswith("pipe:") or _access_mode(vmm, fd) != os.O_WRONLY:
        return False
    ends = [n for n, t in _fd_links(shim).items() if t == links[fd]]
    return len(ends) == 1 and _access_mode(shim, ends[0]) == os.O_RDONLY


def _request(d: Daemon, payload: bytes, fds: list[int] = ()) -> dict:
    """One raw request to the daemon's zygote; its JSON answer (closing any pidfd it sent)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(30)
        s.connect(str(d.state / "zygote.sock"))
        socket.send_fds(s, [payload], list(fds))
        data, got, _, _ = socket.recv_fds(s, 65536, 1)
    finally:
        s.close()
    for fd in got:
        os.close(fd)
    return json.loads(data)


@needs_kvm
def test_vms_and_the_zygote_survive_a_daemon_restart(tmp_path):
    d = Daemon()
    d.start()
    try:
        zygote = _zygote_pid(d)
        guest = str(echo_guest(tmp_path))
        assert d.pykvm("run", "-d", "--name", "before", guest).returncode == 0
        d.remember_shims()
        shim = state_of(d, "before")["ShimPid"]
        d.stop()
        assert _alive(zygote) and _alive(shim)
        d.start()
        assert _zygote_pid(d) == zygote                 # the new daemon uses the zygote it found
        assert state_of(d, "before")["Status"] == "running"
        assert d.pykvm("run", "-d", "--name", "after", guest).returncode == 0
        d.remember_shims()
        for name in ("before", "after"):
            assert b"hello " + name.encode() in _attach_echo(d, name, b"hello " + name.encode())
            wait_for(lambda n=name: state_of(d, n)["Status"] == "exited", what=f"{name}'s end")
            assert state_of(d, name)["ExitCode"] == 7    # debug-exit 3: the VMM's own status, through the shim
        assert _zygote_pid(d) == zygote and _alive(zygote)
    finally:
        d.close()


@needs_kvm
@pytest.mark.parametrize("jail", [False, True], ids=["unjailed", "jailed"])
def test_the_vmm_gets_exactly_its_descriptors(tmp_path, jail):
    if jail and os.geteuid() != 0:
        pytest.skip("a jailed VMM needs a daemon running as root")
    d = Daemon(*(() if jail else ("--no-jail",)))
    d.start()
    try:
        guest = echo_guest(tmp_path)
        drive = tmp_path / "disk.img"
        drive.write_bytes(b"\0" * 65536)
        drive.chmod(0o644)
        r = d.pykvm("run", "-d", "--name", "fds", "--drive", f"{drive},readonly", str(guest))
        assert r.returncode == 0, r.stderr
        d.remember_shims()
        vm = state_of(d, "fds")
        vmdir = d.state / "vms" / json.loads(d.pykvm("inspect", "fds").stdout)[0]["Id"][:16]
        wait_for(lambda: "/dev/kvm" in _fd_links(vm["Pid"]).values() or jail, what="the VMM's /dev/kvm")
        shim = json.loads((vmdir / "shim.json").read_text())
        passed = shim["pass_fds"]
        drive_fd = int(shim["argv"][shim["argv"].index("--drive") + 1].split(",")[0].rsplit("/", 1)[1])
        assert len(passed) == 2 and drive_fd in passed
        image_fd = next(n for n in passed if n != drive_fd)
        vmms = [vm["Pid"]]
        if jail:        # the VM's VMM is the jailed process, the shim's child (the shim is its supervisor)
            jailed = wait_for(lambda: json.loads((vmdir / "jail.json").read_text())["Pid"]
                              if (vmdir / "jail.json").exists() else None, what="jail.json")
            # its VM (/dev/kvm itself reads as a path in the jail's mount namespace, not as /dev/kvm)
            wait_for(lambda: "anon_inode:kvm-vm" in _fd_links(jailed).values(), what="the jailed VMM's VM")
            vmms.append(jailed)
        others = {}          # (device, inode) of every descriptor above 2 of the zygote, the shim, the daemon
        for pid in (_zygote_pid(d), vm["ShimPid"], d.proc.pid):
            others.update({_identity(pid, n): t for n, t in _fd_links(pid).items() if n > 2})
        for vmm in vmms:
            links = _fd_links(vmm)
            # the caller-opened files, at the numbers the VMM's command line names (the image may be closed
            # once loaded; the drive stays open)
            assert links.get(drive_fd) == str(drive), links
            assert links.get(image_fd) in (str(guest), None) or not links[image_fd].startswith("/"), links
            # its console: stdin and stdout/stderr are the shim's pipes
            assert links[0].startswith("pipe:") and links[1].startswith("pipe:") and links[2] == links[1], links
            # nothing of the zygote's, the shim's or the daemon's (anonymous inodes, such as epoll and
            # eventfd descriptors, all share one inode and cannot be told apart this way)
            leaked = {n: t for n, t in links.items() if n > 2 and n not in passed and not t.startswith("anon_inode")
                      and _identity(vmm, n) in others
                      and not (jail and _report_pipe(vmm, n, vm["ShimPid"], links))}
            assert not leaked, f"the VMM holds descriptors of other processes: {leaked}"
            assert not [t for t in links.values() if str(d.state) in t], links
        assert b"fds ok" in _attach_echo(d, "fds", b"fds ok")
    finally:
        d.close()



def _zombie_children(pid: int) -> list[int]:
    children = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        children += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return [c for c in children if not _alive(c)]


@needs_kvm
def test_the_shims_of_vms_that_ended_are_reaped_by_the_zygote(tmp_path):
    """A shim is the zygote's child (one fork, not two): when it ends, the zygote collects it, so no zombie
    is left per VM that ran."""
    d = Daemon()
    d.start()
    try:
        for name in ("one", "two", "three"):
            assert d.pykvm("run", "-d", "--name", name, "hello-long64").returncode == 0
        d.remember_shims()
        for name in ("one", "two", "three"):
            wait_for(lambda n=name: state_of(d, n)["Status"] == "exited", what=f"{name}'s end")
        zygote = _zygote_pid(d)
        wait_for(lambda: not _zombie_children(zygote), what="the zygote reaping its ended shims")
        assert _alive(zygote)
    finally:
        d.close()

@needs_kvm
def test_a_zygote_that_died_is_restarted(tmp_path):
    d = Daemon()
    d.start()
    try:
        old = _zygote_pid(d)
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: not _alive(old), what="the zygote's end")
        guest = str(echo_guest(tmp_path))
        r = d.pykvm("run", "-d", "--name", "phoenix", guest)
        assert r.returncode == 0, r.stderr
        d.remember_shims()
        new = _zygote_pid(d)
        assert new != old and _alive(new)
        assert b"risen" in _attach_echo(d, "phoenix", b"risen")
    finally:
        d.close()


@needs_kvm
def test_a_bad_request_to_the_zygote_is_refused(tmp_path):
    d = Daemon()
    d.start()
    try:
        vmdir = d.state / "vms" / "0123456789abcdef"
        vmdir.mkdir(mode=0o700)
        marker = tmp_path / "ran"
        shell = ["/bin/sh", "-c", f"touch {marker}", "x"]
        good_argv = [sys.executable, "-m", "pykvm", "run", "-q", "hello-long64"]
        null = os.open("/dev/null", os.O_RDONLY)
        try:
            for payload, fds in (
                (b"{not json", []),
                (json.dumps({"vmdir": str(vmdir), "argv": shell, "fds": []}).encode(), []),
                (json.dumps({"vmdir": str(vmdir), "argv": [sys.executable, "-m", "pykvm", "daemon", "x"],
                             "fds": []}).encode(), []),
                (json.dumps({"vmdir": str(tmp_path), "argv": good_argv, "fds": []}).encode(), []),
                (json.dumps({"vmdir": str(vmdir / ".."), "argv": good_argv, "fds": []}).encode(), []),
                (json.dumps({"vmdir": str(vmdir), "argv": good_argv, "fds": [5]}).encode(), []),
                (json.dumps({"vmdir": str(vmdir), "argv": good_argv, "fds": []}).encode(), [null]),
                (json.dumps({"vmdir": str(vmdir), "argv": good_argv, "fds": [], "extra": 1}).encode(), []),
            ):
                answer = _request(d, payload, fds)
                assert "error" in answer and "pid" not in answer, (payload, answer)
        finally:
            os.close(null)
        assert not marker.exists()
        assert not (vmdir / "shim.log").exists()            # nothing was started for any of them
        # the zygote still serves: a well-formed request starts a VM that runs to its end
        answer = _request(d, json.dumps({"vmdir": str(vmdir), "argv": good_argv, "fds": []}).encode())
        assert answer.get("pid")
        wait_for(lambda: (vmdir / "exit.json").exists(), what="the VM's exit.json")
        assert json.loads((vmdir / "exit.json").read_text())["ExitCode"] == 0
        records = [json.loads(line) for line in (vmdir / "console.log").read_text().splitlines()]
        assert "Hello from 64-bit long mode!" in "".join(r["d"] for r in records)
    finally:
        d.close()


_WARMED_API = """
import json, os, socket, sys, threading
from pykvm.api import server
from pykvm.api.controller import Vmm
server.prebuild_app()
server.warm_up_prebuilt()
threads = threading.active_count()
vmm = Vmm("the-vm")
with server.ApiServer(vmm, sys.argv[1]):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sys.argv[1])
        s.sendall(b"GET / HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n")
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
vmm.shutdown()
print(json.dumps({"threads": threads, "answer": answer.split(b"\\r\\n\\r\\n", 1)[1].decode()}))
"""


def test_the_api_warmed_up_in_the_zygote_leaves_it_single_threaded_and_serves_the_next_vmm(tmp_path):
    """The zygote serves the per-VM API once before it forks (what its first request builds is then shared): it must
    be left with one thread (fork copies one), and the app must answer for the VMM that comes next, not the
    warm-up's."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", _WARMED_API, str(tmp_path / "api.sock")], capture_output=True,
                         timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr.decode()
    result = json.loads(out.stdout)
    assert result["threads"] == 1
    assert json.loads(result["answer"])["id"] == "the-vm"


@needs_kvm
@pytest.mark.parametrize("jail", [False, True], ids=["unjailed", "jailed"])
def test_an_engine_vmm_starts_its_api_server_on_the_first_call(tmp_path, jail):
    """The daemon's VMMs serve their API lazily (pykvm.api.server.ApiServer, lazy): until a client calls, a VMM
    holds no event loop (the memory its start would copy from the zygote stays shared), yet its socket is
    there from the start and the first call is answered; in a jail too, where the server then starts."""
    if jail and os.geteuid() != 0:
        pytest.skip("a jailed VMM needs a daemon running as root")
    d = Daemon(*(() if jail else ("--no-jail",)))
    d.start()
    try:
        assert d.pykvm("run", "-d", "--name", "lazy", str(echo_guest(tmp_path))).returncode == 0
        d.remember_shims()
        vmdir = d.state / "vms" / json.loads(d.pykvm("inspect", "lazy").stdout)[0]["Id"][:16]
        wait_for(lambda: (vmdir / "api.sock").exists(), what="the VMM's API socket")
        vmm = state_of(d, "lazy")["Pid"]
        if jail:
            vmm = wait_for(lambda: json.loads((vmdir / "jail.json").read_text())["Pid"]
                           if (vmdir / "jail.json").exists() else None, what="jail.json")

        def event_loops() -> int:
            return sum(t == "anon_inode:[eventpoll]" for t in _fd_links(vmm).values())
        assert event_loops() == 0
        assert d.pykvm("pause", "lazy").returncode == 0           # PATCH /vm through the VMM's socket
        assert state_of(d, "lazy")["Status"] == "paused"
        assert event_loops() == 1
        assert d.pykvm("unpause", "lazy").returncode == 0
        assert b"still here" in _attach_echo(d, "lazy", b"still here")
        wait_for(lambda: state_of(d, "lazy")["Status"] == "exited", what="the VM's end")
        assert state_of(d, "lazy")["ExitCode"] == 7
    finally:
        d.close()


_PRELOADED = """
import json, os, signal, threading
def dispositions():
    return {s: repr(signal.getsignal(s)) for s in range(1, signal.NSIG) if s not in (32, 33)}
before = (sorted(os.listdir("/proc/self/fd")), dispositions())
from pykvm.engine import zygote
zygote._preload()
after = (sorted(os.listdir("/proc/self/fd")), dispositions())
print(json.dumps({"threads": threading.active_count(), "same": before == after}))
"""


@needs_kvm
def test_the_zygote_boots_a_vm_before_it_forks_and_keeps_nothing_of_it(tmp_path):
    """The zygote runs the bundled demo guest once before it serves (what a VMM's first boot builds is then shared by
    every VMM): the boot must succeed, and leave no thread (fork copies one), descriptor (a VMM gets exactly its own)
    or signal handler behind."""
    import subprocess
    out = subprocess.run([sys.executable, "-c", _PRELOADED], capture_output=True, timeout=120, stdin=subprocess.DEVNULL,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr.decode()
    assert b"warm-up VM did not run" not in out.stdout + out.stderr, out.stdout.decode()
    result = json.loads(out.stdout.splitlines()[-1])
    assert result == {"threads": 1, "same": True}


@needs_kvm
def test_a_zygote_of_other_code_is_replaced_and_its_vms_run_on(tmp_path):
    """After an upgrade, a restarted daemon must not fork VMMs from the zygote of the old code: it starts a new one;
    the old zygote ends (its socket was replaced), and the VMs it started run on."""
    d = Daemon()
    d.start()
    try:
        guest = str(echo_guest(tmp_path))
        assert d.pykvm("run", "-d", "--name", "old", guest).returncode == 0
        d.remember_shims()
        old = _zygote_pid(d)
        d.stop()
        (d.state / "zygote.code").write_text("the code before an upgrade\n")
        d.start()
        new = _zygote_pid(d)
        assert new != old
        wait_for(lambda: not _alive(old), what="the old zygote's end")
        assert state_of(d, "old")["Status"] == "running"
        assert d.pykvm("run", "-d", "--name", "new", guest).returncode == 0
        d.remember_shims()
        for name in ("old", "new"):
            assert name.encode() + b" here" in _attach_echo(d, name, name.encode() + b" here")
        assert _zygote_pid(d) == new
        d.stop()
        d.start()
        assert _zygote_pid(d) == new        # the same code: kept
    finally:
        d.close()
