"""The per-VM root directory and the pivot into it.

The supervisor (still root, in the host's mount namespace) makes ``<chroot base>/pykvm/<id>/root``
holding only ``dev/kvm`` (mknod with the host node's device number, root-owned, mode 0660: the
jailed VMM has its /dev/kvm descriptors already and cannot open more), ``run`` (owned by the
jail's uid/gid, mode 0700: the one place the VMM may write, e.g. a snapshot from its API) and one
empty mount point per file the VMM was given, and removes it all when the VM ends.

The jailed process, in its own mount namespace, bind-mounts each given file onto its mount point
(read-only unless it is a writable drive), makes ``run`` a writable bind mount (nosuid, nodev,
noexec) and the root itself a read-only one, and pivots into it (pivot_root(".", ".") then a lazy
unmount of the old root, so no path leads back to the host). The bind mounts live only in that
namespace: they disappear with the VMM. From the host, ``/run/X`` in the jail is
``<chroot base>/pykvm/<id>/root/run/X`` (Firecracker's jailer: paths the VMM is given through its
API are paths inside its root).
"""

from __future__ import annotations

import os
import shutil
import stat

from . import _libc
from .config import JailConfig, JailError

PARENT = "pykvm"
RUN = "run"     # the jail's writable directory, /run inside it


class RootDir:
    """``<base>/pykvm/<id>`` and its ``root`` subdirectory: created by :meth:`create`, removed by
    :meth:`remove` (only what was created here)."""

    def __init__(self, config: JailConfig, uid: int = 0, gid: int = 0) -> None:
        self.config, self.uid, self.gid = config, uid, gid
        self.parent = os.path.join(config.chroot_base, PARENT)
        self.vm_dir = os.path.join(self.parent, config.id)
        self.root = os.path.join(self.vm_dir, "root")
        self._made_parent = False
        self._made_vm_dir = False

    @classmethod
    def create(cls, config: JailConfig, uid: int = 0, gid: int = 0) -> RootDir:
        """Make the jail's root directory for ``config`` (its ``run`` owned by ``uid``/``gid``); what was
        made is removed again on failure."""
        rootdir = cls(config, uid, gid)
        try:
            rootdir._make()
        except BaseException:
            rootdir.remove()
            raise
        return rootdir

    def _make(self) -> None:
        if not os.path.isdir(self.parent):
            os.mkdir(self.parent, 0o755)
            self._made_parent = True
        try:
            os.mkdir(self.vm_dir, 0o755)
        except FileExistsError:
            raise JailError(f"{self.vm_dir} already exists: is a VM with id {self.config.id!r} running? "
                            "(remove it if not)") from None
        self._made_vm_dir = True
        os.mkdir(self.root, 0o755)
        os.mkdir(os.path.join(self.root, "dev"), 0o755)
        kvm = os.stat(self.config.kvm_device)
        node = os.path.join(self.root, "dev", "kvm")
        os.mknod(node, stat.S_IFCHR | 0o660, kvm.st_rdev)
        os.chmod(node, 0o660)    # mknod's mode is filtered by the umask
        run = os.path.join(self.root, RUN)
        os.mkdir(run, 0o700)
        os.chown(run, self.uid, self.gid)
        for f in self.config.files:
            with open(os.path.join(self.root, f.name), "x"):
                pass

    def remove(self) -> None:
        """Remove what :meth:`create` made; idempotent."""
        if self._made_vm_dir:
            shutil.rmtree(self.vm_dir, ignore_errors=True)
            self._made_vm_dir = False
        if self._made_parent:
            try:
                os.rmdir(self.parent)
            except OSError:
                pass    # another VM's directory is in it
            self._made_parent = False


def pivot(root: str, config: JailConfig) -> None:
    """In the VMM's own mount namespace: bind the given files and ``run`` in, make ``root`` a
    read-only mount and pivot into it. Afterwards ``/`` is that directory, for every thread of the
    process (see namespaces.new_mount_namespace), and the host's tree is unreachable."""
    _libc.mount(None, "/", None, _libc.MS_REC | _libc.MS_PRIVATE)   # nothing propagates back to the host
    _libc.mount(root, root, None, _libc.MS_BIND)                    # pivot_root needs a mount point
    flags = _libc.MS_REMOUNT | _libc.MS_BIND | _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC
    for f in config.files:
        target = os.path.join(root, f.name)
        _libc.mount(f.path, target, None, _libc.MS_BIND)
        _libc.mount(None, target, None, flags | (_libc.MS_RDONLY if f.read_only else 0))
    run = os.path.join(root, RUN)
    _libc.mount(run, run, None, _libc.MS_BIND)      # its own mount: stays writable under the read-only root
    _libc.mount(None, run, None, flags)
    _libc.mount(None, root, None, _libc.MS_REMOUNT | _libc.MS_BIND | _libc.MS_RDONLY | _libc.MS_NOSUID)
    os.chdir(root)
    _libc.pivot_root(".", ".")
    _libc.umount2(".", _libc.MNT_DETACH)
    os.chdir("/")
