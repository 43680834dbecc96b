"""The VMM controller: one thread owns the VM and applies the API's typed actions to it, one at a time.

This follows Firecracker's rpc_interface: the HTTP layer only validates a request and turns it into an action
(``StartInstance``, ``Pause``, ``CreateSnapshot``...), hands it to the controller through a queue and waits for
the answer; only the controller thread touches the Machine. An action that cannot run in the VM's current state,
or fails, comes back as :class:`ApiError` with a message for the user (HTTP 400).

The process's main thread runs the Machine (``Machine.run``: the vCPU threads and the end of the run) once the
controller has built it, on InstanceStart or on a snapshot load: see :meth:`Vmm.run_machine`.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import stat
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from .. import __version__
from ..errors import PykvmError
from . import models

NOT_STARTED, RUNNING, PAUSED = "Not started", "Running", "Paused"
DEFAULT_BOOT_ARGS = "console=ttyS0 reboot=k panic=1"
PAUSE_TIMEOUT = 5.0            # seconds for every vCPU to leave KVM_RUN
CONSOLE_KEEP = 64 << 10        # bytes of recent serial output kept for GET /pykvm/console
APP_NAME = "pykvm"


class ApiError(Exception):
    """An action refused or failed: HTTP ``status`` (400 unless said) with ``{"fault_message": message}``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


# --- actions (typed, as Firecracker's VmmAction) ----------------------------------------------------------------
@dataclass
class PutMachineConfig:
    config: models.MachineConfiguration


@dataclass
class PatchMachineConfig:
    patch: models.MachineConfigurationPatch


@dataclass
class PutBootSource:
    boot_source: models.BootSource


@dataclass
class PutDrive:
    drive: models.Drive


@dataclass
class PatchDrive:
    drive: models.PartialDrive


@dataclass
class PutNetworkInterface:
    interface: models.NetworkInterface


@dataclass
class PutEntropy:
    entropy: models.EntropyDevice


@dataclass
class PutLogger:
    logger: models.Logger


@dataclass
class PutMetrics:
    metrics: models.Metrics


@dataclass
class StartInstance:
    pass


@dataclass
class SendCtrlAltDel:
    pass


@dataclass
class FlushMetrics:
    pass


@dataclass
class Pause:
    pass


@dataclass
class Resume:
    pass


@dataclass
class CreateSnapshot:
    params: models.SnapshotCreateParams


@dataclass
class LoadSnapshot:
    params: models.SnapshotLoadParams


@dataclass
class _Request:
    action: object
    future: Future = field(default_factory=Future)


class SerialRing:
    """The guest's serial output: passed on to ``out`` and the last CONSOLE_KEEP bytes kept."""

    def __init__(self, out=None) -> None:
        self._out = out
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._lock = threading.Lock()

    def __call__(self, data: bytes) -> None:
        if self._out is not None:
            self._out(data)
        with self._lock:
            self._chunks.append(bytes(data))
            self._size += len(data)
            while self._size - len(self._chunks[0]) >= CONSOLE_KEEP:
                self._size -= len(self._chunks.popleft())

    def recent(self, limit: int = CONSOLE_KEEP) -> bytes:
        with self._lock:
            return b"".join(self._chunks)[-limit:]


class Vmm:
    """One VM, configured and driven through actions. Thread-safe: :meth:`submit` from any thread."""

    def __init__(self, instance_id: str = "anonymous-instance", serial_out=None, machine=None) -> None:
        self.instance_id = instance_id
        self.state = NOT_STARTED
        self.machine_config = models.MachineConfiguration(vcpu_count=1, mem_size_mib=128)
        self.boot_source: models.BootSource | None = None
        self.drives: dict[str, models.Drive] = {}
        self.entropy: models.EntropyDevice | None = None
        self.network_interfaces: dict[str, models.NetworkInterface] = {}
        self.logger: models.Logger | None = None
        self.metrics: models.Metrics | None = None
        self.serial = SerialRing(serial_out)
        self.machine = None
        self.track_dirty_pages = False
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._ready = threading.Event()     # a machine is built: the main thread may run it
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="vmm-controller", daemon=True)
        self._thread.start()
        if machine is not None:     # `pykvm run --api-sock`: the machine is built and boots at once
            self.adopt(machine)

    # --- called from other threads -------------------------------------------------------------------------
    def submit(self, action, timeout: float = 30.0):
        """Apply ``action`` on the controller thread; returns its result or raises ApiError."""
        request = _Request(action)
        self._queue.put(request)
        try:
            return request.future.result(timeout)
        except TimeoutError:
            # the VMM's fault, not the request's: 503, as a server too busy to answer
            raise ApiError(f"the VMM did not finish {type(action).__name__} within {timeout:g} s", 503) from None

    def adopt(self, machine) -> None:
        """Take a machine built elsewhere (`pykvm run --api-sock`), already loaded: it runs at once."""
        self.machine = machine
        self.machine_config = models.MachineConfiguration(vcpu_count=len(machine.vcpus),
                                                          mem_size_mib=machine.memory.size >> 20)
        self.state = RUNNING

    def wait_until_ready(self, timeout: float | None = None) -> bool:
        """Block until a machine has been built (InstanceStart or snapshot load); False on shutdown."""
        self._ready.wait(timeout)
        return self._ready.is_set() and self.machine is not None

    def run_machine(self, timeout: float | None = None):
        """Run the built machine on the calling thread (the process's main thread) until it ends."""
        return self.machine.run(timeout=timeout)

    def shutdown(self) -> None:
        """Stop the controller thread; close a machine that never ran. Idempotent."""
        if not self._stopping:
            self._stopping = True
            self._queue.put(None)
            self._thread.join(timeout=10)
            self._ready.set()
        for f in (getattr(self, "_log_file", None), getattr(self, "_metrics_file", None)):
            if f is not None:
                f.close()

    def instance_info(self) -> dict:
        return {"id": self.instance_id, "state": self.state, "vmm_version": __version__, "app_name": APP_NAME}

    def vm_config(self) -> dict:
        """GET /vm/config: the configuration in Firecracker's config-file shape."""
        out = {"boot-source": self.boot_source.model_dump(exclude_none=True) if self.boot_source else None,
               "drives": [d.model_dump(exclude_none=True) for d in self.drives.values()],
               "machine-config": self.machine_config.model_dump(),
               "network-interfaces": [n.model_dump(exclude_none=True) for n in self.network_interfaces.values()]}
        for name, value in (("entropy", self.entropy), ("logger", self.logger), ("metrics", self.metrics)):
            if value is not None:
                out[name] = value.model_dump(exclude_none=True)
        return out

    def stats(self) -> dict:
        """The exit statistics (the --stats-json record) so far."""
        if self.machine is None:
            raise ApiError("the microVM has not started: there are no exit statistics yet")
        from ..debug import stats
        m = self.machine
        return stats.to_json(stats.summarize(m.stats, m.pio, m.mmio, m.emulated))

    # --- the controller thread ------------------------------------------------------------------------------
    def _serve(self) -> None:
        handlers = {
            PutMachineConfig: self._put_machine_config, PatchMachineConfig: self._patch_machine_config,
            PutBootSource: self._put_boot_source, PutDrive: self._put_drive, PatchDrive: self._patch_drive,
            PutEntropy: self._put_entropy, PutNetworkInterface: self._put_network_interface,
            PutLogger: self._put_logger, PutMetrics: self._put_metrics,
            StartInstance: self._start, SendCtrlAltDel: self._ctrl_alt_del, FlushMetrics: self._flush_metrics,
            Pause: self._pause, Resume: self._resume, CreateSnapshot: self._create_snapshot,
            LoadSnapshot: self._load_snapshot,
        }
        while True:
            request = self._queue.get()
            if request is None:
                return
            try:
                result = handlers[type(request.action)](request.action)
                self._log(f"{type(request.action).__name__}: ok")
                request.future.set_result(result)
            except ApiError as e:
                self._log(f"{type(request.action).__name__}: {e.message}")
                request.future.set_exception(e)
            except PykvmError as e:
                request.future.set_exception(ApiError(str(e)))
            except (OSError, ValueError) as e:   # a path or value of the request the host refused
                self._log(f"{type(request.action).__name__}: {e}")
                request.future.set_exception(ApiError(_host_refused(e)))
            except Exception as e:   # a bug of ours: the API answers, the VMM stays up
                import traceback
                self._log(traceback.format_exc())
                request.future.set_exception(ApiError(f"internal error in pykvm: {e!r}", 500))

    def _log(self, line: str) -> None:
        f = getattr(self, "_log_file", None)
        if f is not None:
            try:
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} [{self.instance_id}] {line}\n")
                f.flush()
            except OSError:
                pass

    def _before_start(self, what: str) -> None:
        if self.state != NOT_STARTED or self.machine is not None:
            raise ApiError(f"{what} is only possible before the microVM starts; it is {self.state.lower()} now")

    def _put_machine_config(self, action: PutMachineConfig) -> None:
        self._before_start("changing the machine configuration")
        self.machine_config = action.config

    def _patch_machine_config(self, action: PatchMachineConfig) -> None:
        self._before_start("changing the machine configuration")
        changes = action.patch.model_dump(exclude_none=True)
        if not changes:
            raise ApiError("PATCH /machine-config needs at least one of vcpu_count, mem_size_mib, smt, "
                           "track_dirty_pages")
        self.machine_config = self.machine_config.model_copy(update=changes)

    def _put_boot_source(self, action: PutBootSource) -> None:
        self._before_start("setting the boot source")
        for path, what in ((action.boot_source.kernel_image_path, "kernel_image_path"),
                           (action.boot_source.initrd_path, "initrd_path")):
            if path is not None:
                _check_file(path, what)
        self.boot_source = action.boot_source

    def _put_drive(self, action: PutDrive) -> None:
        self._before_start("adding or replacing a drive")
        drive = action.drive
        _check_file(drive.path_on_host, "path_on_host")
        if drive.is_root_device and any(d.is_root_device for k, d in self.drives.items() if k != drive.drive_id):
            raise ApiError(f"drive {drive.drive_id} cannot be the root device: another drive already is")
        self.drives[drive.drive_id] = drive

    def _patch_drive(self, action: PatchDrive) -> None:
        drive = self.drives.get(action.drive.drive_id)
        if drive is None:
            raise ApiError(f"there is no drive {action.drive.drive_id!r} to update")
        path = action.drive.path_on_host
        if path is None:
            return
        _check_file(path, "path_on_host")
        if self.state != NOT_STARTED:
            # After start: swap the running virtio-blk's image; the guest sees the new size through a
            # configuration-change interrupt (raised at resume if the microVM is paused).
            device = self._block_device(drive.drive_id)
            try:
                device.swap(path)
            except OSError as e:
                mode = "read-only" if drive.is_read_only else "read-write"
                raise ApiError(f"path_on_host {path}: cannot open it {mode}, as drive {drive.drive_id} is: "
                               f"{e.strerror}") from None
        self.drives[drive.drive_id] = drive.model_copy(update={"path_on_host": path})

    def _block_device(self, drive_id: str):
        """The virtio-blk device of drive ``drive_id`` of the running machine (drives are placed root first,
        then in the order they were put)."""
        blocks = _block_devices(self.machine)
        order = [d.drive_id for d in _root_first(self.drives.values())]
        if len(blocks) != len(order) or drive_id not in order:
            raise ApiError(f"drive {drive_id} is not a drive pykvm can update in this microVM (it was not "
                           "configured through this API before InstanceStart)")
        return blocks[order.index(drive_id)]

    def _put_network_interface(self, action: PutNetworkInterface) -> None:
        self._before_start("adding or replacing a network interface")
        iface = action.interface
        if any(n.host_dev_name == iface.host_dev_name for k, n in self.network_interfaces.items()
               if k != iface.iface_id):
            raise ApiError(f"the TAP {iface.host_dev_name} is already the host end of another interface")
        from ..devices.tap import check_name
        from ..devices.virtio import parse_mac
        check_name(iface.host_dev_name)   # a name no interface can have is refused here, not at InstanceStart
        if iface.guest_mac is not None:
            parse_mac(iface.guest_mac)    # so is a multicast or all-zero MAC
        self.network_interfaces[iface.iface_id] = iface

    def _put_entropy(self, action: PutEntropy) -> None:
        self._before_start("adding the entropy device")
        self.entropy = action.entropy

    def _put_logger(self, action: PutLogger) -> None:
        self._log_file = _open_append(action.logger.log_path, "log_path")
        self.logger = action.logger

    def _put_metrics(self, action: PutMetrics) -> None:
        self._metrics_file = _open_append(action.metrics.metrics_path, "metrics_path")
        self.metrics = action.metrics

    def _flush_metrics(self, action: FlushMetrics) -> None:
        f = getattr(self, "_metrics_file", None)
        if f is None:
            raise ApiError("FlushMetrics needs a metrics file: PUT /metrics first")
        record = {"utc_timestamp_ms": int(time.time() * 1000), "state": self.state,
                  "exits": self.stats() if self.machine is not None else None}
        f.write(json.dumps(record) + "\n")
        f.flush()

    # --- start ----------------------------------------------------------------------------------------------
    def _start(self, action: StartInstance) -> None:
        self._before_start("InstanceStart")
        if self.boot_source is None:
            raise ApiError("InstanceStart needs a kernel: PUT /boot-source with kernel_image_path first")
        from ..boot.detect import load_kernel
        from ..boot.linux import linux_quirks
        from ..devices.virtio import DriveSpec, NetSpec, attach_virtio, linux_cmdline, parse_mac
        from ..kvm.host import host_backend
        from ..machine import Machine
        from ..snapshot import machine_state
        mem = self.machine_config.mem_size_mib << 20
        cpus = self.machine_config.vcpu_count
        source = self.boot_source
        kernel = _read_file(source.kernel_image_path, "kernel_image_path", mem)
        initrd = _read_file(source.initrd_path, "initrd_path", mem) if source.initrd_path else b""
        drives = [DriveSpec(d.path_on_host, d.is_read_only) for d in _root_first(self.drives.values())]
        rng = self.entropy is not None
        nets = [NetSpec(n.host_dev_name, parse_mac(n.guest_mac) if n.guest_mac else None)
                for n in self.network_interfaces.values()]
        quirks = " ".join([*linux_cmdline(drives, rng, False, nets=nets), linux_quirks(host_backend())]).strip()
        boot_args = DEFAULT_BOOT_ARGS if source.boot_args is None else source.boot_args
        plan = load_kernel(kernel, mem, name=source.kernel_image_path, cmdline=boot_args, initrd=initrd,
                           linux_quirks=quirks)
        machine = Machine(mem_size=mem, cpus=cpus, irqchip=plan.irqchip or cpus > 1, serial_out=self.serial)
        try:
            attach_virtio(machine, drives, rng, False, nets=nets)
            machine.load(plan)
            if self.machine_config.track_dirty_pages:
                machine_state.start_dirty_tracking(machine)
                self.track_dirty_pages = True
        except BaseException:
            machine.close()
            raise
        self.machine = machine
        self.state = RUNNING
        self._ready.set()

    def _ctrl_alt_del(self, action: SendCtrlAltDel) -> None:
        if self.machine is None or self.state != RUNNING:
            raise ApiError(f"SendCtrlAltDel needs a running microVM; it is {self.state.lower()}")
        from ..snapshot.machine_state import devices
        for device in devices(self.machine).values():
            if hasattr(device, "send_ctrl_alt_del"):
                if self.machine.irqchip and device.keyboard_irq is None:
                    from ..kvm.irq import KvmIrqLine
                    device.keyboard_irq = KvmIrqLine(self.machine.vm, 1)   # the PC's keyboard interrupt
                device.send_ctrl_alt_del()
                return
        raise ApiError("this microVM has no i8042 keyboard controller to send Ctrl+Alt+Del through")

    # --- pause and resume ----------------------------------------------------------------------------------
    def _pause(self, action: Pause) -> None:
        if self.machine is None:
            raise ApiError("the microVM has not started, so it cannot be paused: PUT /actions InstanceStart first")
        if self.state == PAUSED:
            return
        if not self.machine.pause(timeout=PAUSE_TIMEOUT):
            self.machine.resume()
            raise ApiError(f"the microVM's vCPUs did not all leave KVM_RUN, or its device threads did not all "
                           f"stop, within {PAUSE_TIMEOUT:g} s; it runs on")
        self.state = PAUSED

    def _resume(self, action: Resume) -> None:
        if self.machine is None:
            raise ApiError("the microVM has not started, so it cannot be resumed")
        if self.state == RUNNING:
            return
        self.machine.resume()
        self.state = RUNNING

    # --- snapshots -----------------------------------------------------------------------------------------
    def _create_snapshot(self, action: CreateSnapshot) -> dict:
        from ..snapshot import machine_state, write_state
        if self.state != PAUSED:
            raise ApiError(f"a snapshot needs a paused microVM; it is {self.state.lower()}: "
                           'PATCH /vm {"state": "Paused"} first')
        params = action.params
        diff = params.snapshot_type == models.SnapshotType.Diff
        if diff and not self.track_dirty_pages:
            raise ApiError('a "Diff" snapshot needs dirty-page tracking: set track_dirty_pages in '
                           "/machine-config before InstanceStart (or in /snapshot/load)")
        for path, what in ((params.mem_file_path, "mem_file_path"), (params.snapshot_path, "snapshot_path")):
            _check_output_path(path, what)
        if os.path.realpath(params.mem_file_path) == os.path.realpath(params.snapshot_path):
            raise ApiError(f"mem_file_path and snapshot_path name the same file ({params.snapshot_path}): "
                           "give the memory and the state two files")
        source = self.boot_source
        files = [p for p in (source.kernel_image_path, source.initrd_path) if p] if source is not None else []
        state = machine_state.capture(self.machine, files=files)
        state["snapshot_type"] = params.snapshot_type.value
        if self.drives:      # their API names, so that a restored VM's drives can be PATCHed by drive_id
            state["api_drives"] = [d.model_dump(exclude_none=True) for d in _root_first(self.drives.values())]
        t0 = time.perf_counter()
        written = machine_state.write_memory(self.machine, params.mem_file_path, diff)
        if self.track_dirty_pages and not diff:
            machine_state.dirty_pages(self.machine.memory, self.machine.vm)   # a diff counts from here
        size = write_state(params.snapshot_path, state)
        return {"memory_bytes_written": written, "state_bytes": size, "seconds": time.perf_counter() - t0,
                "unsaved_devices": machine_state.unsaved(state["devices"])}

    def _load_snapshot(self, action: LoadSnapshot) -> None:
        from ..machine import Machine
        from ..snapshot import machine_state, read_state
        self._before_start("loading a snapshot")
        params = action.params
        if (params.mem_backend is None) == (params.mem_file_path is None):
            raise ApiError("give the guest memory as exactly one of mem_backend (backend_type File) or "
                           "mem_file_path")
        mem_path = params.mem_backend.backend_path if params.mem_backend else params.mem_file_path
        state = read_state(params.snapshot_path)
        config = machine_state.check_config(state)
        machine = Machine(mem_size=config["mem_size"], cpus=config["vcpu_count"], irqchip=config["irqchip"],
                          serial_out=self.serial)
        try:
            track = params.track_dirty_pages or params.enable_diff_snapshots
            machine_state.restore(machine, state, mem_path, track_dirty_pages=track)
            if not params.resume_vm:
                machine.pause()      # the vCPUs will hold before their first KVM_RUN
        except BaseException:
            machine.close()
            raise
        self.track_dirty_pages = track
        self.drives = _recorded_drives(state.get("api_drives"), machine)
        self.machine = machine
        self.machine_config = models.MachineConfiguration(vcpu_count=config["vcpu_count"],
                                                          mem_size_mib=config["mem_size"] >> 20,
                                                          track_dirty_pages=track)
        self.state = RUNNING if params.resume_vm else PAUSED
        self._ready.set()


def _block_devices(machine) -> list:
    """The machine's virtio-blk devices in placement order (drives are placed first, root drive first)."""
    from ..devices.virtio import Block, VirtioMmio
    if machine is None:
        return []
    transports = sorted((base, d) for base, _, d in machine.mmio.devices() if isinstance(d, VirtioMmio))
    return [t.device for _, t in transports if isinstance(t.device, Block)]


def _recorded_drives(recorded, machine) -> dict:
    """The drives a snapshot recorded under their API names, if they are the restored machine's drives (same
    number, paths and read-only settings, in order); else none (the drives then have no API name)."""
    blocks = _block_devices(machine)
    try:
        drives = [models.Drive(**d) for d in recorded]
    except Exception:     # absent or malformed: a snapshot not taken over the API
        return {}
    if len(drives) != len(blocks) or any(d.path_on_host != b.path or d.is_read_only is not b.readonly
                                         for d, b in zip(drives, blocks, strict=True)):
        return {}
    return {d.drive_id: d for d in drives}


def _root_first(drives):
    drives = list(drives)
    return [d for d in drives if d.is_root_device] + [d for d in drives if not d.is_root_device]


def _host_refused(e: Exception) -> str:
    """One sentence for an OSError or ValueError a request's path or value caused (e.g. ENOSPC on a
    metrics file, a NUL byte in a path): the request was bad, not the VMM."""
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        return f"the host refused the request: {e.strerror or e}{where}"
    return f"the request cannot be carried out: {e}"


def _check_output_path(path: str, what: str) -> None:
    """A file a snapshot will (re)write: its directory must exist, and whatever is there already must
    be a regular file (the file is written under a temporary name and renamed over the target, which
    would replace a device node, a FIFO or a directory)."""
    if "\0" in path:
        raise ApiError(f"{what} contains a NUL byte")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ApiError(f"{what} {path}: the directory {parent} does not exist")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ApiError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ApiError(f"{what} {path} exists and is not a regular file: a snapshot replaces only regular files")


def _check_file(path: str, what: str) -> None:
    try:
        info = os.stat(path)
    except OSError as e:
        raise ApiError(f"{what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ApiError(f"{what} {path} is not a regular file")


def _read_file(path: str, what: str, limit: int) -> bytes:
    _check_file(path, what)
    if os.path.getsize(path) > limit:
        raise ApiError(f"{what} {path} is larger than the guest's {limit >> 20} MiB of RAM: raise mem_size_mib")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ApiError(f"cannot read {what} {path}: {e.strerror}") from None


def _open_append(path: str, what: str):
    """``path`` opened to append lines (PUT /logger, /metrics); ApiError if it cannot be. Firecracker takes a
    named pipe there too: it is opened without waiting for a reader (O_NONBLOCK; a plain open(2) for writing
    blocks until one comes, and the controller thread with it, so every later action timed out), and refused
    with ENXIO when nobody reads it. Writes stay non-blocking: a pipe nobody empties loses lines, never
    holds the controller."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise ApiError(f"cannot open {what} {path}: it is a named pipe (FIFO) that nobody reads; start its "
                           "reader first") from None
        raise ApiError(f"cannot open {what} {path}: {e.strerror}") from None
    return os.fdopen(fd, "a", buffering=1)
