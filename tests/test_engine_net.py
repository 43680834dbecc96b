"""VMs on the daemon's bridge (issue 14, part 4), with the daemon inside a network namespace the test
creates and deletes (``nsenter --net``): the bridge and the TAPs never appear in the host's namespace;
addresses come from 192.0.2.0/24 and there is no route out. Two small Linux guests created with
``--net`` get their addresses with ``ip=``, reach each other and are reached from the daemon's
namespace; removing them frees their TAPs and addresses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, needs_kvm
from engine_helpers import Daemon

from benchmarks import netns

LINUX = ROOT / "guests" / "linux" / "build"
KERNEL, INITRD = LINUX / "vmlinux", LINUX / "initramfs.cpio"
NETNS_PROBLEM = netns.problem()
BOOT_WAIT = 240          # seconds a boot may take on this emulated backend before the test gives up

pytestmark = [
    needs_kvm,
    pytest.mark.skipif(NETNS_PROBLEM is not None, reason=NETNS_PROBLEM or ""),
    pytest.mark.skipif(not (KERNEL.exists() and INITRD.exists()),
                       reason="the small Linux is not built (make -C guests/linux)"),
    pytest.mark.skipif(not (shutil.which("busybox") and shutil.which("nsenter")),
                       reason="the host side needs busybox (ping) and nsenter"),
]


def _inspect(daemon: Daemon, ref: str) -> dict:
    r = daemon.pykvm("inspect", ref)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    return out[0] if isinstance(out, list) else out


def _logs(daemon: Daemon, ref: str) -> str:
    return daemon.pykvm("logs", ref).stdout.decode(errors="replace")


def _wait_log(daemon: Daemon, ref: str, text: str, timeout: float) -> None:
    """Wait until ``text`` is in ``ref``'s console log (polled every 2 s: each poll is a process, and the
    guests need the CPU); fail with the log's tail and the daemon's log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = _logs(daemon, ref)
        if text in out:
            return
        if _inspect(daemon, ref)["State"]["Status"] != "running":
            break
        time.sleep(2)
    pytest.fail(f"{text!r} not in {ref}'s console: {_inspect(daemon, ref)['State']}\n{_logs(daemon, ref)[-3000:]}"
                f"\n-- daemon log:\n{(daemon.dir / 'daemon.log').read_text()[-3000:]}")


def _send(daemon: Daemon, ref: str, text: str, answer: str, timeout: float) -> None:
    """Type ``text`` on ``ref``'s console through `pykvm attach` and wait for ``answer`` in its log."""
    attach = subprocess.Popen([sys.executable, "-m", "pykvm", "attach", ref], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, **daemon.env))
    try:
        attach.stdin.write(text.encode())
        attach.stdin.flush()
        _wait_log(daemon, ref, answer, timeout)
    finally:
        attach.kill()
        attach.wait()
        attach.stdin.close()


def _links(ns: netns.Netns) -> str:
    return subprocess.run(["ip", "-n", ns.name, "-o", "link"], capture_output=True, text=True).stdout


def test_two_vms_on_the_bridge_reach_each_other_and_the_host():
    with netns.Netns() as ns:
        host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        # nsenter --net, not `ip netns exec`: the latter also remounts /sys for the namespace, which hides
        # /sys/fs/cgroup from the daemon and so the cgroups its jailed VMMs need
        d = Daemon(prefix=("nsenter", f"--net=/run/netns/{ns.name}"))
        d.start()
        try:
            ids = {}
            for name in ("neta", "netb"):
                r = d.pykvm("create", "--name", name, "--net", "-k", str(KERNEL), "-i", str(INITRD), "-m", "64M",
                            "-p", "console=ttyS0")
                assert r.returncode == 0, r.stderr
                ids[name] = r.stdout.decode().strip()
            a, b = (_inspect(d, n)["NetworkSettings"] for n in ("neta", "netb"))
            assert a["Bridge"] == b["Bridge"] == "pykvm0" and a["Gateway"] == b["Gateway"] == "192.0.2.1"
            assert {a["IPAddress"], b["IPAddress"]} == {"192.0.2.2", "192.0.2.3"}
            links = _links(ns)
            assert "pykvm0" in links and a["Tap"] in links and b["Tap"] in links
            assert "pykvm0" not in host_links and "pykvm0" not in subprocess.run(
                ["ip", "-o", "link"], capture_output=True, text=True).stdout     # never the host's namespace
            for name in ("neta", "netb"):
                assert d.pykvm("start", name).returncode == 0
            for name in ("neta", "netb"):
                _wait_log(d, name, "pykvm-linux: init ready", BOOT_WAIT)
            assert f"addr={a['IPAddress']}," in _logs(d, "neta")       # the kernel's IP-Config took ip=
            # A pings B; the daemon's namespace pings both
            _send(d, "neta", f"ping -c 3 -W 10 {b['IPAddress']} && echo peer-ok-$((40+2))\n", "peer-ok-42", 120)
            for vm in (a, b):
                r = ns.run(["busybox", "ping", "-c", "2", "-W", "10", vm["IPAddress"]], timeout=60)
                assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
            # removal frees the TAPs; their addresses are free for the next VM
            for name in ("neta", "netb"):
                assert d.pykvm("rm", "-f", name).returncode == 0
            links = _links(ns)
            assert a["Tap"] not in links and b["Tap"] not in links
            r = d.pykvm("create", "--name", "netc", "--net", "hello-long64")
            assert r.returncode == 0, r.stderr
            assert _inspect(d, "netc")["NetworkSettings"]["IPAddress"] == "192.0.2.2"
        finally:
            d.close()


def test_create_refused_for_a_name_in_use_frees_its_tap_and_address():
    """A create with --net whose name is taken is refused after the TAP and address were made: both are
    freed (they were left on the bridge, and the address taken until the daemon restarted). No boot."""
    with netns.Netns() as ns:
        d = Daemon(prefix=("nsenter", f"--net=/run/netns/{ns.name}"))
        d.start()
        try:
            assert d.pykvm("create", "--name", "dup", "--net", "hello-long64").returncode == 0
            taps = [line for line in _links(ns).splitlines() if ": pk" in line]
            r = d.pykvm("create", "--name", "dup", "--net", "hello-long64")
            assert r.returncode != 0 and b"already in use" in r.stderr, r.stderr
            assert [line for line in _links(ns).splitlines() if ": pk" in line] == taps
            assert d.pykvm("create", "--name", "next", "--net", "hello-long64").returncode == 0
            assert _inspect(d, "next")["NetworkSettings"]["IPAddress"] == "192.0.2.3"
            assert len(list((d.state / "vms").iterdir())) == 2         # no directory left by the refused one
        finally:
            d.close()
