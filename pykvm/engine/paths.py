"""Where the daemon's socket and state live (issue 12, part 1).

root: ``/run/pykvm/pykvm.sock`` and ``/var/lib/pykvm``; anyone else: ``$XDG_RUNTIME_DIR/pykvm/pykvm.sock``
and ``$XDG_STATE_HOME/pykvm`` (``~/.local/state/pykvm``), as the XDG base directory spec places runtime
and state files. ``PYKVM_HOST=unix:///path`` (like DOCKER_HOST) points a client elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UsageError


def default_socket() -> Path:
    """The socket a daemon binds and a client dials when none is named."""
    host = os.environ.get("PYKVM_HOST")
    if host:
        return socket_from_host(host)
    if os.geteuid() == 0:
        return Path("/run/pykvm/pykvm.sock")
    runtime = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/pykvm-{os.geteuid()}"
    return Path(runtime) / "pykvm" / "pykvm.sock"


def socket_from_host(host: str) -> Path:
    """``unix:///path`` or a plain path -> the socket path; anything else is a UsageError."""
    if host.startswith("unix://"):
        host = host[len("unix://"):]
    elif "://" in host:
        raise UsageError(f"pykvm speaks only over a Unix socket: {host!r} should be unix:///path/to/pykvm.sock")
    if not host:
        raise UsageError("an empty socket path")
    return Path(host)


def default_state_dir() -> Path:
    """Where the database and each VM's directory live."""
    if os.geteuid() == 0:
        return Path("/var/lib/pykvm")
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "pykvm"
