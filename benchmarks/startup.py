"""Start-up: ``pykvm run`` of the bundled demo guest, timed as a whole process, against ``python -c pass``.

Each sample is one process, timed from spawn to exit with ``time.perf_counter`` around
``subprocess.run`` (output discarded). Three commands alternate, sample by sample, so drift on
the host hits them alike:

- ``python``: ``python -c pass``, the interpreter's own start-up (the floor);
- ``pykvm``: ``python -m pykvm run`` (boot hello-long64, print, halt, exit 0) as a user's installed
  package runs it: byte-compiled. pip compiles every module to ``.pyc`` when it installs; a checkout
  (or an editable install) under ``PYTHONDONTWRITEBYTECODE=1`` never has them and compiles every
  module at every start. So the runs use a private ``PYTHONPYCACHEPREFIX`` filled by one warm-up run;
- ``pykvm-nopyc``: the same with ``PYTHONDONTWRITEBYTECODE=1`` and no cache prefix: what a
  checkout without ``__pycache__`` pays (shown, not the target).

Prints the median and range of each in seconds and the ratio pykvm / python. The target (issue
10) is a median of at most 0.15 s for ``pykvm`` on this host.

    python -m benchmarks.startup [--repeat 10] [--json]

Exit status 0; 1 if a run fails (its stderr is shown), 2 without /dev/kvm.
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

TARGET_S = 0.15


def _env(pycache: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPYCACHEPREFIX", None)
    if pycache is None:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    else:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def time_once(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds from spawn to exit of ``cmd``; SystemExit(1) if it fails."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, timeout=60)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"startup: {' '.join(cmd)} failed with status {proc.returncode}: "
                         f"{proc.stderr.decode(errors='replace').strip()[-500:]}")
    return elapsed


def measure(repeat: int) -> dict[str, list[float]]:
    """``repeat`` samples of each command, interleaved, in seconds."""
    with tempfile.TemporaryDirectory(prefix="pykvm-pyc-") as pyc:
        compiled, uncompiled = _env(pyc), _env(None)
        pykvm = [sys.executable, "-m", "pykvm", "run"]
        commands = {
            "python": ([sys.executable, "-c", "pass"], compiled),
            "pykvm": (pykvm, compiled),
            "pykvm-nopyc": (pykvm, uncompiled),
        }
        time_once(pykvm, compiled)                       # the warm-up run writes the .pyc files
        samples: dict[str, list[float]] = {name: [] for name in commands}
        names = list(commands)
        for i in range(repeat):
            for name in names[i % len(names):] + names[:i % len(names)]:
                cmd, env = commands[name]
                samples[name].append(time_once(cmd, env))
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=10, help="samples per command (default 10)")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        print("startup: --repeat must be at least 1", file=sys.stderr)
        return 2
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("startup: /dev/kvm is missing or not accessible: pykvm cannot run a guest", file=sys.stderr)
        return 2
    samples = measure(args.repeat)
    result = {name: {"median_s": round(statistics.median(v), 4), "min_s": round(min(v), 4),
                     "max_s": round(max(v), 4)} for name, v in samples.items()}
    base = result["python"]["median_s"]
    for row in result.values():
        row["ratio"] = round(row["median_s"] / base, 2)
    lines = [f"{'command':<13}{'median s':>10}{'min':>8}{'max':>8}{'/ python':>10}"]
    for name, row in result.items():
        lines.append(f"{name:<13}{row['median_s']:>10.3f}{row['min_s']:>8.3f}{row['max_s']:>8.3f}"
                     f"{row['ratio']:>10.2f}")
    table = "\n".join(lines)
    verdict = (f"pykvm run (byte-compiled), median of {args.repeat}: {result['pykvm']['median_s']:.3f} s -> "
               f"target <= {TARGET_S} s " + ("met" if result["pykvm"]["median_s"] <= TARGET_S else "NOT met"))
    if args.json:
        print(table, file=sys.stderr)
        print(verdict, file=sys.stderr)
        print(json.dumps(result | {"repeat": args.repeat}))
    else:
        print(table)
        print(verdict, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
