"""The id in a resource's path and the one in its body must agree, for every such route (one rule,
pykvm.api.server._same_id): 400 naming both, and nothing recorded."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from pykvm.api.controller import Vmm  # noqa: E402
from pykvm.api.server import build_app  # noqa: E402


@pytest.fixture
def client():
    vmm = Vmm("ids")
    with TestClient(build_app(vmm)) as c:
        yield c
    vmm.shutdown()


@pytest.mark.parametrize("method, path, body, field", [
    ("PUT", "/drives/rootfs", {"drive_id": "other", "path_on_host": "/nonexistent", "is_read_only": True,
                               "is_root_device": True}, "drive_id"),
    ("PATCH", "/drives/rootfs", {"drive_id": "other", "path_on_host": "/nonexistent"}, "drive_id"),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth1", "host_dev_name": "tap0"}, "iface_id"),
])
def test_path_and_body_ids_must_agree(client, method, path, body, field):
    r = client.request(method, path, json=body)
    assert r.status_code == 400, r.text
    message = r.json()["fault_message"]
    assert message == f"the {field} in the body ({body[field]}) differs from the one in the path " \
                      f"({path.rsplit('/', 1)[1]})"
    config = client.get("/vm/config").json()
    assert config.get("drives", []) == [] and config.get("network-interfaces", []) == []


def test_a_vmm_that_does_not_finish_an_action_answers_503_not_400(monkeypatch):
    """The VMM's own slowness is not the request's fault: the controller's timeout is 503 (Service
    Unavailable) with a message, where it was 400."""
    import threading

    from pykvm.api.controller import ApiError, FlushMetrics
    gate = threading.Event()
    monkeypatch.setattr(Vmm, "_flush_metrics", lambda self, action: gate.wait(30))
    vmm = Vmm("slow")
    try:
        with pytest.raises(ApiError) as caught:
            vmm.submit(FlushMetrics(), timeout=0.2)
        assert caught.value.status == 503 and "did not finish FlushMetrics" in caught.value.message
    finally:
        gate.set()
        vmm.shutdown()
