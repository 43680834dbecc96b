"""Deriving the seccomp allowlist from traces: ``python -m pykvm.jail.derive TRACE...``.

Each TRACE is the output of ``strace -f -o TRACE pykvm jail --seccomp log -- run ...`` (log: the
filter lets every call through and only logs the ones outside the list). This keeps the calls
the VMM process and its threads made *after* its own seccomp(SECCOMP_SET_MODE_FILTER) call --
what the filter will see -- and prints them with their counts, marking those the filter does not
allow (:data:`pykvm.jail.seccomp.ALLOWED`). ioctl requests are listed too.

With an API socket the VMM has two thread kinds (see :mod:`pykvm.jail.seccomp`): ``--kinds``
prints the calls of each apart -- "api": the threads that existed before the filter, except the
one that loaded it; "vcpu": that thread and the threads first seen after it (an API worker thread
started late counts there too: check such calls by hand) -- and marks them against that kind's
filter."""

from __future__ import annotations

import re
import sys
from collections import Counter

from .seccomp import ALLOWED

_LINE = re.compile(r"^(\d+)\s+(\w+)\((.*)")
_FILTER = re.compile(r"^(\d+)\s+seccomp\(SECCOMP_SET_MODE_FILTER, .*\{len=\d+.*\) = 0$")
_IOCTL = re.compile(r"ioctl\(\d+, ([A-Z0-9_]+|0x[0-9a-f]+|_IOC\([^)]*\))")


def calls_by_kind(lines) -> dict[str, Counter]:
    """{"api": Counter, "vcpu": Counter} of the system calls made after the first filter (see the
    module doc for the kinds)."""
    first_seen: dict[str, int] = {}
    loader = None
    start = None
    kinds: dict[str, Counter] = {"api": Counter(), "vcpu": Counter()}
    for n, line in enumerate(lines):
        tid = line.split(" ", 1)[0]
        first_seen.setdefault(tid, n)
        if loader is None and _FILTER.match(line):
            loader, start = tid, n
            continue
        if loader is None:
            continue
        m = _LINE.match(line)
        if not m:
            continue
        if tid == loader or first_seen[tid] > start:
            kinds["vcpu"][m.group(2)] += 1
        elif first_seen[tid] >= first_seen[loader]:     # the caller and the supervisor came before the VMM
            kinds["api"][m.group(2)] += 1
    return kinds


def calls_after_filter(lines) -> tuple[Counter, Counter]:
    """(system call -> count, ioctl request -> count) made after the filter by the filtered
    process and its threads. Its threads are the tasks first seen after the process itself (the
    caller and the supervisor come first; the VMM cannot fork): strace prints clone's result as
    the thread id inside the PID namespace, which cannot be matched to its host tid."""
    first_seen: dict[str, int] = {}
    vmm = None
    calls: Counter[str] = Counter()
    ioctls: Counter[str] = Counter()
    for n, line in enumerate(lines):
        line = line.rstrip("\n")
        tid = line.split(" ", 1)[0]
        first_seen.setdefault(tid, n)
        m = _FILTER.match(line)
        if m and vmm is None:
            vmm = first_seen[m.group(1)]
            continue
        if vmm is None or first_seen[tid] < vmm:
            continue
        m = _LINE.match(line)
        if m:
            calls[m.group(2)] += 1
            if m.group(2) == "ioctl":
                request = _IOCTL.search(line)
                ioctls[request.group(1) if request else "?"] += 1
    return calls, ioctls


def main_kinds(paths: list[str]) -> int:
    """Print each thread kind's system calls after the filter, marked against its filter."""
    from .seccomp import API_ALLOWED
    totals: dict[str, Counter] = {"api": Counter(), "vcpu": Counter()}
    for path in paths:
        with open(path, errors="replace") as f:
            for kind, calls in calls_by_kind(f.readlines()).items():
                totals[kind].update(calls)
    conditional = {"ioctl", "clone", "clone3", "exit_group", "seccomp"}
    for kind, allowed in (("api", {*ALLOWED, *API_ALLOWED, "socketpair"}), ("vcpu", set(ALLOWED))):
        print(f"-- {kind} threads: {len(totals[kind])} system calls")
        for name, n in totals[kind].most_common():
            print(f"{name:<20} {n:>9}{'' if name in allowed | conditional else '   NOT ALLOWED'}")
    return 0


def main(paths: list[str]) -> int:
    """Print the syscalls and ioctls the strace logs ``paths`` show after the filter; returns 0."""
    if paths[:1] == ["--kinds"]:
        return main_kinds(paths[1:])
    total: Counter[str] = Counter()
    requests: Counter[str] = Counter()
    for path in paths:
        with open(path, errors="replace") as f:
            calls, ioctls = calls_after_filter(f)
        if not calls:
            print(f"{path}: no seccomp filter call found", file=sys.stderr)
        total.update(calls)
        requests.update(ioctls)
    from .seccomp import API_ALLOWED
    ruled = {*ALLOWED, "ioctl", "clone", "clone3", "exit_group", "seccomp"}   # (seccomp: the vCPU filter's load)
    for name, n in total.most_common():
        api_only = name in API_ALLOWED or name == "socketpair"     # (socketpair: AF_UNIX only)
        mark = "" if name in ruled else "   API filter only" if api_only else "   NOT ALLOWED"
        print(f"{name:<20} {n:>9}{mark}")
    print(f"-- {len(total)} system calls; ioctl requests:")
    for name, n in requests.most_common():
        print(f"  {name:<30} {n:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
