"""Isolation of a VMM process: namespaces, a per-VM root, cgroups (v1 or v2), an unprivileged
uid/gid, resource limits and a seccomp filter -- the steps of Firecracker's jailer, as a library.

A Python VMM cannot simply be exec'd inside an empty root: the interpreter and its modules live
outside it. pykvm therefore separates privilege in time instead of in binaries. The jailed
process starts as root, outside any root directory, and

1. joins its own cgroup (memory, CPU quota, pids limits written) and is PID 1 of a new PID
   namespace; every descriptor it inherited above stderr is closed; it makes its own mount
   namespace while it still has one thread (so the pivot below re-roots every thread it starts);
2. imports everything it will need, opens /dev/kvm, creates the VM, its memory and vCPUs, and
   opens the files it was given (kernel, initrd, drives) -- all while it can still see them;
   with an API socket (``JailConfig.api_sock``) it binds and listens on it
   (:attr:`Entry.api_sock_staging`) and starts the API server's threads;
3. calls :meth:`Entry.enter`: pre-imports what is loaded lazily (capstone for crash reports,
   codecs, tracebacks, the snapshot code), unshares the IPC, UTS and network namespaces, pivots
   into ``<chroot base>/pykvm/<id>/root`` (only ``dev/kvm``, a writable ``run`` owned by the jail's
   uid, and the given files, bind-mounted, read-only except writable drives, the root itself
   read-only), sets resource limits, drops to the uid/gid (distinct per VM by default) with no
   capabilities and no_new_privs, and loads the seccomp filters (:mod:`.seccomp`: one for every
   thread -- 35 system calls, or 50 with an API socket -- and, with an API socket, the short one,
   35, stacked on the main thread, which the vCPU threads inherit);
4. only then runs the guest (the first KVM_RUN) -- the vCPU threads inherit the filter.

The API socket (issue 13 part 1, Firecracker's jailer keeps it inside the jail root): its path is
a host path; the VMM binds it beside that path, before the jail, and in the jail only accepts
connections on it (no socket, bind or connect in any filter). The supervisor renames it to its
path once the VMM reports (on a pipe) that it is in its jail, and removes it when the VMM ends.
Paths the API is given are the jail's: ``/run/x`` is ``<root>/run/x`` on the host, the one place
the VMM can write; nothing else of the host is reachable.

A supervisor process (root, outside the jail) waits for it, reports how it ended (a seccomp kill
with the forbidden call's name, an OOM kill by its memory limit) and removes the cgroup and the
root directory (in the engine, that is the VM's shim: :class:`.supervisor.Supervised`). The
engine daemon (issue 12) uses the same machinery; the plain call is::

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
