"""The virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2), and the device contract.

One :class:`VirtioMmio` is one virtio device as the guest sees it: a 0x200-byte register window
in the MMIO hole plus an interrupt line. The register layout (all registers 32 bits wide,
little-endian; R = read, W = write):

=====  ===================  ==  ======================================================
off    name                 RW  meaning
=====  ===================  ==  ======================================================
0x000  MagicValue           R   0x74726976 ("virt")
0x004  Version              R   2 (virtio 1.x; 1 would be the legacy interface)
0x008  DeviceID             R   2 block, 3 console, 4 entropy (0: no device)
0x00c  VendorID             R   0x564b5950, the ASCII bytes "PYKV" (QEMU says "QEMU" here)
0x010  DeviceFeatures       R   32 bits of the offered features, selected by ...
0x014  DeviceFeaturesSel    W   ... 0 (bits 0-31) or 1 (bits 32-63); any other: 0
0x020  DriverFeatures       W   32 bits of the accepted features, selected by ...
0x024  DriverFeaturesSel    W   ... 0 or 1 (others ignored)
0x030  QueueSel             W   the queue the Queue* registers below address
0x034  QueueNumMax          R   its largest size; 0 if there is no such queue
0x038  QueueNum             W   its size (a power of 2, at most QueueNumMax)
0x044  QueueReady           RW  1: the device may use the queue; 0: stop using it
0x050  QueueNotify          W   queue index: "new buffers in this queue"
0x060  InterruptStatus      R   bit 0 used buffer, bit 1 configuration change
0x064  InterruptACK         W   clears the written bits of InterruptStatus
0x070  Status               RW  the device status (below); writing 0 resets the device
0x080  QueueDescLow/High    W   guest-physical address of the descriptor table (0x084: high)
0x090  QueueDriverLow/High  W   ... of the available ring (driver area)
0x0a0  QueueDeviceLow/High  W   ... of the used ring (device area)
0x0fc  ConfigGeneration     R   changes whenever the configuration space changes
0x100  Config               RW  device-specific configuration space (any width)
=====  ===================  ==  ======================================================

Accesses to registers below 0x100 that are not 32-bit and aligned (the spec allows no other)
read as 0 and are ignored when written, as are reads of write-only and writes of read-only
registers. Queue registers of a queue that is ready are ignored when written (a driver must
stop the queue first).

The status state machine (2.1). The driver only ever adds bits, in this order; a write that
clears bits is ignored, and a bit whose precondition fails is dropped:

* ACKNOWLEDGE (1): the guest noticed the device. Always accepted.
* DRIVER (2): it has a driver. Needs ACKNOWLEDGE.
* FEATURES_OK (8): needs DRIVER, and is refused (reads back clear) unless the accepted features
  are a subset of the offered ones and include VIRTIO_F_VERSION_1 (bit 32).
* DRIVER_OK (4): needs FEATURES_OK. The device starts: it looks at every ready queue.
* FAILED (128): the driver gave up. Always accepted; the device stops.
* DEVICE_NEEDS_RESET (64): set by the device only, when the driver broke a rule (a bad chain,
  a bad queue layout). The device stops and, if DRIVER_OK was set, raises a configuration-change
  interrupt. Only a reset clears it.

Writing 0 resets the device: status, features, selectors, queues and InterruptStatus return to
their initial values and the interrupt line drops.

The device does nothing with a queue until DRIVER_OK is set and the queue is ready, and never
after FAILED or DEVICE_NEEDS_RESET. The interrupt line is driven with ``level =
InterruptStatus != 0`` (the transport calls ``IrqLine.set`` on every change of that level).

Threads. Registers are written by vCPU threads; queues are processed either there (QueueNotify
taken as an MMIO exit) or by a device thread woken through an ioeventfd (see
:mod:`pykvm.devices.virtio`). A lock serializes queue processing with every register write
that changes the device's state; InterruptStatus has its own small lock so that an interrupt
handler reading or acknowledging it never waits for a long disk transfer.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ...memory import GuestMemory, GuestMemoryError
from ..bus import IrqLine
from .queue import SplitQueue, VirtqueueError

MAGIC = 0x7472_6976            # "virt"
VERSION = 2
VENDOR_ID = 0x564B_5950        # "PYKV"
MMIO_SIZE = 0x200              # the register window of one device
CONFIG_OFFSET = 0x100

# Register offsets
MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
CONFIG_GENERATION = 0x0FC

# Device status bits (2.1)
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

# InterruptStatus bits
INT_VRING = 1
INT_CONFIG = 2

# Device-independent feature bits (6)
VIRTIO_F_RING_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX

# Device IDs (5)
ID_BLOCK = 2
ID_CONSOLE = 3
ID_ENTROPY = 4


class VirtioDevice:
    """What a device behind the transport provides. Subclass and override.

    ``device_id``, ``features`` (device-specific bits offered, below bit 24) and
    ``queue_sizes`` (QueueNumMax of each queue) describe it. :meth:`config` is the configuration
    space; :meth:`process` handles what the driver made available in one queue (called with the
    transport's lock held, only while the device is running). ``self.transport`` is set when the
    device is attached; a device with work of its own (console input) calls
    ``self.transport.process_queue(index)`` to get at a queue.
    """

    device_id = 0
    name = "virtio"
    features = 0
    queue_sizes: tuple[int, ...] = ()

    transport: VirtioMmio

    def config(self) -> bytes:
        """The device-specific configuration space, as bytes (read at offset 0x100 on)."""
        return b""

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write into the configuration space (ignored unless a device overrides it)."""

    def activate(self) -> None:
        """The driver set DRIVER_OK."""

    def reset(self) -> None:
        """The driver reset the device (or the machine closes)."""

    def process(self, index: int, queue: SplitQueue) -> None:
        """Handle the chains the driver made available in queue ``index``. May raise
        VirtqueueError (the transport then sets DEVICE_NEEDS_RESET)."""

    def close(self) -> None:
        """Release host resources (files)."""

    def state(self) -> dict:
        """The device's own state as plain data (for a snapshot); a device with none gives {}."""
        return {}

    def load_state(self, state: dict) -> None:
        """Take :meth:`state`'s record; ValueError if it does not fit this device."""
        if state != {}:
            raise ValueError(f"{self.name} state is malformed: it has no state of its own")


class _QueueState:
    """The Queue* registers of one queue and, while it is ready, its SplitQueue."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        """The queue's registers at reset: size QueueNumMax, not ready, addresses 0."""
        self.num = self.max_size
        self.ready = False
        self.desc = self.driver = self.device = 0
        self.queue: SplitQueue | None = None


def _set_half(value: int, high: bool, half: int) -> int:
    if high:
        return (value & 0xFFFF_FFFF) | (half << 32)
    return (value & ~0xFFFF_FFFF) | half


class VirtioMmio:
    """The register window of one virtio device (see the module docstring)."""

    def __init__(self, device: VirtioDevice, memory: GuestMemory, irq: IrqLine | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.device = device
        self.memory = memory
        self.irq = irq or IrqLine()
        self.on_error = on_error
        self.offered = TRANSPORT_FEATURES | device.features
        self.queues = [_QueueState(size) for size in device.queue_sizes]
        # How a QueueNotify write is handled: inline by default; a device thread's wake-up when
        # notifications arrive through ioeventfds (pykvm.devices.virtio sets it).
        self.notify: Callable[[int], None] = self.process_queue
        self.config_generation = 0
        self.last_error: str | None = None
        self.notifications = 0       # QueueNotify writes seen as MMIO exits
        self.lock = threading.RLock()
        self._irq_lock = threading.Lock()
        self.interrupt_status = 0
        # Quiescing (pause/resume): queues asked for while paused, and a line raise held back.
        self._paused = False
        self._deferred: set[int] = set()
        self._irq_deferred = False
        device.transport = self
        self._reset_state()

    def _reset_state(self) -> None:
        self.status = 0
        self.device_features_sel = 0
        self.driver_features = 0
        self.driver_features_sel = 0
        self.queue_sel = 0
        for q in self.queues:
            q.reset()
        with self._irq_lock:
            if self.interrupt_status:
                self.interrupt_status = 0
                if self._irq_deferred:
                    self._irq_deferred = False
                else:
                    self.irq.set(False)

    # --- state ---------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        """DRIVER_OK is set and neither FAILED nor DEVICE_NEEDS_RESET: the device may use its queues."""
        return self.status & (DRIVER_OK | FAILED | DEVICE_NEEDS_RESET) == DRIVER_OK

    def negotiated(self, feature: int) -> bool:
        """Whether feature bit(s) ``feature`` were accepted by the driver (FEATURES_OK set)."""
        return bool(self.status & FEATURES_OK and self.driver_features & feature)

    def reset(self) -> None:
        """Return the transport and the device to their initial state (a Status write of 0)."""
        with self.lock:
            self._reset_state()
            self.device.reset()

    # --- interrupts ----------------------------------------------------------------------------
    def raise_interrupt(self, bits: int) -> None:
        """Set ``bits`` (INT_VRING, INT_CONFIG) in InterruptStatus; raise the line if it was low."""
        with self._irq_lock:
            was = self.interrupt_status
            self.interrupt_status = was | bits
            if not was and bits:
                if self._paused:
                    self._irq_deferred = True    # raised on resume
                else:
                    self.irq.set(True)

    def _ack(self, bits: int) -> None:
        with self._irq_lock:
            was = self.interrupt_status
            self.interrupt_status = was & ~bits
            if was and not self.interrupt_status:
                if self._irq_deferred:
                    self._irq_deferred = False   # never raised: nothing to lower
                else:
                    self.irq.set(False)

    # --- quiescing (pykvm.devices.quiesce) -----------------------------------------------------------
    def pause(self, timeout: float | None = None) -> bool:
        """Quiesce the transport: once this returns (it waits for queue processing in progress), no queue is
        processed, so guest memory is not touched, and the interrupt line is not raised, until :meth:`resume`.
        A queue asked for meanwhile (a notification, host input, room for output) is remembered and processed
        on resume; an interrupt is raised then. The device's own threads park separately
        (:class:`pykvm.devices.virtio.VirtioSet`). Always True (``timeout`` is for the protocol)."""
        with self.lock, self._irq_lock:
            self._paused = True
        return True

    def resume(self) -> None:
        """Process the queues asked for while paused (through :attr:`notify`, once each) and raise the
        interrupt held back. Idempotent."""
        with self.lock:
            if not self._paused:
                return
            with self._irq_lock:
                self._paused = False
                if self._irq_deferred:
                    self._irq_deferred = False
                    if self.interrupt_status:
                        self.irq.set(True)
            deferred, self._deferred = sorted(self._deferred), set()
        for index in deferred:
            self.notify(index)

    @property
    def paused(self) -> bool:
        """True between :meth:`pause` and :meth:`resume`."""
        return self._paused

    def config_changed(self) -> None:
        """The device changed its configuration space: new generation, and tell the driver."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFF_FFFF
            if self.status & DRIVER_OK:
                self.raise_interrupt(INT_CONFIG)

    def fail(self, reason: str) -> None:
        """The driver broke a rule: stop, set DEVICE_NEEDS_RESET, tell the driver if it runs."""
        with self.lock:
            self.last_error = reason
            already = self.status & DEVICE_NEEDS_RESET
            self.status |= DEVICE_NEEDS_RESET
            for q in self.queues:
                q.queue = None
            if not already and self.status & DRIVER_OK:
                self.raise_interrupt(INT_CONFIG)
        if not already and self.on_error is not None:
            self.on_error(reason)

    # --- queues --------------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        """Let the device handle queue ``index`` if it may. Never raises: a broken rule sets
        DEVICE_NEEDS_RESET; a fault of the device itself is reported the same way."""
        with self.lock:
            if not self.running or not 0 <= index < len(self.queues):
                return
            if self._paused:
                self._deferred.add(index)     # quiesced: processed on resume
                return
            queue = self.queues[index].queue
            if queue is None:
                return
            try:
                while True:
                    queue.disable_notifications()
                    before = queue.last_avail
                    self.device.process(index, queue)
                    # Buffers that came in while notifications were off are handled now; a device
                    # that took nothing this round (console input with nothing to say) stops here.
                    if not queue.enable_notifications() or queue.last_avail == before:
                        break
                interrupt = queue.needs_interrupt()
            except (VirtqueueError, GuestMemoryError) as e:
                self.fail(f"{self.device.name} queue {index}: {e}")
                return
            except Exception as e:   # a fault in the device model: never let it reach the vCPU
                self.fail(f"{self.device.name} queue {index}: internal error: {e!r}")
                return
        if interrupt:
            self.raise_interrupt(INT_VRING)

    def _queue_ready(self, state: _QueueState, ready: bool) -> None:
        if not ready:
            state.ready = False
            state.queue = None
            return
        if state.ready or state.max_size == 0:
            return
        if not self.status & FEATURES_OK:
            self.fail("a queue was enabled before FEATURES_OK")
            return
        if state.num > state.max_size:
            self.fail(f"queue size {state.num} is larger than QueueNumMax {state.max_size}")
            return
        try:
            state.queue = SplitQueue(self.memory, state.num, state.desc, state.driver, state.device,
                                     indirect=self.negotiated(VIRTIO_F_RING_INDIRECT_DESC),
                                     event_idx=self.negotiated(VIRTIO_F_RING_EVENT_IDX))
        except VirtqueueError as e:
            self.fail(f"{self.device.name} queue {self.queue_sel}: {e}")
            return
        state.ready = True

    # --- the registers -------------------------------------------------------------------------
    def _selected(self) -> _QueueState | None:
        sel = self.queue_sel
        return self.queues[sel] if sel < len(self.queues) else None

    def read(self, offset: int, size: int) -> int:
        """A guest read of ``size`` bytes at register ``offset`` (module docstring for the rules)."""
        if offset >= CONFIG_OFFSET:
            return self._read_config(offset - CONFIG_OFFSET, size)
        if size != 4 or offset % 4:
            return 0
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION_REG:
            return VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            sel = self.device_features_sel
            return (self.offered >> (32 * sel)) & 0xFFFF_FFFF if sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            q = self._selected()
            return q.max_size if q is not None else 0
        if offset == QUEUE_READY:
            q = self._selected()
            return int(q is not None and q.ready)
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        return 0

    def _read_config(self, offset: int, size: int) -> int:
        data = self.device.config()[offset:offset + size]
        return int.from_bytes(data.ljust(size, b"\0"), "little")

    def write(self, offset: int, size: int, value: int) -> None:
        """A guest write of ``size`` bytes at register ``offset`` (module docstring for the rules)."""
        if offset >= CONFIG_OFFSET:
            with self.lock:
                self.device.write_config(offset - CONFIG_OFFSET, value.to_bytes(size, "little"))
            return
        if size != 4 or offset % 4:
            return
        value &= 0xFFFF_FFFF
        if offset == QUEUE_NOTIFY:
            self.notifications += 1
            if value < len(self.queues):
                self.notify(value)
            return
        if offset == INTERRUPT_ACK:
            self._ack(value)
            return
        with self.lock:
            self._write_locked(offset, value)

    def _write_locked(self, offset: int, value: int) -> None:
        if offset == STATUS:
            self._write_status(value)
        elif offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            if self.driver_features_sel < 2 and not self.status & FEATURES_OK:
                self.driver_features = _set_half(self.driver_features, self.driver_features_sel == 1, value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        else:
            q = self._selected()
            if q is None:
                return
            if offset == QUEUE_READY:
                self._queue_ready(q, value == 1)
            elif q.ready:
                return      # a live queue's layout cannot change under the device
            elif offset == QUEUE_NUM:
                q.num = value
            elif offset in (QUEUE_DESC_LOW, QUEUE_DESC_HIGH):
                q.desc = _set_half(q.desc, offset == QUEUE_DESC_HIGH, value)
            elif offset in (QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH):
                q.driver = _set_half(q.driver, offset == QUEUE_DRIVER_HIGH, value)
            elif offset in (QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH):
                q.device = _set_half(q.device, offset == QUEUE_DEVICE_HIGH, value)

    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self._reset_state()
            self.device.reset()
            return
        old = self.status
        if old & ~value & ~DEVICE_NEEDS_RESET:
            return                     # the driver must never clear a bit (other than by reset)
        new = value & ~old & ~DEVICE_NEEDS_RESET
        have = old
        if new & ACKNOWLEDGE:
            have |= ACKNOWLEDGE
        if new & DRIVER and have & ACKNOWLEDGE:
            have |= DRIVER
        if new & FEATURES_OK and have & DRIVER and self._features_acceptable():
            have |= FEATURES_OK
        if new & DRIVER_OK and have & FEATURES_OK:
            have |= DRIVER_OK
        if new & FAILED:
            have |= FAILED
        self.status = have
        if have & DRIVER_OK and not old & DRIVER_OK:
            self.device.activate()
            if self.running:
                for index in range(len(self.queues)):
                    self.process_queue(index)   # buffers offered before DRIVER_OK

    def _features_acceptable(self) -> bool:
        accepted = self.driver_features
        return bool(accepted & VIRTIO_F_VERSION_1) and not accepted & ~self.offered

    # --- snapshots -----------------------------------------------------------------------------
    def state(self) -> dict:
        """The transport's registers and each queue's position, as plain data (for a snapshot): Status, the
        feature selectors and the accepted features, QueueSel, InterruptStatus, ConfigGeneration; per queue
        QueueNum, QueueReady, the three area addresses and, while ready, the next available entry to take,
        the used index and the used index last considered for an interrupt (virtio 1.x 4.2.2, 2.7); and the
        device's own ``state()`` under ``"device"``. Call it with the vCPUs and device threads paused."""
        with self.lock:
            queues = []
            for q in self.queues:
                record = {"num": q.num, "ready": q.ready, "desc": q.desc, "driver": q.driver, "device": q.device}
                if q.queue is not None:
                    record.update(last_avail=q.queue.last_avail, used_idx=q.queue.used_idx,
                                  signalled_used=q.queue.signalled_used)
                queues.append(record)
            return {"device_id": self.device.device_id, "status": self.status,
                    "device_features_sel": self.device_features_sel, "driver_features": self.driver_features,
                    "driver_features_sel": self.driver_features_sel, "queue_sel": self.queue_sel,
                    "interrupt_status": self.interrupt_status, "config_generation": self.config_generation,
                    "queues": queues, "device": self.device.state()}

    def load_state(self, state: dict) -> None:
        """Take :meth:`state`'s record. Everything in it is checked as guest input is: ValueError (one sentence)
        for a field missing, of the wrong type or out of range, features the device does not offer, a ready
        queue whose size or areas the transport would refuse from the driver (not a power of 2, above
        QueueNumMax, misaligned, outside guest RAM), or an available index beyond the ring. The descriptors
        themselves are checked when the device takes them, as always. A pending InterruptStatus raises the
        line again. The device is not started here: :meth:`resume_after_restore` does that once guest memory
        is in place."""
        def number(value, bits: int, what: str) -> int:
            if type(value) is not int or not 0 <= value < 1 << bits:
                raise ValueError(f"virtio-mmio state is malformed: {what} is not a {bits}-bit number")
            return value
        try:
            if state["device_id"] != self.device.device_id:
                raise ValueError(f"virtio-mmio state is for device type {state['device_id']!r}, "
                                 f"not {self.device.device_id} ({self.device.name})")
            status = number(state["status"], 8, "Status")
            values = {k: number(state[k], bits, k) for k, bits in (
                ("device_features_sel", 32), ("driver_features", 64), ("driver_features_sel", 32),
                ("queue_sel", 32), ("interrupt_status", 2), ("config_generation", 32))}
            queues = state["queues"]
            device_state = state["device"]
            if not isinstance(queues, list) or len(queues) != len(self.queues):
                raise ValueError(f"virtio-mmio state is malformed: {self.device.name} has {len(self.queues)} "
                                 "queues")
            if status & ~(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | DEVICE_NEEDS_RESET | FAILED):
                raise ValueError("virtio-mmio state is malformed: Status has undefined bits")
            if status & FEATURES_OK and (values["driver_features"] & ~self.offered
                                         or not values["driver_features"] & VIRTIO_F_VERSION_1):
                raise ValueError(f"virtio-mmio state is malformed: accepted features "
                                 f"{values['driver_features']:#x} are not a valid subset of {self.offered:#x}")
            negotiated = values["driver_features"] if status & FEATURES_OK else 0
            built = []
            for i, (q, record) in enumerate(zip(self.queues, queues, strict=True)):
                num = number(record["num"], 16, f"queue {i} size")
                addrs = [number(record[k], 64, f"queue {i} {k} address") for k in ("desc", "driver", "device")]
                ready = record["ready"]
                if type(ready) is not bool:
                    raise ValueError(f"virtio-mmio state is malformed: queue {i} ready is not true/false")
                queue = None
                if ready:
                    if not status & FEATURES_OK or num > q.max_size:
                        raise ValueError(f"virtio-mmio state is malformed: queue {i} is ready with size {num} "
                                         f"(QueueNumMax {q.max_size}) or before FEATURES_OK")
                    try:
                        queue = SplitQueue(self.memory, num, *addrs,
                                           indirect=bool(negotiated & VIRTIO_F_RING_INDIRECT_DESC),
                                           event_idx=bool(negotiated & VIRTIO_F_RING_EVENT_IDX))
                    except VirtqueueError as e:
                        raise ValueError(f"virtio-mmio state is malformed: queue {i}: {e}") from None
                    if not status & DEVICE_NEEDS_RESET:
                        queue.last_avail = number(record["last_avail"], 16, f"queue {i} last_avail")
                        queue.used_idx = number(record["used_idx"], 16, f"queue {i} used_idx")
                        queue.signalled_used = number(record["signalled_used"], 16, f"queue {i} signalled_used")
                        if (queue.last_avail - queue.used_idx) & 0xFFFF > num:
                            raise ValueError(f"virtio-mmio state is malformed: queue {i} has more chains in "
                                             "flight than entries")
                    else:
                        queue = None   # a device that needs a reset uses no queue
                built.append((num, ready, addrs, queue))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"virtio-mmio state is malformed: {e!r}") from None
        self.device.load_state(device_state)
        with self.lock:
            self.status = status
            self.device_features_sel = values["device_features_sel"]
            self.driver_features = values["driver_features"]
            self.driver_features_sel = values["driver_features_sel"]
            self.queue_sel = values["queue_sel"]
            self.config_generation = values["config_generation"]
            for q, (num, ready, (desc, driver, device), queue) in zip(self.queues, built, strict=True):
                q.num, q.ready, q.desc, q.driver, q.device, q.queue = num, ready, desc, driver, device, queue
        self._ack(0x3)
        self.raise_interrupt(values["interrupt_status"])

    def resume_after_restore(self) -> None:
        """Once guest memory holds the snapshot: start a running device again (``activate``) and look at each
        ready queue once, for buffers the driver made available just before the snapshot."""
        with self.lock:
            if not self.running:
                return
            self.device.activate()
        for index, q in enumerate(self.queues):
            if q.queue is not None:
                self.notify(index)

    def close(self) -> None:
        """Release the device's host resources (its files)."""
        with self.lock:
            for q in self.queues:
                q.queue = None
            self.device.close()
