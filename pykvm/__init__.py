"""pykvm: a small x86 hypervisor in Python over the Linux KVM API."""

__version__ = "0.1.0"
