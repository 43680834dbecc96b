"""Interrupt lines as devices see them: a no-op line, KVM_IRQ_LINE and KVM_IRQFD.

A device gets an :class:`IrqLine` and calls ``set(level)`` or ``pulse()``; it never holds the VM.
The machine hands it a :class:`KvmIrqLine` (an ioctl per change, on the in-kernel irqchip) or an
:class:`IrqfdLine` (a write to an eventfd KVM listens on; edge-triggered). KVM API: 4.25
KVM_IRQ_LINE, 4.75 KVM_IRQFD.
"""

from __future__ import annotations

import os


class IrqLine:
    """One interrupt input of the interrupt controller, as a device sees it.

    ``set(level)`` drives the line; ``pulse()`` raises then lowers it (an edge, as the ISA
    devices use). This base class does nothing, for devices with no interrupt wired.
    """

    def set(self, level: bool) -> None:  # pragma: no cover - overridden
        """Drive the line to ``level`` (0 or 1)."""
        pass

    def pulse(self) -> None:
        """Raise then lower the line: one edge-triggered interrupt."""
        self.set(True)
        self.set(False)


class KvmIrqLine(IrqLine):
    """An interrupt line backed by KVM_IRQ_LINE on the in-kernel irqchip (GSI ``gsi``)."""

    def __init__(self, vm, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi

    def set(self, level: bool) -> None:
        """Drive the line to ``level`` (0 or 1)."""
        self._vm.irq_line(self.gsi, 1 if level else 0)


class IrqfdLine(IrqLine):
    """An interrupt line through KVM_IRQFD: raising it writes the eventfd; KVM injects an edge.
    Raises KvmError if KVM refuses the irqfd; ``close()`` releases the eventfd."""

    def __init__(self, vm, gsi: int) -> None:
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            vm.irqfd(self.fd, gsi)
        except BaseException:
            os.close(self.fd)
            raise

    def set(self, level: bool) -> None:
        """Raise an edge when ``level`` is true (an eventfd write); lowering is a no-op for an irqfd."""
        if level:
            os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        """Close the line's eventfd; idempotent."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
