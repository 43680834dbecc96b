"""The CPUID table each vCPU reports, derived from what KVM supports (KVM_GET_SUPPORTED_CPUID).

KVM starts a vCPU with no CPUID at all; a VMM must set one, and on hardware KVM the mode checks
depend on it (EFER.LME is refused unless CPUID says the CPU has long mode). The only per-vCPU
change is the APIC ID, which operating systems read from CPUID to tell the CPUs apart.
"""

from __future__ import annotations


def vcpu_cpuid(supported: list[dict], apic_id: int, ncpus: int) -> list[dict]:
    """KVM's supported CPUID leaves adjusted for one vCPU: its APIC ID and the CPU count."""
    entries = []
    for leaf in supported:
        entry = dict(leaf)
        if entry["function"] == 0x1:
            # EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
            entry["ebx"] = (entry["ebx"] & 0x0000_FFFF) | (min(ncpus, 255) << 16) | ((apic_id & 0xFF) << 24)
            if ncpus > 1:
                entry["edx"] |= 1 << 28   # HTT: the package has more than one logical processor
        elif entry["function"] in (0xB, 0x1F):
            entry["edx"] = apic_id       # x2APIC ID, in every sub-leaf of the topology leaves
        entries.append(entry)
    return entries
