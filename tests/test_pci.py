"""PCI configuration mechanism #1 on an empty bus, tested as the PCI Local Bus Specification
describes CONFIG_ADDRESS (0xCF8) and CONFIG_DATA (0xCFC), and as Linux's pci_check_type1() probes.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.devices.bus import Bus
from pykvm.devices.pci import BASE, LENGTH, PciConfigIo, config_address


@pytest.fixture
def bus() -> Bus:
    bus = Bus("pio")
    bus.attach(PciConfigIo(), BASE, LENGTH)
    return bus


def test_one_device_covers_0xcf8_to_0xcff() -> None:
    assert (BASE, LENGTH) == (0xCF8, 8)


def test_address_register_reads_back_as_written(bus: Bus) -> None:
    assert bus.read(0xCF8, 4) == 0
    bus.write(0xCF8, 4, 0x8000_0000)
    assert bus.read(0xCF8, 4) == 0x8000_0000


def test_reserved_and_low_bits_of_the_address_read_as_zero(bus: Bus) -> None:
    bus.write(0xCF8, 4, 0xFFFF_FFFF)
    assert bus.read(0xCF8, 4) == 0x80FF_FFFC


def test_config_address_layout() -> None:
    assert config_address(bus=1, device=2, function=3, register=0x10) == 0x8001_1310
    assert config_address(0, 31, 7, 0xFF) == 0x8000_FFFC


def test_every_function_is_absent(bus: Bus) -> None:
    for device in range(32):
        bus.write(0xCF8, 4, config_address(0, device, 0, 0))
        assert bus.read(0xCFC, 4) == 0xFFFF_FFFF         # vendor 0xffff: nothing there
        assert bus.read(0xCFC, 2) == 0xFFFF


@pytest.mark.parametrize("port", [0xCFC, 0xCFD, 0xCFE, 0xCFF])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_data_reads_all_ones_at_any_size_and_offset(bus: Bus, port: int, size: int) -> None:
    bus.write(0xCF8, 4, 0x8000_0000)
    assert bus.read(port, size) == (1 << (8 * size)) - 1


def test_data_reads_all_ones_with_the_enable_bit_clear(bus: Bus) -> None:
    bus.write(0xCF8, 4, 0)
    assert bus.read(0xCFC, 4) == 0xFFFF_FFFF


def test_data_writes_are_ignored(bus: Bus) -> None:
    bus.write(0xCF8, 4, config_address(0, 0, 0, 0x04))
    bus.write(0xCFC, 4, 0x0000_0007)
    assert bus.read(0xCFC, 4) == 0xFFFF_FFFF
    assert bus.read(0xCF8, 4) == config_address(0, 0, 0, 0x04)


def test_byte_and_word_accesses_to_0xcf8_are_not_the_address_register(bus: Bus) -> None:
    bus.write(0xCF8, 4, 0x8000_1234)
    bus.write(0xCFB, 1, 0x01)              # mechanism #2 poke, as Linux's type-1 probe does first
    bus.write(0xCF8, 2, 0x0000)
    assert bus.read(0xCF8, 4) == 0x8000_1234
    assert bus.read(0xCF8, 1) == 0xFF
    assert bus.read(0xCFA, 2) == 0xFFFF


def test_linux_finds_mechanism_1_and_an_empty_bus(bus: Bus) -> None:
    # pci_check_type1()
    bus.write(0xCFB, 1, 0x01)
    saved = bus.read(0xCF8, 4)
    bus.write(0xCF8, 4, 0x8000_0000)
    assert bus.read(0xCF8, 4) == 0x8000_0000
    bus.write(0xCF8, 4, saved)
    # pci_check_type2() looks for mechanism #2 and must not find it
    bus.write(0xCFB, 1, 0x00)
    bus.write(0xCF8, 1, 0x00)
    bus.write(0xCFA, 1, 0x00)
    assert not (bus.read(0xCF8, 1) == 0 and bus.read(0xCFA, 1) == 0)
    assert bus.unclaimed == {}


@given(st.lists(st.tuples(st.integers(0, 7), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFF_FFFF)), max_size=40))
def test_only_dword_writes_at_0xcf8_change_anything(ops) -> None:
    dev = PciConfigIo()
    expected = 0
    for offset, size, value in ops:
        dev.write(offset, size, value)
        if offset == 0 and size == 4:
            expected = value & 0x80FF_FFFC
        assert dev.read(0, 4) == expected
        assert dev.read(4, size) == (1 << (8 * size)) - 1
