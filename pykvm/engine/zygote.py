"""The fork server ("zygote") that starts every VM's shim and VMM without a new interpreter (issue 12, part 5).

A fresh ``python -m pykvm.engine.shim`` that starts a fresh ``python -m pykvm run`` costs two
interpreter start-ups (about a second on this host) and two private copies of every module pykvm
imports (tens of MiB per VM). As Android's zygote does for apps, the daemon instead keeps one
long-lived process, ``python -m pykvm.engine.zygote STATE_DIR``, that has imported the VMM's modules
(cffi and the KVM binding, the devices, the per-VM API, the jail) once, and forks:

    zygote ──fork──> shim (setsid) ──fork──> VMM (``pykvm run`` / jailrun's main, in-process)

The children share the zygote's pages copy-on-write: the memory a VM adds is what its processes
write after the fork (see ``benchmarks/engine.py`` for the figure). The zygote runs in its own
session, as the shims do, so VMs and the zygote outlive the daemon; a restarted daemon connects to
the zygote still listening if it runs the daemon's code (``zygote.code``: :func:`code_identity`), or starts a
new one (:class:`ZygoteClient`). The zygote reaps the shims
that end (SIGCHLD); shims outlive a zygote that ends (init adopts them).

**The protocol** (one request per connection on ``STATE_DIR/zygote.sock``, 0600, refused to any
peer whose uid (SO_PEERCRED) is not the zygote's): the request is one JSON object, at most
``MAX_REQUEST`` bytes, sent with the descriptors it passes (SCM_RIGHTS, at most ``MAX_FDS``)::

    {"vmdir": "/var/lib/pykvm/vms/0123456789abcdef", "argv": [...], "fds": [12, 13]}

``vmdir`` must be a directory directly in the zygote's ``STATE_DIR/vms``; ``argv`` is what the
daemon would have executed (:func:`pykvm.engine.vmm.vmm_argv` / ``jailed_argv``): ``python -m
pykvm run|vmm ...`` or ``python -m pykvm.engine.jailrun ...``; ``fds`` are the numbers the
descriptors had in the daemon, which ``argv`` names as ``/proc/self/fd/N``: the VMM gets each
received descriptor at exactly that number, and nothing else beyond 0, 1 and 2 (its pipes to the
shim). The answer is ``{"pid": SHIM_PID}`` with a pidfd of the shim (pidfd_open(2)) attached, so the
daemon learns of the shim's end even if it ended at once; or ``{"error": "..."}`` for a request
refused (nothing was started).

**After each fork** the child undoes what it inherited and must not keep: descriptors (all closed
but the intended ones, the zygote's socket objects detached first so no finalizer closes a reused
number), signal dispositions and the signal mask (reset to a fresh interpreter's), ``atexit``
handlers, ``random``'s state (reseeded from os.urandom). The zygote itself is single-threaded
(it checks before every fork), runs no event loop and configures no logging handlers.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import gc
import importlib
import json
import logging
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from .shim import listen_private

MAX_REQUEST = 1 << 16       # bytes of one request's JSON
MAX_FDS = 32                # descriptors passed with one request
SOCKET_NAME = "zygote.sock"
CODE_NAME = "zygote.code"   # the zygote's code_identity(), written before its socket appears
START_TIMEOUT = 30.0        # seconds a daemon waits for a zygote it started to listen
REQUEST_TIMEOUT = 5.0       # seconds the zygote waits for a request's bytes
IDLE_CHECK = 2.0            # seconds between two checks that the zygote's socket is still its own

# What ``pykvm run`` (and jailrun, and ``--api-sock``) import: loaded once here, shared by every VM.
PRELOAD = (
    "pykvm.cli", "pykvm.client", "pykvm.machine", "pykvm.board", "pykvm.console", "pykvm.memory",
    "pykvm.kvm", "pykvm.kvm.irq", "pykvm.kvm.exits", "pykvm.kvm.host",
    "pykvm.boot.bundled", "pykvm.boot.detect", "pykvm.boot.linux", "pykvm.boot.flat", "pykvm.boot.elf",
    "pykvm.boot.pvh", "pykvm.boot.multiboot", "pykvm.boot.firmware",
    "pykvm.devices.virtio.blk", "pykvm.devices.virtio.console", "pykvm.devices.virtio.mmio",
    "pykvm.devices.virtio.net", "pykvm.devices.virtio.rng", "pykvm.devices.tap", "pykvm.devices.pci",
    "pykvm.debug.inside", "pykvm.debug.stats", "pykvm.x86.emulate", "pykvm.x86.paging",
    "pykvm.api.server", "pykvm.api.controller",
    "pykvm.jail", "pykvm.jail.supervisor", "pykvm.jail.seccomp",
    "pykvm.engine.shim", "pykvm.engine.jailrun",
    # what the per-VM API server (``--api-sock``) imports only when it starts
    "uvicorn", "uvicorn.config", "uvicorn.server", "uvicorn.main", "uvicorn.logging", "uvicorn.lifespan.off",
    "uvicorn.lifespan.on", "uvicorn.loops.auto", "uvicorn.loops.asyncio", "uvicorn.protocols.http.auto",
    "uvicorn.protocols.http.h11_impl", "uvicorn.protocols.websockets.auto",
    "uvicorn.protocols.websockets.websockets_sansio_impl", "uvicorn.middleware.proxy_headers",
    "uvicorn.middleware.message_logger", "uvicorn.middleware.asgi2", "uvicorn.middleware.wsgi",
    "uvicorn.supervisors", "pydantic.v1", "anyio._backends._asyncio", "anyio.streams.memory",
    "anyio.streams.stapled", "anyio.streams.tls", "h11", "websockets.server", "logging.config",
    "logging.handlers", "multiprocessing.connection", "asyncio",
    # what a jailed VMM loads before it enters the jail (its filter library, the disassembler)
    "pyseccomp", "capstone", "ctypes.util", "encodings.idna", "stringprep", "unicodedata",
    "importlib.resources.readers",
    # what the jail's preload imports in the VMM right before it enters (crash reports, the API's snapshots)
    "encodings.latin_1", "pykvm.debug.disasm", "pykvm.debug.report", "pykvm.snapshot.format",
    "pykvm.snapshot.machine_state",
)

VMM_ENTRIES = {"pykvm": ("run", "vmm"), "pykvm.engine.jailrun": None}
log = logging.getLogger("pykvm.engine")


class ZygoteError(Exception):
    """The zygote could not be reached or started, or it refused a request (the message says which)."""


# --- the zygote process --------------------------------------------------------------------------
def code_identity() -> str:
    """What this process's pykvm would run, as a hex digest of the interpreter's path and of the name and
    content of every module file of the package (about 10 ms). By content, not by file times: a daemon run from
    a checkout and a zygote importing the same code installed elsewhere are the same code. A daemon that finds
    a zygote of other code (pykvm upgraded or edited since it started) starts a new one
    (:meth:`ZygoteClient.ensure`)."""
    import hashlib
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(f"{sys.executable}\0".encode())
    for path in sorted(root.rglob("*.py")):
        with contextlib.suppress(OSError):
            data = path.read_bytes()
            digest.update(f"{path.relative_to(root)}\0{len(data)}\0".encode())
            digest.update(data)
    return digest.hexdigest()


def _preload() -> None:
    with contextlib.suppress(ImportError, AttributeError, OSError):
        from ..jail.supervisor import lean_malloc
        lean_malloc()       # before the imports: the zygote's own heap is shared by every VM
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    with contextlib.suppress(ImportError, AttributeError):
        # Every VMM parses its command line with pykvm's parser: build it once here (argparse's
        # parse_args leaves the parser unchanged), not once per VM (about 15 ms each).
        from .. import cli
        parser = cli.build_parser()     # the whole parser serves every command
        cli.build_parser = lambda command=None: parser
    with contextlib.suppress(Exception):     # no libseccomp: a jailed VMM would say so itself
        from ..jail import seccomp
        seccomp.prebuild()
    with contextlib.suppress(Exception):     # (ImportError, OSError from the warm-up's socket)
        # The per-VM API's app (routes, validators, uvicorn's config), built once here: shared by every
        # VMM instead of built in each (about 3 MiB of private memory per VM); and served once here (its
        # start, one request, its end), so that what its first request builds and specialises is shared
        # too, and the VMMs skip their own warm-up request (2.5 MiB of private memory in each)
        from ..api import server
        server.prebuild_app()
        server.warm_up_prebuilt()
    _warm_up_vmm()
    gc.collect()
    gc.freeze()     # what the zygote holds now is never traversed by a child's collector (no COW for it)


def _warm_up_vmm() -> None:
    """Run the bundled demo guest once, here, its output to /dev/null (about 0.1 s): what a VMM's first boot
    creates lazily or specialises (cffi's parsed KVM types, the exit loop's and the UART's adaptive bytecode,
    the output and console threads' objects) then exists before the fork, shared by every VMM, instead of
    being written in each (idle Linux VMs measured 0.5 MiB less private memory each). It leaves no thread,
    descriptor or signal handler behind; without /dev/kvm it fails and is skipped."""
    saved = os.dup(1)
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
        from .. import cli
        status = cli.main(["run", "-q", "hello-long64"])
    except BaseException as e:      # (SystemExit included: the zygote serves on without it)
        status = e
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    if status != 0:
        print(f"pykvm zygote: the warm-up VM did not run ({status!r}); VMMs start without it", flush=True)


def check_request(request: object, vms_dir: Path, nfds: int) -> tuple[Path, list[str], list[int]]:
    """``(vmdir, argv, fds)`` of a well-formed request (see the module doc); ValueError with the reason
    otherwise."""
    if not isinstance(request, dict) or set(request) != {"vmdir", "argv", "fds"}:
        raise ValueError('a request is {"vmdir", "argv", "fds"} and nothing else')
    vmdir, argv, fds = request["vmdir"], request["argv"], request["fds"]
    if not isinstance(vmdir, str) or not vmdir.startswith("/") or "\0" in vmdir:
        raise ValueError("vmdir must be an absolute path")
    path = Path(vmdir)
    if path.parent != vms_dir or path.name in ("", ".", "..") or not path.is_dir() or path.is_symlink():
        raise ValueError(f"vmdir must be a directory in {vms_dir}")
    if (not isinstance(argv, list) or not 4 <= len(argv) <= 256
            or not all(isinstance(a, str) and "\0" not in a and len(a) <= 8192 for a in argv)):
        raise ValueError("argv must be a list of 4 to 256 strings")
    if argv[1] != "-m" or argv[2] not in VMM_ENTRIES:
        raise ValueError("argv must start a VMM: python -m pykvm run|vmm ... or python -m pykvm.engine.jailrun ...")
    verbs = VMM_ENTRIES[argv[2]]
    if verbs is not None and argv[3] not in verbs:
        raise ValueError(f"argv must start a VMM: pykvm {' or '.join(verbs)}, not pykvm {argv[3]}")
    if (not isinstance(fds, list) or len(fds) != nfds
            or not all(isinstance(n, int) and not isinstance(n, bool) and 3 <= n < 65536 for n in fds)
            or len(set(fds)) != len(fds)):
        raise ValueError(f"fds must list one distinct number (3 to 65535) for each of the {nfds} descriptors sent")
    return path, argv, fds


def _install_fds(received: list[int], targets: list[int], keep: tuple[int, ...] = ()) -> None:
    """Leave this process with exactly 0, 1, 2, ``keep`` and each ``received[i]`` at ``targets[i]``
    (inheritable); every other descriptor is closed."""
    base = max([*received, *targets, *keep, 2]) + 1
    moved = [_dup_at_least(r, base) for r in received]
    keep_set = {0, 1, 2, *keep, *moved}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep_set:
            with contextlib.suppress(OSError):
                os.close(fd)
    for src, dst in zip(moved, targets, strict=True):
        os.dup2(src, dst, inheritable=True)
        os.close(src)


def _dup_at_least(fd: int, lowest: int) -> int:
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)


def fresh_process() -> None:
    """Make a forked child look like a freshly started interpreter in the ways that matter here:
    default signal dispositions (Python's: SIGINT raises KeyboardInterrupt, SIGPIPE and SIGXFSZ
    ignored), an empty signal mask, no atexit handlers, a reseeded ``random``."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        with contextlib.suppress(OSError, ValueError, RuntimeError):
            if sig == signal.SIGINT:
                signal.signal(sig, signal.default_int_handler)
            elif sig in (signal.SIGPIPE, signal.SIGXFSZ):
                signal.signal(sig, signal.SIG_IGN)
            else:
                signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    with contextlib.suppress(ValueError):
        signal.set_wakeup_fd(-1)
    atexit._clear()
    random.seed()


def run_vmm(argv: list[str]) -> int:
    """The VMM's main, in this process: ``pykvm run|vmm ARGS`` or jailrun's main (its argv after
    ``python -m MODULE``). Returns the exit status."""
    sys.argv = [argv[2], *argv[3:]]
    try:
        if argv[2] == "pykvm.engine.jailrun":
            from . import jailrun
            return jailrun.main(argv[3:])
        from .. import cli
        return cli.main(argv[3:])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        return 130
    except BaseException:
        import traceback
        traceback.print_exc()
        return 4


def exit_now(code: int) -> None:
    """End a forked child: its atexit handlers and buffered output, then _exit (never the zygote's
    finalizers, which would act on descriptors and objects this process does not own)."""
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    os._exit(code & 0xFF if code >= 0 else 1)


class ForkedVmm:
    """The VMM as a forked child of the shim, with the same face the shim uses of a Popen: ``pid``,
    ``stdin``/``stdout`` (file objects of the pipes), ``wait()``, ``send_signal()``."""

    def __init__(self, argv: list[str], pass_fds: list[int]) -> None:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 4
            try:
                os.dup2(in_r, 0)
                os.dup2(out_w, 1)
                os.dup2(out_w, 2)
                _install_fds(list(pass_fds), list(pass_fds))
                fresh_process()
                code = run_vmm(argv)
            finally:
                exit_now(code)
        os.close(in_r)
        os.close(out_w)
        self.pid = pid
        self.stdin = os.fdopen(in_w, "wb", buffering=0)
        self.stdout = os.fdopen(out_r, "rb", buffering=0)
        self.returncode: int | None = None

    def wait(self) -> int:
        """Reap the VMM; Popen's convention: the exit status, or -N if signal N ended it."""
        if self.returncode is None:
            while True:
                try:
                    _, status = os.waitpid(self.pid, 0)
                    break
                except ChildProcessError:
                    status = 0
                    break
                except InterruptedError:
                    continue
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


class JailedVmm:
    """A jailed VMM (``python -m pykvm.engine.jailrun ...`` argv) with the shim as its jail's supervisor:
    no jailrun process between them (:class:`pykvm.jail.supervisor.Supervised`). The same face as
    :class:`ForkedVmm`; ``message`` says, after :meth:`wait`, how the jail ended when the exit status
    alone does not (a seccomp or OOM kill, a jail that could not be built), for the console log."""

    def __init__(self, argv: list[str], pass_fds: list[int]) -> None:
        from .. import cli
        from ..errors import PykvmError
        from ..jail.supervisor import Supervised
        from . import jailrun
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        self.stdin = os.fdopen(in_w, "wb", buffering=0)
        self.stdout = os.fdopen(out_r, "rb", buffering=0)
        self.returncode: int | None = None
        self.message: str | None = None
        self.job = None
        self.pid = 0        # none (the daemon then signals the shim) until the jailed VMM runs

        def stdio() -> None:        # in the VMM, before the jail closes what it inherited
            os.dup2(in_r, 0)
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            fresh_process()
        try:
            config, target, keep = jailrun.prepare(argv[3:])
            self.job = Supervised.start(config, target, keep, child_setup=stdio)
            self.pid = self.job.pid
        except PykvmError as e:
            self.message, self.returncode = str(e), e.exit_status
        except SystemExit as e:     # argparse's message is in the shim's log
            self.message = "the VMM's command line was refused"
            self.returncode = e.code if isinstance(e.code, int) else 2
        finally:
            os.close(in_r)
            os.close(out_w)
        self._cli = cli

    def wait(self) -> int:
        """Reap the VMM (and clean its jail up); Popen's convention: the exit status, or -N if signal N
        ended it. A kill by seccomp or by the memory limit is status 4 with ``message`` saying which."""
        if self.returncode is not None:
            return self.returncode
        from ..jail import JailError
        try:
            result = self.job.wait()
        except JailError as e:
            self.message, self.returncode = str(e), e.exit_status
            return self.returncode
        if result.status is not None:
            self.returncode = result.status
        elif result.signal == signal.SIGKILL and not result.oom_killed:
            self.returncode = -signal.SIGKILL
        elif result.signal is not None and result.signal != signal.SIGSYS and not result.oom_killed:
            self.returncode = -result.signal
        else:
            self.message, self.returncode = result.describe(), self._cli.STATUS_CRASH
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None and self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)


def _spawn_vmm(argv: list[str], pass_fds: list[int]):
    if argv[2] == "pykvm.engine.jailrun":
        return JailedVmm(argv, pass_fds)
    return ForkedVmm(argv, pass_fds)


def _shim_main(vmdir: Path, argv: list[str], fds: list[int], received: list[int]) -> int:
    """In the shim (the zygote's grandchild): descriptors, output and signals as ``python -m
    pykvm.engine.shim`` has them, then the shim's loop with a forked VMM."""
    log = os.open(vmdir / "shim.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    _install_fds(received, fds)
    fresh_process()
    os.chdir("/")
    from .shim import main as shim_main
    return shim_main([str(vmdir)], spawn=_spawn_vmm, config={"argv": argv, "pass_fds": fds})


def _serve_one(conn: socket.socket, vms_dir: Path) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    received: list[int] = []
    try:
        if uid != os.geteuid():
            raise ValueError(f"uid {uid} may not use this zygote (it serves uid {os.geteuid()})")
        conn.settimeout(REQUEST_TIMEOUT)
        data, received, flags, _ = socket.recv_fds(conn, MAX_REQUEST + 1, MAX_FDS)
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or len(data) > MAX_REQUEST:
            raise ValueError(f"a request is at most {MAX_REQUEST} bytes and {MAX_FDS} descriptors")
        try:
            request = json.loads(data)
        except ValueError:
            raise ValueError("a request is one JSON object") from None
        vmdir, argv, fds = check_request(request, vms_dir, len(received))
    except (ValueError, OSError) as e:
        for fd in received:
            os.close(fd)
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"error": str(e)}).encode())
        return
    if threading.active_count() != 1:       # fork() copies one thread; locks others hold stay held
        raise RuntimeError("the zygote must be single-threaded to fork")
    sys.stdout.flush()
    sys.stderr.flush()
    # One fork (each fork of this process costs ~4 ms here): the shim is the zygote's child, in a session of
    # its own, reaped by _reap when it ends (init reaps it if the zygote ended first). SIGCHLD stays blocked
    # until the shim's pidfd is open, so that the shim, however soon it ends, is not reaped before.
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGCHLD])
    try:
        shim = os.fork()
        if shim == 0:
            conn.detach()
            code = 4
            try:
                os.setsid()     # its own session and process group, the VMM in it: as start_new_session
                code = _shim_main(vmdir, argv, fds, received)
            finally:
                exit_now(code)
        pidfd = os.pidfd_open(shim)
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGCHLD])
    for fd in received:
        os.close(fd)
    try:
        with contextlib.suppress(OSError):      # a daemon that gave up: the shim runs on, as it would have
            socket.send_fds(conn, [json.dumps({"pid": shim}).encode()], [pidfd])
    finally:
        os.close(pidfd)


def _reap(*_) -> None:
    """SIGCHLD: collect every shim that ended (the daemon learns of its end from its pidfd and exit.json)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve(state_dir: Path) -> int:
    """The zygote's loop (single-threaded, one request at a time; each takes a few milliseconds)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    code = code_identity()      # before the imports: the files as they are imported
    _preload()
    signal.signal(signal.SIGCHLD, _reap)       # after _preload: nothing but shims is a child of the zygote
    vms_dir = (state_dir / "vms").resolve()
    path = state_dir / SOCKET_NAME
    tmp = state_dir / f".{SOCKET_NAME}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    listener = listen_private(tmp, 64)
    listener.settimeout(IDLE_CHECK)
    (state_dir / CODE_NAME).write_text(code + "\n")
    os.replace(tmp, path)           # a client sees no socket or a listening one, never a dead one
    mine = os.stat(path).st_ino
    (state_dir / "zygote.pid").write_text(f"{os.getpid()}\n")
    print(f"pykvm zygote {os.getpid()} on {path}", flush=True)
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            try:
                if os.stat(path).st_ino == mine:
                    continue
            except OSError:
                pass
            print(f"pykvm zygote {os.getpid()}: {path} was removed or replaced; ending", flush=True)
            return 0
        conn.settimeout(None)
        with conn:
            _serve_one(conn, vms_dir)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pykvm.engine.zygote STATE_DIR", file=sys.stderr)
        return 2
    return serve(Path(args[0]))


# --- the daemon's side ---------------------------------------------------------------------------
class ZygoteClient:
    """The daemon's handle on the zygote of ``state_dir``: ``launch`` starts a VM's shim through it,
    starting the zygote first if none answers (after a daemon restart, or if the zygote died)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / SOCKET_NAME
        self.proc: subprocess.Popen | None = None
        self.code = code_identity()      # the daemon's: a zygote of other code is replaced

    def _connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(self.path))
            return s
        except OSError:
            s.close()
            return None

    def ensure(self) -> None:
        """Start a zygote unless one of the daemon's code answers; wait until it listens (ZygoteError after
        ``START_TIMEOUT``). One of other code (pykvm was upgraded or edited since it started) is replaced: it
        sees its socket replaced and ends; the shims it forked, and their VMs, run on."""
        s = self._connect()
        if s is not None:
            s.close()
            try:
                if (self.state_dir / CODE_NAME).read_text().strip() == self.code:
                    return
            except OSError:
                pass
            log.warning("the VM zygote runs other code than this daemon (pykvm was upgraded or edited): "
                        "starting a new one; the running VMs are not touched")
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.path.unlink(missing_ok=True)
        with open(self.state_dir / "zygote.log", "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "pykvm.engine.zygote", str(self.state_dir)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out, close_fds=True,
                                         start_new_session=True, cwd="/")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.path.exists():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise ZygoteError(f"the VM zygote did not start (see {self.state_dir / 'zygote.log'})")

    def launch(self, vmdir: Path, argv: list[str], fds: list[int]) -> tuple[int, int]:
        """Start ``vmdir``'s shim and VMM with ``argv`` and the descriptors ``fds`` (kept at those numbers
        in the VMM). Returns ``(shim pid, pidfd of the shim)``; ZygoteError if it could not."""
        for attempt in (0, 1):
            s = self._connect()
            if s is None:
                self.ensure()
                s = self._connect()
            if s is None:
                continue
            try:
                s.settimeout(REQUEST_TIMEOUT)
                socket.send_fds(s, [json.dumps({"vmdir": str(vmdir), "argv": argv, "fds": fds}).encode()], fds)
                data, pidfds, _, _ = socket.recv_fds(s, 65536, 1)
            except OSError as e:
                if attempt == 0 and e.errno in (errno.EPIPE, errno.ECONNRESET, errno.ECONNREFUSED):
                    continue       # a zygote that died between connect and answer: start another
                raise ZygoteError(f"the VM zygote did not answer: {e}") from None
            finally:
                s.close()
            try:
                answer = json.loads(data) if data else {}
            except ValueError:
                answer = {}
            if "pid" in answer and pidfds:
                return int(answer["pid"]), pidfds[0]
            for fd in pidfds:
                os.close(fd)
            if not data and attempt == 0:
                continue           # it died while handling the request
            raise ZygoteError(f"the VM zygote refused to start the VM: {answer.get('error', data[:200])}")
        raise ZygoteError("the VM zygote could not be reached")

    def start_shim(self, vmdir: Path, argv: list[str], fds: list[int]) -> tuple[int, int]:
        """Start VM ``vmdir``'s shim through the zygote: ``shim.json`` records the VMM's command line, the
        previous run's ``exit.json``/``vmm.pid``/``jail.json`` go, then
        :meth:`launch`."""
        (vmdir / "shim.json").write_text(json.dumps({"argv": argv, "pass_fds": fds, "zygote": True}))
        for name in ("exit.json", "vmm.pid", "jail.json"):
            (vmdir / name).unlink(missing_ok=True)
        return self.launch(vmdir, argv, fds)

    def close(self) -> None:
        """Forget the zygote (it keeps running for the next daemon); reap it if it already ended."""
        if self.proc is not None:
            self.proc.poll()


if __name__ == "__main__":
    sys.exit(main())
