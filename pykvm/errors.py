"""The exceptions pykvm raises. Each carries a message a user can act on; the CLI turns them into
one paragraph and an exit status (see :mod:`pykvm.cli`)."""

from __future__ import annotations


class PykvmError(Exception):
    """Base class. ``exit_status`` is what ``pykvm`` exits with when this ends a run."""

    exit_status = 4


class UsageError(PykvmError):
    """Bad command-line input (a wrong flag value, an unknown guest name)."""

    exit_status = 2


class BootError(PykvmError):
    """An image that cannot be loaded: malformed header, does not fit in guest RAM, ..."""

    exit_status = 2


class KvmUnavailable(PykvmError):
    """/dev/kvm is missing or not accessible."""

    exit_status = 2


class KvmUnsupported(PykvmError):
    """This host's KVM cannot do what the guest needs (a CPU mode, a capability)."""

    exit_status = 2
