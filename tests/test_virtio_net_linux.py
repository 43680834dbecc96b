"""virtio-net with our small Linux, inside a network namespace each test creates and deletes.

The namespace holds only its loopback and the TAPs (and a bridge) made here, addresses from
192.0.2.0/24 and no route out; pykvm runs inside it (``ip netns exec``). The guest gets its
address from the kernel's IP autoconfiguration (``ip=`` on its command line), its shell commands
from the serial console, and the test waits for answers that the echoed commands cannot contain
(``ok-$((40+2))`` prints ``ok-42``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
import time

import pytest
from conftest import ROOT, needs_kvm

from benchmarks import netns

LINUX = ROOT / "guests" / "linux" / "build"
KERNEL, INITRD = LINUX / "vmlinux", LINUX / "initramfs.cpio"
NETNS_PROBLEM = netns.problem()

pytestmark = [
    needs_kvm,
    pytest.mark.skipif(NETNS_PROBLEM is not None, reason=NETNS_PROBLEM or ""),
    pytest.mark.skipif(not (KERNEL.exists() and INITRD.exists()),
                       reason="the small Linux is not built (make -C guests/linux)"),
    pytest.mark.skipif(not (shutil.which("busybox") and shutil.which("curl")),
                       reason="the host side needs busybox (ping) and curl"),
]

HOST = "192.0.2.1"
BOOT_WAIT = 240          # seconds a boot may take on this emulated backend before we give up


class LinuxGuest:
    """pykvm running our small Linux in a namespace, on TAP ``tap``, at ``address``/24."""

    def __init__(self, ns: netns.Netns, tap: str, address: str, mac: str) -> None:
        cmdline = f"console=ttyS0 ip={address}:::255.255.255.0::eth0:off"
        self.proc = ns.popen([sys.executable, "-m", "pykvm", "run", "-k", str(KERNEL), "-i", str(INITRD),
                              "-m", "64M", "-p", cmdline, "--net", f"tap={tap},mac={mac}", "--timeout", "400"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        self.out = bytearray()
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while data := self.proc.stdout.read1(65536):
            with self._changed:
                self.out += data
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def send(self, text: str) -> None:
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait_for(self, pattern: str, timeout: float = BOOT_WAIT) -> re.Match | None:
        """The first match of ``pattern`` in the output, waiting up to ``timeout`` seconds (None:
        not seen, or pykvm ended)."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern.encode())
        with self._changed:
            while True:
                m = regex.search(self.out)
                if m or self.proc.poll() is not None and not self._reader.is_alive():
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(min(left, 1.0))

    def poweroff(self, timeout: float = 60) -> int:
        """``poweroff -f`` and pykvm's exit status (the process is killed if it does not end)."""
        try:
            self.send("poweroff -f\n")
        except BrokenPipeError:
            pass
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9
        finally:
            self._reader.join(5)
            self.proc.stdin.close()
            self.stderr = self.proc.stderr.read().decode(errors="replace")
            self.proc.stderr.close()

    def text(self) -> str:
        return self.out.decode(errors="replace") + getattr(self, "stderr", "")


@pytest.fixture(scope="module")
def one_guest():
    """One guest on tap0 (host side 192.0.2.1): it pings the host, serves a page with httpd, and the
    host pings it and fetches the page. Returns what each step saw."""
    results = {}
    with netns.Netns() as ns:
        ns.add_tap("tap0", f"{HOST}/24")
        guest = LinuxGuest(ns, "tap0", "192.0.2.2", "02:00:00:00:00:02")
        try:
            results["up"] = guest.wait_for("pykvm-linux: init ready") is not None
            guest.send("cat /sys/class/net/eth0/address /sys/class/net/eth0/operstate\n"
                       f"ping -c 3 -W 10 {HOST} && echo ping-ok-$((40+2))\n"
                       "mkdir -p /www && echo pykvm-net-page >/www/index.html && httpd -h /www -p 80 "
                       "&& echo httpd-up-$((40+2))\n")
            guest.wait_for("httpd-up-42", 120)
            results["host_ping"] = ns.run(["busybox", "ping", "-c", "3", "-W", "10", "192.0.2.2"], timeout=60)
            results["fetch"] = ns.run(["curl", "-s", "--max-time", "30", "http://192.0.2.2/index.html"],
                                      timeout=60)
            guest.send("cat /proc/net/dev; echo counted-$((40+2))\n")
            guest.wait_for("counted-42", 60)
        finally:
            results["status"] = guest.poweroff()
            results["output"] = guest.text()
    return results


def test_linux_brings_eth0_up_with_our_mac(one_guest):
    out = one_guest["output"]
    assert one_guest["up"], out[-3000:]
    assert "02:00:00:00:00:02" in out and re.search(r"\bup\r?\n", out), out[-3000:]
    assert re.search(r"IP-Config: Complete:|device=eth0, .*addr=192\.0\.2\.2", out), out[-3000:]


def test_guest_pings_the_host(one_guest):
    out = one_guest["output"]
    assert "ping-ok-42" in out, out[-3000:]
    assert re.search(r"3 packets transmitted, 3 packets received", out)


def test_host_pings_the_guest(one_guest):
    r = one_guest["host_ping"]
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()
    assert b"3 packets received" in r.stdout


def test_host_fetches_a_page_from_httpd_in_the_guest(one_guest):
    r = one_guest["fetch"]
    assert r.stdout == b"pykvm-net-page\n", (r.stdout, r.stderr, one_guest["output"][-2000:])


def test_guest_powers_off_cleanly(one_guest):
    assert one_guest["status"] == 0, one_guest["output"][-2000:]


def test_two_guests_exchange_a_file_with_nc():
    """Two guests on a bridge inside the namespace: B listens with nc, A sends 200 KiB of random
    bytes; both print the file's checksum, and they must agree."""
    with netns.Netns() as ns:
        ns.add_bridge("br0", f"{HOST}/24")
        ns.add_tap("tap0", bridge="br0")
        ns.add_tap("tap1", bridge="br0")
        a = LinuxGuest(ns, "tap0", "192.0.2.2", "02:00:00:00:00:0a")
        b = LinuxGuest(ns, "tap1", "192.0.2.3", "02:00:00:00:00:0b")
        try:
            assert a.wait_for("pykvm-linux: init ready"), a.text()[-3000:]
            assert b.wait_for("pykvm-linux: init ready"), b.text()[-3000:]
            b.send("nc -l -p 5000 >/tmp/got && echo got-$((40+2)) $(md5sum </tmp/got) $(wc -c </tmp/got)\n")
            time.sleep(1)    # not an assertion: only lets B's shell reach its listen() first
            a.send("head -c 204800 /dev/urandom >/tmp/f && echo sum-$((40+2)) $(md5sum </tmp/f)\n"
                   "for i in 1 2 3 4 5; do nc 192.0.2.3 5000 </tmp/f && break; sleep 1; done\n")
            sent = a.wait_for(r"sum-42 ([0-9a-f]{32}) ", 120)
            got = b.wait_for(r"got-42 ([0-9a-f]{32}) +- +(\d+)\r?\n", 180)
            assert sent, a.text()[-3000:]
            assert got, b.text()[-3000:]
            assert got.group(1) == sent.group(1) and got.group(2) == b"204800"
        finally:
            assert a.poweroff() == 0
            assert b.poweroff() == 0
