"""Seeing inside a run: vCPU reports with disassembly (and, later, exit tracing, statistics, gdb)."""
