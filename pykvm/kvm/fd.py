"""The three kinds of KVM file descriptor as Python objects: ``Kvm`` (/dev/kvm), ``Vm``, ``Vcpu``.

Each method wraps exactly one ioctl and is named after it; the section names in the docstrings
refer to Documentation/virt/kvm/api.rst. A failed ioctl raises :class:`KvmError` naming the ioctl
and the errno. Every object is a context manager and closes its descriptor deterministically.
"""

from __future__ import annotations

import errno
import mmap
import os

from ..errors import KvmUnavailable, PykvmError
from .abi import ffi, libc
from .constants import Cap, Ioctl
from .exits import INTR_EXIT, decode

_ioctl = libc.ioctl
_NULL = ffi.NULL
_KVM_RUN = int(Ioctl.KVM_RUN)


class KvmError(PykvmError):
    """An ioctl failed. ``.ioctl`` is its name, ``.errno`` the error number."""

    exit_status = 4

    def __init__(self, request: Ioctl, err: int, what: str = "") -> None:
        self.ioctl = request.name
        self.errno = err
        detail = f" ({what})" if what else ""
        super().__init__(f"{request.name} failed{detail}: {errno.errorcode.get(err, err)} ({os.strerror(err)})")


def _call(fd: int, request: Ioctl, arg=_NULL, what: str = "") -> int:
    if isinstance(arg, int):
        arg = ffi.cast("void *", arg)
    rc = _ioctl(fd, request, arg)
    if rc < 0:
        raise KvmError(request, ffi.errno, what)
    return rc


class _Fd:
    """A file descriptor we own; closed once, by close() or the with-block."""

    fd: int

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Kvm(_Fd):
    """/dev/kvm: system-wide queries and VM creation (api.rst section 4, "system ioctl")."""

    def __init__(self, path: str | None = None) -> None:
        self.fd = -1
        path = path or os.environ.get("PYKVM_DEVICE", "/dev/kvm")   # override for tests
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: KVM is not available on this host. Load the module for your "
                "CPU (`modprobe kvm_intel` or `modprobe kvm_amd`), enable virtualization in the "
                "firmware, or run pykvm where nested virtualization is allowed."
            ) from None
        except PermissionError:
            raise KvmUnavailable(
                f"{path} exists but this user may not open it. Add yourself to its group "
                f"(usually `sudo usermod -aG kvm $USER`, then log in again) or run as root."
            ) from None
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        version = self.get_api_version()
        if version != 12:
            self.close()
            raise KvmUnavailable(f"{path} speaks KVM API version {version}; pykvm needs version 12")

    def get_api_version(self) -> int:
        """KVM_GET_API_VERSION: 12 on every kernel since 2.6.22."""
        return _call(self.fd, Ioctl.KVM_GET_API_VERSION)

    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION: 0 when the capability is absent, else a cap-specific value."""
        rc = _ioctl(self.fd, Ioctl.KVM_CHECK_EXTENSION, ffi.cast("void *", int(cap)))
        return max(rc, 0)

    def get_vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd (kvm_run plus extra pages)."""
        return _call(self.fd, Ioctl.KVM_GET_VCPU_MMAP_SIZE)

    def get_supported_cpuid(self, max_entries: int = 256) -> list[dict]:
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can present to a guest."""
        buf = ffi.new("struct kvm_cpuid2 *")  # header only; entries follow in a bigger buffer
        raw = ffi.new("char[]", ffi.sizeof(buf[0]) + max_entries * ffi.sizeof("struct kvm_cpuid_entry2"))
        cpuid = ffi.cast("struct kvm_cpuid2 *", raw)
        cpuid.nent = max_entries
        _call(self.fd, Ioctl.KVM_GET_SUPPORTED_CPUID, cpuid)
        keys = ("function", "index", "flags", "eax", "ebx", "ecx", "edx")
        return [{k: getattr(cpuid.entries[i], k) for k in keys} for i in range(cpuid.nent)]

    def get_msr_index_list(self, max_entries: int = 1024) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a guest."""
        raw = ffi.new("char[]", 4 + 4 * max_entries)
        lst = ffi.cast("struct kvm_msr_list *", raw)
        lst.nmsrs = max_entries
        _call(self.fd, Ioctl.KVM_GET_MSR_INDEX_LIST, lst)
        return [lst.indices[i] for i in range(lst.nmsrs)]

    def create_vm(self) -> Vm:
        """KVM_CREATE_VM: a new VM with no memory and no vCPUs."""
        return Vm(self, _call(self.fd, Ioctl.KVM_CREATE_VM, 0))


class Vm(_Fd):
    """A VM file descriptor (api.rst, "vm ioctl")."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.vcpus: list[Vcpu] = []

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        super().close()

    def check_extension(self, cap: Cap | int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd: the answer for this VM (e.g. MAX_VCPUS)."""
        rc = _ioctl(self.fd, Ioctl.KVM_CHECK_EXTENSION, ffi.cast("void *", int(cap)))
        return max(rc, 0)

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION: map host memory at a guest-physical address."""
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": flags, "guest_phys_addr": guest_phys_addr,
            "memory_size": memory_size, "userspace_addr": userspace_addr,
        })
        _call(self.fd, Ioctl.KVM_SET_USER_MEMORY_REGION, region, f"slot {slot} at {guest_phys_addr:#x}")

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest-physical space KVM needs on Intel (not RAM)."""
        _call(self.fd, Ioctl.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: one page for the real-mode identity map on Intel."""
        _call(self.fd, Ioctl.KVM_SET_IDENTITY_MAP_ADDR, ffi.new("uint64_t *", addr))

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and a LAPIC per vCPU created afterwards."""
        _call(self.fd, Ioctl.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        """KVM_CREATE_PIT2: in-kernel i8254 timer (needs the irqchip)."""
        _call(self.fd, Ioctl.KVM_CREATE_PIT2, ffi.new("struct kvm_pit_config *", {"flags": flags}))

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: drive a GSI of the in-kernel irqchip."""
        _call(self.fd, Ioctl.KVM_IRQ_LINE, ffi.new("struct kvm_irq_level *", {"irq": irq, "level": level}))

    def ioeventfd(self, addr: int, length: int, fd: int, flags: int = 0, datamatch: int = 0) -> None:
        """KVM_IOEVENTFD: signal an eventfd on a guest write instead of exiting."""
        arg = ffi.new("struct kvm_ioeventfd *", {
            "datamatch": datamatch, "addr": addr, "len": length, "fd": fd, "flags": flags})
        _call(self.fd, Ioctl.KVM_IOEVENTFD, arg)

    def irqfd(self, fd: int, gsi: int, flags: int = 0) -> None:
        """KVM_IRQFD: an eventfd write injects an interrupt on ``gsi``."""
        _call(self.fd, Ioctl.KVM_IRQFD, ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": flags}))

    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        """KVM_CREATE_VCPU: a vCPU whose id is also its initial APIC id."""
        fd = _call(self.fd, Ioctl.KVM_CREATE_VCPU, vcpu_id, f"vcpu {vcpu_id}")
        try:
            vcpu = Vcpu(self, fd, vcpu_id, self.kvm.get_vcpu_mmap_size())
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    # --- VM state for snapshots (api.rst: KVM_GET_IRQCHIP, KVM_GET_PIT2, KVM_GET_CLOCK, KVM_GET_DIRTY_LOG) ---
    def get_irqchip(self, chip_id: int):
        """KVM_GET_IRQCHIP: one in-kernel interrupt controller's state (KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE,
        _IOAPIC)."""
        chip = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        _call(self.fd, Ioctl.KVM_GET_IRQCHIP, chip, f"chip {chip_id}")
        return chip

    def set_irqchip(self, chip) -> None:
        """KVM_SET_IRQCHIP: load the state read by get_irqchip (chip_id says which controller)."""
        _call(self.fd, Ioctl.KVM_SET_IRQCHIP, chip, f"chip {chip.chip_id}")

    def get_pit2(self):
        """KVM_GET_PIT2: the in-kernel i8254's three channels and flags."""
        pit = ffi.new("struct kvm_pit_state2 *")
        _call(self.fd, Ioctl.KVM_GET_PIT2, pit)
        return pit

    def set_pit2(self, pit) -> None:
        """KVM_SET_PIT2."""
        _call(self.fd, Ioctl.KVM_SET_PIT2, pit)

    def get_clock(self):
        """KVM_GET_CLOCK: the guest's kvmclock, in nanoseconds."""
        clock = ffi.new("struct kvm_clock_data *")
        _call(self.fd, Ioctl.KVM_GET_CLOCK, clock)
        return clock

    def set_clock(self, clock) -> None:
        """KVM_SET_CLOCK: set the kvmclock (only ``clock`` is used when flags is 0)."""
        _call(self.fd, Ioctl.KVM_SET_CLOCK, clock)

    def get_dirty_log(self, slot: int, bitmap) -> None:
        """KVM_GET_DIRTY_LOG: fill ``bitmap`` (a cffi buffer, one bit per 4 KiB page of the slot) with the pages
        written since the last call, and clear KVM's log. The slot needs KVM_MEM_LOG_DIRTY_PAGES."""
        log = ffi.new("struct kvm_dirty_log *", {"slot": slot})
        log.dirty_bitmap = ffi.cast("void *", bitmap)
        _call(self.fd, Ioctl.KVM_GET_DIRTY_LOG, log, f"slot {slot}")


class Vcpu(_Fd):
    """A vCPU file descriptor and its mmap'd ``struct kvm_run`` (api.rst, "vcpu ioctl")."""

    def __init__(self, vm: Vm, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        self._map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # kvm_run is KVM's own page shared with us, not guest memory: its layout is fixed by the ABI.
        self.run_struct = ffi.from_buffer("struct kvm_run *", self._map)
        self.run_buffer = memoryview(self._map)   # the same bytes, for struct unpacks (pykvm.kvm.exits)

    def close(self) -> None:
        if self.fd >= 0:
            ffi.release(self.run_struct)  # drop cffi's and our exports of the mapping, then unmap it
            self.run_buffer.release()
            self._map.close()
        super().close()

    def run_data(self, offset: int, length: int) -> memoryview:
        """The bytes of the kvm_run mapping at [offset, offset+length) (string I/O data).

        ``offset`` comes from KVM (io.data_offset), but the length comes from the guest (count x
        size), so both are checked against the mapping.
        """
        if offset < 0 or length < 0 or offset + length > len(self._map):
            raise PykvmError(f"KVM reported I/O data outside the kvm_run mapping ({offset:#x}+{length})")
        return memoryview(self._map)[offset:offset + length]

    def run(self) -> tuple:
        """KVM_RUN (api.rst 4.10): run the guest until it exits; the only place pykvm issues KVM_RUN.

        Returns the typed exit, ``(reason, *fields)`` as :mod:`pykvm.kvm.exits` tables it. EINTR (a
        signal or ``immediate_exit`` kicked the thread out) and EAGAIN (a parked AP was woken) both
        return :data:`~pykvm.kvm.exits.INTR_EXIT`: nothing to handle, the caller decides whether to
        run again. Any other failure raises :class:`KvmError`."""
        if _ioctl(self.fd, _KVM_RUN, _NULL) < 0:
            err = ffi.errno
            if err == errno.EINTR or err == errno.EAGAIN:
                return INTR_EXIT
            raise KvmError(Ioctl.KVM_RUN, err, f"vcpu {self.id}")
        return decode(self.run_buffer)

    def get_regs(self):
        """KVM_GET_REGS: general-purpose registers, RIP and RFLAGS."""
        regs = ffi.new("struct kvm_regs *")
        _call(self.fd, Ioctl.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs) -> None:
        """KVM_SET_REGS."""
        _call(self.fd, Ioctl.KVM_SET_REGS, regs)

    def get_sregs(self):
        """KVM_GET_SREGS: segment, descriptor-table and control registers, EFER, APIC base."""
        sregs = ffi.new("struct kvm_sregs *")
        _call(self.fd, Ioctl.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs) -> None:
        """KVM_SET_SREGS."""
        _call(self.fd, Ioctl.KVM_SET_SREGS, sregs)

    def get_fpu(self):
        """KVM_GET_FPU: x87/SSE state in FXSAVE layout."""
        fpu = ffi.new("struct kvm_fpu *")
        _call(self.fd, Ioctl.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu) -> None:
        """KVM_SET_FPU."""
        _call(self.fd, Ioctl.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS: read model-specific registers; MSRs KVM does not know are left out."""
        raw = ffi.new("char[]", 8 + 16 * len(indices))
        msrs = ffi.cast("struct kvm_msrs *", raw)
        msrs.nmsrs = len(indices)
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        n = _call(self.fd, Ioctl.KVM_GET_MSRS, msrs)
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        """KVM_SET_MSRS: returns how many were set (it stops at the first one KVM refuses)."""
        raw = ffi.new("char[]", 8 + 16 * len(values))
        msrs = ffi.cast("struct kvm_msrs *", raw)
        msrs.nmsrs = len(values)
        for i, (index, data) in enumerate(values.items()):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        return _call(self.fd, Ioctl.KVM_SET_MSRS, msrs)

    def set_cpuid2(self, entries: list[dict]) -> None:
        """KVM_SET_CPUID2: the CPUID leaves this vCPU reports."""
        raw = ffi.new("char[]", 8 + ffi.sizeof("struct kvm_cpuid_entry2") * len(entries))
        cpuid = ffi.cast("struct kvm_cpuid2 *", raw)
        cpuid.nent = len(entries)
        for i, entry in enumerate(entries):
            for key, value in entry.items():
                setattr(cpuid.entries[i], key, value)
        _call(self.fd, Ioctl.KVM_SET_CPUID2, cpuid)

    def set_signal_mask(self, blocked: set[int]) -> None:
        """KVM_SET_SIGNAL_MASK (api.rst 4.19): the signals blocked while this vCPU is in KVM_RUN.

        ``blocked`` are signal numbers (1..64); the kernel's sigset is 64 bits, little-endian."""
        bits = 0
        for signum in blocked:
            if not 1 <= signum <= 64:
                raise ValueError(f"signal {signum} is outside 1..64")
            bits |= 1 << (signum - 1)
        raw = ffi.new("char[]", 4 + 8)
        mask = ffi.cast("struct kvm_signal_mask *", raw)
        mask.len = 8
        ffi.memmove(mask.sigset, bits.to_bytes(8, "little"), 8)
        _call(self.fd, Ioctl.KVM_SET_SIGNAL_MASK, mask)

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: runnable, halted, or waiting for INIT/SIPI (KVM_MP_STATE_*)."""
        state = ffi.new("struct kvm_mp_state *")
        _call(self.fd, Ioctl.KVM_GET_MP_STATE, state)
        return state.mp_state

    def set_guest_debug(self, control: int, debugreg: list[int] | None = None) -> None:
        """KVM_SET_GUEST_DEBUG: single-step, software and hardware breakpoints."""
        dbg = ffi.new("struct kvm_guest_debug *")
        dbg.control = control
        for i, value in enumerate(debugreg or []):
            dbg.arch.debugreg[i] = value
        _call(self.fd, Ioctl.KVM_SET_GUEST_DEBUG, dbg)

    def get_vcpu_events(self):
        """KVM_GET_VCPU_EVENTS: pending exceptions, interrupts, NMIs."""
        events = ffi.new("struct kvm_vcpu_events *")
        _call(self.fd, Ioctl.KVM_GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events) -> None:
        """KVM_SET_VCPU_EVENTS: e.g. inject an exception."""
        _call(self.fd, Ioctl.KVM_SET_VCPU_EVENTS, events)

    def inject_exception(self, vector: int) -> None:
        """Make exception ``vector`` (one without an error code, e.g. #BP 3 or #DB 1) the next thing
        the vCPU delivers through the guest's IDT: KVM_GET/SET_VCPU_EVENTS, exception injected."""
        events = self.get_vcpu_events()
        events.exception.injected = 1
        events.exception.nr = vector
        events.exception.has_error_code = 0
        events.exception.error_code = 0
        events.flags = 0
        self.set_vcpu_events(events)

    def advance_rip(self, length: int) -> None:
        """RIP += ``length`` (KVM_GET_REGS + KVM_SET_REGS): step over an instruction pykvm completed."""
        regs = self.get_regs()
        regs.rip += length
        self.set_regs(regs)

    def get_lapic(self):
        """KVM_GET_LAPIC: the in-kernel local APIC's register page."""
        lapic = ffi.new("struct kvm_lapic_state *")
        _call(self.fd, Ioctl.KVM_GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic) -> None:
        """KVM_SET_LAPIC."""
        _call(self.fd, Ioctl.KVM_SET_LAPIC, lapic)

    # --- vCPU state for snapshots (api.rst: KVM_GET_XSAVE, _XCRS, _DEBUGREGS, _MP_STATE) ----------------
    def get_xsave(self):
        """KVM_GET_XSAVE: x87/SSE/AVX state in the XSAVE layout (4 KiB)."""
        xsave = ffi.new("struct kvm_xsave *")
        _call(self.fd, Ioctl.KVM_GET_XSAVE, xsave)
        return xsave

    def set_xsave(self, xsave) -> None:
        """KVM_SET_XSAVE."""
        _call(self.fd, Ioctl.KVM_SET_XSAVE, xsave)

    def get_xcrs(self):
        """KVM_GET_XCRS: the extended control registers (XCR0)."""
        xcrs = ffi.new("struct kvm_xcrs *")
        _call(self.fd, Ioctl.KVM_GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs) -> None:
        """KVM_SET_XCRS."""
        _call(self.fd, Ioctl.KVM_SET_XCRS, xcrs)

    def get_debugregs(self):
        """KVM_GET_DEBUGREGS: DR0-3, DR6, DR7."""
        regs = ffi.new("struct kvm_debugregs *")
        _call(self.fd, Ioctl.KVM_GET_DEBUGREGS, regs)
        return regs

    def set_debugregs(self, regs) -> None:
        """KVM_SET_DEBUGREGS."""
        _call(self.fd, Ioctl.KVM_SET_DEBUGREGS, regs)

    def set_mp_state(self, mp_state: int) -> None:
        """KVM_SET_MP_STATE: runnable, halted, waiting for INIT/SIPI (KVM_MP_STATE_*)."""
        _call(self.fd, Ioctl.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": mp_state}))
