"""Linux namespaces for a VMM (namespaces(7)).

The PID namespace is made by the supervisor with unshare(CLONE_NEWPID) just before it forks the
VMM, which becomes PID 1 there (unshare moves only later children into a new PID namespace).
The VMM itself then unshares the mount, IPC and UTS namespaces and a new, empty network
namespace (only a loopback, down) -- or joins the one given with ``--netns``."""

from __future__ import annotations

import os

from . import _libc
from .config import JailError


def new_pid_namespace() -> None:
    """Children forked after this call start a new PID namespace (their first is PID 1)."""
    _libc.unshare(_libc.CLONE_NEWPID)


def enter(netns: str | None) -> None:
    """New mount, IPC and UTS namespaces; a new network namespace, or the one at ``netns``."""
    flags = _libc.CLONE_NEWNS | _libc.CLONE_NEWIPC | _libc.CLONE_NEWUTS
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
