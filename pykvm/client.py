"""The docker-style client verbs of ``pykvm`` (issue 12, part 4): REST calls to ``pykvm daemon``.

``pykvm ps``, ``create``, ``start``, ``stop``, ``kill``, ``restart``, ``rm``, ``inspect``, ``logs``,
``attach``, ``pause``, ``unpause``, ``stats``, ``events``, ``top``, ``run -d`` and ``daemon``: docker's
verbs and flags where they mean the same thing. Each speaks HTTP over the daemon's Unix socket (httpx);
``attach`` is a WebSocket (``/vms/{id}/attach/ws``). Errors are one line and status 1 for an error
the daemon reported (as docker), 2 for bad usage or no daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from .errors import UsageError

ESCAPE = 0x01       # Ctrl-A, then x: detach (as `pykvm run`'s console)


class DaemonError(Exception):
    """The daemon answered with an error: ``status`` and its ``{"message"}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Client:
    """A synchronous client of the daemon's API over its Unix socket."""

    def __init__(self, socket_path: Path, timeout: float | None = 60.0) -> None:
        import httpx
        self.socket_path = socket_path
        self.http = httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), base_url="http://pykvm",
                                 timeout=timeout)

    def close(self) -> None:
        """Close the connection to the daemon's socket."""
        self.http.close()

    def request(self, method: str, path: str, **kw):
        """One HTTP request to the daemon; UsageError if it cannot be reached, DaemonError on an error answer."""
        import httpx
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise UsageError(f"cannot reach the pykvm daemon at {self.socket_path} ({e}): is `pykvm daemon` "
                             "running? (choose a socket with --host or PYKVM_HOST)") from None
        if r.status_code >= 400:
            try:
                message = r.json().get("message", r.text)
            except ValueError:
                message = r.text
            raise DaemonError(r.status_code, message)
        return r

    def json(self, method: str, path: str, **kw):
        """The decoded JSON body of a request (None for an empty body); errors as :meth:`request`."""
        r = self.request(method, path, **kw)
        return r.json() if r.content else None

    def stream(self, method: str, path: str, **kw):
        """Yield chunks of text of a streaming response."""
        import httpx
        try:
            with self.http.stream(method, path, timeout=httpx.Timeout(None, connect=10), **kw) as r:
                if r.status_code >= 400:
                    r.read()
                    try:
                        message = r.json().get("message", r.text)
                    except ValueError:
                        message = r.text
                    raise DaemonError(r.status_code, message)
                yield from r.iter_text()
        except httpx.TransportError as e:
            raise UsageError(f"cannot reach the pykvm daemon at {self.socket_path} ({e})") from None


def _r(ref: str) -> str:
    """A VM reference for a URL path: as docker takes it (a leading '/' of a name dropped), percent-encoded so
    an odd name can never reach another path."""
    from urllib.parse import quote
    if not ref.lstrip("/"):
        raise UsageError(f"{ref!r} names no VM: give a VM's name, id or unique id prefix")
    return quote(ref.lstrip("/"), safe="")


# -- parsers -----------------------------------------------------------------------------------------
VERBS = ("daemon", "ps", "create", "start", "stop", "kill", "restart", "rm", "inspect", "logs", "attach", "pause",
         "unpause", "stats", "events", "top", "wait", "snapshot")


def add_vm_options(p: argparse.ArgumentParser, size_type, int_type) -> None:
    """The options of `create` that `run` also has (same names)."""
    p.add_argument("image", nargs="?", default=None, help="a bundled guest name or a flat binary file")
    p.add_argument("-k", "--kernel", metavar="FILE")
    p.add_argument("-i", "--initrd", metavar="FILE")
    p.add_argument("-p", "--append", default="", metavar="CMDLINE")
    p.add_argument("-m", "--mem", type=size_type, default=64 << 20, metavar="SIZE")
    p.add_argument("-c", "--cpus", type=int_type, default=1, metavar="N")
    p.add_argument("--drive", action="append", default=[], metavar="FILE[,readonly]")
    p.add_argument("--rng", action="store_true")
    p.add_argument("--console", choices=["uart", "virtio"], default="uart")


def add_parsers(sub, size_type, int_type) -> None:
    """Register the client verbs on ``pykvm``'s subparsers (``size_type``: guest RAM, ``int_type``: vCPUs)."""
    from .cli import _host, _limit_size, _socket_type, ranged, seconds
    from .engine import MAX_STOP_WAIT

    def verb(name, help_, ids=True, many=True):
        p = sub.add_parser(name, help=help_)
        p.add_argument("-H", "--host", type=_host,
                       help="the daemon's socket, unix:///PATH or PATH (default: $PYKVM_HOST, else the daemon's "
                            "default socket)")
        if ids:
            p.add_argument("vms", nargs="+" if many else None, metavar="VM", help="id, id prefix or name")
        return p

    d = sub.add_parser("daemon", help="serve the Engine API on a Unix socket and run VMs")
    d.add_argument("--socket", type=_socket_type("--socket", parent_must_exist=False),
                   help="socket path (default /run/pykvm/pykvm.sock as root, else "
                                    "$XDG_RUNTIME_DIR/pykvm/pykvm.sock)")
    d.add_argument("--state-dir", help="database and logs (default /var/lib/pykvm as root, else "
                                       "$XDG_STATE_HOME/pykvm)")
    d.add_argument("--memory-budget", type=_limit_size, default=None, metavar="SIZE",
                   help="guest RAM + VMM overhead the running VMs may hold (default: available memory - 256M)")
    d.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    d.add_argument("--bridge", default="pykvm0", metavar="NAME",
                   help="the bridge VMs created with --net join (made on the first such VM; default pykvm0)")
    d.add_argument("--subnet", default="192.0.2.0/24", metavar="CIDR",
                   help="the bridge's subnet: its first address is the bridge's, the next ones the VMs' "
                        "(default 192.0.2.0/24)")
    d.add_argument("--no-jail", action="store_true",
                   help="start VMMs unjailed (as root they are jailed by default: pykvm.jail); logged")

    p = verb("ps", "list VMs", ids=False)
    p.add_argument("-a", "--all", action="store_true", help="also VMs that are not running")
    p.add_argument("-q", "--quiet", action="store_true", help="only ids")
    p.add_argument("--no-trunc", action="store_true")
    p.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="id=, name=, status=, exited=")
    p.add_argument("--format", choices=["table", "json"], default="table")
    c = verb("create", "create a VM (not started); prints its id", ids=False)
    c.add_argument("--name")
    c.add_argument("--from-snapshot", metavar="VM:SNAPSHOT", help="start from a snapshot taken with `pykvm snapshot`")
    add_vm_options(c, size_type, int_type)
    c.add_argument("--net", action="store_true",
                   help="a network card on the daemon's bridge, with an address (shown by inspect; a Linux kernel "
                        "gets it with ip=)")
    sn = verb("snapshot", "a full snapshot of a running or paused VM (restore: create --from-snapshot VM:NAME)",
              many=False)
    sn.add_argument("name", help="the snapshot's name")
    s = verb("start", "start VMs")
    s.add_argument("-a", "--attach", action="store_true", help="attach to the console (one VM)")
    for name, help_ in (("stop", "stop VMs: Ctrl-Alt-Del, then kill after -t seconds"),
                        ("restart", "stop then start VMs")):
        p = verb(name, help_)
        p.add_argument("-t", "--time", type=seconds(0, MAX_STOP_WAIT), default=10,      # the daemon's limit
                       help="seconds to wait before killing (default 10)")
    k = verb("kill", "kill VMs' VMM processes")
    k.add_argument("-s", "--signal", default="SIGKILL")
    r = verb("rm", "remove VMs")
    r.add_argument("-f", "--force", action="store_true", help="kill a running VM first")
    verb("inspect", "VMs' full records as JSON")
    lg = verb("logs", "a VM's console output", many=False)
    lg.add_argument("-f", "--follow", action="store_true")
    lg.add_argument("-n", "--tail", default="all", type=_tail, help="only the last N lines")
    lg.add_argument("-t", "--timestamps", action="store_true")
    verb("attach", "the VM's serial console here (Ctrl-A x detaches)", many=False)
    verb("pause", "pause VMs (every vCPU out of KVM_RUN)")
    verb("unpause", "resume paused VMs")
    verb("wait", "block until VMs stop; print their exit statuses")
    st = verb("stats", "CPU, memory and exits of VMs", ids=False)
    st.add_argument("vms", nargs="*", metavar="VM")
    st.add_argument("--no-stream", action="store_true")
    st.add_argument("--format", choices=["table", "json"], default="table")
    ev = verb("events", "stream VM events", ids=False)
    ev.add_argument("--since", help="unix time, or a duration before now: 30s, 10m, 2h")
    ev.add_argument("--until", help="unix time, or a duration before now (0s: now)")
    ev.add_argument("-f", "--filter", action="append", default=[], metavar="KEY=VALUE", help="vm=, event=")
    tp = verb("top", "exit rate per reason of every running VM, refreshing (kvm_stat per VM)", ids=False)
    tp.add_argument("-d", "--delay", type=seconds(0, 3600, lo_open=True), default=1.0, help="seconds between refreshes")
    tp.add_argument("-n", "--iterations", type=ranged(0, 2**31 - 1, "a number of refreshes"), default=0,
                    help="stop after N refreshes (default: never)")


def _tail(text: str) -> str:
    """``logs --tail``: ``all`` or a number of lines, 0 or more."""
    if text == "all" or (text.isdigit() and int(text) < 2**31):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: give `all` or a number of lines (0 or more)")


def spec_from_args(args) -> dict:
    """The create request body for `create` / `run -d` options (paths made absolute: the daemon has no
    working directory of ours)."""
    from .boot import bundled
    if args.mem % (1 << 20):        # MemoryMiB: rounding down would give the guest less than asked, unsaid
        raise UsageError(f"-m/--mem: the daemon takes guest memory in whole MiB, and {args.mem:,} bytes is not "
                         f"(give e.g. {max(1, args.mem >> 20)}M)")
    spec: dict = {"MemoryMiB": args.mem >> 20, "Vcpus": args.cpus, "Rng": bool(args.rng),
                  "Console": args.console}
    net = getattr(args, "net", False)
    if net is True or net == ["bridge"]:       # create --net; run -d --net bridge
        spec["Network"] = True
    elif net:
        raise UsageError("with -d, --net takes only `bridge` (a card on the daemon's bridge): the daemon makes "
                         "the TAPs")
    if args.kernel:
        if args.image:
            raise UsageError(f"give either a guest ({args.image}) or --kernel, not both")
        spec["Kernel"] = os.path.abspath(args.kernel)
        if args.initrd:
            spec["Initrd"] = os.path.abspath(args.initrd)
        if args.append:
            spec["Cmdline"] = args.append
    elif args.initrd or args.append:
        raise UsageError("--append and --initrd need a --kernel")
    elif args.image and (Path(args.image).exists() or "/" in args.image or Path(args.image).suffix):
        spec["ImageFile"] = os.path.abspath(args.image)
    else:
        spec["Image"] = args.image or bundled.DEFAULT.name
    drives = []
    for d in args.drive:
        path, _, opt = d.partition(",")
        if opt not in ("", "readonly"):
            raise UsageError(f"--drive {d}: the only option is readonly")
        drives.append({"PathOnHost": os.path.abspath(path), "ReadOnly": opt == "readonly"})
    from .cli import check_drives  # refused here as by `pykvm run`, before the daemon opens anything
    check_drives([(d["PathOnHost"], d["ReadOnly"]) for d in drives])
    spec["Drives"] = drives
    return spec


# -- the verbs ---------------------------------------------------------------------------------------
def main(args) -> int:
    """Run one client verb (or the daemon); returns the exit status."""
    if args.command == "daemon":
        return cmd_daemon(args)
    from .engine.paths import default_socket, socket_from_host
    sock = socket_from_host(args.host) if getattr(args, "host", None) else default_socket()
    client = Client(sock)
    try:
        return globals()[f"cmd_{args.command}"](client, args)
    except DaemonError as e:
        print(f"Error response from daemon: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


def cmd_daemon(args) -> int:
    """``pykvm daemon``: serve the engine API on its Unix socket until SIGTERM/SIGINT; returns 0."""
    import asyncio
    import logging

    from .engine.network import Bridge
    from .engine.paths import default_socket, default_state_dir, socket_from_host
    from .engine.server import serve
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s pykvm daemon: %(message)s")
    sock = socket_from_host(args.socket) if args.socket else default_socket()
    state = Path(args.state_dir) if args.state_dir else default_state_dir()
    try:
        bridge = Bridge(args.bridge, args.subnet)      # UsageError (status 2) for a bad name or subnet
        asyncio.run(serve(sock, state, args.memory_budget, jail=not args.no_jail, bridge=bridge))
    except KeyboardInterrupt:
        pass
    return 0


def _filters(items: list[str]) -> str | None:
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"a filter is KEY=VALUE, not {item!r}")
        out.setdefault(key, []).append(value)
    return json.dumps(out) if out else None


def cmd_ps(client: Client, args) -> int:
    """``pykvm ps``: list the VMs (running ones, or all with -a), as a table or JSON."""
    params = {"all": "1" if args.all else "0"}
    if f := _filters(args.filter):
        params["filters"] = f
    vms = client.json("GET", "/vms/json", params=params)
    if args.format == "json":
        for vm in vms:
            print(json.dumps(vm))
        return 0
    if args.quiet:
        for vm in vms:
            print(vm["Id"] if args.no_trunc else vm["Id"][:12])
        return 0
    from .engine.logs import human_duration
    rows = [("VM ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "MEMORY", "NAMES")]
    for vm in vms:
        image = vm["Image"] if args.no_trunc else _short(os.path.basename(vm["Image"]), 20)
        command = json.dumps(vm["Command"] if args.no_trunc else _short(vm["Command"], 20))
        rows.append((vm["Id"] if args.no_trunc else vm["Id"][:12], image, command,
                     human_duration(time.time() - vm["Created"]) + " ago", vm["Status"], f"{vm['Memory'] >> 20}MiB",
                     vm["Names"][0].lstrip("/")))
    _table(rows)
    return 0


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _table(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_create(client: Client, args) -> int:
    """``pykvm create``: create a VM (from options or --from-snapshot VM:SNAPSHOT) and print its id."""
    params = {"name": args.name} if args.name else {}
    if args.from_snapshot:
        vm, sep, snap = args.from_snapshot.rpartition(":")
        if not sep or not vm or not snap:
            raise UsageError(f"--from-snapshot takes VM:SNAPSHOT, not {args.from_snapshot!r}")
        body = {"FromSnapshot": {"Vm": vm, "Snapshot": snap}}
    else:
        body = spec_from_args(args)
    print(client.json("POST", "/vms/create", params=params, json=body)["Id"])
    return 0


def cmd_snapshot(client: Client, args) -> int:
    """``pykvm snapshot VM``: save the VM's snapshot and print its path."""
    print(client.json("POST", f"/vms/{_r(args.vms)}/snapshot", params={"name": args.name})["Path"])
    return 0


def run_detached(args) -> int:
    """`pykvm run -d`: create + start through the daemon, print the id."""
    from .engine.paths import default_socket, socket_from_host
    client = Client(socket_from_host(args.host) if getattr(args, "host", None) else default_socket())
    try:
        params = {"name": args.name} if args.name else {}
        vm_id = client.json("POST", "/vms/create", params=params, json=spec_from_args(args))["Id"]
        client.request("POST", f"/vms/{_r(vm_id)}/start")
        print(vm_id)
        return 0
    except DaemonError as e:
        print(f"Error response from daemon: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()


def _each(client: Client, args, method: str, path: str, **params) -> int:
    """Apply one call to every VM named; print each name as docker does; status 1 if any failed."""
    status = 0
    for ref in args.vms:
        try:
            r = client.request(method, path.format(_r(ref)), params=params)
            if r.status_code != 304 or method == "POST":
                print(ref)
        except DaemonError as e:
            print(f"Error response from daemon: {e}", file=sys.stderr)
            status = 1
    return status


def cmd_start(client: Client, args) -> int:
    """``pykvm start VM...``: start each VM; with -a, attach to the one VM and return its exit status."""
    if args.attach:
        if len(args.vms) != 1:
            raise UsageError("start -a attaches to one VM")
        client.request("POST", f"/vms/{_r(args.vms[0])}/start")
        return _attach(client, args.vms[0], exit_status=True)
    return _each(client, args, "POST", "/vms/{}/start")


def cmd_stop(client: Client, args) -> int:
    """``pykvm stop VM...``: ask each VM to stop; the daemon kills it after -t seconds (default 10)."""
    return _each(client, args, "POST", "/vms/{}/stop", t=str(args.time))


def cmd_restart(client: Client, args) -> int:
    """``pykvm restart VM...``: stop (killing after -t seconds) then start each VM."""
    return _each(client, args, "POST", "/vms/{}/restart", t=str(args.time))


def cmd_kill(client: Client, args) -> int:
    """``pykvm kill VM...``: send each VM's VMM the signal given with -s."""
    return _each(client, args, "POST", "/vms/{}/kill", signal=args.signal)


def cmd_rm(client: Client, args) -> int:
    """``pykvm rm VM...``: remove each VM (-f: stop a running one first)."""
    return _each(client, args, "DELETE", "/vms/{}", force="1" if args.force else "0")


def cmd_pause(client: Client, args) -> int:
    """``pykvm pause VM...``: pause each VM's vCPUs."""
    return _each(client, args, "POST", "/vms/{}/pause")


def cmd_unpause(client: Client, args) -> int:
    """``pykvm unpause VM...``: resume each paused VM."""
    return _each(client, args, "POST", "/vms/{}/unpause")


def cmd_wait(client: Client, args) -> int:
    """``pykvm wait VM...``: block until each VM ends and print its exit status."""
    import httpx
    client.http.timeout = httpx.Timeout(None, connect=10)
    for ref in args.vms:
        print(client.json("POST", f"/vms/{_r(ref)}/wait")["StatusCode"])
    return 0


def cmd_inspect(client: Client, args) -> int:
    """``pykvm inspect VM...``: print each VM's record as JSON; status 1 if one is unknown."""
    out, status = [], 0
    for ref in args.vms:
        try:
            out.append(client.json("GET", f"/vms/{_r(ref)}/json"))
        except DaemonError as e:
            print(f"Error: {e}", file=sys.stderr)
            status = 1
    print(json.dumps(out, indent=4))
    return status


def cmd_logs(client: Client, args) -> int:
    """``pykvm logs VM``: print the VM's console log (-f follows it, --tail N, -t timestamps)."""
    params = {"follow": "1" if args.follow else "0", "tail": args.tail,
              "timestamps": "1" if args.timestamps else "0"}
    for chunk in client.stream("GET", f"/vms/{_r(args.vms)}/logs", params=params):
        sys.stdout.write(chunk)
        sys.stdout.flush()
    return 0


def cmd_events(client: Client, args) -> int:
    """``pykvm events``: print the daemon's VM events (--since/--until, filters) as they come."""
    params = {}
    for key in ("since", "until"):
        value = getattr(args, key)
        if value:
            params[key] = _when(value)
    if f := _filters(args.filter):
        params["filters"] = f
    buf = ""
    for chunk in client.stream("GET", "/events", params=params):
        buf += chunk
        while "\n" in buf:
            line, buf = buf.split("\n", 1)
            ev = json.loads(line)
            when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ev["time"]))
            attrs = ", ".join(f"{k}={v}" for k, v in sorted(ev["Actor"]["Attributes"].items()))
            print(f"{when} vm {ev['Action']} {ev['id']} ({attrs})", flush=True)
    return 0


def _when(text: str) -> str:
    """A unix time, or a duration before now as docker accepts it (``30s``, ``10m``, ``2h``)."""
    import math
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text[-1:] in units:
            value = time.time() - float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value < 2**53):
        raise UsageError(f"not a time: {text!r} (a unix time, or a duration such as 30s, 10m, 2h)")
    return str(value)


def cmd_stats(client: Client, args) -> int:
    """``pykvm stats [VM...]``: a live table of CPU %, memory and exits per VM (--no-stream: once)."""
    refs = args.vms or [vm["Id"] for vm in client.json("GET", "/vms/json")]
    prev: dict[str, tuple[float, int]] = {}
    while True:
        rows = [("VM ID", "NAME", "CPU %", "MEM USAGE / LIMIT", "UNIQUE", "EXITS")]
        records = []
        for ref in refs:
            s = client.json("GET", f"/vms/{_r(ref)}/stats", params={"stream": "0"})
            records.append(s)
            now, used = time.monotonic(), s["cpu_stats"].get("total_usage_ns", 0)
            before = prev.get(s["id"])
            cpu = (used - before[1]) / 1e9 / (now - before[0]) * 100 if before else 0.0
            prev[s["id"]] = (now, used)
            mem = s["memory_stats"]
            exits = sum(r.get("count", 0) for r in ((s.get("exits") or {}).get("reasons") or {}).values())
            rows.append((s["id"][:12], s["name"].lstrip("/"), f"{cpu:.1f}%",
                         f"{mem.get('usage', 0) / 2**20:.1f}MiB / {mem.get('limit', 0) / 2**20:.0f}MiB",
                         f"{mem.get('uss', 0) / 2**20:.1f}MiB", exits if s.get("exits") else "-"))
        if args.format == "json":
            for s in records:
                print(json.dumps(s))
        else:
            if not args.no_stream and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")
            _table(rows)
        if args.no_stream:
            return 0
        time.sleep(1.0)


def cmd_top(client: Client, args) -> int:
    """Exits per second per reason for every running VM, from the VMMs' exit statistics."""
    prev: dict[str, tuple[float, dict]] = {}
    n = 0
    while True:
        lines = []
        for vm in client.json("GET", "/vms/json"):
            s = client.json("GET", f"/vms/{_r(vm['Id'])}/stats", params={"stream": "0"})
            now = time.monotonic()
            reasons = {k: v.get("count", 0) for k, v in ((s.get("exits") or {}).get("reasons") or {}).items()}
            before = prev.get(vm["Id"])
            prev[vm["Id"]] = (now, reasons)
            lines.append(f"{vm['Id'][:12]}  {vm['Names'][0].lstrip('/')}  ({vm['Status']})")
            if s.get("exits") is None:
                lines.append("    (this VMM publishes no exit statistics)")
                continue
            dt = now - before[0] if before else None
            total_rate = 0.0
            for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
                rate = (count - before[1].get(reason, 0)) / dt if dt else 0.0
                total_rate += rate
                lines.append(f"    {reason:<24} {count:>12} {rate:>10.1f}/s")
            lines.append(f"    {'Total':<24} {sum(reasons.values()):>12} {total_rate:>10.1f}/s")
        if sys.stdout.isatty():
            print("\x1b[H\x1b[2J", end="")
        print(f"{'VM / exit reason':<28} {'count':>12} {'rate':>12}")
        print("\n".join(lines) if lines else "(no running VMs)", flush=True)
        n += 1
        if args.iterations and n >= args.iterations:
            return 0
        time.sleep(args.delay)


def cmd_attach(client: Client, args) -> int:
    """``pykvm attach VM``: bridge this terminal to the VM's console until Ctrl-A x or the VM ends; from a pipe
    or file, until its end: everything read is sent, then attach detaches with status 0 (the VM runs on)."""
    return _attach(client, args.vms, detach_at_eof=True)


def _attach(client: Client, ref: str, exit_status: bool = False, detach_at_eof: bool = False) -> int:
    """Bridge this terminal (or pipe) to the VM's console until Ctrl-A x (a terminal), the VM's end, or, with
    ``detach_at_eof``, the end of stdin (a closed stdin is at its end): all input is sent before the WebSocket's
    closing handshake, whose frames come after it (RFC 6455 section 7), so the daemon has it all. Without it
    (``start -a``), output is shown until the VM ends, whatever stdin does."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import unix_connect
    vm = client.json("GET", f"/vms/{_r(ref)}/json")
    if not vm["State"]["Running"]:
        raise DaemonError(409, f"VM {vm['Name'].lstrip('/')} is not running: start it first")
    try:
        ws = unix_connect(str(client.socket_path), f"ws://pykvm/vms/{vm['Id']}/attach/ws")
    except (OSError, ConnectionClosed, Exception) as e:    # the handshake refused: the VM is not running
        raise DaemonError(409, f"cannot attach to {ref}: {e}") from None
    stdin = sys.stdin.fileno() if sys.stdin is not None and not sys.stdin.closed else None
    tty_state = None
    if stdin is not None and os.isatty(stdin):
        import termios
        import tty
        tty_state = termios.tcgetattr(stdin)
        tty.setraw(stdin)
    stop = threading.Event()

    def feed():
        pending_escape = False
        while not stop.is_set():
            try:
                data = os.read(stdin, 4096)
            except OSError:
                data = b""
            if not data:
                if tty_state is None and not detach_at_eof:   # start -a: output until the VM ends
                    return
                stop.set()
                ws.close()      # after every send above: the daemon has the input; detach
                return
            out = bytearray()
            for b in data:
                if pending_escape:
                    pending_escape = False
                    if b in (ord("x"), ord("X")):
                        stop.set()
                        ws.close()
                        return
                    out.append(b)
                elif b == ESCAPE and tty_state is not None:
                    pending_escape = True
                else:
                    out.append(b)
            try:
                ws.send(bytes(out))
            except ConnectionClosed:
                return

    if stdin is not None:
        threading.Thread(target=feed, daemon=True).start()
    elif detach_at_eof:      # `<&-`: nothing will come, which is the end of input
        stop.set()
        ws.close()
    try:
        for message in ws:
            data = message if isinstance(message, bytes) else message.encode()
            os.write(sys.stdout.fileno(), data)
    except ConnectionClosed:
        pass
    finally:
        detached = stop.is_set()            # Ctrl-A x or the input's end: our own close
        stop.set()
        ws.close()
        if tty_state is not None:
            import termios
            termios.tcsetattr(stdin, termios.TCSADRAIN, tty_state)
            print("\r", file=sys.stderr)
    code = None if detached else ws.close_code
    if code is not None and code != 1000:   # 1000: the daemon's close when the VM's console ends
        reason = ws.close_reason or ""
        if 4000 <= code < 5000:             # the daemon's refusal after the handshake (routes.attach): 44xx
            raise DaemonError(code - 4000, reason or f"the console session was refused (close code {code})")
        raise UsageError(f"the daemon ended the console session of {ref} (WebSocket close code {code}"
                         + (f": {reason}" if reason else "") + "): it stopped or restarted, or the connection "
                         "broke; the VM itself may still run (`pykvm ps`)")
    if exit_status:
        state = client.json("GET", f"/vms/{_r(vm['Id'])}/json")["State"]
        return 0 if state["Running"] else state["ExitCode"]
    return 0
