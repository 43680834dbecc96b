"""Trying to get out of the jail (issue 13, part 5): each attempt runs in a process forked from the
test and jailed by the same code as a VMM (pykvm.jail.spawn), and must fail or be killed in the
documented way, leaving the host as it was. Attempts that seccomp stops first are also made with
the filter off, to show the layer beneath holds on its own."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import threading

import pytest
from jail_helpers import assert_nothing_left, mounts, needs_jail

from pykvm.jail import JailConfig, JailError, JailFile, _libc, spawn

pytestmark = needs_jail
LIMIT = 128 << 20


@pytest.fixture
def jail(tmp_path, request):
    """spawn(config, target) with a fresh chroot base; checks afterwards that nothing is left."""
    base = tmp_path / "base"
    base.mkdir()
    before = mounts()
    vm_id = f"t-{os.getpid()}-{request.node.name[-20:].replace('_', '-').strip('-')}"

    def run(target, **options):
        options.setdefault("memory", LIMIT)
        options.setdefault("pids", 16)
        return spawn(JailConfig(id=vm_id, chroot_base=str(base), **options), target)

    yield run
    assert_nothing_left(base, vm_id, before)


def entered(attempt):
    """A target that enters the jail, then makes ``attempt()``; exit status 0 = it failed as it should."""
    def target(entry):
        entry.enter()
        return attempt()
    return target


def expect_errno(call, *codes):
    try:
        call()
    except OSError as e:
        if e.errno in codes:
            return 0
        os.write(2, f"unexpected error: {e}\n".encode())
        return 3
    os.write(2, b"the call succeeded\n")
    return 1


def assert_seccomp_kill(result, name):
    assert result.signal == signal.SIGSYS, result
    assert result.syscall.startswith(f"{name} ("), result
    assert f"killed by seccomp (SIGSYS) for a forbidden system call: {name} (" in result.describe()


# --- reading the host ----------------------------------------------------------------------------
def test_open_host_file_is_killed_by_seccomp(jail):
    assert_seccomp_kill(jail(entered(lambda: open("/etc/hostname").read() and 1)), "openat")


def test_open_host_file_finds_nothing_without_seccomp(jail, tmp_path):
    secret = tmp_path / "state.db"
    secret.write_text("the daemon's state")
    for path in ("/etc/hostname", str(secret), "/proc/self/status"):
        result = jail(entered(lambda p=path: expect_errno(lambda: open(p), errno.ENOENT)), seccomp="off")
        assert result.status == 0, path


def test_root_holds_only_dev_kvm_and_the_given_files_read_only(jail, tmp_path):
    kernel, drive = tmp_path / "vmlinux", tmp_path / "disk.img"
    kernel.write_bytes(b"kernel")
    drive.write_bytes(b"\0" * 512)

    def target(entry):
        drive_fd = os.open("disk.img", os.O_RDWR)    # opened before entering, as the VMM does
        entry.enter()
        if sorted(os.listdir("/")) != ["dev", "disk.img", "run", "vmlinux"] or os.listdir("/dev") != ["kvm"]:
            return 1
        if open("/vmlinux", "rb").read() != b"kernel":
            return 2
        os.pwrite(drive_fd, b"written in jail", 0)
        ro = [bool(os.statvfs(p).f_flag & os.ST_RDONLY) for p in ("/", "/vmlinux", "/disk.img", "/run")]
        if ro != [True, True, False, False]:
            return 3
        run = os.stat("/run")     # the one writable place: the jail's uid's, nobody else's
        if (run.st_uid, run.st_gid, run.st_mode & 0o7777) != (entry.uid, entry.gid, 0o700) or os.listdir("/run"):
            return 5
        with open("/run/written", "w") as f:
            f.write("in the jail's /run")
        if expect_errno(lambda: open("/new-file", "w"), errno.EROFS, errno.EACCES):
            return 4
        return expect_errno(lambda: os.open("/dev/kvm", os.O_RDWR), errno.EACCES)   # root's node, 0660
    files = [JailFile(str(kernel)), JailFile(str(drive), read_only=False)]
    os.chdir(tmp_path)
    assert jail(target, seccomp="off", files=files).status == 0
    assert drive.read_bytes().startswith(b"written in jail") and kernel.read_bytes() == b"kernel"


def test_unprivileged_without_capabilities(jail):
    def attempt():
        if (os.getuid(), os.getgid(), os.getgroups()) != (4242, 4343, []):
            return 1
        if _libc.prctl(_libc.PR_GET_NO_NEW_PRIVS) != 1 or _libc.prctl(_libc.PR_CAPBSET_READ, 21) != 0:
            return 2     # 21 = CAP_SYS_ADMIN
        return expect_errno(lambda: os.setuid(0), errno.EPERM)
    assert jail(entered(attempt), seccomp="off", uid=4242, gid=4343).status == 0


def test_inherited_descriptors_are_closed(jail, tmp_path):
    fd = os.open(tmp_path / "leak", os.O_RDWR | os.O_CREAT)
    try:
        assert jail(entered(lambda: expect_errno(lambda: os.fstat(fd), errno.EBADF)), seccomp="off").status == 0
    finally:
        os.close(fd)


# --- other processes -----------------------------------------------------------------------------
def test_host_processes_are_out_of_sight(jail):
    host_pid = os.getpid()

    def attempt():
        if os.getpid() != 1:      # PID 1 of its own namespace
            return 1
        if expect_errno(lambda: os.listdir("/proc"), errno.ENOENT):
            return 2
        return expect_errno(lambda: os.kill(host_pid, 0), errno.ESRCH)
    assert jail(entered(attempt), seccomp="off").status == 0


def test_signal_the_parent_is_killed_by_seccomp(jail):
    host_pid = os.getpid()
    assert_seccomp_kill(jail(entered(lambda: os.kill(host_pid, signal.SIGTERM))), "kill")


def test_signal_the_parent_fails_without_seccomp(jail):
    host_pid = os.getpid()

    def attempt():
        if os.getppid() != 0:     # the parent is outside the namespace
            return 1
        return expect_errno(lambda: os.kill(host_pid, signal.SIGTERM), errno.ESRCH)
    assert jail(entered(attempt), seccomp="off").status == 0


# --- resources -----------------------------------------------------------------------------------
def test_fork_is_killed_by_seccomp(jail):
    assert_seccomp_kill(jail(entered(os.fork)), "clone")


def test_fork_past_the_pids_limit_fails(jail):
    def attempt():
        made = 0
        try:
            for _ in range(40):
                if os.fork() == 0:
                    signal.pause()    # ends when PID 1 (this process) exits
                made += 1
        except BlockingIOError:
            return 0 if 0 < made < 16 else 1
        return 2
    assert jail(entered(attempt), seccomp="off", pids=16).status == 0


def test_threads_past_the_pids_limit_fail_under_seccomp(jail):
    def attempt():
        stop = threading.Event()
        try:
            for _ in range(40):
                threading.Thread(target=stop.wait, daemon=True).start()
        except RuntimeError:     # "can't start new thread": clone got EAGAIN from the pids controller
            return 0
        return 1
    assert jail(entered(attempt), pids=16).status == 0


def test_allocate_past_the_memory_limit_is_killed_and_reported(jail):
    def attempt():
        hoard = []
        for _ in range(64):                      # up to 512 MiB, touched page by page
            hoard.append(bytearray(8 << 20))
            for i in range(0, 8 << 20, 4096):
                hoard[-1][i] = 1
        return 1
    result = jail(entered(attempt), memory=64 << 20)
    assert result.signal == signal.SIGKILL and result.oom_killed, result
    assert "killed by its memory limit" in result.describe()


# --- forbidden system calls ----------------------------------------------------------------------
def test_socket_af_inet_is_killed_by_seccomp(jail):
    assert_seccomp_kill(jail(entered(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))), "socket")


def test_ptrace_is_killed_by_seccomp(jail):
    libc = ctypes.CDLL(None, use_errno=True)
    host_pid = os.getpid()
    assert_seccomp_kill(jail(entered(lambda: libc.ptrace(16, host_pid, None, None))), "ptrace")   # ATTACH


def test_mount_is_killed_by_seccomp(jail):
    assert_seccomp_kill(jail(entered(lambda: _libc.mount("none", "/", "tmpfs", 0))), "mount")


def test_ptrace_and_mount_fail_without_seccomp(jail):
    libc = ctypes.CDLL(None, use_errno=True)
    host_pid = os.getpid()

    def attempt():
        if libc.ptrace(16, host_pid, None, None) != -1 or ctypes.get_errno() not in (errno.ESRCH, errno.EPERM):
            return 1
        return expect_errno(lambda: _libc.mount("none", "/dev", "tmpfs", 0), errno.EPERM)
    assert jail(entered(attempt), seccomp="off").status == 0


def test_the_network_is_out_of_reach(jail):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def attempt():
        for address in (("127.0.0.1", port), ("192.0.2.1", 80)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(2)
            code = expect_errno(lambda a=address, s=s: s.connect(a), errno.ENETUNREACH)
            if code:
                return code
        return 0
    try:
        assert jail(entered(attempt), seccomp="off").status == 0
    finally:
        listener.close()


# --- the supervisor's side -----------------------------------------------------------------------
def test_a_target_that_never_enters_is_refused(jail):
    with pytest.raises(JailError, match="without entering"):
        jail(lambda entry: 0)


def test_uid_is_distinct_per_vm_by_default(jail):
    first = jail(entered(lambda: 0))
    second = jail(entered(lambda: 0))
    assert first.uid != second.uid and first.uid != 0 and first.gid == first.uid


def test_a_late_import_is_an_import_error_not_a_file_access(jail):
    def attempt():
        try:
            import xml.dom.minidom  # noqa: F401  (not imported before the jail)
        except ImportError:
            return 0
        return 1
    assert jail(entered(attempt)).status == 0


def test_kvm_requests_only_used_to_build_a_vm_are_killed(jail):
    from pykvm.kvm import Ioctl

    def target(entry):
        kvm = os.open("/dev/kvm", os.O_RDWR)    # opened before entering, as the VMM does
        entry.enter()
        import fcntl
        fcntl.ioctl(kvm, Ioctl.KVM_CREATE_VM, 0)   # a second VM from inside the jail
        return 1
    assert_seccomp_kill(jail(target), "ioctl")


def test_resource_limits_are_set(jail):
    import resource

    def attempt():
        got = [resource.getrlimit(r) for r in (resource.RLIMIT_NOFILE, resource.RLIMIT_FSIZE, resource.RLIMIT_CORE)]
        return 0 if got == [(100, 100), (1 << 20, 1 << 20), (0, 0)] else 1
    result = jail(entered(attempt), seccomp="off", resource_limits={"no-file": 100, "fsize": 1 << 20})
    assert result.status == 0


def test_netns_joins_the_given_network_namespace(jail):
    import shutil
    import subprocess
    if not shutil.which("ip"):
        pytest.skip("needs ip(8) to make a network namespace")
    name = f"pykvm-jail-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "tuntap", "add", "pykvmd0", "mode", "tap"], check=True)

        def attempt():
            return 0 if "pykvmd0" in [n for _, n in socket.if_nameindex()] else 1
        assert jail(entered(attempt), seccomp="off", netns=f"/run/netns/{name}").status == 0
        assert jail(entered(lambda: 1 - attempt()), seccomp="off").status == 0    # a new one: not there
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


_PRELOAD_SEALS = """
import sys
from pykvm.jail.supervisor import preload
before = sys.path_importer_cache
entries = len(before)
preload()
try:
    import xdrlib   # a module nobody imported: no file-system lookup any more
    sealed = False
except ModuleNotFoundError:
    sealed = True
print(sealed, entries > 0, len(before) >= entries, sys.path_importer_cache == {})
"""


def test_preload_seals_imports_without_freeing_the_finders_a_zygote_made():
    """After the jail's pre-import step a new module cannot be imported (no file-system lookup), and the import
    system's old finder cache is set aside, not emptied: in a VMM forked from the engine's zygote, freeing the
    zygote's finders would copy every page they are on into the VMM."""
    import subprocess
    import sys
    from pathlib import Path
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", _PRELOAD_SEALS], capture_output=True, timeout=60,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.split() == [b"True"] * 4
