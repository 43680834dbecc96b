"""A jailed VMM for the daemon (issue 13, part 4): ``python -m pykvm.engine.jailrun VMDIR ID BASE -- run ARGS``.

The shim starts this instead of ``pykvm run`` when the daemon jails its VMMs. It is ``pykvm run
--jail`` (the same :func:`pykvm.jail.spawn`, the same limits: memory = guest RAM + the VMM's
overhead, pids = vCPUs + the VMM's threads, a distinct uid per VM) with two things the daemon
needs that the command line does not give:

- the files the daemon opened with its caller's permissions reach the VMM as ``/proc/self/fd/N``:
  those descriptors are kept across the jail's closing of inherited descriptors (``keep_fds``),
  so the jailed VMM opens exactly what the caller was allowed to open, never a path again; they
  are therefore not bind-mounted into its root (it needs no name for them);
- this process is the jail's supervisor (``spawn(inline=True)``): it creates the cgroup and the root,
  forks the VMM into its PID namespace, waits for it and cleans up. SIGTERM and the like to it kill
  the VMM and it then ends by the same signal; the daemon sends SIGKILL to the jailed VMM itself
  (``jail.json``'s pid), so the cleanup still runs;
- before entering the jail, the jailed process writes ``VMDIR/jail.json`` (its host pid, uid,
  gid, jail id and root directory) for ``pykvm inspect``, the daemon's snapshots (the files the VMM
  writes to its /run are ``Root/run/...`` on the host) and the tests.

With ``--api-sock VMDIR/api.sock`` the VMM serves its API from the jail (pykvm.jail: bound before
the jail, published once it is in). ``run --restore /proc/self/fd/N --mem-file /proc/self/fd/M``
continues a snapshot in the jail: loaded before the jail from descriptors the daemon opened, as
the kernel and drives are (a VMM in its jail can no longer create a VM).

The jail's id is the VM directory's name (16 hex digits), its chroot base ``STATE/jail``: the
supervisor removes the cgroup and the root directory when the VMM ends, as for ``pykvm jail``.
The console is unchanged: the VMM's stdin/stdout are the shim's pipes, kept by the jail.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from ..errors import PykvmError


def _host_pid() -> int:
    """This process's pid in the host's PID namespace (the jail's process is PID 1 of its own;
    /proc is still the host's here, before the jail's pivot): NSpid's first field."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[1])
    return os.getpid()


USAGE = "usage: python -m pykvm.engine.jailrun VMDIR ID CHROOT_BASE -- run ARGS"


def prepare(args: list[str]):
    """``(config, target, keep_fds)`` for :func:`pykvm.jail.spawn` (or :class:`pykvm.jail.supervisor.Supervised`)
    from jailrun's arguments (``VMDIR ID CHROOT_BASE -- run ARGS``). PykvmError for bad arguments
    (SystemExit: argparse already said why)."""
    from .. import cli
    if len(args) < 5 or args[3] != "--" or args[4] != "run":
        raise cli.UsageError(USAGE)
    vmdir, jail_id, base = Path(args[0]), args[1], args[2]
    run = cli.build_parser().parse_args(args[4:])
    run.jail = True
    run.jail_options = argparse.Namespace(id=jail_id, chroot_base=base)
    os.makedirs(base, 0o755, exist_ok=True)
    if run.restore is not None or run.config_file is not None:    # a snapshot to continue
        vmm = cli._jailed_serve_target(run, cli._run_vmm_actions(run))
    else:
        from ..debug import inside
        debug_options = cli._debug_options(run)
        inside.check(debug_options)
        plan = cli._plan_for(run)
        vmm = lambda entry: cli._jailed_boot(run, plan, None, inside, debug_options, entry)  # noqa: E731
    given = (run.kernel, run.initrd, *run.drive, run.restore, run.mem_file)
    keep = tuple(int(p.split(",")[0][len("/proc/self/fd/"):]) for p in given
                 if p and p.split(",")[0].startswith("/proc/self/fd/"))

    def target(entry) -> int:
        record = {"Pid": _host_pid(), "Uid": entry.uid, "Gid": entry.gid, "Id": jail_id, "Root": entry.root}
        tmp = vmdir / "jail.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, vmdir / "jail.json")
        return vmm(entry)

    config = cli._jail_config(run)
    # The files come as descriptors: the VMM reads them through those, opened before it enters the
    # jail, so its root needs no name for them (and a bind mount from /proc/self/fd/N, whose mount is
    # in the host's namespace, is refused by mount(2) in the jail's new one: EINVAL).
    config.files = [f for f in config.files if not f.path.startswith("/proc/self/fd/")]
    return config, target, keep


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 5 or args[3] != "--" or args[4] != "run":
        print(USAGE, file=sys.stderr)
        return 2
    from .. import cli
    try:
        config, target, keep = prepare(args)
        from ..jail import spawn
        # This process supervises the jail itself (no supervisor process of its own): one process fewer per VM
        result = spawn(config, target, keep_fds=keep, inline=True)
    except PykvmError as e:
        cli._say(str(e))
        return e.exit_status
    except SystemExit as e:        # argparse's own message is already printed
        return e.code if isinstance(e.code, int) else 2
    if result.status is not None:
        return result.status
    if result.stopped_by is not None:
        _end_by(result.stopped_by)          # the shim records the signal it was stopped by, as before
    if result.signal == signal.SIGKILL and not result.oom_killed:
        _end_by(signal.SIGKILL)             # killed (the daemon's kill goes to the jailed VMM): 137
    cli._say(result.describe())
    return cli.STATUS_CRASH


def _end_by(signum: int) -> None:
    """End this process by ``signum`` (the jail is already cleaned up), so its parent sees how the VMM ended."""
    sys.stdout.flush()
    sys.stderr.flush()
    if signum != signal.SIGKILL:
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
