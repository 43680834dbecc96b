"""The exceptions pykvm raises. Each carries a message a user can act on; the CLI turns them into
one paragraph and an exit status (see :mod:`pykvm.cli`)."""

from __future__ import annotations

# Exit statuses of a run (README "Exit status"). A guest's debug-exit value v gives (v << 1) | 1,
# so every status pykvm itself chooses is even or one of these.
STATUS_OK = 0          # the guest halted with interrupts off, powered off or reset
STATUS_USAGE = 2       # bad usage or a bad image
STATUS_CRASH = 4       # the guest crashed (triple fault, internal error) or the VMM failed
STATUS_TIMEOUT = 124   # --timeout passed (as timeout(1))
STATUS_INTERRUPTED = 130   # Ctrl-C (128 + SIGINT)
STATUS_OUTPUT = 74     # the guest's output could not be written (EX_IOERR of sysexits.h)
STATUS_SIGNAL = 128    # + the signal's number: ended by SIGTERM (143), SIGHUP (129), ... as a shell reports it


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
