"""Pause and resume on our small Linux through `pykvm run --api-sock`: 1,000 cycles in a row, then the shell
still answers. One Linux boot (15-20 s of emulated kernel time here): run it under the heavy lock."""

from __future__ import annotations

import os
import re
import selectors
import subprocess
import sys
import time

import pytest
from api_helpers import ROOT
from conftest import needs_kvm

httpx = pytest.importorskip("httpx")
LINUX = ROOT / "guests" / "linux" / "build"
VMLINUX, INITRD = LINUX / "vmlinux", LINUX / "initramfs.cpio"
MARKER = b"pykvm-linux: init ready"

pytestmark = [needs_kvm, pytest.mark.skipif(not (VMLINUX.exists() and INITRD.exists()),
                                            reason="our small Linux is not built: run `make -C guests/linux`")]


def read_until(proc, pattern: bytes, seen: bytearray, limit: float = 240) -> None:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + limit
    try:
        while not re.search(pattern, bytes(seen), re.M):
            assert time.monotonic() < deadline and proc.poll() is None, bytes(seen[-2000:]).decode(errors="replace")
            if sel.select(timeout=1):
                seen += os.read(proc.stdout.fileno(), 65536)
    finally:
        sel.close()


def test_linux_keeps_answering_after_a_thousand_pause_resume_cycles(tmp_path):
    sock = tmp_path / "linux.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "-q", "-k", str(VMLINUX), "-i", str(INITRD),
                             "-m", "64M", "-p", "console=ttyS0 earlyprintk=ttyS0 panic=-1", "--timeout", "600",
                             "--api-sock", str(sock)], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    seen = bytearray()
    try:
        read_until(proc, re.escape(MARKER), seen)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost",
                          timeout=30) as c:
            for _ in range(1000):
                assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
                assert c.patch("/vm", json={"state": "Resumed"}).status_code == 204
            assert c.get("/").json()["state"] == "Running"
        proc.stdin.write(b"echo $((6*7))\n")
        proc.stdin.flush()
        read_until(proc, rb"^42\r?$", seen, limit=120)
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
