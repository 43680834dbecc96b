"""The per-VM shim: the process between the daemon and one VMM (issue 12, part 3).

As containerd's shim does for a container, ``python -m pykvm.engine.shim VMDIR`` is started by the
daemon in a new session (so it outlives the daemon and ignores the daemon's terminal), starts the VMM
with ``VMDIR/shim.json``'s argv, and then owns everything the VMM's lifetime needs:

- the VMM's stdout and stderr (the serial console and pykvm's own messages) go to the rotated
  ``console.log`` and to every client attached on ``console.sock`` (0600);
- bytes from attached clients go to the VMM's stdin (the guest's console input);
- being the VMM's parent, it reaps it and writes ``exit.json`` (``{"ExitCode", "FinishedAt",
  "Signal"}``, atomically) before it exits, so a daemon that was down meanwhile still learns how
  the VM ended. While the shim lives, ``vmm.pid`` names a process that cannot have been recycled.

One thread, one selector; a client that reads too slowly is dropped rather than slowing the guest.
"""

from __future__ import annotations

import errno
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .logs import LogWriter

CLIENT_BACKLOG = 1 << 20     # bytes queued for one attached client before it is dropped
INPUT_BACKLOG = 1 << 16      # bytes queued for the VMM's stdin before clients are no longer read


def write_atomic(path: Path, data: dict) -> None:
    """Write JSON to ``path`` so a reader sees the old file or the whole new one, even across a crash."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def listen_private(path: Path, backlog: int) -> socket.socket:
    """A Unix socket listening at ``path``, its file born 0600 (no moment where others could connect)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    except OSError:
        listener.close()
        raise
    finally:
        os.umask(old)
    listener.listen(backlog)
    return listener


class Shim:
    def __init__(self, vmdir: Path, config: dict | None = None, spawn=None) -> None:
        """``config``: shim.json's content (read from ``vmdir`` if not given); ``spawn(argv, pass_fds)``:
        starts the VMM with the shim's pipes as its stdin and stdout (default: a new process,
        subprocess.Popen; the zygote passes a fork, :class:`pykvm.engine.zygote.ForkedVmm`)."""
        self.vmdir = vmdir
        if config is None:
            config = json.loads((vmdir / "shim.json").read_text())
        self.spawn = spawn or _popen
        self.argv: list[str] = config["argv"]
        self.pass_fds: list[int] = config.get("pass_fds", [])
        self.log = LogWriter(vmdir / "console.log", config.get("log_max_size", 1 << 20),
                             config.get("log_max_files", 3))
        self.sel = selectors.DefaultSelector()
        self.clients: dict[socket.socket, bytearray] = {}
        self.to_vmm = bytearray()

    def run(self) -> int:
        sock_path = self.vmdir / "console.sock"
        sock_path.unlink(missing_ok=True)
        listener = listen_private(sock_path, 16)
        listener.setblocking(False)
        try:
            proc = self.spawn(self.argv, self.pass_fds)
        except OSError as e:
            self.log.write(f"pykvm: cannot start the VMM: {e}\n".encode())
            write_atomic(self.vmdir / "exit.json", {"ExitCode": 127, "FinishedAt": time.time(), "Signal": None,
                                                    "Error": f"cannot start the VMM: {e}"})
            return 127
        for fd in self.pass_fds:    # the VMM has its copies; ours would keep files open for nothing
            os.close(fd)
        write_atomic(self.vmdir / "vmm.pid", {"pid": proc.pid})
        signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
        self.stdin, self.stdout = proc.stdin.fileno(), proc.stdout.fileno()
        os.set_blocking(self.stdin, False)
        os.set_blocking(self.stdout, False)
        self.sel.register(listener, selectors.EVENT_READ, "accept")
        self.sel.register(self.stdout, selectors.EVENT_READ, "vmm")
        open_out = True
        while open_out:
            for key, mask in self.sel.select(timeout=1.0):
                what = key.data
                if what == "accept":
                    self._accept(listener)
                elif what == "vmm":
                    open_out = self._from_vmm()
                elif what == "stdin":
                    self._to_vmm()
                else:
                    self._client(key.fileobj, mask)
        status = proc.wait()
        message = getattr(proc, "message", None)    # a jail's end the status does not tell (zygote.JailedVmm)
        if message:
            import textwrap
            self.log.write((textwrap.fill(message, width=100, initial_indent="pykvm: ", subsequent_indent="  ",
                                          break_long_words=False) + "\n").encode())
        signum = -status if status < 0 else None
        code = 128 + signum if signum else status
        self.log.close()
        write_atomic(self.vmdir / "exit.json", {"ExitCode": code, "FinishedAt": time.time(), "Signal": signum})
        for client in list(self.clients):
            client.close()
        listener.close()
        sock_path.unlink(missing_ok=True)
        return 0

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except OSError:
            return
        client.setblocking(False)
        self.clients[client] = bytearray()
        self.sel.register(client, selectors.EVENT_READ, "client")

    def _from_vmm(self) -> bool:
        try:
            data = os.read(self.stdout, 65536)
        except BlockingIOError:
            return True
        if not data:
            self.sel.unregister(self.stdout)
            return False
        self.log.write(data)
        for client, queue in list(self.clients.items()):
            if len(queue) + len(data) > CLIENT_BACKLOG:
                self._drop(client)
                continue
            was_empty = not queue
            queue += data
            if was_empty:
                self._flush(client)
        return True

    def _client(self, client: socket.socket, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(client)
        if mask & selectors.EVENT_READ and client in self.clients:
            try:
                data = client.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._drop(client)
                return
            self.to_vmm += data
            self._to_vmm()

    def _to_vmm(self) -> None:
        try:
            n = os.write(self.stdin, self.to_vmm) if self.to_vmm else 0
        except BlockingIOError:
            n = 0
        except OSError:             # the VMM closed its stdin or ended: input has nowhere to go
            n = len(self.to_vmm)
        del self.to_vmm[:n]
        want = selectors.EVENT_WRITE if self.to_vmm else 0
        try:
            if want and self._registered(self.stdin):
                self.sel.modify(self.stdin, want, "stdin")
            elif want:
                self.sel.register(self.stdin, want, "stdin")
            elif self._registered(self.stdin):
                self.sel.unregister(self.stdin)
        except (ValueError, OSError):
            pass
        # Back-pressure: stop reading clients while the VMM's input is full.
        for client in self.clients:
            events = selectors.EVENT_WRITE if self.clients[client] else 0
            if len(self.to_vmm) < INPUT_BACKLOG:
                events |= selectors.EVENT_READ
            self._set(client, events)

    def _flush(self, client: socket.socket) -> None:
        queue = self.clients.get(client)
        if queue is None:
            return
        try:
            n = client.send(queue)
        except BlockingIOError:
            n = 0
        except OSError:
            self._drop(client)
            return
        del queue[:n]
        events = selectors.EVENT_READ if len(self.to_vmm) < INPUT_BACKLOG else 0
        self._set(client, events | (selectors.EVENT_WRITE if queue else 0))

    def _set(self, client: socket.socket, events: int) -> None:
        """Watch ``client`` for ``events``; none (its input is held back and it has nothing queued):
        not watched at all until the VMM's input drains."""
        try:
            if not events:
                if self._registered(client):
                    self.sel.unregister(client)
            elif self._registered(client):
                self.sel.modify(client, events, "client")
            else:
                self.sel.register(client, events, "client")
        except (KeyError, ValueError, OSError):
            pass

    def _registered(self, fd: int) -> bool:
        try:
            self.sel.get_key(fd)
            return True
        except KeyError:
            return False

    def _drop(self, client: socket.socket) -> None:
        self.clients.pop(client, None)
        if self._registered(client):
            self.sel.unregister(client)
        client.close()


def _popen(argv: list[str], pass_fds: list[int]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            pass_fds=pass_fds, close_fds=True)


def main(argv: list[str] | None = None, spawn=None, config: dict | None = None) -> int:
    """``python -m pykvm.engine.shim VMDIR``; the zygote calls it in-process with its ``spawn`` and the
    request as ``config`` (see :class:`Shim`)."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m pykvm.engine.shim VMDIR", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        return Shim(Path(args[0]), config, spawn).run()
    except OSError as e:
        if e.errno == errno.ENOENT:
            print(f"shim: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
