"""Starting one VMM and talking to its per-VM API (issue 12, part 3).

``vmm_argv`` turns a VM's spec into the VMM's command line; ``jailed_argv`` wraps it in the jail
(issue 13, part 4: :mod:`pykvm.engine.jailrun`, used when the daemon runs as root without
``--no-jail``); :class:`pykvm.engine.zygote.ZygoteClient` starts the shim that starts it.
``VmmApi`` speaks Firecracker's API (PUT /actions, PATCH /vm, PUT /snapshot/create ...) to the
VMM's own socket when the VMM has one.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import httpx

log = logging.getLogger("pykvm.engine")
logging.getLogger("httpx").setLevel(logging.WARNING)     # not one line per call to a VMM


def has_vmm_api() -> bool:
    """Whether this pykvm has the per-VM API (``pykvm run --api-sock``, issue 11)."""
    return importlib.util.find_spec("pykvm.api") is not None


def has_jail() -> bool:
    return importlib.util.find_spec("pykvm.jail") is not None


def vmm_argv(spec: dict, fd_paths: dict, api_sock: Path | None, net: dict | None = None) -> list[str]:
    """``python -m pykvm run ...`` for ``spec``; ``fd_paths`` maps "kernel", "initrd", "drive0"... to the
    ``/proc/self/fd/N`` names of descriptors opened with the owner's permissions. ``net``: the VM's
    NetworkSettings (:mod:`pykvm.engine.network`): a virtio-net card on its TAP and, for a Linux
    kernel, ``ip=`` on its command line."""
    if spec.get("FromSnapshot"):     # an empty VMM that PUT /snapshot/load fills (see Backend.start)
        return [sys.executable, "-m", "pykvm", "vmm", "--api-sock", str(api_sock)]
    argv = [sys.executable, "-m", "pykvm", "run", "-q", "-m", f"{int(spec['MemoryMiB'])}M",
            "-c", str(int(spec["Vcpus"]))]
    if spec.get("Kernel"):
        argv += ["-k", fd_paths["kernel"]]
        if spec.get("Initrd"):
            argv += ["-i", fd_paths["initrd"]]
        cmdline = spec.get("Cmdline") or ""
        if net is not None:
            from .network import kernel_ip_arg
            cmdline = f"{cmdline} {kernel_ip_arg(net)}".strip()
        if cmdline:
            argv += ["-p", cmdline]
    elif spec.get("ImageFile"):
        argv.append(fd_paths["image"])
    else:
        argv.append(spec.get("Image") or "hello-long64")
    for n, drive in enumerate(spec.get("Drives") or []):
        argv += ["--drive", fd_paths[f"drive{n}"] + (",readonly" if drive.get("ReadOnly") else "")]
    if spec.get("Rng"):
        argv.append("--rng")
    if net is not None:
        argv += ["--net", f"tap={net['Tap']},mac={net['MacAddress']}"]
    if spec.get("Console", "uart") != "uart":
        argv += ["--console", spec["Console"]]
    if api_sock is not None:
        argv += ["--api-sock", str(api_sock)]
    return argv


def restore_argv(state: str, mem: str, api_sock: Path) -> list[str]:
    """``python -m pykvm run --restore STATE --mem-file MEM --api-sock SOCK``: a jailed VMM continuing a
    snapshot (the daemon's descriptors as ``/proc/self/fd/N``); it loads before entering its jail, where
    it could no longer create the VM that a ``pykvm vmm`` + PUT /snapshot/load would."""
    return [sys.executable, "-m", "pykvm", "run", "-q", "--restore", state, "--mem-file", mem,
            "--api-sock", str(api_sock)]


def jailed_argv(argv: list[str], vmdir: Path, chroot_base: Path) -> list[str]:
    """``argv`` (a ``pykvm run`` from :func:`vmm_argv`) started in a jail by :mod:`pykvm.engine.jailrun`:
    the jail's id is the VM directory's name (hex digits, as the jail's id rule wants)."""
    if argv[1:4] != ["-m", "pykvm", "run"]:
        raise ValueError("only a `pykvm run` VMM can be jailed")
    return [sys.executable, "-m", "pykvm.engine.jailrun", str(vmdir), vmdir.name, str(chroot_base), "--",
            *argv[3:]]


class VmmError(Exception):
    """The VMM's API refused a request or could not be reached."""


class VmmApi:
    """An async client of one VMM's Firecracker-style API socket."""

    def __init__(self, sock: str, timeout: float = 10.0) -> None:
        self.client = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=sock), base_url="http://localhost",
                                        timeout=timeout)

    async def call(self, method: str, path: str, body: dict | None = None):
        try:
            r = await self.client.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise VmmError(f"the VMM's API socket did not answer: {e}") from None
        finally:
            await self.client.aclose()
        if r.status_code >= 400:
            try:
                message = r.json().get("fault_message", r.text)
            except ValueError:
                message = r.text
            raise VmmError(f"the VMM refused {method} {path}: {message}")
        return r.json() if r.content else None
