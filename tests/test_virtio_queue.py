"""Split virtqueues (pykvm.devices.virtio.queue): chains, rings, suppression, hostile input."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_driver import DESC, RecordingMemory, Rings

from pykvm.devices.virtio.queue import (
    MAX_INDIRECT,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    SplitQueue,
    VirtqueueError,
)
from pykvm.memory import GuestMemory

MiB = 1 << 20
N, W, I = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


@pytest.fixture
def mem():
    with GuestMemory(4 * MiB) as m:
        yield m


def queue_for(rings: Rings, **kw) -> SplitQueue:
    return SplitQueue(rings.memory, rings.size, rings.desc, rings.avail, rings.used, **kw)


def test_chain_splits_readable_and_writable_parts(mem):
    rings = Rings(mem)
    q = queue_for(rings)
    head, (wa, wb) = rings.chain([b"hello ", b"world"], [3, 5])
    chain = q.pop()
    assert chain.head == head
    assert chain.read() == b"hello world" and chain.readable_len == 11
    assert chain.read(4, 4) == b"o wo"
    assert chain.writable_len == 8
    assert chain.write(b"ABCDEFGHIJ") == 8          # truncated at the end of the writable part
    assert mem.read(wa, 3) == b"ABC" and mem.read(wb, 5) == b"DEFGH"
    assert chain.write(b"xy", offset=2) == 2
    assert mem.read(wa, 3) == b"ABx" and mem.read(wb, 1) == b"y"
    assert chain.writable_segments(2, 3) == [(wa + 2, 1), (wb, 2)]
    assert chain.readable_segments(5) == [(chain.readable[0][0] + 5, 1), chain.readable[1]]
    assert q.pop() is None


def test_used_ring_gets_element_then_index(mem):
    rings = Rings(mem)
    q = queue_for(rings)
    rings.chain([b"x"], [4])
    chain = q.pop()
    q.push(chain.head, 4)
    assert rings.take_used() == [(chain.head, 4)]
    assert q.used_idx == 1


def test_index_wraps_around_65535(mem):
    rings = Rings(mem, size=4)
    q = queue_for(rings)
    start = 0xFFFE
    rings.avail_idx = start
    q.last_avail = q.used_idx = q.signalled_used = start
    mem.write_u16(rings.used + 2, start)
    rings.last_used = start
    heads = [rings.chain([bytes([i])], [1])[0] for i in range(4)]
    assert rings.avail_idx == 2
    for expected in heads:
        chain = q.pop()
        assert chain.head == expected
        q.push(chain.head, 1)
    assert q.pop() is None and q.last_avail == 2 and q.used_idx == 2
    assert [h for h, _ in rings.take_used()] == heads


def test_indirect_table(mem):
    rings = Rings(mem)
    q = queue_for(rings, indirect=True)
    head, (wa,) = rings.chain([b"hdr", b"data"], [2], indirect=True)
    chain = q.pop()
    assert chain.head == head and chain.read() == b"hdrdata" and chain.writable == [(wa, 2)]


def test_direct_descriptors_then_an_indirect_one(mem):
    rings = Rings(mem)
    q = queue_for(rings, indirect=True)
    table = rings.alloc(32)
    a, b = rings.alloc(2, b"ab"), rings.alloc(3)
    rings.put_desc(0, a, 2, N, 1)
    rings.put_desc(1, table, 16, I)
    rings.put_desc(0, b, 3, W, table=table)
    rings.offer(0)
    chain = q.pop()
    assert chain.readable == [(a, 2)] and chain.writable == [(b, 3)]


@pytest.mark.parametrize("case", ["not negotiated", "nested", "with next", "bad length", "too long", "outside"])
def test_bad_indirect_tables_are_refused(mem, case):
    rings = Rings(mem)
    q = queue_for(rings, indirect=case != "not negotiated")
    table = rings.alloc(64)
    buf = rings.alloc(8)
    length, flags, addr = 32, I, table
    rings.put_desc(0, buf, 8, 0, table=table)
    if case == "nested":
        rings.put_desc(0, table, 16, I, table=table)
    elif case == "with next":
        flags = I | N
    elif case == "bad length":
        length = 24
    elif case == "too long":
        length = 16 * (MAX_INDIRECT + 1)
    elif case == "outside":
        addr = 4 * MiB - 16
    rings.put_desc(0, addr, length, flags, 1)
    rings.offer(0)
    with pytest.raises(VirtqueueError):
        q.pop()


def test_loop_is_detected(mem):
    rings = Rings(mem, size=4)
    q = queue_for(rings)
    buf = rings.alloc(1)
    rings.put_desc(0, buf, 1, N, 1)
    rings.put_desc(1, buf, 1, N, 0)
    rings.offer(0)
    with pytest.raises(VirtqueueError, match="loop"):
        q.pop()


def test_loop_in_an_indirect_table_is_detected(mem):
    rings = Rings(mem)
    q = queue_for(rings, indirect=True)
    table = rings.alloc(48)
    buf = rings.alloc(1)
    for i in range(3):
        rings.put_desc(i, buf, 1, N, (i + 1) % 3, table=table)
    rings.put_desc(0, table, 48, I)
    rings.offer(0)
    with pytest.raises(VirtqueueError, match="loop"):
        q.pop()


def test_a_chain_as_long_as_the_queue_is_fine(mem):
    rings = Rings(mem, size=8)
    q = queue_for(rings)
    head, _ = rings.chain([b"x"] * 8)
    assert len(q.pop().readable) == 8


@pytest.mark.parametrize("case", ["next out of range", "head out of range", "outside RAM", "into the hole",
                                  "readable after writable", "avail jump"])
def test_hostile_rings_are_refused(mem, case):
    rings = Rings(mem, size=4)
    q = queue_for(rings)
    buf = rings.alloc(16)
    if case == "next out of range":
        rings.put_desc(0, buf, 1, N, 4)
        rings.offer(0)
    elif case == "head out of range":
        rings.offer(4)
    elif case == "outside RAM":
        rings.put_desc(0, 4 * MiB - 8, 16, 0)
        rings.offer(0)
    elif case == "into the hole":
        rings.put_desc(0, 0xD000_1000, 4, W)
        rings.offer(0)
    elif case == "readable after writable":
        rings.put_desc(0, buf, 1, W | N, 1)
        rings.put_desc(1, buf, 1, 0)
        rings.offer(0)
    elif case == "avail jump":
        mem.write_u16(rings.avail + 2, 5)
    with pytest.raises(VirtqueueError):
        q.pop()


def test_zero_length_descriptors_are_skipped(mem):
    rings = Rings(mem, size=4)
    q = queue_for(rings)
    buf = rings.alloc(2, b"ok")
    rings.put_desc(0, 0xFFFF_FFFF_0000, 0, W | N, 1)      # nowhere, but empty: nothing to access
    rings.put_desc(1, buf, 2, 0)
    rings.offer(0)
    chain = q.pop()
    assert chain.readable == [(buf, 2)] and chain.writable == []


@pytest.mark.parametrize("size, desc, avail, used", [
    (3, 0x1000, 0x2000, 0x3000),          # not a power of 2
    (0, 0x1000, 0x2000, 0x3000),
    (65536, 0x1000, 0x2000, 0x3000),
    (4, 0x1008, 0x2000, 0x3000),          # descriptor table not 16-aligned
    (4, 0x1000, 0x2001, 0x3000),          # available ring not 2-aligned
    (4, 0x1000, 0x2000, 0x3002),          # used ring not 4-aligned
    (4, 4 * MiB - 32, 0x2000, 0x3000),    # table runs past RAM
    (4, 0x1000, 0x2000, 0xD000_0000),     # used ring in the MMIO hole
])
def test_queue_layout_is_checked(mem, size, desc, avail, used):
    with pytest.raises(VirtqueueError):
        SplitQueue(mem, size, desc, avail, used)


def test_no_interrupt_flag(mem):
    rings = Rings(mem)
    q = queue_for(rings)
    assert not q.needs_interrupt()                  # nothing used yet
    rings.chain([b"a"])
    q.push(q.pop().head, 0)
    mem.write_u16(rings.avail, VIRTQ_AVAIL_F_NO_INTERRUPT)
    assert not q.needs_interrupt()
    rings.chain([b"b"])
    q.push(q.pop().head, 0)
    mem.write_u16(rings.avail, 0)
    assert q.needs_interrupt()
    assert not q.needs_interrupt()                  # nothing new since


def test_event_idx_interrupts_when_used_event_is_crossed(mem):
    rings = Rings(mem)
    q = queue_for(rings, event_idx=True)
    mem.write_u16(rings.used_event_at, 2)           # "interrupt me when used.idx passes 2"
    mem.write_u16(rings.avail, VIRTQ_AVAIL_F_NO_INTERRUPT)   # ignored with EVENT_IDX
    results = []
    for i in range(4):
        rings.chain([bytes([i])])
        q.push(q.pop().head, 0)
        results.append(q.needs_interrupt())
    assert results == [False, False, True, False]   # used.idx 1, 2, 3 (crossed 2 -> 3), 4


def test_event_idx_batch_crossing_counts_once(mem):
    rings = Rings(mem)
    q = queue_for(rings, event_idx=True)
    mem.write_u16(rings.used_event_at, 1)
    for i in range(3):
        rings.chain([bytes([i])])
        q.push(q.pop().head, 0)
    assert q.needs_interrupt()                      # 0 -> 3 crosses event 1


def test_notification_suppression_without_event_idx(mem):
    rings = Rings(mem)
    q = queue_for(rings)
    q.disable_notifications()
    assert mem.read_u16(rings.used) == VIRTQ_USED_F_NO_NOTIFY
    assert not q.enable_notifications()
    assert mem.read_u16(rings.used) == 0
    rings.chain([b"x"])
    assert q.enable_notifications()                 # a buffer arrived: process again


def test_notification_suppression_with_event_idx(mem):
    rings = Rings(mem)
    q = queue_for(rings, event_idx=True)
    rings.chain([b"x"])
    q.pop()
    assert not q.enable_notifications()
    assert mem.read_u16(rings.avail_event_at) == 1  # "notify me when avail.idx passes 1"
    assert mem.read_u16(rings.used) == 0


# --- hostile guests, at random ---------------------------------------------------------------

RAM = 1 * MiB
QSIZE = 8
DESC_AT, AVAIL_AT, USED_AT = 0x1000, 0x2000, 0x3000
INDIRECT_AT = (0x4000, 0x5000)

def _address(rnd) -> int:
    pick = rnd.random()
    if pick < 0.5:
        return rnd.randrange(0x6000, 0x7000)                     # ordinary buffers
    if pick < 0.7:
        return rnd.choice([DESC_AT, AVAIL_AT, USED_AT, *INDIRECT_AT, 0])   # the rings themselves
    if pick < 0.85:
        return rnd.randrange(RAM - 64, RAM + 64)                 # straddling the end of RAM
    return rnd.getrandbits(64)                                   # anywhere


def _length(rnd) -> int:
    pick = rnd.random()
    if pick < 0.6:
        return rnd.randrange(0, 65)
    if pick < 0.85:
        return rnd.choice([16, 32, 48, 128, 0xFFFF_FFFF])
    return rnd.getrandbits(32)


def _descriptor(rnd) -> bytes:
    flags = rnd.choice([0, N, W, N | W, I, I | N, I | W]) if rnd.random() < 0.8 else rnd.getrandbits(16)
    nxt = rnd.randrange(QSIZE) if rnd.random() < 0.8 else rnd.choice([QSIZE, rnd.getrandbits(16)])
    return DESC.pack(_address(rnd), _length(rnd), flags, nxt)


def _candidates(mem: GuestMemory, desc: int, size: int) -> list[tuple[int, int, int]]:
    """Every descriptor a chain could come from: the table, and each indirect table it names."""
    found = []
    for i in range(size):
        addr, length, flags, _ = DESC.unpack(mem.read(desc + 16 * i, 16))
        found.append((addr, length, flags))
        if flags & I and length % 16 == 0 and 0 < length <= 16 * MAX_INDIRECT and mem.contains(addr, length):
            for j in range(length // 16):
                a, n, f, _ = DESC.unpack(mem.read(addr + 16 * j, 16))
                found.append((a, n, f))
    return found


def _serve_and_check(mem: RecordingMemory, q: SplitQueue) -> int:
    """Act as a device on ``q`` until it is empty or refuses; check that every buffer handed out
    is a guest descriptor of the right direction inside RAM, and that every access stayed in RAM
    and every write in the used ring or a device-writable buffer. Returns the chains served."""
    mem.log.clear()
    allowed_writes = [(q.used, 6 + 8 * q.size)]
    served = 0
    for _ in range(2 * q.size):
        candidates = _candidates(mem, q.desc, q.size)
        try:
            q.disable_notifications()
            chain = q.pop()
        except VirtqueueError:
            break
        if chain is None:
            break
        for gpa, n in chain.writable:
            assert any(a == gpa and length == n and f & W and not f & I for a, length, f in candidates)
            assert mem.contains(gpa, n)
        for gpa, n in chain.readable:
            assert any(a == gpa and length == n and not f & W and not f & I for a, length, f in candidates)
            assert mem.contains(gpa, n)
        allowed_writes += chain.writable
        chain.read(0, 4096)
        written = chain.write(b"\xab" * min(chain.writable_len, 4096))
        q.push(chain.head, written)
        q.needs_interrupt()
        q.enable_notifications()
        served += 1
    for kind, gpa, n in mem.log:
        assert mem.contains(gpa, n), f"{kind} access at {gpa:#x}+{n} outside RAM"
        if kind == "w":
            assert any(a <= gpa and gpa + n <= a + length for a, length in allowed_writes), \
                f"write at {gpa:#x}+{n} outside the used ring and the writable buffers"
    return served


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(seed=st.integers(0, (1 << 64) - 1), pending=st.integers(0, QSIZE + 1), last_avail=st.integers(0, 0xFFFF),
       indirect=st.booleans(), event_idx=st.booleans())
def test_random_rings_never_escape_or_stray(seed, pending, last_avail, indirect, event_idx):
    """Descriptor tables, indirect tables and available rings of random (mostly plausible) content.
    (A seeded PRNG fills them: hypothesis draws only the seed and the parameters, which is fast.)"""
    rnd = random.Random(seed)
    with RecordingMemory(RAM) as mem:
        mem.write(DESC_AT, b"".join(_descriptor(rnd) for _ in range(QSIZE)))
        for at in INDIRECT_AT:
            mem.write(at, b"".join(_descriptor(rnd) for _ in range(rnd.randrange(7))))
        ring = [rnd.randrange(QSIZE) if rnd.random() < 0.85 else rnd.getrandbits(16) for _ in range(QSIZE)]
        avail_idx = (last_avail + pending) & 0xFFFF
        mem.write(AVAIL_AT, struct.pack(f"<HH{QSIZE}HH", rnd.getrandbits(16), avail_idx, *ring, rnd.getrandbits(16)))
        q = SplitQueue(mem, QSIZE, DESC_AT, AVAIL_AT, USED_AT, indirect=indirect, event_idx=event_idx)
        q.last_avail = q.used_idx = q.signalled_used = last_avail
        _serve_and_check(mem, q)


@FUZZ
@given(seed=st.integers(0, (1 << 64) - 1), corruptions=st.integers(0, 3), indirect=st.booleans(),
       event_idx=st.booleans())
def test_well_formed_chains_then_corrupted(seed, corruptions, indirect, event_idx):
    """Chains a correct driver would build, then a few bytes of the rings flipped at random."""
    rnd = random.Random(seed)
    with RecordingMemory(RAM) as mem:
        rings = Rings(mem, size=QSIZE, base=0x1000, heap=0x8000)
        used_descriptors, any_indirect = 0, False
        for _ in range(rnd.randrange(1, 7)):
            readable = [rnd.randbytes(rnd.randrange(1, 41)) for _ in range(rnd.randrange(3))]
            writable = [rnd.randrange(1, 41) for _ in range(rnd.randrange(0 if readable else 1, 3))]
            use_indirect = rnd.random() < 0.3
            cost = 1 if use_indirect else len(readable) + len(writable)
            if used_descriptors + cost > QSIZE:
                break
            rings.chain(readable, writable, indirect=use_indirect)
            used_descriptors += cost
            any_indirect |= use_indirect
        for _ in range(corruptions):       # the table, the available ring, or the buffers and indirect tables
            at = rnd.choice([0x1000, 0x8000]) + rnd.randrange(0x400)
            mem.write(at, bytes([rnd.getrandbits(8)]))
        q = queue_for(rings, indirect=indirect, event_idx=event_idx)
        served = _serve_and_check(mem, q)
        if not corruptions and (indirect or not any_indirect):
            assert served == rings.avail_idx           # nothing refused when nothing was wrong


def test_device_writes_never_target_rom():
    with GuestMemory(4 * MiB) as mem:
        rom = 0xFFFF_0000
        mem.add_rom(rom, b"\x90" * 4096)
        assert mem.contains(rom, 16) and not mem.writable(rom, 16) and mem.writable(0x1000, 16)
        rings = Rings(mem, size=4)
        q = queue_for(rings)
        rings.put_desc(0, rom, 16, 0)                   # reading firmware: allowed
        rings.offer(0)
        assert q.pop().readable == [(rom, 16)]
        rings.put_desc(1, rom, 16, W)                   # writing into it: refused
        rings.offer(1)
        with pytest.raises(VirtqueueError, match="device-writable"):
            q.pop()
        with pytest.raises(VirtqueueError, match="used ring"):
            SplitQueue(mem, 4, rings.desc, rings.avail, rom)
