"""The engine under load: ``pykvm ps``'s API call under concurrent clients, and create+start.

One daemon on a temporary socket and state directory (never /run/pykvm), then:

- **ps under load**: ``clients`` threads (default 20) share ``requests`` (default 2,000) calls of
  ``GET /vms/json?all=1`` with ``vms`` VMs recorded; per-request latency p50/p99. Baseline in the same run:
  the same load on ``GET /_ping`` (the server and HTTP stack alone), so the ratio is what the store and
  handler add.
- **create+start**: ``POST /vms/create`` + ``POST /vms/{id}/start`` of the bundled ``hello-long64`` guest,
  until start returns (the VMM process is running and its API socket is up), median of ``starts`` runs.
  Baseline: launching ``python -m pykvm run hello-long64`` directly until it exits.

    python -m benchmarks.engine [--clients 20] [--requests 2000] [--vms 20] [--starts 5] [--json]

Run it under ``flock /tmp/pykvm-heavy.lock`` on a shared machine. Everything it starts, it stops.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from engine_helpers import Daemon  # noqa: E402


def load(daemon: Daemon, path: str, clients: int, requests: int) -> list[float]:
    """Seconds per request of ``requests`` GETs of ``path`` spread over ``clients`` threads."""
    times: list[float] = []
    lock = threading.Lock()
    per = requests // clients

    def worker():
        mine = []
        with daemon.http() as c:
            for _ in range(per):
                t0 = time.perf_counter()
                r = c.get(path)
                mine.append(time.perf_counter() - t0)
                assert r.status_code == 200
        with lock:
            times.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return times


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--vms", type=int, default=20)
    ap.add_argument("--starts", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    d = Daemon()
    d.start()
    out: dict = {}
    try:
        with d.http() as c:
            for n in range(args.vms):
                c.post("/vms/create", params={"name": f"bench{n}"}, json={"Image": "hello-long64"})
        ping = load(d, "/_ping", args.clients, args.requests)
        ps = load(d, "/vms/json?all=1", args.clients, args.requests)
        out["ping_p50_ms"], out["ping_p99_ms"] = pct(ping, 50) * 1e3, pct(ping, 99) * 1e3
        out["ps_p50_ms"], out["ps_p99_ms"] = pct(ps, 50) * 1e3, pct(ps, 99) * 1e3
        out["ps_p99_ratio_vs_ping"] = out["ps_p99_ms"] / out["ping_p99_ms"]
        starts, direct = [], []
        with d.http() as c:
            for n in range(args.starts):
                t0 = time.perf_counter()
                vm = c.post("/vms/create", params={"name": f"start{n}"}, json={"Image": "hello-long64"}).json()["Id"]
                assert c.post(f"/vms/{vm}/start").status_code == 204
                starts.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "pykvm", "run", "-q", "hello-long64"], capture_output=True,
                               check=True)
                direct.append(time.perf_counter() - t0)
        out["create_start_median_ms"] = statistics.median(starts) * 1e3
        out["direct_run_median_ms"] = statistics.median(direct) * 1e3
        out["create_start_ratio_vs_direct_run"] = out["create_start_median_ms"] / out["direct_run_median_ms"]
        out.update(clients=args.clients, requests=args.requests, vms=args.vms, starts=args.starts)
    finally:
        d.close()
    if args.json:
        print(json.dumps(out))
    else:
        for key, value in out.items():
            print(f"{key:<34} {value:.2f}" if isinstance(value, float) else f"{key:<34} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
