"""fw_cfg, tested as QEMU's docs/specs/fw_cfg.rst describes the legacy I/O interface.

Each test drives the two ports the way guest firmware does: a 16-bit ``outw`` of the key to the
selector (offset 0), then ``inb`` from the data register (offset 1).
"""

from __future__ import annotations

import struct
import threading

import pytest
from conftest import ROOT, needs_kvm
from hypothesis import given
from hypothesis import strategies as st

from pykvm.devices.bus import Bus
from pykvm.devices.fw_cfg import (
    BASE,
    FW_CFG_CMDLINE_DATA,
    FW_CFG_CMDLINE_SIZE,
    FW_CFG_FILE_DIR,
    FW_CFG_FILE_FIRST,
    FW_CFG_ID,
    FW_CFG_INITRD_DATA,
    FW_CFG_INITRD_SIZE,
    FW_CFG_KERNEL_DATA,
    FW_CFG_KERNEL_SIZE,
    FW_CFG_MAX_CPUS,
    FW_CFG_NB_CPUS,
    FW_CFG_RAM_SIZE,
    FW_CFG_SIGNATURE,
    LENGTH,
    FwCfg,
)

SELECTOR, DATA = 0, 1


def select(dev: FwCfg, key: int) -> None:
    dev.write(SELECTOR, 2, key)


def read_bytes(dev: FwCfg, n: int) -> bytes:
    return bytes(dev.read(DATA, 1) for _ in range(n))


def read_item(dev: FwCfg, key: int, n: int) -> bytes:
    select(dev, key)
    return read_bytes(dev, n)


def u32(dev: FwCfg, key: int) -> int:
    return struct.unpack("<I", read_item(dev, key, 4))[0]


def parse_directory(dev: FwCfg) -> list[tuple[str, int, int]]:
    """(name, key, size) per FWCfgFile entry, read byte by byte as firmware does."""
    select(dev, FW_CFG_FILE_DIR)
    (count,) = struct.unpack(">I", read_bytes(dev, 4))
    files = []
    for _ in range(count):
        size, key, reserved, name = struct.unpack(">IHH56s", read_bytes(dev, 64))
        assert reserved == 0
        assert name.endswith(b"\0")
        files.append((name.rstrip(b"\0").decode(), key, size))
    return files


@pytest.fixture
def dev() -> FwCfg:
    return FwCfg(ram_size=256 << 20, nb_cpus=2, max_cpus=4)


# ---- presence and identification ------------------------------------------------------------

def test_signature_reads_qemu(dev: FwCfg) -> None:
    assert read_item(dev, FW_CFG_SIGNATURE, 4) == b"QEMU"


def test_id_reports_the_traditional_interface_only(dev: FwCfg) -> None:
    assert u32(dev, FW_CFG_ID) == 1        # bit 0 traditional; bit 1 (DMA) clear


def test_well_known_keys_have_qemus_numbers() -> None:
    assert (FW_CFG_SIGNATURE, FW_CFG_ID, FW_CFG_RAM_SIZE, FW_CFG_NB_CPUS) == (0x00, 0x01, 0x03, 0x05)
    assert (FW_CFG_KERNEL_SIZE, FW_CFG_INITRD_SIZE, FW_CFG_MAX_CPUS) == (0x08, 0x0B, 0x0F)
    assert (FW_CFG_KERNEL_DATA, FW_CFG_INITRD_DATA) == (0x11, 0x12)
    assert (FW_CFG_CMDLINE_SIZE, FW_CFG_CMDLINE_DATA, FW_CFG_FILE_DIR, FW_CFG_FILE_FIRST) == (0x14, 0x15, 0x19, 0x20)


def test_the_device_spans_selector_and_data_ports() -> None:
    assert (BASE, LENGTH) == (0x510, 2)


def test_on_a_bus_at_0x510() -> None:
    bus = Bus("pio")
    bus.attach(FwCfg(1 << 20, 1, 1), BASE, LENGTH)
    bus.write(0x510, 2, FW_CFG_SIGNATURE)
    assert bytes(bus.read(0x511, 1) for _ in range(4)) == b"QEMU"


# ---- machine description --------------------------------------------------------------------

def test_ram_size_is_u64_little_endian() -> None:
    dev = FwCfg(ram_size=6 << 30, nb_cpus=1, max_cpus=1)
    assert struct.unpack("<Q", read_item(dev, FW_CFG_RAM_SIZE, 8))[0] == 6 << 30


def test_cpu_counts_are_u16(dev: FwCfg) -> None:
    assert read_item(dev, FW_CFG_NB_CPUS, 2) == b"\x02\x00"
    assert read_item(dev, FW_CFG_MAX_CPUS, 2) == b"\x04\x00"


# ---- direct kernel boot ---------------------------------------------------------------------

def test_kernel_initrd_and_cmdline_items() -> None:
    dev = FwCfg(64 << 20, 1, 1, kernel=b"KERNEL" * 100, initrd=b"\x1f\x8b rd", cmdline="console=ttyS0")
    assert u32(dev, FW_CFG_KERNEL_SIZE) == 600
    assert read_item(dev, FW_CFG_KERNEL_DATA, 600) == b"KERNEL" * 100
    assert u32(dev, FW_CFG_INITRD_SIZE) == 5
    assert read_item(dev, FW_CFG_INITRD_DATA, 5) == b"\x1f\x8b rd"
    assert u32(dev, FW_CFG_CMDLINE_SIZE) == len("console=ttyS0") + 1     # counts the NUL
    assert read_item(dev, FW_CFG_CMDLINE_DATA, 14) == b"console=ttyS0\0"


def test_without_a_kernel_the_sizes_are_zero_and_the_cmdline_is_just_nul(dev: FwCfg) -> None:
    assert u32(dev, FW_CFG_KERNEL_SIZE) == 0
    assert u32(dev, FW_CFG_INITRD_SIZE) == 0
    assert u32(dev, FW_CFG_CMDLINE_SIZE) == 1
    assert read_item(dev, FW_CFG_CMDLINE_DATA, 1) == b"\0"



def _loaded_machine(firmware: bool):
    """A Machine that loaded a plan carrying a kernel, an initrd and a command line (as detect's loaders make)."""
    from pykvm.boot.flat import load_flat
    from pykvm.machine import Machine
    from pykvm.x86.modes import CpuMode
    plan = load_flat(b"\xf4", 0x8000, CpuMode.LONG64, 64 << 20)
    plan.kernel, plan.initrd, plan.cmdline = b"KERNEL" * 100, b"\x1f\x8b rd", "console=ttyS0"
    image = (ROOT / "firmware" / "pykvm-fw.bin").read_bytes() if firmware else None
    machine = Machine(mem_size=64 << 20, firmware=image)
    machine.load(plan)
    return machine


@needs_kvm
def test_a_direct_boot_offers_the_cmdline_but_not_the_kernel_and_initrd_already_in_ram() -> None:
    """As Firecracker (no fw_cfg) and unlike a firmware boot: nothing will load them, so the VMM keeps no copy."""
    with _loaded_machine(firmware=False) as machine:
        dev = machine.fw_cfg
        assert (u32(dev, FW_CFG_KERNEL_SIZE), u32(dev, FW_CFG_INITRD_SIZE)) == (0, 0)
        assert dev.item(FW_CFG_KERNEL_DATA) == dev.item(FW_CFG_INITRD_DATA) == b""
        assert read_item(dev, FW_CFG_CMDLINE_DATA, 14) == b"console=ttyS0\0"


@needs_kvm
def test_a_firmware_boot_offers_the_kernel_initrd_and_cmdline_for_the_firmware_to_load() -> None:
    with _loaded_machine(firmware=True) as machine:
        dev = machine.fw_cfg
        assert u32(dev, FW_CFG_KERNEL_SIZE) == 600
        assert read_item(dev, FW_CFG_KERNEL_DATA, 600) == b"KERNEL" * 100
        assert read_item(dev, FW_CFG_INITRD_DATA, 5) == b"\x1f\x8b rd"
        assert read_item(dev, FW_CFG_CMDLINE_DATA, 14) == b"console=ttyS0\0"

# ---- the data register ----------------------------------------------------------------------

def test_reads_past_the_end_return_zero(dev: FwCfg) -> None:
    assert read_item(dev, FW_CFG_SIGNATURE, 8) == b"QEMU\0\0\0\0"


def test_unknown_key_reads_as_zeros(dev: FwCfg) -> None:
    assert read_item(dev, 0x0002, 16) == bytes(16)        # UUID: not provided
    assert read_item(dev, 0x8003, 4) == bytes(4)          # an arch-local key nobody added
    assert read_item(dev, FW_CFG_FILE_FIRST, 4) == bytes(4)   # no files yet


def test_selecting_rewinds_the_offset(dev: FwCfg) -> None:
    select(dev, FW_CFG_SIGNATURE)
    assert read_bytes(dev, 2) == b"QE"
    select(dev, FW_CFG_SIGNATURE)
    assert read_bytes(dev, 4) == b"QEMU"


def test_selecting_another_key_starts_at_its_first_byte(dev: FwCfg) -> None:
    select(dev, FW_CFG_SIGNATURE)
    read_bytes(dev, 3)
    assert read_item(dev, FW_CFG_ID, 4) == b"\x01\0\0\0"


def test_data_writes_are_ignored(dev: FwCfg) -> None:
    select(dev, FW_CFG_SIGNATURE)
    dev.write(DATA, 1, ord("X"))
    assert read_bytes(dev, 4) == b"QEMU"       # neither the item nor the offset changed


def test_a_byte_write_to_the_selector_port_does_not_select(dev: FwCfg) -> None:
    select(dev, FW_CFG_SIGNATURE)
    read_bytes(dev, 1)
    dev.write(SELECTOR, 1, FW_CFG_ID)
    assert read_bytes(dev, 3) == b"EMU"


def test_the_selector_is_write_only(dev: FwCfg) -> None:
    assert dev.read(SELECTOR, 2) == 0xFFFF
    assert dev.read(SELECTOR, 1) == 0xFF


def test_only_the_low_16_bits_of_a_wide_selector_write_count(dev: FwCfg) -> None:
    dev.write(SELECTOR, 4, 0xABCD_0000 | FW_CFG_SIGNATURE)
    assert read_bytes(dev, 4) == b"QEMU"


def test_a_wide_data_read_returns_the_next_bytes_in_item_order(dev: FwCfg) -> None:
    select(dev, FW_CFG_SIGNATURE)
    assert dev.read(DATA, 2).to_bytes(2, "little") == b"QE"
    assert dev.read(DATA, 4).to_bytes(4, "little") == b"MU\0\0"


# ---- files ----------------------------------------------------------------------------------

def test_files_get_keys_from_0x20_in_the_order_added(dev: FwCfg) -> None:
    assert dev.add_file("etc/zeta", b"z") == 0x20
    assert dev.add_file("etc/alpha", b"aa") == 0x21
    assert dev.add_file("opt/pykvm/x", b"") == 0x22


def test_file_directory_lists_every_file_sorted_by_name(dev: FwCfg) -> None:
    dev.add_file("etc/zeta", b"z")
    dev.add_file("etc/alpha", b"aa")
    dev.add_file("opt/pykvm/x", b"")
    assert parse_directory(dev) == [("etc/alpha", 0x21, 2), ("etc/zeta", 0x20, 1), ("opt/pykvm/x", 0x22, 0)]


def test_a_file_is_read_by_the_key_its_directory_entry_names(dev: FwCfg) -> None:
    payload = bytes(range(256)) * 3
    dev.add_file("etc/e820", b"other")
    dev.add_file("opt/org.pykvm/blob", payload)
    (entry,) = [f for f in parse_directory(dev) if f[0] == "opt/org.pykvm/blob"]
    _, key, size = entry
    assert read_item(dev, key, size) == payload


def test_empty_directory(dev: FwCfg) -> None:
    assert parse_directory(dev) == []
    assert read_item(dev, FW_CFG_FILE_DIR, 4) == b"\0\0\0\0"


def test_directory_entries_are_64_bytes_with_nul_padded_names(dev: FwCfg) -> None:
    dev.add_file("a" * 55, b"x")
    raw = read_item(dev, FW_CFG_FILE_DIR, 4 + 64 + 4)
    assert raw[:4] == b"\0\0\0\x01"
    assert raw[4:8] == b"\0\0\0\x01"            # size, big-endian
    assert raw[8:10] == b"\0\x20"               # select, big-endian
    assert raw[10:12] == b"\0\0"                # reserved
    assert raw[12:68] == b"a" * 55 + b"\0"
    assert raw[68:] == bytes(4)                 # past the end


@pytest.mark.parametrize("name", ["", "a" * 56, "nul\0inside"])
def test_bad_file_names_are_refused(dev: FwCfg, name: str) -> None:
    with pytest.raises(ValueError):
        dev.add_file(name, b"")


def test_a_name_of_55_utf8_bytes_is_measured_in_bytes(dev: FwCfg) -> None:
    with pytest.raises(ValueError):
        dev.add_file("é" * 28, b"")          # 56 bytes
    dev.add_file("é" * 27 + "x", b"")        # 55 bytes


def test_duplicate_file_names_are_refused(dev: FwCfg) -> None:
    dev.add_file("etc/x", b"1")
    with pytest.raises(ValueError):
        dev.add_file("etc/x", b"2")


def test_item_gives_the_host_the_guests_view(dev: FwCfg) -> None:
    key = dev.add_file("etc/x", b"hello")
    assert dev.item(key) == b"hello"
    assert dev.item(FW_CFG_SIGNATURE) == b"QEMU"
    assert dev.item(0x1234) == b""


# ---- concurrency and random use -------------------------------------------------------------

def test_concurrent_readers_never_see_a_torn_item() -> None:
    dev = FwCfg(1 << 20, 1, 1)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(300):
                dev.write(SELECTOR, 2, FW_CFG_SIGNATURE)
                for _ in range(4):
                    assert 0 <= dev.read(DATA, 1) <= 0xFF
        except BaseException as e:   # reported to the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


ops = st.one_of(
    st.tuples(st.just("select"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("read"), st.sampled_from([0, 1])),
    st.tuples(st.just("write"), st.integers(0, 1), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFF_FFFF)),
)


@given(st.lists(ops, max_size=60), st.binary(max_size=40))
def test_random_port_sequences_never_raise_and_reads_are_bytes(sequence, blob) -> None:
    dev = FwCfg(1 << 20, 1, 1, kernel=blob, cmdline="x")
    dev.add_file("opt/test", blob)
    for op in sequence:
        if op[0] == "select":
            select(dev, op[1])
        elif op[0] == "read":
            value = dev.read(op[1], 1)
            assert 0 <= value <= 0xFF
        else:
            dev.write(op[1], op[2], op[3])


@given(st.integers(0, 0xFFFF), st.integers(0, 80))
def test_after_select_the_data_port_streams_the_item_then_zeros(key, n) -> None:
    dev = FwCfg(1 << 20, 1, 1, kernel=b"K" * 30, cmdline="console=ttyS0")
    dev.add_file("opt/test", b"0123456789")
    expected = dev.item(key)
    assert read_item(dev, key, n) == (expected + bytes(n))[:n]
