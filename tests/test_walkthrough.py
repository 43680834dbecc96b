"""docs/walkthrough.md quotes real pykvm output; this test re-runs every quoted command and fails
if the document drifted from what the code prints.

A quoted block is written as::

    <!-- run: pykvm run hello-long64 --trace | head -n 6 -->
    ```text
    $ pykvm run hello-long64 --trace | head -n 6
    ...what pykvm printed on stderr...
    ```
    <!-- end -->

The command runs as ``python -m pykvm ...``; its stderr (pykvm's own output: trace, steps, how
the run ended) is the block, the guest's stdout is left out. After the command, ``| head -n N``,
``| tail -n N`` and ``| grep PATTERN`` (a regular expression, ``^step`` style) filter the lines.

To rewrite the blocks from the current code: ``python tests/test_walkthrough.py``.
Some output depends on the host: the KVM backend (on kvm_pvm a port write exits with RIP past the
instruction, and `rep` string instructions step in one go) and the CPU (registers left over from
``cpuid``). The document records both (``<!-- recorded on: ... -->``); on a different host the
comparison is skipped, with that reason.
"""

from __future__ import annotations

import difflib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "walkthrough.md"
RECORDED = re.compile(r"<!-- recorded on: (?P<host>.+?) -->")
BLOCK = re.compile(r"<!-- run: (?P<cmd>.+?) -->\n```text\n(?P<body>.*?)```\n<!-- end -->", re.S)


def host() -> str:
    """The KVM backend and the CPU model: what the quoted output depends on."""
    from pykvm.kvm.host import host_backend
    cpu = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            cpu.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return (f"{host_backend()}, {cpu.get('vendor_id', '?')} family {cpu.get('cpu family', '?')} "
            f"model {cpu.get('model', '?')}")


def parse(command: str) -> tuple[list[str], list[tuple[str, str]]]:
    """'pykvm run x --y | head -n 3' -> (['run', 'x', '--y'], [('head', '3')])."""
    stages = [s.strip() for s in command.split(" | ")]
    argv = shlex.split(stages[0])
    if argv[:1] != ["pykvm"]:
        raise ValueError(f"a quoted command must start with pykvm: {command!r}")
    filters = []
    for stage in stages[1:]:
        words = shlex.split(stage)
        if words[:2] in (["head", "-n"], ["tail", "-n"]) and len(words) == 3:
            filters.append((words[0], words[2]))
        elif words[:1] == ["grep"] and len(words) == 2:
            filters.append(("grep", words[1]))
        else:
            raise ValueError(f"unsupported filter {stage!r} (use head -n N, tail -n N, grep PATTERN)")
    return argv[1:], filters


def start(command: str) -> subprocess.Popen:
    args, _ = parse(command)
    return subprocess.Popen([sys.executable, "-m", "pykvm", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def output(command: str, proc: subprocess.Popen) -> str:
    _, filters = parse(command)
    _, err = proc.communicate(timeout=120)
    lines = err.decode().splitlines()
    for kind, arg in filters:
        if kind == "head":
            lines = lines[:int(arg)]
        elif kind == "tail":
            lines = lines[-int(arg):]
        else:
            lines = [line for line in lines if re.search(arg, line)]
    return "".join(f"{line}\n" for line in [f"$ {command}", *lines])


def regenerate(text: str) -> str:
    """The document with every block's body replaced by fresh output (commands run in parallel)."""
    blocks = list(BLOCK.finditer(text))
    procs = [start(m["cmd"]) for m in blocks]
    bodies = [output(m["cmd"], p) for m, p in zip(blocks, procs, strict=True)]
    out, last = [], 0
    for m, body in zip(blocks, bodies, strict=True):
        out.append(text[last:m.start("body")])
        out.append(body)
        last = m.end("body")
    out.append(text[last:])
    return RECORDED.sub(f"<!-- recorded on: {host()} -->", "".join(out))


def test_every_block_has_a_command_that_parses():
    blocks = list(BLOCK.finditer(DOC.read_text()))
    assert len(blocks) >= 5
    for m in blocks:
        parse(m["cmd"])
        assert m["body"].startswith(f"$ {m['cmd']}\n")


def test_quoted_output_matches_the_code():
    from conftest import KVM_PROBLEM
    if KVM_PROBLEM:
        pytest.skip(KVM_PROBLEM)
    text = DOC.read_text()
    recorded = RECORDED.search(text)
    assert recorded, "docs/walkthrough.md must say where its output was recorded"
    if recorded["host"] != host():
        pytest.skip(f"the walkthrough's output was recorded on {recorded['host']}; this host is {host()}")
    fresh = regenerate(text)
    if fresh != text:
        diff = "".join(difflib.unified_diff(text.splitlines(True), fresh.splitlines(True), "docs/walkthrough.md",
                                            "what pykvm prints now"))
        pytest.fail(f"docs/walkthrough.md drifted from the code; update it with "
                    f"`python tests/test_walkthrough.py` and read the diff:\n{diff}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))      # run as a script from a checkout: import this pykvm
    DOC.write_text(regenerate(DOC.read_text()))
    print(f"rewrote the quoted output in {DOC.relative_to(ROOT)}")
