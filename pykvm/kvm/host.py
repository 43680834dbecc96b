"""Facts about this host's KVM that no ioctl tells: which kernel module provides /dev/kvm."""

from __future__ import annotations

import os


def host_backend() -> str:
    """The KVM module in use: kvm_intel, kvm_amd, kvm_pvm, or 'unknown'."""
    for module in ("kvm_intel", "kvm_amd", "kvm_pvm"):
        if os.path.exists(f"/sys/module/{module}"):
            return module
    return "unknown"
