"""Closing inherited file descriptors: every descriptor above stderr that the VMM did not open
itself (a terminal, a socket or a database another program leaked to it) is closed before the
VMM opens anything, so whatever remains open in the jail was opened on purpose."""

from __future__ import annotations

import os


def close_inherited(keep: set[int]) -> None:
    """Close every open fd > 2 not in ``keep`` (listed from /proc/self/fd, else by range)."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass    # the directory's own descriptor, already closed
