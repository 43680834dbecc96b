"""`pykvm attach` from a pipe: everything is sent, then attach detaches at the pipe's end (status 0)
and the VM runs on; `start -a` still shows the output until the VM ends."""

from __future__ import annotations

import pytest
from conftest import needs_kvm
from engine_helpers import Daemon, attach_session, echo_guest, state_of, wait_for

pytestmark = needs_kvm


@pytest.fixture
def daemon():
    d = Daemon("--no-jail")
    d.start()
    try:
        yield d
    finally:
        d.close()


def test_attach_ends_at_the_end_of_its_input_and_the_vm_runs_on(daemon, tmp_path):
    assert daemon.pykvm("run", "-d", "--name", "echo", str(echo_guest(tmp_path))).returncode == 0
    r = daemon.pykvm("attach", "echo", input=b"hi there", timeout=60)   # `echo hi there | pykvm attach echo`
    assert r.returncode == 0, r.stderr
    assert b"Traceback" not in r.stderr
    # all of it reached the guest, which echoed it into its console log
    wait_for(lambda: b"hi there" in daemon.pykvm("logs", "echo").stdout, what="the guest's echo")
    assert state_of(daemon, "echo")["Running"]
    # a second session, kept open until the echo comes back, then closed: same end
    out, err, status = attach_session(daemon, "echo", b"again", b"again")
    assert b"again" in out and status == 0, err
    assert state_of(daemon, "echo")["Running"]
    # input that ends the guest: attach ends either way, still status 0
    r = daemon.pykvm("attach", "echo", input=b"q", timeout=60)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: state_of(daemon, "echo")["Status"] == "exited", what="the guest's end")
    assert state_of(daemon, "echo")["ExitCode"] == 7


def test_start_attach_still_waits_for_the_vm(daemon, tmp_path):
    assert daemon.pykvm("create", "--name", "sa", str(echo_guest(tmp_path))).returncode == 0
    r = daemon.pykvm("start", "-a", "sa", input=b"bye" + b"q", timeout=60)
    assert r.returncode in (0, 7), r.stderr      # 7 once the daemon has recorded the guest's end
    assert b"bye" in r.stdout                    # shown: start -a kept reading output after its input ended
    wait_for(lambda: state_of(daemon, "sa")["Status"] == "exited", what="the guest's end")
