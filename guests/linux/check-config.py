#!/usr/bin/env python3
"""Check that every option of a Kconfig fragment took effect in a final .config.

    check-config.py FRAGMENT DOTCONFIG

`CONFIG_X=v` in the fragment must appear as such in .config; `# CONFIG_X is not set` must be unset
there (a "not set" line, or absent because its dependencies are off). Prints one line per option that
did not take, or a one-line summary; exits 1 if any did not take.
"""

from __future__ import annotations

import re
import sys

SET = re.compile(r"^(CONFIG_\w+)=(.*)$")
UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


def read(path: str) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if m := SET.match(line):
                values[m.group(1)] = m.group(2)
            elif m := UNSET.match(line):
                values[m.group(1)] = None
    return values


def main() -> int:
    fragment, dotconfig = sys.argv[1:3]
    want, have = read(fragment), read(dotconfig)
    bad = []
    for name, value in want.items():
        got = have.get(name)
        if got != value:
            bad.append(f"  {name}: asked {'not set' if value is None else value}, "
                       f"got {'not set' if got is None else got}")
    if bad:
        print(f"config check FAILED: {len(bad)} of {len(want)} options of {fragment} did not take:", *bad, sep="\n")
        return 1
    on = sum(v is not None for v in want.values())
    print(f"config check: all {len(want)} options of {fragment} took effect ({on} set, {len(want) - on} not set)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
