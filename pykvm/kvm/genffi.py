"""Generate ``pykvm/kvm/_abi_ffi.py``: cffi's out-of-line ABI module for :data:`pykvm.kvm.abi.CDEF`.

cffi in ABI mode either parses the C declarations at every start (pycparser: ~60 ms here, most of
``pykvm run``'s start-up) or, out of line, once: the parsed types are written as a small Python
module that needs only ``_cffi_backend`` to load. Nothing is compiled either way. The generated
file is committed; ``tests/test_abi.py`` regenerates it and fails if it is stale.

    python -m pykvm.kvm.genffi            rewrite pykvm/kvm/_abi_ffi.py after editing CDEF
"""

from __future__ import annotations

import sys
from pathlib import Path

MODULE = "pykvm.kvm._abi_ffi"
TARGET = Path(__file__).with_name("_abi_ffi.py")


def generate(path: Path = TARGET) -> Path:
    """Parse CDEF with cffi and write the out-of-line ABI module to ``path``; returns ``path``."""
    import cffi

    from .abi import CDEF
    builder = cffi.FFI()
    builder.cdef(CDEF)
    builder.set_source(MODULE, None)
    builder.emit_python_code(str(path))
    return path


if __name__ == "__main__":
    print(generate(Path(sys.argv[1]) if len(sys.argv) > 1 else TARGET))
