"""Snapshots of a running guest: restored in a fresh process (API and `pykvm run --restore`), refused when
corrupt, truncated or mismatched without harming the VM, and diff snapshots over a full one."""

from __future__ import annotations

import pytest
from api_helpers import VmmProcess, assert_continuous, counting, start_counting
from conftest import needs_kvm, run_pykvm

from pykvm.snapshot import read_state, write_state
from pykvm.snapshot.machine_state import apply_diff

pytest.importorskip("httpx")
pytestmark = needs_kvm


def snapshot(vmm: VmmProcess, tmp_path, name: str, kind: str = "Full") -> tuple[str, str]:
    state, mem = str(tmp_path / f"{name}.state"), str(tmp_path / f"{name}.mem")
    r = vmm.client.put("/snapshot/create", json={"snapshot_path": state, "mem_file_path": mem, "snapshot_type": kind})
    assert r.status_code == 204, r.text
    return state, mem


@pytest.fixture
def paused_snapshot(tmp_path):
    """A counting guest run for a few lines, paused, snapshotted, and its VMM killed: (state, mem, output)."""
    vmm = VmmProcess(tmp_path, "first")
    try:
        start_counting(vmm)
        vmm.wait_output(5)
        assert vmm.client.patch("/vm", json={"state": "Paused"}).status_code == 204
        state, mem = snapshot(vmm, tmp_path, "vm")
        output = vmm.output()
    finally:
        vmm.close()
    return state, mem, output


def test_run_restore_continues_without_gap_or_repeat(paused_snapshot):
    state, mem, before = paused_snapshot
    r = run_pykvm("run", "--restore", state, "--mem-file", mem, "--timeout", "1")
    assert r.returncode == 124, r.stderr
    after = r.stdout.decode()
    assert after and not after.startswith("1\n")
    assert_continuous(counting(before + after))


def test_corrupt_truncated_and_mismatched_snapshots_are_refused(paused_snapshot, tmp_path):
    state, mem, _ = paused_snapshot
    corrupt = tmp_path / "corrupt.state"
    data = bytearray(open(state, "rb").read())
    data[-10] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    short_mem = tmp_path / "short.mem"
    short_mem.write_bytes(open(mem, "rb").read()[: 1 << 20])
    two_cpus = tmp_path / "two.state"
    body = read_state(state)
    body["machine"]["vcpu_count"] = 2
    write_state(str(two_cpus), body)
    cases = [(str(corrupt), mem, "checksum of its state does not match"), (state, str(short_mem), "truncated"),
             (str(two_cpus), mem, "malformed"), (mem, mem, "not a pykvm snapshot")]
    for state_path, mem_path, words in cases:
        r = run_pykvm("run", "--restore", state_path, "--mem-file", mem_path)
        err = r.stderr.decode()
        assert r.returncode == 2, err
        assert words in err and "Traceback" not in err


def test_failed_load_leaves_the_vmm_fresh_then_a_good_load_works(paused_snapshot, tmp_path):
    state, mem, before = paused_snapshot
    short_mem = tmp_path / "short.mem"
    short_mem.write_bytes(b"\0" * 4096)
    vmm = VmmProcess(tmp_path, "second")
    try:
        r = vmm.client.put("/snapshot/load", json={"snapshot_path": state, "mem_file_path": str(short_mem)})
        assert r.status_code == 400 and "truncated" in r.json()["fault_message"]
        assert vmm.client.get("/").json()["state"] == "Not started"
        r = vmm.client.put("/snapshot/load", json={"snapshot_path": state, "resume_vm": True,
                                                   "mem_backend": {"backend_path": mem, "backend_type": "File"}})
        assert r.status_code == 204, r.text
        assert vmm.client.get("/").json()["state"] == "Running"
        vmm.wait_output(3)
        assert_continuous(counting(before + vmm.output()))
    finally:
        vmm.close()


def test_failed_create_leaves_the_vm_paused_and_resumable(tmp_path):
    vmm = VmmProcess(tmp_path, "vm")
    try:
        start_counting(vmm)
        vmm.wait_output(3)
        assert vmm.client.patch("/vm", json={"state": "Paused"}).status_code == 204
        r = vmm.client.put("/snapshot/create", json={"snapshot_path": str(tmp_path / "no" / "dir" / "s"),
                                                     "mem_file_path": str(tmp_path / "m")})
        assert r.status_code == 400 and "does not exist" in r.json()["fault_message"]
        assert vmm.client.get("/").json()["state"] == "Paused"
        held = vmm.output().count("\n")
        assert vmm.client.patch("/vm", json={"state": "Resumed"}).status_code == 204
        vmm.wait_output(held + 3)
        assert_continuous(counting(vmm.output()))
    finally:
        vmm.close()


def test_diff_snapshot_writes_only_dirty_pages_and_restores_over_the_full_one(tmp_path):
    vmm = VmmProcess(tmp_path, "vm")
    try:
        c = vmm.client
        r = c.put("/snapshot/create", json={"snapshot_path": "x", "mem_file_path": "y", "snapshot_type": "Diff"})
        assert r.status_code == 400
        start_counting(vmm, track_dirty_pages=True)
        vmm.wait_output(3)
        assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
        full_state, full_mem = snapshot(vmm, tmp_path, "full")
        assert c.patch("/vm", json={"state": "Resumed"}).status_code == 204
        vmm.wait_output(vmm.output().count("\n") + 3)
        assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
        diff_state, diff_mem = snapshot(vmm, tmp_path, "diff", "Diff")
        before = vmm.output()
    finally:
        vmm.close()
    import os
    full_size = os.path.getsize(full_mem)
    assert os.path.getsize(diff_mem) == full_size
    assert os.stat(diff_mem).st_blocks * 512 < full_size // 100     # a few pages, not the guest's RAM
    assert apply_diff(full_mem, diff_mem) > 0
    r = run_pykvm("run", "--restore", diff_state, "--mem-file", full_mem, "--timeout", "1")
    assert r.returncode == 124, r.stderr
    assert_continuous(counting(before + r.stdout.decode()))


def test_a_machine_with_virtio_devices_snapshots_and_restores_them(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    vmm = VmmProcess(tmp_path, "vm")
    try:
        drive = {"drive_id": "rootfs", "path_on_host": str(disk), "is_root_device": True}
        assert vmm.client.put("/drives/rootfs", json=drive).status_code == 204
        assert vmm.client.put("/entropy", json={}).status_code == 204
        start_counting(vmm)
        vmm.wait_output(2)
        assert vmm.client.patch("/vm", json={"state": "Paused"}).status_code == 204
        state, mem = snapshot(vmm, tmp_path, "vm")
        before = vmm.output()
    finally:
        vmm.close()
    body = read_state(state)
    assert body["virtio"]["drives"] == [[str(disk), False]] and body["virtio"]["rng"]
    assert sorted(k for k in body["devices"] if k.startswith("mmio:0xd0001")) == ["mmio:0xd0001000",
                                                                                 "mmio:0xd0001200"]
    r = run_pykvm("run", "--restore", state, "--mem-file", mem, "--timeout", "1")
    assert r.returncode == 124, r.stderr
    assert_continuous(counting(before + r.stdout.decode()))
    # The drive is re-opened from the path in the state: gone or changed in size, the restore is refused.
    disk.write_bytes(bytes(2 << 20))
    r = run_pykvm("run", "--restore", state, "--mem-file", mem)
    assert r.returncode == 2 and "changed since the snapshot" in r.stderr.decode(), r.stderr
    disk.unlink()
    r = run_pykvm("run", "--restore", state, "--mem-file", mem)
    err = r.stderr.decode()
    assert r.returncode == 2 and "cannot re-create" in err and str(disk) in err and "Traceback" not in err


def test_create_never_replaces_what_is_not_a_regular_file_nor_the_memory_it_runs_from(paused_snapshot, tmp_path):
    """A snapshot's files are written under a temporary name and renamed: aimed at a device node, a FIFO or
    a directory, that would replace it. Each is refused (400), as are one file for both, and the memory file
    a restored VM still reads its unwritten pages from; the VM stays paused and resumable."""
    import os
    import stat
    state, mem, before = paused_snapshot
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    vmm = VmmProcess(tmp_path, "second")
    try:
        r = vmm.client.put("/snapshot/load", json={"snapshot_path": state, "mem_file_path": mem})
        assert r.status_code == 204, r.text
        other = str(tmp_path / "other")
        for params, words in [({"snapshot_path": str(fifo), "mem_file_path": other}, "not a regular file"),
                              ({"snapshot_path": other, "mem_file_path": str(fifo)}, "not a regular file"),
                              ({"snapshot_path": str(tmp_path), "mem_file_path": other}, "not a regular file"),
                              ({"snapshot_path": other, "mem_file_path": other}, "same file"),
                              ({"snapshot_path": other, "mem_file_path": mem}, "restored from")]:
            r = vmm.client.put("/snapshot/create", json=params)
            assert r.status_code == 400 and words in r.json()["fault_message"], (params, r.text)
        assert stat.S_ISFIFO(fifo.stat().st_mode)
        assert vmm.client.get("/").json()["state"] == "Paused"
        assert vmm.client.patch("/vm", json={"state": "Resumed"}).status_code == 204
        vmm.wait_output(3)
        assert_continuous(counting(before + vmm.output()))
    finally:
        vmm.close()
