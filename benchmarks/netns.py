"""Network namespaces for the virtio-net tests and benchmark: everything they start stays inside.

:class:`Netns` creates a namespace (``ip netns add``) with only its loopback, adds TAP devices and
bridges to it, runs commands inside it (``ip netns exec``) and deletes it on exit, which also
removes every interface in it. Addresses come from 192.0.2.0/24 (TEST-NET-1, RFC 5737) and there is
no default route, so no packet can leave the namespace.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Sequence

SUBNET = "192.0.2"
_counter = itertools.count()


def problem() -> str | None:
    """Why namespaces with TAPs cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces and TAP devices need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


class Netns:
    """One network namespace; a context manager (deleted, with its interfaces, on exit)."""

    def __init__(self, prefix: str = "pykvm-net") -> None:
        self.name = f"{prefix}-{os.getpid()}-{next(_counter)}"

    def __enter__(self) -> Netns:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)

    def ip(self, *args: str) -> None:
        """``ip -n NS ARGS``; raises CalledProcessError with ip's message if it fails."""
        r = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True)
        if r.returncode:
            raise subprocess.CalledProcessError(r.returncode, r.args, r.stdout, r.stderr)

    def add_tap(self, name: str, address: str | None = None, bridge: str | None = None) -> str:
        """A TAP named ``name``, up, with ``address`` (e.g. 192.0.2.1/24) or on ``bridge``."""
        self.ip("tuntap", "add", name, "mode", "tap")
        if address:
            self.ip("addr", "add", address, "dev", name)
        if bridge:
            self.ip("link", "set", name, "master", bridge)
        self.ip("link", "set", name, "up")
        return name

    def add_bridge(self, name: str, address: str) -> str:
        self.ip("link", "add", name, "type", "bridge")
        self.ip("addr", "add", address, "dev", name)
        self.ip("link", "set", name, "up")
        return name

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), capture_output=True, timeout=timeout, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(argv), **kwargs)
