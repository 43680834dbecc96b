"""A snapshot of a restored VM, restored again: the small Linux configured over the API with a virtio-blk disk
(whose image is swapped while it runs, PATCH /drives: the guest sees the new size), snapshot, restore in a fresh
`pykvm vmm`, use the disk, snapshot that VM, restore it in another fresh `pykvm vmm`: the shell answers, the disk
reads what both earlier VMs wrote and takes a new write, uptime never goes back, and the restored VM's snapshot
refers to the boot files instead of copying them. One Linux boot: run it under the heavy lock."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from api_helpers import ROOT
from conftest import needs_kvm
from test_api_linux import INITRD, MARKER, VMLINUX, _shell, _uptime, _wait_for_socket, read_until

httpx = pytest.importorskip("httpx")
pytestmark = [needs_kvm, pytest.mark.skipif(not (VMLINUX.exists() and INITRD.exists()),
                                            reason="our small Linux is not built: run `make -C guests/linux`")]

ARGS = "console=ttyS0 earlyprintk=ttyS0 panic=-1"


def _vmm(sock):
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "vmm", "--api-sock", str(sock)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _wait_for_socket(proc, sock)
    return proc


def _client(sock):
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost", timeout=60)


def _snapshot(sock, state, mem) -> None:
    with _client(sock) as c:
        assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
        r = c.put("/snapshot/create", json={"snapshot_path": str(state), "mem_file_path": str(mem)})
        assert r.status_code == 204, r.text


def _restore(sock, state, mem) -> None:
    with _client(sock) as c:
        r = c.put("/snapshot/load", json={"snapshot_path": str(state), "mem_file_path": str(mem), "resume_vm": True})
        assert r.status_code == 204, r.text


def _stop(proc) -> None:
    proc.kill()
    proc.communicate(timeout=60)


def test_snapshot_of_a_restored_linux_restores_again_with_shell_and_disk(tmp_path):
    small, disk = tmp_path / "small.img", tmp_path / "disk.img"
    small.write_bytes(bytes(1 << 20))
    disk.write_bytes(bytes(2 << 20))
    first = _vmm(tmp_path / "1.sock")
    seen = bytearray()
    try:
        with _client(tmp_path / "1.sock") as c:
            for path, body in (("/machine-config", {"vcpu_count": 1, "mem_size_mib": 64}),
                               ("/boot-source", {"kernel_image_path": str(VMLINUX), "initrd_path": str(INITRD),
                                                 "boot_args": ARGS}),
                               ("/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(small),
                                                   "is_root_device": True}),
                               ("/actions", {"action_type": "InstanceStart"})):
                r = c.put(path, json=body)
                assert r.status_code == 204, r.text
            read_until(first, re.escape(MARKER), seen)
            assert b"size-2048" in _shell(first, seen, b"echo size-$(cat /sys/block/vda/size)", b"size-2048")
            # the running drive's image swapped: the guest learns the new size from the config-change interrupt
            r = c.patch("/drives/rootfs", json={"drive_id": "rootfs", "path_on_host": str(disk)})
            assert r.status_code == 204, r.text
        out = _shell(first, seen, b"for i in 1 2 3 4 5; do s=$(cat /sys/block/vda/size); [ $s = 4096 ] && break; "
                     b"sleep 1; done; echo size-$s; printf snap-one > /dev/vda; sync; "
                     b"echo up $(cat /proc/uptime); echo ok-1", b"ok-1")
        assert b"size-4096" in out
        up = _uptime(out)
        _snapshot(tmp_path / "1.sock", tmp_path / "a.state", tmp_path / "a.mem")
    finally:
        _stop(first)
    assert disk.read_bytes()[:8] == b"snap-one" and small.read_bytes() == bytes(1 << 20)

    second = _vmm(tmp_path / "2.sock")
    seen = bytearray()
    try:
        _restore(tmp_path / "2.sock", tmp_path / "a.state", tmp_path / "a.mem")
        # drop_caches: each read of /dev/vda goes to the restored virtio-blk, not the page cache
        out = _shell(second, seen, b"echo 3 > /proc/sys/vm/drop_caches; echo got-$(head -c 8 /dev/vda)-; "
                     b"printf snap-two | dd of=/dev/vda bs=512 seek=8 conv=notrunc 2>/dev/null; sync; "
                     b"echo up $(cat /proc/uptime); echo ok-2", b"ok-2")
        assert b"got-snap-one-" in out
        assert _uptime(out) >= up
        up = _uptime(out)
        _snapshot(tmp_path / "2.sock", tmp_path / "b.state", tmp_path / "b.mem")
    finally:
        _stop(second)
    assert disk.read_bytes()[4096:4104] == b"snap-two"
    assert os.path.getsize(tmp_path / "b.state") < 1 << 20      # the boot files by reference, not copied

    third = _vmm(tmp_path / "3.sock")
    seen = bytearray()
    try:
        _restore(tmp_path / "3.sock", tmp_path / "b.state", tmp_path / "b.mem")
        out = _shell(third, seen, b"echo 3 > /proc/sys/vm/drop_caches; echo got-$(head -c 8 /dev/vda)-"
                     b"$(dd if=/dev/vda bs=512 skip=8 count=1 2>/dev/null | head -c 8)-; "
                     b"printf snap-three | dd of=/dev/vda bs=512 seek=16 conv=notrunc 2>/dev/null; sync; "
                     b"echo up $(cat /proc/uptime); echo ok-3", b"ok-3")
        assert b"got-snap-one-snap-two-" in out
        assert _uptime(out) >= up
    finally:
        _stop(third)
    assert disk.read_bytes()[8192:8202] == b"snap-three"
