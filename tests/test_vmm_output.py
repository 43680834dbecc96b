"""`pykvm run --config-file` / `--restore` / `pykvm vmm` write the guest's output as `pykvm run` does:
through the writer thread, so an output error ends the run with 74, and SIGTERM gives 143
(README, "Exit status of pykvm run")."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from conftest import ROOT, needs_kvm

pytestmark = needs_kvm


def _config(tmp_path):
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({"boot-source": {"kernel_image_path": "guests/count.bin"},
                                  "machine-config": {"vcpu_count": 1, "mem_size_mib": 32}}))
    return str(config)


def test_config_file_run_to_a_full_disk_ends_with_74_and_one_sentence(tmp_path):
    with open("/dev/full", "wb") as full:
        r = subprocess.run([sys.executable, "-m", "pykvm", "run", "--config-file", _config(tmp_path),
                            "--timeout", "20"], stdout=full, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                           cwd=ROOT, timeout=60)
    err = r.stderr.decode()
    assert r.returncode == 74, err
    assert "cannot write the guest's output" in err and "Traceback" not in err


def test_sigterm_ends_a_config_file_run_with_143(tmp_path):
    out_path = tmp_path / "out"
    with open(out_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--config-file", _config(tmp_path),
                                 "--timeout", "30"], stdout=out, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while out_path.read_bytes().count(b"\n") < 3 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert status == 128 + signal.SIGTERM, err
    assert "ended by SIGTERM" in err and "Traceback" not in err
