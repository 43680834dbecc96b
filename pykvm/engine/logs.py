"""Console logs: size-capped, rotated files of timestamped records (issue 12, part 1).

Like Docker's json-file driver with ``max-size`` and ``max-file``: the shim appends one JSON line per
chunk the guest printed, ``{"t": unix_seconds, "d": "text"}``; when ``console.log`` would pass
``max_size`` bytes it becomes ``console.log.1`` (the previous ``.1`` becomes ``.2`` ...) and at most
``max_files`` files are kept, so a chatty guest never fills the disk. The reader turns records back
into lines for ``GET /vms/{id}/logs`` (``tail``, ``timestamps``) and follows the newest file.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

MAX_SIZE = 1 << 20     # bytes per file
MAX_FILES = 3          # console.log + console.log.1 + console.log.2


class LogWriter:
    """Appends records to ``path`` and rotates it. Not thread-safe: one writer (the shim)."""

    def __init__(self, path: Path, max_size: int = MAX_SIZE, max_files: int = MAX_FILES) -> None:
        self.path, self.max_size, self.max_files = path, max_size, max_files
        self.file = open(path, "ab")   # noqa: SIM115 - closed in close()

    def write(self, data: bytes, when: float | None = None) -> None:
        record = json.dumps({"t": time.time() if when is None else when,
                             "d": data.decode("utf-8", "replace")}).encode() + b"\n"
        if self.file.tell() + len(record) > self.max_size and self.file.tell() > 0:
            self.rotate()
        self.file.write(record)
        self.file.flush()

    def rotate(self) -> None:
        self.file.close()
        for n in range(self.max_files - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            newer = self.path if n == 1 else self.path.with_name(f"{self.path.name}.{n - 1}")
            if newer.exists():
                os.replace(newer, older)
        self.file = open(self.path, "ab")   # noqa: SIM115

    def close(self) -> None:
        self.file.close()


def read_records(path: Path, max_files: int = MAX_FILES) -> list[tuple[float, str]]:
    """Every record still kept, oldest first; a torn last line (the shim was killed mid-write) is skipped."""
    out = []
    for n in range(max_files - 1, -1, -1):
        p = path if n == 0 else path.with_name(f"{path.name}.{n}")
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            continue
        out.extend(parse(data))
    return out


def parse(data: bytes) -> list[tuple[float, str]]:
    out = []
    for line in data.splitlines():
        try:
            rec = json.loads(line)
            out.append((float(rec["t"]), str(rec["d"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def to_lines(records: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """Records -> (time the line began, line with its newline); a last partial line is kept as is."""
    lines, current, began = [], "", None
    for when, text in records:
        for piece in text.splitlines(keepends=True):
            if began is None:
                began = when
            current += piece
            if piece.endswith(("\n", "\r")):
                lines.append((began, current))
                current, began = "", None
    if current:
        lines.append((began, current))
    return lines


def render(lines: list[tuple[float, str]], timestamps: bool) -> str:
    """Lines as ``docker logs`` prints them: with ``timestamps``, an RFC 3339 time and a space first."""
    if not timestamps:
        return "".join(text for _, text in lines)
    return "".join(f"{rfc3339(when)} {text}" for when, text in lines)


def rfc3339(when: float) -> str:
    """``when`` (seconds since the epoch) as RFC 3339 in UTC with microseconds, as Docker's API gives times."""
    return datetime.fromtimestamp(when, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def human_duration(seconds: float) -> str:
    """A duration as ``docker ps`` words it (go-units' HumanDuration): "Less than a second", "1 second",
    "N seconds", "About a minute", "N minutes", "About an hour", "N hours" (rounded, to 47), "N days" (to 13),
    "N weeks" (to 8), "N months" (to 23), "N years". Negative durations (a clock step) count as 0."""
    s = max(0.0, seconds)
    if s < 1:
        return "Less than a second"
    if int(s) == 1:
        return "1 second"
    if s < 60:
        return f"{int(s)} seconds"
    minutes, hours = int(s / 60), int(s / 3600 + 0.5)      # hours rounded, as go-units does
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // (24 * 7)} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // (24 * 30)} months"
    return f"{int(s / 3600) // (24 * 365)} years"
