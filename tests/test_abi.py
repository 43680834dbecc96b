"""pykvm's hand-written cffi layouts and numbers equal the system's <linux/kvm.h>.

pykvm uses cffi in ABI mode, so nothing is compiled at install time and every struct layout in
``pykvm.kvm.abi`` is written out by hand. This module generates a C probe that includes
``<linux/kvm.h>``, compiles it with gcc and runs it, and compares against cffi and Python:

* ``sizeof`` of every struct in ``abi.STRUCTS``;
* for every field cffi knows (recursing into nested named, anonymous and inline structs and
  unions, e.g. ``kvm_run.io.port`` or ``kvm_run.s.regs.sregs.cr0``): its ``offsetof``, its
  ``sizeof`` (offset only for flexible array members) and, for integer fields, its signedness;
* every ``constants.Ioctl`` request against the C macro of the same name;
* every ``ExitReason`` against ``KVM_EXIT_<name>`` and every ``Cap`` against ``KVM_CAP_<name>``;
* the module-level ``KVM_*`` integers in ``constants`` that exist as C macros, plus ``KVMIO`` and
  the ``_IOC_*`` encoding parameters.

Every mismatch of a category is collected and reported in one failure. A cffi field that does
not exist in the C header (so the probe line does not compile) is reported as a mismatch too,
rather than breaking the whole probe.
"""

from __future__ import annotations

import re
import shutil
import struct as pystruct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pykvm.kvm import abi, constants, exits
from pykvm.kvm.abi import ffi
from pykvm.kvm.constants import Cap, ExitReason, Ioctl

HEADER = Path("/usr/include/linux/kvm.h")

# pykvm's own name for a struct that is anonymous in the header; it is checked in place, through
# kvm_vcpu_events.exception, so it is deliberately absent from abi.STRUCTS.
PYKVM_ONLY_NAMES = {"kvm_exception_state"}

# Encoding parameters of constants._ioc and the asm-generic/ioctl.h macros they mirror.
IOC_PARAMS = {
    "_IOC_NRBITS": constants._NRBITS,
    "_IOC_TYPEBITS": constants._TYPEBITS,
    "_IOC_SIZEBITS": constants._SIZEBITS,
    "_IOC_NONE": constants._NONE,
    "_IOC_WRITE": constants._WRITE,
    "_IOC_READ": constants._READ,
    "KVMIO": constants.KVMIO,
}


# --- what to check ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    category: str  # "struct", "ioctl" or "constant"
    label: str  # human-readable, used in the mismatch report
    c_expr: str  # C integer expression evaluated by the probe
    expected: int  # what pykvm (cffi / Python) says
    macro: str | None = None  # if set, the check is guarded by #ifdef macro
    required: bool = True  # for macros: is a missing macro a mismatch (else: not checked)


def _is_signed(ctype) -> bool | None:
    """Signedness of an integer cffi primitive, None for non-integers (char, float, pointers)."""
    if ctype.kind != "primitive" or ctype.cname in ("char", "_Bool", "float", "double"):
        return None
    return int(ffi.cast(ctype, -1)) < 0


def _field_checks(struct: str, ctype, prefix: str = "", base: int = 0) -> list[Check]:
    """offsetof/sizeof/signedness checks for every field of ``ctype``, recursively."""
    checks: list[Check] = []
    cstruct = f"struct {struct}"
    for name, field in ctype.fields:
        path = f"{prefix}{name}"
        ftype = field.type
        offset = base + field.offset
        member = f"((({cstruct} *)0)->{path})"
        checks.append(
            Check("struct", f"offsetof({cstruct}, {path})", f"offsetof({cstruct}, {path})", offset)
        )
        flexible = ftype.kind == "array" and ftype.length is None
        if not flexible:  # a flexible array member has no size: compare the offset only
            checks.append(
                Check("struct", f"sizeof({cstruct}.{path})", f"sizeof{member}", ffi.sizeof(ftype))
            )
        scalar = ftype.item if ftype.kind == "array" else ftype
        signed = _is_signed(scalar)
        if signed is not None:
            elem = f"{member}[0]" if ftype.kind == "array" else member
            checks.append(
                Check(
                    "struct",
                    f"is_signed({cstruct}.{path}{'[]' if ftype.kind == 'array' else ''})",
                    f"((__typeof__({elem}))-1 < 0)",
                    int(signed),
                )
            )
        # Recurse into nested structs and unions: named ones (kvm_sregs.cs), pykvm-named
        # anonymous ones (kvm_vcpu_events.exception) and inline ones (kvm_run.io, kvm_run.s).
        # Members of kvm_run's anonymous exit union are already flattened into kvm_run by cffi.
        if ftype.kind in ("struct", "union"):
            checks += _field_checks(struct, ftype, f"{path}.", offset)
    return checks


def _struct_checks() -> list[Check]:
    checks: list[Check] = []
    for struct in abi.STRUCTS:
        cstruct = f"struct {struct}"
        ctype = ffi.typeof(cstruct)
        checks.append(
            Check("struct", f"sizeof({cstruct})", f"sizeof({cstruct})", ffi.sizeof(ctype))
        )
        checks += _field_checks(struct, ctype)
    return checks


def _macro(category: str, macro: str, expected: int, *, required: bool = True) -> Check:
    return Check(category, macro, f"(long long)({macro})", int(expected), macro, required)


def _ioctl_checks() -> list[Check]:
    return [_macro("ioctl", req.name, req.value) for req in Ioctl]


def _module_kvm_constants() -> dict[str, int]:
    """Module-level integer constants of pykvm.kvm.constants named KVM_*."""
    return {
        name: value
        for name, value in vars(constants).items()
        if name.startswith("KVM_") and type(value) is int
    }


def _constant_checks() -> list[Check]:
    checks = [_macro("constant", f"KVM_EXIT_{r.name}", r.value) for r in ExitReason]
    checks += [_macro("constant", f"KVM_CAP_{c.name}", c.value) for c in Cap]
    checks += [_macro("constant", n, v) for n, v in IOC_PARAMS.items()]
    # Only the ones that exist as C macros are comparable (the brief of this list).
    checks += [_macro("constant", n, v, required=False) for n, v in _module_kvm_constants().items()]
    return checks


def _exit_checks() -> list[Check]:
    """Where pykvm.kvm.exits' struct formats read each kvm_run member, and how wide, vs the header."""
    checks = []
    for reason, layout in exits.LAYOUTS.items():
        codes = [c for c in re.findall(r"\d*[a-zA-Z]", layout.struct.format[1:]) if not c.endswith("x")]
        for (path, offset), code in zip(layout.offsets.items(), codes, strict=True):
            size = pystruct.calcsize("<" + code)
            checks.append(Check("exit", f"{reason.name}: offsetof(struct kvm_run, {path})",
                                f"offsetof(struct kvm_run, {path})", offset))
            checks.append(Check("exit", f"{reason.name}: sizeof(struct kvm_run.{path})",
                                f"sizeof(((struct kvm_run *)0)->{path})", size))
    checks.append(Check("exit", "MMIO_DATA", "offsetof(struct kvm_run, mmio.data)", exits.MMIO_DATA))
    return checks


ALL_CHECKS: list[Check] = _struct_checks() + _ioctl_checks() + _constant_checks() + _exit_checks()


# --- the C probe -----------------------------------------------------------------------------

PROLOGUE = """\
#include <stddef.h>
#include <stdio.h>
#include <linux/kvm.h>

int main(void)
{
"""


def _probe_source(checks: dict[int, Check]) -> tuple[str, dict[int, int]]:
    """C source printing ``<index> <value>`` (or ``<index> missing``) per check.

    Returns the source and a map from source line number to check index, so that compile errors
    can be attributed to the check on that line.
    """
    lines = PROLOGUE.splitlines()
    line_to_check: dict[int, int] = {}
    for i, check in checks.items():
        if check.macro:
            lines.append(f"#ifdef {check.macro}")
        lines.append(f'    printf("%d %lld\\n", {i}, (long long)({check.c_expr}));')
        line_to_check[len(lines)] = i
        if check.macro:
            lines += ["#else", f'    printf("%d missing\\n", {i});', "#endif"]
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines), line_to_check


def _gcc(src: Path, out: Path | None = None) -> subprocess.CompletedProcess:
    cmd = ["gcc", "-std=gnu11", "-w", str(src)]
    cmd += ["-o", str(out)] if out else ["-fsyntax-only"]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=60)


@dataclass
class ProbeResult:
    values: dict[int, int]  # check index -> value the C side computed
    missing_macros: set[int]  # check index of #ifdef-guarded checks whose macro is undefined
    not_in_header: dict[int, str]  # check index -> compiler error (e.g. no such member)


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> ProbeResult:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not on PATH: cannot compile the <linux/kvm.h> layout probe")
    tmp = tmp_path_factory.mktemp("abi_probe")

    # The header itself must compile, or there is nothing to compare against.
    smoke = tmp / "smoke.c"
    smoke.write_text("#include <linux/kvm.h>\nint main(void) { return 0; }\n")
    res = _gcc(smoke)
    if not HEADER.is_file() or res.returncode != 0:
        pytest.skip(
            f"{HEADER} is missing or does not compile (install the linux-libc-dev / kernel "
            f"headers package): {res.stderr.strip()[:500]}"
        )

    # Compile; checks whose line fails to compile (a cffi field the C struct does not have, a
    # struct the header does not define) are recorded and dropped, then compile again.
    pending = dict(enumerate(ALL_CHECKS))
    not_in_header: dict[int, str] = {}
    src, exe = tmp / "probe.c", tmp / "probe"
    error_line = re.compile(rf"^{re.escape(str(src))}:(\d+):(?:\d+:)? (?:fatal )?error: (.*)$")
    for _attempt in range(10):
        text, line_to_check = _probe_source(pending)
        src.write_text(text)
        res = _gcc(src, exe)
        if res.returncode == 0:
            break
        bad: dict[int, str] = {}
        for line in res.stderr.splitlines():
            m = error_line.match(line)
            if m and int(m.group(1)) in line_to_check:
                bad.setdefault(line_to_check[int(m.group(1))], m.group(2))
        if not bad:
            pytest.fail(
                f"the ABI probe does not compile, for no attributable reason:\n{res.stderr}"
            )
        not_in_header.update(bad)
        for i in bad:
            del pending[i]
    else:
        pytest.fail(f"the ABI probe still does not compile after 10 attempts:\n{res.stderr}")

    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=30, check=True)
    values: dict[int, int] = {}
    missing: set[int] = set()
    for line in run.stdout.splitlines():
        index, value = line.split()
        if value == "missing":
            missing.add(int(index))
        else:
            values[int(index)] = int(value)
    assert set(values) | missing == set(pending), "the probe did not report every check"
    return ProbeResult(values, missing, not_in_header)


def _mismatches(probe: ProbeResult, category: str) -> tuple[list[str], int]:
    """The mismatch report lines of a category, and how many checks were actually compared."""
    problems: list[str] = []
    compared = 0
    for i, check in enumerate(ALL_CHECKS):
        if check.category != category:
            continue
        if i in probe.not_in_header:
            problems.append(f"{check.label}: not in the C header ({probe.not_in_header[i]})")
        elif i in probe.missing_macros:
            if check.required:
                problems.append(f"{check.label}: no such macro in <linux/kvm.h>")
        else:
            compared += 1
            c_value = probe.values[i]
            if c_value != check.expected:
                problems.append(
                    f"{check.label}: pykvm {check.expected} (0x{check.expected:X}) "
                    f"!= C {c_value} (0x{c_value & (2**64 - 1):X})"
                )
    return problems, compared


def _assert_none(problems: list[str], compared: int, what: str) -> None:
    assert compared > 0, f"no {what} were compared"
    if problems:
        pytest.fail(
            f"{len(problems)} {what} differ from <linux/kvm.h> ({compared} compared):\n  "
            + "\n  ".join(problems),
            pytrace=False,
        )


# --- tests against the header ----------------------------------------------------------------


def test_struct_layouts_match_header(probe: ProbeResult) -> None:
    _assert_none(*_mismatches(probe, "struct"), "struct sizes / field offsets, sizes, signedness")


def test_exit_decoders_read_the_headers_fields(probe: ProbeResult) -> None:
    """Vcpu.run()'s typed exits: every member each struct format reads sits where <linux/kvm.h> says."""
    _assert_none(*_mismatches(probe, "exit"), "kvm_run members read by pykvm.kvm.exits")


def test_ioctl_numbers_match_header(probe: ProbeResult) -> None:
    _assert_none(*_mismatches(probe, "ioctl"), "ioctl request numbers")


def test_constants_match_header(probe: ProbeResult) -> None:
    _assert_none(*_mismatches(probe, "constant"), "KVM_EXIT_*/KVM_CAP_*/KVM_* constants")


# --- pure-Python tests (no compiler needed) --------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "number"),
    [
        (Ioctl.KVM_GET_API_VERSION, 0xAE00),  # _IO(KVMIO, 0x00)
        (Ioctl.KVM_RUN, 0xAE80),  # _IO(KVMIO, 0x80)
        (Ioctl.KVM_SET_USER_MEMORY_REGION, 0x4020AE46),  # _IOW(KVMIO, 0x46, 32-byte struct)
    ],
    ids=lambda v: v.name if isinstance(v, Ioctl) else hex(v),
)
def test_well_known_ioctl_numbers(request_: Ioctl, number: int) -> None:
    assert request_ == number, f"{request_.name} = {request_:#x}, expected {number:#x}"


def test_every_declared_struct_is_checked() -> None:
    """Each struct declared in the cdef is in abi.STRUCTS (or is checked inside another)."""
    declared = set(re.findall(r"^\s*struct\s+(\w+)\s*\{", abi.CDEF, re.MULTILINE))
    unchecked = declared - set(abi.STRUCTS) - PYKVM_ONLY_NAMES
    assert not unchecked, (
        f"structs declared in abi.CDEF but not in abi.STRUCTS: {sorted(unchecked)}"
    )
    assert not set(abi.STRUCTS) - declared, "abi.STRUCTS names a struct abi.CDEF does not declare"
    ev = dict(ffi.typeof("struct kvm_vcpu_events").fields)
    assert ev["exception"].type is ffi.typeof("struct kvm_exception_state")


def test_probe_covers_nested_members() -> None:
    """The recursive walk reaches into anonymous unions, inline structs and nested structs."""
    labels = {c.label for c in ALL_CHECKS}
    for expected in (
        "offsetof(struct kvm_run, io.port)",
        "offsetof(struct kvm_run, emulation_failure.insn_size)",
        "offsetof(struct kvm_run, system_event.data)",
        "offsetof(struct kvm_run, s.regs.sregs.cr0)",
        "offsetof(struct kvm_run, debug.arch.dr7)",
        "offsetof(struct kvm_vcpu_events, exception.error_code)",
        "offsetof(struct kvm_irq_level, irq)",
        "offsetof(struct kvm_msrs, entries)",
    ):
        assert expected in labels
    assert "sizeof(struct kvm_msrs.entries)" not in labels  # flexible array: offset only
