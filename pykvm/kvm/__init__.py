"""The raw KVM binding: cffi declarations of <linux/kvm.h>, ioctl numbers, and Kvm / Vm / Vcpu.

The names below load on first use (PEP 562), so importing a submodule that needs no cffi (such
as :mod:`pykvm.kvm.host`) does not load the binding: ``pykvm --help`` stays fast.
"""

from __future__ import annotations

import importlib

__all__ = ["Cap", "ExitReason", "Ioctl", "Kvm", "KvmError", "Vcpu", "Vm", "ffi"]
_WHERE = {"ffi": ".abi", "Cap": ".constants", "ExitReason": ".constants", "Ioctl": ".constants",
          "Kvm": ".fd", "KvmError": ".fd", "Vcpu": ".fd", "Vm": ".fd"}


def __getattr__(name: str):
    """Load ``name`` from its submodule on first use."""
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value
