"""A paused Linux is not touched: console input typed while `pykvm run --api-sock` has the small Linux paused
stays out of guest memory (two memory snapshots taken across the pause, the input sent between them, are
identical), and after resume the shell gets it exactly once. The console is the virtio console (``--console
virtio``), whose input is written straight into the guest's receive buffers, with a virtio-blk disk beside it.
One Linux boot (15-20 s of emulated kernel time here): run it under the heavy lock."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from api_helpers import ROOT
from conftest import needs_kvm
from test_api_linux import INITRD, MARKER, VMLINUX, _shell, read_until

httpx = pytest.importorskip("httpx")
pytestmark = [needs_kvm, pytest.mark.skipif(not (VMLINUX.exists() and INITRD.exists()),
                                            reason="our small Linux is not built: run `make -C guests/linux`")]


def _same_files(a, b) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def test_paused_linux_takes_no_console_input_until_resumed_then_exactly_once(tmp_path):
    disk, sock = tmp_path / "disk.img", tmp_path / "linux.sock"
    disk.write_bytes(bytes(1 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "-q", "-k", str(VMLINUX), "-i", str(INITRD),
                             "-m", "64M", "-p", "console=ttyS0 panic=-1", "--console", "virtio",
                             "--drive", str(disk), "--timeout", "600", "--api-sock", str(sock)],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = bytearray()
    try:
        read_until(proc, re.escape(MARKER), seen)
        _shell(proc, seen, b"echo ready-$((1+1))", b"ready-2")     # the shell reads hvc0
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost",
                          timeout=60) as c:
            assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
            first = {"snapshot_path": str(tmp_path / "1.state"), "mem_file_path": str(tmp_path / "1.mem")}
            assert c.put("/snapshot/create", json=first).status_code == 204
            proc.stdin.write(b"echo $((6*7))\n")        # typed while paused
            proc.stdin.flush()
            time.sleep(1.0)                              # time for the console thread to (wrongly) deliver it
            second = {"snapshot_path": str(tmp_path / "2.state"), "mem_file_path": str(tmp_path / "2.mem")}
            assert c.put("/snapshot/create", json=second).status_code == 204
            assert _same_files(tmp_path / "1.mem", tmp_path / "2.mem"), "guest memory changed while paused"
            assert not re.search(rb"^42\r?$", bytes(seen), re.M)
            assert c.patch("/vm", json={"state": "Resumed"}).status_code == 204
        read_until(proc, rb"^42\r?$", seen, limit=120)
        out = _shell(proc, seen, b"echo done-$((2+3))", b"done-5")
        assert len(re.findall(rb"^42\r?$", bytes(seen), re.M)) == 1, out
    finally:
        proc.kill()
        proc.communicate(timeout=60)
