"""The daemon jails its VMMs (issue 13, part 4): a VM started through `pykvm daemon` as root runs in
new namespaces, as a non-root uid of its own, under a seccomp filter; it still answers through
`pykvm attach`; removing it removes its cgroup and its root directory. Its VMM serves its API from the
jail, so the daemon pauses, unpauses, reads the stats of, snapshots (taking the files out of the jail),
restores (jailed) and stops (Ctrl-Alt-Del) it as an unjailed one, also after a daemon restart."""

from __future__ import annotations

import json
import os
import stat

import pytest
from conftest import needs_kvm
from engine_helpers import Daemon, attach_session, echo_guest, state_of, wait_for

pytestmark = [needs_kvm,
              pytest.mark.skipif(os.geteuid() != 0, reason="the daemon jails VMMs only as root")]


def _jail_ready() -> str | None:
    try:
        from pykvm.jail import seccomp
    except ImportError as e:
        return f"pykvm.jail cannot be imported: {e}"
    return seccomp.available()


@pytest.fixture
def daemon():
    why = _jail_ready()
    if why:
        pytest.skip(why)
    d = Daemon()
    d.start()
    try:
        yield d
    finally:
        d.close()


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def _inspect(daemon: Daemon, ref: str) -> dict:
    r = daemon.pykvm("inspect", ref)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    return out[0] if isinstance(out, list) else out


def _cgroup_dirs(jail_id: str) -> list[str]:
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        if jail_id in dirs:
            found.append(os.path.join(top, jail_id))
    return found


def test_daemon_jails_its_vmm_and_cleans_up_on_rm(daemon, tmp_path):
    r = daemon.pykvm("run", "-d", "--name", "jailed", str(echo_guest(tmp_path)))
    assert r.returncode == 0, r.stderr
    info = wait_for(lambda: _inspect(daemon, "jailed")["Jail"].get("Jailed") and _inspect(daemon, "jailed")["Jail"],
                    what="the jailed VMM's record")
    pid = info["Pid"]
    # the jailed VMM enters its jail right before the guest's first instruction: wait for the filter
    status = wait_for(lambda: (s := _status(pid)).get("Seccomp", "0").strip() == "2" and s,
                      what="the VMM's seccomp filter")
    uids = status["Uid"].split()
    assert uids[0] != "0" and len(set(uids)) == 1 and int(uids[0]) == info["Uid"]
    assert status["NSpid"].split()[-1] == "1"           # PID 1 of its own PID namespace
    assert status["NoNewPrivs"].strip() == "1" and int(status["CapEff"], 16) == 0
    for ns in ("mnt", "net", "ipc", "uts", "pid"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert os.readlink(f"/proc/{pid}/root") == "/"     # pivoted: its / is its own root directory
    root = info["Root"]
    assert os.path.isdir(root) and os.path.exists(os.path.join(root, "dev", "kvm"))
    assert _cgroup_dirs(info["Id"]), "the VM's cgroup"
    # the console still works through the shim: what goes in comes back
    out, err, _ = attach_session(daemon, "jailed", b"jailed-echo", b"jailed-echo", timeout=30)
    assert b"jailed-echo" in out, err
    assert state_of(daemon, "jailed")["Running"]
    # rm -f: the VMM dies, its cgroup and its root directory go with it
    r = daemon.pykvm("rm", "-f", "jailed")
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(f"/proc/{pid}")
    assert not os.path.exists(os.path.dirname(root))
    assert _cgroup_dirs(info["Id"]) == []


def test_no_jail_is_explicit_and_logged(tmp_path):
    d = Daemon("--no-jail")
    d.start()
    try:
        r = d.pykvm("run", "-d", "--name", "free", str(echo_guest(tmp_path)))
        assert r.returncode == 0, r.stderr
        info = _inspect(d, "free")
        assert info["Jail"] == {"Jailed": False}
        pid = wait_for(lambda: state_of(d, "free")["Pid"], what="the VMM's pid")
        assert _status(pid)["Uid"].split()[0] == "0"
        assert "--no-jail: VMMs run unjailed" in (d.dir / "daemon.log").read_text()
    finally:
        d.close()


# Echoes COM1 like engine_helpers.ECHO_GUEST ('q' ends it: status 7), and ends with debug-exit 5 (status 11)
# when the keyboard controller has a byte for it: the scan codes of a SendCtrlAltDel.
CAD_GUEST = """
1:  mov $0x64, %dx
    in %dx, %al
    test $1, %al
    jnz 3f
    mov $0x3fd, %dx
    in %dx, %al
    test $1, %al
    jz 1b
    mov $0x3f8, %dx
    in %dx, %al
    cmp $'q', %al
    je 2f
    out %al, %dx
    jmp 1b
2:  mov $0xf4, %dx
    mov $3, %al
    out %al, %dx
3:  mov $0xf4, %dx
    mov $5, %al
    out %al, %dx
"""
CAD_STATUS = 11     # (5 << 1) | 1


def _cad_guest(tmp_path) -> str:
    from conftest import assemble
    path = tmp_path / "cad.bin"
    path.write_bytes(assemble(CAD_GUEST, 64, tmp_path))
    path.chmod(0o644)
    return str(path)


def _jailed(daemon: Daemon, ref: str) -> dict:
    """The VM's jail record once its VMM is in the jail and its API socket is published."""
    def ready():
        info = _inspect(daemon, ref)
        return info["Jail"].get("Jailed") and info["ApiSocket"] and os.path.exists(info["ApiSocket"]) and info
    return wait_for(ready, what=f"{ref}'s jailed VMM and its API socket")


def _echo(daemon: Daemon, ref: str, text: bytes) -> bytes:
    """``text`` typed through `pykvm attach`, stdin held open until the guest echoes it; what came back."""
    out, _, _ = attach_session(daemon, ref, text, until=text, timeout=30)
    return out


def test_jailed_vm_pauses_snapshots_restores_jailed_and_stops_by_ctrl_alt_del(daemon, tmp_path):
    assert daemon.pykvm("run", "-d", "--name", "src", _cad_guest(tmp_path)).returncode == 0
    info = _jailed(daemon, "src")
    sock = info["ApiSocket"]
    assert stat.S_ISSOCK(os.lstat(sock).st_mode) and os.lstat(sock).st_mode & 0o777 == 0o600
    # the VMM behind the socket is the jailed one: it accepts there, and has no way to make a socket
    pid = info["Jail"]["Pid"]
    assert _status(pid)["Seccomp"].strip() == "2" and _status(pid)["Uid"].split()[0] == str(info["Jail"]["Uid"])
    r = daemon.pykvm("pause", "src")
    assert r.returncode == 0, r.stderr
    assert state_of(daemon, "src")["Status"] == "paused"
    stats = json.loads(daemon.pykvm("stats", "--no-stream", "--format", "json", "src").stdout)
    assert stats["exits"]["reasons"]["IO"]["count"] > 0          # read live from the jailed VMM's API
    r = daemon.pykvm("unpause", "src")
    assert r.returncode == 0, r.stderr
    assert state_of(daemon, "src")["Status"] == "running"
    r = daemon.pykvm("snapshot", "src", "snap1")
    assert r.returncode == 0, r.stderr
    # written in the jail's /run, taken out into the VM's directory: root's, 0600; nothing left in the jail
    where = daemon.state / "vms" / info["Id"][:16] / "snapshots" / "snap1"
    for name in ("state", "mem"):
        st = os.lstat(where / name)
        assert stat.S_ISREG(st.st_mode) and (st.st_uid, st.st_mode & 0o777) == (0, 0o600), name
    assert os.listdir(os.path.join(info["Jail"]["Root"], "run")) == []
    assert state_of(daemon, "src")["Status"] == "running"
    assert b"before" in _echo(daemon, "src", b"before")
    # create-from-snapshot: the copy runs jailed too, and goes on where the source was
    assert daemon.pykvm("create", "--name", "copy", "--from-snapshot", "src:snap1").returncode == 0
    r = daemon.pykvm("start", "copy")
    assert r.returncode == 0, r.stderr
    copy = _jailed(daemon, "copy")
    assert copy["Jail"]["Uid"] != info["Jail"]["Uid"]
    assert b"restored" in _echo(daemon, "copy", b"restored")
    # stop: Ctrl-Alt-Del through each jailed VMM's API; the guest ends itself (11), not SIGKILL (137)
    for ref in ("copy", "src"):
        r = daemon.pykvm("stop", "-t", "60", ref)
        assert r.returncode == 0, r.stderr
        assert state_of(daemon, ref)["ExitCode"] == CAD_STATUS, ref
    assert not os.path.exists(sock) and not os.path.exists(info["Jail"]["Root"])


def test_restarted_daemon_readopts_a_jailed_vm_and_its_api_socket(tmp_path):
    why = _jail_ready()
    if why:
        pytest.skip(why)
    d = Daemon()
    d.start()
    try:
        assert d.pykvm("run", "-d", "--name", "kept", _cad_guest(tmp_path)).returncode == 0
        info = _jailed(d, "kept")
        d.remember_shims()
        d.stop()
        d.start()
        assert _inspect(d, "kept")["Jail"]["Pid"] == info["Jail"]["Pid"]
        r = d.pykvm("pause", "kept")
        assert r.returncode == 0, r.stderr
        r = d.pykvm("unpause", "kept")
        assert r.returncode == 0, r.stderr
        r = d.pykvm("stop", "-t", "60", "kept")
        assert r.returncode == 0, r.stderr
        assert state_of(d, "kept")["ExitCode"] == CAD_STATUS
    finally:
        d.close()


def test_a_jailed_vm_told_to_end_by_sigterm_ends_by_it(daemon, tmp_path):
    """`pykvm kill -s TERM`: the jailed VMM ends as SIGTERM ends `pykvm run` (143), not killed by its seccomp
    filter (4) for the restart_syscall with which the kernel resumes a timed wait the signal interrupted in
    another thread than the one that took it. (Three VMs: without restart_syscall most such ends failed.)"""
    for n in range(3):
        name = f"term{n}"
        assert daemon.pykvm("run", "-d", "--name", name, _cad_guest(tmp_path)).returncode == 0
        _jailed(daemon, name)
        r = daemon.pykvm("kill", "-s", "TERM", name)
        assert r.returncode == 0, r.stderr
        wait_for(lambda name=name: state_of(daemon, name)["Status"] == "exited", what=f"{name}'s end")
        log = daemon.pykvm("logs", name).stdout + daemon.pykvm("logs", name).stderr
        assert (state_of(daemon, name)["ExitCode"], b"seccomp" in log) == (143, False), log[-300:]


def test_a_root_daemon_without_the_jails_seccomp_binding_refuses_to_start(tmp_path):
    """As root the daemon jails every VMM; without pyseccomp every VM it started ended at once (status 2) with
    the reason only in its log. The daemon now says so at its start, with what to install or --no-jail."""
    import contextlib
    import subprocess
    import sys
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "pyseccomp.py").write_text("")      # importable, but no libseccomp binding in it
    env = dict(os.environ, PYTHONPATH=str(fake))
    try:
        out = subprocess.run([sys.executable, "-m", "pykvm", "daemon", "--socket", str(tmp_path / "d.sock"),
                              "--state-dir", str(tmp_path / "state")], capture_output=True, text=True, timeout=30,
                             env=env, stdin=subprocess.DEVNULL)
    finally:        # a daemon that did start (and was killed by the timeout) left its zygote running
        zygote = tmp_path / "state" / "zygote.pid"
        if zygote.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(zygote.read_text()), 9)
    message = " ".join(out.stderr.split())
    assert out.returncode == 2, out.stderr
    assert "pip install 'pykvm[jail]'" in message and "--no-jail" in message, out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "d.sock").exists()
