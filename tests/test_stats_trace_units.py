"""Exit statistics and trace filters without a VM: histogram buckets, percentiles, merging,
presentation; the --trace-filter syntax; register lookup for effective addresses."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.debug import stats
from pykvm.debug.trace import TraceFilter, _register_value
from pykvm.devices.bus import Bus
from pykvm.errors import UsageError
from pykvm.kvm.abi import ffi
from pykvm.kvm.constants import ExitReason


@given(st.integers(0, 1 << 62))
def test_a_duration_lies_in_its_bucket(ns):
    low, high = stats.bucket_bounds(stats.bucket_of(ns))
    assert low <= ns < high or (ns == 0 and low == 0)
    assert stats.bucket_of(ns) < stats.BUCKETS


def record(*durations):
    rec = stats.new_record()
    for dt in durations:
        stats.VcpuStats.record(rec, dt)           # what the exit loop calls for every exit
    return rec


@pytest.mark.parametrize("ns,bucket", [(0, 0), (1, 1), (2, 3), (3, 4), (1000, 20), (1448, 21), (1449, 22)])
def test_the_loop_records_a_duration_in_its_half_octave_bucket(ns, bucket):
    rec = record(ns)
    assert rec[bucket] == 1 and sum(rec[:stats.BUCKETS]) == 1 and rec[stats.TOTAL] == ns


def test_percentiles_are_within_a_bucket_of_the_truth():
    durations = [1000 + 10 * i for i in range(99)] + [500_000]
    row = stats.Row()
    row.add(record(*durations))
    assert row.count == 100 and row.total_ns == sum(durations)
    assert abs(row.percentile(50) - 1490) / 1490 < 0.42             # a half-octave bucket: within sqrt(2)
    assert 1980 / 1.42 < row.percentile(99) < 1980 * 1.42          # the 99th value is 1980 ns
    assert row.percentile(100) > 350_000                             # the outlier's bucket
    assert stats.percentile([0] * stats.BUCKETS, 50) == 0


def test_summary_merges_vcpus_and_names_devices():
    pio, mmio = Bus("port I/O"), Bus("MMIO")

    class Uart:
        name = "uart"
    pio.attach(Uart(), 0x3F8, 8)
    pio.unclaimed[0x1234] = 3
    a, b = stats.VcpuStats(), stats.VcpuStats()
    a.pio[0x3F8] = record(2000, 3000)
    b.pio[0x3F8] = record(4000)
    b.pio[0x80] = record(1000)
    a.mmio[0xD000_0000] = record(5000)
    a.reasons[int(ExitReason.HLT)] = record(100_000)
    summary = stats.summarize([a, b], pio, mmio, {"int3: #BP injected": 2})
    assert summary.reasons["IO"].count == 4 and summary.reasons["IO"].total_ns == 10_000
    assert summary.ports[0x3F8].count == 3 and list(summary.reasons)[0] == "IO"    # most frequent first
    assert summary.names[("pio", 0x3F8)] == "uart" and summary.names[("pio", 0x80)] == "unclaimed"
    table = stats.format_table(summary)
    assert "port 0x03f8 uart" in table and "MMIO" in table and "HLT" in table
    assert "unclaimed port I/O: 0x1234 x3" in table and "int3: #BP injected x2" in table
    doc = json.loads(json.dumps(stats.to_json(summary)))
    assert doc["ports"]["0x03f8"]["count"] == 3 and doc["ports"]["0x03f8"]["device"] == "uart"
    assert doc["reasons"]["HLT"]["mean_ns"] == 100_000 and doc["unclaimed"]["pio"] == {"0x1234": 3}


def test_distinct_addresses_are_capped():
    s = stats.VcpuStats()
    for addr in range(stats.MAX_KEYS + 10):
        s.mmio.get(addr) or s.mmio_record(addr)
    assert len(s.mmio) == stats.MAX_KEYS + 1 and stats.OTHER in s.mmio


def test_trace_filter_syntax():
    f = TraceFilter.parse("io:0x3f8-0x3ff, mmio:0xd0000000 ,HLT,pio:0x80")
    io, mmio, hlt = int(ExitReason.IO), int(ExitReason.MMIO), int(ExitReason.HLT)
    assert f.matches(io, 0x3F8) and f.matches(io, 0x3FF) and f.matches(io, 0x80) and not f.matches(io, 0x400)
    assert f.matches(mmio, 0xD000_0000) and not f.matches(mmio, 0xD000_0008)
    assert f.matches(hlt, 0) and not f.matches(int(ExitReason.DEBUG), 0)
    assert TraceFilter.parse("mmio").matches(mmio, 12345)


@pytest.mark.parametrize("spec,message", [
    ("", "empty"), ("io,,hlt", "empty term"), ("frobnicate", "unknown exit reason"),
    ("hlt:0x10", "only io and mmio"), ("io:zz", "LOW-HIGH"), ("io:0x10-0x8", "empty or negative"),
])
def test_trace_filter_errors_name_the_problem(spec, message):
    with pytest.raises(UsageError, match=message):
        TraceFilter.parse(spec)


def test_register_names_for_effective_addresses():
    regs = ffi.new("struct kvm_regs *")
    regs.rax, regs.rbx, regs.r9, regs.rsp = 0x1_2345_6789, 0xFFFF_0000_1111, 0x8_0000_0009, 0x7000
    assert _register_value("rax", regs, 0) == 0x1_2345_6789
    assert _register_value("eax", regs, 0) == 0x2345_6789
    assert _register_value("ax", regs, 0) == 0x6789
    assert _register_value("bx", regs, 0) == 0x1111
    assert _register_value("r9d", regs, 0) == 9 and _register_value("r9", regs, 0) == 0x8_0000_0009
    assert _register_value("esp", regs, 0) == 0x7000
    assert _register_value("rip", regs, 0x8010) == 0x8010
    assert _register_value("riz", regs, 0) is None
