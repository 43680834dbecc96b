"""One cgroup per VMM, on cgroup v2 (unified) or v1 (one hierarchy per controller), detected at
run time from /proc/self/mounts.

- v2 is used when a cgroup2 mount offers the memory, cpu and pids controllers (modern hosts,
  v2-only). The VM's cgroup is ``<mount>/pykvm/<id>``, with the controllers enabled in the
  ``cgroup.subtree_control`` of each parent (as Firecracker's jailer does); limits: memory.max,
  memory.swap.max, cpu.max, pids.max; an OOM kill is counted in memory.events ``oom_kill``.
- v1 otherwise (this machine: memory, cpu, pids each mounted on its own, and an empty v2
  hierarchy). The VM's cgroup is ``<controller mount>/<the caller's cgroup>/pykvm/<id>`` in each,
  so a caller that is itself limited (a delegated sub-tree) stays limited; limits:
  memory.limit_in_bytes (and memory.memsw.limit_in_bytes when swap accounting exists),
  cpu.cfs_quota_us / cpu.cfs_period_us, pids.max; an OOM kill is counted in memory.oom_control
  ``oom_kill``.

Kernel docs: Documentation/admin-guide/cgroup-v2.rst and cgroup-v1/{memory,pids}.rst,
scheduler/sched-bwc.rst (CFS bandwidth control).
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass

from .config import JailError

CONTROLLERS = ("memory", "cpu", "pids")
CPU_PERIOD_US = 100_000     # the CFS bandwidth period (100 ms, the kernel's default)
PARENT = "pykvm"


@dataclass
class Hierarchy:
    """Where to make cgroups: version 2 (one ``mount``) or 1 (``mounts`` per controller)."""

    version: int
    mounts: dict[str, str]     # controller -> mount point (v2: the same one for all)


def detect(mounts_file: str = "/proc/self/mounts", version: int | None = None) -> Hierarchy:
    """The cgroup hierarchy to use for the memory, cpu and pids controllers: v2 if a cgroup2 mount
    offers all three, else v1 if each is mounted; else JailError. ``version`` forces one."""
    v1: dict[str, str] = {}
    v2: list[str] = []
    try:
        with open(mounts_file) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 4:
                    continue
                point, fstype, options = fields[1].replace("\\040", " "), fields[2], fields[3].split(",")
                if fstype == "cgroup2":
                    v2.append(point)
                elif fstype == "cgroup":
                    for c in CONTROLLERS:
                        if c in options:
                            v1.setdefault(c, point)
    except OSError as e:
        raise JailError(f"cannot read {mounts_file} to find the cgroup hierarchies: {e.strerror}") from None
    if version in (None, 2):
        for point in v2:
            try:
                with open(os.path.join(point, "cgroup.controllers")) as f:
                    offered = f.read().split()
            except OSError:
                continue
            if all(c in offered for c in CONTROLLERS):
                return Hierarchy(2, {c: point for c in CONTROLLERS})
    if version in (None, 1) and all(c in v1 for c in CONTROLLERS):
        return Hierarchy(1, v1)
    missing = [c for c in CONTROLLERS if c not in v1]
    raise JailError("no cgroup hierarchy offers the memory, cpu and pids controllers "
                    f"(cgroup v2 mounts: {', '.join(v2) or 'none'}; cgroup v1 lacks: {', '.join(missing) or 'nothing'})"
                    + (f" for the requested cgroup v{version}" if version else ""))


def _own_path(controller: str, proc_cgroup: str = "/proc/self/cgroup") -> str:
    """This process's cgroup path in the v1 hierarchy of ``controller`` ("/" if unknown)."""
    try:
        with open(proc_cgroup) as f:
            for line in f:
                _, names, path = line.rstrip("\n").split(":", 2)
                if controller in names.split(","):
                    return path
    except OSError:
        pass
    return "/"


class Cgroup:
    """The cgroup of one VMM. ``create`` makes it and writes the limits (undone on failure);
    ``join`` moves the calling process in; ``oom_killed`` says whether the kernel's OOM killer
    fired in it; ``remove`` deletes it (once no task is left)."""

    def __init__(self, hierarchy: Hierarchy, vm_id: str) -> None:
        self.hierarchy = hierarchy
        self.id = vm_id
        self.paths: list[str] = []          # created directories, deepest last
        if hierarchy.version == 2:
            point = hierarchy.mounts["memory"]
            self.dirs = {c: os.path.join(point, PARENT, vm_id) for c in CONTROLLERS}
        else:
            self.dirs = {c: os.path.join(point, _own_path(c).lstrip("/"), PARENT, vm_id)
                         for c, point in hierarchy.mounts.items()}

    @classmethod
    def create(cls, hierarchy: Hierarchy, vm_id: str, memory: int | None, cpus: float | None,
               pids: int | None) -> Cgroup:
        """Make the VM's cgroup with the given limits (bytes, CPUs, tasks); removed again on failure."""
        cgroup = cls(hierarchy, vm_id)
        try:
            cgroup._make()
            cgroup._limit(memory, cpus, pids)
        except BaseException:
            cgroup.remove()
            raise
        return cgroup

    def _make(self) -> None:
        for d in dict.fromkeys(self.dirs.values()):
            parent = os.path.dirname(d)
            if not os.path.isdir(parent):
                os.mkdir(parent)
                self.paths.append(parent)
            if self.hierarchy.version == 2:
                self._enable_controllers(parent)
            try:
                os.mkdir(d)
            except FileExistsError:
                raise JailError(f"cgroup {d} already exists: is a VM with id {self.id!r} running?") from None
            self.paths.append(d)

    def _enable_controllers(self, parent: str) -> None:
        """cgroup v2: a child can only use controllers its parents enable for their subtree."""
        root = self.hierarchy.mounts["memory"]
        chain, d = [], parent
        while len(d) >= len(root):
            chain.append(d)
            if d == root:
                break
            d = os.path.dirname(d)
        for d in reversed(chain):
            _write(os.path.join(d, "cgroup.subtree_control"), " ".join(f"+{c}" for c in CONTROLLERS))

    def _limit(self, memory: int | None, cpus: float | None, pids: int | None) -> None:
        mem, cpu, pid = self.dirs["memory"], self.dirs["cpu"], self.dirs["pids"]
        if self.hierarchy.version == 2:
            if memory is not None:
                _write(os.path.join(mem, "memory.max"), str(memory))
                _write_optional(os.path.join(mem, "memory.swap.max"), "0")   # no escape into swap
            if cpus is not None:
                _write(os.path.join(cpu, "cpu.max"), f"{int(cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
            if pids is not None:
                _write(os.path.join(pid, "pids.max"), str(pids))
            return
        if memory is not None:
            _write(os.path.join(mem, "memory.limit_in_bytes"), str(memory))
            _write_optional(os.path.join(mem, "memory.memsw.limit_in_bytes"), str(memory))
        if cpus is not None:
            _write(os.path.join(cpu, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
            _write(os.path.join(cpu, "cpu.cfs_quota_us"), str(int(cpus * CPU_PERIOD_US)))
        if pids is not None:
            _write(os.path.join(pid, "pids.max"), str(pids))

    def join(self) -> None:
        """Move the calling process into this cgroup (writes "0": the writer itself)."""
        for d in dict.fromkeys(self.dirs.values()):
            _write(os.path.join(d, "cgroup.procs"), "0")

    def oom_killed(self) -> int:
        """How many tasks the kernel's OOM killer killed in this cgroup (0 if unknown)."""
        mem = self.dirs["memory"]
        name = "memory.events" if self.hierarchy.version == 2 else "memory.oom_control"
        try:
            with open(os.path.join(mem, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def usage(self) -> dict[str, int]:
        """Peak memory (bytes) and CPU time used (ns), where the hierarchy tells them."""
        mem = self.dirs["memory"]
        out = {}
        names = (("memory.peak", "peak_memory"),) if self.hierarchy.version == 2 else \
                (("memory.max_usage_in_bytes", "peak_memory"),)
        for name, key in names:
            try:
                with open(os.path.join(mem, name)) as f:
                    out[key] = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return out

    def remove(self, wait: float = 2.0) -> None:
        """Delete the cgroup's directories (deepest first), waiting up to ``wait`` seconds for the
        last task to leave (a dead task stays a member until it is reaped)."""
        deadline = time.monotonic() + wait
        for d in reversed(self.paths):
            while True:
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if e.errno == errno.EBUSY and time.monotonic() < deadline:
                        time.sleep(0.02)
                        continue
                    if os.path.basename(d) == PARENT and e.errno in (errno.EBUSY, errno.ENOTEMPTY):
                        break   # the shared parent still holds another VM's cgroup
                    raise
        self.paths = []


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(text)
    except OSError as e:
        raise JailError(f"cannot write {text!r} to {path}: {e.strerror}") from None


def _write_optional(path: str, text: str) -> None:
    if os.path.exists(path):
        _write(path, text)
