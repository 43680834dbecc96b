"""The per-VM API (Firecracker's) over a Unix socket, through a real HTTP client (httpx): configuration, start,
pause/resume, errors a user can act on, pykvm's /pykvm additions."""

from __future__ import annotations

import json
import stat

import pytest
from api_helpers import VmmProcess, assert_continuous, counting, start_counting
from conftest import needs_kvm, run_pykvm

pytest.importorskip("httpx")


@pytest.fixture
def vmm(tmp_path):
    process = VmmProcess(tmp_path, "vmm")
    yield process
    process.close()


def fault(response) -> str:
    assert response.status_code == 400, response.text
    return response.json()["fault_message"]


def test_socket_is_owner_only_and_answers_instance_info(vmm):
    assert stat.S_IMODE(vmm.sock.stat().st_mode) == 0o600
    info = vmm.client.get("/").json()
    assert info == {"id": "anonymous-instance", "state": "Not started", "vmm_version": info["vmm_version"],
                    "app_name": "pykvm"}
    assert "firecracker_version" in vmm.client.get("/version").json()


def test_machine_config_put_patch_get(vmm):
    c = vmm.client
    assert c.put("/machine-config", json={"vcpu_count": 2, "mem_size_mib": 256}).status_code == 204
    assert c.patch("/machine-config", json={"mem_size_mib": 128}).status_code == 204
    got = c.get("/machine-config").json()
    assert (got["vcpu_count"], got["mem_size_mib"]) == (2, 128)
    assert c.get("/vm/config").json()["machine-config"]["mem_size_mib"] == 128


@pytest.mark.parametrize("body, words", [
    ({"vcpu_count": 1, "mem_size_mib": 64, "vcpus": 2}, ["unknown field", "vcpus"]),
    ({"vcpu_count": "1", "mem_size_mib": 64}, ["vcpu_count", "integer"]),
    ({"vcpu_count": 0, "mem_size_mib": 64}, ["vcpu_count", "greater than or equal to 1"]),
    ({"mem_size_mib": 64}, ["missing field", "vcpu_count"]),
])
def test_bad_bodies_name_the_field(vmm, body, words):
    message = fault(vmm.client.put("/machine-config", json=body))
    for word in words:
        assert word in message


def test_invalid_json_unknown_path_and_wrong_method(vmm):
    assert "not valid JSON" in fault(vmm.client.put("/machine-config", content=b'{"vcpu_count": 1'))
    assert "invalid request method and/or path" in fault(vmm.client.get("/no/such/thing"))
    assert "invalid request method and/or path" in fault(vmm.client.delete("/machine-config"))
    assert "too large" in fault(vmm.client.put("/logger", content=b"x" * (1 << 17)))


def test_wrong_state_calls_are_refused_with_what_to_do(vmm, tmp_path):
    c = vmm.client
    assert "PUT /boot-source" in fault(c.put("/actions", json={"action_type": "InstanceStart"}))
    assert "has not started" in fault(c.patch("/vm", json={"state": "Paused"}))
    assert "running microVM" in fault(c.put("/actions", json={"action_type": "SendCtrlAltDel"}))
    assert "PUT /metrics first" in fault(c.put("/actions", json={"action_type": "FlushMetrics"}))
    assert "action_type" in fault(c.put("/actions", json={"action_type": "Reboot"}))
    assert "paused" in fault(c.put("/snapshot/create", json={"snapshot_path": str(tmp_path / "s"),
                                                            "mem_file_path": str(tmp_path / "m")}))
    assert "No such file" in fault(c.put("/boot-source", json={"kernel_image_path": str(tmp_path / "none")}))
    assert c.get("/").json()["state"] == "Not started"


def test_drives_entropy_logger_metrics_are_recorded(vmm, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    c = vmm.client
    drive = {"drive_id": "rootfs", "path_on_host": str(disk), "is_root_device": True, "is_read_only": True}
    assert c.put("/drives/rootfs", json=drive).status_code == 204
    assert "differs" in fault(c.put("/drives/other", json=drive))
    other = dict(drive, drive_id="second")
    assert "root device" in fault(c.put("/drives/second", json=other))
    assert c.put("/entropy", json={}).status_code == 204
    assert c.put("/logger", json={"log_path": str(tmp_path / "log")}).status_code == 204
    assert c.put("/metrics", json={"metrics_path": str(tmp_path / "metrics")}).status_code == 204
    config = c.get("/vm/config").json()
    assert config["drives"] == [drive]
    assert config["entropy"] == {} and config["metrics"] == {"metrics_path": str(tmp_path / "metrics")}


@needs_kvm
def test_start_pause_resume_stats_console(vmm, tmp_path):
    c = vmm.client
    assert c.put("/metrics", json={"metrics_path": str(tmp_path / "metrics")}).status_code == 204
    start_counting(vmm)
    vmm.wait_output(3)
    assert c.get("/").json()["state"] == "Running"
    assert "before the microVM starts" in fault(c.put("/boot-source", json={"kernel_image_path": "/x"}))
    assert "before the microVM starts" in fault(c.put("/actions", json={"action_type": "InstanceStart"}))
    assert "paused" in fault(c.put("/snapshot/create", json={"snapshot_path": str(tmp_path / "s"),
                                                            "mem_file_path": str(tmp_path / "m")}))
    assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
    assert c.get("/").json()["state"] == "Paused"
    held = vmm.output()
    console = c.get("/pykvm/console").content.decode()
    assert console == held                       # nothing is printed while paused
    stats = c.get("/pykvm/stats").json()
    assert stats["reasons"]["IO"]["count"] > 0
    assert c.put("/actions", json={"action_type": "FlushMetrics"}).status_code == 204
    assert json.loads((tmp_path / "metrics").read_text().splitlines()[-1])["state"] == "Paused"
    assert c.get("/pykvm/console").content.decode() == held
    assert c.patch("/vm", json={"state": "Resumed"}).status_code == 204
    assert c.put("/actions", json={"action_type": "SendCtrlAltDel"}).status_code == 204
    vmm.wait_output(held.count("\n") + 3)
    assert_continuous(counting(vmm.output()))


@needs_kvm
def test_config_file_boots_the_same_vm(tmp_path):
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": "guests/count.bin"},
                                  "machine-config": {"vcpu_count": 1, "mem_size_mib": 32}}))
    r = run_pykvm("run", "--config-file", str(config), "--timeout", "1")
    assert r.returncode == 124, r.stderr
    assert_continuous(counting(r.stdout.decode()))


def test_bad_config_file_is_one_clear_error(tmp_path):
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": "x"}, "machine-config": {"vcpu_count": 1}}))
    r = run_pykvm("run", "--config-file", str(config))
    assert r.returncode == 2
    assert b"mem_size_mib" in r.stderr and b"Traceback" not in r.stderr


@needs_kvm
def test_a_thousand_pause_resume_cycles_lose_and_repeat_nothing(vmm):
    start_counting(vmm)
    vmm.wait_output(2)
    c = vmm.client
    for _ in range(1000):
        assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
        assert c.patch("/vm", json={"state": "Resumed"}).status_code == 204
    vmm.wait_output(vmm.output().count("\n") + 3)
    assert c.get("/").json()["state"] == "Running"
    assert_continuous(counting(vmm.output()))


@needs_kvm
def test_run_with_api_sock_serves_the_running_guest(tmp_path):
    import subprocess
    import sys
    import time

    import httpx
    from api_helpers import COUNT_GUEST, ROOT
    sock = tmp_path / "run.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", str(COUNT_GUEST), "--api-sock", str(sock),
                             "--timeout", "60"], cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.02)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock)), base_url="http://localhost") as c:
            assert c.get("/").json()["state"] == "Running"
            assert "before the microVM starts" in fault(c.put("/machine-config", json={"vcpu_count": 1,
                                                                                      "mem_size_mib": 64}))
            assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
            assert c.get("/").json()["state"] == "Paused"
            assert c.patch("/vm", json={"state": "Resumed"}).status_code == 204
            assert c.get("/pykvm/stats").json()["reasons"]["IO"]["count"] > 0
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert not sock.exists()                     # the socket goes with the VMM
    assert_continuous(counting(out.decode()))


@pytest.mark.parametrize("args, words", [
    (["--restore", "vm.state"], b"--mem-file MEM"),
    (["--mem-file", "vm.mem"], b"goes with --restore"),
    (["--restore", "vm.state", "--mem-file", "m", "--config-file", "c"], b"not both"),
    (["hello-long64", "--config-file", "c"], b"leave out the guest image"),
])
def test_snapshot_and_config_options_misused(args, words):
    r = run_pykvm("run", *args)
    assert r.returncode == 2 and words in r.stderr and b"Traceback" not in r.stderr


def test_network_interfaces_are_validated_and_listed(vmm, tmp_path):
    """PUT /network-interfaces/{iface_id} (Firecracker's names): a bad body is a 400 naming what is
    wrong; a good one is listed by GET /vm/config; a TAP that does not exist fails InstanceStart with
    400, and the VMM stays unstarted."""
    c = vmm.client
    url = "/network-interfaces/eth0"
    assert "differs" in fault(c.put(url, json={"iface_id": "eth1", "host_dev_name": "tap0"}))
    assert "multicast" in fault(c.put(url, json={"iface_id": "eth0", "host_dev_name": "tap0",
                                                 "guest_mac": "01:00:00:00:00:01"}))
    assert "all zeros" in fault(c.put(url, json={"iface_id": "eth0", "host_dev_name": "tap0",
                                                 "guest_mac": "00:00:00:00:00:00"}))
    assert "not a network interface name" in fault(c.put(url, json={"iface_id": "eth0", "host_dev_name": "a/b"}))
    assert "rx_rate_limiter" in fault(c.put(url, json={"iface_id": "eth0", "host_dev_name": "tap0",
                                                       "rx_rate_limiter": {}}))
    good = {"iface_id": "eth0", "host_dev_name": "pykvmnosuch0", "guest_mac": "02:00:00:00:00:05"}
    assert c.put(url, json=good).status_code == 204
    assert "already" in fault(c.put("/network-interfaces/eth1", json={**good, "iface_id": "eth1"}))
    assert c.get("/vm/config").json()["network-interfaces"] == [good]
    assert c.put("/boot-source", json={"kernel_image_path": str(tmp_path.parent / "missing")}).status_code == 400
    from api_helpers import COUNT_GUEST
    assert c.put("/boot-source", json={"kernel_image_path": str(COUNT_GUEST)}).status_code == 204
    assert "pykvmnosuch0" in fault(c.put("/actions", json={"action_type": "InstanceStart"}))
    assert c.get("/").json()["state"] == "Not started"


@needs_kvm
def test_patch_drive_after_start_swaps_the_backing_file(vmm, tmp_path):
    """Firecracker's PATCH /drives/{drive_id} after InstanceStart: the running virtio-blk takes the new image
    (the device's side, config space and interrupt, is in tests/test_blk_swap.py); a missing file, a path that
    is not a regular file and an unknown drive are refused with 400 and change nothing."""
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    first.write_bytes(bytes(4096))
    second.write_bytes(bytes(8192))
    c = vmm.client
    drive = {"drive_id": "data", "path_on_host": str(first), "is_root_device": False, "is_read_only": False}
    assert c.put("/drives/data", json=drive).status_code == 204
    start_counting(vmm)
    vmm.wait_output(2)
    assert "before the microVM starts" in fault(c.put("/drives/data", json=drive))
    assert "No such file" in fault(c.patch("/drives/data", json={"drive_id": "data",
                                                                 "path_on_host": str(tmp_path / "gone.img")}))
    assert "not a regular file" in fault(c.patch("/drives/data", json={"drive_id": "data",
                                                                       "path_on_host": str(tmp_path)}))
    assert "no drive" in fault(c.patch("/drives/other", json={"drive_id": "other", "path_on_host": str(second)}))
    assert c.get("/vm/config").json()["drives"][0]["path_on_host"] == str(first)
    r = c.patch("/drives/data", json={"drive_id": "data", "path_on_host": str(second)})
    assert r.status_code == 204, r.text
    assert c.get("/vm/config").json()["drives"] == [dict(drive, path_on_host=str(second))]
    assert c.patch("/vm", json={"state": "Paused"}).status_code == 204     # paused: allowed too
    r = c.patch("/drives/data", json={"drive_id": "data", "path_on_host": str(first)})
    assert r.status_code == 204, r.text
    assert c.patch("/vm", json={"state": "Resumed"}).status_code == 204
    assert c.get("/vm/config").json()["drives"][0]["path_on_host"] == str(first)
    assert_continuous(counting(vmm.wait_output(4)))


@needs_kvm
def test_a_restored_vms_drives_keep_their_api_names_and_can_be_patched(vmm, tmp_path):
    disk, other = tmp_path / "disk.img", tmp_path / "other.img"
    disk.write_bytes(bytes(4096))
    other.write_bytes(bytes(8192))
    c = vmm.client
    drive = {"drive_id": "data", "path_on_host": str(disk), "is_root_device": False, "is_read_only": False}
    assert c.put("/drives/data", json=drive).status_code == 204
    start_counting(vmm)
    vmm.wait_output(2)
    assert c.patch("/vm", json={"state": "Paused"}).status_code == 204
    r = c.put("/snapshot/create", json={"snapshot_path": str(tmp_path / "s"), "mem_file_path": str(tmp_path / "m")})
    assert r.status_code == 204, r.text
    fresh = VmmProcess(tmp_path, "fresh")
    try:
        r = fresh.client.put("/snapshot/load", json={"snapshot_path": str(tmp_path / "s"),
                                                     "mem_file_path": str(tmp_path / "m"), "resume_vm": True})
        assert r.status_code == 204, r.text
        assert fresh.client.get("/vm/config").json()["drives"] == [drive]
        r = fresh.client.patch("/drives/data", json={"drive_id": "data", "path_on_host": str(other)})
        assert r.status_code == 204, r.text
        assert fresh.client.get("/vm/config").json()["drives"] == [dict(drive, path_on_host=str(other))]
    finally:
        fresh.close()


def test_logger_and_metrics_on_a_fifo_nobody_reads_do_not_wedge_the_vmm(vmm, tmp_path):
    """Firecracker's logger takes a named pipe: one with no reader is refused at once, and the VMM answers
    the next call (open(2) for writing used to block the controller, so every later action timed out)."""
    import os
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    c = vmm.client
    assert "nobody reads" in fault(c.put("/logger", json={"log_path": str(fifo)}))
    assert "nobody reads" in fault(c.put("/metrics", json={"metrics_path": str(fifo)}))
    assert c.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 64}).status_code == 204
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)     # with a reader the pipe is taken, as a file is
    try:
        assert c.put("/metrics", json={"metrics_path": str(fifo)}).status_code == 204
        assert c.put("/actions", json={"action_type": "FlushMetrics"}).status_code == 204
        assert b'"state": "Not started"' in os.read(reader, 65536)
    finally:
        os.close(reader)


def test_snapshot_load_from_a_fifo_is_refused_not_waited_on(vmm, tmp_path):
    """PUT /snapshot/load naming a named pipe nobody writes: refused at once as not a regular file (open(2) for
    reading waited for a writer, wedging the controller: that call and every later one timed out)."""
    import os
    fifo = tmp_path / "state.fifo"
    os.mkfifo(fifo)
    mem = tmp_path / "mem"
    mem.write_bytes(bytes(4096))
    c = vmm.client
    body = {"snapshot_path": str(fifo), "mem_backend": {"backend_path": str(mem), "backend_type": "File"}}
    assert "not a regular file" in fault(c.put("/snapshot/load", json=body))
    assert c.put("/machine-config", json={"vcpu_count": 1, "mem_size_mib": 64}).status_code == 204


def test_a_lazy_api_server_that_cannot_start_refuses_its_clients(tmp_path, monkeypatch):
    """An engine VMM's API server starts on its first connection (ApiServer, lazy). Should that start fail (no
    thread or descriptor left, as in a jail at its limits), the waiting client and the next ones are refused,
    never left waiting in the socket's backlog."""
    import errno
    import socket

    from pykvm.api import server
    monkeypatch.setattr(server, "_prebuilt", None)     # restored afterwards: the warm-up below changes both
    monkeypatch.setattr(server, "_warmed", False)
    server.prebuild_app()
    server.warm_up_prebuilt()

    def no_vmm():
        raise OSError(errno.EMFILE, "Too many open files")
    path = str(tmp_path / "api.sock")
    with server.ApiServer(no_vmm, path, lazy=True) as api:
        assert api._lazy
        with socket.socket(socket.AF_UNIX) as first:
            first.settimeout(30)        # (a failure, not a hang, if the client is left waiting)
            first.connect(path)
            first.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert first.recv(4096) == b""
            except ConnectionResetError:
                pass
        with socket.socket(socket.AF_UNIX) as second, pytest.raises(ConnectionRefusedError):
            second.connect(path)
