"""Emulated hardware: one device per file, attached to the port-I/O bus or the MMIO bus."""
