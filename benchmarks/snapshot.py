"""Snapshot figures through the per-VM API: pause/resume latency, CPU used while paused, full and diff snapshot
create time and sizes, restore time (load request to vCPUs running) in a fresh VMM process.

Every figure is taken over the API socket with httpx, as a client sees it, and beside a baseline from the same
run: the API's floor (GET / round trip) for pause/resume, and InstanceStart (a fresh boot request) for restore.

    python -m benchmarks.snapshot [--guest count|linux] [--mem 256] [--repeat 5] [--json]

``count`` is the bare-metal counting guest (guests/count.bin); ``linux`` our small kernel and initramfs
(make -C guests/linux), booted to its shell first. Run under the heavy lock on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COUNT = ROOT / "guests" / "count.bin"
LINUX = ROOT / "guests" / "linux" / "build"
MARKER = "pykvm-linux: init ready"
PAUSED_WINDOW = 2.0     # seconds over which a paused VMM's CPU time (utime + stime, /proc/PID/stat) is read


class Vmm:
    def __init__(self, tmp: Path, name: str) -> None:
        import httpx
        self.sock = tmp / f"{name}.sock"
        self.out = tmp / f"{name}.out"
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "pykvm", "vmm", "-q", "--api-sock", str(self.sock)],
                                         cwd=ROOT, stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        while not self.sock.exists():
            if self.proc.poll() is not None:
                raise SystemExit("pykvm vmm did not start")
            time.sleep(0.01)
        self.client = httpx.Client(transport=httpx.HTTPTransport(uds=str(self.sock)), base_url="http://localhost",
                                   timeout=600)

    def call(self, method: str, path: str, body=None) -> float:
        """Seconds for one request; exits if the API refused it."""
        t0 = time.perf_counter()
        r = self.client.request(method, path, json=body)
        dt = time.perf_counter() - t0
        if r.status_code >= 300:
            raise SystemExit(f"{method} {path}: {r.status_code} {r.text}")
        return dt

    def wait_for(self, text: str, limit: float = 300) -> None:
        deadline = time.monotonic() + limit
        while text not in self.out.read_text(errors="replace"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit(f"the guest never printed {text!r}")
            time.sleep(0.05)

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def boot(vmm: Vmm, guest: str, mem: int) -> None:
    vmm.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": mem, "track_dirty_pages": True})
    if guest == "count":
        vmm.call("PUT", "/boot-source", {"kernel_image_path": str(COUNT)})
    else:
        vmm.call("PUT", "/boot-source", {"kernel_image_path": str(LINUX / "vmlinux"),
                                         "initrd_path": str(LINUX / "initramfs.cpio"),
                                         "boot_args": "console=ttyS0 earlyprintk=ttyS0 panic=-1"})
    vmm.call("PUT", "/actions", {"action_type": "InstanceStart"})
    vmm.wait_for("\n5\n" if guest == "count" else MARKER)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def measure(guest: str, mem: int, repeat: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="pykvm-snapbench-"))
    out: dict = {"guest": guest, "mem_mib": mem}
    vmm = Vmm(tmp, "source")
    try:
        boot(vmm, guest, mem)
        floor = [vmm.call("GET", "/") for _ in range(50)]
        pauses, resumes = [], []
        for _ in range(50):
            pauses.append(vmm.call("PATCH", "/vm", {"state": "Paused"}))
            resumes.append(vmm.call("PATCH", "/vm", {"state": "Resumed"}))
        out["api_floor_ms"] = statistics.median(floor) * 1e3
        out["pause_ms"] = statistics.median(pauses) * 1e3
        out["resume_ms"] = statistics.median(resumes) * 1e3
        c0 = vmm.cpu_seconds()
        time.sleep(1)
        out["cpu_running_s_per_s"] = vmm.cpu_seconds() - c0
        vmm.call("PATCH", "/vm", {"state": "Paused"})
        c0 = vmm.cpu_seconds()           # vCPUs out of KVM_RUN and device threads parked (pykvm.devices.quiesce)
        time.sleep(PAUSED_WINDOW)
        out["cpu_paused_s_per_s"] = (vmm.cpu_seconds() - c0) / PAUSED_WINDOW
        full_state, full_mem = str(tmp / "full.state"), str(tmp / "full.mem")
        out["full_create_ms"] = vmm.call("PUT", "/snapshot/create", {"snapshot_path": full_state,
                                                                     "mem_file_path": full_mem}) * 1e3
        out["full_mem_bytes"] = os.path.getsize(full_mem)
        out["state_bytes"] = os.path.getsize(full_state)
        vmm.call("PATCH", "/vm", {"state": "Resumed"})
        time.sleep(1)
        vmm.call("PATCH", "/vm", {"state": "Paused"})
        diff_state, diff_mem = str(tmp / "diff.state"), str(tmp / "diff.mem")
        out["diff_create_ms"] = vmm.call("PUT", "/snapshot/create", {"snapshot_path": diff_state,
                                                                     "mem_file_path": diff_mem,
                                                                     "snapshot_type": "Diff"}) * 1e3
        out["diff_mem_allocated_bytes"] = allocated(diff_mem)
        out["dirty_pages_per_s"] = allocated(diff_mem) // 4096   # over ~1 s of running
    finally:
        vmm.close()
    loads, starts = [], []
    for i in range(repeat):
        fresh = Vmm(tmp, f"restore{i}")
        try:
            loads.append(fresh.call("PUT", "/snapshot/load", {
                "snapshot_path": full_state, "resume_vm": True,
                "mem_backend": {"backend_path": full_mem, "backend_type": "File"}}))
        finally:
            fresh.close()
        fresh = Vmm(tmp, f"boot{i}")
        try:
            fresh.call("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": mem})
            fresh.call("PUT", "/boot-source", {"kernel_image_path": str(COUNT)})
            starts.append(fresh.call("PUT", "/actions", {"action_type": "InstanceStart"}))
        finally:
            fresh.close()
    out["restore_ms"] = statistics.median(loads) * 1e3
    out["instance_start_ms"] = statistics.median(starts) * 1e3
    out["restore_vs_start"] = out["restore_ms"] / out["instance_start_ms"]
    for path in tmp.iterdir():
        path.unlink()
    tmp.rmdir()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guest", choices=["count", "linux"], default="count")
    parser.add_argument("--mem", type=int, default=256, help="guest RAM in MiB (default 256)")
    parser.add_argument("--repeat", type=int, default=5, help="fresh-process restores (and boots) to time")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.guest == "linux" and not (LINUX / "vmlinux").exists():
        print("our small Linux is not built: make -C guests/linux", file=sys.stderr)
        return 2
    result = measure(args.guest, args.mem, args.repeat)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"guest {result['guest']}, {result['mem_mib']} MiB")
    print(f"pause / resume (PATCH /vm)     {result['pause_ms']:8.2f} / {result['resume_ms']:.2f} ms   "
          f"(API floor GET / {result['api_floor_ms']:.2f} ms)")
    print(f"CPU while running / paused     {result['cpu_running_s_per_s']:8.2f} / {result['cpu_paused_s_per_s']:.2f} "
          "CPU-s per s")
    print(f"full snapshot create           {result['full_create_ms']:8.1f} ms   memory file "
          f"{result['full_mem_bytes'] >> 20} MiB, state {result['state_bytes']} bytes")
    print(f"diff snapshot create (1 s)     {result['diff_create_ms']:8.1f} ms   "
          f"{result['diff_mem_allocated_bytes'] >> 10} KiB written = {result['dirty_pages_per_s']} pages dirtied")
    print(f"restore (load request, fresh)  {result['restore_ms']:8.1f} ms   vs InstanceStart "
          f"{result['instance_start_ms']:.1f} ms: ratio {result['restore_vs_start']:.2f} (target restore <= 30 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
