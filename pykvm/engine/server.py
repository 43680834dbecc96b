"""``pykvm daemon``: bind the Unix socket, serve the API with uvicorn (issue 12, parts 1 and 6).

The socket is created here, not by uvicorn (which would make it 0666): 0660 root:pykvm when the
daemon runs as root (the group is created if missing), 0600 otherwise. Each connection's peer
credentials (SO_PEERCRED) are read once when it is accepted and travel with every request in the ASGI
scope's state. Limits against hostile clients: request headers must arrive within
``HEADER_TIMEOUT`` seconds of connecting (a half-open or slow client is dropped), bodies are at most
``MAX_BODY`` bytes and must arrive at one chunk per ``BODY_TIMEOUT`` seconds; h11 limits header size.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import grp
import json
import logging
import os
import signal
import socket
import stat
import subprocess
from pathlib import Path
from urllib.parse import parse_qsl

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import PykvmError, UsageError
from .access import peer_credentials
from .backend import Backend
from .routes import API_VERSION, make_app

log = logging.getLogger("pykvm.engine")

MAX_BODY = 1 << 20          # bytes
BODY_TIMEOUT = 10.0         # seconds between two chunks of one request body
HEADER_TIMEOUT = 10.0       # seconds from connecting to a complete request head
GROUP = "pykvm"


class PeerCredProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus: the caller's credentials in ``scope["state"]["caller"]``, and a
    deadline for the first request's head (uvicorn arms its keep-alive timer only after a response)."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        try:
            caller = peer_credentials(sock)
        except (OSError, AttributeError):
            transport.close()
            return
        self.app_state = dict(self.app_state, caller=caller)
        self.timeout_keep_alive_task = self.loop.call_later(HEADER_TIMEOUT, self.timeout_keep_alive_handler)


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


class Limits:
    """ASGI middleware: refuse bodies over ``MAX_BODY`` (413) and bodies that stall (408)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or (scope["method"] == "POST" and scope["path"].endswith("/attach")):
            return await self.app(scope, receive, send)     # a console session: input for as long as it lasts
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    too_big = int(value) > MAX_BODY
                except ValueError:
                    too_big = False
                if too_big:
                    return await _error(send, 413, f"request body over {MAX_BODY} bytes")
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            try:
                message = await asyncio.wait_for(receive(), BODY_TIMEOUT)
            except asyncio.TimeoutError:
                raise _TooSlow() from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > MAX_BODY:
                    raise _TooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _error(send, 413, f"request body over {MAX_BODY} bytes")
        except _TooSlow:
            if not started:
                await _error(send, 408, f"the request body stalled for {BODY_TIMEOUT:.0f} s")


class Shutdown:
    """ASGI middleware for the requests still running when the daemon stops (``wait``, ``logs -f``, ``events``,
    ``stats``, attach): uvicorn cancels them after its graceful timeout. One that has not answered yet gets
    503 ``{"message"}``; a stream already under way is cut (left incomplete, so the client knows it did not
    end), a WebSocket closed with 1001 (going away). Without this the cancellation escaped the application: a
    traceback in the daemon's log and a bare 500 "Internal Server Error" for the client."""

    def __init__(self, app) -> None:
        self.app = app
        self.stopping = lambda: False       # serve() points it at the uvicorn server's should_exit

    MESSAGE = "the pykvm daemon is shutting down (its VMs keep running): ask again once it is back"

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] in ("http.response.start", "websocket.accept"):
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not self.stopping():
                raise
            with contextlib.suppress(Exception):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1001, "reason": self.MESSAGE[:120]})
                elif not started:
                    await _error(send, 503, self.MESSAGE)


TRUE, FALSE = {"1", "true", "on", "yes", "t", "y"}, {"0", "false", "off", "no", "f", "n"}


class FastPaths:
    """ASGI middleware answering the two calls clients poll most, ``GET /_ping`` and ``GET /vms/json``
    (``docker ps``; with no query but ``all``), without the framework's routing, validation and encoding:
    the list comes as ready bytes from :meth:`Backend.list_json`. Anything else, or any other query,
    goes to the application, which answers the same calls identically."""

    def __init__(self, app, backend: Backend, api_version: str) -> None:
        self.app, self.backend = app, backend
        self.ping_headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"2"),
                             (b"api-version", api_version.encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "GET":
            if scope["path"] == "/_ping":
                await send({"type": "http.response.start", "status": 200, "headers": self.ping_headers})
                await send({"type": "http.response.body", "body": b"OK"})
                return
            if scope["path"] == "/vms/json":
                body = self._list(scope)
                if body is not None:
                    await send({"type": "http.response.start", "status": 200, "headers": [
                        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                    await send({"type": "http.response.body", "body": body})
                    return
        return await self.app(scope, receive, send)

    def _list(self, scope) -> bytes | None:
        caller = (scope.get("state") or {}).get("caller")
        if caller is None:
            return None
        all_ = False
        for key, value in parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True):
            if key != "all" or value.lower() not in TRUE | FALSE:
                return None
            all_ = value.lower() in TRUE
        return self.backend.list_json(all_, None if caller.is_root else caller.uid)


async def _error(send, status: int, message: str) -> None:
    body = json.dumps({"message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _group_id() -> int:
    """The gid of the ``pykvm`` group, created (as a system group) if missing."""
    try:
        return grp.getgrnam(GROUP).gr_gid
    except KeyError:
        pass
    try:
        subprocess.run(["groupadd", "--system", GROUP], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        raise PykvmError(f"cannot create the {GROUP} group for the socket: {e}") from None
    return grp.getgrnam(GROUP).gr_gid


def bind_socket(path: Path) -> socket.socket:
    """A listening socket at ``path`` with the modes the module docstring states. UsageError if another
    daemon answers there; a stale socket file left by a killed daemon is replaced."""
    root = os.geteuid() == 0
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755 if root else 0o700)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):    # connect() to a plain file also says ECONNREFUSED
            raise UsageError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise UsageError(f"another daemon already listens on {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)
        except OSError as e:
            raise UsageError(f"{path} exists and no daemon answers there ({e.strerror}); remove it") from None
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot bind {path}: {e.strerror}") from None
    finally:
        os.umask(old)
    if root:
        os.chown(path, 0, _group_id())
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)
    sock.listen(128)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, ending gracefully on SIGINT, SIGTERM and SIGHUP without re-raising the signal
    afterwards (uvicorn's own handling does, which killed the daemon before it removed its socket file)."""

    @contextlib.contextmanager
    def capture_signals(self):
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        old = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)


async def serve(socket_path: Path, state_dir: Path, memory_budget: int | None, jail: bool = True,
                bridge=None) -> None:
    """Run the daemon until SIGINT, SIGTERM or SIGHUP, then remove its socket file; the VMs keep running."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)
    lock = open(state_dir / "daemon.lock", "w")   # noqa: SIM115 - held for the daemon's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise UsageError(f"another pykvm daemon uses the state directory {state_dir}") from None
    backend = Backend(state_dir, memory_budget, jail=jail, bridge=bridge)
    sock = None
    try:
        await backend.adopt()
        sock = bind_socket(socket_path)
        guard = Shutdown(Limits(make_app(backend)))
        config = uvicorn.Config(FastPaths(guard, backend, API_VERSION), http=PeerCredProtocol,
                                ws="websockets-sansio", log_level="warning", access_log=False, timeout_keep_alive=5,
                                timeout_graceful_shutdown=2, h11_max_incomplete_event_size=16384, lifespan="off")
        server = _Server(config)
        guard.stopping = lambda: server.should_exit
        log.info("pykvm daemon on %s, state in %s, memory budget %d MiB", socket_path, state_dir,
                 (backend.memory_budget or 0) >> 20)
        await server.serve(sockets=[sock])
    finally:
        backend.close()
        if sock is not None:
            sock.close()
            with contextlib.suppress(OSError):
                socket_path.unlink()
        lock.close()
