"""The gdb stub end to end: Debian's gdb in batch mode against the bundled gdbtest guest (with
its symbols), and a raw protocol client for what batch gdb cannot do (Ctrl-C, dropping the
connection, malformed packets)."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, needs_kvm

from pykvm.debug import rsp

pytestmark = needs_kvm
GDBTEST_ELF = ROOT / "guests" / "gdbtest.elf"


class Pykvm:
    """``pykvm run GUEST --gdb 127.0.0.1:0 ...`` in the background, and the port it listens on."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", *args, "--gdb", "127.0.0.1:0"],
                                     cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = self.proc.stderr.readline().decode()
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", first)
        if m is None:
            self.proc.kill()
            pytest.fail(f"no gdb stub: {first}{self.proc.stderr.read().decode()}")
        self.port = int(m[1])

    def finish(self, timeout: float = 30):
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out.decode(), err.decode()


class Client:
    """A minimal gdb: frames packets, acks replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.reader = rsp.PacketReader()
        self.pending: list = []

    def send(self, data: bytes) -> None:
        self.sock.sendall(rsp.frame(data))

    def receive(self) -> bytes:
        while True:
            while self.pending:
                event = self.pending.pop(0)
                if isinstance(event, rsp.Packet):
                    self.sock.sendall(b"+")
                    return event.data
            data = self.sock.recv(65536)
            assert data, "the stub closed the connection"
            self.pending += self.reader.feed(data)

    def ask(self, data: bytes) -> bytes:
        self.send(data)
        return self.receive()


@pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed (apt-get install gdb)")
def test_gdb_breaks_steps_reads_and_writes_a_guest():
    guest = Pykvm("gdbtest", "--gdb-wait")
    commands = [
        f"target remote 127.0.0.1:{guest.port}",
        "p/x $pc",                                  # stopped before the first instruction
        "break bump",
        "continue",                                 # software breakpoint (int3)
        "p/x $pc", "p/x $rbx", "x/wx &counter",
        "stepi",                                    # incl counter(%rip)
        "p/x $pc", "x/wx &counter",
        "set {int}&counter = 40",
        "delete",
        "hbreak bump",
        "continue",                                 # hardware breakpoint (DR0)
        "p/x $rbx", "x/wx &counter", "info threads",
        "delete",
        "continue",                                 # to the debug-exit: counter 42 -> status 85
    ]
    args = ["gdb", "-nx", "-batch", str(GDBTEST_ELF)]
    for c in commands:
        args += ["-ex", c]
    gdb = subprocess.run(args, capture_output=True, text=True, timeout=60)
    status, out, err = guest.finish()
    text = gdb.stdout
    values = re.findall(r"^\$\d+ = (0x[0-9a-f]+)$", text, re.M)
    memory = re.findall(r"<counter>:\s+(0x[0-9a-f]+)", text)
    assert values == ["0x8000", "0x8025", "0x0", "0x802b", "0x1"], text + gdb.stderr
    assert memory == ["0x00000000", "0x00000001", "0x00000028"], text
    assert "Breakpoint 1, 0x0000000000008025 in bump ()" in text
    assert "Hardware assisted breakpoint 2 at 0x8025" in text
    assert "Thread 1 (vCPU 0, 64-bit long mode)" in text
    assert "exited with code 0125" in text               # gdb got W55: pykvm's status, 85
    assert status == (42 << 1) | 1, err
    assert out == "gdbtest: counting\n"


def test_ctrl_c_stops_a_running_guest_and_kill_ends_the_run():
    guest = Pykvm("spin")                                 # no --gdb-wait: it is already running
    c = Client(guest.port)
    assert c.ask(b"?") == b"T05thread:1;"                 # attaching stopped it
    c.send(b"vCont;c")
    c.sock.sendall(b"\x03")
    assert c.receive() == b"T02thread:1;"
    rip = int.from_bytes(bytes.fromhex(c.ask(b"p10").decode()), "little")
    assert 0x8000 <= rip < 0x9000                         # somewhere in the spin loop
    assert c.ask(b"vKill;1") == b"OK"
    status, out, err = guest.finish()
    assert status == 130 and "killed from gdb" in err


def test_dropped_connection_removes_breakpoints_and_resumes():
    guest = Pykvm("gdbtest", "--gdb-wait")
    c = Client(guest.port)
    assert c.ask(b"Z0,8025,1") == b"OK" and c.ask(b"Z1,8019,1") == b"OK"
    c.sock.close()                                         # gone without D: like a crashed gdb
    status, out, err = guest.finish()
    assert status == 7 and out == "gdbtest: counting\n", err   # ran to the end, no breakpoint left


def test_malformed_input_gets_errors_and_the_session_goes_on():
    guest = Pykvm("hello-prot32", "--gdb-wait")
    c = Client(guest.port)
    c.sock.sendall(b"$g#00")                               # bad checksum
    assert c.sock.recv(1) == b"-"
    for bad in (b"mzz,4", b"Z0,8000", b"P1=zz", b"Hx1", b"vCont;q", b"G1234", b"qXfer:features:read:target.xml"):
        assert c.ask(bad) == b"E01", bad
    assert c.ask(b"m0fffffff0,4") == b"E14"                # beyond guest RAM
    assert c.ask(b"totally unknown") == b""
    # a 32-bit guest gets the i386 description, with its 32-bit registers
    xml = c.ask(b"qXfer:features:read:target.xml:0,3fff")
    assert b"<architecture>i386</architecture>" in xml and b'name="eip"' in xml
    assert int.from_bytes(bytes.fromhex(c.ask(b"p8").decode()), "little") == 0x8000    # eip
    assert c.ask(b"D") == b"OK"
    status, out, err = guest.finish()
    assert status == 0 and out.startswith("Hello from 32-bit protected mode!")


def test_the_guests_own_int3_still_reaches_its_handler():
    """With a gdb breakpoint set (software breakpoints enabled), an int3 that is not gdb's is
    the guest's: on kvm_pvm it comes back as an emulation failure, on hardware KVM as a debug
    exit; either way pykvm must hand #BP to the guest's IDT."""
    guest = Pykvm("int3", "--gdb-wait")
    c = Client(guest.port)
    assert c.ask(b"Z0,fff0,1") == b"OK"                    # a breakpoint that is never reached
    c.send(b"c")
    assert c.receive() == b"W00"                           # ran to its end: halted, status 0
    status, out, err = guest.finish()
    assert status == 0 and "#BP handler" in out and "int3: after" in out, out + err
