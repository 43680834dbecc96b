"""virtio-rng, the entropy device (virtio 1.x, section 5.4): host randomness for the guest.

One request queue; each chain's device-writable buffers are filled from ``os.urandom`` (at most
:data:`MAX_REQUEST` bytes per chain: the spec lets the device return fewer than asked) and
returned with the count written. Device-readable buffers in a request are ignored. No features,
no configuration space. This is what Linux's ``virtio-rng`` driver reads behind /dev/hwrng.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from .mmio import ID_ENTROPY, VirtioDevice
from .queue import SplitQueue

QUEUE_SIZE = 64
MAX_REQUEST = 64 * 1024


class Entropy(VirtioDevice):
    """virtio-rng: fills each request's writable buffers from ``source`` (default os.urandom)."""

    device_id = ID_ENTROPY
    name = "virtio-rng"
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, source: Callable[[int], bytes] = os.urandom) -> None:
        self.source = source
        self.delivered = 0

    def process(self, index: int, queue: SplitQueue) -> None:
        """Fill each available chain's writable part (at most MAX_REQUEST bytes) and return it."""
        while (chain := queue.pop()) is not None:
            n = chain.write(self.source(min(chain.writable_len, MAX_REQUEST)))
            self.delivered += n
            queue.push(chain.head, n)
