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


def _shell(proc, seen: bytearray, command: bytes, done: bytes) -> bytes:
    """Type ``command`` at the guest's shell, wait for the line ``done``; the output since the command."""
    start = len(seen)
    proc.stdin.write(command + b"\n")
    proc.stdin.flush()
    read_until(proc, rb"^" + re.escape(done) + rb"\r?$", seen, limit=120)
    return bytes(seen[start:])


def _uptime(text: bytes) -> float:
    return float(re.search(rb"^up (\d+\.\d+) ", text, re.M).group(1))


def _wait_for_socket(proc, sock) -> None:
    deadline = time.monotonic() + 60
    while not sock.exists():
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.02)


@pytest.mark.parametrize("started_by", ["run", "api"])
def test_linux_with_a_disk_continues_after_restore_in_a_fresh_vmm(tmp_path, started_by):
    """Snapshot the small Linux idle at its shell with a virtio-blk disk (booted by `pykvm run --api-sock`, or
    configured and started over the API, whose snapshot refers to the boot files instead of copying them);
    restore in a fresh `pykvm vmm`: the shell answers, the disk reads what was written before and takes a new
    write, uptime does not go back."""
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    sock, state, mem = tmp_path / "linux.sock", tmp_path / "linux.state", tmp_path / "linux.mem"
    args = "console=ttyS0 earlyprintk=ttyS0 panic=-1"
    if started_by == "run":
        command = ["run", "-q", "-k", str(VMLINUX), "-i", str(INITRD), "-m", "64M", "-p", args, "--timeout", "600",
                   "--drive", str(disk), "--api-sock", str(sock)]
    else:
        command = ["vmm", "--api-sock", str(sock)]
    first = subprocess.Popen([sys.executable, "-m", "pykvm", *command], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = bytearray()
    try:
        if started_by == "api":
            _wait_for_socket(first, sock)
            with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost",
                              timeout=60) as c:
                for path, body in (("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
                                   ("/boot-source", {"kernel_image_path": str(VMLINUX), "initrd_path": str(INITRD),
                                                     "boot_args": args}),
                                   ("/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(disk),
                                                       "is_root_device": True}),
                                   ("/actions", {"action_type": "InstanceStart"})):
                    r = c.put(path, json=body)
                    assert r.status_code == 204, r.text
        read_until(first, re.escape(MARKER), seen)
        out = _shell(first, seen, b"printf snap-one > /dev/vda; sync; echo up $(cat /proc/uptime); echo ok-1",
                     b"ok-1")
        up_before = _uptime(out)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost",
                          timeout=60) as c:
            assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
            r = c.put("/snapshot/create", json={"snapshot_path": str(state), "mem_file_path": str(mem)})
            assert r.status_code == 204, r.text
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert disk.read_bytes()[:8] == b"snap-one"
    if started_by == "api":   # fw_cfg's copies of the kernel and initrd are references, not bytes
        assert os.path.getsize(state) < 1 << 20
    sock2 = tmp_path / "vmm.sock"
    second = subprocess.Popen([sys.executable, "-m", "pykvm", "vmm", "--api-sock", str(sock2)], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = bytearray()
    try:
        _wait_for_socket(second, sock2)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock2)), base_url="http://localhost",
                          timeout=60) as c:
            r = c.put("/snapshot/load", json={"snapshot_path": str(state), "mem_file_path": str(mem),
                                              "resume_vm": True})
            assert r.status_code == 204, r.text
        # drop_caches: the next read of /dev/vda goes to the restored virtio-blk, not the page cache
        out = _shell(second, seen, b"echo 3 > /proc/sys/vm/drop_caches; echo got-$(head -c 8 /dev/vda)-; "
                     b"printf snap-two | dd of=/dev/vda bs=512 seek=8 conv=notrunc 2>/dev/null; sync; "
                     b"echo up $(cat /proc/uptime); echo ok-2", b"ok-2")
        assert b"got-snap-one-" in out
        assert _uptime(out) >= up_before
        assert disk.read_bytes()[4096:4104] == b"snap-two"
    finally:
        second.kill()
        second.communicate(timeout=60)
