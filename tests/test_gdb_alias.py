"""gdb software breakpoints on two virtual addresses of one physical byte (issue 9, part 4), with
Debian's gdb against guests/gdbalias.bin: a long-mode guest that maps the page of ``shared`` a
second time at 0x200000, calls it through both addresses, then remaps 0x200000 to the page of
``other``. The guest checks at its end that no int3 is left in either page (else status 253)."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import ROOT, needs_kvm
from test_gdb import Pykvm

from pykvm.debug.breakpoints import INT3, SoftwareBreakpoints
from pykvm.memory import GuestMemory
from pykvm.x86.paging import RW, P

GUEST = str(ROOT / "guests" / "gdbalias.bin")
ELF = ROOT / "guests" / "gdbalias.elf"
ALIAS = 0x200000
CLEAN_END = (0x31 << 1) | 1                      # a_count 3, b_count 1, and no int3 left behind
needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (apt-get install gdb)")


def gdb(port: int, *commands: str) -> str:
    args = ["gdb", "-nx", "-batch", str(ELF), "-ex", f"target remote 127.0.0.1:{port}"]
    for c in commands:
        args += ["-ex", c]
    done = subprocess.run(args, capture_output=True, text=True, timeout=90)
    return done.stdout + done.stderr


@needs_kvm
@needs_gdb
def test_deleting_breakpoints_on_two_aliases_of_one_byte_restores_it():
    guest = Pykvm(GUEST, "--gdb-wait")
    text = gdb(guest.port, "break main", "continue",          # the guest's own page tables are in use
               "break shared", f"break *{ALIAS:#x}",
               "continue",                       # shared, through its own address
               "continue",                       # the same byte, through the alias
               "p *(int *)&a_count", "delete", "continue")
    status, out, err = guest.finish()
    stops = re.findall(r"^Breakpoint (\d), (0x[0-9a-f]+) in (\S+)", text, re.M)
    assert stops == [("1", "0x000000000000807d", "main"), ("2", "0x0000000000009000", "shared"),
                     ("3", f"{ALIAS:#018x}", "??")], text
    assert re.findall(r"^\$\d+ = (\d+)$", text, re.M) == ["1"], text   # before the alias call's incl
    assert status == CLEAN_END, out + err + text      # 253 if an int3 was left in `shared`
    assert "int3 left" not in out


@needs_kvm
@needs_gdb
def test_an_alias_gdb_did_not_name_runs_through_and_a_remapped_breakpoint_moves():
    """With breakpoints kept inserted while the guest is stopped (as non-stop gdb and other
    debuggers do), a breakpoint whose page the guest remaps moves to the new page when resumed."""
    guest = Pykvm(GUEST, "--gdb-wait")
    text = gdb(guest.port, "set breakpoint always-inserted on", "break main", "continue",
               f"break *{ALIAS:#x}",
               "continue",                       # `call shared` runs the patched byte: no stop
               "p *(int *)&a_count",
               "break remapped", "continue",     # 0x200000 now maps `other`
               "continue",                       # and the breakpoint followed it there
               "p *(int *)&b_count", "x/i $pc", "delete", "continue")
    status, out, err = guest.finish()
    stops = re.findall(r"^Breakpoint (\d), (0x[0-9a-f]+) in (\S+)", text, re.M)
    assert stops == [("1", "0x000000000000807d", "main"), ("2", f"{ALIAS:#018x}", "??"),
                     ("3", "0x000000000000809b", "remapped"), ("2", f"{ALIAS:#018x}", "??")], text
    assert re.findall(r"^\$\d+ = (\d+)$", text, re.M) == ["1", "0"], text
    assert re.search(r"=> 0x200000:\s+incl\s+0x814c", text), text    # other's `incl b_count`
    assert status == CLEAN_END, out + err + text


# ---- the table itself, on guest memory with hand-made page tables ----------------------------

PML4, PDPT, PD, PT = 0x10000, 0x11000, 0x12000, 0x13000
PAGE_A, PAGE_B = 0x20000, 0x21000
LONG = (1 << 31 | 1, PML4, 1 << 5, 1 << 8 | 1 << 10)     # CR0.PG|PE, CR3, CR4.PAE, EFER.LME|LMA


def map_page(memory: GuestMemory, virt: int, phys: int) -> None:
    memory.write_u64(PT + 8 * (virt >> 12 & 0x1FF), phys | P | RW)


@pytest.fixture
def memory():
    with GuestMemory(1 << 20) as mem:
        mem.write_u64(PML4, PDPT | P | RW)
        mem.write_u64(PDPT, PD | P | RW)
        mem.write_u64(PD, PT | P | RW)
        map_page(mem, 0x1000, PAGE_A)             # two addresses of page A
        map_page(mem, 0x5000, PAGE_A)
        mem.write(PAGE_A, bytes(range(1, 17)))
        mem.write(PAGE_B, bytes(range(101, 117)))
        yield mem


@pytest.mark.parametrize("order", [(0x1004, 0x5004), (0x5004, 0x1004)])
def test_two_aliases_share_one_patch_and_any_removal_order_restores(memory, order):
    sw = SoftwareBreakpoints(memory)
    sw.insert(0, LONG, 0x1004)
    sw.insert(0, LONG, 0x5004)
    assert memory.read_u8(PAGE_A + 4) == INT3 and len(sw.patches) == 1
    assert sw.read(LONG, 0x5000, 8) == bytes(range(1, 9))    # gdb sees the original through either
    assert sw.hit(LONG, 0x1004) == "break" and sw.hit(LONG, 0x5004) == "break"
    sw.remove(order[0])
    assert memory.read_u8(PAGE_A + 4) == INT3                # the other breakpoint still needs it
    sw.remove(order[1])
    assert memory.read(PAGE_A, 16) == bytes(range(1, 17))


def test_a_hit_through_an_unnamed_alias_is_an_alias_and_lifting_steps_over_it(memory):
    sw = SoftwareBreakpoints(memory)
    sw.insert(0, LONG, 0x1004)
    assert sw.hit(LONG, 0x5004) == "alias"
    assert sw.hit(LONG, 0x5005) is None                      # not a byte we patched
    phys = sw.lift(LONG, 0x5004)
    assert memory.read_u8(PAGE_A + 4) == 5
    sw.restore(phys)
    assert memory.read_u8(PAGE_A + 4) == INT3
    sw.clear()
    assert memory.read(PAGE_A, 16) == bytes(range(1, 17))


def test_replant_follows_a_changed_mapping_and_restores_the_old_byte(memory):
    sw = SoftwareBreakpoints(memory)
    sw.insert("vcpu0", LONG, 0x5004)
    map_page(memory, 0x5000, PAGE_B)                         # the guest remaps 0x5000
    sw.replant(lambda vcpu: LONG)
    assert memory.read(PAGE_A, 16) == bytes(range(1, 17))
    assert memory.read_u8(PAGE_B + 4) == INT3
    memory.write_u64(PT + 8 * 5, 0)                          # and unmaps it
    sw.replant(lambda vcpu: LONG)
    assert memory.read(PAGE_B, 16) == bytes(range(101, 117))
    map_page(memory, 0x5000, PAGE_A)                         # mapped again: planted again
    sw.replant(lambda vcpu: LONG)
    assert memory.read_u8(PAGE_A + 4) == INT3
    sw.clear()
    assert memory.read(PAGE_A, 16) == bytes(range(1, 17))


def test_writes_over_a_patch_update_the_original(memory):
    sw = SoftwareBreakpoints(memory)
    sw.insert(0, LONG, 0x1004)
    sw.write(LONG, 0x5002, b"\xaa\xbb\xcc\xdd")              # through the alias
    assert memory.read_u8(PAGE_A + 4) == INT3
    assert sw.read(LONG, 0x1000, 8) == bytes([1, 2, 0xAA, 0xBB, 0xCC, 0xDD, 7, 8])
    sw.clear()
    assert memory.read(PAGE_A, 8) == bytes([1, 2, 0xAA, 0xBB, 0xCC, 0xDD, 7, 8])


def test_a_byte_the_guest_rewrote_is_left_as_the_guest_wrote_it(memory):
    sw = SoftwareBreakpoints(memory)
    sw.insert(0, LONG, 0x1004)
    memory.write_u8(PAGE_A + 4, 0x90)                        # the guest loads new code there
    sw.remove(0x1004)
    assert memory.read_u8(PAGE_A + 4) == 0x90
