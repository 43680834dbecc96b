"""A gdb remote stub: debug a running guest with gdb over TCP (``pykvm run ... --gdb :1234``).

Three layers, each testable alone:

* :mod:`pykvm.debug.rsp` frames packets (sans-I/O);
* :class:`Session` answers one packet at a time against a *target* (sans-I/O too: the tests
  give it a fake target, :class:`MachineTarget` is the real one over a :class:`DebugControl`);
* :class:`GdbServer` owns the socket: a thread that accepts one gdb at a time, acks, forwards
  packets to the Session, and while the guest runs waits for either a stop (the debug control
  wakes it through a pipe) or gdb's Ctrl-C (byte 0x03).

Threads are vCPUs (gdb thread id = vCPU id + 1), in all-stop mode. Addresses in ``m``/``M``/
``X``/``Z`` are guest-virtual, translated through the page tables of the current thread
(``Hg``). Software breakpoints (``Z0``) are kept per guest-physical byte
(:mod:`pykvm.debug.breakpoints`): two addresses that map one byte share its patch, an ``int3`` reached
through an address gdb did not name is stepped over, and a breakpoint whose page the guest remaps
moves with it when the guest is resumed. When gdb connects, the guest is stopped; on detach (or a
dropped connection) every breakpoint is removed and the guest resumes, and another gdb may connect. When the run ends
while gdb waits for a stop, gdb gets ``W<status>``: pykvm's exit status. A packet the stub
cannot parse gets ``E01``, an unmapped address ``E14``: nothing gdb sends can crash the VMM.

The supported packets: ``?`` ``qSupported`` ``QStartNoAckMode`` ``qXfer:features:read``
``qAttached`` ``qC`` ``qfThreadInfo``/``qsThreadInfo`` ``qThreadExtraInfo`` ``qSymbol`` ``H`` ``T``
``g`` ``G`` ``p`` ``P`` ``m`` ``M`` ``X`` ``Z0``-``Z4``/``z0``-``z4`` (``Z3``, read watchpoints, do not exist on
x86; ``Z2``/``Z4`` are refused on kvm_pvm, which never reports data breakpoints) ``c`` ``C`` ``s``
``S`` ``vCont?`` ``vCont`` ``D`` ``k`` ``vKill``; anything else gets the empty reply that means
"not supported".
"""

from __future__ import annotations

import os
import select
import socket
import sys
import threading
import traceback

from ..errors import UsageError
from ..memory import GuestMemoryError
from ..x86.modes import mode_of
from ..x86.paging import PageFault
from . import gdbarch, rsp
from .control import HW_ACCESS, HW_EXEC, HW_WRITE, SIGINT, SIGTRAP, DebugError, StopEvent
from .vmem import Unmapped

E_INVALID = b"E01"      # malformed or impossible request
E_FAULT = b"E14"        # EFAULT: the address is not mapped / not RAM
_Z_KINDS = {1: HW_EXEC, 2: HW_WRITE, 4: HW_ACCESS}


class _Bad(ValueError):
    """A packet that does not parse."""


def _hex(text: bytes) -> int:
    try:
        value = int(text, 16)
    except ValueError:
        raise _Bad(f"not hex: {text!r}") from None
    if value < 0:
        raise _Bad(f"negative: {text!r}")
    return value


def _thread_id(text: bytes) -> int:
    """A thread-id: hex, -1 (all), 0 (any), or p<pid>.<tid> (multiprocess syntax)."""
    if text.startswith(b"p"):
        text = text.partition(b".")[2] or b"-1"
    if text == b"-1":
        return -1
    return _hex(text)


# --- the target a Session debugs -------------------------------------------------------------
class MachineTarget:
    """The Session's view of a Machine, through its DebugControl. Thread ids are vCPU id + 1."""

    def __init__(self, control) -> None:
        self.control = control
        self._vcpus = {v.id + 1: v for v in control.vcpus}

    def threads(self) -> list[int]:
        """gdb thread ids (vCPU index + 1), sorted."""
        return sorted(self._vcpus)

    def vcpu(self, tid: int):
        """The vCPU behind gdb thread ``tid`` (KeyError if none)."""
        return self._vcpus[tid]

    def arch(self, tid: int) -> gdbarch.Arch:
        """The register layout gdb gets for thread ``tid`` in its current mode."""
        return gdbarch.arch_for(self.vcpu(tid).get_sregs())

    def describe(self, tid: int) -> str:
        """``vCPU N, <mode>``: thread ``tid`` for gdb's ``info threads``."""
        s = self.vcpu(tid).get_sregs()
        return f"vCPU {tid - 1}, {mode_of(s.cr0, s.cr4, s.efer, s.cs.l)}"

    def state(self, tid: int) -> gdbarch.VcpuState:
        """Thread ``tid``'s registers, system registers and FPU state, read now."""
        vcpu = self.vcpu(tid)
        return gdbarch.VcpuState(vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu())

    def store(self, tid: int, state: gdbarch.VcpuState) -> None:
        """Write back the parts of ``state`` gdb changed (its ``dirty`` set) to thread ``tid``."""
        vcpu = self.vcpu(tid)
        if "sregs" in state.dirty:
            vcpu.set_sregs(state.sregs)
        if "regs" in state.dirty:
            vcpu.set_regs(state.regs)
        if "fpu" in state.dirty:
            vcpu.set_fpu(state.fpu)
        state.dirty.clear()

    def read_memory(self, tid: int, addr: int, n: int) -> bytes:
        """Up to ``n`` bytes at guest-virtual ``addr`` as thread ``tid`` sees it, without our int3s."""
        return self.control.read_memory(self.vcpu(tid), addr, n)

    def write_memory(self, tid: int, addr: int, data: bytes) -> None:
        """Write ``data`` at guest-virtual ``addr`` as thread ``tid`` sees it; DebugError if unmapped."""
        self.control.write_memory(self.vcpu(tid), addr, data)

    @property
    def watchpoints(self) -> bool:
        """Whether KVM here reports data breakpoints (Z2, Z4)."""
        return self.control.data_breakpoints

    def insert_breakpoint(self, tid: int, ztype: int, addr: int, kind: int) -> None:
        """gdb's ``Z``: type 0 software, 1 hardware, 2-4 watchpoints of ``kind`` bytes."""
        if ztype == 0:
            self.control.insert_sw(self.vcpu(tid), addr)
        else:
            self.control.insert_hw(addr, _Z_KINDS[ztype], kind)

    def remove_breakpoint(self, ztype: int, addr: int, kind: int) -> None:
        """gdb's ``z``: remove what :meth:`insert_breakpoint` planted."""
        if ztype == 0:
            self.control.remove_sw(addr)
        else:
            self.control.remove_hw(addr, _Z_KINDS[ztype], kind)

    def event(self) -> StopEvent | None:
        """Why the vCPUs last stopped, or None while they run."""
        return self.control.event

    def resume(self, actions: dict[int, str]) -> None:
        """gdb's ``vCont``: per thread id ``c`` (continue) or ``s`` (step)."""
        self.control.resume({tid - 1: action for tid, action in actions.items()})

    def interrupt(self, signal: int = SIGINT) -> None:
        """Stop every vCPU (gdb's Ctrl-C), reported with ``signal``."""
        self.control.interrupt(signal=signal)

    def detach(self) -> None:
        """gdb's ``D``: drop breakpoints and let every vCPU run on."""
        self.control.detach()

    def kill(self) -> None:
        """gdb's ``k``: end the run."""
        self.control.kill()


# --- one gdb connection's packets ------------------------------------------------------------
class Session:
    """Answers packets. ``handle`` returns the reply (None: no reply at all) and sets flags the
    server acts on: ``resumed`` (wait for a stop), ``no_ack`` (leave ack mode after this reply),
    ``detached`` / ``killed`` (end the connection)."""

    def __init__(self, target) -> None:
        self.target = target
        self.arch: gdbarch.Arch | None = None
        self.g_thread = target.threads()[0]    # Hg: registers and memory
        self.c_thread = -1                     # Hc: legacy s/c
        self.running = False
        self.resumed = False
        self.no_ack = False
        self.detached = False
        self.killed = False
        self._thread_list_sent = False

    # -- entry point --
    def handle(self, packet: bytes) -> bytes | None:
        """The reply to one packet's payload (None: no reply yet); errors become ``E`` replies."""
        try:
            return self._dispatch(packet)
        except (Unmapped, PageFault, GuestMemoryError):
            return E_FAULT
        except (_Bad, gdbarch.RegisterError, DebugError, KeyError, IndexError, ValueError):
            return E_INVALID
        except Exception:    # a bug of ours: say so on stderr, keep the VMM and the session alive
            print("pykvm: gdb stub: internal error handling "
                  f"{packet[:40]!r}:\n{traceback.format_exc()}", file=sys.stderr)
            return E_INVALID

    def stop_reply(self) -> bytes:
        """The T packet for the current stop event; also makes its thread the current one."""
        event = self.target.event() or StopEvent(self.g_thread - 1, SIGTRAP)
        tid = event.vcpu + 1
        self.g_thread = tid
        extra = {"swbreak": "swbreak:;", "hwbreak": "hwbreak:;", "watch": f"watch:{event.addr:x};",
                 "awatch": f"awatch:{event.addr:x};"}.get(event.kind, "")
        return f"T{event.signal:02x}thread:{tid:x};{extra}".encode()

    def stopped(self) -> None:
        """The server saw the target stop (after a resume)."""
        self.running = False

    # -- dispatch --
    def _dispatch(self, p: bytes) -> bytes | None:
        if not p:
            return b""
        head = p[:1]
        if head == b"?":
            return self.stop_reply()
        if head == b"q" or head == b"Q":
            return self._query(p)
        if head == b"v":
            return self._v(p)
        if head == b"H":
            return self._set_thread(p)
        if head == b"T":
            return b"OK" if _thread_id(p[1:]) in self.target.threads() else E_INVALID
        if head == b"D":
            self.target.detach()
            self.detached = True
            return b"OK"
        if head == b"k":
            self.target.kill()
            self.killed = True
            return None
        if head in (b"c", b"C", b"s", b"S"):
            return self._legacy_resume(p)
        # everything below reads or changes the stopped guest
        if self.running:
            return E_INVALID
        if head == b"g":
            return gdbarch.read_all(self._arch(), self.target.state(self.g_thread)).hex().encode()
        if head == b"G":
            state = self.target.state(self.g_thread)
            gdbarch.write_all(self._arch(), state, _unhex(p[1:]))
            self.target.store(self.g_thread, state)
            return b"OK"
        if head == b"p":
            return gdbarch.read_register(self._arch(), self.target.state(self.g_thread), _hex(p[1:])).hex().encode()
        if head == b"P":
            number, eq, value = p[1:].partition(b"=")
            if not eq:
                raise _Bad("P without =")
            state = self.target.state(self.g_thread)
            gdbarch.write_register(self._arch(), state, _hex(number), _unhex(value))
            self.target.store(self.g_thread, state)
            return b"OK"
        if head == b"m":
            addr, length = _addr_length(p[1:])
            if length > rsp.MAX_PACKET // 2:
                length = rsp.MAX_PACKET // 2
            data = self.target.read_memory(self.g_thread, addr, length)
            if not data and length:
                return E_FAULT
            return data.hex().encode()
        if head in (b"M", b"X"):
            spec, colon, payload = p[1:].partition(b":")
            if not colon:
                raise _Bad("M/X without ':'")
            addr, length = _addr_length(spec)
            data = _unhex(payload) if head == b"M" else rsp.unescape_binary(payload)
            if len(data) != length:
                raise _Bad("length does not match the data")
            if data:
                self.target.write_memory(self.g_thread, addr, data)
            return b"OK"
        if head in (b"Z", b"z"):
            return self._breakpoint(p)
        return b""

    def _arch(self) -> gdbarch.Arch:
        if self.arch is None:
            self.arch = self.target.arch(self.g_thread)
        return self.arch

    def _query(self, p: bytes) -> bytes:
        if p.startswith(b"qSupported"):
            return (f"PacketSize={rsp.MAX_PACKET:x};qXfer:features:read+;swbreak+;hwbreak+;"
                    "QStartNoAckMode+").encode()
        if p == b"QStartNoAckMode":
            self.no_ack = True
            return b"OK"
        if p.startswith(b"qXfer:features:read:"):
            annex, colon, span = p[len(b"qXfer:features:read:"):].partition(b":")
            if not colon:
                raise _Bad("qXfer without offset,length")
            if annex != b"target.xml":
                return b"E00"
            offset, length = _addr_length(span)
            xml = gdbarch.target_xml(self._arch()).encode()
            chunk = xml[offset:offset + length]
            return (b"l" if offset + length >= len(xml) else b"m") + rsp.escape_binary(chunk)
        if p == b"qAttached" or p.startswith(b"qAttached:"):
            return b"1"          # an existing "process": gdb detaches rather than kills on quit
        if p == b"qC":
            return f"QC{self.g_thread:x}".encode()
        if p == b"qfThreadInfo":
            return b"m" + ",".join(f"{t:x}" for t in self.target.threads()).encode()
        if p == b"qsThreadInfo":
            return b"l"
        if p.startswith(b"qThreadExtraInfo,"):
            tid = _thread_id(p[len(b"qThreadExtraInfo,"):])
            if tid not in self.target.threads():
                return E_INVALID
            text = self.target.describe(tid) if not self.running else f"vCPU {tid - 1} (running)"
            return text.encode().hex().encode()
        if p.startswith(b"qSymbol"):
            return b"OK"
        return b""

    def _v(self, p: bytes) -> bytes | None:
        if p == b"vCont?":
            return b"vCont;c;C;s;S"
        if p.startswith(b"vCont;"):
            return self._vcont(p[len(b"vCont;"):])
        if p.startswith(b"vKill"):
            self.target.kill()
            self.killed = True
            return b"OK"
        return b""

    def _set_thread(self, p: bytes) -> bytes:
        op, tid = p[1:2], _thread_id(p[2:])
        if tid not in (-1, 0) and tid not in self.target.threads():
            return E_INVALID
        if op == b"g":
            if tid > 0:
                self.g_thread = tid
        elif op == b"c":
            self.c_thread = tid
        else:
            return E_INVALID
        return b"OK"

    # -- running --
    def _legacy_resume(self, p: bytes) -> bytes | None:
        kind = p[:1].lower()
        arg = p[1:]
        if p[:1] in (b"C", b"S"):             # C sig[;addr]: signals are not deliverable; ignored
            _, _, arg = arg.partition(b";")
        if self.running:
            return E_INVALID
        tid = self.c_thread if self.c_thread > 0 else self.g_thread
        if arg:
            self._set_pc(tid, _hex(arg))
        if kind == b"s":
            return self._resume({tid: "s"})
        return self._resume({t: "c" for t in self.target.threads()})

    def _vcont(self, spec: bytes) -> bytes | None:
        if self.running:
            return E_INVALID
        actions: dict[int, str] = {}
        threads = self.target.threads()
        for item in spec.split(b";"):
            action, _, tid_text = item.partition(b":")
            if not action or action[:1] not in (b"c", b"C", b"s", b"S"):
                raise _Bad(f"vCont action {item!r}")
            if action[:1] in (b"C", b"S"):
                _hex(action[1:])                # the signal number, ignored
            what = action[:1].lower().decode()
            tid = _thread_id(tid_text) if tid_text else -1
            if tid not in (-1, 0) and tid not in threads:
                raise _Bad(f"no thread {tid}")
            for t in (threads if tid in (-1, 0) else [tid]):
                actions.setdefault(t, what)     # the leftmost action that names a thread wins
        if not actions:
            raise _Bad("empty vCont")
        return self._resume(actions)

    def _resume(self, actions: dict[int, str]) -> None:
        self.running = True
        self.resumed = True
        self.target.resume(actions)
        return None

    def _set_pc(self, tid: int, addr: int) -> None:
        arch = self._arch()
        state = self.target.state(tid)
        gdbarch.write_register(arch, state, arch.pc, addr.to_bytes(arch.bits // 8, "little"))
        self.target.store(tid, state)

    def _breakpoint(self, p: bytes) -> bytes:
        fields = p[1:].split(b";")[0].split(b",")
        if len(fields) != 3:
            raise _Bad("Z/z needs type,addr,kind")
        ztype, addr, kind = _hex(fields[0]), _hex(fields[1]), _hex(fields[2])
        if ztype not in (0, 1, 2, 4):
            return b""          # Z3 (read watchpoint) does not exist on x86
        if ztype in (2, 4) and not self.target.watchpoints:
            return b""          # not here: gdb falls back to software watchpoints (single-steps)
        if p[:1] == b"Z":
            self.target.insert_breakpoint(self.g_thread, ztype, addr, kind)
        else:
            self.target.remove_breakpoint(ztype, addr, kind)
        return b"OK"


def _addr_length(spec: bytes) -> tuple[int, int]:
    addr, comma, length = spec.partition(b",")
    if not comma:
        raise _Bad("expected addr,length")
    return _hex(addr), _hex(length)


def _unhex(text: bytes) -> bytes:
    try:
        return bytes.fromhex(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        raise _Bad("bad hex data") from None


# --- the socket ------------------------------------------------------------------------------
class GdbServer:
    """Listens on host:port and serves one gdb at a time, in a thread of its own."""

    def __init__(self, control, host: str = "127.0.0.1", port: int = 1234) -> None:
        self.control = control
        try:
            family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                                 flags=socket.AI_PASSIVE)[0]
            self._listener = socket.socket(family, kind, proto)
        except (OSError, IndexError) as e:
            raise UsageError(f"--gdb {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(1)
        except OSError as e:
            self._listener.close()
            raise UsageError(f"--gdb {host}:{port}: cannot listen there: {e.strerror}") from None
        self.host, self.port = self._listener.getsockname()[:2]
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closing = False
        self._thread = threading.Thread(target=self._serve, name="gdbstub", daemon=True)
        control.listener = self._wake

    def start(self) -> None:
        """Start accepting gdb connections on the server's thread."""
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the socket and connection; idempotent."""
        if self._wake_w < 0:
            return
        self._closing = True
        self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self.control.listener = None
        self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self._wake_r = self._wake_w = -1

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except (BlockingIOError, OSError):
            pass            # the pipe is full of wake-ups already, or closed

    def _drain(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except (BlockingIOError, OSError):
            pass

    def _over(self) -> bool:
        return self._closing or self.control.ended is not None

    def _serve(self) -> None:
        while not self._over():
            ready, _, _ = select.select([self._listener, self._wake_r], [], [])
            if self._wake_r in ready:
                self._drain()
                continue
            try:
                conn, _ = self._listener.accept()
            except OSError:
                continue
            with conn:
                try:
                    self._session(conn)
                except OSError:
                    pass        # the connection broke: treated like a disconnect below
                except Exception:
                    print(f"pykvm: gdb stub: internal error:\n{traceback.format_exc()}", file=sys.stderr)
                if self.control.ended is None and not self._closing:
                    self.control.detach()   # detached, disconnected or broken: the guest runs on

    def _session(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target = MachineTarget(self.control)
        self.control.interrupt(signal=SIGTRAP)      # gdb finds the guest stopped
        while not self.control.wait_stopped(timeout=0.2):
            if self._closing:
                return
        session = Session(target)
        reader = rsp.PacketReader()
        acking, last = True, b""

        def send(data: bytes) -> None:
            nonlocal last
            last = rsp.frame(data)
            conn.sendall(last)

        while True:
            if self.control.ended is not None:
                if session.running:     # gdb waits for a stop: tell it the "process" exited
                    send(b"W%02x" % (self.control.ended.status & 0xFF))
                return
            if self._closing:
                return
            ready, _, _ = select.select([conn, self._wake_r], [], [])
            if self._wake_r in ready:
                self._drain()
                if session.running and self.control.ended is None and self.control.stopped():
                    session.stopped()
                    send(session.stop_reply())
            if conn not in ready:
                continue
            data = conn.recv(65536)
            if not data:
                return                  # gdb went away
            for event in reader.feed(data):
                if event is rsp.NACK:
                    if acking and last:
                        conn.sendall(last)
                elif event is rsp.INTERRUPT:
                    if session.running:
                        self.control.interrupt(signal=SIGINT)
                elif isinstance(event, rsp.BadPacket):
                    if acking:
                        conn.sendall(b"-")
                elif isinstance(event, rsp.Packet):
                    if acking:
                        conn.sendall(b"+")
                    reply = session.handle(event.data)
                    if reply is not None:
                        send(reply)
                    if session.no_ack:
                        acking = False
                    if session.detached or session.killed:
                        return
