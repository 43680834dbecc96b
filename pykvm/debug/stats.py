"""Exit statistics: how many exits of each kind, and how long pykvm took to handle them.

Always collected, so the exit loop pays for them on every exit; they are built for that:

* One *record* per exit reason, per port and per MMIO address, and per vCPU (no locks, no
  races): a flat list of ``BUCKETS`` histogram counters followed by the total in ns. Recording
  an exit (:func:`record`, the one place the bucket formula is written) is two list increments,
  and the record of a port is found with one dict lookup.
* Time is *handling* time: from KVM_RUN's return to the next KVM_RUN (``time.perf_counter_ns``),
  i.e. what pykvm itself adds to an exit. With ``--trace`` the printing is part of it.
* The histogram has half-octave buckets: a duration ``dt`` (ns) goes to bucket
  ``(dt * dt).bit_length()``, so bucket ``b`` holds ``2**((b-1)/2) <= dt < 2**(b/2)`` (each bucket
  is sqrt(2) wide). Percentiles are read from it, interpolated geometrically inside the bucket:
  good to a few percent, at the price of one multiplication per exit.
* The number of distinct ports / MMIO addresses recorded per vCPU is capped (a guest probing
  the whole MMIO space must not eat host memory): further addresses share one "other" record.

:func:`summarize` merges the vCPUs' records (histograms add up) with the buses' unclaimed
accesses and the emulated instructions; :func:`format_table` and :func:`to_json` present it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..kvm.constants import ExitReason

BUCKETS = 128                # half-octaves: covers every duration below 2**64 ns
TOTAL = BUCKETS              # index of the total-ns slot in a record
RECORD = BUCKETS + 1
MAX_KEYS = 4096              # distinct ports or MMIO addresses kept per vCPU
NREASONS = 64                # as Machine.exit_counts
OTHER = -1                   # the key of the shared record once MAX_KEYS is reached


def new_record() -> list[int]:
    """An empty record: BUCKETS histogram counters, then the total in ns."""
    return [0] * RECORD


def record(rec: list[int], ns: int) -> None:
    """Charge one exit whose handling took ``ns`` (>= 0) nanoseconds to the record ``rec``."""
    rec[(ns * ns).bit_length()] += 1    # the half-octave bucket: see the module docstring
    rec[TOTAL] += ns


def bucket_of(ns: int) -> int:
    """The histogram bucket :func:`record` puts a duration of ``ns`` nanoseconds in."""
    rec = new_record()
    record(rec, ns)
    return rec.index(1)


def bucket_bounds(b: int) -> tuple[float, float]:
    """[low, high) in ns of bucket ``b``."""
    if b == 0:
        return 0.0, 1.0
    return 2 ** ((b - 1) / 2), 2 ** (b / 2)


class VcpuStats:
    """The records of one vCPU, written only by that vCPU's thread."""

    record = staticmethod(record)

    def __init__(self) -> None:
        self.reasons = [new_record() for _ in range(NREASONS)]   # exits other than IO and MMIO
        self.pio: dict[int, list[int]] = {}                      # port -> record
        self.mmio: dict[int, list[int]] = {}                     # guest-physical address -> record
        self.scratch = new_record()   # time the exit loop must not report (e.g. stopped in a debugger)

    def pio_record(self, port: int) -> list[int]:
        """The record for a port seen for the first time (the exit loop's slow path)."""
        return _add(self.pio, port)

    def mmio_record(self, addr: int) -> list[int]:
        """The record for an MMIO address seen for the first time."""
        return _add(self.mmio, addr)


def _add(table: dict[int, list[int]], key: int) -> list[int]:
    if key not in table and len(table) >= MAX_KEYS:
        key = OTHER
    rec = table.get(key)
    if rec is None:
        rec = table[key] = new_record()
    return rec


# --- summaries ------------------------------------------------------------------------------
@dataclass
class Row:
    """Merged numbers for one reason, port or address."""

    count: int = 0
    total_ns: int = 0
    hist: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    def add(self, rec: list[int]) -> None:
        hist = self.hist
        for b in range(BUCKETS):
            n = rec[b]
            if n:
                hist[b] += n
                self.count += n
        self.total_ns += rec[TOTAL]

    def merge(self, other: Row) -> None:
        for b in range(BUCKETS):
            self.hist[b] += other.hist[b]
        self.count += other.count
        self.total_ns += other.total_ns

    @property
    def mean_ns(self) -> float:
        return self.total_ns / self.count if self.count else 0.0

    def percentile(self, q: float) -> float:
        return percentile(self.hist, q)

    def as_dict(self) -> dict:
        return {"count": self.count, "total_ns": self.total_ns, "mean_ns": round(self.mean_ns, 1),
                "p50_ns": round(self.percentile(50), 1), "p99_ns": round(self.percentile(99), 1),
                "histogram": {f"{bucket_bounds(b)[0]:.0f}": n for b, n in enumerate(self.hist) if n}}


def percentile(hist: list[int], q: float) -> float:
    """The q-th percentile (0 < q <= 100) of a bucket histogram, interpolated geometrically
    within the bucket it falls in; 0 for an empty histogram."""
    count = sum(hist)
    if count == 0:
        return 0.0
    rank = q / 100 * count          # the rank-th smallest value, 0 < rank <= count
    seen = 0
    for b, n in enumerate(hist):
        if n and seen + n >= rank:
            low, high = bucket_bounds(b)
            frac = (rank - seen) / n
            if b <= 1:
                return low + (high - low) * frac
            return low * math.pow(high / low, frac)
        seen += n
    return bucket_bounds(len(hist) - 1)[1]   # not reached


@dataclass
class Summary:
    """Every vCPU's records merged: by reason, by port, by MMIO address; plus what the buses
    did not claim and the instructions pykvm completed for KVM's emulator."""

    reasons: dict[str, Row]
    ports: dict[int, Row]
    mmio: dict[int, Row]
    names: dict[tuple[str, int], str]            # ("pio"|"mmio", key) -> device name
    unclaimed_pio: dict[int, int]
    unclaimed_mmio: dict[int, int]
    emulated: dict[str, int]


def summarize(stats: list[VcpuStats], pio_bus=None, mmio_bus=None, emulated=None) -> Summary:
    reasons: dict[str, Row] = {}
    ports: dict[int, Row] = {}
    mmio: dict[int, Row] = {}
    for vcpu in stats:
        for reason, rec in enumerate(vcpu.reasons):
            if any(rec[:BUCKETS]):
                reasons.setdefault(_reason_name(reason), Row()).add(rec)
        for table, out in ((vcpu.pio, ports), (vcpu.mmio, mmio)):
            for key, rec in table.items():
                out.setdefault(key, Row()).add(rec)
    for name, table in (("IO", ports), ("MMIO", mmio)):
        if table:
            total = reasons.setdefault(name, Row())
            for row in table.values():
                total.merge(row)
    names = {}
    for kind, bus, table in (("pio", pio_bus, ports), ("mmio", mmio_bus, mmio)):
        if bus is not None:
            for key in table:
                hit = bus.find(key) if key >= 0 else None
                names[(kind, key)] = _device_name(hit[0]) if hit else "unclaimed"
    order = sorted(reasons, key=lambda name: -reasons[name].count)
    return Summary(
        reasons={name: reasons[name] for name in order},
        ports=dict(sorted(ports.items())), mmio=dict(sorted(mmio.items())), names=names,
        unclaimed_pio=dict(sorted(pio_bus.unclaimed.items())) if pio_bus is not None else {},
        unclaimed_mmio=dict(sorted(mmio_bus.unclaimed.items())) if mmio_bus is not None else {},
        emulated=dict(emulated or {}))


def _reason_name(reason: int) -> str:
    try:
        return ExitReason(reason).name
    except ValueError:
        return f"reason {reason}"


def _device_name(device) -> str:
    name = getattr(device, "name", None)
    return name if isinstance(name, str) and name else type(device).__name__


def _key(key: int, width: int) -> str:
    return "other" if key == OTHER else f"{key:#0{width}x}"


# --- presentation ---------------------------------------------------------------------------
def format_table(summary: Summary) -> str:
    """The ``--stats`` table: one line per exit reason, then per port and per MMIO address."""
    head = f"{'exit':<28}{'count':>9}{'total ms':>11}{'mean µs':>10}{'p50 µs':>9}{'p99 µs':>9}"
    lines = ["exit statistics (time = pykvm's handling, from KVM_RUN's return to the next KVM_RUN)",
             head, "-" * len(head)]

    def line(label: str, row: Row) -> str:
        return (f"{label:<28}{row.count:>9}{row.total_ns / 1e6:>11.3f}{row.mean_ns / 1e3:>10.2f}"
                f"{row.percentile(50) / 1e3:>9.2f}{row.percentile(99) / 1e3:>9.2f}")

    for name, row in summary.reasons.items():
        lines.append(line(name, row))
        table, kind, width = ((summary.ports, "pio", 6) if name == "IO" else
                              (summary.mmio, "mmio", 10) if name == "MMIO" else (None, "", 0))
        for key, sub in (table or {}).items():
            device = summary.names.get((kind, key), "")
            label = f"  {'port ' if kind == 'pio' else ''}{_key(key, width)} {device}"
            lines.append(line(label[:28], sub))
    if not summary.reasons:
        lines.append("(no exits)")
    for title, table, width in (("unclaimed port I/O", summary.unclaimed_pio, 6),
                                ("unclaimed MMIO", summary.unclaimed_mmio, 10)):
        if table:
            lines.append(f"{title}: " + ", ".join(f"{_key(k, width)} x{n}" for k, n in table.items()))
    if summary.emulated:
        lines.append("completed for KVM's emulator: " + ", ".join(f"{k} x{n}" for k, n in summary.emulated.items()))
    return "\n".join(lines)


def to_json(summary: Summary) -> dict:
    """The ``--stats-json`` document (times in ns; histogram keys are bucket lower bounds)."""
    return {
        "time": "ns of handling in pykvm, from KVM_RUN's return to the next KVM_RUN",
        "histogram_buckets": "half-octave: bucket b holds 2**((b-1)/2) <= ns < 2**(b/2); keyed by lower bound",
        "reasons": {name: row.as_dict() for name, row in summary.reasons.items()},
        "ports": {_key(k, 6): dict(row.as_dict(), device=summary.names.get(("pio", k), ""))
                  for k, row in summary.ports.items()},
        "mmio": {_key(k, 10): dict(row.as_dict(), device=summary.names.get(("mmio", k), ""))
                 for k, row in summary.mmio.items()},
        "unclaimed": {"pio": {_key(k, 6): n for k, n in summary.unclaimed_pio.items()},
                      "mmio": {_key(k, 10): n for k, n in summary.unclaimed_mmio.items()}},
        "emulated": summary.emulated,
    }
