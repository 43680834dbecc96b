"""cgroups v1 and v2 (issue 13, part 2) without touching the host: hierarchies detected from a
mounts file, and the limits written in the layout each version defines, on fake cgroup trees in
a temporary directory. The real v1 hierarchy of this host is exercised by tests/test_jail.py."""

from __future__ import annotations

import pytest

from pykvm.jail import JailError, cgroups


def fake_tree(tmp_path, v2_controllers="cpuset cpu io memory hugetlb pids", v1=("memory", "cpu", "pids")):
    """A mounts file and directories like a host's /sys/fs/cgroup."""
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text(v2_controllers + "\n")
    (unified / "cgroup.subtree_control").write_text("")
    lines = [f"cgroup2 {unified} cgroup2 rw,nosuid,nodev,noexec,relatime 0 0"]
    for c in v1:
        (tmp_path / c).mkdir()
        lines.append(f"cgroup {tmp_path / c} cgroup rw,nosuid,nodev,noexec,relatime,{c} 0 0")
    mounts = tmp_path / "mounts"
    mounts.write_text("\n".join(lines) + "\n")
    return mounts


def test_v2_is_chosen_when_it_offers_the_controllers(tmp_path):
    h = cgroups.detect(str(fake_tree(tmp_path)))
    assert h.version == 2 and h.mounts["memory"] == str(tmp_path / "unified")


def test_v1_is_chosen_when_v2_is_empty_as_on_this_machine(tmp_path):
    h = cgroups.detect(str(fake_tree(tmp_path, v2_controllers="hugetlb")))
    assert h.version == 1 and h.mounts == {c: str(tmp_path / c) for c in ("memory", "cpu", "pids")}


def test_no_usable_hierarchy_is_a_clear_error(tmp_path):
    with pytest.raises(JailError, match="cgroup v1 lacks: pids"):
        cgroups.detect(str(fake_tree(tmp_path, v2_controllers="", v1=("memory", "cpu"))))
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(JailError, match="requested cgroup v2"):
        cgroups.detect(str(fake_tree(other, v2_controllers="hugetlb")), version=2)


def test_v2_limits_and_oom_count(tmp_path):
    h = cgroups.detect(str(fake_tree(tmp_path)))
    cg = cgroups.Cgroup.create(h, "vm1", memory=96 << 20, cpus=0.5, pids=32)
    d = tmp_path / "unified" / "pykvm" / "vm1"
    assert (d / "memory.max").read_text() == str(96 << 20)
    assert (d / "cpu.max").read_text() == "50000 100000"
    assert (d / "pids.max").read_text() == "32"
    for parent in (tmp_path / "unified", tmp_path / "unified" / "pykvm"):
        assert (parent / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n")
    assert cg.oom_killed() == 1
    for name in ("memory.max", "cpu.max", "pids.max", "memory.events"):
        (d / name).unlink()     # a real cgroup directory has no removable files
    (tmp_path / "unified" / "pykvm" / "cgroup.subtree_control").unlink()
    cg.remove()
    assert not (tmp_path / "unified" / "pykvm").exists()


def test_v1_limits_under_the_callers_cgroup_and_oom_count(tmp_path, monkeypatch):
    monkeypatch.setattr(cgroups, "_own_path", lambda controller: "/delegated")
    h = cgroups.detect(str(fake_tree(tmp_path, v2_controllers="")))
    for c in ("memory", "cpu", "pids"):
        (tmp_path / c / "delegated").mkdir()
    cg = cgroups.Cgroup.create(h, "vm1", memory=96 << 20, cpus=1.5, pids=20)
    mem, cpu, pids = (tmp_path / c / "delegated" / "pykvm" / "vm1" for c in ("memory", "cpu", "pids"))
    assert (mem / "memory.limit_in_bytes").read_text() == str(96 << 20)
    assert (cpu / "cpu.cfs_quota_us").read_text() == "150000"
    assert (cpu / "cpu.cfs_period_us").read_text() == "100000"
    assert (pids / "pids.max").read_text() == "20"
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cg.oom_killed() == 2


def test_an_existing_cgroup_is_refused_and_kept(tmp_path):
    h = cgroups.detect(str(fake_tree(tmp_path)))
    (tmp_path / "unified" / "pykvm" / "vm1").mkdir(parents=True)
    with pytest.raises(JailError, match="already exists"):
        cgroups.Cgroup.create(h, "vm1", memory=None, cpus=None, pids=None)
    assert (tmp_path / "unified" / "pykvm" / "vm1").is_dir()
