"""The gdb remote protocol without a VM: packet framing (pykvm.debug.rsp), the target
descriptions and register encodings (pykvm.debug.gdbarch), and the stub's packet handling
(pykvm.debug.gdbstub.Session) against a fake target. Hypothesis feeds both random input."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.debug import gdbarch, rsp
from pykvm.debug.control import HW_EXEC, HW_WRITE, SIGINT, DebugError, StopEvent
from pykvm.debug.gdbstub import Session
from pykvm.debug.vmem import Unmapped
from pykvm.kvm.abi import ffi


# --- framing ---------------------------------------------------------------------------------
def test_frame_has_the_modulo_256_checksum():
    assert rsp.frame(b"OK") == b"$OK#9a"
    assert rsp.frame(b"") == b"$#00"


def test_reader_yields_packets_acks_and_interrupts():
    reader = rsp.PacketReader()
    events = reader.feed(b"+$qSupported#37-\x03$g#67")
    assert events == [rsp.ACK, rsp.Packet(b"qSupported"), rsp.NACK, rsp.INTERRUPT, rsp.Packet(b"g")]


def test_reader_reports_a_bad_checksum_and_recovers():
    reader = rsp.PacketReader()
    events = reader.feed(b"$g#00$g#67$m0,1#zz")
    assert isinstance(events[0], rsp.BadPacket) and "does not match" in events[0].why
    assert events[1] == rsp.Packet(b"g")
    assert isinstance(events[2], rsp.BadPacket) and "not two hex digits" in events[2].why


def test_reader_skips_noise_and_restarts_on_dollar():
    reader = rsp.PacketReader()
    assert reader.feed(b"garbage$abandoned$?#3f") == [rsp.Packet(b"?")]


def test_reader_refuses_an_oversized_packet():
    reader = rsp.PacketReader(max_packet=8)
    [event] = reader.feed(rsp.frame(b"x" * 9))
    assert isinstance(event, rsp.BadPacket) and "longer than 8" in event.why
    assert reader.feed(rsp.frame(b"ok")) == [rsp.Packet(b"ok")]


packet_data = st.binary(max_size=64).map(lambda b: b.replace(b"$", b"").replace(b"#", b""))


@settings(max_examples=200)
@given(packets=st.lists(packet_data, max_size=8), cuts=st.lists(st.integers(0, 600), max_size=10))
def test_any_slicing_of_the_stream_gives_the_same_packets(packets, cuts):
    stream = b"".join(rsp.frame(p) for p in packets)
    reader = rsp.PacketReader()
    events, last = [], 0
    for cut in sorted(c for c in cuts if c <= len(stream)) + [len(stream)]:
        events += reader.feed(stream[last:cut])
        last = cut
    assert events == [rsp.Packet(p) for p in packets]


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_random_bytes_never_break_the_reader(data):
    reader = rsp.PacketReader(max_packet=64)
    for event in reader.feed(data):
        assert isinstance(event, (rsp.Packet, rsp.BadPacket)) or event in (rsp.ACK, rsp.NACK, rsp.INTERRUPT)
    assert reader.feed(rsp.frame(b"g")) == [rsp.Packet(b"g")]      # and the next packet always gets through


@given(st.binary(max_size=200))
def test_binary_escaping_round_trips(data):
    escaped = rsp.escape_binary(data)
    assert not any(b in b"#$*" for b in escaped)
    assert rsp.unescape_binary(escaped) == data


# --- target descriptions and registers -------------------------------------------------------
@pytest.mark.parametrize("arch,pc,nregs", [(gdbarch.AMD64, "rip", 16 + 2 + 6 + 16 + 16 + 1 + 2 + 6),
                                           (gdbarch.I386, "eip", 8 + 2 + 6 + 16 + 8 + 1 + 6),
                                           (gdbarch.I8086, "eip", 8 + 2 + 6 + 16 + 8 + 1 + 6)])
def test_target_description_is_valid_xml_matching_the_g_layout(arch, pc, nregs):
    root = ET.fromstring(gdbarch.target_xml(arch))
    assert root.find("architecture").text == arch.name
    regs = root.findall("./feature/reg")
    assert len(regs) == nregs == len(arch.regs)
    assert [int(r.get("regnum")) for r in regs] == list(range(nregs))
    assert sum(int(r.get("bitsize")) for r in regs) // 8 == arch.g_size()
    assert regs[arch.pc].get("name") == pc
    features = {f.get("name") for f in root.findall("feature")}
    assert {"org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.pykvm.x86.sys"} <= features


def make_state(long_mode=True):
    regs, sregs, fpu = ffi.new("struct kvm_regs *"), ffi.new("struct kvm_sregs *"), ffi.new("struct kvm_fpu *")
    for i, name in enumerate(("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
                              "r12", "r13", "r14", "r15")):
        setattr(regs, name, 0x1111_1111_1111_1111 * (i + 1) & 0xFFFF_FFFF_FFFF_FFFF)
    regs.rip, regs.rflags = 0x8000, 0x246
    sregs.cs.selector, sregs.ds.selector, sregs.cs.l = 0x10, 0x18, int(long_mode)
    sregs.cr0, sregs.cr3, sregs.cr4 = 0x8000_0011, 0x70000, 0x20
    sregs.efer = 0x500 if long_mode else 0
    fpu.fcw, fpu.fsw, fpu.ftwx, fpu.mxcsr = 0x37F, 0, 0, 0x1F80
    return gdbarch.VcpuState(regs, sregs, fpu)


def test_register_values_and_order_amd64():
    state = make_state()
    arch = gdbarch.AMD64
    raw = gdbarch.read_all(arch, state)
    assert len(raw) == arch.g_size()
    assert raw[:8] == state.regs.rax.to_bytes(8, "little")
    assert gdbarch.read_register(arch, state, arch.number("rsp")) == state.regs.rsp.to_bytes(8, "little")
    assert gdbarch.read_register(arch, state, arch.number("cs")) == (0x10).to_bytes(4, "little")
    assert gdbarch.read_register(arch, state, arch.number("cr3")) == (0x70000).to_bytes(8, "little")
    assert gdbarch.read_register(arch, state, arch.number("ftag")) == (0xFFFF).to_bytes(4, "little")   # all empty


def test_i386_order_is_eax_ecx_edx_ebx():
    state = make_state(long_mode=False)
    arch = gdbarch.I386
    assert [r.name for r in arch.regs[:9]] == ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi", "eip"]
    assert gdbarch.read_register(arch, state, 1) == (state.regs.rcx & 0xFFFF_FFFF).to_bytes(4, "little")


def test_writing_registers_marks_what_to_store_and_refuses_selectors():
    state = make_state()
    arch = gdbarch.AMD64
    gdbarch.write_register(arch, state, arch.pc, (0x9000).to_bytes(8, "little"))
    gdbarch.write_register(arch, state, arch.number("xmm3"), bytes(range(16)))
    gdbarch.write_register(arch, state, arch.number("st0"), bytes(range(10)))
    assert state.regs.rip == 0x9000 and bytes(state.fpu.xmm[3][0:16]) == bytes(range(16))
    assert bytes(state.fpu.fpr[0][0:10]) == bytes(range(10))
    assert state.dirty == {"regs", "fpu"}
    with pytest.raises(gdbarch.RegisterError, match="segment selectors"):
        gdbarch.write_register(arch, state, arch.number("ds"), (0x20).to_bytes(4, "little"))
    # G with everything as read back is accepted as is (selectors unchanged)
    raw = gdbarch.read_all(arch, state)
    gdbarch.write_all(arch, state, raw)
    assert gdbarch.read_all(arch, state) == raw


def test_x87_tag_word_round_trip():
    fpu = ffi.new("struct kvm_fpu *")
    fpu.fsw = 6 << 11                          # TOP = 6: ST(0) is physical register 6
    fpu.ftwx = 0b0100_0000                     # physical 6 in use
    fpu.fpr[0][0:10] = list((1 << 63).to_bytes(8, "little") + (0x3FFF).to_bytes(2, "little"))   # 1.0
    tag = gdbarch.full_tag_word(fpu)
    assert (tag >> 12) & 3 == 0 and tag | (3 << 12) == 0xFFFF
    assert gdbarch.abridged_tag_word(tag) == 0b0100_0000


# --- the session ----------------------------------------------------------------------------
class FakeTarget:
    """Two vCPUs, memory as a dict of mapped pages."""

    watchpoints = True

    def __init__(self):
        self.states = {1: make_state(), 2: make_state()}
        self.mem = bytearray(range(256)) * 16            # 4 KiB mapped at 0x8000
        self.resumed = []
        self.breakpoints = set()
        self.ev = StopEvent(0)
        self.detached = self.killed = False
        self.interrupted = []

    def threads(self):
        return [1, 2]

    def arch(self, tid):
        return gdbarch.AMD64

    def describe(self, tid):
        return f"vCPU {tid - 1}"

    def state(self, tid):
        return self.states[tid]

    def store(self, tid, state):
        state.dirty.clear()

    def read_memory(self, tid, addr, n):
        if not 0x8000 <= addr < 0x9000:
            return b""
        return bytes(self.mem[addr - 0x8000:addr - 0x8000 + n])

    def write_memory(self, tid, addr, data):
        if not (0x8000 <= addr and addr + len(data) <= 0x9000):
            raise Unmapped(f"{addr:#x}")
        self.mem[addr - 0x8000:addr - 0x8000 + len(data)] = data

    def insert_breakpoint(self, tid, ztype, addr, kind):
        if ztype == 1 and len([b for b in self.breakpoints if b[0] == 1]) >= 4:
            raise DebugError("all four debug registers are in use")
        self.breakpoints.add((ztype, addr, kind))

    def remove_breakpoint(self, ztype, addr, kind):
        self.breakpoints.discard((ztype, addr, kind))

    def event(self):
        return self.ev

    def resume(self, actions):
        self.resumed.append(actions)

    def interrupt(self, signal=SIGINT):
        self.interrupted.append(signal)

    def detach(self):
        self.detached = True

    def kill(self):
        self.killed = True


@pytest.fixture()
def session():
    return Session(FakeTarget())


def test_connection_sequence(session):
    assert b"qXfer:features:read+" in session.handle(b"qSupported:multiprocess+;swbreak+;xmlRegisters=i386")
    assert session.handle(b"vMustReplyEmpty") == b""
    assert session.handle(b"QStartNoAckMode") == b"OK" and session.no_ack
    assert session.handle(b"?") == b"T05thread:1;"
    assert session.handle(b"qfThreadInfo") == b"m1,2" and session.handle(b"qsThreadInfo") == b"l"
    assert session.handle(b"qAttached") == b"1"
    assert session.handle(b"qC") == b"QC1"
    assert session.handle(b"Hc-1") == b"OK" and session.handle(b"Hg2") == b"OK" and session.handle(b"Hg9") == b"E01"
    assert session.handle(b"T2") == b"OK" and session.handle(b"T3") == b"E01"
    assert bytes.fromhex(session.handle(b"qThreadExtraInfo,2").decode()) == b"vCPU 1"


def test_target_xml_in_chunks(session):
    xml, offset = b"", 0
    while True:
        reply = session.handle(b"qXfer:features:read:target.xml:%x,100" % offset)
        xml += rsp.unescape_binary(reply[1:])
        offset += 0x100
        if reply[:1] == b"l":
            break
        assert reply[:1] == b"m"
    assert xml.decode() == gdbarch.target_xml(gdbarch.AMD64)
    assert session.handle(b"qXfer:features:read:other.xml:0,100") == b"E00"


def test_registers(session):
    g = session.handle(b"g")
    assert len(g) == 2 * gdbarch.AMD64.g_size()
    rip = gdbarch.AMD64.pc
    assert session.handle(b"p%x" % rip) == (0x8000).to_bytes(8, "little").hex().encode()
    assert session.handle(b"P%x=%s" % (rip, (0x8010).to_bytes(8, "little").hex().encode())) == b"OK"
    assert session.target.states[1].regs.rip == 0x8010
    assert session.handle(b"G" + g) == b"OK" and session.target.states[1].regs.rip == 0x8000
    assert session.handle(b"p999") == b"E01"
    assert session.handle(b"P10=00") == b"E01"            # wrong width
    assert session.handle(b"G00") == b"E01"


def test_memory(session):
    assert session.handle(b"m8000,4") == b"00010203"
    assert session.handle(b"m8ffe,4") == b"feff"               # short read at the end of the mapping
    assert session.handle(b"m100,4") == b"E14"
    assert session.handle(b"M8000,2:abcd") == b"OK" and session.handle(b"m8000,2") == b"abcd"
    assert session.handle(b"X8002,2:" + rsp.escape_binary(b"#}")) == b"OK"
    assert session.handle(b"m8002,2") == b"237d"
    assert session.handle(b"X8000,0:") == b"OK"                # gdb's probe for X support
    assert session.handle(b"M100,1:00") == b"E14"
    assert session.handle(b"M8000,2:ab") == b"E01"              # length mismatch


def test_breakpoints(session):
    assert session.handle(b"Z0,8010,1") == b"OK" and (0, 0x8010, 1) in session.target.breakpoints
    assert session.handle(b"z0,8010,1") == b"OK" and not session.target.breakpoints
    for i in range(4):
        assert session.handle(b"Z1,%x,1" % (0x8000 + i)) == b"OK"
    assert session.handle(b"Z1,9000,1") == b"E01"             # out of debug registers
    assert session.handle(b"Z3,8000,4") == b""                # no read watchpoints on x86
    assert session.handle(b"Z0,8010") == b"E01"
    session.target.watchpoints = False                        # a backend without data breakpoints
    assert session.handle(b"Z2,8060,4") == b"" and session.handle(b"Z4,8060,4") == b""


def test_resuming_and_stop_replies(session):
    t = session.target
    assert session.handle(b"vCont?") == b"vCont;c;C;s;S"
    assert session.handle(b"vCont;s:2;c") is None and t.resumed[-1] == {2: "s", 1: "c"}
    assert session.running and session.handle(b"g") == b"E01"   # no register access while running
    assert session.handle(b"vCont;c") == b"E01"                 # already running
    t.ev = StopEvent(1, 5, "swbreak", 0x8010)
    session.stopped()
    assert session.stop_reply() == b"T05thread:2;swbreak:;" and session.g_thread == 2
    assert session.handle(b"vCont;s:p1.2") is None and t.resumed[-1] == {2: "s"}
    session.stopped()
    t.ev = StopEvent(0, 5, "watch", 0x8060)
    assert session.stop_reply() == b"T05thread:1;watch:8060;"
    assert session.handle(b"c") is None and t.resumed[-1] == {1: "c", 2: "c"}
    session.stopped()
    assert session.handle(b"s8004") is None and t.resumed[-1] == {1: "s"} and t.states[1].regs.rip == 0x8004
    session.stopped()
    assert session.handle(b"C05;8008") is None and t.states[1].regs.rip == 0x8008
    session.stopped()
    assert session.handle(b"vCont;x") == b"E01" and session.handle(b"vCont;s:9") == b"E01"


def test_detach_and_kill(session):
    assert session.handle(b"D") == b"OK" and session.detached and session.target.detached
    other = Session(FakeTarget())
    assert other.handle(b"k") is None and other.killed and other.target.killed
    third = Session(FakeTarget())
    assert third.handle(b"vKill;1") == b"OK" and third.killed


VALID = [b"?", b"g", b"m8000,10", b"M8000,1:00", b"Z0,8000,1", b"z1,8000,1", b"p10", b"P10=0080000000000000",
         b"Hg1", b"vCont;s:1", b"qXfer:features:read:target.xml:0,40", b"qThreadExtraInfo,1", b"X8000,1:a",
         b"G", b"c", b"s", b"T1", b"qSupported"]


@settings(max_examples=400)
@given(st.one_of(st.binary(max_size=40),
                 st.tuples(st.sampled_from(VALID), st.binary(max_size=12)).map(lambda t: t[0] + t[1]),
                 st.tuples(st.sampled_from(VALID), st.integers(0, 20)).map(lambda t: t[0][:t[1]])))
def test_random_packets_get_a_reply_never_an_exception(packet):
    session = Session(FakeTarget())
    reply = session.handle(packet)
    assert reply is None or isinstance(reply, bytes)
    # and the session still works afterwards
    session.running = False
    assert session.handle(b"qC").startswith(b"QC")


def test_insert_hw_validates_watchpoints():
    from pykvm.debug.control import DebugControl

    class FakeMachine:
        memory = None
        vcpus = [type("V", (), {"id": 0})()]

    control = DebugControl(FakeMachine())
    control.insert_hw(0x8000, HW_EXEC)
    control.insert_hw(0x8000, HW_EXEC)                         # the same one again takes no slot
    control.insert_hw(0x9000, HW_WRITE, 4)
    with pytest.raises(DebugError, match="aligned"):
        control.insert_hw(0x9001, HW_WRITE, 4)
    with pytest.raises(DebugError, match="1, 2, 4 or 8"):
        control.insert_hw(0x9000, HW_WRITE, 3)
    control.insert_hw(0xA000, HW_EXEC)
    control.insert_hw(0xB000, HW_EXEC)
    with pytest.raises(DebugError, match="in use"):
        control.insert_hw(0xC000, HW_EXEC)
    control.remove_hw(0x9000, HW_WRITE, 4)
    control.insert_hw(0xC000, HW_EXEC)
    assert [bp.addr for bp in control.hw] == [0x8000, 0xC000, 0xA000, 0xB000]
