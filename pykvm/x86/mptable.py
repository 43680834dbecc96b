"""Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI finds its CPUs and APICs.

An MP-aware OS (Linux among them) scans the BIOS ROM area 0xF0000-0xFFFFF, among others, for the
16-byte *MP floating pointer structure*, signature ``_MP_`` on a 16-byte boundary. It points to
the *MP configuration table* (signature ``PCMP``): a 44-byte header and then entries, sorted by
entry type as the specification requires:

====  ==========================  =====  ==================================================
type  entry                       bytes  here
====  ==========================  =====  ==================================================
0     processor                   20     one per vCPU: local APIC id = index, BP on CPU 0
1     bus                         8      bus 0, ``ISA``
2     I/O APIC                    8      id = ncpus (after the local APIC ids), 0xFEC00000
3     I/O interrupt assignment    8      ISA IRQs 0-15 except 2 to I/O APIC pins
4     local interrupt assignment  8      ExtINT to LINT0 and NMI to LINT1 of every CPU
====  ==========================  =====  ==================================================

ISA IRQ 0 (the PIT) goes to I/O APIC pin 2 as on a real PC, where pin 0 takes the 8259's output
(pass ``irq0_pin=0`` if the machine routes GSI 0 to pin 0, KVM's default routing); ISA IRQ 2 is
the 8259 cascade and never a device interrupt, so it gets no entry. All ISA entries are INT
type with polarity and trigger "conforms to the bus" (ISA: active high, edge).

The floating pointer's feature byte 1 is 0 (a configuration table is present, not one of the
specification's default configurations) and feature byte 2 is 0: no IMCR, the APICs start in
virtual wire mode, which is how KVM's in-kernel LAPIC and PIC are wired. Each structure has a
checksum byte that makes its bytes sum to 0 modulo 256.
"""

from __future__ import annotations

import struct

MP_BASE = 0xF0000
LAPIC_ADDRESS = 0xFEE00000
IOAPIC_ADDRESS = 0xFEC00000
SPEC_REV = 4                  # MP specification 1.4
LAPIC_VERSION = 0x14          # what KVM's local APIC reports
IOAPIC_VERSION = 0x11         # what KVM's I/O APIC reports
MAX_CPUS = 254                # APIC ids 0-253 for CPUs, ncpus for the I/O APIC; 0xFF is broadcast

OEM_ID = b"PYKVM   "
PRODUCT_ID = b"PYKVM       "

# Entry types
PROCESSOR = 0
BUS = 1
IOAPIC = 2
IO_INTERRUPT = 3
LOCAL_INTERRUPT = 4

# Processor flags
CPU_EN = 0x01
CPU_BP = 0x02
# CPU signature (CPUID.1:EAX layout: stepping 3-0, model 7-4, family 11-8) and features (CPUID.1:EDX)
CPU_SIGNATURE = 6 << 8
FEATURE_FPU = 1 << 0
FEATURE_APIC = 1 << 9
CPU_FEATURES = FEATURE_FPU | FEATURE_APIC

IOAPIC_EN = 0x01

# Interrupt types
INT = 0
NMI = 1
SMI = 2
EXTINT = 3
CONFORMS = 0                  # polarity (bits 1-0) and trigger mode (bits 3-2) as the bus defines

ISA_BUS_ID = 0
ALL_APICS = 0xFF

FLOATING_POINTER = struct.Struct("<4sIBBBBBBBB")        # 16 bytes
HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")           # 44 bytes
PROCESSOR_ENTRY = struct.Struct("<BBBBII8x")           # 20 bytes
BUS_ENTRY = struct.Struct("<BB6s")                     # 8 bytes
IOAPIC_ENTRY = struct.Struct("<BBBBI")                 # 8 bytes
INTERRUPT_ENTRY = struct.Struct("<BBHBBBB")            # 8 bytes, types 3 and 4

_CHECKSUM_IN_FLOATING_POINTER = 10
_CHECKSUM_IN_HEADER = 7


def checksum(data: bytes) -> int:
    """The byte that, added to ``data``, makes the sum 0 modulo 256."""
    return -sum(data) & 0xFF


def _with_checksum(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([checksum(data)]) + data[at + 1:]


def build_mptable(ncpus: int, base: int = MP_BASE, *, irq0_pin: int = 2) -> bytes:
    """The MP floating pointer at ``base``, followed by the configuration table at ``base + 16``."""
    if not 1 <= ncpus <= MAX_CPUS:
        raise ValueError(f"an MP table describes 1 to {MAX_CPUS} CPUs, not {ncpus}")
    if base % 16:
        raise ValueError(f"the MP floating pointer must be 16-byte aligned, not at {base:#x}")
    if base + FLOATING_POINTER.size >= 1 << 32:
        raise ValueError(f"the MP table must lie below 4 GiB, not at {base:#x}")
    if irq0_pin not in (0, 2):
        raise ValueError(f"ISA IRQ 0 goes to I/O APIC pin 0 or 2, not {irq0_pin}")
    ioapic_id = ncpus

    entries = []
    for cpu in range(ncpus):
        flags = CPU_EN | (CPU_BP if cpu == 0 else 0)
        entries.append(PROCESSOR_ENTRY.pack(PROCESSOR, cpu, LAPIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES))
    entries.append(BUS_ENTRY.pack(BUS, ISA_BUS_ID, b"ISA   "))
    entries.append(IOAPIC_ENTRY.pack(IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_EN, IOAPIC_ADDRESS))
    for irq in range(16):
        if irq == 2:
            continue
        pin = irq0_pin if irq == 0 else irq
        entries.append(INTERRUPT_ENTRY.pack(IO_INTERRUPT, INT, CONFORMS, ISA_BUS_ID, irq, ioapic_id, pin))
    entries.append(INTERRUPT_ENTRY.pack(LOCAL_INTERRUPT, EXTINT, CONFORMS, ISA_BUS_ID, 0, ALL_APICS, 0))
    entries.append(INTERRUPT_ENTRY.pack(LOCAL_INTERRUPT, NMI, CONFORMS, ISA_BUS_ID, 0, ALL_APICS, 1))

    body = b"".join(entries)
    header = HEADER.pack(b"PCMP", HEADER.size + len(body), SPEC_REV, 0, OEM_ID, PRODUCT_ID,
                         0, 0, len(entries), LAPIC_ADDRESS, 0, 0, 0)
    table = _with_checksum(header + body, _CHECKSUM_IN_HEADER)

    pointer = FLOATING_POINTER.pack(b"_MP_", base + FLOATING_POINTER.size, 1, SPEC_REV, 0, 0, 0, 0, 0, 0)
    pointer = _with_checksum(pointer, _CHECKSUM_IN_FLOATING_POINTER)
    return pointer + table
