"""virtio-net across pause and restore, with our small Linux on a TAP inside a network namespace the test creates
and deletes (192.0.2.0/24 only, no route out; see benchmarks/netns.py).

While the VM is paused, the host pings it: the frames wait in the TAP, guest memory stays exactly as it was (two
memory snapshots across the wait are identical), and after resume the guest answers. Then a snapshot is restored
in a fresh `pykvm vmm` (in the namespace, on the same TAP): the host pings the guest and the guest pings the host.
One Linux boot: run it under the heavy lock."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time

import pytest
from api_helpers import ROOT
from conftest import needs_kvm
from test_api_linux import INITRD, MARKER, VMLINUX, _shell, _wait_for_socket, read_until
from test_pause_linux import _same_files

from benchmarks import netns

httpx = pytest.importorskip("httpx")
NETNS_PROBLEM = netns.problem()
pytestmark = [needs_kvm,
              pytest.mark.skipif(NETNS_PROBLEM is not None, reason=NETNS_PROBLEM or ""),
              pytest.mark.skipif(not (VMLINUX.exists() and INITRD.exists()),
                                 reason="our small Linux is not built: run `make -C guests/linux`"),
              pytest.mark.skipif(shutil.which("busybox") is None, reason="the host side needs busybox (ping)")]

HOST, GUEST = "192.0.2.1", "192.0.2.2"


def _client(sock):
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=60)


def _create(c, tmp_path, name: str) -> None:
    r = c.put("/snapshot/create", json={"snapshot_path": str(tmp_path / f"{name}.state"),
                                        "mem_file_path": str(tmp_path / f"{name}.mem")})
    assert r.status_code == 204, r.text


def _stop(proc) -> None:
    proc.kill()
    proc.communicate(timeout=60)


def test_network_waits_while_paused_and_works_after_restore(tmp_path):
    with netns.Netns() as ns:
        ns.add_tap("tap0", f"{HOST}/24")
        sock = tmp_path / "1.sock"
        first = ns.popen([sys.executable, "-m", "pykvm", "run", "-q", "-k", str(VMLINUX), "-i", str(INITRD),
                          "-m", "64M", "-p", f"console=ttyS0 panic=-1 ip={GUEST}:::255.255.255.0::eth0:off",
                          "--net", "tap=tap0,mac=02:00:00:00:00:02", "--timeout", "600", "--api-sock", str(sock)],
                         cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen = bytearray()
        try:
            read_until(first, re.escape(MARKER), seen)
            _shell(first, seen, f"ping -c 1 -W 10 {HOST} >/dev/null && echo ping-ok-$((40+2))".encode(),
                   b"ping-ok-42")
            with _client(sock) as c:
                assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
                _create(c, tmp_path, "a")
                ping = ns.popen(["busybox", "ping", "-c", "1", "-W", "30", GUEST], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
                try:
                    time.sleep(1.0)                      # ARP requests and the echo request wait in the TAP
                    _create(c, tmp_path, "b")
                    assert _same_files(tmp_path / "a.mem", tmp_path / "b.mem"), "guest memory changed while paused"
                    assert ping.poll() is None           # not answered while paused
                    assert c.patch("/vm", json={"state": "Resumed"}).status_code == 204
                    ping_out = ping.communicate(timeout=60)[0]
                finally:
                    if ping.poll() is None:
                        ping.kill()
                        ping.wait()
                assert ping.returncode == 0 and b"1 packets received" in ping_out, ping_out
                assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
                _create(c, tmp_path, "c")
        finally:
            _stop(first)

        sock = tmp_path / "2.sock"
        second = ns.popen([sys.executable, "-m", "pykvm", "vmm", "--api-sock", str(sock)], cwd=ROOT,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen = bytearray()
        try:
            _wait_for_socket(second, sock)
            with _client(sock) as c:
                r = c.put("/snapshot/load", json={"snapshot_path": str(tmp_path / "c.state"),
                                                  "mem_file_path": str(tmp_path / "c.mem"), "resume_vm": True})
                assert r.status_code == 204, r.text
            host_ping = ns.run(["busybox", "ping", "-c", "3", "-W", "10", GUEST], timeout=60)
            assert host_ping.returncode == 0, host_ping.stdout.decode() + host_ping.stderr.decode()
            out = _shell(second, seen, f"ping -c 1 -W 10 {HOST} >/dev/null && echo ping-ok-$((40+3))".encode(),
                         b"ping-ok-43")
            assert b"ping-ok-43" in out
        finally:
            _stop(second)
