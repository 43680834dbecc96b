"""The bare-metal virtio-net guest (guests/virtio-net.elf, its own driver) on a TAP in a network
namespace this test creates and deletes: a frame from the host reaches the guest byte for byte,
and the guest's frame reaches the host byte for byte.

The host end is a packet socket (AF_PACKET) bound to the TAP inside the namespace: what it sends
on the TAP goes to pykvm's reader, and what pykvm writes to the TAP arrives on it. It sends its
frame every 0.2 s until the guest's answer arrives (pykvm may not have attached to the TAP yet
when it starts; the guest takes the first copy and ignores other EtherTypes)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT, needs_kvm

from benchmarks import netns

NETNS_PROBLEM = netns.problem()
pytestmark = [needs_kvm, pytest.mark.skipif(NETNS_PROBLEM is not None, reason=NETNS_PROBLEM or "")]

GUEST = ROOT / "guests" / "virtio-net.elf"
GUEST_MAC = bytes.fromhex("020000000042")
HOST_MAC = bytes.fromhex("020000000001")
ETHERTYPE = b"\x88\xb5"
HOST_FRAME = GUEST_MAC + HOST_MAC + ETHERTYPE + b"pykvm host->guest" + bytes(range(0x40, 0x40 + 69))
GUEST_FRAME = bytearray((i * 7 + 3) & 0xFF for i in range(90))
GUEST_FRAME[0:14] = b"\xff" * 6 + GUEST_MAC + ETHERTYPE
GUEST_FRAME[14:14 + 17] = b"pykvm guest->host"
GUEST_FRAME = bytes(GUEST_FRAME)

# Runs inside the namespace: send HOST_FRAME on the TAP until a frame of our EtherType comes in
# from it (not one of our own going out), then print that frame in hex.
HOST_SIDE = """
import select, socket, sys, time
tap, frame = sys.argv[1], bytes.fromhex(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind((tap, 0x88b5))
print("ready", flush=True)
deadline = time.monotonic() + 120
while time.monotonic() < deadline:
    s.send(frame)
    if select.select([s], [], [], 0.2)[0]:
        data, addr = s.recvfrom(65536)
        if addr[2] != socket.PACKET_OUTGOING:
            print(data.hex(), flush=True)
            sys.exit(0)
sys.exit("no frame from the guest")
"""


def test_frames_cross_the_tap_byte_for_byte_both_ways():
    exchange_frames(["run", "-k", str(GUEST), "--net", f"tap=tap0,mac={GUEST_MAC.hex(':')}", "--timeout", "120"])


def test_network_interfaces_of_firecrackers_config_file_attach_the_same_card(tmp_path):
    """`network-interfaces` in a Firecracker config file (what PUT /network-interfaces/{iface_id}
    records): the same card on the same TAP, with the MAC asked for."""
    import json
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(GUEST)},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": GUEST_MAC.hex(":")}]}))
    exchange_frames(["run", "--config-file", str(config), "--timeout", "120"])


def exchange_frames(pykvm_args: list[str]) -> None:
    """In a fresh namespace with tap0: pykvm ARGS runs the guest while the host side trades frames."""
    with netns.Netns() as ns:
        ns.add_tap("tap0")
        ns.run(["sysctl", "-qw", "net.ipv6.conf.tap0.disable_ipv6=1"])     # fewer stray frames
        guest = ns.popen([sys.executable, "-m", "pykvm", *pykvm_args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        host = ns.popen([sys.executable, "-c", HOST_SIDE, "tap0", HOST_FRAME.hex()],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = guest.communicate(timeout=180)
            host_out, host_err = host.communicate(timeout=180)
        finally:
            for p in (guest, host):
                if p.poll() is None:
                    p.kill()
                    p.wait()
        text = out.decode(errors="replace")
        assert guest.returncode == 41, text + err.decode()
        lines = text.splitlines()
        assert f"virtio-net: mac {GUEST_MAC.hex(':')}" in lines
        assert f"virtio-net: got {len(HOST_FRAME)} {HOST_FRAME.hex()}" in lines, text
        assert host.returncode == 0, host_err.decode()
        assert bytes.fromhex(host_out.decode().split()[-1]) == GUEST_FRAME


def test_missing_tap_is_one_clear_error_with_status_2():
    with netns.Netns() as ns:
        r = ns.run([sys.executable, "-m", "pykvm", "run", "-k", str(GUEST), "--net", "tap=nosuchtap0"],
                   cwd=ROOT, timeout=60)
        err = r.stderr.decode()
        assert r.returncode == 2, err
        assert "no network interface nosuchtap0" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) <= 3        # one paragraph


def test_interface_that_is_not_a_tap_is_refused():
    with netns.Netns() as ns:
        r = ns.run([sys.executable, "-m", "pykvm", "run", "-k", str(GUEST), "--net", "tap=lo"], cwd=ROOT, timeout=60)
        assert r.returncode == 2 and b"lo is not a TAP device" in r.stderr, r.stderr


BUSY = """
import sys
from pykvm.devices.tap import Tap, TapError
first = Tap.open("tap0")
try:
    Tap.open("tap0")
except TapError as e:
    print(e.exit_status, e)
first.close()
again = Tap.open("tap0")           # free again once closed
again.close()
"""


def test_tap_held_by_another_process_is_busy():
    with netns.Netns() as ns:
        ns.add_tap("tap0")
        r = ns.run([sys.executable, "-c", BUSY], cwd=ROOT, timeout=60)
        assert r.returncode == 0, r.stderr.decode()
        assert r.stdout.decode().startswith("2 TAP tap0 is busy"), r.stdout


HOLD = """
import sys
from pykvm.devices.tap import Tap
tap = Tap.open("tap0")
print("holding", flush=True)
sys.stdin.read()                  # until the test closes our stdin
tap.close()
"""


def test_tap_another_process_holds_is_one_clear_error_with_status_2():
    """`pykvm run --net tap=tap0` while another process has tap0 open: one paragraph, status 2."""
    with netns.Netns() as ns:
        ns.add_tap("tap0")
        holder = ns.popen([sys.executable, "-c", HOLD], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert holder.stdout.readline() == b"holding\n"
            r = ns.run([sys.executable, "-m", "pykvm", "run", "-k", str(GUEST), "--net", "tap=tap0"],
                       cwd=ROOT, timeout=60)
        finally:
            holder.stdin.close()
            holder.wait(30)
            holder.stdout.close()
        err = r.stderr.decode()
        assert r.returncode == 2, err
        assert "TAP tap0 is busy" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) <= 3        # one paragraph


MAY_NOT = """
from pykvm.devices.tap import Tap, TapError
try:
    Tap.open("tap0")
except TapError as e:
    print(e.exit_status, e)
"""


@pytest.mark.skipif(not __import__("shutil").which("setpriv"), reason="needs setpriv (util-linux)")
def test_tap_the_user_may_not_open_is_one_clear_error():
    """An unprivileged user (nobody) attaching to root's TAP: TapError, status 2, saying what to check."""
    with netns.Netns() as ns:
        ns.add_tap("tap0")
        r = ns.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", MAY_NOT],
                   cwd=ROOT, timeout=60)
        out = r.stdout.decode()
        assert r.returncode == 0, r.stderr.decode()
        assert out.startswith("2 ") and "tap0" in out and ("may not open" in out or "may this user open" in out), out
