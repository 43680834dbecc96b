"""VMs on a bridge, as Docker puts containers on docker0 (issue 14, part 4).

The daemon owns one Linux bridge (``pykvm0`` by default, ``pykvm daemon --bridge NAME --subnet
CIDR``) holding the subnet's first address (the guests' gateway). A VM created with a network
(``pykvm create --net``, ``"Network": true`` in the create body) gets

- an address: the lowest free one of the subnet, kept in ``VMDIR/network.json`` (so a restarted
  daemon knows what is taken) and shown by ``pykvm inspect`` under ``NetworkSettings`` (Docker's
  names: IPAddress, IPPrefixLen, Gateway, MacAddress, Bridge);
- a TAP device on the bridge (``pk`` + 12 hex digits of its id, under IFNAMSIZ), which its VMM
  opens with ``--net tap=NAME,mac=MAC`` (before entering its jail, so a jailed VMM needs no
  network namespace of the host's);
- for a Linux kernel, ``ip=ADDR::GATEWAY:NETMASK::eth0:off`` appended to its command line (the
  kernel's IP autoconfiguration, Documentation/admin-guide/nfs/nfsroot.rst).

Both are freed when the VM is removed. The bridge itself stays (Docker keeps docker0 too); the
daemon adds no route and no NAT, so guests reach the bridge's namespace and each other, nothing
further. Links are made with iproute2's ``ip`` (netlink), which every host with bridges has.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import shutil
import subprocess
from pathlib import Path

from ..errors import UsageError

log = logging.getLogger("pykvm.engine")

DEFAULT_BRIDGE = "pykvm0"
DEFAULT_SUBNET = "192.0.2.0/24"     # TEST-NET-1 (RFC 5737): never routed on the internet
IFNAMSIZ = 16                        # with its NUL (linux/if.h)


class NetworkError(Exception):
    """A bridge or TAP could not be made (``ip``'s message)."""


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise NetworkError(f"`ip {' '.join(args)}` failed: {(r.stderr or r.stdout).strip()}")


def _link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", "dev", name], capture_output=True).returncode == 0


def check_bridge_name(name: str) -> str:
    """A valid interface name (1 to 15 bytes, no '/', ':' or blank): UsageError otherwise."""
    if not 0 < len(name.encode()) < IFNAMSIZ or any(c in name for c in "/: \t\n") or name in (".", ".."):
        raise UsageError(f"--bridge {name!r} is not a valid interface name (1 to 15 characters, no '/', ':' "
                         "or spaces)")
    return name


def parse_subnet(text: str) -> ipaddress.IPv4Network:
    """An IPv4 CIDR with room for the bridge and at least one VM (prefix /8 to /30): UsageError otherwise."""
    try:
        net = ipaddress.IPv4Network(text, strict=True)
    except ValueError as e:
        raise UsageError(f"--subnet {text!r} is not an IPv4 network in CIDR form (e.g. 192.0.2.0/24): {e}") \
            from None
    if not 8 <= net.prefixlen <= 30:
        raise UsageError(f"--subnet {text}: use a prefix between /8 and /30 (room for the bridge and the VMs)")
    return net


def tap_name(vm_id: str) -> str:
    return "pk" + vm_id[:12]


def mac_for(vm_id: str) -> str:
    """A locally administered unicast MAC (02:...) from the VM's id."""
    return "02:" + ":".join(vm_id[i:i + 2] for i in range(0, 10, 2))


class Bridge:
    """The daemon's bridge and its address book (one per daemon)."""

    def __init__(self, name: str = DEFAULT_BRIDGE, subnet: str = DEFAULT_SUBNET) -> None:
        self.name = check_bridge_name(name)
        self.subnet = parse_subnet(subnet)
        self.gateway = next(self.subnet.hosts())
        self.taken: set[ipaddress.IPv4Address] = set()

    def setup(self) -> None:
        """Create the bridge with the gateway address, unless it exists; then bring it up."""
        if shutil.which("ip") is None:
            raise UsageError("VMs on a bridge need iproute2's `ip` command")
        if not _link_exists(self.name):
            _ip("link", "add", self.name, "type", "bridge")
            log.info("created bridge %s", self.name)
        r = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", self.name], capture_output=True, text=True)
        if f" {self.gateway}/" not in r.stdout:
            _ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.name)
        _ip("link", "set", self.name, "up")

    def learn(self, vmdir: Path) -> None:
        """Mark the address of an existing VM (its ``network.json``) as taken."""
        with_net = load(vmdir)
        if with_net:
            self.taken.add(ipaddress.IPv4Address(with_net["IPAddress"]))

    def attach(self, vm_id: str, vmdir: Path) -> dict:
        """Give a new VM an address and a TAP on the bridge; returns (and writes) its NetworkSettings."""
        for address in self.subnet.hosts():
            if address != self.gateway and address not in self.taken:
                break
        else:
            raise NetworkError(f"no free address left in {self.subnet} on bridge {self.name}")
        tap = tap_name(vm_id)
        if _link_exists(tap):
            _ip("link", "del", tap)     # a leftover of a VM with the same id prefix that was not removed
        _ip("tuntap", "add", "dev", tap, "mode", "tap")
        try:
            _ip("link", "set", tap, "master", self.name)
            _ip("link", "set", tap, "up")
        except NetworkError:
            _ip("link", "del", tap)
            raise
        self.taken.add(address)
        settings = {"Bridge": self.name, "IPAddress": str(address), "IPPrefixLen": self.subnet.prefixlen,
                    "Gateway": str(self.gateway), "MacAddress": mac_for(vm_id), "Tap": tap}
        (vmdir / "network.json").write_text(json.dumps(settings))
        return settings

    def detach(self, vmdir: Path) -> None:
        """Free a removed VM's TAP and address."""
        settings = load(vmdir)
        if not settings:
            return
        self.taken.discard(ipaddress.IPv4Address(settings["IPAddress"]))
        if _link_exists(settings["Tap"]):
            try:
                _ip("link", "del", settings["Tap"])
            except NetworkError as e:
                log.warning("%s", e)


def load(vmdir: Path) -> dict | None:
    """A VM's NetworkSettings, or None if it has no network."""
    try:
        return json.loads((vmdir / "network.json").read_text())
    except (OSError, ValueError):
        return None


def kernel_ip_arg(settings: dict) -> str:
    """The kernel's ``ip=`` parameter for these settings (client:server:gw:netmask:hostname:device:autoconf)."""
    mask = ipaddress.IPv4Network(f"0.0.0.0/{settings['IPPrefixLen']}").netmask
    return f"ip={settings['IPAddress']}::{settings['Gateway']}:{mask}::eth0:off"
