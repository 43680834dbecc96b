"""GuestMemory: the one bounds-checked door into guest RAM."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.memory import MMIO_HOLE_END, MMIO_HOLE_START, GiB, GuestMemory, GuestMemoryError, MiB, parse_size

SIZE = 2 * MiB


@pytest.fixture(scope="module")
def mem():
    with GuestMemory(SIZE) as m:
        yield m


addresses = st.one_of(st.integers(-2, SIZE + 2), st.integers(-(1 << 64), 1 << 65),
                      st.integers(SIZE - 64, SIZE + 64))
lengths = st.one_of(st.integers(-2, 64), st.integers(0, SIZE + 1), st.integers(-(1 << 64), 1 << 64))


@settings(max_examples=400, deadline=None)
@given(gpa=addresses, n=lengths, fill=st.integers(0, 255))
def test_access_round_trips_or_raises_guest_memory_error(mem, gpa, n, fill):
    inside = gpa >= 0 and n >= 0 and gpa + n <= SIZE
    if inside:
        data = bytes([fill]) * min(n, 4096) + bytes(max(0, n - 4096))
        mem.write(gpa, data)
        assert mem.read(gpa, n) == data
        assert bytes(mem.view(gpa, n)) == data
    else:
        for attempt in (lambda: mem.read(gpa, n), lambda: mem.view(gpa, n), lambda: mem.fill(gpa, n, fill)):
            with pytest.raises(GuestMemoryError):
                attempt()


@settings(max_examples=200, deadline=None)
@given(gpa=st.integers(SIZE - 16, SIZE + 16), n=st.integers(1, 32))
def test_rejected_write_changes_nothing(mem, gpa, n):
    """A write that does not fit entirely is refused before a byte lands (no partial writes)."""
    mem.fill(SIZE - 32, 32, 0xAA)
    before = mem.read(SIZE - 32, 32)
    if gpa < 0 or gpa + n > SIZE:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, b"\x55" * n)
        assert mem.read(SIZE - 32, 32) == before
    else:   # a write that fits lands exactly where asked, and nowhere else
        mem.write(gpa, b"\x55" * n)
        expected = bytearray(before)
        expected[gpa - (SIZE - 32):gpa - (SIZE - 32) + n] = b"\x55" * n
        assert mem.read(SIZE - 32, 32) == bytes(expected)


@settings(max_examples=200, deadline=None)
@given(gpa=st.integers(-8, SIZE + 8), value=st.integers(0, (1 << 64) - 1), width=st.sampled_from([1, 2, 4, 8]))
def test_typed_accessors(mem, gpa, value, width):
    write = {1: mem.write_u8, 2: mem.write_u16, 4: mem.write_u32, 8: mem.write_u64}[width]
    read = {1: mem.read_u8, 2: mem.read_u16, 4: mem.read_u32, 8: mem.read_u64}[width]
    if 0 <= gpa and gpa + width <= SIZE:
        write(gpa, value)
        assert read(gpa) == value & ((1 << (8 * width)) - 1)
        assert mem.read(gpa, width) == (value & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    else:
        with pytest.raises(GuestMemoryError):
            write(gpa, value)
        with pytest.raises(GuestMemoryError):
            read(gpa)


def test_non_integer_addresses_are_refused(mem):
    for bad in (1.5, "16", None, True):
        with pytest.raises(GuestMemoryError):
            mem.read(bad, 1)


def test_layout_leaves_the_mmio_hole_empty():
    with GuestMemory(4 * GiB) as m:
        assert [(r.gpa, r.size) for r in m.regions] == [(0, MMIO_HOLE_START), (MMIO_HOLE_END, GiB)]
        assert m.contains(MMIO_HOLE_START - 8, 8)
        assert not m.contains(MMIO_HOLE_START, 1)
        assert not m.contains(MMIO_HOLE_START - 4, 8)   # straddles the end of low RAM
        m.write_u64(MMIO_HOLE_END, 0x1122334455667788)
        assert m.read_u64(MMIO_HOLE_END) == 0x1122334455667788


@pytest.mark.parametrize("size", [0, 4096, 12345 * 4096 + 1, 65 * GiB])
def test_bad_sizes_are_refused(size):
    with pytest.raises(GuestMemoryError):
        GuestMemory(size)


@pytest.mark.parametrize("text,value", [("64M", 64 * MiB), ("1G", GiB), ("512k", 512 * 1024), ("2MiB", 2 * MiB),
                                        ("4096", 4096), ("1GB", GiB)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "-1M", "1.5G", "lots", "12X"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_ram_the_host_refuses_is_a_usage_error_not_a_traceback(monkeypatch):
    """mmap's ENOMEM (the host's overcommit policy: `pykvm run -m 48G` on a 24 GiB host) is one
    sentence and status 2, with nothing left mapped."""
    import errno
    import mmap

    from pykvm.errors import UsageError
    from pykvm.memory import GuestMemory

    def refuse(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")
    monkeypatch.setattr(mmap, "mmap", refuse)
    with pytest.raises(UsageError, match="cannot give this guest 49152 MiB") as e:
        GuestMemory(48 << 30)
    assert e.value.exit_status == 2
