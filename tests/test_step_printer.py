"""pykvm/debug/step.py without KVM: a fake vCPU in real mode over real guest RAM, stepped by hand."""

from __future__ import annotations

from types import SimpleNamespace

from pykvm.debug.step import GPRS, StepPrinter, instruction_at
from pykvm.memory import GuestMemory


class FakeVcpu:
    """A vCPU whose registers the test sets (KVM_GET_REGS/KVM_GET_SREGS shapes, real mode)."""

    def __init__(self, rip: int) -> None:
        self.id = 0
        self.regs = SimpleNamespace(**{name: 0 for name in GPRS}, rip=rip)
        seg = SimpleNamespace(base=0, selector=0, l=0, db=0)
        self.sregs = SimpleNamespace(cs=seg, cr0=0, cr3=0, cr4=0, efer=0)

    def get_regs(self):
        return SimpleNamespace(**vars(self.regs))

    def get_sregs(self):
        return self.sregs


def test_step_lines_name_the_instruction_and_what_it_changed():
    with GuestMemory(1 << 20) as memory:
        # 0x7c00: mov ax, 0x1234 (b8 34 12); jmp 0x7c00 (eb fb)
        memory.write(0x7C00, bytes([0xB8, 0x34, 0x12, 0xEB, 0xFB]))
        vcpu, lines = FakeVcpu(0x7C00), []
        printer = StepPrinter(memory, lines.append)
        printer.begin(vcpu, 2)
        assert lines[0].startswith("single-stepping vCPU 0 for 2 instructions") and "real mode" in lines[0]
        vcpu.regs.rax, vcpu.regs.rip = 0x1234, 0x7C03          # what the CPU did
        printer.step(vcpu)
        vcpu.regs.rip = 0x7C00
        printer.step(vcpu)
        printer.done(vcpu)
    assert lines[2].split() == ["step", "1", "0x7c00:", "b8", "34", "12", "mov", "ax,", "0x1234", "rax=0x1234"]
    assert lines[3].split()[:6] == ["step", "2", "0x7c03:", "eb", "fb", "jmp"] and lines[3].endswith("rip=0x7c00")
    assert lines[4] == "stepped 2 instructions; vCPU 0 continues normally"


def test_instruction_at_uses_cs_base_and_wraps_to_the_code_size():
    with GuestMemory(1 << 20) as memory:
        memory.write(0x10010, bytes([0x90]))                    # nop at CS.base 0x10000 + IP 0x10
        vcpu = FakeVcpu(0x10)
        vcpu.sregs.cs.base = 0x10000
        linear, insn = instruction_at(memory, vcpu.get_regs(), vcpu.get_sregs())
    assert linear == 0x10010 and insn.mnemonic == "nop"
