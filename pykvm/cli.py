"""The ``pykvm`` command: ``run`` boots a guest, ``info`` shows what this host's KVM offers.

Errors become one paragraph on stderr and an exit status, never a traceback:
2 = bad usage or a bad image, 4 = the guest crashed or the VMM failed, 74 = the guest's output
could not be written, 124 = timeout, 128 + n = ended by signal n (130 Ctrl-C, 129 SIGHUP, 143
SIGTERM); a guest's debug-exit value v gives ((v << 1) | 1) & 0xff.

Options that take free text (a command line, a file name, a drive or --net spec) take the next word
whatever it starts with: ``--append '-pause -verbose'`` and ``-p -x`` work as with
``qemu -append`` and kvmtool's ``-p`` (:func:`bind_free_text`).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import math
import os
import signal
import stat
import sys
import textwrap
import threading
from pathlib import Path

from . import __version__
from .boot import bundled
from .boot.detect import load_kernel
from .boot.firmware import bundled_firmware, read_firmware
from .boot.flat import load_flat
from .boot.linux import linux_quirks
from .console import HostConsole, HostOutput
from .errors import STATUS_CRASH, STATUS_INTERRUPTED, STATUS_OUTPUT, STATUS_SIGNAL, BootError, PykvmError, UsageError
from .kvm.host import host_backend
from .memory import GuestMemoryError, check_ram_size, parse_size
from .x86.modes import CpuMode


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use e.g. 0x1000 or 4096)") from None


def ranged(lo: int, hi: int, what: str = "a number", parse=_int):
    """An argparse type: an integer (0x.. allowed) in [lo, hi], else one sentence saying the range."""
    def check(text: str) -> int:
        value = parse(text)
        if not lo <= value <= hi:
            show = (lambda v: f"{v:#x}" if v >= 1 << 32 else f"{v:,}")  # noqa: E731
            raise argparse.ArgumentTypeError(f"{text!r} is out of range: give {what}, at least {show(lo)} and at "
                                             f"most {show(hi)}")
        return value
    return check


def seconds(lo: float, hi: float, lo_open: bool = False):
    """An argparse type: a finite number of seconds in [lo, hi] (above lo if ``lo_open``)."""
    def check(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
        if not (math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds {'above' if lo_open else 'from'} "
                                             f"{lo:,.0f} {'and at most' if lo_open else 'to'} {hi:,.0f}")
        return value
    return check


def _cpus(text: str) -> int:
    """A vCPU count: 1 to the Machine's MAX_CPUS."""
    from .machine import MAX_CPUS
    return ranged(1, MAX_CPUS, "a number of vCPUs")(text)


U64_MAX = (1 << 64) - 1


def _size(text: str) -> int:
    try:
        size = parse_size(text)
        check_ram_size(size)
    except (ValueError, GuestMemoryError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return size


SUN_PATH_MAX = 107   # bytes of a Unix socket's path: sockaddr_un.sun_path holds 108 with the final NUL (unix(7))


def check_socket_path(path: str, what: str, parent_must_exist: bool = True) -> str:
    """``path`` if a Unix socket can be made there; UsageError naming ``what`` (the option) otherwise: an
    empty path, one longer than sun_path holds (:data:`SUN_PATH_MAX` bytes, unix(7)), a missing parent
    directory (when ``parent_must_exist``), or an existing file that is not a socket (never replaced)."""
    if not path:
        raise UsageError(f"{what} needs a path for the Unix socket, not an empty word")
    size = len(os.fsencode(path))
    if size > SUN_PATH_MAX:
        raise UsageError(f"{what} {path} is {size} bytes long; a Unix socket's path holds at most "
                         f"{SUN_PATH_MAX} (sun_path): choose a shorter one, or a relative path")
    parent = os.path.dirname(path) or "."
    if parent_must_exist and not os.path.isdir(parent):
        raise UsageError(f"{what} {path}: the directory {parent} does not exist")
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return path
    if not stat.S_ISSOCK(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a file that is not a socket"
        raise UsageError(f"{what} {path} is {kind}; refusing to replace it")
    return path


def _socket_type(what: str, parent_must_exist: bool = True):
    """An argparse type for a Unix socket path option (:func:`check_socket_path`)."""
    def parse(text: str) -> str:
        try:
            check_socket_path(text.removeprefix("unix://"), what, parent_must_exist)
            return text
        except UsageError as e:     # argparse names the option already
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{what} ")) from None
    return parse


def _host(text: str) -> str:
    """A -H/--host value (the daemon's socket): anything but an empty word, which would mean the default."""
    if not text:
        raise argparse.ArgumentTypeError("-H/--host needs the daemon's socket: unix:///PATH or a path")
    return text


MAX_TIMEOUT = 30 * 24 * 3600   # seconds: a month; beyond it a timeout is a typo, not a plan

# Options whose value is free text: the word after them is their value, even if it starts with
# a dash (argparse alone reads `-p -x` as two options). Short spellings map to the long one.
FREE_TEXT_OPTIONS = {
    "-p": "--append", "--append": "--append",
    "-k": "--kernel", "--kernel": "--kernel",
    "-i": "--initrd", "--initrd": "--initrd",
    "--module": "--module",
    "--drive": "--drive",
    "--net": "--net",
    "--api-sock": "--api-sock", "--config-file": "--config-file",
    "--restore": "--restore", "--mem-file": "--mem-file",
    "--stats-json": "--stats-json", "--plot": "--plot",
    "--trace-filter": "--trace-filter",
    "--id": "--id",                       # Firecracker's instance ids may begin with a hyphen
    "-H": "--host", "--host": "--host",   # a socket path
    "-m": "--mem", "--mem": "--mem",      # not free text, but `-m -5M` should hear that -5M is not a size
}
FREE_TEXT_COMMANDS = {"run", "vmm", "bench"}


def bind_free_text(argv: list[str]) -> list[str]:
    """``argv`` with each free-text option (:data:`FREE_TEXT_OPTIONS`) joined to the word after
    it as ``--long=WORD``, so that a value beginning with ``-`` is taken as the value. Only for
    the commands whose options these are (:data:`FREE_TEXT_COMMANDS`: `create --net` of the
    engine's client is a flag). Words after ``--`` are left alone; an option that ends argv is
    left for argparse to report."""
    command = next((word for word in argv if not word.startswith("-")), None)
    if command not in FREE_TEXT_COMMANDS:
        return list(argv)
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            out.extend(argv[i:])
            break
        long = FREE_TEXT_OPTIONS.get(word)
        if long is not None and i + 1 < len(argv):
            out.append(f"{long}={argv[i + 1]}")
            i += 2
            continue
        out.append(word)
        i += 1
    return out


def _seconds(text: str) -> float:
    """A --timeout value: a finite number of seconds, more than 0 and at most MAX_TIMEOUT."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0 and at most "
                                         f"{MAX_TIMEOUT} (30 days)")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):   # one line and status 2, as for every other usage error
        self.exit(2, f"pykvm: {message} (see `{self.prog} --help`)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of ``pykvm`` (run, info, fetch); usage errors exit 2 with one line.

    ``command``: the command about to be parsed, if known. For one of this module's own commands
    the engine client's verbs are left out (~20 subparsers: a few ms of every ``pykvm run``)."""
    parser = _Parser(prog="pykvm", description="A small x86 hypervisor in Python over Linux KVM.")
    parser.add_argument("--version", action="version", version=f"pykvm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="boot a guest (default: the bundled 64-bit demo)",
                         description="Boot a bundled guest by name, or a flat binary file.")
    run.add_argument("image", nargs="?", default=None,
                     help=f"a bundled guest name (default {bundled.DEFAULT.name}) or a flat binary file")
    run.add_argument("--list", action="store_true", help="list the bundled guests and exit")
    run.add_argument("-k", "--kernel", metavar="FILE",
                     help="a kernel: Multiboot (ELF or a.out kludge), ELF32/ELF64, or a flat binary")
    run.add_argument("-p", "--append", default="", metavar="CMDLINE", help="the kernel command line")
    run.add_argument("-i", "--initrd", metavar="FILE", help="an initial ramdisk for a Linux kernel")
    run.add_argument("--no-platform-quirks", action="store_true",
                     help="do not add the guest command-line parameters this host's KVM backend needs")
    run.add_argument("--module", action="append", default=[], metavar="FILE[,ARGS]",
                     help="a Multiboot module and its argument string (repeatable)")
    run.add_argument("-c", "--cpus", type=_cpus, default=1, metavar="N", help="number of vCPUs (default 1)")
    run.add_argument("--firmware", metavar="FILE", nargs="?", const="",
                     help="start at the reset vector in this firmware (default: the bundled pykvm-fw.bin), "
                          "which enters the kernel or guest")
    run.add_argument("--mode", choices=[m.value for m in CpuMode],
                     help="CPU mode to start a flat binary in (default: long64; bundled guests know their own)")
    run.add_argument("--load-addr", type=ranged(0, U64_MAX, "a guest-physical address"), default=None, metavar="ADDR",
                     help=f"guest-physical load and entry address of a flat binary (default {bundled.LOAD_ADDR:#x})")
    run.add_argument("-m", "--mem", type=_size, default=parse_size("64M"), metavar="SIZE",
                     help="guest RAM, e.g. 64M or 1G (default 64M)")
    run.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                     help="end the run (status 124) if the guest is still running after this long")
    run.add_argument("-q", "--quiet", action="store_true", help="do not print how the run ended")
    run.add_argument("-d", "--detach", action="store_true",
                     help="create and start the VM through `pykvm daemon`, print its id (see `pykvm ps`)")
    run.add_argument("--name", help="with -d: the VM's name")
    run.add_argument("-H", "--host", type=_host, help="with -d: the daemon's socket (unix:///PATH or PATH)")
    virtio = run.add_argument_group("virtio devices (virtio-mmio, announced to a Linux kernel on its command line)")
    virtio.add_argument("--drive", action="append", default=[], metavar="FILE[,readonly]",
                        help="a raw disk image as a virtio-blk device (/dev/vda, vdb, ...; repeatable)")
    virtio.add_argument("--rng", action="store_true", help="a virtio-rng device fed from the host's os.urandom")
    virtio.add_argument("--console", choices=["uart", "virtio"], default="uart",
                        help="where host input goes: the UART (default) or a virtio console, the guest's hvc0 "
                             "(its output is shown too; the UART stays)")
    _add_net_option(virtio)
    see = run.add_argument_group("seeing inside (on stderr; see docs/walkthrough.md)")
    see.add_argument("--trace", action="store_true",
                     help="one line per VM exit: vCPU, reason, port/address, value, RIP, the instruction")
    see.add_argument("--trace-filter", metavar="SPEC",
                     help="trace only these exits (implies --trace), e.g. io:0x3f8-0x3ff,mmio,hlt")
    see.add_argument("--stats", action="store_true",
                     help="at the end, a table of exits per reason, port and MMIO address with handling times")
    see.add_argument("--stats-json", metavar="FILE", help="write the exit statistics to FILE as JSON")
    see.add_argument("--step", type=ranged(1, U64_MAX, "a number of instructions"), default=None, metavar="N",
                     help="single-step the first N instructions, printing each with the registers it changed")
    see.add_argument("--step-from", type=ranged(0, U64_MAX, "a linear address"), default=None, metavar="ADDR",
                     help="with --step: start stepping when the guest reaches this linear address")
    see.add_argument("--gdb", metavar="[HOST]:PORT",
                     help="serve the gdb remote protocol here (host default 127.0.0.1; port 0 picks one)")
    see.add_argument("--gdb-wait", action="store_true", help="with --gdb: start the guest only when gdb continues")

    _add_jail_options(run)
    _add_jail_command(sub)
    _add_api_options(run, sub)

    sub.add_parser("info", help="KVM API version, capabilities pykvm uses, vCPU limits")
    bench = sub.add_parser("bench", help="exit latency: pykvm against a C KVM_RUN loop (when gcc exists) and QEMU")
    bench.add_argument("--count", type=ranged(1, 10**8, "a number of exits"), default=20_000,
                       help="exits per timed run (default 20000)")
    bench.add_argument("--repeat", type=ranged(1, 1000, "a number of runs"), default=5,
                       help="runs per kind and side; medians are used (default 5)")
    bench.add_argument("--cpu", type=ranged(0, 4095, "a host CPU number"),
                       help="pin the benchmark (pykvm, the C loop, QEMU) to this host CPU")
    bench.add_argument("--no-qemu", action="store_true", help="leave QEMU out even when it is installed")
    bench.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    bench.add_argument("--require-c", action="store_true", help="status 2 when gcc cannot build the C baseline")
    bench.add_argument("--plot", metavar="FILE.png",
                       help="also draw each kind's latency distribution to this PNG (needs pykvm[plot]: matplotlib)")
    fetch = sub.add_parser("fetch", help="download a guest: `pykvm fetch linux` gets Debian's kernel (cached)")
    fetch.add_argument("what", choices=["linux"])
    if command not in sub.choices:
        from .client import add_parsers  # the daemon and its docker-style client verbs
        add_parsers(sub, _size, _cpus)
    return parser


def _hold_std_fds() -> None:
    """Keep a closed fd 0, 1 or 2 (``2>&-``) closed in effect but taken, so that no file pykvm opens
    later (/dev/kvm, a drive, a socket) becomes "stdout" or "stderr": fd 0 and 1 get /dev/null opened
    read-only (stdin reads EOF; a write to stdout fails with EBADF, as to a closed fd, so the guest's
    lost output is still reported), fd 2 gets /dev/null for writing, so pykvm's own messages are
    dropped; never are they written into the guest's output on stdout."""
    for fd, flags in ((0, os.O_RDONLY), (1, os.O_RDONLY), (2, os.O_WRONLY)):
        try:
            os.fstat(fd)
        except OSError:
            held = os.open(os.devnull, flags)
            if held != fd:
                os.dup2(held, fd)
                os.close(held)
            os.set_inheritable(fd, True)    # a standard fd, for programs pykvm starts too
    if sys.stderr is None:      # Python found fd 2 closed at start: messages go nowhere, not to stdout
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 - the process's stderr, for its life


def main(argv: list[str] | None = None) -> int:
    """The ``pykvm`` command; returns its exit status (see the module docstring)."""
    _hold_std_fds()
    try:
        return _main(argv)
    except _EndedBySignal as e:  # SIGTERM/SIGHUP to a VMM still being configured (files cleaned up on the way)
        return e.status
    except KeyboardInterrupt:    # Ctrl-C before or after a run (a run itself returns 130)
        return STATUS_INTERRUPTED


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed (usage errors exit 2), plus ``given``: the dests of the options and arguments the
    words name explicitly (:func:`given_dests`), for the checks that refuse what would be ignored."""
    words = bind_free_text(_host_after_verb(list(argv)))
    command = next((word for word in words if not word.startswith("-")), None)
    args = build_parser(command).parse_args(words)
    args.given = given_dests(words, command)
    return args


def _host_after_verb(argv: list[str]) -> list[str]:
    """Docker's order, ``pykvm -H SOCK VERB ...`` (or ``--host SOCK``, ``--host=SOCK``), as the verb's own
    option: ``pykvm VERB -H SOCK ...``."""
    if len(argv) >= 3 and argv[0] in ("-H", "--host"):
        return [argv[2], argv[0], argv[1], *argv[3:]]
    if len(argv) >= 2 and argv[0].startswith("--host="):
        return [argv[1], argv[0], *argv[2:]]
    return argv


def given_dests(words: list[str], command: str | None = None) -> set[str]:
    """The dests the already bound ``words`` set explicitly, whatever their value (``-c 1`` counts):
    ``words`` parsed again by a parser whose every default is SUPPRESS, so unset dests stay absent.
    ``command``: as for :func:`build_parser`."""
    parser = build_parser(command)
    parsers, seen, defaults = [parser], set(), []
    while parsers:
        p = parsers.pop()
        if id(p) in seen:
            continue
        seen.add(id(p))
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif not action.required:
                defaults.append((action, action.default))
                action.default = argparse.SUPPRESS
    try:
        return set(vars(parser.parse_args(words))) - {"command"}
    finally:    # the parser may be shared (the engine's zygote builds it once): leave it as it was
        for action, default in defaults:
            action.default = default


def _option_names(args, dests) -> str:
    """The options of ``dests`` as the user knows them (``-m/--mem``), in command-line order of the parser."""
    run = build_parser()._subparsers._group_actions[0].choices[args.command]
    names = [("/".join(a.option_strings) or a.metavar or a.dest) for a in run._actions if a.dest in dests]
    return ", ".join(names)


def refuse_beside(args, allowed: set[str], why: str) -> None:
    """UsageError (status 2) naming every option ``args.given`` holds outside ``allowed``: options that
    would otherwise be silently ignored. ``why`` says what makes them meaningless."""
    extra = getattr(args, "given", set()) - allowed
    if extra:
        raise UsageError(f"{why}, so {_option_names(args, extra)} would be ignored: leave "
                         f"{'it' if len(extra) == 1 else 'them'} out")


def _main(argv: list[str] | None) -> int:
    try:
        args = parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:     # a usage error (2, its line already written), --help or --version (0)
        return e.code if isinstance(e.code, int) else 2
    try:
        if args.command == "run" and args.detach:
            refuse_beside(args, DETACHED_OPTIONS, "with -d the daemon starts the VM from the guest, -k, -i, -p, "
                                                  "-m, -c, --drive, --rng, --console and --net only")
            from .client import run_detached
            return run_detached(args)
        if args.command == "run":
            return cmd_run(args)
        from .client import VERBS
        if args.command in VERBS:
            from .client import main as client_main
            return client_main(args)
        if args.command == "fetch":
            return cmd_fetch(args)
        if args.command == "bench":
            from .bench import run as run_bench  # imports KVM bits only when benchmarking
            return run_bench(args, require_c=args.require_c)
        if args.command == "jail":
            return cmd_jail(args)
        if args.command == "vmm":
            return cmd_vmm(args)
        return cmd_info(args)
    except PykvmError as e:
        _say(str(e))
        return e.exit_status
    except BrokenPipeError:   # `pykvm info | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


def _say(message: str) -> None:
    """One paragraph on stderr; a stderr that cannot be written (hung up, closed) is not an error."""
    if sys.stderr is None:     # print(file=None) would write to stdout, into the guest's output
        return
    try:
        print(textwrap.fill(message, width=100, initial_indent="pykvm: ", subsequent_indent="  ",
                            break_long_words=False, break_on_hyphens=False), file=sys.stderr, flush=True)
    except (OSError, ValueError, AttributeError):
        pass


@contextlib.contextmanager
def _signals_end(machine, signals=(signal.SIGTERM, signal.SIGHUP)):
    """While the guest runs, SIGTERM and SIGHUP end the run like a timeout does: every vCPU stops,
    the terminal is restored, and the status is 128 + the signal's number. (SIGINT is Ctrl-C:
    Machine.run ends the run with 130.) The handler hands the ending to a thread, so it never
    waits for a lock the interrupted main thread holds."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        threading.Thread(target=machine.end, args=(STATUS_SIGNAL + signum, f"ended by {name}"),
                         name="signal", daemon=True).start()
    old = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


# What `pykvm run -d` sends to the daemon (pykvm.client.spec_from_args); any other option would be lost.
DETACHED_OPTIONS = {"detach", "image", "kernel", "initrd", "append", "mem", "cpus", "drive", "rng", "console", "net",
                    "name", "host"}
# What `pykvm run --config-file/--restore` still uses: the file describes the whole VM.
WHOLE_VM_OPTIONS = {"config_file", "restore", "mem_file", "api_sock", "id", "timeout", "quiet", "jail", "no_jail"}


def cmd_run(args) -> int:
    """``pykvm run``: boot the guest, wire the host console and output, return the run's status."""
    given = getattr(args, "given", set())
    if given & {"name", "host"}:
        raise UsageError("--name and -H/--host go with -d (a VM started through `pykvm daemon`)")
    if "id" in given and args.api_sock is None:
        raise UsageError("--id is the instance id the API reports (GET /): it goes with --api-sock")
    if args.config_file is not None or args.restore is not None or args.mem_file is not None:
        return cmd_run_vmm(args)
    if args.list:
        refuse_beside(args, {"list"}, "--list only lists the bundled guests")
        width = max(len(g.name) for g in bundled.GUESTS)
        for guest in bundled.GUESTS:
            print(f"{guest.name:<{width}}  {guest.mode.value:<8} {guest.about}")
        return 0
    from .debug import inside  # --trace, --stats, --step, --gdb (imported only when running)
    debug_options = _debug_options(args)
    inside.check(debug_options)
    plan = _plan_for(args)
    firmware = None
    if args.firmware is not None:
        firmware = read_firmware(args.firmware or str(bundled_firmware()))
    if args.jail:
        return _run_jailed(args, lambda entry: _jailed_boot(args, plan, firmware, inside, debug_options, entry))
    if args.no_jail and not args.quiet:
        _say("running without a jail (--no-jail): this VMM has the privileges of its user")
    return _boot(args, plan, firmware, inside, debug_options)


def _boot(args, plan, firmware, inside, debug_options, before_run=None, api_staging=None) -> int:
    """Create the Machine, load the plan, run it; ``before_run`` (entering a jail) is called once
    everything is open and before the guest's first instruction. ``api_staging``: in a jail, where
    the --api-sock socket is bound; its server starts before ``before_run`` (see ApiServer)."""
    from .machine import Machine  # imports KVM bits only when a VM is really wanted
    with _host_output() as output:
        with Machine(mem_size=args.mem, cpus=args.cpus, irqchip=plan.irqchip, firmware=firmware,
                     serial_out=output.write) as machine:
            serial = _api_serial(args, output.write)     # --api-sock: also kept for GET /pykvm/console
            virtio_console = _attach_virtio(args, machine, output.write)
            machine.load(plan)
            # The segments are in guest RAM now: their copies would stay in this process for the VM's life
            # (about 13 MiB for our Linux), and so would the kernel and initrd files' bytes (16 MiB more; fw_cfg
            # keeps its own reference when firmware boots the guest). Only Machine.load reads them.
            plan.writes, plan.kernel, plan.initrd = [], b"", b""
            seeing = inside.attach(machine, debug_options)
            jailed = before_run is not None
            # Jailed: the API's threads and listening socket exist before the jail (it allows no socket calls)
            with _api_while_running(args, machine, serial, api_staging) if jailed else contextlib.nullcontext():
                if jailed:
                    before_run()
                on_quit = lambda: machine.end(0, "quit from the console (Ctrl-A x)")  # noqa: E731
                console = virtio_console or machine.uart
                # Signals first: from the moment the terminal is raw, SIGTERM/SIGHUP restore it.
                with _output_wired(output, machine, serial or output.write, virtio_console), \
                        _signals_end(machine), \
                        HostConsole(console, on_quit=on_quit, wait_for_driver=plan.console_waits_for_driver), \
                        (contextlib.nullcontext() if jailed else _api_while_running(args, machine, serial)):
                    result = machine.run(timeout=args.timeout)
            seeing.finish()
    return _run_ended(args, output, result)


@contextlib.contextmanager
def _host_output():
    """The guest's output to fd 1 through a :class:`HostOutput` writer thread (never a blocking write
    on a vCPU thread); on leaving, what is buffered is written out (see :meth:`HostOutput.close`).
    ``pykvm run`` and ``pykvm vmm`` (config file, restore, API) both go through here."""
    if sys.stdout is not None:
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
    with HostOutput(1) as output:
        yield output


@contextlib.contextmanager
def _output_wired(output: HostOutput, machine, serial_out, virtio_console=None):
    """While the guest runs: an output error ends it (status 74), and the UART (and the virtio
    console, if any) send to ``serial_out``/``output`` and wait while ``output`` has no room."""
    output.on_error = lambda reason: machine.end(STATUS_OUTPUT, reason)
    machine.uart.set_output(serial_out, output.room)
    output.add_listener(machine.uart.host_ready)
    if virtio_console is not None:
        virtio_console.set_output(output.write, output.room)
        output.add_listener(virtio_console.host_ready)
    try:
        yield
    finally:
        output.remove_listeners()    # before the devices they poke are closed


def _run_ended(args, output: HostOutput, result) -> int:
    """Say how the run ended (after ``output`` is closed) and return its status: 74 if the last
    output failed after a guest that ended with 0."""
    from .machine import RunResult
    if output.error is not None and result.status == 0:
        # The last output failed after the guest had ended: still not a success.
        result = RunResult(STATUS_OUTPUT, output.error)
    if result.report or not args.quiet or result.status == STATUS_OUTPUT:
        _say(f"{result.reason} (exit status {result.status})")
    if output.dropped and output.error is None:
        _say(f"{output.dropped} bytes of the guest's output were dropped: stdout did not take them in time")
    if result.report:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.write(result.report + "\n")
    return result.status


def _attach_virtio(args, machine, console_out):
    """The virtio devices of --drive, --rng, --console virtio and --net on ``machine``; returns the
    virtio console or None. Without any, the virtio package is not even imported (start-up time)."""
    if not (args.drive or args.rng or args.console == "virtio" or args.net):
        return None
    from .devices.virtio import attach_virtio
    return attach_virtio(machine, *_virtio_devices(args), console_out=console_out, nets=_nets(args)).console


def _virtio_devices(args) -> tuple[list, bool, bool]:
    """(drives, rng, console) of --drive, --rng, --console virtio; the drives checked (:func:`check_drives`)."""
    from .devices.virtio import parse_drive  # loads the KVM binding: only when a VM is wanted
    drives = [parse_drive(d) for d in args.drive]
    check_drives([(d.path, d.readonly) for d in drives])
    return drives, args.rng, args.console == "virtio"


_NOT_A_DISK = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO (a pipe cannot be a disk)",
               stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device"}


def check_drives(drives: list[tuple[str, bool]]) -> None:
    """Refuse, with UsageError (status 2), a --drive list (path, readonly) a guest must not get:

    - a path that is not a disk: a directory, a FIFO, a socket, a character device (/dev/zero never
      ends, /dev/tty is a terminal). A regular file is a raw image; a block device is allowed, as with
      QEMU and Firecracker (the caller's permissions on it decide), unless the kernel says it is in use
      (mounted, or opened exclusively: an O_EXCL open fails with EBUSY, see open(2)).
    - one file named twice (by any path: a symlink or a hard link is the same file) when either is
      writable: two writers, or a writer and a cache, on one image corrupt it. Twice read-only is fine."""
    seen: dict[tuple[int, int], tuple[str, bool]] = {}
    for path, readonly in drives:
        try:
            info = os.stat(path)
        except OSError as e:
            raise UsageError(f"cannot use --drive {path}: {e.strerror}") from None
        kind = _NOT_A_DISK.get(stat.S_IFMT(info.st_mode))
        if kind is not None:
            raise UsageError(f"--drive {path} is {kind}, not a disk image: give a raw image file or a block device")
        if stat.S_ISBLK(info.st_mode):
            _check_block_device_free(path)
            key = (-1, info.st_rdev)
        else:
            key = (info.st_dev, info.st_ino)
        if key in seen:
            other, other_ro = seen[key]
            if not (readonly and other_ro):
                same = "" if other == path else f" (as {other})"
                raise UsageError(f"--drive {path} names the same file twice{same}, writable at least once: two "
                                 "drives on one image would corrupt it; give it once, or both ,readonly")
        seen[key] = (path, readonly)


def _check_block_device_free(path: str) -> None:
    """UsageError if the block device at ``path`` is mounted or held exclusively (O_EXCL gives EBUSY)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.EBUSY:
            raise UsageError(f"--drive {path} is in use (mounted, or held by another program): a guest writing "
                             "to it would corrupt it") from None
        return      # no permission to probe: opening it for the drive reports that
    os.close(fd)


def _add_net_option(group) -> None:
    group.add_argument("--net", action="append", default=[], metavar="tap=NAME[,mac=MAC]",
                       help="a virtio-net card on the existing host TAP device NAME (repeatable; "
                            "default MAC: a random locally administered one)")


def _nets(args) -> list:
    """The NetSpecs of --net (UsageError for a malformed one)."""
    from .devices.virtio import parse_net
    return [parse_net(text) for text in args.net]


def _debug_options(args):
    from .debug.inside import Options
    return Options(trace=args.trace, trace_filter=args.trace_filter, stats=args.stats,
                   stats_json=args.stats_json, step=args.step or 0, step_from=args.step_from, gdb=args.gdb,
                   gdb_wait=args.gdb_wait)


def _read(path: str, what: str, limit: int) -> bytes:
    """A file's bytes, refusing what cannot be a guest image: a directory, a device or pipe (which
    might never end: /dev/zero), or a file larger than ``limit`` (the guest's RAM)."""
    p = Path(path)
    try:
        info = p.stat()
        if p.is_dir():
            raise UsageError(f"{what} {path} is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{what} {path} is not a regular file (a device or a pipe cannot be loaded)")
        if info.st_size > limit:
            raise BootError(f"{what} {path} is {info.st_size} bytes, more than the guest's {limit} bytes of RAM; "
                            "give the guest more memory with --mem")
        return p.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {what} {path}: {e.strerror}") from None


def _plan_for(args):
    if args.kernel is not None:
        if args.image is not None:
            raise UsageError(f"give either a guest ({args.image}) or --kernel, not both")
        modules = []
        for spec in args.module:
            path, _, margs = spec.partition(",")
            modules.append((path, _read(path, "module", args.mem), margs))
        load_addr = bundled.LOAD_ADDR if args.load_addr is None else args.load_addr
        initrd = _read(args.initrd, "initrd", args.mem) if args.initrd else b""
        quirks = "" if args.no_platform_quirks else linux_quirks(host_backend())
        from .devices.virtio import linux_cmdline
        virtio_args = linux_cmdline(*_virtio_devices(args), nets=_nets(args))   # virtio_mmio.device=... for Linux
        plan = load_kernel(_read(args.kernel, "kernel", args.mem), args.mem, name=args.kernel, cmdline=args.append,
                           initrd=initrd, modules=modules, mode=CpuMode(args.mode or "long64"),
                           load_addr=load_addr, linux_quirks=" ".join([*virtio_args, quirks]).strip())
        if quirks and quirks in plan.cmdline and not args.quiet:
            _say(f"this host's KVM ({host_backend()}) needs Linux guests to avoid some instructions: added "
                 f"'{quirks}' to the command line (--no-platform-quirks to turn that off)")
        return plan
    if args.module or args.append or args.initrd:
        raise UsageError("--append, --initrd and --module need a --kernel")
    name = args.image or bundled.DEFAULT.name
    if Path(name).exists() or "/" in name or Path(name).suffix:   # a file of the user's
        image, mode = _read(name, "guest image", args.mem), CpuMode(args.mode or "long64")
    else:
        guest = bundled.find(name)
        if args.mode and CpuMode(args.mode) is not guest.mode:
            raise UsageError(f"{guest.name} is built for {guest.mode.value} mode; --mode {args.mode} would not run it")
        image, mode = guest.path.read_bytes(), guest.mode
    load_addr = bundled.LOAD_ADDR if args.load_addr is None else args.load_addr
    return load_flat(image, load_addr, mode, args.mem, name=name)


# --- the jail (pykvm/jail): `pykvm jail ... -- run ...` and `pykvm run --jail` -------------------------
def _add_jail_options(run) -> None:
    group = run.add_argument_group("isolation (see `pykvm jail --help` for the limits)")
    jail = group.add_mutually_exclusive_group()
    jail.add_argument("--jail", action="store_true",
                      help="run the VMM jailed (root only): own namespaces, cgroup, root directory, uid/gid, "
                           "no capabilities, seccomp; default limits")
    jail.add_argument("--no-jail", action="store_true", help="run unjailed, and say so")


def _add_jail_command(sub) -> None:
    jail = sub.add_parser(
        "jail", help="run a VMM jailed: `pykvm jail --id vm1 --memory 128M -- run -k vmlinux ...`",
        description="Start `pykvm run ...` in a jail, as Firecracker's jailer starts Firecracker: new mount, PID, "
                    "IPC, UTS and network namespaces, a per-VM root <chroot-base>/pykvm/<id>/root holding only "
                    "dev/kvm and the given files, its own cgroup, an unprivileged uid/gid without capabilities, "
                    "resource limits and a seccomp filter. Needs root.")
    jail.add_argument("--id", default=None, help="the VM's id: letters, digits, hyphens (default pykvm-<pid>)")
    jail.add_argument("--uid", type=ranged(0, 2**32 - 2, "a uid"), default=None,
                      help="uid of the VMM (default: distinct per VM)")
    jail.add_argument("--gid", type=ranged(0, 2**32 - 2, "a gid"), default=None,
                      help="gid of the VMM (default: as the uid)")
    jail.add_argument("--chroot-base", default=None, metavar="DIR",
                      help="where per-VM roots are made (default /srv/jailer, created if absent)")
    jail.add_argument("--memory", type=_limit_size, default=None, metavar="SIZE",
                      help="cgroup memory limit (default: guest RAM + the VMM's overhead)")
    jail.add_argument("--cpus", type=_quota, default=None, metavar="QUOTA",
                      help="CPU quota in CPUs, e.g. 0.5 (default: no quota)")
    jail.add_argument("--pids", type=ranged(1, PID_MAX_LIMIT, "a number of tasks"), default=None, metavar="N",
                      help="cgroup task limit (default 64)")
    jail.add_argument("--netns", metavar="PATH", help="join this network namespace (default: a new, empty one)")
    jail.add_argument("--resource-limit", action="append", default=[], metavar="NAME=VALUE",
                      help="no-file=N (default 2048) or fsize=BYTES (repeatable)")
    jail.add_argument("--new-pid-ns", action="store_true", default=True,
                      help="the VMM is PID 1 of a new PID namespace (always on)")
    jail.add_argument("--daemonize", action="store_true",
                      help="detach: print the VMM's pid and return; its stdio goes to /dev/null")
    jail.add_argument("--seccomp", choices=["kill", "log", "off"], default="kill",
                      help="kill (default): a forbidden system call kills the VMM and is reported; log: allowed "
                           "but logged by the kernel (to derive the list); off")
    jail.add_argument("--cgroup-version", type=int, choices=[1, 2], default=None,
                      help="force cgroup v1 or v2 (default: detected)")
    jail.add_argument("vmm", nargs=argparse.REMAINDER, metavar="-- run ARGS",
                      help="the VMM's own arguments: `run` and its options")


PID_MAX_LIMIT = 4 << 20    # the kernel's largest pid count (include/linux/threads.h): pids.max above it is EINVAL


def _limit_size(text: str) -> int:
    """A size limit (--memory, --memory-budget): 64M, 1G, ... more than 0 and at most 2**63 - 1 bytes."""
    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not 0 < value < 1 << 63:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size above 0 and below 8 EiB")
    return value


MAX_QUOTA = 4096   # CPUs: a quota above every CPU of the host is no limit, and beyond this one a typo


def _quota(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of CPUs: {text!r} (e.g. 0.5)") from None
    if not (math.isfinite(value) and 0 < value <= MAX_QUOTA):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of CPUs above 0 and at most {MAX_QUOTA}")
    return value


def cmd_jail(args) -> int:
    """``pykvm jail [options] -- run ...``: run the VMM in a jail; returns its status (2 for bad usage)."""
    vmm = args.vmm[1:] if args.vmm[:1] == ["--"] else args.vmm
    if vmm[:1] == ["vmm"]:
        raise UsageError("`pykvm jail -- vmm` cannot work: a VMM in its jail can no longer create a VM (its filter "
                         "refuses KVM_CREATE_VM, and /dev/kvm is root's), so the VM is built before the jail; use "
                         "`pykvm jail -- run --config-file FILE --api-sock PATH` or `run --restore STATE --mem-file "
                         "MEM --api-sock PATH`")
    if vmm[:1] != ["run"]:
        raise UsageError("give the VMM's arguments after the jail's: `pykvm jail [options] -- run [run options]`")
    run_args = parse_args(vmm)
    if run_args.no_jail:
        raise UsageError("--no-jail contradicts `pykvm jail`")
    run_args.jail, run_args.jail_options = True, args
    return cmd_run(run_args)


# The VMM's own memory besides guest RAM. Measured (README, "The jail"): a whole unjailed pykvm
# process peaks at 27 MiB resident with a tiny guest; a jailed VMM booting the small Linux with
# 64 MiB of RAM peaks at 35 MiB in its cgroup, guest pages included. Default: over twice that.
VMM_OVERHEAD = 64 << 20
MIN_VMM_OVERHEAD = 32 << 20  # below guest RAM + this, a VMM cannot even start


def _jail_config(args):
    from .jail import JailConfig, JailFile
    from .jail.config import DEFAULT_CHROOT_BASE
    options = getattr(args, "jail_options", None)
    opt = (lambda name: getattr(options, name, None))  # noqa: E731
    limits = {}
    for spec in opt("resource_limit") or []:
        name, _, value = spec.partition("=")
        try:
            limits[name] = parse_size(value)
        except ValueError:
            raise UsageError(f"--resource-limit {spec!r}: use NAME=VALUE, e.g. no-file=1024") from None
    files = [JailFile(p) for p in (args.kernel, args.initrd, args.firmware) if p]
    files += [JailFile(spec.partition(",")[0]) for spec in args.module]
    from .devices.virtio import parse_drive
    files += [JailFile(d.path, read_only=d.readonly) for d in map(parse_drive, args.drive)]
    base = opt("chroot_base")
    if base is None:
        base = DEFAULT_CHROOT_BASE
        if not os.path.lexists(base):
            os.makedirs(base, 0o755)
    config = JailConfig(id=opt("id") or f"pykvm-{os.getpid()}", uid=opt("uid"), gid=opt("gid"), chroot_base=base,
                        memory=opt("memory"), cpus=opt("cpus"), pids=opt("pids") or max(64, args.cpus + 32),
                        netns=opt("netns"), daemonize=bool(opt("daemonize")), resource_limits=limits, files=files,
                        seccomp=opt("seccomp") or "kill", cgroup_version=opt("cgroup_version"),
                        api_sock=os.path.abspath(args.api_sock) if getattr(args, "api_sock", None) else None)
    need = args.mem + MIN_VMM_OVERHEAD
    if config.memory is None:
        config.memory = args.mem + VMM_OVERHEAD
    elif config.memory < need:
        raise UsageError(f"--memory {config.memory >> 20}M is below what this guest needs: its {args.mem >> 20}M "
                         f"of RAM plus at least {MIN_VMM_OVERHEAD >> 20}M for the VMM itself")
    if config.pids < args.cpus + 8:
        raise UsageError(f"--pids {config.pids} is below what this VM needs: one thread per vCPU ({args.cpus}) "
                         "plus the VMM's own (at least 8)")
    return config


def _jailed_boot(args, plan, firmware, inside, debug_options, entry) -> int:
    """In the jailed process: boot, entering the jail once the VM and its files are open; errors
    become one paragraph and their status there, as in main()."""
    return _in_jail(entry, lambda: _boot(args, plan, firmware, inside, debug_options, entry.enter,
                                         entry.api_sock_staging))


def _in_jail(entry, body) -> int:
    """``body()`` in the jailed process (it calls ``entry.enter``); a PykvmError becomes one paragraph
    and its status, as in main()."""
    from .jail import JailError
    try:
        return body()
    except JailError:
        raise       # the supervisor reports it
    except PykvmError as e:
        if not entry.entered:
            entry.enter()      # the supervisor insists; nothing is open, so nothing to fear
        _say(str(e))
        return e.exit_status


def _run_jailed(args, boot) -> int:
    """Run ``boot(entry)`` in a jail (pykvm.jail.spawn) and report how the jailed VMM ended."""
    if args.gdb or args.stats_json:
        raise UsageError("--gdb and --stats-json need sockets or new files, which a jailed VMM cannot make; "
                         "use them with --no-jail")
    from .jail import spawn
    config = _jail_config(args)
    if config.seccomp != "kill" and not args.quiet:
        _say(f"jailed without the seccomp filter's protection (--seccomp {config.seccomp})")
    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main else None   # Ctrl-C is the VMM's
    try:
        result = spawn(config, boot)
    finally:
        if in_main:
            signal.signal(signal.SIGINT, old)
    if config.daemonize:
        print(f"jailed VMM {config.id}: pid {result.pid}, uid {result.uid}, gid {result.gid}")
        return 0
    if result.status is not None:
        return result.status
    _say(result.describe())
    return STATUS_CRASH


def cmd_fetch(args) -> int:
    """``pykvm fetch linux``: download Debian's kernel into the cache and print the paths."""
    from .fetch import fetch_linux
    vmlinuz, vmlinux = fetch_linux()
    print(f"vmlinuz {vmlinuz}")
    print(f"vmlinux {vmlinux}")
    return 0


def cmd_info(args) -> int:
    """``pykvm info``: KVM's API version, backend, vCPU limits and the capabilities pykvm uses."""
    from .kvm import Cap, Kvm
    with Kvm() as kvm:
        print(f"KVM API version: {kvm.get_api_version()}")
        print(f"backend: {_backend()}")
        print(f"vCPUs: recommended {kvm.check_extension(Cap.NR_VCPUS)}, maximum {kvm.check_extension(Cap.MAX_VCPUS)}")
        print(f"memory slots: {kvm.check_extension(Cap.NR_MEMSLOTS)}")
        print("capabilities pykvm uses:")
        for cap in Cap:
            value = kvm.check_extension(cap)
            print(f"  KVM_CAP_{cap.name:<28} {'present' if value else 'absent'}"
                  + (f" ({value})" if value > 1 else ""))
        from .devices.virtio import fast_path
        print(f"virtio fast path: {fast_path(kvm).describe()}")
    return 0


def _backend() -> str:
    module = host_backend()
    if module == "kvm_pvm":
        return module + (" (not hardware virtualization: CPL0 guest code is emulated; paging only in long mode;"
                         " see \"This host's KVM: what it limits\" in the README)")
    return module


# --- the per-VM API (pykvm/api) and snapshots: `pykvm vmm`, `pykvm run --api-sock/--config-file/--restore` ----
def _add_api_options(run, sub) -> None:
    api = run.add_argument_group("API and snapshots (Firecracker's API; see the README)")
    api.add_argument("--api-sock", metavar="PATH", type=_socket_type("--api-sock"),
                     help="also serve the VM's REST API on this Unix socket (created 0600) while it runs")
    api.add_argument("--config-file", metavar="FILE",
                     help="boot the VM described by this Firecracker-format JSON file (boot-source, drives, "
                          "machine-config, ...) instead of the options above")
    api.add_argument("--restore", metavar="STATE", help="continue the VM saved in this snapshot state file")
    api.add_argument("--mem-file", metavar="MEM", help="with --restore: the snapshot's guest memory file")
    api.add_argument("--id", default="anonymous-instance", help="the instance id GET / reports")
    vmm = sub.add_parser("vmm", help="a VMM that waits to be configured through its API socket (Firecracker's)",
                         description="Serve one VM's REST API (Firecracker's paths and fields) on a Unix socket. "
                                     "The process ends when the guest does, with pykvm run's exit statuses.")
    vmm.add_argument("--api-sock", required=True, metavar="PATH", type=_socket_type("--api-sock"),
                     help="the Unix socket to serve (created 0600)")
    vmm.add_argument("--config-file", metavar="FILE", help="configure and start from this Firecracker JSON file")
    vmm.add_argument("--id", default="anonymous-instance", help="the instance id GET / reports")
    vmm.add_argument("-q", "--quiet", action="store_true", help="do not print how the run ended")


class _EndedBySignal(KeyboardInterrupt):
    """SIGTERM or SIGHUP before the machine runs: unwinds like Ctrl-C (so the API socket file is removed)
    and gives 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.status = STATUS_SIGNAL + signum


def _terminate_like_ctrl_c() -> None:
    """Until its machine runs, SIGTERM and SIGHUP end a VMM as Ctrl-C does, the API socket file removed, with
    status 128 + n (143, 129); while it runs, :func:`_signals_end` gives the same as for `pykvm run`."""
    def _terminate(signum, frame):
        raise _EndedBySignal(signum)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)


def _api_serial(args, out):
    """With --api-sock, the guest's serial output goes to ``out`` and to a ring that GET
    /pykvm/console serves; without, None."""
    if getattr(args, "api_sock", None) is None:
        return None
    from .api.controller import SerialRing
    return SerialRing(out)


def _api_while_running(args, machine, serial, staging=None):
    """Serve the API for an already booted machine (`pykvm run --api-sock`), or nothing. ``staging``:
    a jailed VMM's socket (see ApiServer)."""
    if getattr(args, "api_sock", None) is None:
        return contextlib.nullcontext()
    from .api.controller import Vmm
    from .api.server import ApiServer

    def vmm() -> Vmm:       # made when the first client connects: the API is optional here (see ApiServer)
        made = Vmm(args.id, machine=machine)
        made.serial = serial
        return made
    return ApiServer(vmm, args.api_sock, staging, lazy=True)


def _config_actions(path: str) -> list:
    """The actions a Firecracker config file stands for, in the order the API would take them."""
    from pydantic import ValidationError

    from .api import controller as c
    from .api import models
    from .api.server import _describe
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20)
    except OSError as e:
        raise UsageError(f"cannot read --config-file {path}: {e.strerror}") from None
    try:
        config = models.VmConfigFile.model_validate_json(text)
    except ValidationError as e:
        raise UsageError(f"--config-file {path}: {_describe(e.errors())}") from None
    actions = []
    if config.machine_config is not None:
        actions.append(c.PutMachineConfig(config.machine_config))
    actions.append(c.PutBootSource(config.boot_source))
    actions += [c.PutDrive(d) for d in config.drives]
    actions += [c.PutNetworkInterface(n) for n in config.network_interfaces]
    if config.entropy is not None:
        actions.append(c.PutEntropy(config.entropy))
    if config.logger is not None:
        actions.append(c.PutLogger(config.logger))
    if config.metrics is not None:
        actions.append(c.PutMetrics(config.metrics))
    return actions + [c.StartInstance()]


def _serve_vmm(args, actions: list, entry=None) -> int:
    """Run a Vmm: apply ``actions`` (a config file, a snapshot load), serve the API if asked, run the machine on
    this (the main) thread until the guest ends. Output, signals and statuses as for ``pykvm run``
    (:func:`_host_output`, :func:`_output_wired`, :func:`_signals_end`). ``entry``: in a jail
    (`--jail`), the jail is entered once the machine is built from ``actions`` -- a jailed VMM can
    no longer create a VM -- and before its first instruction; the API socket is bound before."""
    from .api import controller as c
    from .api.server import ApiServer

    _terminate_like_ctrl_c()     # until the machine runs; then _signals_end
    # Import what InstanceStart and a snapshot load need before the socket exists (as a compiled VMM has it
    # loaded): a restore then costs the restore, not ~0.1 s of first imports.
    from . import machine
    from .boot import detect  # noqa: F401
    from .devices import virtio  # noqa: F401
    from .snapshot import machine_state
    machine_state.warm_up(machine.Machine)
    with _host_output() as output:
        vmm = c.Vmm(args.id, serial_out=output.write)
        try:
            staging = entry.api_sock_staging if entry is not None else None
            # Served from the first connection on when the machine comes from the command line (the API is
            # optional then); at once when the API is how the machine comes (pykvm vmm with no actions)
            server = ApiServer(vmm, args.api_sock, staging, lazy=bool(actions)) if args.api_sock else None
            with server or contextlib.nullcontext():
                for action in actions:
                    try:
                        vmm.submit(action)
                    except c.ApiError as e:
                        raise UsageError(e.message) from None
                try:
                    while not vmm.wait_until_ready(0.5):
                        pass
                except _EndedBySignal as e:
                    return e.status
                except KeyboardInterrupt:
                    return STATUS_INTERRUPTED
                if entry is not None:
                    entry.enter()
                on_quit = lambda: vmm.machine.end(0, "quit from the console (Ctrl-A x)")  # noqa: E731
                with _output_wired(output, vmm.machine, vmm.serial), _signals_end(vmm.machine), \
                        HostConsole(vmm.machine.uart, on_quit=on_quit):  # stdin to the serial port, as Firecracker's
                    result = vmm.run_machine(timeout=getattr(args, "timeout", None))
        finally:
            vmm.shutdown()
            if vmm.machine is not None:
                vmm.machine.close()
    return _run_ended(args, output, result)


def cmd_vmm(args) -> int:
    """`pykvm vmm --api-sock PATH`: wait for the API to configure and start the VM (or a --config-file)."""
    return _serve_vmm(args, _config_actions(args.config_file) if args.config_file else [])


def _serve_jailed(args, actions: list) -> int:
    """`pykvm run --jail --config-file/--restore`: :func:`_serve_vmm` in a jail whose limits follow the VM
    the actions build (its RAM and vCPUs)."""
    return _run_jailed(args, _jailed_serve_target(args, actions))


def _jailed_serve_target(args, actions: list):
    """The jail's target for :func:`_serve_vmm`; sets ``args.mem`` and ``args.cpus`` (the jail's limits)
    to the VM's that ``actions`` build. UsageError for a snapshot a jail cannot restore."""
    from .api import controller as c
    for action in actions:
        if isinstance(action, c.PutMachineConfig):
            args.mem, args.cpus = action.config.mem_size_mib << 20, action.config.vcpu_count
        elif isinstance(action, c.LoadSnapshot):
            config = _jailed_restore_config(action.params.snapshot_path)
            args.mem, args.cpus = config["mem_size"], config["vcpu_count"]
    return lambda entry: _in_jail(entry, lambda: _serve_vmm(args, actions, entry))


def _jailed_restore_config(path: str) -> dict:
    """The machine a snapshot to restore in a jail needs; UsageError for one that names host files.

    A restore opens what the state file names -- drives, TAPs, boot files stored by reference -- before
    the jail, as root; a snapshot taken by a jailed VMM was written by it, so those names are not
    trusted: such snapshots are refused here (restore them unjailed, as their owner)."""
    from .snapshot import machine_state, read_state
    try:
        state = read_state(path)
        config = machine_state.check_config(state)
    except PykvmError as e:
        raise UsageError(str(e)) from None
    virtio = state.get("virtio") or {}
    named = [f"drive {d[0]}" for d in virtio.get("drives") or []] + [f"TAP {n[0]}" for n in virtio.get("nets") or []]
    if named or _has_file_reference(state):
        what = ", ".join(named) if named else "boot files stored by reference"
        raise UsageError(f"snapshot {path} names host files ({what}); a jailed VMM restores only snapshots "
                         "that name none (restore it with --no-jail)")
    return config


def _has_file_reference(value) -> bool:
    if isinstance(value, dict):
        return "$file" in value or any(_has_file_reference(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_file_reference(v) for v in value)
    return False


def cmd_run_vmm(args) -> int:
    """`pykvm run --config-file FILE` or `pykvm run --restore STATE --mem-file MEM` (with or without --api-sock)."""
    actions = _run_vmm_actions(args)
    if args.jail:
        return _serve_jailed(args, actions)
    return _serve_vmm(args, actions)


def _run_vmm_actions(args) -> list:
    """The actions `pykvm run --config-file/--restore` stands for; UsageError for a bad combination."""
    from .api import controller as c
    from .api import models
    if args.config_file is not None and args.restore is not None:
        raise UsageError("give either --config-file or --restore, not both")
    if args.image is not None or args.kernel is not None:
        raise UsageError("--config-file and --restore describe the whole VM; leave out the guest image and --kernel")
    whole = "--config-file" if args.config_file is not None else "--restore"
    refuse_beside(args, WHOLE_VM_OPTIONS, f"{whole} describes the whole VM")
    if args.restore is None:
        if args.mem_file is not None:
            raise UsageError("--mem-file goes with --restore STATE (the snapshot's state file)")
        actions = _config_actions(args.config_file)
    else:
        if args.mem_file is None:
            raise UsageError("--restore needs the snapshot's memory file: --mem-file MEM")
        load = models.SnapshotLoadParams(snapshot_path=args.restore, mem_file_path=args.mem_file, resume_vm=True)
        actions = [c.LoadSnapshot(load)]
    return actions
