"""Guests that try what issue 9 part 7 lists, through the CLI, with pykvm's peak memory measured
(the child's VmHWM, which it reports as it ends) against a plain guest run the same way in the same test:

* a sweep of stores to distinct unclaimed MMIO addresses: every per-guest table stays bounded;
* one virtio-console transmit chain of 16 overlapping 15 MiB buffers in a 16 MiB guest: host
  memory spent on a request is bounded by a constant or the guest's RAM, not the chain's sum;
* MMIO accesses of 6 bytes (``lfs``) and of 3, 5, 6 and 7 bytes (8-byte loads split at a page
  boundary): each completes with the value the devices give, as KVM reports any length up to 8.

The figures are printed (``pytest -s``). The child runs under an address-space limit, so that a
pykvm that does allocate without bound fails here instead of taking the host's memory."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest
from conftest import ROOT, assemble, needs_kvm

pytestmark = needs_kvm
AS_LIMIT = 6 << 30                  # bytes of address space for the child
MiB = 1 << 20
OK = (0x2A << 1) | 1                # the guests' "all as expected"


# The child reports its own peak: VmHWM of /proc/self/status belongs to the process image since its
# exec. (ru_maxrss from wait4 does not do: Linux carries the high-water mark across fork and exec,
# so every child would report at least the test process's own resident set.)
_MEASURED = """
import sys
from pykvm.cli import main
status = main(sys.argv[2:])
with open("/proc/self/status") as f:
    peak = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
with open(sys.argv[1], "w") as f:
    f.write(peak)
sys.exit(status)
"""


def run_measured(args: list[str], tmp_path, name: str) -> tuple[int, int, str]:
    """``pykvm run ARGS``: (exit status, peak RSS in KiB, stderr). stdout goes to /dev/null."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    err_path, peak_path = tmp_path / f"{name}.err", tmp_path / f"{name}.peak"
    with open(err_path, "wb") as err:
        proc = subprocess.run([sys.executable, "-c", _MEASURED, str(peak_path), "run", *args], cwd=ROOT,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, preexec_fn=limit,
                              timeout=120)
    text = err_path.read_text(errors="replace")
    assert peak_path.exists(), f"pykvm ended without reporting its peak (status {proc.returncode}): {text}"
    return proc.returncode, int(peak_path.read_text()), text


def image(tmp_path, name: str, source: str, extra: list[tuple[int, bytes]] = ()) -> str:
    """Assemble a long-mode guest (origin 0x8000) and lay ``extra`` (guest-physical, bytes) into
    its image."""
    data = bytearray(assemble(source, 64, tmp_path))
    for gpa, blob in extra:
        offset = gpa - 0x8000
        assert offset >= len(data) or not any(data[offset:offset + len(blob)]), "extra data over the code"
        data[len(data):] = bytes(max(0, offset + len(blob) - len(data)))
        data[offset:offset + len(blob)] = blob
    path = tmp_path / f"{name}.bin"
    path.write_bytes(bytes(data))
    return str(path)


def test_an_unclaimed_mmio_sweep_keeps_pykvm_memory_bounded(tmp_path):
    sweep = image(tmp_path, "sweep", """
        mov     $0xd0100000, %ebx       /* above the devices: nobody claims these */
    1:  movb    %al, (%rbx)
        add     $8, %rbx
        jmp     1b
    """)
    spin = image(tmp_path, "spin", "1: pause\n jmp 1b")
    status0, base, err0 = run_measured([spin, "--timeout", "5"], tmp_path, "spin")
    status, peak, err = run_measured([sweep, "--timeout", "5"], tmp_path, "sweep")
    print(f"\nunclaimed MMIO sweep, 5 s: peak RSS {peak / 1024:.1f} MiB, baseline {base / 1024:.1f} MiB "
          f"(+{(peak - base) / 1024:.1f} MiB)")
    assert status0 == 124 and status == 124, err0 + err
    assert "Traceback" not in err
    assert peak - base < 8 * 1024, f"pykvm grew by {(peak - base) / 1024:.0f} MiB during the sweep"


def test_an_overlapping_virtio_chain_costs_at_most_the_guests_ram(tmp_path):
    ndesc, length = 16, 15 * MiB
    desc = b"".join((0).to_bytes(8, "little") + length.to_bytes(4, "little")
                    + (1 if i < ndesc - 1 else 0).to_bytes(2, "little") + (i + 1).to_bytes(2, "little")
                    for i in range(ndesc))                       # all of them: guest-physical 0, 15 MiB
    avail = bytes([0, 0, 1, 0, 0, 0])                            # flags 0, idx 1, ring[0] = head 0
    guest = image(tmp_path, "chain", f"""
        mov     $0xd0001000, %ebx       /* the virtio console's window (the only device) */
        movl    $0, 0x70(%rbx)          /* reset, ACKNOWLEDGE, DRIVER */
        movl    $1, 0x70(%rbx)
        movl    $3, 0x70(%rbx)
        movl    $1, 0x24(%rbx)          /* VIRTIO_F_VERSION_1 (feature bit 32) */
        movl    $1, 0x20(%rbx)
        movl    $0, 0x24(%rbx)
        movl    $0, 0x20(%rbx)
        movl    $0xb, 0x70(%rbx)        /* FEATURES_OK */
        movl    $1, 0x30(%rbx)          /* queue 1: transmitq */
        movl    ${ndesc}, 0x38(%rbx)
        movl    $0x20000, 0x80(%rbx)    /* descriptor table */
        movl    $0, 0x84(%rbx)
        movl    $0x21000, 0x90(%rbx)    /* available ring */
        movl    $0, 0x94(%rbx)
        movl    $0x22000, 0xa0(%rbx)    /* used ring */
        movl    $0, 0xa4(%rbx)
        movl    $1, 0x44(%rbx)          /* QueueReady */
        movl    $0xf, 0x70(%rbx)        /* DRIVER_OK */
        movl    $1, 0x50(%rbx)          /* QueueNotify: queue 1 */
        mov     $3000000, %ecx          /* wait (bounded) for the chain to be used */
    2:  cmpw    $0, 0x22002
        jne     3f
        pause
        dec     %ecx
        jnz     2b
        mov     $0x2b, %al              /* never used: refused (the device asks for a reset) */
        out     %al, $0xf4
    3:  mov     $0x2a, %al              /* used */
        out     %al, $0xf4
        cli
        hlt
    """, [(0x20000, desc), (0x21000, avail)])
    hello = str(ROOT / "guests" / "hello-long64.bin")
    opts = ["--mem", "16M", "--console", "virtio", "--timeout", "60"]
    status0, base, err0 = run_measured([hello, *opts], tmp_path, "hello")
    status, peak, err = run_measured([guest, *opts], tmp_path, "chain")
    print(f"\nvirtio-console chain of {ndesc} x 15 MiB over 16 MiB of RAM: peak RSS {peak / 1024:.1f} MiB, "
          f"baseline {base / 1024:.1f} MiB (+{(peak - base) / 1024:.1f} MiB); status {status}")
    assert status0 == 0, err0
    assert status in (OK, (0x2B << 1) | 1), err          # used, or refused: either is the guest's to see
    assert "Traceback" not in err, err
    assert peak - base < 2 * 16 * 1024, f"pykvm grew by {(peak - base) / 1024:.0f} MiB for one chain"


@pytest.mark.parametrize(("what", "code", "value"), [
    ("lfs: a 6-byte read", "lfs 8(%rbx), %esi\n mov %rsi, %rax", 0x12345678),
    ("8 bytes at 0xffd: 3 + 5", "mov 0xffd(%rbx), %rax", 0xFFFF_FFFF_FF00_0000),
    ("8 bytes at 0xffa: 6 + 2", "mov 0xffa(%rbx), %rax", 0xFFFF_0000_0000_0000),
    ("8 bytes at 0xff9: 7 + 1", "mov 0xff9(%rbx), %rax", 0xFF00_0000_0000_0000),
])
def test_mmio_accesses_of_odd_widths_complete(tmp_path, what, code, value):
    """The MMIO test device (0xd0000000) reads zero beyond its registers; the page after it is
    unclaimed (all ones). Its scratch register holds 0x12345678, so ``lfs`` loads that offset and
    the null selector."""
    guest = image(tmp_path, "widths", f"""
        mov     $0xd0000000, %ebx
        mov     $0x12345678, %eax
        mov     %rax, 8(%rbx)           /* scratch: offset 0x12345678, selector 0 */
        xor     %eax, %eax
        {code}
        movabs  ${value:#x}, %rdx
        cmp     %rdx, %rax
        jne     1f
        mov     $0x2a, %al
        out     %al, $0xf4
    1:  mov     $0x7e, %al              /* a wrong value */
        out     %al, $0xf4
    """)
    status, peak, err = run_measured([guest, "--timeout", "20"], tmp_path, "widths")
    print(f"\n{what}: status {status}, peak RSS {peak / 1024:.1f} MiB")
    assert status == OK, f"{what}: {err}"
