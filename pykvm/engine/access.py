"""Who is calling, and opening host paths with that caller's permissions (issue 12, part 6).

Docker's socket is root-equivalent: whoever can write to it can make dockerd open any file. pykvm's
daemon instead learns each caller's uid and gid from the socket (``SO_PEERCRED``, socket(7)) and
opens every host path a request names *as that caller*: a forked child drops to the caller's
supplementary groups, gid and uid (setgroups, setresgid, setresuid, in that order, so nothing of root
is kept), opens the path, and hands the descriptor back over a socketpair (SCM_RIGHTS, unix(7)).
The kernel itself then decides, with every rule it has (modes, ACLs, directory search bits, LSMs),
exactly as it would for the caller's own ``open``; ``os.access`` would only approximate this and
races with renames. What the child could not open is refused with 403.

The child runs only async-signal-safe system calls between fork and ``_exit``, so forking from the
daemon's threaded process is safe. The VMM is then given the descriptor (``/proc/self/fd/N``), never
the path, so a path swapped after the check changes nothing.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")     # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


@dataclass(frozen=True)
class Caller:
    """A client's credentials, as the kernel reported them when it connected."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()

    @property
    def is_root(self) -> bool:
        return self.uid == 0


class Forbidden(PermissionError):
    """The caller may not open this path (HTTP 403)."""


def peer_credentials(sock: socket.socket) -> Caller:
    """SO_PEERCRED of a connected AF_UNIX socket, with the caller's supplementary groups from /proc."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return Caller(pid, uid, gid, _groups_of(pid, gid))


def _groups_of(pid: int, gid: int) -> tuple[int, ...]:
    """The supplementary groups of ``pid`` (the ``Groups:`` line of /proc/PID/status), else just ``gid``.
    A caller that exited meanwhile gets only its primary group: never more rights than it had."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return (gid,)


def open_as(caller: Caller, path: str, flags: int, what: str) -> int:
    """Open ``path`` with ``flags`` as ``caller`` would; returns an fd the daemon owns (close it).

    Forbidden (403) if the caller has no right to, FileNotFoundError / OSError for the rest (400).
    When the daemon itself is not root it cannot become anyone else: it must be the caller's own
    uid (anyone else cannot connect to its 0600 socket), and opens the path itself.
    """
    if "\0" in path:
        raise OSError(errno.EINVAL, f"{what} path contains a NUL byte")
    flags |= os.O_CLOEXEC | os.O_NOCTTY
    if os.geteuid() != 0 or caller.is_root:
        return _open_checked(path, flags, what)
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:     # the child: drop to the caller, open, send the fd or the errno, exit
        status = 0
        try:
            parent.close()
            os.setgroups(list(caller.groups))
            os.setresgid(caller.gid, caller.gid, caller.gid)
            os.setresuid(caller.uid, caller.uid, caller.uid)
            try:
                fd = os.open(path, flags)
                socket.send_fds(child, [struct.pack("i", 0)], [fd])
            except OSError as e:
                child.sendall(struct.pack("i", e.errno or errno.EIO))
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    child.close()
    try:
        msg, fds, _, _ = socket.recv_fds(parent, 4, 1)
    finally:
        parent.close()
        os.waitpid(pid, 0)
    if len(msg) != 4:
        raise Forbidden(f"cannot check the caller's access to {what} {path}")
    err = struct.unpack("i", msg)[0]
    if err == 0 and fds:
        return _check_regular(fds[0], path, what)
    for fd in fds:
        os.close(fd)
    if err in (errno.EACCES, errno.EPERM):
        raise Forbidden(f"permission denied: uid {caller.uid} may not open {what} {path}")
    raise OSError(err, f"cannot open {what} {path}: {os.strerror(err)}")


def _open_checked(path: str, flags: int, what: str) -> int:
    try:
        fd = os.open(path, flags)
    except PermissionError:
        raise Forbidden(f"permission denied: may not open {what} {path}") from None
    except OSError as e:
        raise OSError(e.errno, f"cannot open {what} {path}: {e.strerror}") from None
    return _check_regular(fd, path, what)


def _check_regular(fd: int, path: str, what: str) -> int:
    """Only regular files: a device or FIFO (/dev/zero, a pipe) could block or never end."""
    import stat
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{what} {path} is not a regular file")
    return fd
