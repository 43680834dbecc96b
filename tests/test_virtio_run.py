"""virtio end to end: the bundled bare-metal virtio guests under `pykvm run`, and the wiring
(placement, fw_cfg table, Linux command line, fast path, device threads)."""

from __future__ import annotations

import struct
import threading

import pytest
from conftest import needs_kvm, run_pykvm

from pykvm.devices import virtio
from pykvm.devices.virtio import DriveSpec, Slot, fw_cfg_table, layout, linux_cmdline, parse_drive
from pykvm.errors import UsageError

SECTORS = 2048                       # a 1 MiB image
FAST = [pytest.param("1", id="ioeventfd+irqfd"), pytest.param("0", id="mmio-exits+irq-line")]


def pattern(sector: int) -> bytes:
    """What guests/virtio.c writes into a sector."""
    head = struct.pack("<I", sector) + b"pykvm-virtio"
    return head + bytes((i * 7 + sector * 13 + 0x5A) & 0xFF for i in range(16, 512))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"\xc3" * (SECTORS * 512))
    return path


# --- wiring, no KVM needed ----------------------------------------------------------------------

def test_placement_and_linux_command_line():
    drives = [DriveSpec("a.img"), DriveSpec("b.img", readonly=True)]
    assert linux_cmdline(drives, rng=True, console=True) == [
        "virtio_mmio.device=0x200@0xd0001000:5",      # drives first, in order
        "virtio_mmio.device=0x200@0xd0001200:6",
        "virtio_mmio.device=0x200@0xd0001400:7",      # the console
        "virtio_mmio.device=0x200@0xd0001600:9",      # the entropy device: IRQ 8 (RTC) is skipped
        "console=hvc0",
    ]
    assert linux_cmdline() == []


def test_layout_stays_clear_of_the_mmio_test_device_and_com1():
    slots = layout([2] * len(virtio.IRQS))
    assert slots[0].base >= 0xD000_1000 and all(s.size == 0x200 for s in slots)
    assert {s.irq for s in slots}.isdisjoint({0, 1, 2, 4, 8, 13})
    with pytest.raises(UsageError, match="at most"):
        layout([2] * (len(virtio.IRQS) + 1))


def test_fw_cfg_table_records():
    table = fw_cfg_table([Slot(0xD000_1000, 0x200, 5, 2), Slot(0xD000_1200, 0x200, 6, 4)])
    assert table == struct.pack("<QIHHQIHH", 0xD000_1000, 0x200, 5, 2, 0xD000_1200, 0x200, 6, 4)


@pytest.mark.parametrize("text, spec", [("d.img", DriveSpec("d.img")), ("d.img,readonly", DriveSpec("d.img", True)),
                                        ("d.img,ro", DriveSpec("d.img", True))])
def test_parse_drive(text, spec):
    assert parse_drive(text) == spec


@pytest.mark.parametrize("text", ["d.img,fast", ",readonly"])
def test_parse_drive_refuses(text):
    with pytest.raises(UsageError):
        parse_drive(text)


# --- the bare-metal guests ----------------------------------------------------------------------

@needs_kvm
@pytest.mark.parametrize("fast", FAST)
def test_blk_guest_data_lands_in_the_image(image, fast):
    r = run_pykvm("run", "-k", "guests/virtio-blk.elf", "--drive", str(image), "--timeout", "30",
                  env={"PYKVM_VIRTIO_FASTPATH": fast})
    assert r.returncode == 33, r.stdout.decode() + r.stderr.decode()
    out = r.stdout.decode().splitlines()
    assert out[0] == "virtio-blk: device at 0xd0001000 irq 5 (fw_cfg etc/pykvm/virtio-mmio)"
    assert out[1] == f"virtio-blk: capacity {SECTORS} sectors, flush, indirect descriptors, event index"
    assert out[2:] == ["virtio-blk: wrote, flushed and read back 9 sectors: they match",
                       "virtio-blk: read past the end: IOERR", "virtio-blk: id disk.img", "virtio-blk: ok"]
    data = image.read_bytes()
    assert len(data) == SECTORS * 512
    for sector in range(SECTORS):
        expected = pattern(sector) if 1 <= sector <= 8 or sector == SECTORS - 1 else b"\xc3" * 512
        assert data[sector * 512:(sector + 1) * 512] == expected, f"sector {sector}"


@needs_kvm
def test_blk_guest_read_only_drive_refuses_the_write(image):
    before = image.read_bytes()
    r = run_pykvm("run", "-k", "guests/virtio-blk.elf", "--drive", f"{image},readonly", "--timeout", "30")
    assert r.returncode == 35, r.stdout.decode() + r.stderr.decode()
    out = r.stdout.decode()
    assert "read-only" in out.splitlines()[1]
    assert "virtio-blk: write refused with IOERR (read-only device)" in out
    assert image.read_bytes() == before


@needs_kvm
def test_console_guest_output_and_input_through_hvc(image):
    r = run_pykvm("run", "-k", "guests/virtio-console.elf", "-p", "echo", "--console", "virtio", "--rng",
                  "--timeout", "30", input=b"ping pong\n")
    assert r.returncode == 37, r.stdout.decode() + r.stderr.decode()
    assert r.stdout.decode().splitlines() == [
        "virtio-console: device at 0xd0001000 irq 5 (fw_cfg etc/pykvm/virtio-mmio)",
        "Hello from virtio-console!",            # through the transmit queue (the UART never saw it)
        "virtio-console: got ping pong",          # stdin -> receive queue -> back out
        "virtio-console: ok",
    ]


@needs_kvm
@pytest.mark.parametrize("fast", FAST)
def test_rng_guest_gets_entropy(image, fast):
    r = run_pykvm("run", "-k", "guests/virtio-rng.elf", "--drive", str(image), "--rng", "--timeout", "30",
                  env={"PYKVM_VIRTIO_FASTPATH": fast})
    assert r.returncode == 39, r.stdout.decode() + r.stderr.decode()
    lines = r.stdout.decode().splitlines()
    assert lines[0] == "virtio-rng: device at 0xd0001200 irq 6 (fw_cfg etc/pykvm/virtio-mmio)"
    assert lines[1].startswith("virtio-rng: 64 bytes, ") and lines[-1] == "virtio-rng: ok"


@needs_kvm
def test_guest_without_its_device_says_so():
    r = run_pykvm("run", "-k", "guests/virtio-rng.elf", "--timeout", "30")
    assert r.returncode == (0x71 << 1) | 1
    assert b"virtio-rng: FAIL" in r.stdout


@needs_kvm
@pytest.mark.parametrize("spec, message", [("/nonexistent/disk.img",
                                            b"cannot use --drive /nonexistent/disk.img: No such file"),
                                           ("x.img,turbo", b"unknown option")])
def test_bad_drive_is_a_usage_error(spec, message):
    r = run_pykvm("run", "-k", "guests/virtio-blk.elf", "--drive", spec)
    assert r.returncode == 2 and message in r.stderr


@needs_kvm
def test_info_shows_the_fast_path():
    r = run_pykvm("info")
    assert r.returncode == 0
    assert "virtio fast path: notifications via KVM_IOEVENTFD" in r.stdout.decode()
    r = run_pykvm("info", env={"PYKVM_VIRTIO_FASTPATH": "0"})
    assert "virtio fast path: notifications via MMIO exits (vCPU thread), interrupts via KVM_IRQ_LINE" \
        in r.stdout.decode()


@needs_kvm
def test_machine_attaches_and_stops_device_threads(image):
    from pykvm.devices.fw_cfg import FW_CFG_FILE_DIR
    from pykvm.machine import Machine

    before = set(threading.enumerate())
    with Machine(mem_size=16 << 20, irqchip=True) as machine:
        devices = virtio.attach_virtio(machine, [DriveSpec(str(image))], rng=True, console=True,
                                       console_out=lambda data: None)
        assert devices.cmdline == linux_cmdline([DriveSpec(str(image))], rng=True, console=True)
        assert [machine.mmio.find(s.base)[0] for s in devices.slots] == devices.transports
        assert devices.console is devices.transports[1].device
        assert b"etc/pykvm/virtio-mmio" in machine.fw_cfg.item(FW_CFG_FILE_DIR)
        if devices.fast.ioeventfd:
            assert len(set(threading.enumerate()) - before) == 3      # one device thread each
        block = devices.transports[0].device
    assert set(threading.enumerate()) <= before
    assert block.fd == -1                                             # the image was closed
