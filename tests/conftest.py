"""Shared test helpers: the /dev/kvm gate, running the CLI, assembling tiny guests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The tests send SIGINT to the pykvm processes they start, as a user's Ctrl-C (or kill -INT) would. A
# pytest started in the background by a non-interactive shell (`pytest ... &` in a script: POSIX has
# such jobs ignore SIGINT) passes that SIG_IGN on to every child, and a pykvm that inherits an ignored
# SIGINT rightly keeps ignoring it (as nohup'd programs do): those tests then hung until their
# timeouts. A handler of our own is reset to SIG_DFL in the children, which is what a user's pykvm has.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _kvm_problem() -> str | None:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
    except OSError as e:
        return f"/dev/kvm is not usable here ({e.strerror}): these tests need KVM"
    os.close(fd)
    return None


KVM_PROBLEM = _kvm_problem()
needs_kvm = pytest.mark.skipif(KVM_PROBLEM is not None, reason=KVM_PROBLEM or "")


def backend() -> str:
    from pykvm.kvm.host import host_backend
    return host_backend()


# kvm_pvm's defect (README, "This host's KVM"): now and then a busybox process in the small Linux dies at
# start-up with SIGSEGV, and the kernel logs it on the guest's console. A Linux test whose failure message
# carries the guest's output with that line failed because of the backend, not of pykvm: it is reported
# as skipped, with the line, rather than as passed or as a pykvm failure.
PVM_DEFECT = re.compile(r"segfault at \w+ ip \w+ sp \w+ error \d+ in busybox\[\w+\+\w+\]")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and KVM_PROBLEM is None:
        m = PVM_DEFECT.search(str(report.longrepr))
        if m and backend() == "kvm_pvm":
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0,
                               f"kvm_pvm defect, not pykvm's: a guest process died at start-up ({m[0]})")


def run_pykvm(*args: str, timeout: float = 60, input: bytes | None = None, env: dict | None = None):
    """Run ``python -m pykvm ARGS`` as a user would; returns CompletedProcess with bytes output."""
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True, timeout=timeout,
                          input=input if input is not None else b"", cwd=ROOT, env=full_env)


def assemble(source: str, bits: int, tmp_path: Path) -> bytes:
    """Assemble GNU as source into a flat binary (origin 0x8000)."""
    if not (shutil.which("as") and shutil.which("ld") and shutil.which("objcopy")):
        pytest.skip("binutils (as, ld, objcopy) are needed to assemble test guests")
    src = tmp_path / "t.S"
    src.write_text({16: ".code16\n", 32: ".code32\n", 64: ".code64\n"}[bits] + source + "\n")
    obj, elf, out = tmp_path / "t.o", tmp_path / "t.elf", tmp_path / "t.bin"
    subprocess.run(["as", "--64", "-o", obj, src], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext=0x8000", "--build-id=none", "-o", elf, obj], check=True)
    subprocess.run(["objcopy", "-O", "binary", elf, out], check=True)
    return out.read_bytes()


def assert_plan_in_ram(plan, mem_size: int) -> None:
    """Every write of a BootPlan inside guest RAM, and no two writes overlapping (kernel, modules,
    boot structures): what a loader must guarantee whatever the image says."""
    from pykvm.boot import check_fits
    spans = []
    for gpa, data in plan.writes:
        check_fits("write", gpa, len(data), mem_size)
        if data:
            spans.append((gpa, gpa + len(data)))
    spans.sort()
    for (_, end_a), (start_b, _) in zip(spans, spans[1:], strict=False):
        assert start_b >= end_a, "two writes of one plan overlap"
