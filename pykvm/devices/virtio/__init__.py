"""virtio devices on a Machine: where they sit, how guests learn of them, and the fast path.

The pieces: :mod:`.queue` (split virtqueues), :mod:`.mmio` (the virtio-mmio transport) and one
file per device (:mod:`.blk`, :mod:`.console`, :mod:`.rng`, :mod:`.net`). This module places them and wires
them to KVM; the CLI calls :func:`linux_cmdline` (before the boot plan is made) and
:func:`attach_virtio` (once the Machine exists).

Placement. Devices take 0x200-byte windows in the MMIO hole from :data:`MMIO_BASE`
(0xd0001000; the MMIO test device has 0xd0000000-0xd0000fff) upwards, in the order: drives
(``--drive``, in command-line order), the console, the entropy device, the network cards
(``--net``, in command-line order). Each gets its own ISA
interrupt from :data:`IRQS` (5, 6, 7, 9, 10, 11, 12, 14, 15: from 5 up, skipping COM1's 4, the
RTC's 8 and the FPU's 13), edge-triggered as the MP table declares every ISA interrupt.

Announcement.

* To Linux: ``virtio_mmio.device=0x200@0xd0001000:5`` per device on the kernel command line
  (CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES); with ``console`` also ``console=hvc0``.
* To any guest: the fw_cfg file ``etc/pykvm/virtio-mmio`` (:data:`FW_CFG_FILE`), one 16-byte
  little-endian record per device, in placement order::

      le64 base   guest-physical address of the register window
      le32 size   its length (0x200)
      le16 irq    the ISA interrupt (I/O APIC pin / 8259 line)
      le16 type   the virtio device ID (1 network, 2 block, 3 console, 4 entropy)

  The number of devices is the file size / 16. (fw_cfg's own directory is big-endian; this file
  is little-endian, like the devices it describes.)

Fast path, chosen at run time (:func:`fast_path`, shown by ``pykvm info``):

* Notifications: with KVM_CAP_IOEVENTFD, each queue's QueueNotify write (4 bytes, data = queue
  index) signals an eventfd inside KVM instead of exiting to pykvm; one thread per device waits
  on its eventfds and processes the queue. Without it, the write is an MMIO exit and the queue is
  processed on the vCPU thread.
* Interrupts: with an in-kernel irqchip and KVM_CAP_IRQFD, raising the line is a write to an
  eventfd that KVM turned into an interrupt (an edge: the pins are edge-triggered); else
  KVM_IRQ_LINE. A machine without an irqchip gets no interrupts (guests poll).
* ``PYKVM_VIRTIO_FASTPATH=0`` in the environment forces the fallbacks (tests use it to cover both).

The device threads stop and the image files close when the machine closes (Machine.on_close).
"""

from __future__ import annotations

import os
import re
import select
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ...console import stdout_write
from ...errors import PykvmError, UsageError
from ...kvm.constants import KVM_IOEVENTFD_FLAG_DATAMATCH, KVM_IOEVENTFD_FLAG_DEASSIGN, Cap
from ...kvm.irq import IrqfdLine, IrqLine, KvmIrqLine
from ..quiesce import PARK_TIMEOUT, ParkPoint, pause_all, resume_all
from .blk import Block
from .console import VirtioConsole
from .mmio import MMIO_SIZE, QUEUE_NOTIFY, VirtioDevice, VirtioMmio
from .net import Net
from .rng import Entropy

MMIO_BASE = 0xD000_1000
IRQS = (5, 6, 7, 9, 10, 11, 12, 14, 15)
FW_CFG_FILE = "etc/pykvm/virtio-mmio"
FW_CFG_RECORD = struct.Struct("<QIHH")     # base, size, irq, device type
FASTPATH_ENV = "PYKVM_VIRTIO_FASTPATH"

__all__ = ["Block", "VirtioConsole", "DriveSpec", "Entropy", "FastPath", "Net", "NetSpec", "Slot", "VirtioMmio",
           "VirtioSet", "attach_virtio", "fast_path", "fw_cfg_table", "layout", "linux_cmdline", "parse_drive",
           "parse_net"]


@dataclass(frozen=True)
class DriveSpec:
    """One ``--drive FILE[,readonly]``."""

    path: str
    readonly: bool = False


def parse_drive(text: str) -> DriveSpec:
    """``disk.img`` or ``disk.img,readonly`` (also ``ro``) -> DriveSpec. Raises UsageError."""
    path, *options = text.split(",")
    readonly = False
    for option in options:
        if option in ("readonly", "ro", "readonly=on"):
            readonly = True
        elif option not in ("", "readonly=off", "rw"):
            raise UsageError(f"--drive {text}: unknown option {option!r} (the only one is 'readonly')")
    if not path:
        raise UsageError(f"--drive {text}: no file named")
    return DriveSpec(path, readonly)


@dataclass(frozen=True)
class NetSpec:
    """One ``--net tap=NAME[,mac=MAC]``: the host TAP and the guest's MAC (None: a random one)."""

    tap: str
    mac: bytes | None = None


def parse_mac(text: str) -> bytes:
    """``52:54:00:12:34:56`` (or with ``-``) -> 6 bytes. Raises UsageError for anything else: six
    groups of one or two ASCII hex digits, nothing more (no signs, blanks or other digits, which
    ``int`` would take). Also refused, as Linux's ``is_valid_ether_addr`` refuses them (a driver
    then cannot bring the card up): a multicast address (bit 0 of the first octet) and the
    all-zero one."""
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(_MAC_OCTET.fullmatch(p) for p in parts):
        raise UsageError(f"{text!r} is not a MAC address (six hex octets, e.g. 02:00:00:00:00:01)")
    mac = bytes(int(p, 16) for p in parts)
    if mac[0] & 1:
        raise UsageError(f"MAC address {text} is a multicast address; a card needs a unicast one "
                         "(even first octet)")
    if not any(mac):
        raise UsageError(f"MAC address {text} is all zeros, which no card may have (e.g. 02:00:00:00:00:01)")
    return mac


_MAC_OCTET = re.compile(r"[0-9A-Fa-f]{1,2}")


def parse_net(text: str) -> NetSpec:
    """``tap=NAME`` or ``tap=NAME,mac=MAC`` -> NetSpec. Raises UsageError."""
    if text == "bridge":
        raise UsageError("--net bridge puts a VM on the daemon's bridge, so it is for `pykvm run -d` and "
                         "`pykvm create --net`; a VM of its own takes --net tap=NAME[,mac=MAC]")
    tap = mac = None
    for option in text.split(","):
        key, eq, value = option.partition("=")
        if key == "tap" and eq and value:
            tap = value
        elif key == "mac" and eq:
            mac = parse_mac(value)
        else:
            raise UsageError(f"--net {text}: unknown or empty option {option!r} (tap=NAME[,mac=MAC])")
    if tap is None:
        raise UsageError(f"--net {text}: no TAP named (tap=NAME[,mac=MAC])")
    return NetSpec(tap, mac)


def random_mac() -> bytes:
    """A random locally administered unicast MAC (first octet 0x02 set, 0x01 clear)."""
    return bytes([0x02]) + os.urandom(5)


@dataclass(frozen=True)
class Slot:
    """Where one device sits: its register window, interrupt and virtio device type."""

    base: int
    size: int
    irq: int
    device_id: int


def layout(device_ids: Sequence[int]) -> list[Slot]:
    """The slots of devices of these types, in order (see the module docstring)."""
    if len(device_ids) > len(IRQS):
        raise UsageError(f"at most {len(IRQS)} virtio devices fit this machine's ISA interrupts, "
                         f"not {len(device_ids)}")
    return [Slot(MMIO_BASE + i * MMIO_SIZE, MMIO_SIZE, IRQS[i], dev) for i, dev in enumerate(device_ids)]


def _device_ids(drives: Sequence[DriveSpec], rng: bool, console: bool, nets: Sequence[NetSpec] = ()) -> list[int]:
    return ([Block.device_id] * len(drives) + [VirtioConsole.device_id] * console + [Entropy.device_id] * rng
            + [Net.device_id] * len(nets))


def linux_cmdline(drives: Sequence[DriveSpec] = (), rng: bool = False, console: bool = False,
                  nets: Sequence[NetSpec] = ()) -> list[str]:
    """The kernel parameters that announce these devices to Linux."""
    slots = layout(_device_ids(drives, rng, console, nets))
    args = [f"virtio_mmio.device={s.size:#x}@{s.base:#x}:{s.irq}" for s in slots]
    if console:
        args.append("console=hvc0")
    return args


def fw_cfg_table(slots: Sequence[Slot]) -> bytes:
    """The contents of the fw_cfg file etc/pykvm/virtio-mmio."""
    return b"".join(FW_CFG_RECORD.pack(s.base, s.size, s.irq, s.device_id) for s in slots)


@dataclass(frozen=True)
class FastPath:
    """Which KVM fast paths the virtio devices use: ioeventfd notifications, irqfd interrupts."""

    ioeventfd: bool
    irqfd: bool

    def describe(self) -> str:
        """One line for ``pykvm info``: how notifications and interrupts travel."""
        notify = "KVM_IOEVENTFD (a device thread per device)" if self.ioeventfd else "MMIO exits (vCPU thread)"
        irq = "KVM_IRQFD" if self.irqfd else "KVM_IRQ_LINE"
        return f"notifications via {notify}, interrupts via {irq}"


def fast_path(kvm, irqchip: bool = True) -> FastPath:
    """What this host's KVM offers: ioeventfds for notifications, irqfds for interrupts."""
    if os.environ.get(FASTPATH_ENV, "1") == "0":
        return FastPath(False, False)
    return FastPath(ioeventfd=kvm.check_extension(Cap.IOEVENTFD) > 0,
                    irqfd=irqchip and kvm.check_extension(Cap.IRQFD) > 0)


class NotifyThread:
    """The device thread of one transport: waits on one eventfd per queue (signalled by KVM on a
    QueueNotify write) and processes that queue.

    Quiescing (:mod:`pykvm.devices.quiesce`): :meth:`pause` returns once the thread is parked, outside any
    queue processing; a notification arriving meanwhile leaves its eventfd signalled and is processed,
    once, after :meth:`resume`."""

    def __init__(self, transport: VirtioMmio, name: str) -> None:
        self.transport = transport
        self.fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in transport.queues]
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)   # "look at the park point"
        self._park = ParkPoint(lambda: os.eventfd_write(self._wake, 1))
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """Start the device thread."""
        self._thread.start()

    def kick(self, index: int) -> None:
        """A notification that reached pykvm anyway (an MMIO exit): hand it to the thread."""
        os.eventfd_write(self.fds[index], 1)

    def _run(self) -> None:
        with self._park.running():
            self._loop()

    def _loop(self) -> None:
        poller = select.poll()
        index_of = {}
        for index, fd in enumerate(self.fds):
            poller.register(fd, select.POLLIN)
            index_of[fd] = index
        poller.register(self._stop, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        park = self._park
        while True:
            park.park()
            for fd, _ in poller.poll():
                if fd == self._stop:
                    return
                if fd == self._wake:
                    _drain(fd)
                    continue
                if park.requested:
                    break          # the notification stays in its eventfd until resume
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                self.transport.process_queue(index_of[fd])   # never raises

    def pause(self, timeout: float | None = PARK_TIMEOUT) -> bool:
        """Park the thread; True once it is parked (or not running)."""
        return self._park.pause(timeout)

    def resume(self) -> None:
        """Let the thread take notifications again, those that came while paused first."""
        self._park.resume()

    def stop(self) -> None:
        """Stop the device thread (waits for it) and close its eventfds."""
        self._park.stop()
        if self._thread.is_alive():
            os.eventfd_write(self._stop, 1)
            self._thread.join()
        for fd in [*self.fds, self._stop, self._wake]:
            os.close(fd)
        self.fds = []


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


@dataclass
class VirtioSet:
    """The virtio devices attached to one machine."""

    slots: list[Slot]
    transports: list[VirtioMmio]
    fast: FastPath
    cmdline: list[str]
    console: VirtioConsole | None = None
    devices: list[VirtioDevice] = field(default_factory=list)
    _threads: list[NotifyThread] = field(default_factory=list)
    _irq_lines: list[IrqfdLine] = field(default_factory=list)

    def pause(self, timeout: float | None = PARK_TIMEOUT) -> bool:
        """Quiesce every device (:mod:`pykvm.devices.quiesce`): the transports stop processing queues and
        raising interrupts (waiting for processing in progress), then the notification threads, the network
        cards' receive threads and the console's host feeders park. When this returns True nothing of these
        devices touches guest memory or an interrupt line until :meth:`resume`; notifications, frames and
        input that arrive meanwhile wait where they are."""
        ok = pause_all(self.transports, timeout)
        ok = pause_all(self._threads, timeout) and ok
        return pause_all([d for d in self.devices if isinstance(d, (Net, VirtioConsole))], timeout) and ok

    def resume(self) -> None:
        """Undo :meth:`pause`: what arrived meanwhile is processed now, once."""
        resume_all(self.transports)     # queues asked for meanwhile: kicked to their (still parked) threads
        resume_all(self._threads)
        resume_all([d for d in self.devices if isinstance(d, (Net, VirtioConsole))])

    def close(self) -> None:
        """Stop the device threads, then close the image files and eventfds."""
        for thread in self._threads:
            thread.stop()
        self._threads = []
        for device in self.devices:
            if isinstance(device, Net):
                device.stop()          # its receive thread, before the transports close
        for transport in self.transports:
            transport.close()
        for device in self.devices:
            device.close()
        for line in self._irq_lines:
            line.close()
        self._irq_lines = []


def _report(name: str, slot: Slot) -> Callable[[str], None]:
    def report(reason: str) -> None:
        print(f"pykvm: {name} at {slot.base:#x}: {reason}; the device needs a reset", file=sys.stderr)
    return report


def attach_virtio(machine, drives: Sequence[DriveSpec] = (), rng: bool = False, console: bool = False,
                  console_out: Callable[[bytes], None] | None = None, *,
                  nets: Sequence[NetSpec] = ()) -> VirtioSet:
    """Create the devices, attach them to ``machine``'s MMIO bus, offer the fw_cfg table, set
    up the fast path, and have the machine stop them when it closes.

    ``console_out`` receives the virtio console's output (default: stdout). Returns the
    :class:`VirtioSet`; its ``cmdline`` is what :func:`linux_cmdline` gives for the same
    devices. Raises UsageError for a drive or a TAP (``nets``) that cannot be opened."""
    slots = layout(_device_ids(drives, rng, console, nets))    # too many devices: refused before opening any
    devices: list[VirtioDevice] = []
    try:
        for spec in drives:
            try:
                devices.append(Block(spec.path, readonly=spec.readonly))
            except OSError as e:
                raise UsageError(f"cannot open drive {spec.path}"
                                 f"{' read-only' if spec.readonly else ''}: {e.strerror}") from None
        net_devices = _open_nets(nets)
    except BaseException:
        for device in devices:
            device.close()
        raise
    console_dev = VirtioConsole(console_out or stdout_write) if console else None
    if console_dev is not None:
        devices.append(console_dev)
    if rng:
        devices.append(Entropy())
    devices.extend(net_devices)
    fast = fast_path(machine.kvm, machine.irqchip)
    result = VirtioSet(slots, [], fast, linux_cmdline(drives, rng, console, nets), console_dev, devices)
    machine.on_close(result.close)
    for device, slot in zip(devices, slots, strict=True):
        transport = VirtioMmio(device, machine.memory, _irq_line(machine, slot.irq, fast, result),
                               on_error=_report(device.name, slot))
        result.transports.append(transport)
        machine.mmio.attach(transport, slot.base, slot.size)
        if fast.ioeventfd:
            _use_ioeventfds(machine.vm, transport, slot, result)
    for device in net_devices:
        device.start()
    add = getattr(machine, "add_quiescable", None)
    if add is not None:
        add(result)       # paused and resumed with the machine (pykvm.devices.quiesce)
    if slots:
        machine.fw_cfg.add_file(FW_CFG_FILE, fw_cfg_table(slots))
    return result


def _open_nets(nets: Sequence[NetSpec]) -> list[Net]:
    """A Net on each TAP; closes those opened if a later one fails (TapError, status 2)."""
    from ..tap import Tap
    opened: list[Net] = []
    try:
        for spec in nets:
            opened.append(Net(Tap.open(spec.tap), spec.mac or random_mac()))
    except BaseException:
        for device in opened:
            device.close()
        raise
    return opened


def _irq_line(machine, irq: int, fast: FastPath, result: VirtioSet) -> IrqLine:
    if not machine.irqchip:
        return IrqLine()
    if fast.irqfd:
        try:
            line = IrqfdLine(machine.vm, irq)
        except PykvmError:
            pass            # KVM refused the irqfd: KVM_IRQ_LINE below
        else:
            result._irq_lines.append(line)
            return line
    return KvmIrqLine(machine.vm, irq)


def _use_ioeventfds(vm, transport: VirtioMmio, slot: Slot, result: VirtioSet) -> None:
    thread = NotifyThread(transport, f"{transport.device.name}@{slot.base:#x}")
    addr = slot.base + QUEUE_NOTIFY
    done = []
    try:
        for index, fd in enumerate(thread.fds):
            vm.ioeventfd(addr, 4, fd, KVM_IOEVENTFD_FLAG_DATAMATCH, datamatch=index)
            done.append((index, fd))
    except PykvmError:
        # KVM refused: take this device's notifications as MMIO exits, and take back the
        # eventfds KVM accepted, or their notifications would vanish into closed eventfds.
        for index, fd in done:
            vm.ioeventfd(addr, 4, fd, KVM_IOEVENTFD_FLAG_DATAMATCH | KVM_IOEVENTFD_FLAG_DEASSIGN, datamatch=index)
        thread.stop()
        return
    transport.notify = thread.kick
    result._threads.append(thread)
    thread.start()
