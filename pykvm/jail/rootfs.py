"""The per-VM root directory and the pivot into it.

The supervisor (still root, in the host's mount namespace) makes ``<chroot base>/pykvm/<id>/root``
holding only ``dev/kvm`` (mknod with the host node's device number, root-owned, mode 0660: the
jailed VMM has its /dev/kvm descriptors already and cannot open more) and one empty mount point
per file the VMM was given, and removes it all when the VM ends.

The jailed process, in its new mount namespace, bind-mounts each given file onto its mount point
(read-only unless it is a writable drive), makes the root a read-only bind mount, and pivots into
it (pivot_root(".", ".") then a lazy unmount of the old root, so no path leads back to the host).
The bind mounts live only in that namespace: they disappear with the VMM.
"""

from __future__ import annotations

import os
import shutil
import stat

from . import _libc
from .config import JailConfig, JailError

PARENT = "pykvm"


class RootDir:
    """``<base>/pykvm/<id>`` and its ``root`` subdirectory: created by :meth:`create`, removed by
    :meth:`remove` (only what was created here)."""

    def __init__(self, config: JailConfig) -> None:
        self.config = config
        self.parent = os.path.join(config.chroot_base, PARENT)
        self.vm_dir = os.path.join(self.parent, config.id)
        self.root = os.path.join(self.vm_dir, "root")
        self._made_parent = False
        self._made_vm_dir = False

    @classmethod
    def create(cls, config: JailConfig) -> RootDir:
        """Make the jail's root directory for ``config``; what was made is removed again on failure."""
        rootdir = cls(config)
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
    """In a new mount namespace: bind the given files in, make ``root`` a read-only mount and
    pivot into it. Afterwards ``/`` is that directory and the host's tree is unreachable."""
    _libc.mount(None, "/", None, _libc.MS_REC | _libc.MS_PRIVATE)   # nothing propagates back to the host
    _libc.mount(root, root, None, _libc.MS_BIND)                    # pivot_root needs a mount point
    for f in config.files:
        target = os.path.join(root, f.name)
        _libc.mount(f.path, target, None, _libc.MS_BIND)
        flags = _libc.MS_REMOUNT | _libc.MS_BIND | _libc.MS_NOSUID | _libc.MS_NODEV | _libc.MS_NOEXEC
        _libc.mount(None, target, None, flags | (_libc.MS_RDONLY if f.read_only else 0))
    _libc.mount(None, root, None, _libc.MS_REMOUNT | _libc.MS_BIND | _libc.MS_RDONLY | _libc.MS_NOSUID)
    os.chdir(root)
    _libc.pivot_root(".", ".")
    _libc.umount2(".", _libc.MNT_DETACH)
    os.chdir("/")
