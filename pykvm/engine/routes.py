"""The REST API, in the Docker Engine API's style (issue 12, part 2): thin handlers over the backend.

Paths follow moby's container router with ``vms`` for ``containers``: ``/_ping``, ``/version``,
``/info``, ``/vms/create``, ``/vms/json``, ``/vms/{id}/json|start|stop|kill|restart|pause|unpause|logs|
stats|attach/ws``, ``DELETE /vms/{id}``, ``/events``. Errors are ``{"message": ...}`` with 400 (bad
request), 403 (a path the caller may not open, a VM it does not own), 404 (no such VM), 409
(conflict), 413 (body too large), 304 (nothing to do). The OpenAPI document is at ``/openapi.json``.
Request bodies are declared models, so a wrong field or type is refused with a precise message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from typing import Literal

from fastapi import FastAPI, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..memory import MAX_RAM, MIN_RAM, MiB
from . import MAX_STOP_WAIT
from .access import Caller, Forbidden
from .backend import EVENT_FILTER_KEYS, FILTER_KEYS, Backend, NotModified, parse_filters
from .store import BadRequest, Conflict, NotFound, Vm, check_name

API_VERSION = "1.0"
# What `pykvm run -c` takes (pykvm.machine.MAX_CPUS, not imported: the daemon does not load the VMM; a unit
# test keeps the two equal). A create the VMM would refuse is refused here, not accepted and left to exit 2.
MAX_CPUS = 64


class Drive(BaseModel):
    """A raw disk image as a virtio-blk device (``--drive``)."""

    model_config = ConfigDict(extra="forbid")
    PathOnHost: str = Field(min_length=1, max_length=4096)
    ReadOnly: bool = False


class SnapshotRef(BaseModel):
    """A snapshot taken with ``POST /vms/{id}/snapshot``."""

    model_config = ConfigDict(extra="forbid")
    Vm: str = Field(min_length=1, max_length=128)
    Snapshot: str = Field(min_length=1, max_length=128)


class CreateRequest(BaseModel):
    """``POST /vms/create``: what ``pykvm run`` takes, as JSON. Give ``Image`` (a bundled guest),
    ``ImageFile`` (a flat binary) or ``Kernel`` (with ``Initrd``, ``Cmdline``)."""

    model_config = ConfigDict(extra="forbid")
    Image: str | None = Field(default=None, max_length=64, description="a bundled guest, e.g. hello-long64")
    ImageFile: str | None = Field(default=None, max_length=4096, description="a flat binary on the host")
    Kernel: str | None = Field(default=None, max_length=4096, description="a kernel image on the host")
    Initrd: str | None = Field(default=None, max_length=4096)
    Cmdline: str = Field(default="", max_length=4096)
    MemoryMiB: int = Field(default=64, ge=MIN_RAM // MiB, le=MAX_RAM // MiB)
    Vcpus: int = Field(default=1, ge=1, le=MAX_CPUS)
    Drives: list[Drive] = Field(default_factory=list, max_length=16)
    Rng: bool = False
    Console: Literal["uart", "virtio"] = "uart"
    Network: bool = Field(default=False, description="a virtio-net card on a TAP on the daemon's bridge, and an "
                          "address (a Linux kernel gets it with ip=)")
    FromSnapshot: SnapshotRef | None = Field(default=None, description="start from this snapshot of a VM")

    @field_validator("Image")
    @classmethod
    def _bundled(cls, value):
        if value is None:
            return value
        from ..boot import bundled
        names = [g.name for g in bundled.GUESTS]
        if value not in names:
            raise ValueError(f"no bundled guest {value!r} (bundled: {', '.join(names)})")
        return value


class ConsoleStream(Response):
    """A raw ASGI response that pumps the request body into the console while streaming its output
    (Starlette's StreamingResponse would consume request messages while waiting for a disconnect)."""

    media_type = "application/vnd.docker.raw-stream"

    def __init__(self, backend, vm, reader, writer, replay: bool, slot: contextlib.ExitStack) -> None:
        super().__init__(status_code=200, media_type=self.media_type)
        self.raw_headers = [(b"content-type", self.media_type.encode())]   # no length: chunked, open-ended
        self.backend, self.vm, self.reader, self.writer, self.replay = backend, vm, reader, writer, replay
        self.slot = slot     # the VM's console session this stream holds (Backend.attach_slot), freed at the end

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})

        async def pump_in():
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                if message.get("body"):
                    self.writer.write(message["body"])
                    await self.writer.drain()

        async def pump_out():
            if self.replay:
                async for chunk in self.backend.logs(self.vm, False, None, False):
                    await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
            while data := await self.reader.read(65536):
                await send({"type": "http.response.body", "body": data, "more_body": True})

        # pump_in ends only when the client has gone (after the body's last chunk, receive() waits for the
        # disconnect), and pump_out when the VM's console closes: either ends the session. Output is never
        # awaited past a disconnect: send() then drops it silently, so the session, its console connection
        # and the shim's end of it would last as long as the VM.
        tasks = [asyncio.ensure_future(pump_out()), asyncio.ensure_future(pump_in())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except OSError:
            pass
        finally:
            for task in tasks:
                task.cancel()
            self.writer.close()
            self.slot.close()
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


def make_app(backend: Backend) -> FastAPI:
    """The ASGI application serving ``backend``."""
    app = FastAPI(title="pykvm Engine API", version=API_VERSION,
                  description="Docker Engine API style control of pykvm VMs over a Unix socket.")

    # -- errors -----------------------------------------------------------------------------------
    def err(status: int, message: str) -> JSONResponse:
        return JSONResponse({"message": message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        ctype = request.headers.get("content-type", "")
        media = ctype.split(";")[0].strip().lower()
        if ctype and media != "application/json" and not media.endswith("+json") and any(
                e.get("loc", ())[:1] == ("body",) for e in exc.errors()):
            # FastAPI reads a body as JSON only when it says it is: curl -d sends a form's type, and the JSON
            # then fails as "not a valid dictionary", which does not say why (Docker: moby's CheckForJSON)
            return err(400, f"unsupported Content-Type {ctype!r}: the body must be JSON, sent with Content-Type: "
                            "application/json (curl: -H 'Content-Type: application/json')")
        parts = []
        for e in exc.errors():
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        return err(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return err(exc.status_code, str(exc.detail))

    @app.exception_handler(NotFound)
    async def _404(request, exc):
        return err(404, str(exc.args[0]) if exc.args else "not found")

    @app.exception_handler(Conflict)
    async def _409(request, exc):
        return err(409, str(exc))

    @app.exception_handler(BadRequest)
    async def _400(request, exc):
        return err(400, str(exc))

    @app.exception_handler(Forbidden)
    async def _403(request, exc):
        return err(403, str(exc))

    @app.exception_handler(NotModified)
    async def _304(request, exc):
        return Response(status_code=304)

    # -- who is asking --------------------------------------------------------------------------
    def caller(request) -> Caller:
        who = request.scope.get("state", {}).get("caller")
        if who is None:         # not over our Unix socket (in-process tests): the daemon's own user
            import os
            who = Caller(os.getpid(), os.geteuid(), os.getegid(), tuple(os.getgroups()))
        return who

    def vm_for(request, ref: str) -> Vm:
        """The VM ``ref`` names, if the caller may act on it (root, or the user who created it)."""
        vm = backend.lookup(ref)
        who = caller(request)
        if not who.is_root and who.uid != vm.owner_uid:
            raise Forbidden(f"VM {vm.name} belongs to uid {vm.owner_uid}, not to you (uid {who.uid})")
        return vm

    # -- system -----------------------------------------------------------------------------------
    @app.get("/_ping", response_class=Response)
    @app.head("/_ping", response_class=Response)
    async def ping():
        return Response("OK", media_type="text/plain", headers={"Api-Version": API_VERSION})

    @app.get("/version")
    async def version():
        import platform
        return {"Version": __version__, "ApiVersion": API_VERSION, "Os": "linux", "Arch": platform.machine(),
                "KernelVersion": platform.release(), "PythonVersion": platform.python_version()}

    @app.get("/info")
    async def info():
        return backend.info()

    # -- VMs --------------------------------------------------------------------------------------
    @app.post("/vms/create", status_code=201)
    async def create(request: Request, body: CreateRequest, name: str | None = Query(default=None, max_length=128)):
        spec = body.model_dump(exclude_none=True)
        spec["Drives"] = [d for d in spec.get("Drives", [])]
        if sum(bool(spec.get(k)) for k in ("Image", "ImageFile", "Kernel")) > 1:
            raise BadRequest("give one of Image, ImageFile or Kernel")
        if not spec.get("Kernel") and (spec.get("Initrd") or spec.get("Cmdline")):
            raise BadRequest("Initrd and Cmdline need a Kernel")
        if name:
            check_name(name)
        source = None
        if body.FromSnapshot is not None:     # the machine is the snapshot's: its spec, not the request's
            src_vm, source = backend.snapshot_source(caller(request), spec["FromSnapshot"])
            spec = {**src_vm.spec, "FromSnapshot": {"Vm": src_vm.id, "Snapshot": body.FromSnapshot.Snapshot}}
        else:
            await asyncio.to_thread(backend.check_files, caller(request), spec)
        vm = backend.create(caller(request), spec, name)
        if source is not None:
            backend.adopt_snapshot(vm, source)
        return {"Id": vm.id, "Warnings": []}

    @app.get("/vms/json")
    async def list_vms(request: Request, all: bool = False, filters: str | None = Query(default=None, max_length=4096)):
        who = caller(request)
        vms = backend.list(all, parse_filters(filters, FILTER_KEYS))
        if not who.is_root:
            owned = {vm.id for vm in backend.store.all() if vm.owner_uid == who.uid}
            vms = [v for v in vms if v["Id"] in owned]
        return vms

    @app.get("/vms/{ref}/json")
    async def inspect(request: Request, ref: str):
        return backend.inspect(vm_for(request, ref))

    @app.post("/vms/{ref}/start", status_code=204, response_class=Response)
    async def start(request: Request, ref: str):
        await backend.start(vm_for(request, ref).id)

    @app.post("/vms/{ref}/stop", status_code=204, response_class=Response)
    async def stop(request: Request, ref: str, t: float = Query(default=10, ge=0, le=MAX_STOP_WAIT)):
        await backend.stop(vm_for(request, ref).id, t)

    @app.post("/vms/{ref}/restart", status_code=204, response_class=Response)
    async def restart(request: Request, ref: str, t: float = Query(default=10, ge=0, le=MAX_STOP_WAIT)):
        await backend.restart(vm_for(request, ref).id, t)

    @app.post("/vms/{ref}/kill", status_code=204, response_class=Response)
    async def kill(request: Request, ref: str, signal: str = Query(default="SIGKILL", max_length=16)):
        await backend.kill(vm_for(request, ref).id, signal)

    @app.post("/vms/{ref}/pause", status_code=204, response_class=Response)
    async def pause(request: Request, ref: str):
        await backend.pause(vm_for(request, ref).id, True)

    @app.post("/vms/{ref}/unpause", status_code=204, response_class=Response)
    async def unpause(request: Request, ref: str):
        await backend.pause(vm_for(request, ref).id, False)

    @app.post("/vms/{ref}/snapshot", status_code=201)
    async def snapshot(request: Request, ref: str, name: str = Query(min_length=1, max_length=128)):
        """A full snapshot (Firecracker's PUT /snapshot/create); create a VM from it with
        ``{"FromSnapshot": {"Vm": ref, "Snapshot": name}}``."""
        return await backend.snapshot(vm_for(request, ref).id, name)

    @app.delete("/vms/{ref}", status_code=204, response_class=Response)
    async def remove(request: Request, ref: str, force: bool = False):
        await backend.remove(vm_for(request, ref).id, force)

    @app.post("/vms/{ref}/wait")
    async def wait(request: Request, ref: str):
        """Block until the VM is not running; its exit status (Docker's ``/wait``)."""
        vm = vm_for(request, ref)
        if vm.state in ("running", "paused"):
            await backend._wait_exit(vm, None)
        vm = backend.store.get(vm.id)
        return {"StatusCode": vm.exit_code if vm.exit_code is not None else 0,
                "Error": {"Message": vm.error} if vm.error else None}

    @app.get("/vms/{ref}/logs")
    async def vm_logs(request: Request, ref: str, follow: bool = False, timestamps: bool = False,
                      tail: str = Query(default="all", max_length=16)):
        vm = vm_for(request, ref)
        if tail == "all":
            n = None
        elif re.fullmatch(r"\d+", tail):
            n = int(tail)
        else:
            raise BadRequest(f"tail must be a number of lines or 'all', not {tail!r}")
        stream = backend.logs(vm, follow, n, timestamps)
        if not follow:
            return Response("".join([chunk async for chunk in stream]), media_type="text/plain; charset=utf-8")
        return StreamingResponse(stream, media_type="text/plain; charset=utf-8")

    @app.get("/vms/{ref}/stats")
    async def stats(request: Request, ref: str, stream: bool = True):
        vm = vm_for(request, ref)
        if not stream:
            return await backend.stats(vm)

        async def lines():
            while True:
                record = await backend.stats(vm)
                yield json.dumps(record) + "\n"
                if backend.store.get(vm.id).state not in ("running", "paused"):
                    return
                await asyncio.sleep(1.0)
        return StreamingResponse(lines(), media_type="application/json")

    @app.get("/events")
    async def events(request: Request, since: float | None = None, until: float | None = None,
                     filters: str | None = Query(default=None, max_length=4096)):
        flt = parse_filters(filters, EVENT_FILTER_KEYS)
        for name, value in (("since", since), ("until", until)):
            if value is not None and not math.isfinite(value):
                raise BadRequest(f"{name} must be a time in seconds since the epoch, not {value}")
        if since is None and until is not None:
            since = 0

        async def lines():
            async for ev in backend.events(since, until, flt, caller(request)):
                yield json.dumps(ev) + "\n"
        return StreamingResponse(lines(), media_type="application/json")

    @app.post("/vms/{ref}/attach")
    async def attach_http(request: Request, ref: str, logs: bool = False):
        """The console over one plain HTTP/1.1 exchange: the request body (sent as it is typed, chunked) is
        the guest's input, the streamed response its output, both at once (``curl -T - ...``)."""
        vm = vm_for(request, ref)
        path = backend.console_socket(vm)
        with contextlib.ExitStack() as slot:
            slot.enter_context(backend.attach_slot(vm))
            try:
                reader, writer = await asyncio.open_unix_connection(str(path))
            except OSError:
                raise Conflict(f"VM {vm.name}'s console is not there (has it just ended?)") from None
            return ConsoleStream(backend, vm, reader, writer, logs, slot.pop_all())

    @app.websocket("/vms/{ref}/attach/ws")
    async def attach(websocket: WebSocket, ref: str, logs: bool = False):
        """The VM's console, both ways, over one connection (Docker's ``/attach/ws``): binary messages
        from the client are the guest's input; the guest's output comes back as binary messages."""
        slot = contextlib.ExitStack()
        try:
            vm = vm_for(websocket, ref)
            path = backend.console_socket(vm)
            slot.enter_context(backend.attach_slot(vm))
        except (NotFound, Conflict, Forbidden) as e:
            code = 4404 if isinstance(e, NotFound) else 4403 if isinstance(e, Forbidden) else 4409
            await websocket.accept()            # so the client sees why, in the close frame
            await websocket.close(code=code, reason=str(e)[:120])
            return
        with slot:
            await _console_ws(websocket, vm, path, logs)

    async def _console_ws(websocket: WebSocket, vm, path, logs: bool) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError:
            await websocket.accept()
            await websocket.close(code=4409, reason="the VM's console is not there (has it just ended?)")
            return
        await websocket.accept()
        if logs:
            async for chunk in backend.logs(vm, False, None, False):
                await websocket.send_bytes(chunk.encode())

        async def pump_out():
            while data := await reader.read(65536):
                await websocket.send_bytes(data)

        async def pump_in():
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes") or (message.get("text") or "").encode()
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(pump_out()), asyncio.ensure_future(pump_in())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        except (WebSocketDisconnect, OSError):
            pass
        finally:
            for task in tasks:
                task.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await websocket.close()

    return app
