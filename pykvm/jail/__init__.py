"""Isolation of a VMM process: namespaces, a per-VM root, cgroups (v1 or v2), an unprivileged
uid/gid, resource limits and a seccomp filter -- the steps of Firecracker's jailer, as a library.

A Python VMM cannot simply be exec'd inside an empty root: the interpreter and its modules live
outside it. pykvm therefore separates privilege in time instead of in binaries. The jailed
process starts as root, outside any root directory, and

1. joins its own cgroup (memory, CPU quota, pids limits written) and is PID 1 of a new PID
   namespace; every descriptor it inherited above stderr is closed;
2. imports everything it will need, opens /dev/kvm, creates the VM, its memory and vCPUs, and
   opens the files it was given (kernel, initrd, drives) -- all while it can still see them;
3. calls :meth:`Entry.enter`: pre-imports what is loaded lazily (capstone for crash reports,
   codecs, tracebacks), unshares the mount, IPC, UTS and network namespaces, pivots into
   ``<chroot base>/pykvm/<id>/root`` (only ``dev/kvm`` and the given files, bind-mounted,
   read-only except writable drives, the root itself read-only), sets resource limits, drops to
   the uid/gid (distinct per VM by default) with no capabilities and no_new_privs, and loads the
   seccomp filter;
4. only then runs the guest (the first KVM_RUN) -- the vCPU threads inherit the filter.

A supervisor process (root, outside the jail) waits for it, reports how it ended (a seccomp kill
with the forbidden call's name, an OOM kill by its memory limit) and removes the cgroup and the
root directory. The engine daemon (issue 12) uses the same call::

    from pykvm.jail import JailConfig, spawn
    def vmm(entry):
        machine = Machine(...); machine.load(plan)     # everything opened
        entry.enter()                                  # now jailed
        return machine.run().status
    result = spawn(JailConfig(id="vm1", memory=96 << 20, cpus=1), vmm)
    print(result.describe())

Modules: config (checks), cgroups, namespaces, rootfs (chroot dir + pivot_root), rlimits, fds,
credentials, seccomp, supervisor (spawn).
"""

import os

from .config import JailConfig, JailError, JailFile
from .supervisor import Entry, JailResult, preload, spawn

__all__ = ["Entry", "JailConfig", "JailError", "JailFile", "JailResult", "jail_by_default", "preload", "spawn"]


def jail_by_default() -> bool:
    """Whether a VMM starts jailed unless told otherwise: the engine daemon's rule (issue 13,
    part 4) -- yes when running as root; ``--no-jail`` is explicit and logged."""
    return os.geteuid() == 0
