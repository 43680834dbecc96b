"""The HTTP layer: Firecracker's routes, each validating its body (models) and submitting one action to the
controller. Errors are ``{"fault_message": ...}`` with status 400 (Firecracker's shape), success is 204 with no
body, or 200 with JSON for the GET routes. pykvm's own additions live under ``/pykvm/``.

Served by uvicorn on a Unix socket created 0600 (owner only), in a thread of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..errors import UsageError
from . import controller as c
from . import models

MAX_BODY = 64 << 10


def _fault(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"fault_message": message}, status_code=status)


def _describe(errors) -> str:
    parts = []
    for e in errors:
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body") or "body"
        if e.get("type") == "extra_forbidden":
            parts.append(f"unknown field {where!r}")
        elif e.get("type") == "missing":
            parts.append(f"missing field {where!r}")
        elif e.get("type") == "json_invalid":
            parts.append("the body is not valid JSON")
        else:
            parts.append(f"{where}: {e.get('msg')}")
    return "invalid request body: " + "; ".join(parts)


def _same_id(field: str, in_path: str, in_body: str) -> None:
    """The resource id in the path (``/drives/{drive_id}``, ``/network-interfaces/{iface_id}``) must be the
    body's ``field``, as Firecracker requires; ApiError (400) naming both otherwise."""
    if in_body != in_path:
        raise c.ApiError(f"the {field} in the body ({in_body}) differs from the one in the path ({in_path})")


def build_app(vmm: c.Vmm) -> FastAPI:
    """The ASGI app of one VM's API."""
    app = FastAPI(title="pykvm VMM API", version="1", openapi_url="/pykvm/openapi.json", docs_url=None,
                  redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return _fault(_describe(exc.errors()))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if exc.status_code in (404, 405):
            return _fault(f"invalid request method and/or path: {request.method} {request.url.path}")
        return _fault(str(exc.detail), exc.status_code)

    @app.exception_handler(c.ApiError)
    async def _api_error(request: Request, exc: c.ApiError):
        return _fault(exc.message, exc.status)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            return _fault(f"request body too large (at most {MAX_BODY} bytes)")
        if request.headers.get("transfer-encoding", "").lower() == "chunked":
            return _fault("chunked request bodies are not accepted: send a Content-Length")
        # Every body is JSON, whatever the client says (Firecracker ignores Content-Type too; plain `curl -d`
        # sends application/x-www-form-urlencoded).
        request.scope["headers"] = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"] + [
            (b"content-type", b"application/json")]
        return await call_next(request)

    def act(action) -> Response:
        result = vmm.submit(action)
        return Response(status_code=204) if result is None else JSONResponse(result)

    @app.get("/")
    def instance_info():
        return vmm.instance_info()

    @app.get("/version")
    def version():
        return {"firecracker_version": "pykvm " + vmm.instance_info()["vmm_version"]}

    @app.get("/machine-config")
    def get_machine_config():
        return vmm.machine_config.model_dump()

    @app.put("/machine-config", status_code=204)
    def put_machine_config(body: models.MachineConfiguration):
        return act(c.PutMachineConfig(body))

    @app.patch("/machine-config", status_code=204)
    def patch_machine_config(body: models.MachineConfigurationPatch):
        return act(c.PatchMachineConfig(body))

    @app.put("/boot-source", status_code=204)
    def put_boot_source(body: models.BootSource):
        return act(c.PutBootSource(body))

    @app.put("/drives/{drive_id}", status_code=204)
    def put_drive(drive_id: str, body: models.Drive):
        _same_id("drive_id", drive_id, body.drive_id)
        return act(c.PutDrive(body))

    @app.patch("/drives/{drive_id}", status_code=204)
    def patch_drive(drive_id: str, body: models.PartialDrive):
        _same_id("drive_id", drive_id, body.drive_id)
        return act(c.PatchDrive(body))

    @app.put("/network-interfaces/{iface_id}", status_code=204)
    def put_network_interface(iface_id: str, body: models.NetworkInterface):
        _same_id("iface_id", iface_id, body.iface_id)
        return act(c.PutNetworkInterface(body))

    @app.put("/entropy", status_code=204)
    def put_entropy(body: models.EntropyDevice):
        return act(c.PutEntropy(body))

    @app.put("/logger", status_code=204)
    def put_logger(body: models.Logger):
        return act(c.PutLogger(body))

    @app.put("/metrics", status_code=204)
    def put_metrics(body: models.Metrics):
        return act(c.PutMetrics(body))

    @app.put("/actions", status_code=204)
    def put_actions(body: models.InstanceActionInfo):
        action = {models.ActionType.InstanceStart: c.StartInstance, models.ActionType.FlushMetrics: c.FlushMetrics,
                  models.ActionType.SendCtrlAltDel: c.SendCtrlAltDel}[body.action_type]
        return act(action())

    @app.patch("/vm", status_code=204)
    def patch_vm(body: models.Vm):
        return act(c.Pause() if body.state == models.VmState.Paused else c.Resume())

    @app.put("/snapshot/create", status_code=204)
    def snapshot_create(body: models.SnapshotCreateParams):
        act(c.CreateSnapshot(body))
        return Response(status_code=204)

    @app.put("/snapshot/load", status_code=204)
    def snapshot_load(body: models.SnapshotLoadParams):
        return act(c.LoadSnapshot(body))

    @app.get("/vm/config")
    def vm_config():
        return vmm.vm_config()

    # --- pykvm's additions ---
    @app.get("/pykvm/stats")
    def stats():
        return vmm.stats()

    @app.get("/pykvm/console")
    def console(limit: int = c.CONSOLE_KEEP):
        if not 0 < limit <= c.CONSOLE_KEEP:
            raise c.ApiError(f"limit must be between 1 and {c.CONSOLE_KEEP}")
        return Response(vmm.serial.recent(limit), media_type="application/octet-stream")

    return app


def bind_unix(path: str, bind_path: str | None = None) -> socket.socket:
    """A listening Unix socket for ``path``, created 0600 (at ``bind_path`` if given, to be renamed to ``path``
    once it is served). A stale socket nobody listens on is replaced; a live one, or any other file, is refused
    with UsageError."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise UsageError(f"--api-sock {path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise UsageError(f"--api-sock {path} is in use by another process")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)        # stale: left by a VMM that was killed
        except OSError as e:
            raise UsageError(f"--api-sock {path} exists and cannot be probed ({e.strerror}); refusing to "
                             "replace it") from None
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)       # the socket file is born 0600: no window where others could connect
    try:
        sock.bind(bind_path or path)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot create the API socket {path}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    sock.listen(2048)      # uvicorn's backlog (Config.backlog): a lazy server's clients wait here until it starts
    return sock


class _VmmRef:
    """Stands for the VMM in an app built before the VMM exists (:func:`prebuild_app`): attribute
    lookups go to ``target``, set once the VMM is there."""

    def __init__(self) -> None:
        self.target: c.Vmm | None = None

    def __getattr__(self, name: str):
        if self.target is None:
            raise c.ApiError("the VMM is not ready", 503)
        return getattr(self.target, name)


_prebuilt: tuple[FastAPI, _VmmRef, object] | None = None
_warmed = False     # the prebuilt app has served a request in this process or the one it was forked from


def prebuild_app() -> None:
    """Build the app (routes, request models and validators, middleware stack) now, for the next
    :class:`ApiServer` of this process or of a process forked from it, which only attaches its VMM.
    The engine's zygote calls it: every VMM it forks then shares those objects with it (copy on write)
    instead of building its own copy, several MiB per VM."""
    global _prebuilt
    app, ref, config = _build()
    config.load()              # uvicorn's protocol classes and wrapped app, as its server would at start
    _prebuilt = (app, ref, config)


def _build() -> tuple[FastAPI, _VmmRef, object]:
    """The app, the :class:`_VmmRef` its routes reach the VMM through, and uvicorn's Config of the app."""
    ref = _VmmRef()
    app = build_app(ref)       # type: ignore[arg-type]
    app.middleware_stack = app.build_middleware_stack()   # built now, not during the first request (~20 ms)
    return app, ref, _config(app)


def warm_up_prebuilt() -> None:
    """Serve the prebuilt app (:func:`prebuild_app`) once in this process, as a VMM's :class:`ApiServer` does at
    its start (its server's start, one request, its end), then leave it prebuilt again with no thread left.

    For the engine's zygote: what uvicorn, starlette, anyio and the app create or specialise lazily on their first
    start and request then exists before the fork, shared by every VMM, instead of being built in each. A VMM forked
    from it also skips :meth:`ApiServer._warm_up`: an idle VMM then holds 2.5 MiB less private memory, and its
    first client request takes about 10 ms more (its anyio worker thread starts then; measured 12-15 ms against
    5 ms). No-op without a prebuilt app; OSError if the socket cannot be made."""
    global _prebuilt, _warmed
    if _prebuilt is None:
        return
    prebuilt = _prebuilt
    _, ref, _ = prebuilt
    before = set(threading.enumerate())
    vmm = c.Vmm("warm-up")
    try:
        with tempfile.TemporaryDirectory(prefix="pykvm-api-") as tmp, ApiServer(vmm, os.path.join(tmp, "api.sock")):
            pass
    finally:
        vmm.shutdown()
        ref.target = None
        _prebuilt = prebuilt
    _warmed = True
    for thread in set(threading.enumerate()) - before:     # anyio's worker ends with the server's event loop
        thread.join(timeout=5)


def _config(app: FastAPI):
    import uvicorn
    return uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False, timeout_keep_alive=5)


def _config_for() -> tuple[object, _VmmRef]:
    """uvicorn's Config of an app and the :class:`_VmmRef` its routes reach the VMM through: the prebuilt one
    (:func:`prebuild_app`) once, else a new one."""
    global _prebuilt
    if _prebuilt is not None:
        _, ref, config = _prebuilt
        _prebuilt = None        # one VMM per process: the next server (if any) builds its own
        return config, ref
    _, ref, config = _build()
    return config, ref


class ApiServer:
    """uvicorn serving ``build_app(vmm)`` on a Unix socket, in its own thread. A context manager.

    ``staging``: a jailed VMM's socket (pykvm.jail): bound and listened on at ``staging`` before the
    VMM enters its jail, served from there; the jail's supervisor renames it to ``path`` once the
    VMM is jailed and removes it at the end, so this server neither renames nor unlinks it (in the
    jail it could not: only accept, listen, read and write on the socket are left to it).

    ``lazy``: for a VMM whose machine comes from its command line (the API is optional then), forked
    from the engine's zygote (:func:`warm_up_prebuilt`): uvicorn, its event loop and (``vmm`` given as a
    function) the Vmm with its controller thread are made on the first connection, not at once. Until then
    the server's thread only waits in poll(2), and a VMM that nobody calls keeps about 1.3 MiB less private
    memory: uvicorn's start, its loop and its 0.1 s ticks write to objects it shares with the zygote (the
    engine's benchmark, ``benchmarks/engine.py``). The socket listens from the start, so no client is
    refused: its connection waits in the backlog while the server starts (a few ms). Made in a jail, the
    loop needs ``epoll_create1`` and ``socketpair(AF_UNIX)``, which the API's seccomp filter allows."""

    def __init__(self, vmm: c.Vmm | Callable[[], c.Vmm], path: str, staging: str | None = None,
                 lazy: bool = False) -> None:
        """``vmm``: the Vmm the routes drive; or a function that makes it (when the server starts), then shut
        down by :meth:`close`. UsageError if the socket cannot be made."""
        self.path = path
        self._publish = staging is None
        # Lazy only where everything the server's start and first request use is imported and built already (a
        # process that warmed the prebuilt app up, or was forked from one: the engine's VMMs), also in a jail, which
        # can import nothing; elsewhere there is no memory shared with a zygote to save, and it starts at once.
        self._lazy = lazy and _warmed and _prebuilt is not None
        # Bound under a temporary name and renamed once uvicorn serves it (at once when lazy: the backlog holds a
        # client until it serves): a client that sees the socket is answered, instead of refused.
        self._bind_path = staging or f"{path}.{os.getpid()}.tmp"
        if staging is None and len(os.fsencode(self._bind_path)) > 107:    # sun_path: the temporary name must fit too
            self._bind_path = path
        self._sock = bind_unix(path, self._bind_path)
        self._vmm = vmm
        self._made: c.Vmm | None = None
        self._server = None
        self._closing = False
        self._wake_r = self._wake_w = None
        if self._lazy:
            self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
            self._thread = threading.Thread(target=self._serve_when_called, name="api-server", daemon=True)
        else:
            self._warm = not (_warmed and _prebuilt is not None)      # a warmed prebuilt app needs no warm-up
            self._server = self._make_server()
            self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]},
                                            name="api-server", daemon=True)

    def _make_server(self):
        import uvicorn
        config, ref = _config_for()
        if isinstance(self._vmm, c.Vmm):
            ref.target = self._vmm
        else:
            self._made = ref.target = self._vmm()
        return uvicorn.Server(config)

    def __enter__(self) -> ApiServer:
        self._thread.start()
        if not self._lazy:
            while not self._server.started:
                if not self._thread.is_alive():
                    self.close()
                    raise UsageError(f"the API server could not start on {self.path}")
                time.sleep(0.002)
            if self._warm:
                self._warm_up()
        if self._publish and self._bind_path != self.path:
            os.rename(self._bind_path, self.path)
        return self

    def _serve_when_called(self) -> None:
        """The lazy server's thread: wait for a first connection (or for :meth:`close`), then serve."""
        waiting = select.poll()
        waiting.register(self._sock.fileno(), select.POLLIN)
        waiting.register(self._wake_r, select.POLLIN)
        while True:
            try:
                ready = {fd for fd, _ in waiting.poll()}
                break
            except InterruptedError:
                continue
        if self._wake_r in ready or self._closing:
            return
        try:
            server = self._server = self._make_server()
            if self._closing:           # close() came while the server was made: it may not have seen it
                return
            with asyncio.Runner(loop_factory=server.config.get_loop_factory()) as runner:
                runner.run(server.serve(sockets=[self._sock]))
        except BaseException as e:      # (uvicorn ends a failed start with SystemExit)
            if not self._closing:       # its clients are refused from now on, not left waiting in the backlog
                print(f"pykvm: the API server on {self.path} failed and was closed: {e!r}", file=sys.stderr,
                      flush=True)
                self._sock.close()

    def _warm_up(self) -> None:
        """One request of our own before any client's: the first one loads anyio's backend and starts the worker
        thread (~20 ms), which a client's snapshot load or InstanceStart should not pay. Skipped in a process forked
        from one that warmed the prebuilt app up (:func:`warm_up_prebuilt`): anyio's backend is loaded there."""
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(self._bind_path)
            s.sendall(b"GET /version HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            while s.recv(4096):
                pass

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.should_exit = True
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        for fd in (self._wake_r, self._wake_w):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = None
        if self._made is not None:
            self._made.shutdown()
        self._sock.close()
        for path in (self._bind_path, self.path) if self._publish else ():
            with contextlib.suppress(OSError):
                os.unlink(path)
