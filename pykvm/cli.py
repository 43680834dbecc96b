"""The ``pykvm`` command: ``run`` boots a guest, ``info`` shows what this host's KVM offers.

Errors become one paragraph on stderr and an exit status, never a traceback:
2 = bad usage or a bad image, 4 = the guest crashed or the VMM failed, 124 = timeout,
130 = interrupted; a guest's debug-exit value v gives (v << 1) | 1.
"""

from __future__ import annotations

import argparse
import stat
import sys
import textwrap
from pathlib import Path

from . import __version__
from .boot import bundled
from .boot.detect import load_kernel
from .boot.firmware import bundled_firmware, read_firmware
from .boot.flat import load_flat
from .boot.linux import linux_quirks
from .console import HostConsole
from .devices.virtio import attach_virtio, fast_path, linux_cmdline, parse_drive
from .errors import BootError, PykvmError, UsageError
from .kvm.host import host_backend
from .memory import GuestMemoryError, check_ram_size, parse_size
from .x86.modes import CpuMode


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (use e.g. 0x1000 or 4096)") from None


def _size(text: str) -> int:
    try:
        size = parse_size(text)
        check_ram_size(size)
    except (ValueError, GuestMemoryError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return size


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1
    if value <= 0:
        raise argparse.ArgumentTypeError(f"not a positive number of seconds: {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):   # one line and status 2, as for every other usage error
        self.exit(2, f"pykvm: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
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
    run.add_argument("-c", "--cpus", type=_int, default=1, metavar="N", help="number of vCPUs (default 1)")
    run.add_argument("--firmware", metavar="FILE", nargs="?", const="",
                     help="start at the reset vector in this firmware (default: the bundled pykvm-fw.bin), "
                          "which enters the kernel or guest")
    run.add_argument("--mode", choices=[m.value for m in CpuMode],
                     help="CPU mode to start a flat binary in (default: long64; bundled guests know their own)")
    run.add_argument("--load-addr", type=_int, default=None, metavar="ADDR",
                     help=f"guest-physical load and entry address of a flat binary (default {bundled.LOAD_ADDR:#x})")
    run.add_argument("-m", "--mem", type=_size, default=parse_size("64M"), metavar="SIZE",
                     help="guest RAM, e.g. 64M or 1G (default 64M)")
    run.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                     help="end the run (status 124) if the guest is still running after this long")
    run.add_argument("-q", "--quiet", action="store_true", help="do not print how the run ended")
    run.add_argument("-d", "--detach", action="store_true",
                     help="create and start the VM through `pykvm daemon`, print its id (see `pykvm ps`)")
    run.add_argument("--name", help="with -d: the VM's name")
    run.add_argument("-H", "--host", help="with -d: the daemon's socket")
    virtio = run.add_argument_group("virtio devices (virtio-mmio, announced to a Linux kernel on its command line)")
    virtio.add_argument("--drive", action="append", default=[], metavar="FILE[,readonly]",
                        help="a raw disk image as a virtio-blk device (/dev/vda, vdb, ...; repeatable)")
    virtio.add_argument("--rng", action="store_true", help="a virtio-rng device fed from the host's os.urandom")
    virtio.add_argument("--console", choices=["uart", "virtio"], default="uart",
                        help="where host input goes: the UART (default) or a virtio console, the guest's hvc0 "
                             "(its output is shown too; the UART stays)")
    see = run.add_argument_group("seeing inside (on stderr; see docs/walkthrough.md)")
    see.add_argument("--trace", action="store_true",
                     help="one line per VM exit: vCPU, reason, port/address, value, RIP, the instruction")
    see.add_argument("--trace-filter", metavar="SPEC",
                     help="trace only these exits (implies --trace), e.g. io:0x3f8-0x3ff,mmio,hlt")
    see.add_argument("--stats", action="store_true",
                     help="at the end, a table of exits per reason, port and MMIO address with handling times")
    see.add_argument("--stats-json", metavar="FILE", help="write the exit statistics to FILE as JSON")
    see.add_argument("--step", type=_int, default=0, metavar="N",
                     help="single-step the first N instructions, printing each with the registers it changed")
    see.add_argument("--step-from", type=_int, default=None, metavar="ADDR",
                     help="with --step: start stepping when the guest reaches this linear address")
    see.add_argument("--gdb", metavar="[HOST]:PORT",
                     help="serve the gdb remote protocol here (host default 127.0.0.1; port 0 picks one)")
    see.add_argument("--gdb-wait", action="store_true", help="with --gdb: start the guest only when gdb continues")

    _add_api_options(run, sub)

    sub.add_parser("info", help="KVM API version, capabilities pykvm uses, vCPU limits")
    fetch = sub.add_parser("fetch", help="download a guest: `pykvm fetch linux` gets Debian's kernel (cached)")
    fetch.add_argument("what", choices=["linux"])
    from .client import add_parsers  # the daemon and its docker-style client verbs
    add_parsers(sub, _size, _int)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run" and args.detach:
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
    print(textwrap.fill(message, width=100, initial_indent="pykvm: ", subsequent_indent="  ",
                        break_long_words=False, break_on_hyphens=False), file=sys.stderr)


def cmd_run(args) -> int:
    if args.config_file is not None or args.restore is not None or args.mem_file is not None:
        return cmd_run_vmm(args)
    if args.list:
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
    from .machine import Machine  # imports KVM bits only when a VM is really wanted
    serial = _api_serial(args)
    with Machine(mem_size=args.mem, cpus=args.cpus, irqchip=plan.irqchip, firmware=firmware,
                 serial_out=serial) as machine:
        virtio = attach_virtio(machine, *_virtio_devices(args))
        machine.load(plan)
        seeing = inside.attach(machine, debug_options)
        on_quit = lambda: machine.end(0, "quit from the console (Ctrl-A x)")  # noqa: E731
        console = virtio.console or machine.uart
        with HostConsole(console, on_quit=on_quit, wait_for_driver=plan.console_waits_for_driver), \
                _api_while_running(args, machine, serial):
            result = machine.run(timeout=args.timeout)
        seeing.finish()
    if result.report or not args.quiet:
        _say(f"{result.reason} (exit status {result.status})")
    if result.report:
        print(result.report, file=sys.stderr)
    return result.status


def _virtio_devices(args) -> tuple[list, bool, bool]:
    """(drives, rng, console) of --drive, --rng, --console virtio."""
    return [parse_drive(d) for d in args.drive], args.rng, args.console == "virtio"


def _debug_options(args):
    from .debug.inside import Options
    return Options(trace=args.trace, trace_filter=args.trace_filter, stats=args.stats,
                   stats_json=args.stats_json, step=args.step, step_from=args.step_from, gdb=args.gdb,
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
        virtio_args = linux_cmdline(*_virtio_devices(args))   # virtio_mmio.device=... for Linux
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


def cmd_fetch(args) -> int:
    from .fetch import fetch_linux
    vmlinuz, vmlinux = fetch_linux()
    print(f"vmlinuz {vmlinuz}")
    print(f"vmlinux {vmlinux}")
    return 0


def cmd_info(args) -> int:
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
        print(f"virtio fast path: {fast_path(kvm).describe()}")
    return 0


def _backend() -> str:
    module = host_backend()
    if module == "kvm_pvm":
        return module + (" (not hardware virtualization: CPL0 guest code is emulated; paging only in long mode;"
                         " see PLATFORM notes in the README)")
    return module


# --- the per-VM API (pykvm/api) and snapshots: `pykvm vmm`, `pykvm run --api-sock/--config-file/--restore` ----
def _add_api_options(run, sub) -> None:
    api = run.add_argument_group("API and snapshots (Firecracker's API; see the README)")
    api.add_argument("--api-sock", metavar="PATH",
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
    vmm.add_argument("--api-sock", required=True, metavar="PATH", help="the Unix socket to serve (created 0600)")
    vmm.add_argument("--config-file", metavar="FILE", help="configure and start from this Firecracker JSON file")
    vmm.add_argument("--id", default="anonymous-instance", help="the instance id GET / reports")
    vmm.add_argument("-q", "--quiet", action="store_true", help="do not print how the run ended")


def _terminate_like_ctrl_c() -> None:
    """SIGTERM ends a VMM as Ctrl-C does (status 130): the run ends, the API socket file is removed."""
    import signal

    def _terminate(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _terminate)


def _api_serial(args):
    """With --api-sock, the guest's serial output also goes to a ring that GET /pykvm/console serves."""
    if getattr(args, "api_sock", None) is None:
        return None
    from .api.controller import SerialRing
    from .console import stdout_write
    return SerialRing(stdout_write)


def _api_while_running(args, machine, serial):
    """Serve the API for an already booted machine (`pykvm run --api-sock`), or nothing."""
    import contextlib
    if getattr(args, "api_sock", None) is None:
        return contextlib.nullcontext()
    from .api.controller import Vmm
    from .api.server import ApiServer
    _terminate_like_ctrl_c()
    stack = contextlib.ExitStack()
    vmm = Vmm(args.id, machine=machine)
    vmm.serial = serial
    stack.callback(vmm.shutdown)
    stack.enter_context(ApiServer(vmm, args.api_sock))
    return stack


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
    if config.entropy is not None:
        actions.append(c.PutEntropy(config.entropy))
    if config.logger is not None:
        actions.append(c.PutLogger(config.logger))
    if config.metrics is not None:
        actions.append(c.PutMetrics(config.metrics))
    return actions + [c.StartInstance()]


def _serve_vmm(args, actions: list) -> int:
    """Run a Vmm: apply ``actions`` (a config file, a snapshot load), serve the API if asked, run the machine on
    this (the main) thread until the guest ends."""
    import contextlib

    from .api import controller as c
    from .api.server import ApiServer
    from .console import stdout_write

    _terminate_like_ctrl_c()
    # Import what InstanceStart and a snapshot load need before the socket exists (as a compiled VMM has it
    # loaded): a restore then costs the restore, not ~0.1 s of first imports.
    from . import machine
    from .boot import detect  # noqa: F401
    from .devices import virtio  # noqa: F401
    from .snapshot import machine_state
    machine_state.warm_up(machine.Machine)
    vmm = c.Vmm(args.id, serial_out=stdout_write)
    try:
        with ApiServer(vmm, args.api_sock) if args.api_sock else contextlib.nullcontext():
            for action in actions:
                try:
                    vmm.submit(action)
                except c.ApiError as e:
                    raise UsageError(e.message) from None
            try:
                while not vmm.wait_until_ready(0.5):
                    pass
            except KeyboardInterrupt:
                return 130
            on_quit = lambda: vmm.machine.end(0, "quit from the console (Ctrl-A x)")  # noqa: E731
            with HostConsole(vmm.machine.uart, on_quit=on_quit):    # stdin to the serial port, as Firecracker's
                result = vmm.run_machine(timeout=getattr(args, "timeout", None))
    finally:
        vmm.shutdown()
        if vmm.machine is not None:
            vmm.machine.close()
    if result.report or not args.quiet:
        _say(f"{result.reason} (exit status {result.status})")
    if result.report:
        print(result.report, file=sys.stderr)
    return result.status


def cmd_vmm(args) -> int:
    """`pykvm vmm --api-sock PATH`: wait for the API to configure and start the VM (or a --config-file)."""
    return _serve_vmm(args, _config_actions(args.config_file) if args.config_file else [])


def cmd_run_vmm(args) -> int:
    """`pykvm run --config-file FILE` or `pykvm run --restore STATE --mem-file MEM` (with or without --api-sock)."""
    from .api import controller as c
    from .api import models
    if args.config_file is not None and args.restore is not None:
        raise UsageError("give either --config-file or --restore, not both")
    if args.image is not None or args.kernel is not None:
        raise UsageError("--config-file and --restore describe the whole VM; leave out the guest image and --kernel")
    if args.restore is None:
        if args.mem_file is not None:
            raise UsageError("--mem-file goes with --restore STATE (the snapshot's state file)")
        return _serve_vmm(args, _config_actions(args.config_file))
    if args.mem_file is None:
        raise UsageError("--restore needs the snapshot's memory file: --mem-file MEM")
    load = models.SnapshotLoadParams(snapshot_path=args.restore, mem_file_path=args.mem_file, resume_vm=True)
    return _serve_vmm(args, [c.LoadSnapshot(load)])
