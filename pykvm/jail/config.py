"""What a jail is made of (:class:`JailConfig`) and the checks run before anything is created.

Every check here happens in the calling process, before a directory, cgroup or mount exists, so
bad input is one :class:`JailError` (exit status 2) and leaves nothing behind."""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field

from ..errors import UsageError

# Firecracker's jailer accepts ids of letters, digits and hyphens, at most 64 characters: no `/`,
# no `..`, so an id can never name a path outside the chroot base.
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,63}")
DEFAULT_CHROOT_BASE = "/srv/jailer"      # as Firecracker's jailer
UID_BASE = 1_000_000    # default uid/gid = UID_BASE + the supervisor's pid: distinct per running VM
DEFAULT_NOFILE = 2048   # Firecracker's default for RLIMIT_NOFILE
MIN_CPU_QUOTA = 0.01    # cpu.cfs_quota_us >= 1000 us at the 100 ms period
SUN_PATH_MAX = 108      # bytes of a Unix socket's path, with its NUL (unix(7))
MIN_PIDS = 8            # the interpreter, its vCPU, device and console threads


class JailError(UsageError):
    """A jail cannot be built from this input (bad id, uid 0, missing /dev/kvm, ...). Status 2."""


@dataclass
class JailFile:
    """A host file the jailed VMM was given: bind-mounted into its root as ``name``."""

    path: str
    read_only: bool = True
    name: str = ""


@dataclass
class JailConfig:
    """One VMM's jail (the options of ``pykvm jail``; Firecracker's jailer names where they exist).

    ``memory`` is in bytes (cgroup memory limit), ``cpus`` a CPU quota (0.5 = half of one CPU over
    each 100 ms period), ``pids`` the cgroup's task limit; None leaves that limit unset.
    ``uid``/``gid`` None: ``UID_BASE`` + the supervisor's pid, so two VMMs never share an id.
    ``netns``: a network namespace file to join (``/run/netns/NAME``); None: a new, empty one.
    ``resource_limits``: {"no-file": n, "fsize": bytes} (setrlimit). ``seccomp``: "kill" (a
    forbidden system call kills the VMM with SIGSYS and is reported), "log" (allowed but logged
    by the kernel: for deriving the allowlist) or "off".
    ``api_sock``: the host path of the VMM's API socket, or None. The VMM binds and listens on
    :attr:`api_sock_staging` before it enters the jail (afterwards it only accepts connections);
    the supervisor renames it to ``api_sock`` once the VMM is in its jail -- so a client that finds
    the socket talks to a jailed VMM -- and removes it when the VMM ends."""

    id: str
    uid: int | None = None
    gid: int | None = None
    chroot_base: str = DEFAULT_CHROOT_BASE
    memory: int | None = None
    cpus: float | None = None
    pids: int | None = 64
    netns: str | None = None
    new_pid_ns: bool = True
    daemonize: bool = False
    resource_limits: dict[str, int] = field(default_factory=dict)
    files: list[JailFile] = field(default_factory=list)
    kvm_device: str = "/dev/kvm"
    seccomp: str = "kill"
    cgroup_version: int | None = None   # None: detected at run time (pykvm.jail.cgroups.detect)
    api_sock: str | None = None

    @property
    def api_sock_staging(self) -> str | None:
        """Where the VMM binds its API socket before the jail: beside ``api_sock`` (a rename within
        one directory), named after the jail's id."""
        return None if self.api_sock is None else f"{self.api_sock}.{self.id}.jail"

    def check(self) -> None:
        """Raise JailError for input no jail can be built from. Touches nothing."""
        if not ID_PATTERN.fullmatch(self.id or ""):
            raise JailError(f"jail id {self.id!r} is not valid: use 1 to 64 letters, digits and hyphens, "
                            "starting with a letter or digit (no '/', no '..')")
        for what, value in (("uid", self.uid), ("gid", self.gid)):
            if value is None:
                continue
            if value == 0:
                raise JailError(f"--{what} 0 is root: a jailed VMM must run as an unprivileged {what}")
            if not 0 < value < 2**32 - 1:
                raise JailError(f"--{what} {value} is not a valid {what}")
        base = self.chroot_base
        if not os.path.isabs(base):
            raise JailError(f"chroot base {base!r} must be an absolute path")
        if not os.path.isdir(base):
            what = "does not exist" if not os.path.lexists(base) else "is not a directory"
            raise JailError(f"chroot base {base} {what}: give an existing directory with --chroot-base")
        try:
            info = os.stat(self.kvm_device)
        except OSError as e:
            raise JailError(f"cannot use {self.kvm_device}: {e.strerror}; the jail needs the KVM device node "
                            "(load the kvm module, or run on a host with KVM)") from None
        if not stat.S_ISCHR(info.st_mode):
            raise JailError(f"{self.kvm_device} is not a character device, so it is not KVM's device node")
        if self.memory is not None and self.memory <= 0:
            raise JailError(f"memory limit {self.memory} is not a positive number of bytes")
        if self.cpus is not None and not self.cpus >= MIN_CPU_QUOTA:
            raise JailError(f"--cpus {self.cpus} is below the smallest CPU quota ({MIN_CPU_QUOTA} of a CPU)")
        if self.pids is not None and self.pids < MIN_PIDS:
            raise JailError(f"--pids {self.pids} is too few: a VMM needs at least {MIN_PIDS} tasks "
                            "(its threads count)")
        for name, value in self.resource_limits.items():
            if name not in ("no-file", "fsize"):
                raise JailError(f"unknown resource limit {name!r} (known: no-file, fsize)")
            if value < (16 if name == "no-file" else 0):
                raise JailError(f"resource limit {name}={value} is too small")
        if self.seccomp not in ("kill", "log", "off"):
            raise JailError(f"--seccomp {self.seccomp!r}: use kill, log or off")
        if self.api_sock is not None:
            self._check_api_sock()
        if self.netns is not None and not os.path.exists(self.netns):
            raise JailError(f"network namespace {self.netns} does not exist (create one with `ip netns add`)")
        names = set()
        for f in self.files:
            if not os.path.isfile(f.path):
                raise JailError(f"{f.path} is not a regular file, so it cannot be given to a jailed VMM")
            f.name = f.name or _unique(os.path.basename(f.path), names)
            names.add(f.name)


    def _check_api_sock(self) -> None:
        path = self.api_sock
        if not os.path.isabs(path) or "\0" in path:
            raise JailError(f"API socket path {path!r} must be an absolute host path")
        if len(os.fsencode(self.api_sock_staging)) >= SUN_PATH_MAX:
            raise JailError(f"API socket path {path} is too long for a Unix socket (with the jail's staging "
                            f"suffix it must stay under {SUN_PATH_MAX} bytes): choose a shorter one")
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise JailError(f"API socket path {path}: the directory {parent} does not exist")
        if os.path.lexists(path) and not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise JailError(f"API socket path {path} exists and is not a socket; refusing to replace it")


def _unique(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken or candidate in ("dev", "old", "run"):
        n += 1
        candidate = f"{n}-{name}"
    return candidate
