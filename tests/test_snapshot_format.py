"""The snapshot state file (version, checksum, refusals) and each device's state()/from_state(), without a VM."""

from __future__ import annotations

import struct

import pytest

from pykvm.devices.debug_exit import DebugExit
from pykvm.devices.fw_cfg import FW_CFG_CMDLINE_DATA, FwCfg
from pykvm.devices.i8042 import I8042
from pykvm.devices.mmio_test import MmioTestDevice
from pykvm.devices.pci import PciConfigIo, config_address
from pykvm.devices.poweroff import PowerOff
from pykvm.devices.sink import Sink
from pykvm.snapshot import FORMAT_VERSION, SnapshotError, read_state, write_state
from pykvm.snapshot.format import HEADER

STATE = {"machine": {"mem_size": 1 << 20}, "vcpus": [{"regs": bytes(range(200)), "msrs": [[16, 5]]}],
         "devices": {"pio:0x510": {"items": {"17": b"kernel" * 1000, "0": b""}}}}


def test_round_trip(tmp_path):
    path = tmp_path / "vm.state"
    size = write_state(str(path), STATE)
    assert path.stat().st_size == size
    assert read_state(str(path)) == STATE
    assert size < 6000 + 200 + HEADER.size + 400    # binary data is stored as itself, not as text


def test_a_blob_reference_outside_the_file_is_refused(tmp_path):
    path = tmp_path / "vm.state"
    write_state(str(path), {"x": {"$blob": [0, 10]}})
    with pytest.raises(SnapshotError, match="outside the file"):
        read_state(str(path))


@pytest.mark.parametrize("damage, words", [
    (lambda b: b[:HEADER.size - 1], "truncated"),
    (lambda b: b[:-3], "truncated"),
    (lambda b: b + b"x", "appended"),
    (lambda b: b[:-2] + bytes([b[-2] ^ 1]) + b[-1:], "checksum of its state does not match"),
    (lambda b: b"NOTASNAP" + b[8:], "not a pykvm snapshot"),
    (lambda b: b[:8] + struct.pack("<I", FORMAT_VERSION + 1) + b[12:], f"version {FORMAT_VERSION + 1}"),
])
def test_damaged_files_are_refused_with_the_reason(tmp_path, damage, words):
    path = tmp_path / "vm.state"
    write_state(str(path), STATE)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SnapshotError, match=words):
        read_state(str(path))


def test_missing_file_is_a_snapshot_error(tmp_path):
    with pytest.raises(SnapshotError, match="cannot read"):
        read_state(str(tmp_path / "absent"))


def test_i8042_state_round_trip_keeps_a_pending_command_and_the_output_buffer():
    a = I8042(on_reset=lambda: None)
    a.write_command(0x60)            # write command byte: waits for its data byte
    state = a.state()
    b = I8042.from_state(state, on_reset=lambda: None)
    b.write_data(0x45)               # the pending command completes in the restored controller
    assert b.command_byte == 0x45
    a.write_command(0xAA)            # self-test answer in the output buffer
    c = I8042.from_state(a.state(), on_reset=lambda: None)
    assert c.read_status() & 0x01 and c.read_data() == 0x55


def test_i8042_restored_reset_line_still_resets():
    resets = []
    b = I8042.from_state(I8042(on_reset=lambda: None).state(), on_reset=lambda: resets.append(1))
    b.write_command(0xFE)
    assert resets == [1]


def test_fw_cfg_state_round_trip_mid_read():
    a = FwCfg(ram_size=64 << 20, nb_cpus=2, max_cpus=2, cmdline="console=ttyS0")
    a.add_file("etc/pykvm", b"hello")
    a.write(0, 2, FW_CFG_CMDLINE_DATA)
    first = a.read(1, 1)
    b = FwCfg.from_state(a.state())
    assert first == ord("c") and b.read(1, 1) == ord("o")   # continues at the same offset
    assert b.item(FW_CFG_CMDLINE_DATA) == a.item(FW_CFG_CMDLINE_DATA)


def test_small_devices_round_trip():
    pci = PciConfigIo()
    pci.write(0, 4, config_address(0, 3, 0, 8))
    assert PciConfigIo.from_state(pci.state()).read(0, 4) == config_address(0, 3, 0, 8)
    mmio = MmioTestDevice()
    mmio.write(0x08, 8, 0x1122334455667788)
    assert MmioTestDevice.from_state(mmio.state()).read(0x10, 4) == ~0x55667788 & 0xFFFFFFFF
    offs = []
    power = PowerOff(on_poweroff=lambda: offs.append(1))
    for byte in b"Shut":
        power.write(0, 1, byte)
    restored = PowerOff.from_state(power.state(), on_poweroff=lambda: offs.append(2))
    for byte in b"down":
        restored.write(0, 1, byte)
    assert offs == [2]
    sink = Sink("POST")
    sink.write(0, 1, 0x42)
    assert Sink.from_state(sink.state(), "POST").last == 0x42
    assert DebugExit.from_state(DebugExit(lambda v, s: None).state(), lambda v, s: None).state() == {}


@pytest.mark.parametrize("device, bad", [
    (I8042(on_reset=lambda: None), {"ram": "00", "output_port": 3, "obf": False, "out": 0, "a2": False,
                                    "pending": None}),
    (I8042(on_reset=lambda: None), {"ram": "00" * 32, "output_port": 300, "obf": False, "out": 0, "a2": False,
                                    "pending": None}),
    (FwCfg(ram_size=1 << 20, nb_cpus=1, max_cpus=1), {"items": {"1": "zz"}, "files": {}, "key": 0, "offset": 0}),
    (FwCfg(ram_size=1 << 20, nb_cpus=1, max_cpus=1), {"items": {"1": b""}, "files": {}, "key": 1 << 16, "offset": 0}),
    (PciConfigIo(), {"address": 3}),
    (MmioTestDevice(), {"scratch": -1, "writes": 0}),
    (PowerOff(on_poweroff=lambda: None), {"matched": 8}),
    (Sink("x"), {"last": "0"}),
    (DebugExit(lambda v, s: None), {"x": 1}),
])
def test_malformed_device_state_is_refused_and_changes_nothing(device, bad):
    before = device.state()
    with pytest.raises(ValueError):
        device.load_state(bad)
    assert device.state() == before


class _Pulses:
    def __init__(self) -> None:
        self.count = 0

    def pulse(self) -> None:
        self.count += 1


def test_ctrl_alt_del_is_typed_through_the_output_buffer_with_irq1():
    kbc = I8042(on_reset=lambda: None)
    kbc.keyboard_irq = irq = _Pulses()
    kbc.send_ctrl_alt_del()
    got = []
    while kbc.read_status() & 0x01:
        got.append(kbc.read_data())
    assert got == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]   # set 1: the controller translates
    assert irq.count == len(got)
    kbc.write_command(0xAD)          # keyboard disabled: nothing is typed
    kbc.send_ctrl_alt_del()
    assert not kbc.read_status() & 0x01
