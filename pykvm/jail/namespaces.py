"""Linux namespaces for a VMM (namespaces(7)).

The PID namespace is made by the supervisor with unshare(CLONE_NEWPID) just before it forks the
VMM, which becomes PID 1 there (unshare moves only later children into a new PID namespace).
The VMM unshares its mount namespace first thing, before it starts any thread (see
:func:`new_mount_namespace`), and when it enters the jail the IPC and UTS namespaces and a new,
empty network namespace (only a loopback, down) -- or joins the one given with ``--netns``."""

from __future__ import annotations

import os

from . import _libc
from .config import JailError


def new_pid_namespace() -> None:
    """Children forked after this call start a new PID namespace (their first is PID 1)."""
    _libc.unshare(_libc.CLONE_NEWPID)


def new_mount_namespace() -> None:
    """A private copy of the host's mount namespace, made before the VMM starts its first thread.

    Why so early: unshare(CLONE_NEWNS) gives the calling thread its own root and working directory
    (it implies CLONE_FS), so threads started before it would keep the host's root after the
    pivot. Made while the process has one thread, every thread it starts later shares this
    thread's root, and pivot_root moves them all into the jail at once (it re-roots every task
    whose root was the namespace's old one: only ours live in this namespace). Until the pivot the
    copy shows the host's whole tree, so the VMM still opens what it needs by its host path.
    Nothing mounted here propagates back to the host (MS_PRIVATE, recursively)."""
    _libc.unshare(_libc.CLONE_NEWNS)
    _libc.mount(None, "/", None, _libc.MS_REC | _libc.MS_PRIVATE)


def enter(netns: str | None) -> None:
    """New IPC and UTS namespaces; a new network namespace, or the one at ``netns`` (the mount
    namespace is already the VMM's own: :func:`new_mount_namespace`)."""
    flags = _libc.CLONE_NEWIPC | _libc.CLONE_NEWUTS
    if netns is None:
        flags |= _libc.CLONE_NEWNET
    _libc.unshare(flags)
    if netns is not None:
        try:
            fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise JailError(f"cannot open network namespace {netns}: {e.strerror}") from None
        try:
            _libc.setns(fd, _libc.CLONE_NEWNET)
        except OSError as e:
            raise JailError(f"cannot join network namespace {netns}: {e.strerror} (is it a netns file?)") from None
        finally:
            os.close(fd)
