"""Resource limits of the jailed VMM (setrlimit(2)), named as Firecracker's jailer names them:
``no-file`` (RLIMIT_NOFILE, default 2048) and ``fsize`` (RLIMIT_FSIZE, bytes; unset by default).
Core dumps are always off (RLIMIT_CORE 0): a VMM's core would hold the guest's memory."""

from __future__ import annotations

import resource

from .config import DEFAULT_NOFILE

NAMES = {"no-file": resource.RLIMIT_NOFILE, "fsize": resource.RLIMIT_FSIZE}


def apply(limits: dict[str, int]) -> None:
    """Set soft = hard = the given value for each limit; no-file defaults to DEFAULT_NOFILE."""
    wanted = {"no-file": DEFAULT_NOFILE, **limits}
    for name, value in wanted.items():
        resource.setrlimit(NAMES[name], (value, value))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
