"""Snapshots of a running Machine: the state file format (versioned, checksummed), the capture and restore of
vCPU, VM and device state through KVM ioctls, and the guest memory file (mapped back copy-on-write)."""

from .format import FORMAT_VERSION, SnapshotError, read_state, write_state

__all__ = ["FORMAT_VERSION", "SnapshotError", "read_state", "write_state"]
