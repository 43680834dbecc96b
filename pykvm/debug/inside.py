"""Wiring ``pykvm run``'s seeing-inside options to a Machine: --trace, --stats, --step, --gdb.

:func:`attach` is called after the Machine is built and loaded and before it runs; the object it
returns prints the statistics after the run (:meth:`Inside.finish`). The gdb stub's listening
socket is closed with the Machine.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from dataclasses import dataclass

from ..errors import UsageError

DEFAULT_GDB_HOST = "127.0.0.1"


@dataclass
class Options:
    """The seeing-inside options of ``pykvm run`` (--trace, --stats, --step, --gdb ...)."""
    trace: bool = False
    trace_filter: str | None = None
    stats: bool = False
    stats_json: str | None = None
    step: int = 0
    step_from: int | None = None
    gdb: str | None = None
    gdb_wait: bool = False


def parse_gdb_address(text: str) -> tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` -> (host, port); the host defaults to loopback."""
    host, colon, port_text = text.rpartition(":")
    if not colon:
        host, port_text = "", text
    host = host.strip("[]") or DEFAULT_GDB_HOST
    try:
        port = int(port_text, 10)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise UsageError(f"--gdb {text!r}: give [HOST]:PORT, e.g. 127.0.0.1:1234 or :1234")
    return host, port


def check(opts: Options) -> None:
    """Usage errors that need no VM."""
    if opts.trace_filter is not None:
        from .trace import TraceFilter
        TraceFilter.parse(opts.trace_filter)
    if opts.step < 0:
        raise UsageError(f"--step {opts.step}: give a number of instructions, at least 1")
    if opts.step_from is not None and not opts.step:
        raise UsageError("--step-from needs --step N (how many instructions to step from there)")
    if opts.stats_json:     # written after the run: a path that cannot be a file would lose a long run's record
        parent = os.path.dirname(opts.stats_json) or "."
        if os.path.isdir(opts.stats_json):
            raise UsageError(f"--stats-json {opts.stats_json} is a directory: give a file to write the statistics to")
        if not os.path.isdir(parent):
            raise UsageError(f"--stats-json {opts.stats_json}: the directory {parent} does not exist")
    if opts.gdb is not None:
        parse_gdb_address(opts.gdb)
    elif opts.gdb_wait:
        raise UsageError("--gdb-wait needs --gdb [HOST]:PORT")


class Inside:
    """What attach() set up; finish() prints the statistics after the run."""
    def __init__(self, machine, opts: Options) -> None:
        self.machine = machine
        self.opts = opts
        self.server = None

    def finish(self) -> None:
        """After the run: the statistics table and/or JSON file."""
        debug = self.machine.debug
        if debug is not None and debug.pending_trigger() is not None:
            print(f"pykvm: --step-from {debug.pending_trigger():#x}: the guest never executed an instruction "
                  "starting there, so nothing was stepped", file=sys.stderr)
        if not (self.opts.stats or self.opts.stats_json):
            return
        from . import stats
        m = self.machine
        summary = stats.summarize(m.stats, m.pio, m.mmio, m.emulated)
        if self.opts.stats:
            print(stats.format_table(summary), file=sys.stderr)
        if self.opts.stats_json:
            text = json.dumps(stats.to_json(summary), indent=2) + "\n"
            try:
                # O_NONBLOCK: a FIFO that no process reads is refused (ENXIO) instead of blocking the end of the run
                # for ever; the write itself then blocks as usual (a reader of the FIFO takes it at its pace)
                fd = os.open(self.opts.stats_json, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NONBLOCK | os.O_CLOEXEC,
                             0o666)
                os.set_blocking(fd, True)
                with open(fd, "w") as f:
                    f.write(text)
            except OSError as e:
                why = "a FIFO that no process reads" if e.errno == errno.ENXIO else e.strerror
                raise UsageError(f"cannot write --stats-json {self.opts.stats_json}: {why}") from None


def attach(machine, opts: Options) -> Inside:
    """Set the machine's tracer / debug control / gdb stub as ``opts`` ask (each module, and
    capstone, is imported only when asked for). Raises UsageError for bad options."""
    check(opts)
    inside = Inside(machine, opts)
    if opts.trace or opts.trace_filter is not None:
        from .trace import TraceFilter, Tracer
        filt = TraceFilter.parse(opts.trace_filter) if opts.trace_filter is not None else None
        machine.tracer = Tracer(machine, filt)
    if opts.step or opts.gdb is not None:
        from .control import DebugControl
        machine.debug = DebugControl(machine, wait=opts.gdb_wait, step=opts.step, step_from=opts.step_from)
    if opts.gdb is not None:
        from .gdbstub import GdbServer
        host, port = parse_gdb_address(opts.gdb)
        inside.server = GdbServer(machine.debug, host, port)
        machine.on_close(inside.server.close)
        inside.server.start()
        where = f"{inside.server.host}:{inside.server.port}"
        print(f"pykvm: gdb stub listening on {where}" + (" (the guest waits for gdb to continue)"
              if opts.gdb_wait else "") + f"; connect with: gdb -ex 'target remote {where}'",
              file=sys.stderr, flush=True)
    return inside
