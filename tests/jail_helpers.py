"""Gates and checks shared by the jail tests: root, cgroups and libseccomp present, and
"nothing left behind" (no per-VM directory, no cgroup, no new mount)."""

from __future__ import annotations

import os
import re

import pytest


def _jail_problem() -> str | None:
    if os.geteuid() != 0:
        return "jail tests need root (namespaces, cgroups, mknod, pivot_root, setuid)"
    from pykvm.jail import JailError, cgroups, seccomp
    try:
        cgroups.detect()
    except JailError as e:
        return f"no usable cgroups here: {e}"
    return seccomp.available()


JAIL_PROBLEM = _jail_problem()
needs_jail = pytest.mark.skipif(JAIL_PROBLEM is not None, reason=JAIL_PROBLEM or "")


def mounts() -> list[str]:
    """This process's mount table, without mount ids (which renumber). Other programs on the host
    may mount things meanwhile (``ip netns add``): compare only what lies under a chroot base or
    names a jail (see assert_nothing_left)."""
    with open("/proc/self/mountinfo") as f:
        return sorted(" ".join(line.split()[3:]) for line in f)


def cgroup_dirs(vm_id) -> list[str]:
    """Every cgroup directory ``pykvm/<id>`` in any mounted hierarchy whose id is ``vm_id`` (a
    string) or passes it (a predicate)."""
    match = vm_id if callable(vm_id) else (lambda name: name == vm_id)
    found = []
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if line.split()[2] in ("cgroup", "cgroup2")]
    for point in points:
        for dirpath, dirnames, _ in os.walk(point):
            if os.path.basename(dirpath) == "pykvm":
                found += [os.path.join(dirpath, d) for d in dirnames if match(d)]
            if dirpath.count("/") - point.count("/") > 4:
                dirnames[:] = []
    return found


def assert_nothing_left(base, vm_id, mounts_before: list[str]) -> None:
    """No file under the chroot base, no cgroup ``pykvm/<vm_id>`` (an id or a predicate on ids,
    see cgroup_dirs), and no new mount under the base or naming a jail."""
    assert list(os.listdir(base)) == [], f"left behind in the chroot base: {os.listdir(base)}"
    assert cgroup_dirs(vm_id) == [], "a cgroup was left behind"
    ours = (lambda table: [m for m in table if str(base) in m or "/pykvm/" in m])  # noqa: E731
    assert ours(mounts()) == ours(mounts_before), "a mount was left behind"


def one_paragraph_error(stderr: bytes) -> str:
    text = stderr.decode(errors="replace")
    assert "Traceback" not in text, text
    assert re.match(r"pykvm: \S", text), text
    assert text.count("pykvm:") == 1, text
    return " ".join(text.split())
