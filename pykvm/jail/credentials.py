"""Dropping to an unprivileged user with no capabilities (credentials(7), capabilities(7)).

Order matters: the capability bounding set can only be shrunk while CAP_SETPCAP is held, so it
is emptied first; then the supplementary groups are dropped and the gid and uid set (all three
of real, effective and saved, so there is no way back: the kernel clears the permitted and
effective capability sets when every uid becomes non-zero); then no_new_privs, so nothing the
process could execute regains privilege. glibc applies set*id to every thread of the process.
"""

from __future__ import annotations

import errno
import os
import signal

from . import _libc


def drop(uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with no supplementary groups, no capabilities (bounding, ambient,
    permitted, effective) and no_new_privs set."""
    _libc.prctl(_libc.PR_CAP_AMBIENT, _libc.PR_CAP_AMBIENT_CLEAR_ALL)
    for cap in range(64):   # up to the kernel's last capability (/proc is out of reach by now)
        try:
            _libc.prctl(_libc.PR_CAPBSET_DROP, cap)
        except OSError as e:
            if e.errno != errno.EINVAL or cap == 0:
                raise
            break
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    _libc.prctl(_libc.PR_SET_NO_NEW_PRIVS, 1)
    # a credential change clears the parent-death signal: set it again
    _libc.prctl(_libc.PR_SET_PDEATHSIG, signal.SIGKILL)
