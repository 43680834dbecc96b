"""virtio-net (virtio 1.x, section 5.1): an Ethernet card whose other end is a host TAP device.

Queues: receiveq1 (index 0, host -> guest: the driver offers device-writable buffers) and
transmitq1 (index 1, guest -> host: device-readable buffers). No control queue, one queue pair.

Every frame on either queue is preceded by the 12-byte ``virtio_net_hdr_v1`` (5.1.6)::

    u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size; le16 csum_start; le16 csum_offset;
    le16 num_buffers

The host side is injected (:class:`pykvm.devices.tap.Tap`, or anything with its methods) and
speaks the same header (IFF_VNET_HDR with TUNSETVNETHDRSZ 12), so headers pass through unchanged:
that is what lets the offloads below work without pykvm touching a checksum.

Features offered: MAC (the address is in the configuration space), STATUS (link state: up until
the TAP fails, below), and the offloads CSUM and HOST_TSO4 (the guest may send partially checksummed frames and
64 KiB TCP segments: the host kernel finishes them), GUEST_CSUM and GUEST_TSO4 (the guest accepts
them: :meth:`Net.activate` passes what was negotiated to the TAP with TUNSETOFFLOAD, and the host
kernel segments and checksums whatever the guest did not accept), and MRG_RXBUF (a received frame
may span several receive chains; ``num_buffers`` says how many). Configuration space (5.1.4):
``u8 mac[6]; le16 status; le16 max_virtqueue_pairs`` (1).

Transmit (driven by the driver's notification of transmitq1): each chain is one frame, header
first; it is written to the TAP with one ``writev`` straight from guest memory (GuestMemory
views) and the chain is returned with 0 bytes written. A chain shorter than a header plus an
Ethernet header, longer than :data:`MAX_FRAME` plus the header, or whose header asks for an
offload that was not negotiated is not sent, and counted in ``tx_malformed``; one the host
kernel refuses is counted in ``tx_fails``.

Receive (driven by the TAP): a thread (:meth:`Net.start`) polls the TAP and, when a frame is
waiting, processes receiveq1 through the transport like any queue (so under the transport's lock,
never on a vCPU thread). A frame is copied once, from the TAP into a host buffer, then into the
guest's chains. Without MRG_RXBUF a frame needs one chain; with it, as many as it takes (at most
the queue size). When the driver has offered too few buffers the frame waits, the thread stops
reading the TAP (the kernel queues, then drops, further frames) and the chains already taken are
kept for it; the driver's next notification of receiveq1 resumes delivery. A frame larger than any
buffer the driver can offer (without MRG_RXBUF: than the chain at hand; with it: than a whole
queue of chains) is dropped and counted in ``rx_dropped``, and nothing is written past the
buffers. A chain with no room even for the header is returned unused (``rx_bad_buffers``).

A TAP that fails a read with anything but "nothing waiting" (EBADFD once the interface is deleted
under the VM, ``ip link del``) is counted in ``rx_fails`` and not read again: the link goes down
(STATUS without VIRTIO_NET_S_LINK_UP, and a configuration-change interrupt, 5.1.4) and the receive
thread stops polling the TAP, which would otherwise report the error to every poll and keep a host
CPU spinning. Transmit goes on failing into ``tx_fails``.
"""

from __future__ import annotations

import os
import select
import struct
import threading
from typing import Protocol

from ..quiesce import PARK_TIMEOUT, ParkPoint
from ..tap import TUN_F_CSUM, TUN_F_TSO4, VNET_HDR_SIZE
from .mmio import VirtioDevice
from .queue import Chain, SplitQueue

ID_NET = 1

# Feature bits (5.1.3)
VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16

VIRTIO_NET_S_LINK_UP = 1

# virtio_net_hdr flags and gso_type (5.1.6)
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1

RECEIVEQ = 0
TRANSMITQ = 1
QUEUE_SIZE = 256
HDR_SIZE = VNET_HDR_SIZE           # virtio_net_hdr_v1: 12 bytes
ETH_HLEN = 14
MAX_FRAME = 65535 + ETH_HLEN + 4    # a 64 KiB TSO segment with its Ethernet and VLAN headers
_NUM_BUFFERS_AT = 10               # offset of num_buffers in the header
STALL_RETRY = 0.1                  # seconds: while waiting for receive buffers, look again this often

MAC_LEN = 6


class TapLike(Protocol):
    def fileno(self) -> int: ...
    def recv_into(self, buffer: memoryview) -> int: ...
    def send(self, pieces: list) -> int: ...
    def set_offload(self, flags: int) -> None: ...
    def close(self) -> None: ...


class Net(VirtioDevice):
    """A virtio-net device whose frames go to and come from ``tap``; ``mac`` is 6 bytes."""

    device_id = ID_NET
    name = "virtio-net"
    features = (VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
                | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_MRG_RXBUF)
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, tap: TapLike, mac: bytes) -> None:
        if len(mac) != MAC_LEN:
            raise ValueError(f"a MAC address is {MAC_LEN} bytes, not {len(mac)}")
        self.tap = tap
        self.mac = bytes(mac)
        # Room for the largest frame plus one byte: a read that fills it all was cut short.
        self._buf = bytearray(HDR_SIZE + MAX_FRAME + 1)
        self._view = memoryview(self._buf)
        self._pending = 0            # length of a frame read from the TAP and not yet delivered
        self._held: list[Chain] = []  # receive chains taken from the ring for the pending frame
        self.rx_stalled = False      # a frame waits for receive buffers
        self.tap_failed = False      # a read of the TAP failed: not read again, link down
        self.rx_packets = self.rx_bytes = self.rx_dropped = self.rx_bad_buffers = self.rx_fails = 0
        self.tx_packets = self.tx_bytes = self.tx_malformed = self.tx_fails = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._park = ParkPoint(self._kick_thread)   # the receive thread's, while paused

    # --- configuration and life cycle ---------------------------------------------------------
    def config(self) -> bytes:
        """struct virtio_net_config (5.1.4): mac, status (LINK_UP until the TAP fails), max_virtqueue_pairs 1."""
        return self.mac + struct.pack("<HH", 0 if self.tap_failed else VIRTIO_NET_S_LINK_UP, 1)

    def offloads(self) -> int:
        """The TUN_F_* flags matching what the driver accepted (GUEST_CSUM, GUEST_TSO4)."""
        t = self.transport
        flags = 0
        if t.negotiated(VIRTIO_NET_F_GUEST_CSUM):
            flags |= TUN_F_CSUM
            if t.negotiated(VIRTIO_NET_F_GUEST_TSO4):
                flags |= TUN_F_TSO4
        return flags

    def state(self) -> dict:
        """The card as the guest knows it (for a snapshot): the host TAP's name and the MAC (hex). A restore
        opens the TAP of that name again. ValueError while a received frame waits for the driver's buffers
        (the chains held for it are out of the rings): resume and snapshot again."""
        if self._held or self._pending:
            raise ValueError("the virtio-net card holds a received frame waiting for the guest's buffers: "
                             "resume, let the guest take it and snapshot again")
        return {"tap": getattr(self.tap, "name", None), "mac": self.mac.hex()}

    def load_state(self, state: dict) -> None:
        """Check that this card is the one :meth:`state` recorded (TAP name and MAC); ValueError otherwise."""
        try:
            tap, mac = state["tap"], state["mac"]
        except (KeyError, TypeError) as e:
            raise ValueError(f"virtio-net state is malformed: {e!r}") from None
        if tap != getattr(self.tap, "name", None) or mac != self.mac.hex():
            raise ValueError(f"virtio-net state is for TAP {tap!r} with MAC {mac!r}, not this card's")

    def activate(self) -> None:
        self._set_offload(self.offloads())
        self._held = []
        self.rx_stalled = False
        self._kick_thread()

    def reset(self) -> None:
        self._held = []             # the chains belong to the old rings
        self._pending = 0           # and the frame waiting for them is dropped
        self.rx_stalled = False
        self._set_offload(0)

    def _set_offload(self, flags: int) -> None:
        try:
            self.tap.set_offload(flags)
        except OSError:
            pass                     # a TAP that refuses offloads gets none: always safe

    # --- the queues ---------------------------------------------------------------------------
    def process(self, index: int, queue: SplitQueue) -> None:
        if index == TRANSMITQ:
            self._transmit(queue)
        elif index == RECEIVEQ:
            was = self.rx_stalled
            self.rx_stalled = not self._receive(queue)
            if was and not self.rx_stalled:
                self._kick_thread()  # read the TAP again

    def _transmit(self, queue: SplitQueue) -> None:
        memory = queue.memory
        while (chain := queue.pop()) is not None:
            length = chain.readable_len
            if not HDR_SIZE + ETH_HLEN <= length <= HDR_SIZE + MAX_FRAME or not self._header_ok(chain.read(0, 4)):
                self.tx_malformed += 1
            else:
                views = [memory.view(gpa, n) for gpa, n in chain.readable]
                try:
                    self.tap.send(views)
                    self.tx_packets += 1
                    self.tx_bytes += length - HDR_SIZE
                except OSError:
                    self.tx_fails += 1
                finally:
                    for view in views:
                        view.release()
            queue.push(chain.head, 0)

    def _header_ok(self, head: bytes) -> bool:
        """A transmit header asks only for offloads the driver negotiated (5.1.6.2.1)."""
        flags, gso_type = head[0], head[1]
        t = self.transport
        if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and not t.negotiated(VIRTIO_NET_F_CSUM):
            return False
        if gso_type != VIRTIO_NET_HDR_GSO_NONE:
            return gso_type == VIRTIO_NET_HDR_GSO_TCPV4 and t.negotiated(VIRTIO_NET_F_HOST_TSO4)
        return True

    def _receive(self, queue: SplitQueue) -> bool:
        """Move frames from the TAP into receive chains until the TAP is empty (True) or the
        driver's buffers run out with a frame waiting (False)."""
        mergeable = self.transport.negotiated(VIRTIO_NET_F_MRG_RXBUF)
        while True:
            if not self._pending:
                try:
                    n = self.tap.recv_into(self._view)
                except (BlockingIOError, InterruptedError):
                    return True
                except OSError:
                    self.rx_fails += 1
                    self._link_down()
                    return True
                if n <= HDR_SIZE or n >= len(self._buf):
                    self.rx_dropped += 1 if n > HDR_SIZE else 0
                    continue
                self._pending = n
            if not self._deliver(queue, mergeable):
                return False
            self._pending = 0

    def _link_down(self) -> None:
        """The TAP failed a read: stop reading it and tell the driver the link is down (5.1.4)."""
        if self.tap_failed:
            return
        self.tap_failed = True
        self.transport.config_changed()

    def _next_chain(self, queue: SplitQueue, taken: int) -> Chain | None:
        """The ``taken``-th receive chain for the pending frame (held ones first), or None."""
        while len(self._held) <= taken:
            chain = queue.pop()
            if chain is None:
                return None
            if chain.writable_len < HDR_SIZE:
                self.rx_bad_buffers += 1         # no room for a header: give it back unused
                queue.push(chain.head, 0)
                continue
            self._held.append(chain)
        return self._held[taken]

    def _deliver(self, queue: SplitQueue, mergeable: bool) -> bool:
        """Put the pending frame into receive chains. False if it must wait for buffers; True
        when it is delivered or dropped."""
        n = self._pending
        if not mergeable:
            chain = self._next_chain(queue, 0)
            if chain is None:
                return False
            if chain.writable_len < n:
                self.rx_dropped += 1             # the chain stays held for the next frame
                return True
            struct.pack_into("<H", self._buf, _NUM_BUFFERS_AT, 1)
            queue.push(chain.head, chain.write(self._view[:n]))
            del self._held[0]
        else:
            room, used = 0, 0
            while room < n:
                if used == queue.size:
                    self.rx_dropped += 1         # more than a whole queue of buffers could hold
                    return True
                chain = self._next_chain(queue, used)
                if chain is None:
                    return False
                room += chain.writable_len
                used += 1
            struct.pack_into("<H", self._buf, _NUM_BUFFERS_AT, used)
            done = 0
            for chain in self._held[:used]:
                written = chain.write(self._view[done:n])
                queue.push(chain.head, written)
                done += written
            del self._held[:used]
        self.rx_packets += 1
        self.rx_bytes += n - HDR_SIZE
        return True

    # --- the receive thread -------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread that waits for frames on the TAP (:meth:`stop` ends it)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._rx_loop, name=f"{self.name} rx", daemon=True)
            self._thread.start()

    def _kick_thread(self) -> None:
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)

    def _can_receive(self) -> bool:
        t = self.transport
        return (t.running and t.queues[RECEIVEQ].queue is not None and not self.rx_stalled
                and not self.tap_failed)

    def pause(self, timeout: float | None = PARK_TIMEOUT) -> bool:
        """Quiesce (:mod:`pykvm.devices.quiesce`): the receive thread parks without reading the TAP, so
        frames arriving meanwhile wait in the TAP's queue (the host kernel's, which drops past its length)
        and are delivered after :meth:`resume`. True once the thread has parked (or does not run)."""
        return self._park.pause(timeout)

    def resume(self) -> None:
        """The receive thread reads the TAP again."""
        self._park.resume()

    def _rx_loop(self) -> None:
        with self._park.running():
            self._rx_run()

    def _rx_run(self) -> None:
        poller = select.poll()
        poller.register(self._stop, select.POLLIN)
        poller.register(self._wake, select.POLLIN)
        tap_fd, polling_tap = self.tap.fileno(), False
        park = self._park
        while True:
            park.park()
            want = self._can_receive()
            if want != polling_tap:
                if want:
                    poller.register(tap_fd, select.POLLIN)
                else:
                    poller.unregister(tap_fd)
                polling_tap = want
            # While a frame waits for buffers, look again now and then even without a
            # notification (a driver may add buffers without notifying, as 2.7.10 allows).
            events = poller.poll(STALL_RETRY * 1000 if self.rx_stalled else None)
            for fd, _ in events:
                if fd == self._stop:
                    return
                if fd == self._wake:
                    try:
                        os.eventfd_read(self._wake)
                    except BlockingIOError:
                        pass
            if ((polling_tap and events) or self.rx_stalled) and not park.requested:
                self._process_receiveq()

    def _process_receiveq(self) -> None:
        # Take the transport's lock with a timeout so that stop() called with it held (a
        # transport closing) never waits for a thread that waits for it.
        lock = self.transport.lock
        while not lock.acquire(timeout=STALL_RETRY):
            if self._stopping:
                return
        try:
            self.transport.process_queue(RECEIVEQ)    # never raises; re-takes the (re-entrant) lock
        finally:
            lock.release()

    def stop(self) -> None:
        """End the receive thread and wait for it."""
        thread, self._thread = self._thread, None
        self._park.stop()
        if thread is not None and thread.is_alive():
            self._stopping = True
            os.eventfd_write(self._stop, 1)
            thread.join()

    def close(self) -> None:
        self.stop()
        self.tap.close()
        for name in ("_wake", "_stop"):
            fd = getattr(self, name)
            if fd >= 0:
                setattr(self, name, -1)
                os.close(fd)
