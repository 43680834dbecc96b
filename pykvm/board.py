"""The PC's layout: which device sits at which port, MMIO window and interrupt.

:class:`pykvm.machine.Machine` assembles a machine from this table; it knows no port numbers.
Each address comes from the device module's own constants (``BASE``/``LENGTH``, ``PORT``), so a
device and its place on the board cannot drift apart. virtio-mmio devices are placed by
:mod:`pykvm.devices.virtio` (windows from 0xd0001000, IRQs from 5), after the MMIO test device.
"""

from __future__ import annotations

from dataclasses import dataclass

from .devices import cmos, debug_exit, fw_cfg, i8042, mmio_test, pci, poweroff, sink, uart

FIRMWARE_END = 1 << 32          # the reset-vector firmware ends at 4 GiB
TSS_ADDR = 0xFFFB_D000          # KVM_SET_TSS_ADDR: three pages just below the firmware, not RAM
IDENTITY_MAP_ADDR = 0xFFFB_C000  # KVM_SET_IDENTITY_MAP_ADDR: one page below that


@dataclass(frozen=True)
class Place:
    """Where a device is attached: ``base`` (port or guest-physical address) and ``length``."""

    base: int
    length: int


COM1 = Place(uart.BASE, uart.LENGTH)
COM1_IRQ = uart.IRQ
DEBUG_EXIT = Place(debug_exit.PORT, 1)
POST = Place(sink.POST_PORT, 1)
CMOS = Place(cmos.BASE, cmos.LENGTH)
RTC_IRQ = cmos.IRQ
I8042_DATA = Place(i8042.DATA_PORT, 1)
I8042_COMMAND = Place(i8042.COMMAND_PORT, 1)
PCI_CONFIG = Place(pci.BASE, pci.LENGTH)
POWEROFF = Place(poweroff.PORT, 1)
FW_CFG = Place(fw_cfg.BASE, fw_cfg.LENGTH)
MMIO_TEST = Place(mmio_test.BASE, mmio_test.SIZE)

# Ports that guests (Linux above all) probe and that need no behaviour: claimed as explicit sinks
# so probing is neither fatal nor counted as a stray access. With the in-kernel irqchip, KVM
# answers the PIC and PIT ports itself and these never see an access. (port, length, what)
PROBED_PORTS = [
    (0x20, 2, "PIC master"),
    (0xA0, 2, "PIC slave"),
    (0x40, 4, "PIT"),
    (0x61, 1, "PC speaker / NMI status"),
    (0x87, 1, "DMA page register"),
    (0xED, 1, "I/O delay port"),
    (0x2F8, 8, "COM2 (absent)"),
    (0x3E8, 8, "COM3 (absent)"),
    (0x2E8, 8, "COM4 (absent)"),
]
