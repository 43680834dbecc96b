"""Starting a process in a jail and watching it (:func:`spawn`).

Three processes::

    caller (P)      checks the config, forks the supervisor, reads its report, returns a JailResult
      supervisor (S, root, host namespaces): creates the cgroup and the per-VM root, unshares the
                      PID namespace, forks the VMM, waits for it, reads the kernel's verdict
                      (exit status, SIGSYS + the call its handler reported, OOM kills in the
                      cgroup), removes the cgroup and the root directory, reports to P
        VMM (V, PID 1 of its namespace): joins the cgroup, closes inherited descriptors, runs
                      ``target(entry)``: the target opens what it needs (/dev/kvm, the VM, its
                      files) and calls ``entry.enter()`` before running anything untrusted

The report travels as text lines over one pipe: V's SIGSYS handler and setup errors, and S's
verdict. With ``inline`` P is S (no supervisor process of its own: for a caller that is a
process dedicated to the one VMM, the engine's jailrun, one process fewer per VM); S's verdict
is then kept in memory and V's lines are read from the pipe once V ended. With ``daemonize`` S
detaches (setsid, stdio on /dev/null) and P returns as soon as the VMM started; S still cleans
up when it ends.

:class:`Supervised` does S's work in a process that goes on with its own (the engine's shim,
which also relays the VMM's console): two processes per VM instead of three.

A second pipe, V to S, carries one line, "entered", once V is in its jail (its filter loaded).
With an API socket (``config.api_sock``) S waits for it, then renames the socket V bound and
listens on (before the jail, at ``config.api_sock_staging``) to its path: whoever finds the
socket talks to a jailed VMM. S removes the socket when V ends.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.machinery
import os
import signal
import stat
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from . import cgroups, credentials, fds, namespaces, rlimits, rootfs, seccomp
from ._libc import PR_SET_PDEATHSIG, prctl
from .config import UID_BASE, JailConfig, JailError

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8     # mallopt(3)
MALLOC_ARENAS = 1           # Python allocates under its GIL: per-thread arenas only cost memory
MALLOC_THRESHOLD = 128 << 10    # glibc's default, fixed: see lean_malloc


def lean_malloc() -> None:
    """glibc malloc tuned for a small VMM (mallopt(3)): one arena for every thread (each extra arena
    keeps its own free pages), and the mmap and trim thresholds fixed at their defaults. By default
    glibc raises both after a large block is freed (up to 32 and 64 MiB), so after a VMM read a
    kernel image into memory every later buffer of a few MiB (the initrd) came from the heap and
    stayed there, dirty, once freed. Inherited across fork (the zygote calls it for every VM)."""
    libc = ctypes.CDLL(None)
    libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    libc.mallopt(M_MMAP_THRESHOLD, MALLOC_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, MALLOC_THRESHOLD)


@dataclass
class JailResult:
    """How a jailed process ended. ``status`` is its exit status if it exited; ``signal`` the
    signal that killed it; ``syscall`` the forbidden system call's name when seccomp killed it;
    ``oom_killed`` when the kernel killed it for its cgroup memory limit. ``peak_memory`` is the
    cgroup's peak usage in bytes (None if unknown). ``stopped_by``: the signal that made the supervisor
    kill the VMM (SIGTERM, SIGHUP ...; only with ``inline``). With daemonize, only ``pid`` is set."""

    pid: int
    uid: int
    gid: int
    status: int | None = None
    signal: int | None = None
    syscall: str | None = None
    oom_killed: bool = False
    peak_memory: int | None = None
    stopped_by: int | None = None

    def describe(self) -> str:
        """One sentence for a user: how the jailed VMM ended."""
        if self.status is not None:
            return f"the jailed VMM exited with status {self.status}"
        if self.signal is None:
            return "the jailed VMM is running"
        if self.oom_killed:
            return ("the jailed VMM was killed by its memory limit (the kernel's OOM killer acted in its "
                    "cgroup; give it more with --memory)")
        if self.signal == signal.SIGSYS:
            what = f"a forbidden system call: {self.syscall}" if self.syscall else "a forbidden system call"
            return f"the jailed VMM was killed by seccomp (SIGSYS) for {what}"
        return f"the jailed VMM was killed by signal {signal.Signals(self.signal).name}"


class Entry:
    """Handed to the target inside the jail: call :meth:`enter` once everything is open."""

    def __init__(self, config: JailConfig, root: str, uid: int, gid: int, report_fd: int,
                 entered_fd: int | None = None) -> None:
        self.config, self.root, self.uid, self.gid = config, root, uid, gid
        self.report_fd = report_fd
        self.entered_fd = entered_fd
        self.entered = False
        self.joining: threading.Thread | None = None     # the cgroup join still under way (inline spawn)
        self.join_error: BaseException | None = None

    @property
    def api_sock_staging(self) -> str | None:
        """Where the target binds its API socket (``bind``, ``listen``) before :meth:`enter`; None
        without ``config.api_sock``. Once the jail is entered the supervisor renames it to
        ``config.api_sock``; the target only accepts connections on it from then on."""
        return self.config.api_sock_staging

    def _joined(self) -> None:
        """Wait for the cgroup join started by :func:`_vmm` (if any); raise what it raised."""
        if self.joining is not None:
            self.joining.join()
            self.joining = None
            if self.join_error is not None:
                raise self.join_error

    def enter(self) -> None:
        """The remaining steps, in order: pre-import, namespaces (IPC, UTS, network; the mount
        namespace is the process's own from its start), the wait until the process is in its cgroup
        (see :func:`_vmm`: the two steps before overlap with the join), pivot into the per-VM root,
        resource limits, drop to uid/gid with no capabilities and no_new_privs, then the seccomp
        filter. Raises JailError naming a step that failed."""
        steps = [("pre-import", preload), ("namespaces", lambda: namespaces.enter(self.config.netns)),
                 ("cgroup", self._joined),     # before pivot_root: the join writes to the host's cgroupfs
                 ("pivot_root", lambda: rootfs.pivot(self.root, self.config)),
                 ("resource limits", lambda: rlimits.apply(self.config.resource_limits)),
                 ("credentials", lambda: credentials.drop(self.uid, self.gid))]
        if self.config.seccomp != "off":
            steps.append(("seccomp", lambda: seccomp.install(self.report_fd, self.config.seccomp,
                                                             api=self.config.api_sock is not None)))
        for name, step in steps:
            try:
                step()
            except JailError:
                raise
            except OSError as e:
                raise JailError(f"entering the jail failed at its {name} step: {e}") from None
        self.entered = True
        if self.entered_fd is not None:     # the supervisor may now publish the API socket
            try:
                os.write(self.entered_fd, b"entered\n")
            except OSError:
                pass
            os.close(self.entered_fd)
            self.entered_fd = None


_sealed_away: list = []     # the import system's finders and their cache as they were before preload sealed it


def preload() -> None:
    """Import now what a VMM may need after the pivot, when no module file can be read: crash
    reports (capstone and its shared library), tracing, tracebacks, the codecs Python looks up
    lazily. Then seal the import system: only built-in and frozen modules can still be imported,
    so a module nobody imported before is a plain ModuleNotFoundError -- never a file-system
    lookup, which the seccomp filter would punish (capstone's ``Cs()`` tries ``from . import
    ccapstone`` on every call and copes with its absence). Checked by tests/test_jail.py (a
    jailed guest crash still prints its disassembly)."""
    import encodings.idna  # noqa: F401
    import encodings.latin_1  # noqa: F401
    import json  # noqa: F401
    import linecache  # noqa: F401
    import traceback  # noqa: F401

    import capstone  # noqa: F401  (loads libcapstone.so)

    from ..debug import disasm, inside, report, stats  # noqa: F401
    from ..kvm import irq  # noqa: F401  (SendCtrlAltDel through the API: the keyboard's IRQ line)
    from ..snapshot import format, machine_state  # noqa: F401  (the API's snapshot actions)
    "".encode("ascii"), "".encode("latin-1"), b"".decode("utf-8", "replace")
    # glibc's malloc, when a new thread needs an arena, counts CPUs by opening
    # /sys/devices/system/cpu/online unless the number of arenas is fixed: fix it.
    lean_malloc()
    # What setting up the VM allocated and freed (file buffers, parsed images) goes back to the host
    # before the guest runs: not one private page of it per VM.
    import gc
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    _sealed_away.append((list(sys.meta_path), sys.path_importer_cache))
    sys.meta_path[:] = [f for f in sys.meta_path
                        if f in (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter)]
    # A new, empty cache rather than clear(): the finders in the old one (a FileFinder and its directory
    # listing per directory ever searched) were made by the process this VMM was forked from (the engine's
    # zygote); freeing them here would write to, and so copy, every page they are on (~2 MiB per VMM).
    sys.path_importer_cache = {}


def check(config: JailConfig) -> cgroups.Hierarchy:
    """Everything that can be refused before anything is created: JailError, status 2."""
    config.check()
    if os.geteuid() != 0:
        raise JailError("building a jail needs root (namespaces, cgroups, mknod, pivot_root, setuid)")
    if config.seccomp != "off":
        why = seccomp.available()
        if why:
            raise JailError(why)
    return cgroups.detect(version=config.cgroup_version)


def spawn(config: JailConfig, target: Callable[[Entry], int], keep_fds: tuple[int, ...] = (),
          inline: bool = False) -> JailResult:
    """Run ``target(entry)`` in a jailed process and return how it ended (see the module doc).

    The target returns the process's exit status; it must call ``entry.enter()`` first thing
    after opening what it needs (a target that never enters is stopped with status 2). Raises
    JailError (status 2) for bad input or a jail that could not be built; nothing is left behind
    then. ``keep_fds`` are descriptors the jailed process keeps besides 0, 1 and 2. ``inline``:
    this process supervises (see the module doc; not with ``daemonize``): while the VMM runs,
    SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2 and SIGALRM to this process kill the VMM (cleanup
    follows, ``stopped_by`` names the signal); SIGKILL must go to the VMM itself (``JailResult.pid``
    is its pid in the host's namespace), or its cgroup and root directory are left behind."""
    hierarchy = check(config)
    if inline:
        if config.daemonize:
            raise JailError("an inline supervisor cannot daemonize")
        return _spawn_inline(config, hierarchy, target, keep_fds)
    read_end, write_end = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    caller = os.getpid()
    pid = os.fork()
    if pid == 0:   # the supervisor
        code = 0
        try:
            os.close(read_end)
            _supervise(config, hierarchy, target, write_end, keep_fds, caller)
        except BaseException as e:
            code = 2 if isinstance(e, JailError) else 4
            text = str(e) if isinstance(e, JailError) else f"jail supervisor failed: {e!r}"
            _send(write_end, "error", text.replace("\n", " "))
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        return _collect(read_end, pid, config.daemonize)
    finally:
        os.close(read_end)


STOPS_INLINE = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)


def _spawn_inline(config, hierarchy, target, keep_fds) -> JailResult:
    read_end, write_end = os.pipe()
    # V's lines wait in the pipe until V ended: V never blocks on a full pipe (a line is lost instead)
    os.set_blocking(write_end, False)
    own: list[str] = []
    stopped: list[int] = []
    try:
        _supervise(config, hierarchy, target, write_end, keep_fds, None,
                   report=lambda key, value: own.append(f"{key} {value}\n"), stopped=stopped)
    except JailError:
        os.close(read_end)
        raise
    except Exception as e:
        os.close(read_end)
        raise JailError(f"jail supervisor failed: {e!r}") from None
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "r", errors="replace") as f:
        theirs = f.readlines()
    result = _collect_lines(own[:1] + theirs + own[1:], None, False)
    result.stopped_by = stopped[0] if stopped else None
    return result


def _collect(read_end: int, pid: int, daemonize: bool) -> JailResult:
    with os.fdopen(os.dup(read_end), "r", errors="replace") as report:
        return _collect_lines(report, pid, daemonize)


def _collect_lines(report, pid: int | None, daemonize: bool) -> JailResult:
    result: JailResult | None = None
    error = None
    for line in report:
        key, _, value = line.rstrip("\n").partition(" ")
        if key == "started":
            vpid, uid, gid = (int(v) for v in value.split())
            result = JailResult(vpid, uid, gid)
            if daemonize:
                break
        elif key == "error" and error is None:
            error = value
        elif result is None:
            continue
        elif key == "syscall":
            result.syscall = seccomp.syscall_name(int(value)) + f" ({int(value)})"
        elif key == "wait":
            raw = int(value)
            if os.WIFEXITED(raw):
                result.status = os.WEXITSTATUS(raw)
            elif os.WIFSIGNALED(raw):
                result.signal = os.WTERMSIG(raw)
        elif key == "oom":
            result.oom_killed = int(value) > 0 and result.signal == signal.SIGKILL
        elif key == "peak":
            result.peak_memory = int(value)
    if not daemonize and pid is not None:
        os.waitpid(pid, 0)
    if error is not None and (result is None or result.status == 2):
        raise JailError(error)
    if result is None:
        raise JailError("the jail supervisor ended without starting the VMM")
    return result


def _send(fd: int, key: str, value: str) -> None:
    try:
        os.write(fd, f"{key} {value}\n".encode())
    except OSError:
        pass    # the caller is gone (daemonized, or it died): nobody to tell


def _supervise(config, hierarchy, target, report_fd, keep_fds, caller: int | None, report=None,
               stopped: list[int] | None = None) -> None:
    """S's work (``caller`` None: inline, in P itself, its verdict through ``report(key, value)`` and
    the signal that stopped the VMM appended to ``stopped``)."""
    if report is None:
        report = lambda key, value: _send(report_fd, key, value)  # noqa: E731
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the VMM's to handle; we clean up after
    if config.daemonize:
        os.setsid()
        _stdio_to_null()
    elif caller is not None:   # the caller killed (`timeout`, a test's subprocess timeout): end the VM, clean up
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != caller:
            return
    uid = config.uid if config.uid is not None else UID_BASE + os.getpid()
    gid = config.gid if config.gid is not None else uid
    cgroup = cgroups.Cgroup.create(hierarchy, config.id, config.memory, config.cpus, config.pids)
    try:
        root = rootfs.RootDir.create(config, uid, gid)
        entered_r, entered_w = os.pipe() if config.api_sock is not None else (None, None)
        published = None
        try:
            if config.new_pid_ns:
                namespaces.new_pid_namespace()
            stops = {signal.SIGTERM, signal.SIGHUP} if caller is not None or config.daemonize else set(STOPS_INLINE)
            signal.pthread_sigmask(signal.SIG_BLOCK, stops)
            vpid = os.fork()
            if vpid == 0:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
                if entered_r is not None:
                    os.close(entered_r)
                _vmm(config, cgroup, root.root, uid, gid, target, report_fd, keep_fds, entered_w,
                     early=caller is None and not config.daemonize)
            if entered_w is not None:
                os.close(entered_w)
            def stop(signum, _frame):
                if stopped is not None and not stopped:
                    stopped.append(signum)
                os.kill(vpid, signal.SIGKILL)
            for signum in stops:    # stop the VMM; the cleanup below follows
                signal.signal(signum, stop)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
            report("started", f"{vpid} {uid} {gid}")
            if entered_r is not None:
                published = _publish_api_sock(config, entered_r)
                os.close(entered_r)
            while True:
                try:
                    _, raw = os.waitpid(vpid, 0)
                    break
                except InterruptedError:
                    continue
            report("wait", str(raw))
            report("oom", str(cgroup.oom_killed()))
            peak = cgroup.usage().get("peak_memory")
            if peak is not None:
                report("peak", str(peak))
        finally:
            if config.api_sock is not None:
                _remove_socket(config.api_sock_staging)
                if published is not None:     # only the socket we published, not one found there
                    _remove_socket(config.api_sock, published)
            root.remove()
    finally:
        cgroup.remove()


def _publish_api_sock(config: JailConfig, entered_fd: int) -> int | None:
    """Wait until the VMM says it is in its jail (or ends: EOF), then give the socket it bound at
    the staging path its real name; returns its inode number. A VMM that ends before entering
    publishes nothing (None)."""
    with os.fdopen(os.dup(entered_fd), "rb") as f:
        line = f.readline()
    inode = _socket_inode(config.api_sock_staging)
    if line != b"entered\n" or inode is None:
        return None
    os.replace(config.api_sock_staging, config.api_sock)
    return inode


def _socket_inode(path: str) -> int | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None
    return info.st_ino if stat.S_ISSOCK(info.st_mode) else None


def _remove_socket(path: str, inode: int | None = None) -> None:
    """Remove ``path`` if it is a socket (never anything else another program put there) -- with
    ``inode``, only if it is still that one."""
    found = _socket_inode(path)
    if found is not None and inode in (None, found):
        try:
            os.unlink(path)
        except OSError:
            pass


def _vmm(config, cgroup, root, uid, gid, target, report_fd, keep_fds, entered_fd, early: bool = False) -> None:
    """The jailed process (never returns). With ``early`` (the inline spawn) it joins its cgroup in a
    thread while the target sets up its VM, and :meth:`Entry.enter` waits for that join before it
    pivots into the jail's root (its pre-import and namespace steps overlap with the join too):
    the first move of a process into a cgroup v1 hierarchy (whichever of the jail's is written first;
    the later ones took ~0.2 ms) waits about 10-12 ms in the kernel (an RCU grace period, the
    threadgroup lock), which then overlaps with the VM's set-up instead of
    coming before it. The guest runs only after the join, in the cgroup; what the target allocated
    before the join completed (its VM's set-up: KVM's structures, buffers) stays charged where it
    was allocated."""
    code = 4
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if not early:
            cgroup.join()
        fds.close_inherited({report_fd, entered_fd, *keep_fds})
        try:
            namespaces.new_mount_namespace()    # before the target starts any thread: see its docstring
        except OSError as e:
            raise JailError(f"entering the jail failed at its mount namespace step: {e}") from None
        entry = Entry(config, root, uid, gid, report_fd, entered_fd)
        if early:
            def join() -> None:
                try:
                    cgroup.join()
                except BaseException as e:  # noqa: BLE001  (raised again by Entry.enter)
                    entry.join_error = e
            entry.joining = threading.Thread(target=join, name="cgroup-join", daemon=True)
            entry.joining.start()
        code = target(entry)
        if not entry.entered:
            raise JailError("the jailed target returned without entering the jail")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except JailError as e:
        _send(report_fd, "error", str(e).replace("\n", " "))
        code = 2
    except BaseException:
        traceback.print_exc()
        code = 4
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        os._exit(code)


def _stdio_to_null() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


class Supervised:
    """A jailed process supervised by the calling process while it goes on with other work: the
    engine's shim is the jail's supervisor (no process of its own for that), as Firecracker's jailer
    becomes its VMM. :meth:`start` does what :func:`spawn` does up to the fork -- the cgroup and the
    root directory made, the PID namespace unshared (for this process's later children: it must fork
    no other), the VMM forked after ``child_setup()`` ran in it (its stdio) -- and a thread publishes
    the API socket once the VMM is in its jail; :meth:`wait` reaps the VMM, reads the kernel's
    verdict and cleans up, and returns the JailResult (JailError if the jail failed to be entered).
    Signals: SIGKILL to ``pid`` (the VMM's pid in the host's namespace); others reach the VMM, PID 1 of
    its namespace, only if it handles them (as for a container's init)."""

    def __init__(self) -> None:
        self.pid = 0
        self._done: JailResult | None = None

    @classmethod
    def start(cls, config: JailConfig, target: Callable[[Entry], int], keep_fds: tuple[int, ...] = (),
              child_setup: Callable[[], None] | None = None) -> Supervised:
        """JailError (status 2) if the jail cannot be built; nothing is left behind then."""
        if config.daemonize:
            raise JailError("a supervised jail cannot daemonize")
        hierarchy = check(config)
        self = cls()
        self.config = config
        self.uid = config.uid if config.uid is not None else UID_BASE + os.getpid()
        self.gid = config.gid if config.gid is not None else self.uid
        self.cgroup = cgroups.Cgroup.create(hierarchy, config.id, config.memory, config.cpus, config.pids)
        self.root = None
        self.published: list[int | None] = [None]
        self.publisher: threading.Thread | None = None
        entered_w = None
        try:
            self.root = rootfs.RootDir.create(config, self.uid, self.gid)
            self.report_r, report_w = os.pipe()
            os.set_blocking(report_w, False)    # read once the VMM ended: it never blocks on it
            entered_r, entered_w = os.pipe() if config.api_sock is not None else (None, None)
            if entered_r is not None:
                # started before the PID namespace: a process whose children go to another PID namespace
                # can no longer start threads (clone(2): EINVAL)
                def publish() -> None:
                    try:
                        self.published[0] = _publish_api_sock(config, entered_r)
                    finally:
                        os.close(entered_r)
                self.publisher = threading.Thread(target=publish, name="jail-publish", daemon=True)
                self.publisher.start()
            if config.new_pid_ns:
                namespaces.new_pid_namespace()
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                code = 4
                try:
                    os.close(self.report_r)
                    if child_setup is not None:
                        child_setup()
                    _vmm(config, self.cgroup, self.root.root, self.uid, self.gid, target, report_w, keep_fds,
                         entered_w, early=True)
                finally:
                    os._exit(code)
            self.pid = pid
            os.close(report_w)
            if entered_w is not None:
                os.close(entered_w)
                entered_w = None
        except BaseException as e:
            if entered_w is not None:
                with contextlib.suppress(OSError):
                    os.close(entered_w)     # the publisher sees EOF and ends
            if self.publisher is not None:
                self.publisher.join()
            if self.root is not None:
                self.root.remove()
            self.cgroup.remove()
            if isinstance(e, (JailError, KeyboardInterrupt, SystemExit)):
                raise
            raise JailError(f"jail supervisor failed: {e!r}") from None
        return self

    def wait(self) -> JailResult:
        """Reap the VMM, clean up, and say how it ended (once; later calls return the same)."""
        if self._done is not None:
            return self._done
        while True:
            try:
                _, raw = os.waitpid(self.pid, 0)
                break
            except InterruptedError:
                continue
        try:
            if self.publisher is not None:
                self.publisher.join()
            own = [f"started {self.pid} {self.uid} {self.gid}\n"]
            with os.fdopen(self.report_r, "r", errors="replace") as f:
                theirs = f.readlines()
            late = [f"wait {raw}\n", f"oom {self.cgroup.oom_killed()}\n"]
            peak = self.cgroup.usage().get("peak_memory")
            if peak is not None:
                late.append(f"peak {peak}\n")
        finally:
            if self.config.api_sock is not None:
                _remove_socket(self.config.api_sock_staging)
                if self.published[0] is not None:
                    _remove_socket(self.config.api_sock, self.published[0])
            self.root.remove()
            self.cgroup.remove()
        self._done = _collect_lines(own + theirs + late, None, False)
        return self._done
