"""--trace, --stats and --step end to end, on the bundled guests."""

from __future__ import annotations

import io
import json
import os
import re

import pytest
from conftest import needs_kvm, run_pykvm

pytestmark = needs_kvm

LINE = re.compile(r"vcpu(\d+) (\w+) +(.*?) +rip=(0x[0-9a-f]+)  (0x[0-9a-f]+): (.+)$")


def test_trace_shows_every_exit_with_the_instruction_behind_it():
    r = run_pykvm("run", "hello-prot32", "--trace")
    assert r.returncode == 0, r.stderr
    text = r.stdout.decode()
    lines = [line for line in r.stderr.decode().splitlines() if line.startswith("vcpu")]
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), [line for line, m in zip(lines, parsed, strict=True) if not m]
    outs = [m for m in parsed if m[2] == "IO" and m[3].startswith("out")]
    ins = [m for m in parsed if m[2] == "IO" and m[3].startswith("in ")]
    # one THR write per character, each after one LSR poll; the 32-bit code's `out dx, al`
    assert "".join(chr(int(re.search(r"value=(0x[0-9a-f]+)", m[3])[1], 16)) for m in outs) == text
    assert all(m[6] == "out dx, al" and "port=0x3f8 size=1" in m[3] for m in outs)
    assert len(ins) == len(outs) and all(m[6] == "in al, dx" and "port=0x3fd" in m[3] for m in ins)
    # RIP: an IN exits before the instruction completes, an OUT (on kvm_pvm) after: the tracer
    # shows the instruction that made the exit either way
    assert all(int(m[5], 16) <= int(m[4], 16) for m in parsed)
    assert parsed[-1][2] == "HLT" and parsed[-1][6] == "hlt"


def test_trace_filter_and_mmio_writes():
    r = run_pykvm("run", "mmio", "--trace-filter", "mmio:0xd0000008-0xd000000f,hlt")
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.decode().splitlines() if line.startswith("vcpu")]
    assert lines and all(" MMIO " in line or " HLT " in line for line in lines)
    assert not any("0xd0000000 " in line or "0xd0000010" in line for line in lines)
    write = [line for line in lines if " write " in line]
    # the MMIO write is reported with RIP already past it; the tracer finds the instruction
    assert len(write) == 2 and "size=8 value=0x1122334455667788" in write[0]
    assert write[0].endswith("mov qword ptr [rbx + 8], rax")
    assert "size=8 value=0x1812345678" in write[1]          # the far pointer the guest then loads with lfs
    assert any(" read " in line and "size=6" in line and "lfs edx" in line for line in lines)


def test_trace_reads_the_same_registers_with_or_without_sync_regs():
    """KVM_CAP_SYNC_REGS (registers in the kvm_run page) and the KVM_GET_REGS fallback agree."""
    from pykvm.boot.bundled import find
    from pykvm.boot.flat import load_flat
    from pykvm.debug.trace import Tracer
    from pykvm.machine import Machine

    guest = find("mmio")
    outputs = []
    for sync in (True, False):
        out = io.StringIO()
        with Machine(mem_size=16 << 20, serial_out=lambda b: None) as m:
            m.load(load_flat(guest.path.read_bytes(), 0x8000, guest.mode, 16 << 20))
            m.tracer = Tracer(m, out=out, sync_regs=sync)
            assert m.run(timeout=30).status == 0
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1] and outputs[0].count("\n") > 20


def test_stats_table_and_json(tmp_path):
    path = tmp_path / "stats.json"
    r = run_pykvm("run", "hello-long64", "--stats", "--stats-json", str(path))
    assert r.returncode == 0, r.stderr
    err = r.stderr.decode()
    assert re.search(r"^IO +\d+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+$", err, re.M), err
    assert re.search(r"^  port 0x03f8 \w+ +\d+", err, re.M)
    doc = json.loads(path.read_text())
    chars = len(r.stdout)
    assert doc["ports"]["0x03f8"]["count"] == chars == doc["ports"]["0x03fd"]["count"]
    assert doc["reasons"]["IO"]["count"] == 2 * chars and doc["reasons"]["HLT"]["count"] == 1
    io_row = doc["reasons"]["IO"]
    assert 0 < io_row["p50_ns"] <= io_row["p99_ns"] and io_row["total_ns"] > 0
    assert sum(io_row["histogram"].values()) == io_row["count"]


def test_step_prints_each_instruction_and_what_it_changed():
    r = run_pykvm("run", "hello-long64", "--step", "12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(b"Hello from 64-bit long mode!")        # and the guest then runs normally
    steps = [line for line in r.stderr.decode().splitlines() if line.startswith("step ")]
    assert len(steps) == 12
    assert re.match(r"step +1  0x8000: fc +cld$", steps[0])
    assert re.match(r"step +2  0x8001: be [0-9a-f ]+ +mov esi, (0x[0-9a-f]+) +rsi=\1$", steps[1])
    assert re.match(r"step +3  0x8006: e8 .* call (0x[0-9a-f]+) +rsp=0x6ff8 rip=\1$", steps[2])
    assert "stepped 12 instructions; vCPU 0 continues normally" in r.stderr.decode()


def test_step_over_port_and_mmio_writes_is_exact():
    """kvm_pvm loses the single-step trap of an instruction that exits with a port or MMIO
    write; the step guard (a hardware breakpoint on the next instruction) keeps steps exact."""
    r = run_pykvm("run", "mmio", "--step", "60")
    assert r.returncode == 0, r.stderr
    steps = [line.split()[2:4] for line in r.stderr.decode().splitlines() if line.startswith("step ")]
    addrs = [int(a.rstrip(":"), 16) for a, _ in steps]
    write = addrs.index(0x8022)                     # mov qword ptr [rbx + 8], rax (the MMIO write)
    assert addrs[write + 1] == 0x8026
    outs = [i for i, (_, first_byte) in enumerate(steps) if first_byte == "ee"]   # out dx, al
    assert outs and all(addrs[i + 1] == addrs[i] + 1 for i in outs if i + 1 < len(addrs))


@pytest.mark.parametrize("args,message", [
    (["--trace-filter", "bogus"], "unknown exit reason"),
    (["--gdb-wait"], "needs --gdb"),
    (["--gdb", "localhost:notaport"], "[HOST]:PORT"),
    (["--step", "-3"], "at least 1"),
])
def test_bad_debug_options_are_usage_errors(capsys, args, message):
    from pykvm.cli import main
    assert main(["run", "hello-long64", *args]) == 2      # refused before any VM is made
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("where,message", [("dir", "is a directory"), ("missing/stats.json", "does not exist")])
def test_stats_json_that_cannot_be_written_is_refused_before_the_run(tmp_path, where, message):
    """--stats-json is written after the run: a path that cannot be a file is refused before the guest
    starts (status 2), not after a long run whose statistics would then be lost."""
    (tmp_path / "dir").mkdir()
    r = run_pykvm("run", "hello-long64", "--stats-json", str(tmp_path / where))
    assert r.returncode == 2 and message in " ".join(r.stderr.decode().split()), r.stderr
    assert b"Hello" not in r.stdout            # the guest never ran


@needs_kvm
def test_stats_json_to_a_fifo_is_read_by_its_reader_and_refused_without_one(tmp_path):
    """--stats-json may name a FIFO another program reads (the record goes to it); a FIFO that nobody reads is
    refused with one line (status 2) when the run ends, instead of blocking that end for ever."""
    fifo = tmp_path / "stats.fifo"
    os.mkfifo(fifo)
    r = run_pykvm("run", "hello-long64", "--stats-json", str(fifo), timeout=60)
    assert r.returncode == 2, r.stderr
    assert "a FIFO that no process reads" in " ".join(r.stderr.decode().split()), r.stderr
    assert b"Hello" in r.stdout                 # the run itself happened
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)     # a reader is there before pykvm ends (its record is a
    try:                                                     # few KiB: the FIFO's buffer holds it until read)
        r = run_pykvm("run", "hello-long64", "--stats-json", str(fifo), timeout=60)
        record = os.read(reader, 1 << 16)
    finally:
        os.close(reader)
    assert r.returncode == 0, r.stderr
    assert json.loads(record)["reasons"]["HLT"]["count"] == 1
