"""The daemon's records: one SQLite database in WAL mode (issue 12, part 1).

Each VM is one row: its spec (what ``POST /vms/create`` was given), its state (Docker's words:
created, running, paused, exited, dead), exit status, timestamps, and the processes that run it
(the shim's pid, its start time in clock ticks so a recycled pid is never mistaken for it, the
VMM's pid and API socket). Events are rows too, so ``GET /events?since=`` can replay them.
Every change is one transaction with ``synchronous=FULL``: a daemon killed at any instant loses
no record it has answered for.
"""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    exit_code INTEGER,
    error TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    shim_pid INTEGER,
    shim_start INTEGER,
    vmm_pid INTEGER,
    api_sock TEXT,
    owner_uid INTEGER NOT NULL,
    owner_gid INTEGER NOT NULL,
    owner_groups TEXT NOT NULL DEFAULT '[]',
    restart_count INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    action TEXT NOT NULL,
    id TEXT NOT NULL,
    attributes TEXT NOT NULL
);
"""

# Docker's container name rule: a letter or digit, then letters, digits, '_', '.', '-'.
NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}")
ID_RE = re.compile(r"[0-9a-f]{64}")
ADJECTIVES = ("brave", "calm", "eager", "fond", "keen", "quiet", "swift", "tidy", "vivid", "witty")
NOUNS = ("babbage", "hopper", "knuth", "lovelace", "popek", "goldberg", "ritchie", "thompson", "turing", "wirth")


class NotFound(LookupError):
    """No VM has this id, id prefix or name (HTTP 404)."""


class Conflict(Exception):
    """The request clashes with the state (HTTP 409): a used name, an ambiguous prefix, a running VM."""


class BadRequest(ValueError):
    """A malformed request (HTTP 400)."""


@dataclass
class Vm:
    """One row of ``vms``; ``spec`` is the create request's body as plain data."""

    id: str
    name: str
    spec: dict
    state: str
    created: float
    owner_uid: int
    owner_gid: int
    owner_groups: list = field(default_factory=list)
    exit_code: int | None = None
    error: str = ""
    started_at: float | None = None
    finished_at: float | None = None
    shim_pid: int | None = None
    shim_start: int | None = None
    vmm_pid: int | None = None
    api_sock: str | None = None
    restart_count: int = 0

    @property
    def mem_bytes(self) -> int:
        return int(self.spec.get("MemoryMiB", 64)) << 20


def new_id() -> str:
    """A 64-hex-digit id, as Docker's: 256 random bits."""
    return secrets.token_hex(32)


def check_name(name: str, what: str = "VM") -> str:
    """A VM (or snapshot: ``what``) name as Docker allows a container's (so never a path: no '/', never '..'
    alone); BadRequest naming ``what`` otherwise."""
    name = name[1:] if name.startswith("/") else name   # Docker accepts and shows a leading '/'
    if not NAME_RE.fullmatch(name):
        raise BadRequest(f"invalid {what} name {name!r}: only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed, at most 128")
    return name


class Store:
    """The database at ``path``; one connection, used from the daemon's event-loop thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA busy_timeout=5000")
        self.db.executescript(SCHEMA)
        self.version = 0        # counts changes to ``vms``, so a reader may cache what it derived from them

    def close(self) -> None:
        self.db.close()

    # -- VMs ------------------------------------------------------------------------------------
    def insert(self, vm: Vm) -> None:
        """Add a VM; Conflict if the name is taken."""
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                self.db.execute(
                    "INSERT INTO vms (id, name, spec, state, created, owner_uid, owner_gid, owner_groups) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (vm.id, vm.name, json.dumps(vm.spec), vm.state, vm.created, vm.owner_uid, vm.owner_gid,
                     json.dumps(vm.owner_groups)))
            self.version += 1
        except sqlite3.IntegrityError:
            raise Conflict(f'the name "{vm.name}" is already in use by another VM; remove it or choose '
                           "another name") from None

    def update(self, vm_id: str, **fields) -> None:
        """Set columns of one VM (``spec`` and ``owner_groups`` as plain data)."""
        for key in ("spec", "owner_groups"):
            if key in fields:
                fields[key] = json.dumps(fields[key])
        cols = ", ".join(f"{k} = ?" for k in fields)
        with self.db:
            self.db.execute(f"UPDATE vms SET {cols} WHERE id = ?", (*fields.values(), vm_id))
        self.version += 1

    def delete(self, vm_id: str) -> None:
        with self.db:
            self.db.execute("DELETE FROM vms WHERE id = ?", (vm_id,))
        self.version += 1

    def all(self) -> list[Vm]:
        """Every VM, newest first (as ``docker ps``)."""
        return [_vm(r) for r in self.db.execute("SELECT * FROM vms ORDER BY created DESC")]

    def get(self, vm_id: str) -> Vm:
        row = self.db.execute("SELECT * FROM vms WHERE id = ?", (vm_id,)).fetchone()
        if row is None:
            raise NotFound(f"no such VM: {vm_id}")
        return _vm(row)

    def lookup(self, ref: str) -> Vm:
        """A VM by full id, exact name, or unique id prefix (Docker's order); NotFound / Conflict."""
        if not ref or len(ref) > 128:
            raise NotFound(f"no such VM: {ref[:128]}")
        row = self.db.execute("SELECT * FROM vms WHERE id = ?", (ref,)).fetchone()
        if row is None:
            row = self.db.execute("SELECT * FROM vms WHERE name = ?", (ref.lstrip("/"),)).fetchone()
        if row is None and re.fullmatch(r"[0-9a-f]{1,64}", ref):
            rows = self.db.execute("SELECT * FROM vms WHERE substr(id, 1, ?) = ? LIMIT 2", (len(ref), ref)).fetchall()
            if len(rows) > 1:
                raise Conflict(f"the id prefix {ref} matches more than one VM: give more digits")
            row = rows[0] if rows else None
        if row is None:
            raise NotFound(f"no such VM: {ref}")
        return _vm(row)

    def free_name(self) -> str:
        """A generated name not in use (Docker's adjective_surname style)."""
        while True:
            name = f"{secrets.choice(ADJECTIVES)}_{secrets.choice(NOUNS)}_{secrets.randbelow(1000)}"
            if self.db.execute("SELECT 1 FROM vms WHERE name = ?", (name,)).fetchone() is None:
                return name

    # -- events ---------------------------------------------------------------------------------
    def add_event(self, action: str, vm_id: str, attributes: dict) -> dict:
        """Record one event and return it in the Engine API's shape."""
        now = time.time()
        with self.db:
            cur = self.db.execute("INSERT INTO events (time, action, id, attributes) VALUES (?, ?, ?, ?)",
                                  (now, action, vm_id, json.dumps(attributes)))
        return _event(cur.lastrowid, now, action, vm_id, attributes)

    def events(self, since: float | None = None, until: float | None = None) -> list[dict]:
        query, args = "SELECT * FROM events WHERE 1", []
        if since is not None:
            query += " AND time >= ?"
            args.append(since)
        if until is not None:
            query += " AND time <= ?"
            args.append(until)
        rows = self.db.execute(query + " ORDER BY seq", args)
        return [_event(r["seq"], r["time"], r["action"], r["id"], json.loads(r["attributes"])) for r in rows]


def _event(seq: int, when: float, action: str, vm_id: str, attributes: dict) -> dict:
    return {"Type": "vm", "Action": action, "Actor": {"ID": vm_id, "Attributes": attributes},
            "id": vm_id, "status": action, "scope": "local", "time": int(when), "timeNano": int(when * 1e9),
            "seq": seq}


def _vm(row: sqlite3.Row) -> Vm:
    data = dict(row)
    data["spec"] = json.loads(data["spec"])
    data["owner_groups"] = json.loads(data["owner_groups"])
    return Vm(**data)
