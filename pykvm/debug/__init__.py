"""Seeing inside a run.

report.py    the crash report: registers, CPU mode, the code at RIP (disasm.py: capstone)
stats.py     exit statistics, always collected: per reason, port and MMIO address (--stats)
trace.py     one line per exit with the guest instruction behind it (--trace)
control.py   stopping, stepping and resuming vCPUs (--step, and the gdb stub)
gdbstub.py   the gdb remote stub (--gdb); rsp.py its packet framing, gdbarch.py the registers
vmem.py      guest-virtual memory through the guest's page tables
inside.py    wiring the command-line options to a Machine
"""
