"""The exit-latency benchmark runs end to end in a tiny configuration and reports what it promises.

Only the shape of the result is checked (every kind, positive times, ratios = pykvm / C and pykvm /
QEMU): timings
depend on the host, so no threshold is asserted here. The real numbers come from running
``python -m benchmarks.exit_latency`` with its defaults.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KINDS = {"pio_out", "pio_in", "mmio_write", "mmio_read", "cpuid", "hlt"}
ROW = {"pykvm_us", "c_us", "qemu_us", "pykvm_range", "c_range", "qemu_range", "ratio_c", "ratio_qemu"}
HAVE_QEMU = shutil.which("qemu-system-x86_64") is not None


def _kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _kvm_usable(), reason="/dev/kvm is missing or not accessible: no VM can run")
@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is missing: the C baseline cannot be built")
def test_exit_floor_splits_each_kind_into_floor_and_handling():
    """benchmarks.exit_floor: pykvm, the bare Vcpu.run loop and C for every port-I/O and MMIO kind; the
    handling is pykvm less the floor, the ratios are over C."""
    proc = subprocess.run([sys.executable, "-m", "benchmarks.exit_floor", "--count", "200", "--repeat", "1", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result) == {"pio_out", "pio_in", "mmio_write", "mmio_read"}
    for row in result.values():
        assert row["pykvm_us"] > 0 and row["floor_us"] > 0 and row["c_us"] > 0, row
        assert row["handling_us"] == pytest.approx(row["pykvm_us"] - row["floor_us"], abs=0.002)
        assert row["floor_over_c"] == pytest.approx(row["floor_us"] / row["c_us"], abs=0.002)


@pytest.mark.skipif(not _kvm_usable(), reason="/dev/kvm is missing or not accessible: no VM can run")
@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is missing: the C baseline cannot be built")
def test_exit_latency_tiny_run_reports_every_kind():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.exit_latency", "--count", "200", "--repeat", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "host backend:" in proc.stderr and "1.15" in proc.stderr and "1.05" in proc.stderr
    result = json.loads(proc.stdout)          # exactly one JSON object on stdout
    assert set(result) == KINDS
    sides = ("pykvm", "c", "qemu") if HAVE_QEMU else ("pykvm", "c")
    for kind, row in result.items():
        assert set(row) == ROW, kind
        for side in sides:
            low, high = row[f"{side}_range"]
            assert 0 <= low <= row[f"{side}_us"] <= high, (kind, side, row)
        # with 200 exits, a QEMU start-up that varies by more than 200 exits' time can leave 0
        assert row["pykvm_us"] > 0 and row["c_us"] > 0 and row["ratio_c"] > 0, (kind, row)
        assert row["ratio_c"] == pytest.approx(row["pykvm_us"] / row["c_us"], abs=6e-4), (kind, row)
        if HAVE_QEMU and row["qemu_us"] > 0:
            assert row["ratio_qemu"] == pytest.approx(row["pykvm_us"] / row["qemu_us"], abs=6e-4), (kind, row)
        if not HAVE_QEMU:
            assert row["qemu_us"] is None and row["ratio_qemu"] is None


def test_missing_gcc_is_reported_with_status_2(monkeypatch, capsys):
    if str(ROOT) not in sys.path:
        monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import exit_latency

    monkeypatch.setattr(exit_latency.shutil, "which", lambda name: None)
    assert exit_latency.main(["--count", "1", "--repeat", "1", "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "gcc is not installed" in captured.err


@pytest.mark.skipif(not _kvm_usable(), reason="/dev/kvm is missing or not accessible: no VM can run")
@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="QEMU (Debian: qemu-system-x86) is missing")
def test_boot_tiny_reports_both_vmms_and_their_ratio():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.boot_tiny", "--repeat", "1", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["pykvm_s"] > 0 and result["qemu_s"] > 0
    assert result["ratio"] == pytest.approx(result["pykvm_s"] / result["qemu_s"])


@pytest.mark.skipif(not _kvm_usable(), reason="/dev/kvm is missing or not accessible: no VM can run")
def test_blk_throughput_reports_both_vmms_and_their_ratio():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.blk_throughput", "--mib", "4", "--repeat", "1",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["pykvm_mib_s"] > 0 and result["pykvm-no-fastpath_mib_s"] > 0
    if shutil.which("qemu-system-x86_64") is not None:
        assert result["qemu_mib_s"] > 0
        assert result["ratio"] == pytest.approx(result["pykvm_mib_s"] / result["qemu_mib_s"], rel=0.01)


@pytest.mark.skipif(not _kvm_usable(), reason="/dev/kvm is missing or not accessible: no VM can run")
def test_pykvm_bench_runs_from_the_package_outside_the_checkout(tmp_path):
    """`pykvm bench` needs nothing from the source tree: the guest and the C source are package data;
    without gcc it measures pykvm alone (ratios then null)."""
    env = dict(os.environ, PATH="/nonexistent") if shutil.which("gcc") is None else None
    proc = subprocess.run([sys.executable, "-m", "pykvm", "bench", "--count", "2000", "--repeat", "1", "--json",
                           "--no-qemu"], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    # One short repeat: a per-exit figure is (t(N) - t(0)) / N, and for the in-kernel kinds (a few ms in all)
    # the host's noise can make it 0 (never negative); the exits that reach pykvm cost far more than that.
    assert set(result) == KINDS and all(row["pykvm_us"] >= 0 for row in result.values())
    assert all(result[kind]["pykvm_us"] > 0 for kind in ("pio_out", "pio_in", "mmio_write", "mmio_read"))
    assert all(row["qemu_us"] is None and row["ratio_qemu"] is None for row in result.values())   # --no-qemu
    if shutil.which("gcc") is not None:
        assert all(row["ratio_c"] == (pytest.approx(row["pykvm_us"] / row["c_us"], abs=6e-4) if row["c_us"]
                                      else None) for row in result.values())
    else:
        assert all(row["c_us"] is None and row["ratio_c"] is None for row in result.values())


def test_plot_draws_each_kinds_distribution_to_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the [plot] extra) is not installed")
    from pykvm.bench import plot_latencies
    distributions = {kind: {"pykvm": [2.0 + i * 0.1 for i in range(5)], "c": [1.0, 1.1, 1.2], "qemu": [1.5, 1.7]}
                     for kind in KINDS}
    out = tmp_path / "latency.png"
    plot_latencies(distributions, str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 400 and height > 200


def test_plot_without_matplotlib_is_status_2_before_any_run(monkeypatch, capsys, tmp_path):
    import argparse

    from pykvm import bench
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib -> ImportError
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("measured without a way to plot"))
    args = argparse.Namespace(count=1, repeat=1, json=False, plot=str(tmp_path / "x.png"))
    assert bench.run(args) == 2
    assert "pykvm[plot]" in capsys.readouterr().err


@pytest.mark.skipif(not _kvm_usable(), reason="/dev/kvm is missing or not accessible: no VM can run")
def test_pykvm_bench_plot_writes_the_png_and_still_prints_the_table(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib (the [plot] extra) is not installed")
    out = tmp_path / "-latency.png"                          # a dash-led name is still the value
    proc = subprocess.run([sys.executable, "-m", "pykvm", "bench", "--count", "100", "--repeat", "2",
                           "--plot", str(out.name)], cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"drawn to {out.name}" in proc.stderr
    assert all(kind in proc.stdout for kind in KINDS)


def test_qemu_kernel_is_the_same_image_behind_a_pvh_entry_note():
    """QEMU boots exactly the bytes pykvm and the C loop run: a PVH ELF whose entry note and single
    PT_LOAD segment put the patched image at 0x8000 (read back with pykvm's own PVH and ELF code)."""
    from pykvm.bench import END_DEBUG_EXIT, LOAD_ADDR, patch, pvh_elf
    from pykvm.boot.bundled import find
    from pykvm.boot.pvh import pvh_entry

    image = patch(find("exitloop").path.read_bytes(), 3, 777, END_DEBUG_EXIT)
    elf = pvh_elf(image)
    assert pvh_entry(elf, "exitloop.elf") == LOAD_ADDR
    phoff, = struct.unpack_from("<I", elf, 28)
    p_type, p_offset, _, p_paddr, p_filesz, p_memsz = struct.unpack_from("<6I", elf, phoff)
    assert (p_type, p_paddr, p_filesz, p_memsz) == (1, LOAD_ADDR, len(image), len(image))
    assert elf[p_offset:p_offset + p_filesz] == image
    assert struct.unpack_from("<III", image, 8) == (777, 3, END_DEBUG_EXIT)


@pytest.mark.skipif(not _kvm_usable(), reason="/dev/kvm is missing or not accessible: no VM can run")
@pytest.mark.parametrize("kind, name", [(0, "pio_out"), (3, "mmio_read"), (4, "cpuid"), (5, "hlt")])
def test_pykvm_runs_each_kind_to_the_debug_exit_end(kind, name, monkeypatch):
    """The benchmark's pykvm side: the guest takes exactly ``count`` exits of its kind (none reach
    user space for cpuid and hlt) and ends through the debug-exit port; a miscount is an error."""
    from pykvm import bench
    from pykvm.boot.bundled import find

    reason = {n: r for n, _, r in bench.KINDS}[name]
    image = find("exitloop").path.read_bytes()
    assert bench.run_pykvm(image, kind, reason, 300, timeout=30) > 0
    if reason is not None:     # the guest does 299 where 300 are expected
        real_patch = bench.patch
        monkeypatch.setattr(bench, "patch", lambda img, k, n, end=0: real_patch(img, k, n - 1, end))
        with pytest.raises(bench.BenchError, match="expected 300 exits"):
            bench.run_pykvm(image, kind, reason, 300, timeout=30)


@pytest.mark.skipif(not _kvm_usable(), reason="/dev/kvm is missing or not accessible: no VM can run")
def test_startup_times_pykvm_run_against_python_itself():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.startup", "--repeat", "1", "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["repeat"] == 1 and "0.15 s" in proc.stderr
    for name in ("python", "pykvm", "pykvm-nopyc"):
        row = result[name]
        assert 0 < row["min_s"] <= row["median_s"] <= row["max_s"], (name, row)
        assert row["ratio"] == pytest.approx(row["median_s"] / result["python"]["median_s"], abs=0.006)
    assert result["pykvm"]["median_s"] > result["python"]["median_s"]     # it did boot a guest


def test_startup_reports_a_failing_run(monkeypatch):
    """A pykvm run that fails is reported with its status and stderr, never timed as a success."""
    if str(ROOT) not in sys.path:
        monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import startup

    with pytest.raises(SystemExit, match="failed with status 3: boom"):
        startup.time_once([sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"], {})
