"""Helpers for the API tests: a `pykvm vmm` process on a Unix socket, and an httpx client over that socket."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COUNT_GUEST = ROOT / "guests" / "count.bin"


class VmmProcess:
    """`python -m pykvm vmm --api-sock SOCK` with stdout to a file; stopped (SIGKILL if need be) by close()."""

    def __init__(self, tmp: Path, name: str, *extra: str) -> None:
        self.sock = tmp / f"{name}.sock"
        self.out_path = tmp / f"{name}.out"
        self.err_path = tmp / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "pykvm", "vmm", "--api-sock", str(self.sock), *extra],
                                         cwd=ROOT, stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"pykvm vmm did not create its socket: {self.err_path.read_text()}")
            time.sleep(0.02)
        import httpx
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)), base_url="http://localhost",
                                   timeout=30)

    def output(self) -> str:
        return self.out_path.read_text()

    def wait_output(self, count: int, timeout: float = 30) -> str:
        """Wait until the guest has printed at least ``count`` lines."""
        deadline = time.monotonic() + timeout
        while self.output().count("\n") < count:
            assert time.monotonic() < deadline, f"the guest printed only {self.output()!r}"
            assert self.proc.poll() is None, f"pykvm vmm ended: {self.err_path.read_text()}"
            time.sleep(0.02)
        return self.output()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def close(self) -> None:
        if hasattr(self, "client"):
            self.client.close()
        self.kill()
        if self.sock.exists():
            os.unlink(self.sock)


def counting(text: str) -> list[int]:
    """The numbers of the counting guest's output (only complete lines)."""
    return [int(x) for x in text.split("\n")[:-1]]


def assert_continuous(numbers: list[int]) -> None:
    assert numbers, "the guest printed nothing"
    assert numbers == list(range(1, len(numbers) + 1)), f"gap or repeat in {numbers}"


def start_counting(vmm: VmmProcess, **machine) -> None:
    c = vmm.client
    config = {"vcpu_count": 1, "mem_size_mib": 64, **machine}
    assert c.put("/machine-config", json=config).status_code == 204
    assert c.put("/boot-source", json={"kernel_image_path": str(COUNT_GUEST)}).status_code == 204
    r = c.put("/actions", json={"action_type": "InstanceStart"})
    assert r.status_code == 204, r.text
