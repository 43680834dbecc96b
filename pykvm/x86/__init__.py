"""Architecture knowledge with no I/O: registers, segments, page tables, CPU modes."""
