"""The VMM's seccomp filter (seccomp(2), Documentation/userspace-api/seccomp_filter.rst), built
with libseccomp through the ``pyseccomp`` binding (ctypes over the system's libseccomp.so.2).

Filters per thread kind. Without an API socket, one filter for the whole process
(:data:`ALLOWED`), loaded with SECCOMP_FILTER_FLAG_TSYNC so the device threads already running
get it too, and inherited by the vCPU threads Machine.run starts later. With an API socket
(``JailConfig.api_sock``) two, stacked (a call must pass both; seccomp(2)):

- the *API* filter, :data:`ALLOWED` + :data:`API_ALLOWED`, loaded with TSYNC on every thread
  started before the jail: the API server's event loop and its workers (accept4, recvfrom,
  sendto, epoll on the listening socket bound before the jail -- never socket, bind or connect),
  the controller thread that writes snapshots, metrics and logs (openat, pwrite64, rename...,
  inside the jail's root, whose only writable place is /run), the device and output threads;
- the *vCPU* filter, :data:`ALLOWED` again, loaded right after on the main thread alone (no
  TSYNC): it and every thread it starts afterwards -- the vCPU threads, the console's -- keep the
  short list, so the threads that run the exit handlers cannot open a file or accept a
  connection.

Why threads started before the jail can be trusted with openat: the VMM made its own mount
namespace before it started any thread (namespaces.new_mount_namespace), so the pivot moved every
thread's root into the jail; none can name a host file. What the filters allow was derived by
tracing: see the README's jail section (strace -f of jailed runs of every bundled guest, the small
Linux with a virtio disk and the console, a session on the API socket, keeping the calls made after
the filter's own seccomp() call; ``python -m pykvm.jail.derive`` splits them by thread kind).

- ``ioctl`` only with the KVM requests pykvm issues while a VM runs (pykvm.kvm.Ioctl less the
  ones only used to build it, :data:`KVM_SETUP_ONLY`) and the terminal requests
  the console makes (:data:`TERMINAL_IOCTLS`), compared on the low 32 bits (the kernel's
  ``unsigned int cmd``).
- ``clone`` only for threads (CLONE_THREAD set): the VMM cannot fork. ``clone3`` fails with
  ENOSYS (its flags are in memory, out of a filter's reach), so glibc falls back to clone.
- Anything else traps (SECCOMP_RET_TRAP): the kernel does not run the call and sends SIGSYS with
  the call's number in siginfo; our handler writes "syscall NR" on the report pipe to the
  supervisor and exits with :data:`DIE_STATUS`, an exit_group argument the filter answers with
  SECCOMP_RET_KILL_PROCESS -- so the process always dies *by SIGSYS*, and the supervisor names
  the call. The handler is best effort (see ``install``): if it cannot report, the next
  forbidden call kills the process all the same, reported as "a forbidden system call".
  (Why not KILL_PROCESS for everything: then nobody learns which call it was. Why the
  detour through exit_group: the VMM is PID 1 of its PID namespace, and the kernel ignores a
  signal PID 1 sends itself.) Should the handler itself fail, SIGSYS is blocked while it runs,
  and a blocked forced SIGSYS kills the process anyway.
- A call made through another ABI (int 0x80, x32) kills the process at once.
"""

from __future__ import annotations

import ctypes
import os

from .config import JailError

# System calls a jailed pykvm VMM makes after the filter is loaded (x86-64): the 26 seen by
# tracing (README, "The jail": every bundled guest, --trace/--stats, a crash report, the console on
# a pty, the small Linux with virtio disks, rng and console, and with the UART console), plus 3
# from reading the code: fdatasync (virtio-blk without VIRTIO_BLK_F_FLUSH is write-through), brk
# and mremap (glibc's malloc growing the heap or a large block), readv and writev (virtio-net's
# receive and transmit on the TAP). rt_sigtimedwait: a vCPU thread consumes its pending kick
# (SIGUSR1, blocked outside KVM_RUN) with it. pipe2: the host console's wake pipe, made when the
# console starts, after the jail (a pipe opens nothing on the host). restart_syscall: the kernel's
# own continuation of a sleep with a timeout (futex, clock_nanosleep, poll) that a signal woke without
# running a handler in that thread -- a SIGTERM taken by another thread does that: refusing it killed
# a jailed VMM told to end (`pykvm kill -s TERM`: status 4 for 143). ioctl, clone and exit_group are
# allowed with conditions on their arguments (see build).
ALLOWED = (
    # the exit loop, devices and the console: I/O on descriptors opened before the jail
    "read", "write", "readv", "writev", "preadv2", "pwritev2", "fsync", "fdatasync", "close", "newfstatat",
    "poll", "pselect6", "pipe2",
    # the interpreter: memory, threads, locks, time, signals, randomness (virtio-rng: os.urandom)
    "mmap", "munmap", "mprotect", "madvise", "mremap", "brk",
    "futex", "set_robust_list", "rseq", "clock_nanosleep",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigtimedwait", "tgkill", "getpid", "gettid",
    "getrandom", "exit", "restart_syscall",
)
# What the API's threads make besides ALLOWED (traced: a session of every route on a jailed VMM's
# socket, and the VMM ending with clients connected). The event loop (asyncio, uvicorn) on the
# socket bound before the jail: accept4, epoll_wait/epoll_ctl, recvfrom/sendto, getsockname and
# getpeername (each new connection's addresses), shutdown (a connection's write side closed). The
# engine's VMMs start that server on its first connection, in the jail (api.server.ApiServer, lazy):
# its event loop's epoll_create1 and self-pipe (socketpair, AF_UNIX only: see build), and listen (asyncio
# listens again on the socket that already listens). None reaches anything outside the process: without
# socket, bind and connect, no other socket can be named. The
# controller's files, inside the jail's /run (snapshot state and memory, metrics, log): openat, lseek,
# pwrite64 and ftruncate (the memory file), rename (the state file is written beside and renamed),
# unlink (a failed write removes its partial file). seccomp: the main thread loads the vCPU filter
# after this one (SECCOMP_SET_MODE_FILTER with no flags only: it can only add restrictions).
API_ALLOWED = (
    "accept4", "listen", "epoll_create1", "epoll_wait", "epoll_ctl", "recvfrom", "sendto", "getsockname",
    "getpeername", "shutdown",
    "openat", "lseek", "pwrite64", "ftruncate", "rename", "unlink",
)
# FIONBIO: asyncio makes each accepted connection non-blocking (Python's setblocking is this ioctl)
API_IOCTLS = {"FIONBIO": 0x5421}
# KVM_GET_MSR_INDEX_LIST: a snapshot lists the MSRs to save (read-only, on /dev/kvm's descriptor)
API_KVM_IOCTLS = {"KVM_GET_MSR_INDEX_LIST"}
SECCOMP_SET_MODE_FILTER = 1
# KVM requests pykvm issues only while building the VM, before the jail: refused afterwards, so a
# compromised VMM cannot make new VMs or vCPUs, or remap guest memory.
KVM_SETUP_ONLY = {"KVM_GET_API_VERSION", "KVM_CREATE_VM", "KVM_GET_MSR_INDEX_LIST", "KVM_CHECK_EXTENSION",
                  "KVM_GET_VCPU_MMAP_SIZE", "KVM_GET_SUPPORTED_CPUID", "KVM_CREATE_VCPU",
                  "KVM_SET_USER_MEMORY_REGION", "KVM_SET_TSS_ADDR", "KVM_SET_IDENTITY_MAP_ADDR",
                  "KVM_CREATE_IRQCHIP", "KVM_IRQFD", "KVM_CREATE_PIT2", "KVM_IOEVENTFD", "KVM_ENABLE_CAP",
                  "KVM_SET_CPUID2"}
# termios(3) requests (asm-generic/ioctls.h) the console issues on a terminal
TERMINAL_IOCTLS = {"TCGETS": 0x5401, "TCSETSW": 0x5403, "TCSETSF": 0x5404}
# TUNSETOFFLOAD (_IOW('T', 208, unsigned int)): virtio-net tells its TAP the offloads the guest's driver
# accepted when the driver activates the device -- after the jail (pykvm/devices/tap.py)
TAP_IOCTLS = {"TUNSETOFFLOAD": 0x400454D0}
DIE_STATUS = 0x5ECC0   # exit_group(DIE_STATUS) is killed by the filter: death by SIGSYS
CLONE_THREAD = 0x00010000
AF_UNIX = 1
ENOSYS = 38
SIGSYS = 31


def _binding():
    try:
        import pyseccomp
        pyseccomp.system_arch()
    except (ImportError, OSError, AttributeError) as e:
        raise JailError(f"seccomp needs libseccomp and its Python binding pyseccomp ({e}); install "
                        "libseccomp2 and `pip install pyseccomp`, or run with --seccomp off") from None
    return pyseccomp


def available() -> str | None:
    """None if a filter can be built here, else why not."""
    try:
        _binding()
    except JailError as e:
        return str(e)
    return None


def kvm_ioctls() -> dict[str, int]:
    """The KVM requests pykvm issues while a VM runs (pykvm.kvm.Ioctl without KVM_SETUP_ONLY):
    name -> request number."""
    from ..kvm import Ioctl
    return {i.name: int(i) for i in Ioctl if i.name not in KVM_SETUP_ONLY}


def api_kvm_ioctls() -> dict[str, int]:
    """The KVM requests the API's threads may issue besides :func:`kvm_ioctls`: name -> number."""
    from ..kvm import Ioctl
    return {i.name: int(i) for i in Ioctl if i.name in API_KVM_IOCTLS}


def build(mode: str = "kill", kind: str = "process"):
    """A filter as a pyseccomp.SyscallFilter, not loaded. ``mode`` "kill" or "log" (every call
    outside the list is allowed but logged by the kernel: for deriving the list). ``kind``:
    "process" (:data:`ALLOWED`, for every thread, TSYNC), "api" (ALLOWED + API_ALLOWED, for every
    thread, TSYNC) or "vcpu" (ALLOWED, for the calling thread and those it starts later; loaded
    after "api")."""
    sc = _binding()
    default = sc.TRAP if mode == "kill" else sc.LOG
    filt = sc.SyscallFilter(default)
    filt.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    filt.set_attr(sc.Attr.CTL_TSYNC, 0 if kind == "vcpu" else 1)
    if kind == "vcpu":
        filt.set_attr(sc.Attr.CTL_NNP, 0)     # set already (credentials.drop): no prctl needed to load it
    requests = {*kvm_ioctls().values(), *TERMINAL_IOCTLS.values(), *TAP_IOCTLS.values()}
    names = ALLOWED
    if kind == "api":
        names += API_ALLOWED
        requests |= {*API_IOCTLS.values(), *api_kvm_ioctls().values()}
        filt.add_rule(sc.ALLOW, "seccomp", sc.Arg(0, sc.EQ, SECCOMP_SET_MODE_FILTER), sc.Arg(1, sc.EQ, 0))
        filt.add_rule(sc.ALLOW, "socketpair", sc.Arg(0, sc.EQ, AF_UNIX))
    for name in names:
        filt.add_rule(sc.ALLOW, name)
    for request in sorted(requests):
        filt.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFF_FFFF, request))
    filt.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_THREAD, CLONE_THREAD))
    filt.add_rule(sc.ERRNO(ENOSYS), "clone3")
    filt.add_rule(sc.ALLOW, "exit_group", sc.Arg(0, sc.NE, DIE_STATUS))
    filt.add_rule(sc.KILL_PROCESS, "exit_group", sc.Arg(0, sc.EQ, DIE_STATUS))
    return filt


_prebuilt: dict = {}     # (mode, kind) -> a filter built ahead (prebuild), used once by install


def prebuild() -> None:
    """Build the "kill" filters now (about a hundred rules each), so that a process forked from this
    one loads them without building them first: the engine's zygote calls this once, and every jailed
    VMM it forks saves that time on its way to the guest's first instruction."""
    for kind in ("process", "api", "vcpu"):
        _prebuilt[("kill", kind)] = build("kill", kind)


def counts(kind: str = "process") -> dict[str, int]:
    """How much the filter of ``kind`` (see :func:`build`) allows: system calls (ioctl, clone,
    exit_group and, for "api", seccomp and socketpair counted: allowed with conditions), and ioctl requests."""
    out = {"syscalls": len(ALLOWED) + 3, "kvm_ioctls": len(kvm_ioctls()), "terminal_ioctls": len(TERMINAL_IOCTLS),
           "tap_ioctls": len(TAP_IOCTLS)}
    if kind == "api":
        out["syscalls"] += len(API_ALLOWED) + 2
        out["kvm_ioctls"] += len(api_kvm_ioctls())
        out["socket_ioctls"] = len(API_IOCTLS)
    return out


def syscall_name(nr: int) -> str:
    """The x86-64 name of system call ``nr`` ("socket"), or "syscall NR" if unknown."""
    try:
        sc = _binding()
        return sc.resolve_syscall(sc.Arch.X86_64, nr).decode()
    except Exception:
        return f"syscall {nr}"


# --- the SIGSYS handler ---------------------------------------------------------------------
class _Sigaction(ctypes.Structure):   # glibc's struct sigaction on x86-64
    _fields_ = [("sa_sigaction", ctypes.c_void_p), ("sa_mask", ctypes.c_ulong * 16),
                ("sa_flags", ctypes.c_int), ("sa_restorer", ctypes.c_void_p)]


SA_SIGINFO = 4
SA_RESETHAND = 0x80000000
_SIGSYS_SYSCALL_AT = 24     # siginfo_t: signo, errno, code, pad, then _sigsys {call_addr, syscall, arch}
_HANDLER_TYPE = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
_state: dict = {}


def _on_sigsys(signum: int, info: int, context: int) -> None:
    nr = ctypes.c_int.from_address(info + _SIGSYS_SYSCALL_AT).value
    fd = _state.get("report_fd")
    if fd is not None:
        try:
            os.write(fd, b"syscall %d\n" % nr)
        except OSError:
            pass
    os._exit(DIE_STATUS)


def install(report_fd: int | None, mode: str = "kill", api: bool = False) -> None:
    """Load the filters: "process" on every thread; with ``api``, "api" on every thread, then
    "vcpu" on the calling thread (see the module doc). With "kill", first install the SIGSYS
    handler that reports the forbidden call on ``report_fd``. The calling process must have
    no_new_privs set."""
    kinds = ("api", "vcpu") if api else ("process",)
    filters = [_prebuilt.pop((mode, kind), None) or build(mode, kind) for kind in kinds]
    if mode == "kill":
        _state["report_fd"] = report_fd
        _state["handler"] = handler = _HANDLER_TYPE(_on_sigsys)   # kept alive: libc holds its address
        action = _Sigaction()
        action.sa_sigaction = ctypes.cast(handler, ctypes.c_void_p).value
        # SA_RESETHAND: should the handler ever return (it cannot run Python code in a thread that
        # has no interpreter state yet), the next forbidden call finds SIGSYS at its default: death
        action.sa_flags = SA_SIGINFO | SA_RESETHAND
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.sigaction(SIGSYS, ctypes.byref(action), None) != 0:
            raise OSError(ctypes.get_errno(), "sigaction(SIGSYS)")
    for filt in filters:
        filt.load()
