"""Quiescing devices: how a paused machine's device threads stop touching the guest, and start again.

Pausing a VM takes its vCPUs out of KVM_RUN (:meth:`pykvm.machine.Machine.pause`), but devices work on threads
of their own: the virtio notification threads (ioeventfd), virtio-net's receive thread (TAP), the host console's
input thread (UART, virtio console), the RTC's timer thread, the output writer that tells devices when the host
has room again. Each of these can write guest memory or raise an interrupt. A paused guest must see none of it
(its memory must stay exactly as it is, so that a snapshot is consistent and a paused VM uses no CPU), and no
work may be lost: it is done after resume.

The protocol. A *quiescable* is anything with

``pause(timeout: float | None = None) -> bool``
    From the moment it returns True, the device (with all its threads) neither reads nor writes guest memory
    nor changes an interrupt line, until :meth:`resume`. Returns False if one of its threads did not park
    within ``timeout`` seconds (it may then still touch the guest: the caller resumes and reports it).
``resume() -> None``
    Let it work again. What arrived while paused is processed now, once. Idempotent.

The machine pauses its quiescables after its vCPUs (:meth:`Machine.add_quiescable`) and resumes them before.
While paused, work waits where it arrived and is not taken: a notification eventfd stays signalled, a frame
stays in the TAP, console input stays in its pipe, an RTC event stays in the clock (the timer accounts for it on
resume). A device whose work reaches it through a call from another thread (``feed``, ``host_ready``, a virtio
transport's ``process_queue``) takes nothing while paused and remembers what to do on resume (see
:class:`pykvm.devices.virtio.mmio.VirtioMmio`).

A device thread parks through a :class:`ParkPoint`: the thread calls :meth:`ParkPoint.park` where it holds no
lock and touches nothing (the top of its loop); :meth:`ParkPoint.pause` asks, wakes the thread with the thread's
own wake-up (an eventfd write, an Event) and waits until it parks (or is not running at all).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

PARK_TIMEOUT = 5.0      # seconds a pause waits for a device thread to park, by default


class ParkPoint:
    """Where one device thread parks while its device is paused.

    ``wake()`` makes the thread's blocking wait return (it must then reach :meth:`park` soon). The thread
    brackets its life with :meth:`running` (``with point.running(): loop``) so that a pause never waits for a
    thread that is not there; it calls :meth:`park` at the top of its loop and may test :attr:`requested`
    before taking more work (work it leaves stays where it is). :meth:`stop` releases a parked thread for good
    (before the thread's own stop signal), so a machine closing while paused never waits forever."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._cond = threading.Condition()
        self._requested = False
        self._parked = False
        self._alive = 0
        self._stopped = False

    @property
    def requested(self) -> bool:
        """True while a pause is requested or in force (the thread should take no new work)."""
        return self._requested and not self._stopped

    def pause(self, timeout: float | None = PARK_TIMEOUT) -> bool:
        """Ask the thread to park and wait until it has (or is not running). False after ``timeout`` seconds."""
        with self._cond:
            self._requested = True
            if self._parked or not self._alive or self._stopped:
                return True
        self._wake()
        with self._cond:
            return self._cond.wait_for(lambda: self._parked or not self._alive or self._stopped, timeout)

    def resume(self) -> None:
        """Let the thread go on (idempotent)."""
        with self._cond:
            self._requested = False
            self._cond.notify_all()

    def stop(self) -> None:
        """Release the thread for good: :meth:`park` returns at once from now on."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # --- the thread's side ------------------------------------------------------------------------------------
    def park(self) -> bool:
        """Thread side: while a pause is requested, wait (no CPU) until resume or stop. True if it waited."""
        if not self._requested:
            return False
        with self._cond:
            if not self._requested or self._stopped:
                return False
            self._parked = True
            self._cond.notify_all()
            while self._requested and not self._stopped:
                self._cond.wait()
            self._parked = False
            return True

    def running(self) -> _Running:
        """Thread side: ``with point.running(): ...`` around the thread's whole loop."""
        return _Running(self)


class _Running:
    def __init__(self, point: ParkPoint) -> None:
        self.point = point

    def __enter__(self) -> None:
        with self.point._cond:
            self.point._alive += 1

    def __exit__(self, *exc) -> None:
        with self.point._cond:
            self.point._alive -= 1
            self.point._cond.notify_all()


def pause_all(items: Iterable, timeout: float | None = PARK_TIMEOUT) -> bool:
    """``pause`` each quiescable of ``items`` in order; False (after pausing the rest) if any did not park."""
    ok = True
    for item in items:
        ok = item.pause(timeout) and ok
    return ok


def resume_all(items: Iterable) -> None:
    """``resume`` each quiescable of ``items`` in order."""
    for item in items:
        item.resume()


class FeederSet:
    """The host-side threads feeding one device (the host console's input thread): a device that takes host
    input holds one as ``feeders`` and pauses and resumes it with itself. A feeder joins with :meth:`add`
    (paused at once if the device is paused) and leaves with :meth:`remove`; it is a quiescable."""

    def __init__(self) -> None:
        self._feeders: list = []
        self._paused = False
        self._lock = threading.Lock()

    def add(self, feeder) -> None:
        """``feeder`` pushes host input into the device from now on."""
        with self._lock:
            self._feeders.append(feeder)
            paused = self._paused
        if paused:
            feeder.pause()

    def remove(self, feeder) -> None:
        """``feeder`` no longer feeds the device."""
        with self._lock:
            if feeder in self._feeders:
                self._feeders.remove(feeder)

    def pause(self, timeout: float | None = PARK_TIMEOUT) -> bool:
        """Pause every feeder; True once each has parked."""
        with self._lock:
            self._paused = True
            feeders = list(self._feeders)
        return pause_all(feeders, timeout)

    def resume(self) -> None:
        """Resume every feeder."""
        with self._lock:
            self._paused = False
            feeders = list(self._feeders)
        resume_all(feeders)
