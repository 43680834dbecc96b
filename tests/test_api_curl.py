"""The README's `curl --unix-socket` session, run as written with the real curl: configure, start, pause,
snapshot, kill the VMM, restore in a new VMM process, resume; the guest's count continues without gap or repeat."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from api_helpers import ROOT, assert_continuous, counting
from conftest import needs_kvm


def readme_session() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- api-session -->\n```sh\n(.*?)```\n<!-- /api-session -->", text, re.S)
    assert match, "the README lost its API session block"
    return match.group(1)


@needs_kvm
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_readme_curl_session_continues_the_guest_in_a_new_process(tmp_path):
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
    # `pykvm` must be this checkout's: run the module through a wrapper first on PATH.
    wrapper = tmp_path / "bin" / "pykvm"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={ROOT} exec {sys.executable} -m pykvm "$@"\n')
    wrapper.chmod(0o755)
    env["PATH"] = f"{wrapper.parent}:{env['PATH']}"
    r = subprocess.run(["bash", "-c", readme_session()], cwd=ROOT, env=env, capture_output=True, timeout=120)
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr.decode()
    assert "fault_message" not in out, out
    assert '"state":"Paused"' in out
    numbers = counting(out[out.index("}", out.index('"state":"Paused"')) + 1:])
    assert len(numbers) > 10, out
    assert_continuous(numbers)
