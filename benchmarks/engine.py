"""The engine under load (issue 12, part 5): ``ps`` under concurrent clients, create+start to the guest's
first instruction, per-VM host memory, and N small Linux guests at once, each answering through attach.

One daemon on a temporary socket and state directory (never /run/pykvm), with its default VMMs (jailed
when run as root), then:

- **ps under load**: ``clients`` (default 20) client processes, one httpx.Client each over the
  daemon's Unix socket (one keep-alive connection), started and warmed up before the clock runs,
  share ``requests`` (default 2,000) calls of ``GET /vms/json?all=1`` with ``vms`` VMs recorded; each
  request timed in its client from the call until httpx returned the whole response; p50/p99 over
  all. Baseline in the same run: the same load on ``GET /_ping``. For comparison, the same loads
  with the 20 clients as asyncio tasks in this one process (``oneproc_*``: httpx's CPU saturates that
  one process, so its latencies include the client's own queueing) and with bare keep-alive sockets
  (``raw_*``: no HTTP library, the daemon's floor).
- **create+start to the first instruction**: ``POST /vms/create`` + ``POST /vms/{id}/start`` of a flat
  guest whose first instruction writes one byte to COM1 (then it ends through debug-exit). What is
  measured: from just before the create request to the host time the shim stamped on the console
  record holding that byte (its read of the VMM's output pipe): the first instruction's moment plus
  one port-I/O exit, the VMM's output thread and one pipe hop, so an upper bound of the guest's
  first instruction (the first instruction is that ``out``). Median of ``starts``. Also
  the create+start API calls alone (until start returns). Baseline: ``python -m pykvm run -q`` of the
  same guest, a fresh interpreter, until it exits.
- **N Linux guests** (``--linux``, default 20; 0 skips): the project's small Linux (guests/linux,
  ``make -C guests/linux``) started through the API, each waited for at its shell, then each sent
  ``echo $((7000+K))`` through ``POST /vms/{id}/attach`` and its answer read back through the same
  connection. Per-VM host memory then, all N idle at the shell: the unique set size (USS: Private_Clean
  + Private_Dirty of /proc/PID/smaps_rollup) summed over the VM's processes (the shim and every
  descendant: the VMM; a jailed VMM's shim is also its jail's supervisor), and that minus the
  private pages of guest RAM (the VMM's anonymous mapping of exactly the guest's RAM size, from
  /proc/PID/smaps): "beyond guest RAM". Pages shared copy-on-write with the zygote are not in USS
  (nor are pages the shim and its VMM still share with each other: ``linux_vm_private_pages_*``, as
  root, counts those too, once, from /proc/PID/pagemap and /proc/kpagecount); the zygote's own USS is
  printed once (it is paid once per host, not per VM).

    python -m benchmarks.engine [--clients 20] [--requests 2000] [--vms 20] [--starts 9] [--linux 20] [--json]

Run it under ``flock /tmp/pykvm-heavy.lock`` on a shared machine. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import assemble  # noqa: E402
from engine_helpers import Daemon  # noqa: E402

LINUX = ROOT / "guests" / "linux" / "build"
FIRST_OUT_GUEST = """
    mov $0x3f8, %dx
    mov $'!', %al
    out %al, %dx
    mov $0xf4, %dx
    xor %al, %al
    out %al, %dx
"""


# --- ps under load ---------------------------------------------------------------------------------
async def _load(socket_path: Path, path: str, clients: int, requests: int) -> list[float]:
    import httpx
    times: list[float] = []
    per = requests // clients

    async def worker():
        transport = httpx.AsyncHTTPTransport(uds=str(socket_path))
        async with httpx.AsyncClient(transport=transport, base_url="http://pykvm", timeout=60) as c:
            for _ in range(per):
                t0 = time.perf_counter()
                r = await c.get(path)
                times.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text

    await asyncio.gather(*(worker() for _ in range(clients)))
    return times


async def _load_raw(socket_path: Path, path: str, clients: int, requests: int) -> list[float]:
    """As :func:`_load` with the cheapest possible client: one keep-alive connection per client, the
    request's bytes written and the answer read by its Content-Length (the daemon is the one measured)."""
    times: list[float] = []
    per = requests // clients
    request = f"GET {path} HTTP/1.1\r\nHost: pykvm\r\n\r\n".encode()

    async def worker():
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            for _ in range(per):
                t0 = time.perf_counter()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:"))
                await reader.readexactly(length)
                times.append(time.perf_counter() - t0)
                assert head.startswith(b"HTTP/1.1 200 "), head
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return times


def load(daemon: Daemon, path: str, clients: int, requests: int, raw: bool = False) -> list[float]:
    """Seconds per request of ``requests`` GETs of ``path`` spread over ``clients`` concurrent clients
    in this process (httpx.AsyncClient each, or with ``raw`` the bare-socket client of :func:`_load_raw`)."""
    return asyncio.run((_load_raw if raw else _load)(daemon.socket, path, clients, requests))


def _client_process(socket_path: str, path: str, count: int, ready, go, results) -> None:
    """One client process: an httpx.Client on the daemon's socket (one keep-alive connection), two
    warm-up requests, then -- once every client is ready -- ``count`` GETs of ``path`` one after the
    other, each timed from before the call until httpx returned the whole response."""
    import httpx
    times = []
    with httpx.Client(transport=httpx.HTTPTransport(uds=socket_path), base_url="http://pykvm", timeout=60) as c:
        for _ in range(2):
            c.get(path).raise_for_status()
        ready.release()
        go.wait()
        for _ in range(count):
            t0 = time.perf_counter()
            r = c.get(path)
            times.append(time.perf_counter() - t0)
            if r.status_code != 200:
                times.append(float("nan"))
                break
    results.put(times)


def load_processes(daemon: Daemon, path: str, clients: int, requests: int) -> list[float]:
    """Seconds per request of ``requests`` GETs of ``path`` spread over ``clients`` client processes
    (:func:`_client_process`, started and warmed up before the clock runs). Each process has its own
    interpreter and GIL, so no client waits for another client's Python code: what a request waits
    for is the daemon and the CPU the clients and the daemon share. ValueError if a request failed."""
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    per = requests // clients
    procs = [ctx.Process(target=_client_process, args=(str(daemon.socket), path, per, ready, go, results))
             for _ in range(clients)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            if not ready.acquire(timeout=120):
                raise RuntimeError("a client process did not start")
        go.set()
        times = [t for _ in procs for t in results.get(timeout=300)]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    if any(t != t for t in times):
        raise ValueError(f"a GET {path} failed")
    return times


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


# --- memory ----------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
        except OSError:
            pass
    return out


def tree(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    todo, seen = [pid], []
    while todo:
        p = todo.pop()
        seen.append(p)
        todo += _children(p)
    return seen


def uss(pid: int) -> int:
    """Private_Clean + Private_Dirty of /proc/PID/smaps_rollup, bytes (0 if it is gone)."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("Private_Clean", "Private_Dirty"):
                total += int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return total


def guest_ram_private(pid: int, size: int) -> int:
    """Private bytes of ``pid``'s anonymous mappings of exactly ``size`` bytes (the guest's RAM)."""
    total, inside = 0, False
    try:
        text = Path(f"/proc/{pid}/smaps").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        head = line.split()
        if "-" in head[0] and ":" not in head[0]:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            inside = hi - lo == size and len(head) < 6
        elif inside and head[0] in ("Private_Clean:", "Private_Dirty:"):
            total += int(head[1]) * 1024
    return total


def tree_private(pids: list[int], guest_ram: int) -> int | None:
    """Bytes of the pages that ``pids`` map and no other process does, each page counted once, guest RAM (the
    anonymous mappings of exactly ``guest_ram`` bytes) left out. Unlike a sum of USS, this counts the pages a
    shim and its VMM share with each other only (copied by the shim before it forked the VMM). From
    /proc/PID/pagemap (the page frame of each present page) and /proc/kpagecount (how many mappings each frame
    has); None where those give no frame numbers (they need root)."""
    from collections import Counter
    frames: Counter[int] = Counter()
    for pid in pids:
        try:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            pagemap = open(f"/proc/{pid}/pagemap", "rb")
        except OSError:
            continue
        with pagemap:
            for line in maps:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if (hi - lo == guest_ram and len(fields) < 6) or fields[-1] == "[vsyscall]":
                    continue
                try:
                    pagemap.seek((lo >> 12) * 8)
                    data = pagemap.read(((hi - lo) >> 12) * 8)
                except OSError:
                    continue
                for entry in struct.unpack(f"{len(data) // 8}Q", data):
                    if entry >> 63:                 # present in RAM
                        frames[entry & ((1 << 55) - 1)] += 1
    if not frames or set(frames) == {0}:
        return None
    private = 0
    with open("/proc/kpagecount", "rb") as counts:
        for frame, mapped_here in frames.items():
            counts.seek(frame * 8)
            if struct.unpack("Q", counts.read(8))[0] == mapped_here:
                private += 4096
    return private


def vm_memory(shim_pid: int, guest_ram: int) -> tuple[int, int, int]:
    """(USS of all the VM's processes, of that the private guest RAM, number of processes)."""
    pids = tree(shim_pid)
    total = sum(uss(p) for p in pids)
    ram = sum(guest_ram_private(p, guest_ram) for p in pids)
    return total, ram, len(pids)


# --- attach ----------------------------------------------------------------------------------------
async def attach_answer(socket_path: Path, vm: str, command: str, answer: str, timeout: float) -> float:
    """Type ``command`` into ``vm``'s console through ``POST /vms/{vm}/attach`` (chunked body) and read the
    streamed (chunked) response until ``answer`` appears; seconds it took. TimeoutError if it does not."""
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    try:
        writer.write(f"POST /vms/{vm}/attach HTTP/1.1\r\nHost: pykvm\r\nTransfer-Encoding: chunked\r\n"
                     "Content-Type: application/octet-stream\r\n\r\n".encode())
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        if b" 200 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(f"attach to {vm} answered {head[:200]!r}")
        body = command.encode()
        t0 = time.perf_counter()
        writer.write(b"%x\r\n%s\r\n" % (len(body), body))
        await writer.drain()
        seen = b""
        deadline = time.monotonic() + timeout
        while answer.encode() not in seen:
            size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), max(0.1, deadline - time.monotonic()))
            size = int(size_line.strip() or b"0", 16)
            if size == 0:
                raise RuntimeError(f"{vm}'s console ended before answering")
            seen += (await reader.readexactly(size + 2))[:-2]
        return time.perf_counter() - t0
    finally:
        writer.close()


def console_text(daemon: Daemon, vm: str) -> str:
    path = vmdir_of(daemon, vm) / "console.log"
    try:
        return "".join(json.loads(line)["d"] for line in path.read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return ""


def vmdir_of(daemon: Daemon, vm: str) -> Path:
    return daemon.state / "vms" / vm[:16]


def first_output_time(daemon: Daemon, vm: str, timeout: float = 30) -> float:
    """The host time the shim stamped on ``vm``'s first console record."""
    path = vmdir_of(daemon, vm) / "console.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = path.read_text().split("\n", 1)[0]
            if line:
                return float(json.loads(line)["t"])
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    raise TimeoutError(f"{vm} printed nothing within {timeout} s")


def zygote_uss(daemon: Daemon) -> int:
    try:
        return uss(int((daemon.state / "zygote.pid").read_text()))
    except (OSError, ValueError):
        return 0


def linux_guests(daemon: Daemon, n: int, mem_mib: int, boot_wait: float) -> dict:
    """Start ``n`` Linux guests, wait for each shell, measure memory, answer through attach, remove them."""
    out: dict = {}
    kernel, initrd = LINUX / "vmlinux", LINUX / "initramfs.cpio"
    ids = []
    with daemon.http() as c:
        t0 = time.perf_counter()
        for k in range(n):
            r = c.post("/vms/create", params={"name": f"linux{k}"},
                       json={"Kernel": str(kernel), "Initrd": str(initrd), "Cmdline": "console=ttyS0",
                             "MemoryMiB": mem_mib})
            assert r.status_code == 201, r.text
            ids.append(r.json()["Id"])
            assert c.post(f"/vms/{ids[-1]}/start").status_code == 204
        out["linux_start_all_s"] = time.perf_counter() - t0
        deadline = time.monotonic() + boot_wait
        waiting = set(ids)
        while waiting and time.monotonic() < deadline:
            waiting = {v for v in waiting if "pykvm-linux: init ready" not in console_text(daemon, v)}
            print(f"\r{n - len(waiting)}/{n} at the shell after {time.perf_counter() - t0:.0f} s", end="",
                  file=sys.stderr, flush=True)
            time.sleep(0.5)
        print(file=sys.stderr)
        out["linux_at_shell"] = n - len(waiting)
        out["linux_all_at_shell_s"] = time.perf_counter() - t0
        ids = [v for v in ids if v not in waiting]      # measure those that came up (the count says how many)
        time.sleep(2)      # let the shells settle to idle before measuring
        per_vm, beyond, nprocs, whole = [], [], [], []
        for v in ids:
            shim = c.get(f"/vms/{v}/json").json()["State"]["ShimPid"]
            total, ram, count = vm_memory(shim, mem_mib << 20)
            per_vm.append(total)
            beyond.append(total - ram)
            nprocs.append(count)
            whole.append(tree_private(tree(shim), mem_mib << 20))
        out["linux_running"] = sum(1 for vm in c.get("/vms/json").json() if vm["State"] == "running")

    async def all_answer():
        return await asyncio.gather(*(attach_answer(daemon.socket, v, f"echo $((7000+{k}))x\n", f"{7000 + k}x", 120)
                                      for k, v in enumerate(ids)))
    answers = asyncio.run(all_answer())
    out["linux_answered_attach"] = len(answers)
    out["linux_attach_answer_median_ms"] = statistics.median(answers) * 1e3
    out["linux_vm_uss_median_mib"] = statistics.median(per_vm) / 2**20
    out["linux_vm_uss_beyond_guest_ram_median_mib"] = statistics.median(beyond) / 2**20
    out["linux_vm_uss_beyond_guest_ram_max_mib"] = max(beyond) / 2**20
    out["linux_vm_processes"] = statistics.median(nprocs)
    if None not in whole:       # (root only) the same, with the pages the VM's processes share only with each other
        out["linux_vm_private_pages_beyond_guest_ram_median_mib"] = statistics.median(whole) / 2**20
    with daemon.http() as c:
        for vm in c.get("/vms/json").json():
            c.delete(f"/vms/{vm['Id']}", params={"force": "1"})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--starts", type=int, default=9)
    ap.add_argument("--linux", type=int, default=20, help="Linux guests at once (0: skip)")
    ap.add_argument("--linux-mem", type=int, default=64, help="MiB of RAM per Linux guest")
    ap.add_argument("--boot-wait", type=float, default=600, help="seconds all Linux guests may take to boot")
    ap.add_argument("--daemon-arg", action="append", default=[], help="an extra `pykvm daemon` option")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.linux and not (LINUX / "vmlinux").exists():
        ap.error("the small Linux is not built: make -C guests/linux (or --linux 0)")
    tmp = Path(tempfile.mkdtemp(prefix="pkb"))
    guest = tmp / "first-out.bin"
    guest.write_bytes(assemble(FIRST_OUT_GUEST, 64, tmp))
    guest.chmod(0o644)
    os.chmod(tmp, 0o755)
    d = Daemon(*args.daemon_arg)
    d.start()
    out: dict = {"jailed": os.geteuid() == 0 and "--no-jail" not in args.daemon_arg}
    try:
        with d.http() as c:
            for n in range(args.vms):
                c.post("/vms/create", params={"name": f"bench{n}"}, json={"Image": "hello-long64"})
        load(d, "/_ping", args.clients, 200)      # warm up
        # The figure: 20 client processes, httpx each (see load_processes)
        ping = load_processes(d, "/_ping", args.clients, args.requests)
        ps = load_processes(d, "/vms/json?all=1", args.clients, args.requests)
        out["ping_p50_ms"], out["ping_p99_ms"] = pct(ping, 50) * 1e3, pct(ping, 99) * 1e3
        out["ps_p50_ms"], out["ps_p99_ms"] = pct(ps, 50) * 1e3, pct(ps, 99) * 1e3
        out["ps_p99_ratio_vs_ping"] = out["ps_p99_ms"] / out["ping_p99_ms"]
        # For comparison: the same clients as asyncio tasks in this one process; httpx's own CPU saturates
        # it, so these latencies measure the client process's queueing as much as the daemon
        ping = load(d, "/_ping", args.clients, args.requests)
        ps = load(d, "/vms/json?all=1", args.clients, args.requests)
        out["oneproc_ping_p99_ms"], out["oneproc_ps_p99_ms"] = pct(ping, 99) * 1e3, pct(ps, 99) * 1e3
        # and with bare sockets (no HTTP library at all): the daemon's floor
        ping = load(d, "/_ping", args.clients, args.requests, raw=True)
        ps = load(d, "/vms/json?all=1", args.clients, args.requests, raw=True)
        out["raw_ping_p50_ms"], out["raw_ping_p99_ms"] = pct(ping, 50) * 1e3, pct(ping, 99) * 1e3
        out["raw_ps_p50_ms"], out["raw_ps_p99_ms"] = pct(ps, 50) * 1e3, pct(ps, 99) * 1e3
        first, api, direct = [], [], []
        with d.http() as c:
            for n in range(args.starts):
                t0 = time.time()
                p0 = time.perf_counter()
                r = c.post("/vms/create", params={"name": f"start{n}"}, json={"ImageFile": str(guest)})
                assert r.status_code == 201, r.text
                vm = r.json()["Id"]
                r = c.post(f"/vms/{vm}/start")
                assert r.status_code == 204, r.text
                api.append(time.perf_counter() - p0)
                first.append(first_output_time(d, vm) - t0)
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "pykvm", "run", "-q", str(guest)], capture_output=True)
                direct.append(time.perf_counter() - t0)
        out["create_start_to_first_output_median_ms"] = statistics.median(first) * 1e3
        out["create_start_api_median_ms"] = statistics.median(api) * 1e3
        out["direct_run_median_ms"] = statistics.median(direct) * 1e3
        out["first_output_ratio_vs_direct_run"] = out["create_start_to_first_output_median_ms"] / out[
            "direct_run_median_ms"]
        if args.linux:
            out.update(linux_guests(d, args.linux, args.linux_mem, args.boot_wait))
        out["zygote_uss_mib"] = zygote_uss(d) / 2**20
        out.update(clients=args.clients, requests=args.requests, vms=args.vms, starts=args.starts, linux=args.linux)
    finally:
        d.close()
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:<44} {value:.2f}" if isinstance(value, float) else f"{key:<44} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
