"""One vCPU's state through capture and restore, in process (needs /dev/kvm, no guest): what KVM only takes in a
certain order survives the trip. The LAPIC timer's TSC deadline (MSR 0x6e0) is ignored by KVM_SET_MSRS unless
LVTT is already in TSC-deadline mode, and KVM_SET_LAPIC zeroes it when it puts LVTT in that mode: restored
before the LAPIC it was lost, and a restored Linux (whose idle CPU waits for exactly that deadline) slept until
some other interrupt came."""

from __future__ import annotations

import struct

import pytest
from conftest import needs_kvm

from pykvm.kvm.abi import ffi

LVTT = 0x320
TSC_DEADLINE_MODE = 2 << 17
MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE = 0x10, 0x6E0


@needs_kvm
def test_a_pending_tsc_deadline_timer_survives_capture_and_restore():
    from pykvm.machine import Machine
    from pykvm.snapshot.machine_state import capture_vcpu, restore_vcpu, saveable_msrs
    with Machine(mem_size=16 << 20, irqchip=True) as source, Machine(mem_size=16 << 20, irqchip=True) as target:
        vcpu = source.vcpus[0]
        lapic = vcpu.get_lapic()
        raw = bytearray(ffi.buffer(lapic))
        struct.pack_into("<I", raw, LVTT, TSC_DEADLINE_MODE | 0xEC)     # Linux's local timer vector, unmasked
        ffi.buffer(lapic)[:] = bytes(raw)
        vcpu.set_lapic(lapic)
        deadline = vcpu.get_msrs([MSR_IA32_TSC])[MSR_IA32_TSC] + 10**12
        vcpu.set_msrs({MSR_IA32_TSC_DEADLINE: deadline})
        assert vcpu.get_msrs([MSR_IA32_TSC_DEADLINE])[MSR_IA32_TSC_DEADLINE] == deadline
        msrs = saveable_msrs(source.kvm, vcpu)
        assert MSR_IA32_TSC_DEADLINE in msrs
        state = capture_vcpu(source.kvm, vcpu, True, msrs)
        restored = target.vcpus[0]
        restore_vcpu(restored, state, True)
        assert restored.get_msrs([MSR_IA32_TSC_DEADLINE])[MSR_IA32_TSC_DEADLINE] == deadline
        got = bytes(ffi.buffer(restored.get_lapic()))
        assert struct.unpack_from("<I", got, LVTT)[0] & 0x7_00FF == TSC_DEADLINE_MODE | 0xEC


@needs_kvm
def test_register_state_kvm_refuses_is_a_bad_snapshot_not_a_crash():
    """The state file's blobs are untrusted input (its checksum is no signature): sregs with a reserved CR4 bit
    set, which KVM_SET_SREGS refuses, end in SnapshotError (status 2, HTTP 400), never KvmError (a crash)."""
    from pykvm.machine import Machine
    from pykvm.snapshot.format import SnapshotError
    from pykvm.snapshot.machine_state import capture_vcpu, restore_vcpu, saveable_msrs
    with Machine(mem_size=16 << 20) as source, Machine(mem_size=16 << 20) as target:
        vcpu = source.vcpus[0]
        state = capture_vcpu(source.kvm, vcpu, False, saveable_msrs(source.kvm, vcpu))
        sregs = ffi.new("struct kvm_sregs *")
        ffi.buffer(sregs)[:] = state["sregs"]
        sregs.cr4 |= 1 << 63                          # reserved (Intel SDM vol. 3A 2.5)
        state["sregs"] = bytes(ffi.buffer(sregs))
        with pytest.raises(SnapshotError, match="KVM refused the snapshot's state of vCPU 0"):
            restore_vcpu(target.vcpus[0], state, False)
        state["sregs"] = state["sregs"][:-1]          # and a blob of the wrong size never reaches KVM
        with pytest.raises(SnapshotError, match="bytes, not the"):
            restore_vcpu(target.vcpus[0], state, False)
