"""The engine's parts without a daemon: the store's id/name rules, rotated console logs, filters."""

from __future__ import annotations

import pytest
from conftest import run_pykvm

from pykvm.engine import logs
from pykvm.engine.backend import parse_filters
from pykvm.engine.store import BadRequest, Conflict, NotFound, Store, Vm, check_name, new_id


def _vm(store: Store, name: str, vm_id: str | None = None) -> Vm:
    vm = Vm(id=vm_id or new_id(), name=name, spec={"Image": "hello-long64"}, state="created", created=0.0,
            owner_uid=0, owner_gid=0)
    store.insert(vm)
    return vm


def test_lookup_by_id_name_and_unique_prefix(tmp_path):
    store = Store(tmp_path / "db")
    a = _vm(store, "alpha", "ab" + "0" * 62)
    b = _vm(store, "beta", "ac" + "1" * 62)
    assert store.lookup(a.id).name == "alpha"
    assert store.lookup("beta").id == b.id and store.lookup("/beta").id == b.id
    assert store.lookup("ab").id == a.id
    with pytest.raises(Conflict, match="more than one"):
        store.lookup("a")
    with pytest.raises(NotFound):
        store.lookup("ff")
    with pytest.raises(Conflict, match="already in use"):
        _vm(store, "alpha")
    store.close()
    again = Store(tmp_path / "db")
    assert sorted(v.name for v in again.all()) == ["alpha", "beta"]
    again.close()


def test_names_cannot_be_paths():
    assert check_name("web-1.a_b") == "web-1.a_b"
    for bad in ("../x", "a/b", "..", ".x", "", "x" * 200, "a\0b", "é"):
        with pytest.raises(BadRequest):
            check_name(bad)


def test_logs_rotate_within_their_cap_and_keep_the_newest(tmp_path):
    path = tmp_path / "console.log"
    writer = logs.LogWriter(path, max_size=4096, max_files=3)
    for n in range(2000):
        writer.write(f"line {n}\n".encode(), when=1000.0 + n)
    writer.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["console.log", "console.log.1", "console.log.2"]
    assert all(f.stat().st_size <= 4096 for f in files)
    lines = logs.to_lines(logs.read_records(path))
    assert lines[-1][1] == "line 1999\n"
    numbers = [int(text.split()[1]) for _, text in lines]
    assert numbers == list(range(numbers[0], 2000))        # contiguous: nothing lost between files
    tail = logs.render(lines[-2:], timestamps=True).splitlines()
    assert tail == ["1970-01-01T00:49:58.000000Z line 1998", "1970-01-01T00:49:59.000000Z line 1999"]


def test_lines_split_across_chunks_keep_the_time_they_began(tmp_path):
    records = [(1.0, "hel"), (2.0, "lo\nwor"), (3.0, "ld\n"), (4.0, "partial")]
    assert logs.to_lines(records) == [(1.0, "hello\n"), (2.0, "world\n"), (4.0, "partial")]
    assert logs.parse(b'{"t": 1, "d": "a"}\n{"t": 2, "d"') == [(1.0, "a")]     # a torn last record


def test_filters():
    assert parse_filters('{"status": ["running"]}', {"status"}) == {"status": ["running"]}
    assert parse_filters('{"status": {"exited": true}}', {"status"}) == {"status": ["exited"]}
    for bad in ("{", "[]", '{"nope": ["x"]}', '{"status": "running"}'):
        with pytest.raises(BadRequest):
            parse_filters(bad, {"status"})


def test_create_takes_the_vcpus_and_memory_run_takes():
    """POST /vms/create's limits are `pykvm run -c/-m`'s, so a VM the VMM would refuse is never created."""
    from pydantic import ValidationError

    from pykvm.engine.routes import MAX_CPUS, CreateRequest
    from pykvm.machine import MAX_CPUS as MACHINE_MAX_CPUS
    from pykvm.memory import MAX_RAM, MiB
    assert MAX_CPUS == MACHINE_MAX_CPUS
    CreateRequest(Image="spin", Vcpus=MAX_CPUS, MemoryMiB=MAX_RAM // MiB)
    for bad in ({"Vcpus": MAX_CPUS + 1}, {"MemoryMiB": MAX_RAM // MiB + 1}, {"Vcpus": 0}, {"MemoryMiB": 0}):
        with pytest.raises(ValidationError):
            CreateRequest(Image="spin", **bad)


@pytest.mark.parametrize("verb", [["create"], ["run", "-d"]])
def test_client_refuses_memory_the_daemon_would_round(tmp_path, verb):
    """The daemon takes MemoryMiB: `-m 1536K` is refused (status 2) before asking it, not sent as 1 MiB."""
    env = {"PYKVM_HOST": f"unix://{tmp_path}/no-daemon.sock"}
    r = run_pykvm(*verb, "-m", "1536K", "spin", env=env)
    err = " ".join(r.stderr.decode().split())
    assert r.returncode == 2 and "whole MiB" in err and "1,572,864 bytes" in err, err
    r = run_pykvm(*verb, "-m", "2M", "spin", env=env)           # whole MiB: on to the (absent) daemon
    assert r.returncode == 2 and "cannot reach the pykvm daemon" in r.stderr.decode(), r.stderr


@pytest.mark.parametrize("seconds, words", [
    (-5, "Less than a second"), (0, "Less than a second"), (0.9, "Less than a second"), (1, "1 second"),
    (1.5, "1 second"), (2, "2 seconds"), (59.9, "59 seconds"), (60, "About a minute"), (119, "About a minute"),
    (120, "2 minutes"), (3599, "59 minutes"), (3600, "About an hour"), (5399, "About an hour"),
    (5400, "2 hours"), (7199, "2 hours"), (47 * 3600, "47 hours"), (48 * 3600, "2 days"), (13 * 86400, "13 days"),
    (14 * 86400, "2 weeks"), (59 * 86400, "8 weeks"), (60 * 86400, "2 months"), (729 * 86400, "24 months"),
    (730 * 86400, "2 years"),
])
def test_durations_read_as_docker_ps_words_them(seconds, words):
    """`pykvm ps`'s CREATED and STATUS columns word a duration as `docker ps` does (go-units' HumanDuration)."""
    assert logs.human_duration(seconds) == words


@pytest.mark.parametrize("ref", ["", "/"])
def test_a_reference_that_names_no_vm_is_refused_before_asking_the_daemon(tmp_path, ref):
    """`pykvm inspect ''` was "Error: Not Found" (the daemon's router, for /vms//json): now one sentence, status 2."""
    r = run_pykvm("inspect", "-H", str(tmp_path / "none.sock"), ref)
    assert r.returncode == 2 and b"names no VM" in r.stderr and b"cannot reach" not in r.stderr, r.stderr
