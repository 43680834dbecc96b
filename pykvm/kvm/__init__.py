"""The raw KVM binding: cffi declarations of <linux/kvm.h>, ioctl numbers, and Kvm / Vm / Vcpu."""

from .abi import ffi
from .constants import Cap, ExitReason, Ioctl
from .fd import Kvm, KvmError, Vcpu, Vm

__all__ = ["Cap", "ExitReason", "Ioctl", "Kvm", "KvmError", "Vcpu", "Vm", "ffi"]
