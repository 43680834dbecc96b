"""The lifecycle of VMs, between the routes and the store (issue 12, parts 2, 3 and 5).

What ``docker`` users know from containers: created -> running <-> paused -> exited, restart, rm.
Each running VM is a shim process (see :mod:`pykvm.engine.shim`) that the daemon watches through a
pidfd; a daemon started later re-adopts the shims still alive (same pid *and* same start time, so a
recycled pid is never taken for one) and marks the VMs whose shim is gone with the exit status it
left in ``exit.json``. Every path a request names is opened with its caller's permissions
(:mod:`pykvm.engine.access`). The memory budget refuses a start that would over-commit (409).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path

from .. import __version__
from ..errors import UsageError
from . import logs, network
from .access import Caller, Forbidden, open_as
from .store import BadRequest, Conflict, NotFound, Store, Vm, check_name, new_id
from .vmm import VmmApi, VmmError, has_jail, has_vmm_api, jailed_argv, restore_argv, vmm_argv
from .zygote import ZygoteClient, ZygoteError

log = logging.getLogger("pykvm.engine")

VMM_OVERHEAD_MIB = 64           # host memory a VMM process needs beyond guest RAM (charged to the budget)
RESERVE_MIB = 256               # what the default budget leaves to the host
DIR_DIGITS = 16                 # hex digits of the id naming a VM's directory
MAX_ATTACH = 8                  # console sessions at once per VM (each holds sockets until it ends)


class NotModified(Exception):
    """Nothing to do (HTTP 304, as Docker answers stopping a stopped container)."""


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks since boot), None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[19])


def charge(vm: Vm) -> int:
    return (int(vm.spec.get("MemoryMiB", 64)) + VMM_OVERHEAD_MIB) << 20


class Backend:
    """Every operation the API offers, on the records of ``store``."""

    def __init__(self, state_dir: Path, memory_budget: int | None = None, jail: bool = True,
                 bridge: network.Bridge | None = None) -> None:
        """``jail``: start every VMM jailed (issue 13, part 4) -- possible only as root with
        pykvm.jail installed; otherwise, and with ``--no-jail``, VMMs run unjailed and the log says so."""
        self.state_dir = state_dir
        self.jail = jail and has_jail() and os.geteuid() == 0
        if self.jail:
            from ..jail import seccomp
            missing = seccomp.available()
            if missing is not None:     # else every VM would start, and end at once with status 2
                raise UsageError("as root the daemon jails every VMM, and the jail's seccomp filter cannot be "
                                 f"built here: {missing.split(';')[0]}. Install it (pip install 'pykvm[jail]', "
                                 "and the libseccomp2 package), or start the daemon with --no-jail")
            log.info("VMMs run jailed (pykvm.jail): own namespaces, cgroup, root directory, uid and seccomp filter")
        elif not jail:
            log.warning("--no-jail: VMMs run unjailed, with the daemon's privileges (root: %s)", os.geteuid() == 0)
        else:
            log.warning("VMMs run unjailed: %s", "pykvm.jail is not installed" if not has_jail() else
                        "jailing needs root (namespaces, cgroups, setuid)")
        self.jail_base = state_dir / "jail"
        self.bridge = bridge or network.Bridge()
        self.bridge_ready = False
        self.vms_dir = state_dir / "vms"
        self.vms_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.store = Store(state_dir / "pykvm.db")
        self.memory_budget = memory_budget
        self.subscribers: set[asyncio.Queue] = set()
        self.exited: dict[str, asyncio.Event] = {}
        self.pidfds: dict[str, int] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.started = time.time()
        self._list_key: tuple = ()
        self._list_cache: dict[tuple, bytes] = {}
        self.zygote = ZygoteClient(state_dir)     # forks every shim and VMM (see pykvm.engine.zygote)
        self.attached: dict[str, int] = {}       # VM id -> console sessions open (at most MAX_ATTACH)

    # -- start-up and shut-down -----------------------------------------------------------------
    async def adopt(self) -> None:
        """Re-adopt the VMs whose shims outlived a previous daemon; mark the others with how they ended.
        Reconnect to the zygote, or start one."""
        try:
            self.zygote.ensure()
        except ZygoteError as e:
            log.warning("%s: it is started again on the first VM start", e)
        running = 0
        for vm in self.store.all():
            self.bridge.learn(self.vmdir(vm.id))
            if vm.state not in ("running", "paused"):
                continue
            if vm.shim_pid and proc_start_time(vm.shim_pid) == vm.shim_start and self._watch(vm):
                running += charge(vm)
                log.info("re-adopted %s (%s), shim pid %d", vm.name, vm.id[:12], vm.shim_pid)
            else:
                self._finished(vm)
        if self.memory_budget is None:
            self.memory_budget = max(0, mem_available() + running - (RESERVE_MIB << 20))

    def close(self) -> None:
        """Stop watching (the VMs keep running) and close the database."""
        loop = asyncio.get_event_loop()
        for fd in self.pidfds.values():
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
            os.close(fd)
        self.pidfds.clear()
        self.store.close()

    def vmdir(self, vm_id: str) -> Path:
        """A VM's directory: ``vms/`` + the first 16 hex digits of its id (unique: see ``create``), short
        enough that the sockets in it stay under the 108 bytes of sun_path (unix(7))."""
        return self.vms_dir / vm_id[:DIR_DIGITS]

    # -- events ---------------------------------------------------------------------------------
    def event(self, action: str, vm: Vm, **extra) -> None:
        attributes = {"name": vm.name, "image": _image(vm.spec), "uid": str(vm.owner_uid),
                      **{k: str(v) for k, v in extra.items()}}
        ev = self.store.add_event(action, vm.id, attributes)
        for queue in list(self.subscribers):
            if queue.qsize() < 10000:
                queue.put_nowait(ev)

    async def events(self, since: float | None, until: float | None, filters: dict,
                     caller: Caller | None = None) -> AsyncIterator[dict]:
        """Past events from ``since`` then, unless ``until`` is given, new ones as they happen. A non-root
        ``caller`` gets only the events of its own VMs (the owner's uid is each event's ``uid`` attribute)."""
        if caller is not None and not caller.is_root:
            filters = {**filters, "uid": [str(caller.uid)]}
        queue: asyncio.Queue = asyncio.Queue()
        self.subscribers.add(queue)
        try:
            last = 0
            if since is not None:
                for ev in self.store.events(since, until):
                    last = ev["seq"]
                    if _event_matches(ev, filters):
                        yield ev
            if until is not None and until <= time.time():
                return
            while True:
                timeout = None if until is None else min(max(0.0, until - time.time()), 86400.0)
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout)
                except asyncio.TimeoutError:
                    return
                if ev["seq"] > last and _event_matches(ev, filters):
                    yield ev
        finally:
            self.subscribers.discard(queue)

    # -- the VM records -------------------------------------------------------------------------
    def lookup(self, ref: str) -> Vm:
        return self.store.lookup(ref)

    def check_files(self, caller: Caller, spec: dict) -> None:
        """Forbidden / BadRequest unless ``caller`` may open every file ``spec`` names (blocking: it forks)."""
        for fd in self._open_files(caller, spec).values():
            os.close(fd)

    def create(self, caller: Caller, spec: dict, name: str | None) -> Vm:
        """Record a new VM (call ``check_files`` first). Returns it. Runs on the event loop's thread, the
        only one that uses the database."""
        name = check_name(name) if name else self.store.free_name()
        vm_id = new_id()
        while self.vmdir(vm_id).exists():     # 2**-64 odds, but a shared directory would mix two VMs
            vm_id = new_id()
        vm = Vm(id=vm_id, name=name, spec=spec, state="created", created=time.time(), owner_uid=caller.uid,
                owner_gid=caller.gid, owner_groups=list(caller.groups))
        vmdir = self.vmdir(vm.id)
        vmdir.mkdir(mode=0o700)
        try:
            if spec.get("Network"):
                self._attach_network(vm.id, vmdir)
            self.store.insert(vm)       # refuses a name in use: the TAP and address just taken are freed below
        except BaseException:
            self.bridge.detach(vmdir)
            shutil.rmtree(vmdir, ignore_errors=True)
            raise
        self.event("create", vm)
        return vm

    def _attach_network(self, vm_id: str, vmdir: Path) -> None:
        """A TAP on the daemon's bridge and an address (the bridge is made on the first VM that asks, so
        a daemon whose VMs have no network never touches the host's links)."""
        if os.geteuid() != 0:
            raise BadRequest("a VM on the daemon's bridge needs a daemon running as root (bridges and TAPs)")
        try:
            if not self.bridge_ready:
                self.bridge.setup()
                self.bridge_ready = True
            settings = self.bridge.attach(vm_id, vmdir)
        except network.NetworkError as e:
            raise Conflict(str(e)) from None
        log.info("VM %s: TAP %s on %s, address %s", vm_id[:12], settings["Tap"], settings["Bridge"],
                 settings["IPAddress"])

    def _open_files(self, owner: Caller, spec: dict) -> dict[str, int]:
        """Every host file the spec names, opened as ``owner``: {"kernel": fd, "drive0": fd, ...}."""
        wanted = []
        for key, what in (("Kernel", "kernel"), ("Initrd", "initrd"), ("ImageFile", "image")):
            if spec.get(key):
                wanted.append((what, spec[key], os.O_RDONLY))
        for n, drive in enumerate(spec.get("Drives") or []):
            wanted.append((f"drive{n}", drive["PathOnHost"], os.O_RDONLY if drive.get("ReadOnly") else os.O_RDWR))
        fds: dict[str, int] = {}
        try:
            for what, path, flags in wanted:
                if not os.path.isabs(path):
                    raise BadRequest(f"{what} path {path!r} must be absolute (the daemon has no working directory "
                                     "of yours)")
                try:
                    fds[what] = open_as(owner, path, flags | os.O_NONBLOCK, what.rstrip("0123456789"))
                except Forbidden:
                    raise
                except OSError as e:
                    raise BadRequest(e.strerror or str(e)) from None
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return fds

    def inspect(self, vm: Vm) -> dict:
        """The Engine API's container JSON, for a VM."""
        return {
            "Id": vm.id, "Name": "/" + vm.name, "Created": logs.rfc3339(vm.created),
            "State": {"Status": vm.state, "Running": vm.state in ("running", "paused"), "Paused": vm.state == "paused",
                      "Dead": vm.state == "dead", "Pid": vm.vmm_pid or 0, "ShimPid": vm.shim_pid or 0,
                      "ExitCode": vm.exit_code or 0, "Error": vm.error,
                      "StartedAt": logs.rfc3339(vm.started_at) if vm.started_at else "",
                      "FinishedAt": logs.rfc3339(vm.finished_at) if vm.finished_at else ""},
            "Config": vm.spec, "Image": _image(vm.spec), "RestartCount": vm.restart_count,
            "HostConfig": {"Memory": vm.mem_bytes, "NanoCpus": int(vm.spec.get("Vcpus", 1)) * 10**9},
            "LogPath": str(self.vmdir(vm.id) / "console.log"), "ApiSocket": vm.api_sock or "",
            "Owner": {"Uid": vm.owner_uid, "Gid": vm.owner_gid},
            "Jail": self._jail_info(vm),
            "NetworkSettings": network.load(self.vmdir(vm.id)) or {},
        }

    def _jail_info(self, vm: Vm) -> dict:
        """Whether ``vm``'s VMM runs jailed, and as which uid/gid and host pid (``jail.json``, written by
        :mod:`pykvm.engine.jailrun` before the VMM enters its jail)."""
        if vm.state not in ("running", "paused"):
            return {"Jailed": False}
        try:
            record = json.loads((self.vmdir(vm.id) / "jail.json").read_text())
            return {"Jailed": True, "Uid": int(record["Uid"]), "Gid": int(record["Gid"]), "Pid": int(record["Pid"]),
                    "Id": str(record["Id"]), "Root": str(record["Root"])}
        except (OSError, ValueError, KeyError, TypeError):
            return {"Jailed": False}

    def summary(self, vm: Vm) -> dict:
        """One entry of ``GET /vms/json`` (Docker's container list shape)."""
        return {"Id": vm.id, "Names": ["/" + vm.name], "Image": _image(vm.spec), "Command": vm.spec.get("Cmdline", ""),
                "Created": int(vm.created), "State": vm.state, "Status": _status_text(vm),
                "Memory": vm.mem_bytes, "Vcpus": int(vm.spec.get("Vcpus", 1)), "Pid": vm.vmm_pid or 0}

    def list(self, all_: bool, filters: dict) -> list[dict]:
        out = []
        for vm in self.store.all():
            if not all_ and vm.state not in ("running", "paused") and "status" not in filters:
                continue
            if _vm_matches(vm, filters):
                out.append(self.summary(vm))
        return out

    def list_json(self, all_: bool, uid: int | None) -> bytes:
        """``GET /vms/json``'s body without filters, as JSON bytes: every VM (``uid`` None) or those of
        ``uid``. Served from memory: rebuilt only when a record changed (``Store.version``) or the second
        turned (the Status texts count seconds), so concurrent ``ps`` calls cost no query and no encoding."""
        key = (self.store.version, int(time.time()))
        if self._list_key != key:
            self._list_key, self._list_cache = key, {}
        body = self._list_cache.get((all_, uid))
        if body is None:
            out = [self.summary(vm) for vm in self.store.all()
                   if (all_ or vm.state in ("running", "paused")) and (uid is None or vm.owner_uid == uid)]
            body = json.dumps(out, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
            self._list_cache[(all_, uid)] = body
        return body

    def info(self) -> dict:
        from ..kvm.host import host_backend
        vms = self.store.all()
        counts = {s: sum(1 for v in vms if v.state == s) for s in ("running", "paused", "exited", "created")}
        return {"ID": "pykvm", "VMs": len(vms), "VMsRunning": counts["running"], "VMsPaused": counts["paused"],
                "VMsStopped": counts["exited"] + counts["created"], "KvmBackend": host_backend(),
                "MemoryBudget": self.memory_budget, "MemoryCommitted": self.committed(),
                "VmmOverhead": VMM_OVERHEAD_MIB << 20, "DockerRootDir": str(self.state_dir),
                "ServerVersion": __version__, "VmmApi": has_vmm_api(), "NCPU": os.cpu_count(),
                "MemTotal": _meminfo("MemTotal")}

    def committed(self) -> int:
        """Bytes of the budget held by running and paused VMs (guest RAM + VMM overhead each)."""
        return sum(charge(v) for v in self.store.all() if v.state in ("running", "paused"))

    # -- lifecycle ------------------------------------------------------------------------------
    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self.locks.setdefault(vm_id, asyncio.Lock())

    async def start(self, ref: str) -> Vm:
        vm = self.lookup(ref)
        async with self._lock(vm.id):
            vm = self.store.get(vm.id)
            if vm.state in ("running", "paused"):
                raise Conflict(f"VM {vm.name} is already {vm.state}")
            need = charge(vm)
            if self.committed() + need > (self.memory_budget or 0):
                raise Conflict(f"starting VM {vm.name} needs {need >> 20} MiB ({vm.mem_bytes >> 20} MiB of guest RAM "
                               f"+ {VMM_OVERHEAD_MIB} MiB for its VMM), but only "
                               f"{max(0, (self.memory_budget or 0) - self.committed()) >> 20} MiB of the daemon's "
                               f"{(self.memory_budget or 0) >> 20} MiB memory budget is free: stop a VM or raise "
                               "--memory-budget")
            owner = Caller(0, vm.owner_uid, vm.owner_gid, tuple(vm.owner_groups))
            fds = self._open_files(owner, vm.spec)
            vmdir = self.vmdir(vm.id)
            vmdir.mkdir(mode=0o700, exist_ok=True)
            restoring = bool(vm.spec.get("FromSnapshot"))
            # A jailed VMM serves its API socket too: bound before its jail, published once it is in (pykvm.jail)
            jailed = self.jail
            api_sock = vmdir / "api.sock" if has_vmm_api() else None
            if restoring and api_sock is None:
                for fd in fds.values():
                    os.close(fd)
                raise Conflict("this pykvm has no per-VM API, so it cannot restore a snapshot")
            if api_sock is not None:
                api_sock.unlink(missing_ok=True)
            if jailed and restoring:     # loaded before the jail, from the daemon's own copy (adopt_snapshot)
                try:
                    for name in ("state", "mem"):
                        fds[name] = os.open(vmdir / "snapshot" / name, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    for fd in fds.values():
                        os.close(fd)
                    raise Conflict(f"VM {vm.name}'s snapshot files cannot be opened: {e.strerror}") from None
                argv = restore_argv(f"/proc/self/fd/{fds['state']}", f"/proc/self/fd/{fds['mem']}", api_sock)
            else:
                argv = vmm_argv(vm.spec, {k: f"/proc/self/fd/{fd}" for k, fd in fds.items()}, api_sock,
                                network.load(vmdir) if vm.spec.get("Network") else None)
            if jailed:
                argv = jailed_argv(argv, vmdir, self.jail_base)
            try:
                shim_pid, pidfd = self.zygote.start_shim(vmdir, argv, list(fds.values()))
            except ZygoteError as e:
                raise Conflict(f"cannot start VM {vm.name}: {e}") from None
            finally:
                for fd in fds.values():
                    os.close(fd)
            now = time.time()
            self.store.update(vm.id, state="running", shim_pid=shim_pid, shim_start=proc_start_time(shim_pid),
                              started_at=now, finished_at=None, exit_code=None, error="",
                              api_sock=str(api_sock) if api_sock else None, vmm_pid=None)
            vm = self.store.get(vm.id)
            self._watch(vm, pidfd)
            vmm_pid = await self._vmm_pid(vm)
            if vmm_pid:
                self.store.update(vm.id, vmm_pid=vmm_pid)
            if restoring and not jailed:
                await self._restore(self.store.get(vm.id))
            elif api_sock is not None:
                await self._api_ready(self.store.get(vm.id))
            vm = self.store.get(vm.id)
            self.event("start", vm)
            return vm

    async def _vmm_pid(self, vm: Vm, wait: float = 5.0) -> int | None:
        path = self.vmdir(vm.id) / "vmm.pid"
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                return int(json.loads(path.read_text())["pid"])
            except (OSError, ValueError, KeyError):
                if self._exit_event(vm.id).is_set():
                    return None
                await asyncio.sleep(0.005)
        return None

    def _exit_event(self, vm_id: str) -> asyncio.Event:
        return self.exited.setdefault(vm_id, asyncio.Event())

    def _watch(self, vm: Vm, fd: int | None = None) -> bool:
        """Learn when ``vm``'s shim ends (its pidfd, ``fd`` or pidfd_open(2), becomes readable); False if
        it is gone."""
        if fd is None:
            try:
                fd = os.pidfd_open(vm.shim_pid)
            except OSError:
                return False
        self.pidfds[vm.id] = fd
        self._exit_event(vm.id).clear()
        asyncio.get_event_loop().add_reader(fd, self._shim_ended, vm.id)
        return True

    def _shim_ended(self, vm_id: str) -> None:
        fd = self.pidfds.pop(vm_id, None)
        if fd is not None:
            asyncio.get_event_loop().remove_reader(fd)
            os.close(fd)
        try:
            vm = self.store.get(vm_id)
        except NotFound:
            return
        self._finished(vm)

    def _finished(self, vm: Vm) -> None:
        """Record how ``vm`` ended, from the ``exit.json`` its shim wrote."""
        try:
            record = json.loads((self.vmdir(vm.id) / "exit.json").read_text())
            code, finished, error = int(record["ExitCode"]), float(record["FinishedAt"]), record.get("Error", "")
            state = "exited"
        except (OSError, ValueError, KeyError, TypeError):
            code, finished, state = 255, time.time(), "dead"
            error = "the VM's shim ended without recording the VMM's exit status"
        self.store.update(vm.id, state=state, exit_code=code, finished_at=finished, error=error, vmm_pid=None,
                          shim_pid=None, shim_start=None)
        self.event("die", vm, exitCode=code)
        self._exit_event(vm.id).set()

    def _signal(self, vm: Vm, signum: int) -> None:
        """Send ``signum`` to the VMM (its pid cannot be recycled while its shim, its parent, is alive).
        A jailed VMM's shim child is jailrun, the jail's supervisor: it turns other signals into a kill
        of the jailed process and cleans up, but SIGKILL cannot be caught, so SIGKILL goes to the
        jailed process itself (``jail.json``; its parent, the supervisor, reaps it and cleans up)."""
        pid = vm.vmm_pid
        if not pid:
            with contextlib.suppress(OSError, ValueError, KeyError):
                pid = int(json.loads((self.vmdir(vm.id) / "vmm.pid").read_text())["pid"])
        if pid and signum == signal.SIGKILL and vm.id in self.pidfds:
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                jailed = int(json.loads((self.vmdir(vm.id) / "jail.json").read_text())["Pid"])
                if _parent_of(jailed) == pid:       # still the supervisor's child: not a recycled pid
                    pid = jailed
        if pid and vm.id in self.pidfds:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        elif vm.shim_pid and vm.id in self.pidfds:
            os.pidfd_send_signal(self.pidfds[vm.id], signum)

    async def _wait_exit(self, vm: Vm, timeout: float | None) -> bool:
        event = self._exit_event(vm.id)
        if vm.id not in self.pidfds:
            return True
        try:
            await asyncio.wait_for(event.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self, ref: str, timeout: float = 10.0) -> Vm:
        """Ask the guest to shut down (SendCtrlAltDel through the VMM's API; SIGTERM to a VMM without one),
        and SIGKILL the VMM if it has not ended after ``timeout`` seconds."""
        vm = self.lookup(ref)
        if vm.state not in ("running", "paused"):
            raise NotModified()
        self.event("kill", vm, signal="SIGTERM")
        asked = False
        if vm.api_sock and vm.state == "running":
            with contextlib.suppress(VmmError):
                await VmmApi(vm.api_sock).call("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
                asked = True
        if not asked:
            self._signal(vm, signal.SIGTERM)
        if not await self._wait_exit(vm, timeout):
            self._signal(vm, signal.SIGKILL)
            await self._wait_exit(vm, 30)
        vm = self.store.get(vm.id)
        self.event("stop", vm)
        return vm

    async def kill(self, ref: str, signame: str = "SIGKILL") -> Vm:
        vm = self.lookup(ref)
        signum = _parse_signal(signame)
        if vm.state not in ("running", "paused") or vm.id not in self.pidfds:
            raise Conflict(f"VM {vm.name} is not running")
        self.event("kill", vm, signal=signal.Signals(signum).name)
        self._signal(vm, signum)
        if signum == signal.SIGKILL:
            await self._wait_exit(vm, 30)
        return self.store.get(vm.id)

    async def restart(self, ref: str, timeout: float = 10.0) -> Vm:
        vm = self.lookup(ref)
        with contextlib.suppress(NotModified):
            await self.stop(vm.id, timeout)
        vm = await self.start(vm.id)
        self.store.update(vm.id, restart_count=vm.restart_count + 1)
        self.event("restart", vm)
        return self.store.get(vm.id)

    async def pause(self, ref: str, paused: bool) -> Vm:
        """PATCH /vm {"state": "Paused" | "Resumed"} on the VMM's API (Firecracker's pause)."""
        vm = self.lookup(ref)
        want_from = "running" if paused else "paused"
        if vm.state != want_from:
            raise Conflict(f"VM {vm.name} is {vm.state}, not {want_from}")
        if not vm.api_sock:
            raise Conflict(f"VM {vm.name}'s VMM has no API socket (this pykvm has no per-VM API), so it cannot be "
                           "paused")
        try:
            await VmmApi(vm.api_sock).call("PATCH", "/vm", {"state": "Paused" if paused else "Resumed"})
        except VmmError as e:
            raise Conflict(str(e)) from None
        self.store.update(vm.id, state="paused" if paused else "running")
        vm = self.store.get(vm.id)
        self.event("pause" if paused else "unpause", vm)
        return vm

    async def remove(self, ref: str, force: bool) -> None:
        vm = self.lookup(ref)
        if vm.state in ("running", "paused"):
            if not force:
                raise Conflict(f"you cannot remove a {vm.state} VM {vm.name}: stop it first or use force")
            await self.kill(vm.id)
        async with self._lock(vm.id):
            self.store.delete(vm.id)
            self.bridge.detach(self.vmdir(vm.id))
            shutil.rmtree(self.vmdir(vm.id), ignore_errors=True)
            self.event("destroy", vm)
        self.locks.pop(vm.id, None)
        self.exited.pop(vm.id, None)

    async def snapshot(self, ref: str, name: str) -> dict:
        """A full snapshot of a running or paused VM into its directory (``snapshots/NAME/``): pause,
        PUT /snapshot/create on the VMM's API (Firecracker's), resume if it was running."""
        vm = self.lookup(ref)
        name = check_name(name, "snapshot")
        if vm.state not in ("running", "paused"):
            raise Conflict(f"VM {vm.name} is {vm.state}: only a running or paused VM can be snapshotted")
        if not vm.api_sock:
            raise Conflict(f"VM {vm.name}'s VMM has no API socket, so it cannot be snapshotted")
        where = self.vmdir(vm.id) / "snapshots" / name
        if where.exists():
            raise Conflict(f"VM {vm.name} already has a snapshot named {name}")
        where.mkdir(parents=True, mode=0o700)
        api = vm.api_sock
        jail = self._jail_info(vm)
        # A jailed VMM sees only its root: it writes to its /run (Root/run on the host), and the files are
        # taken out of the jail once it is done (see _take_out)
        inside = {n: f"/run/snapshot.{n}" for n in ("state", "mem")} if jail["Jailed"] else \
            {n: str(where / n) for n in ("state", "mem")}
        async with self._lock(vm.id):
            try:
                if jail["Jailed"]:
                    for n in inside:
                        _remove_regular(Path(jail["Root"]) / "run" / f"snapshot.{n}")
                if vm.state == "running":
                    await VmmApi(api).call("PATCH", "/vm", {"state": "Paused"})
                await VmmApi(api, timeout=120).call("PUT", "/snapshot/create", {
                    "snapshot_type": "Full", "snapshot_path": inside["state"], "mem_file_path": inside["mem"]})
                if jail["Jailed"]:
                    for n in inside:
                        _take_out(Path(jail["Root"]) / "run" / f"snapshot.{n}", where / n, jail["Uid"])
            except (VmmError, OSError) as e:
                shutil.rmtree(where, ignore_errors=True)
                if jail["Jailed"]:
                    for n in inside:
                        _remove_regular(Path(jail["Root"]) / "run" / f"snapshot.{n}")
                raise Conflict(str(e) if isinstance(e, VmmError) else
                               f"cannot take VM {vm.name}'s snapshot out of its jail: {e}") from None
            finally:
                if vm.state == "running":
                    with contextlib.suppress(VmmError):
                        await VmmApi(api).call("PATCH", "/vm", {"state": "Resumed"})
        self.event("snapshot", vm, snapshot=name)
        return {"Vm": vm.id, "Snapshot": name, "Path": str(where)}

    def snapshot_source(self, caller: Caller, source: dict) -> tuple[Vm, Path]:
        """The VM and directory of ``{"Vm": ref, "Snapshot": name}``, if ``caller`` may read them."""
        vm = self.lookup(str(source.get("Vm", "")))
        if not caller.is_root and caller.uid != vm.owner_uid:
            raise Forbidden(f"VM {vm.name} belongs to uid {vm.owner_uid}, not to you (uid {caller.uid})")
        where = self.vmdir(vm.id) / "snapshots" / check_name(str(source.get("Snapshot", "")), "snapshot")
        if not (where / "state").is_file():
            raise NotFound(f"VM {vm.name} has no snapshot {source.get('Snapshot')}")
        return vm, where

    def adopt_snapshot(self, vm: Vm, where: Path) -> None:
        """Give a VM created from a snapshot its own (hard-linked) copy of the files, so removing the
        source VM does not take them away."""
        mine = self.vmdir(vm.id) / "snapshot"
        mine.mkdir(mode=0o700)
        for name in ("state", "mem"):
            try:
                os.link(where / name, mine / name)
            except OSError:
                shutil.copyfile(where / name, mine / name)

    async def _api_ready(self, vm: Vm, wait: float = 30.0) -> bool:
        """Wait until the VMM's API socket exists (so pause, stats, stop can use it); False if the VM ended
        first or ``wait`` seconds passed."""
        sock = Path(vm.api_sock or "")
        deadline = time.monotonic() + wait
        while not sock.exists():
            if self._exit_event(vm.id).is_set() or time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def _restore(self, vm: Vm) -> None:
        """PUT /snapshot/load on a fresh ``pykvm vmm`` and resume it."""
        mine = self.vmdir(vm.id) / "snapshot"
        sock = Path(vm.api_sock or "")
        if not await self._api_ready(vm):
            raise Conflict(f"VM {vm.name}'s VMM ended or did not open its API socket")
        try:
            await VmmApi(str(sock), timeout=120).call("PUT", "/snapshot/load", {
                "snapshot_path": str(mine / "state"),
                "mem_backend": {"backend_path": str(mine / "mem"), "backend_type": "File"}, "resume_vm": True})
        except VmmError as e:
            self._signal(self.store.get(vm.id), signal.SIGKILL)
            raise Conflict(str(e)) from None

    # -- console --------------------------------------------------------------------------------
    async def logs(self, vm: Vm, follow: bool, tail: int | None, timestamps: bool) -> AsyncIterator[str]:
        """The console output kept for ``vm``; with ``follow``, then what it prints until it ends."""
        path = self.vmdir(vm.id) / "console.log"
        lines = logs.to_lines(logs.read_records(path))
        if tail is not None:
            lines = lines[-tail:] if tail > 0 else []
        yield logs.render(lines, timestamps)
        if not follow:
            return
        try:
            f = open(path, "rb")    # noqa: SIM115
        except FileNotFoundError:
            f = None
        if f is not None:
            f.seek(0, os.SEEK_END)
        pending = b""
        while True:
            ended = self.store.get(vm.id).state not in ("running", "paused")
            if f is None:
                with contextlib.suppress(FileNotFoundError):
                    f = open(path, "rb")  # noqa: SIM115
            if f is not None:
                if os.path.exists(path) and os.stat(path).st_ino != os.fstat(f.fileno()).st_ino:
                    pending += f.read()            # rotated: finish the old file, then the new one
                    f.close()
                    f = open(path, "rb")  # noqa: SIM115
                pending += f.read()
                *done, pending = pending.split(b"\n")
                if done:
                    records = logs.parse(b"\n".join(done))
                    text = logs.render(logs.to_lines(records), timestamps)
                    if text:
                        yield text
            if ended:
                break
            await asyncio.sleep(0.1)
        if f is not None:
            f.close()

    def console_socket(self, vm: Vm) -> Path:
        if vm.state not in ("running", "paused"):
            raise Conflict(f"VM {vm.name} is not running: start it first")
        return self.vmdir(vm.id) / "console.sock"

    @contextlib.contextmanager
    def attach_slot(self, vm: Vm):
        """Hold one of the VM's MAX_ATTACH console sessions for the ``with`` block; Conflict (409) when all
        are taken. A session whose client vanished while the guest was not reading its input cannot
        notice (nothing is read from a client whose input cannot be delivered), so it lasts until the
        guest reads or the VM ends: the cap keeps such sessions from running the daemon out of
        descriptors."""
        if self.attached.get(vm.id, 0) >= MAX_ATTACH:
            raise Conflict(f"VM {vm.name} already has {MAX_ATTACH} console sessions attached: detach one first")
        self.attached[vm.id] = self.attached.get(vm.id, 0) + 1
        try:
            yield
        finally:
            left = self.attached[vm.id] - 1
            if left:
                self.attached[vm.id] = left
            else:
                del self.attached[vm.id]

    # -- statistics -----------------------------------------------------------------------------
    async def stats(self, vm: Vm) -> dict:
        """Host-side use of the VMM process (CPU time, resident and unique memory) and, when the VMM has
        an API, its exit statistics."""
        vm = self.store.get(vm.id)
        out = {"read": logs.rfc3339(time.time()), "id": vm.id, "name": "/" + vm.name, "pid": vm.vmm_pid or 0,
               "cpu_stats": {}, "memory_stats": {}, "exits": None}
        pid = vm.vmm_pid
        if pid and vm.state in ("running", "paused"):
            out["cpu_stats"] = _cpu(pid)
            out["memory_stats"] = _memory(pid)
            out["memory_stats"]["limit"] = vm.mem_bytes
            if vm.api_sock:
                with contextlib.suppress(VmmError):
                    out["exits"] = await VmmApi(vm.api_sock, timeout=2).call("GET", "/pykvm/stats")
        return out


def _take_out(src: Path, dst: Path, uid: int) -> None:
    """Move a file a jailed VMM wrote (``src``, in its root's /run) to ``dst`` in the daemon's own
    directory, owned by root and 0600. Only a regular file with one link, owned by the jail's uid, is
    taken (the VMM can make nothing else there: its filter has no symlink, link or mknod); it is checked
    again where the VMM cannot reach it. OSError otherwise."""
    info = os.lstat(src)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != uid:
        raise OSError(f"{src} is not a regular file of the VMM's")
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        shutil.copyfile(src, dst, follow_symlinks=False)      # another file system: copy, then remove
        os.unlink(src)
    info = os.lstat(dst)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.unlink(dst)
        raise OSError(f"{src} changed while it was taken out of the jail")
    os.chown(dst, 0, 0)        # dst: in the daemon's directory (0700), checked just above
    os.chmod(dst, 0o600)


def _remove_regular(path: Path) -> None:
    """Remove ``path`` if it is a regular file (a stale snapshot file in a jail's /run)."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.lstat(path).st_mode):
            os.unlink(path)


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return {}
    fields = data[data.rindex(b")") + 2:].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"user_ns": int(fields[11]) * 10**9 // ticks, "system_ns": int(fields[12]) * 10**9 // ticks,
            "total_usage_ns": (int(fields[11]) + int(fields[12])) * 10**9 // ticks}


def _memory(pid: int) -> dict:
    """RSS and the unique set size (Private_* of /proc/PID/smaps_rollup), in bytes."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Rss", "Pss", "Private_Clean", "Private_Dirty", "Swap"):
                    out[key.lower()] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return out
    out["usage"] = out.get("rss", 0)
    out["uss"] = out.get("private_clean", 0) + out.get("private_dirty", 0)
    return out


def _parse_signal(name: str) -> int:
    text = str(name).upper()
    if text.isdigit():
        num = int(text)
    else:
        try:
            num = signal.Signals[text if text.startswith("SIG") else "SIG" + text].value
        except KeyError:
            raise BadRequest(f"invalid signal: {name}") from None
    if num not in {s.value for s in signal.Signals}:
        raise BadRequest(f"invalid signal: {name}")
    return num


def _image(spec: dict) -> str:
    return spec.get("Kernel") or spec.get("ImageFile") or spec.get("Image") or "hello-long64"


def _status_text(vm: Vm) -> str:
    now = time.time()
    if vm.state == "running":
        return f"Up {logs.human_duration(now - (vm.started_at or now))}"
    if vm.state == "paused":
        return f"Up {logs.human_duration(now - (vm.started_at or now))} (Paused)"
    if vm.state == "exited":
        return f"Exited ({vm.exit_code}) {logs.human_duration(now - (vm.finished_at or now))} ago"
    return vm.state.capitalize()


def _vm_matches(vm: Vm, filters: dict) -> bool:
    """Docker's list filters: id (prefix), name (substring), status, exited (exit code)."""
    for key, values in filters.items():
        if key == "id" and not any(vm.id.startswith(v) for v in values):
            return False
        if key == "name" and not any(v.lstrip("/") in vm.name for v in values):
            return False
        if key == "status" and vm.state not in values:
            return False
        if key == "exited" and not (vm.state == "exited" and str(vm.exit_code) in values):
            return False
    return True


def _event_matches(ev: dict, filters: dict) -> bool:
    for key, values in filters.items():
        if key in ("vm", "container", "id") and not any(
                ev["id"].startswith(v) or ev["Actor"]["Attributes"].get("name") == v for v in values):
            return False
        if key == "event" and ev["Action"] not in values:
            return False
        if key == "type" and "vm" not in values and "container" not in values:
            return False
        if key == "uid" and ev["Actor"]["Attributes"].get("uid") not in values:
            return False
    return True


FILTER_KEYS = {"id", "name", "status", "exited"}
EVENT_FILTER_KEYS = {"vm", "container", "id", "event", "type"}


def parse_filters(text: str | None, allowed: set[str]) -> dict:
    """Docker's ``filters`` query parameter: JSON ``{"key": ["v", ...]}`` (or ``{"key": {"v": true}}``)."""
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        raise BadRequest("filters must be JSON, e.g. {\"status\": [\"running\"]}") from None
    if not isinstance(data, dict):
        raise BadRequest("filters must be a JSON object")
    out = {}
    for key, values in data.items():
        if key not in allowed:
            raise BadRequest(f"invalid filter '{key}' (known: {', '.join(sorted(allowed))})")
        if isinstance(values, dict):
            values = [k for k, v in values.items() if v]
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise BadRequest(f"filter '{key}' must be a list of strings")
        out[key] = values
    return out


def _parent_of(pid: int) -> int | None:
    """``pid``'s parent pid (/proc/PID/stat), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None
