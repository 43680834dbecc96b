"""Exit latency against a C KVM_RUN loop: the benchmark lives in the package (pykvm.bench, also
``pykvm bench``); this entry point keeps ``python -m benchmarks.exit_latency`` working from a checkout.

    python -m benchmarks.exit_latency [--count N] [--repeat R] [--json]
"""

from __future__ import annotations

import shutil  # noqa: F401  (tests patch shutil.which through this module)
import sys
from pathlib import Path

if __package__ in (None, ""):   # run as a file: make the checkout's pykvm importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pykvm.bench import *  # noqa: E402,F403
from pykvm.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
