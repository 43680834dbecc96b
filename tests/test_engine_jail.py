"""The daemon jails its VMMs (issue 13, part 4): a VM started through `pykvm daemon` as root runs in
new namespaces, as a non-root uid of its own, under a seccomp filter; it still answers through
`pykvm attach`; removing it removes its cgroup and its root directory."""

from __future__ import annotations

import json
import os

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
