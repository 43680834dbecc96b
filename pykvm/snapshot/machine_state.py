"""Capture a paused Machine's whole state, and put it back into a fresh Machine.

vCPU state, in the order Firecracker's x86 vCPU code saves it: MP state, regs, sregs, XSAVE (or FPU where KVM
has no XSAVE), XCRs, debug registers, LAPIC (with an in-kernel irqchip), the MSRs KVM lists as saveable
(KVM_GET_MSR_INDEX_LIST, those KVM_GET_MSRS answers), vCPU events. It is restored in the order KVM needs
(api.rst: MSRs and sregs before the LAPIC, events last). VM state: the PIC master and slave, the IOAPIC and the
PIT (with an in-kernel irqchip) and the KVM clock. Device state: each device's ``state()``, keyed by bus and base.

Binary KVM structures travel as their exact bytes (blobs of the state file): their layouts are proven against the
kernel's headers by tests/test_abi.py, and a restore on another layout is refused by the format version.
"""

from __future__ import annotations

import mmap
import os
import stat
import time

from ..errors import UsageError
from ..kvm.abi import STRUCTS, ffi
from ..kvm.constants import KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE
from ..kvm.fd import KvmError
from ..memory import PAGE_SIZE, back_with_file, dirty_pages, ram_regions, set_dirty_logging
from .format import SnapshotError

_CHIPS = (KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC)
MSR_IA32_TSC_DEADLINE = 0x6E0     # Intel SDM vol. 3A 11.5.4.1, TSC-deadline mode


def _blob(cdata) -> bytes:
    return bytes(ffi.buffer(cdata))


def _unblob(ctype: str, raw, what: str):
    """A new ``ctype`` holding ``raw``, the exact bytes a snapshot recorded (untrusted: it is the state file's,
    never a guest address); SnapshotError unless it is bytes of exactly ``sizeof(ctype)``."""
    if not isinstance(raw, (bytes, memoryview)):
        raise SnapshotError(f"the snapshot's {what} is not binary data")
    if len(raw) != ffi.sizeof(ctype):
        raise SnapshotError(f"the snapshot's {what} is {len(raw)} bytes, not the {ffi.sizeof(ctype)} of {ctype}")
    cdata = ffi.new(f"{ctype} *")
    ffi.buffer(cdata)[:] = raw
    return cdata


def saveable_msrs(kvm, vcpu) -> list[int]:
    """The MSR indices of KVM_GET_MSR_INDEX_LIST that KVM_GET_MSRS actually answers for this vCPU (it stops at
    the first it refuses; those are skipped)."""
    rest, good = list(kvm.get_msr_index_list()), []
    while rest:
        got = vcpu.get_msrs(rest)
        good += list(got)
        rest = rest[len(got) + 1:]
    return good


def capture_vcpu(kvm, vcpu, irqchip: bool, msr_indices: list[int]) -> dict:
    """One vCPU's state as plain data. The vCPU must be out of KVM_RUN (paused)."""
    state = {"id": vcpu.id, "mp_state": vcpu.get_mp_state(), "regs": _blob(vcpu.get_regs()),
             "sregs": _blob(vcpu.get_sregs())}
    try:
        state["xsave"] = _blob(vcpu.get_xsave())
        state["xcrs"] = _blob(vcpu.get_xcrs())
    except Exception:
        state["fpu"] = _blob(vcpu.get_fpu())
    state["debugregs"] = _blob(vcpu.get_debugregs())
    if irqchip:
        state["lapic"] = _blob(vcpu.get_lapic())
    state["msrs"] = [[index, value] for index, value in vcpu.get_msrs(msr_indices).items()]
    state["events"] = _blob(vcpu.get_vcpu_events())
    return state


def restore_vcpu(vcpu, state: dict, irqchip: bool) -> None:
    """Put a vCPU back in the state :func:`capture_vcpu` recorded. Raises SnapshotError for a malformed record."""
    try:
        msrs = {int(i): int(v) for i, v in state["msrs"]}
        mp_state = int(state["mp_state"])
        if irqchip != ("lapic" in state):
            raise SnapshotError("the snapshot's vCPU state and its irqchip setting disagree")
        # The LAPIC timer's TSC deadline only takes while LVTT is in TSC-deadline mode, and KVM_SET_LAPIC zeroes
        # it when it puts LVTT in that mode: it goes after the LAPIC (as QEMU's kvm_put_tscdeadline_msr), or
        # the guest's pending timer interrupt is lost and it sleeps until some other interrupt wakes it.
        deadline = msrs.pop(MSR_IA32_TSC_DEADLINE, None) if irqchip else None
        _set_msrs(vcpu, msrs)
        vcpu.set_sregs(_unblob("struct kvm_sregs", state["sregs"], "sregs"))
        vcpu.set_regs(_unblob("struct kvm_regs", state["regs"], "regs"))
        if "xsave" in state:
            vcpu.set_xsave(_unblob("struct kvm_xsave", state["xsave"], "XSAVE area"))
            vcpu.set_xcrs(_unblob("struct kvm_xcrs", state["xcrs"], "XCRs"))
        else:
            vcpu.set_fpu(_unblob("struct kvm_fpu", state["fpu"], "FPU state"))
        vcpu.set_debugregs(_unblob("struct kvm_debugregs", state["debugregs"], "debug registers"))
        if irqchip:
            vcpu.set_lapic(_unblob("struct kvm_lapic_state", state["lapic"], "LAPIC"))
            if deadline is not None:
                _set_msrs(vcpu, {MSR_IA32_TSC_DEADLINE: deadline})
        vcpu.set_mp_state(mp_state)
        vcpu.set_vcpu_events(_unblob("struct kvm_vcpu_events", state["events"], "vCPU events"))
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"the snapshot's state of vCPU {vcpu.id} is malformed ({e!r})") from None
    except KvmError as e:    # the file's bytes are the input: KVM refusing them is a bad snapshot, not a crash
        raise SnapshotError(f"KVM refused the snapshot's state of vCPU {vcpu.id}: {e}") from None


def _set_msrs(vcpu, msrs: dict[int, int]) -> None:
    rest = dict(msrs)
    while rest:   # KVM stops at the first MSR it refuses (none should be): skip it and go on
        n = vcpu.set_msrs(rest)
        rest = dict(list(rest.items())[n + 1:])


def capture_vm(vm, irqchip: bool) -> dict:
    """The VM-wide KVM state: kvmclock, and with an in-kernel irqchip the PICs, IOAPIC and PIT."""
    state = {"clock": _blob(vm.get_clock())}
    if irqchip:
        state["irqchip"] = [_blob(vm.get_irqchip(chip)) for chip in _CHIPS]
        state["pit2"] = _blob(vm.get_pit2())
    return state


def restore_vm(vm, state: dict, irqchip: bool) -> None:
    """Put the VM-wide state back (see :func:`capture_vm`)."""
    try:
        if irqchip:
            chips = state["irqchip"]
            if len(chips) != len(_CHIPS):
                raise SnapshotError("the snapshot's irqchip state does not have the PIC master, slave and IOAPIC")
            for chip_id, text in zip(_CHIPS, chips, strict=True):
                chip = _unblob("struct kvm_irqchip", text, "irqchip state")
                if chip.chip_id != chip_id:
                    raise SnapshotError("the snapshot's irqchip state is out of order")
                vm.set_irqchip(chip)
            vm.set_pit2(_unblob("struct kvm_pit_state2", state["pit2"], "PIT state"))
        clock = _unblob("struct kvm_clock_data", state["clock"], "KVM clock")
        clock.flags = 0   # only the clock value: the guest's time continues from where it was
        vm.set_clock(clock)
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"the snapshot's VM state is malformed ({e!r})") from None
    except KvmError as e:
        raise SnapshotError(f"KVM refused the snapshot's VM state: {e}") from None


def devices(machine) -> dict[str, object]:
    """Every device of the machine by key ("pio:0x3f8", "mmio:0xd0000000"); a device that answers on two
    ports (the i8042) once, under its first."""
    out, seen = {}, set()
    for bus, prefix in ((machine.pio, "pio"), (machine.mmio, "mmio")):
        for base, _, device in bus.devices():
            device = getattr(device, "controller", device)
            if id(device) not in seen:
                seen.add(id(device))
                out[f"{prefix}:{base:#x}"] = device
    return out


def capture_devices(machine) -> dict:
    """{key: {"class": name, "state": device.state()}} for every device. A device whose model cannot say its
    state (no ``state()``) is recorded with state None and comes back in its reset state; the snapshot's
    ``unsaved`` list names them (none of the PC devices: the UART and the CMOS/RTC save their registers too).
    A device that cannot be saved at this moment (a virtio device part-way through a chain it holds outside
    the rings) refuses the snapshot with SnapshotError: resume and try again."""
    out = {}
    for key, device in devices(machine).items():
        name = type(device).__name__
        try:
            out[key] = {"class": name, "state": device.state() if hasattr(device, "state") else None}
        except ValueError as e:
            raise SnapshotError(f"cannot snapshot {name} at {key} now: {e}") from None
    return out


def virtio_config(machine) -> dict:
    """The virtio devices a restoring process must create before it takes their state, in the order
    :func:`pykvm.devices.virtio.attach_virtio` places them (drives, console, entropy, network cards):
    {"drives": [[path, read_only]], "console": bool, "rng": bool, "nets": [[tap, mac hex]]}."""
    from ..devices.virtio import Block, Entropy, Net, VirtioConsole, VirtioMmio
    config: dict = {"drives": [], "console": False, "rng": False, "nets": []}
    transports = sorted(((base, device) for base, _, device in machine.mmio.devices()
                         if isinstance(device, VirtioMmio)), key=lambda pair: pair[0])
    for _, transport in transports:
        device = transport.device
        if isinstance(device, Block):
            config["drives"].append([device.path, device.readonly])
        elif isinstance(device, VirtioConsole):
            config["console"] = True
        elif isinstance(device, Entropy):
            config["rng"] = True
        elif isinstance(device, Net):
            config["nets"].append([getattr(device.tap, "name", None), device.mac.hex()])
    return config


def attach_recorded_virtio(machine, state: dict) -> None:
    """Create the virtio devices :func:`virtio_config` recorded on a fresh ``machine`` (design: each drive is
    re-opened from the path in the state file, each network card from its TAP's name; the images must be the
    ones the snapshot's guest used, and a drive whose size changed is refused). Their ioeventfds, irqfds and
    device threads are set up as at a cold start. SnapshotError if the record is malformed or a drive or TAP
    cannot be opened."""
    from ..devices.virtio import DriveSpec, NetSpec, attach_virtio
    config = state.get("virtio", {"drives": [], "console": False, "rng": False, "nets": []})
    try:
        drives = [DriveSpec(path, readonly) for path, readonly in config["drives"]]
        nets = [NetSpec(tap, bytes.fromhex(mac)) for tap, mac in config["nets"]]
        console, rng = config["console"], config["rng"]
        if (not all(type(d.path) is str and d.path and type(d.readonly) is bool for d in drives)
                or not all(type(n.tap) is str and n.tap and len(n.mac) == 6 for n in nets)
                or type(console) is not bool or type(rng) is not bool):
            raise ValueError("a field has the wrong type")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise SnapshotError(f"the snapshot's virtio device list is malformed ({e})") from None
    if not (drives or nets or console or rng):
        return
    try:
        attach_virtio(machine, drives, rng, console, nets=nets)
    except SnapshotError:
        raise
    except UsageError as e:
        raise SnapshotError(f"cannot re-create the snapshot's virtio devices: {e}") from None


def unsaved(device_states: dict) -> list[str]:
    """The devices of a capture whose state was not saved (see :func:`capture_devices`)."""
    return [f"{r['class']} at {key}" for key, r in device_states.items() if r["state"] is None]


def restore_devices(machine, state: dict) -> None:
    """Load each device's recorded state; SnapshotError if the device set differs from the machine's."""
    here = devices(machine)
    if not isinstance(state, dict) or set(state) != set(here):
        theirs = sorted(state) if isinstance(state, dict) else []
        raise SnapshotError("the snapshot's devices do not match this machine's: snapshot has "
                            f"{', '.join(theirs) or 'none'}; this machine has {', '.join(sorted(here))}")
    for key, device in here.items():
        record = state[key]
        if not isinstance(record, dict) or record.get("class") != type(device).__name__:
            raise SnapshotError(f"the snapshot's device at {key} is not a {type(device).__name__}")
        if record.get("state") is None or not hasattr(device, "load_state"):
            continue   # not saved: the device stays in its reset state
        try:
            device.load_state(record["state"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SnapshotError(f"the snapshot's state of {type(device).__name__} at {key} is invalid: {e}") from None


def machine_config(machine) -> dict:
    """What a restoring process must build before it can take the state: RAM size, vCPUs, irqchip."""
    return {"mem_size": machine.memory.size, "vcpu_count": len(machine.vcpus), "irqchip": bool(machine.irqchip),
            "firmware": machine.firmware is not None}


def ram_size(machine) -> int:
    return sum(region.size for region, _ in ram_regions(machine.memory))


# --- create ---------------------------------------------------------------------------------------------------
def write_memory(machine, mem_path: str, diff: bool) -> int:
    """Write guest RAM to ``mem_path``: every page (Full), or, with ``diff``, only the pages written since the
    last snapshot, at their offsets in a sparse file of the full size (Firecracker's diff layout: apply it over
    the full file with :func:`apply_diff`). Returns the bytes of data written."""
    total = ram_size(machine)
    written = 0
    try:
        target = os.stat(mem_path)
    except FileNotFoundError:
        target = None
    if target is not None and (target.st_dev, target.st_ino) == getattr(machine.memory, "backing_file", None):
        # Its unwritten pages are still read from that file (MAP_PRIVATE): truncating it would change the guest.
        raise SnapshotError(f"{mem_path} is the memory file this VM was restored from and still reads; "
                            "write the new snapshot's memory to another file")
    # O_NONBLOCK: a FIFO there is refused (ENXIO, or not a regular file below) instead of waiting for a reader
    fd = os.open(mem_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotError(f"{mem_path} is not a regular file: the snapshot's memory file must be one")
        os.ftruncate(fd, total)
        if diff:
            for region, offset, pages in dirty_pages(machine.memory, machine.vm):
                for page in pages:
                    at = page * PAGE_SIZE
                    written += os.pwrite(fd, region._view[at:at + PAGE_SIZE], offset + at)
        else:
            for region, offset in ram_regions(machine.memory):
                chunk = 16 << 20
                for at in range(0, region.size, chunk):
                    written += os.pwrite(fd, region._view[at:at + chunk], offset + at)
    finally:
        os.close(fd)
    return written


BY_REFERENCE_MIN = 64 << 10     # device blobs this large may be stored as a reference to a host file


def _file_ref(data, files: list[tuple[str, bytes, os.stat_result]]):
    """``data`` as {"$file": [path, offset, length, size, mtime_ns]} if it is a whole host file of ``files`` or
    the tail of one (a bzImage's protected-mode part), else ``data`` itself."""
    n = len(data)
    for path, content, st in files:
        for offset in (0, len(content) - n):
            if 0 <= offset and content[offset:offset + n] == data:
                return {"$file": [path, offset, n, st.st_size, st.st_mtime_ns]}
    return data


def _refer_to_files(value, files):
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _file_ref(value, files) if len(value) >= BY_REFERENCE_MIN else value
    if isinstance(value, dict):
        return {k: _refer_to_files(v, files) for k, v in value.items()}
    if isinstance(value, list):
        return [_refer_to_files(v, files) for v in value]
    return value


def _resolve_files(value, opened: dict):
    """Replace each {"$file": ...} of :func:`_file_ref` by a read-only view of the file, mapped (nothing is read
    now). SnapshotError if the file is gone or changed since the snapshot (another size or modification time)."""
    if isinstance(value, dict):
        ref = value.get("$file")
        if ref is not None and len(value) == 1:
            if (not isinstance(ref, list) or len(ref) != 5 or type(ref[0]) is not str
                    or not all(type(x) is int and x >= 0 for x in ref[1:]) or ref[1] + ref[2] > ref[3]):
                raise SnapshotError("the snapshot's reference to a host file is malformed")
            path, offset, length, size, mtime_ns = ref
            if path not in opened:
                try:
                    with open(path, "rb") as f:
                        st = os.fstat(f.fileno())
                        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
                            raise SnapshotError(f"{path} changed since the snapshot (the snapshot's guest was "
                                                "booted from it and its devices refer to its contents): restore "
                                                "with the same file")
                        opened[path] = memoryview(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ))
                except OSError as e:
                    raise SnapshotError(f"cannot open {path}, which the snapshot refers to: {e.strerror}") from None
            return opened[path][offset:offset + length]
        return {k: _resolve_files(v, opened) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_files(v, opened) for v in value]
    return value


def capture(machine, kvm_msrs: list[int] | None = None, files: list[str] = ()) -> dict:
    """The whole state of a paused machine (without its RAM) as plain data for :func:`write_state`.

    ``files``: host files the machine was booted from (kernel, initrd; a machine restored from a snapshot adds
    the files that snapshot referred to). A device blob of at least
    :data:`BY_REFERENCE_MIN` bytes that is one of them (or its tail) is stored as a reference (path, offset,
    length, and the file's size and modification time) instead of its bytes: fw_cfg's copies of the kernel and
    initrd then stay out of the state file, and a restore maps them from the files (a changed file is
    refused).

    The machine must be paused (:meth:`pykvm.machine.Machine.pause`: vCPUs out of KVM_RUN and devices
    quiesced, so that no device thread changes guest memory or a device's state while it is read);
    SnapshotError otherwise."""
    if not getattr(machine, "paused", True):
        raise SnapshotError("a snapshot needs a paused machine (vCPUs and device threads stopped): pause it first")
    msrs = kvm_msrs if kvm_msrs is not None else saveable_msrs(machine.kvm, machine.vcpus[0])
    device_states = capture_devices(machine)
    known = []
    for path in dict.fromkeys([*files, *getattr(machine, "snapshot_files", [])]):
        try:
            with open(path, "rb") as f:
                known.append((path, f.read(), os.fstat(f.fileno())))
        except OSError:
            continue        # the file is gone: its bytes stay in the state
    if known:
        device_states = _refer_to_files(device_states, known)
    return {
        "machine": machine_config(machine),
        "vcpus": [capture_vcpu(machine.kvm, v, machine.irqchip, msrs) for v in machine.vcpus],
        "vm": capture_vm(machine.vm, machine.irqchip),
        "devices": device_states,
        "virtio": virtio_config(machine),
        "created": time.time(),
    }


def warm_up(machine_class) -> None:
    """Pay a fresh process's first-use costs before any restore is timed: cffi parses each KVM structure type
    on its first use, and the first VM a process creates costs more than the next. A VMM calls this before its
    API socket appears; a machine that cannot be created here (no /dev/kvm) is left for the real attempt to
    report."""
    for name in STRUCTS:
        ffi.new(f"struct {name} *")
    try:
        machine_class(mem_size=1 << 20).close()
    except Exception:
        pass


# --- restore --------------------------------------------------------------------------------------------------
def check_config(state: dict) -> dict:
    """The machine configuration a state file needs, checked; SnapshotError if it is malformed."""
    config = state.get("machine")
    if (not isinstance(config, dict) or type(config.get("mem_size")) is not int
            or type(config.get("vcpu_count")) is not int or type(config.get("irqchip")) is not bool
            or not isinstance(state.get("vcpus"), list) or len(state["vcpus"]) != config["vcpu_count"]):
        raise SnapshotError("the snapshot's machine description is malformed (mem_size, vcpu_count, irqchip, "
                            "vcpus)")
    if config.get("firmware"):
        raise SnapshotError("snapshots of machines started with --firmware cannot be restored yet")
    return config


def restore(machine, state: dict, mem_path: str, track_dirty_pages: bool = False) -> None:
    """Put ``state`` and the memory file into ``machine``, freshly built with the state's configuration and not
    yet run. Memory is mapped from the file copy-on-write: nothing is read now. Raises SnapshotError when the
    memory file or the state does not fit this machine."""
    config = check_config(state)
    if config["mem_size"] != machine.memory.size or config["vcpu_count"] != len(machine.vcpus) \
            or config["irqchip"] != bool(machine.irqchip):
        chip = {True: "an in-kernel irqchip", False: "no in-kernel irqchip"}
        raise SnapshotError("the snapshot does not match the machine it is loaded into: snapshot "
                            f"{config['mem_size']} bytes of RAM, {config['vcpu_count']} vCPUs, "
                            f"{chip[config['irqchip']]}; machine {machine.memory.size} bytes, "
                            f"{len(machine.vcpus)} vCPUs, {chip[bool(machine.irqchip)]}")
    try:
        fd = os.open(mem_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)   # a FIFO: no wait for a writer
    except OSError as e:
        raise SnapshotError(f"cannot open the snapshot memory file {mem_path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SnapshotError(f"the snapshot memory file {mem_path} is not a regular file (a directory, device "
                                "or pipe)")
        size = os.fstat(fd).st_size
        if size != ram_size(machine):
            raise SnapshotError(f"the snapshot memory file {mem_path} is {size} bytes, but the snapshot's guest has "
                                f"{ram_size(machine)} bytes of RAM: it is truncated or belongs to another snapshot")
        # Guest memory first: a virtio device thread (network input) may touch it as soon as its
        # transport's state says the driver runs.
        back_with_file(machine.memory, machine.vm, fd, dirty_log=track_dirty_pages)
        attach_recorded_virtio(machine, state)
        opened: dict = {}
        restore_devices(machine, _resolve_files(state.get("devices"), opened))
        machine.snapshot_files = sorted(opened)   # referred to again by a snapshot of the restored machine
        restore_vm(machine.vm, state.get("vm") or {}, machine.irqchip)
        for vcpu, vstate in zip(machine.vcpus, state["vcpus"], strict=True):
            if not isinstance(vstate, dict):
                raise SnapshotError("the snapshot's vCPU state is malformed")
            restore_vcpu(vcpu, vstate, machine.irqchip)
    finally:
        os.close(fd)
    for device in devices(machine).values():
        if hasattr(device, "resume_after_restore"):
            device.resume_after_restore()


def start_dirty_tracking(machine) -> None:
    """KVM_MEM_LOG_DIRTY_PAGES on every RAM slot; the log starts empty."""
    set_dirty_logging(machine.memory, machine.vm, True)


def apply_diff(base_path: str, diff_path: str) -> int:
    """Copy the data of a diff memory file (its non-hole extents, SEEK_DATA/SEEK_HOLE) over the full memory file
    it was taken after; returns the bytes copied. Both files must have the same size."""
    base = os.open(base_path, os.O_WRONLY | os.O_CLOEXEC)
    diff = os.open(diff_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(diff).st_size
        if os.fstat(base).st_size != size:
            raise SnapshotError(f"{diff_path} ({size} bytes) is not a diff of {base_path} "
                                f"({os.fstat(base).st_size} bytes): the sizes differ")
        copied, at = 0, 0
        while at < size:
            try:
                start = os.lseek(diff, at, os.SEEK_DATA)
            except OSError:
                break   # ENXIO: no data after ``at``
            end = os.lseek(diff, start, os.SEEK_HOLE)
            while start < end:
                data = os.pread(diff, min(end - start, 16 << 20), start)
                os.pwrite(base, data, start)
                start += len(data)
                copied += len(data)
            at = end
        return copied
    finally:
        os.close(base)
        os.close(diff)
