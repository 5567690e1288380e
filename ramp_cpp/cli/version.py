"""`version`: ramp-cpp's version and the llama.cpp (llama-cpp-python) it runs on."""

from __future__ import annotations

from ramp_cpp import __version__
from ramp_cpp.cli.common import out


def version() -> None:
    """Print ramp-cpp's version and the llama.cpp it runs on."""
    from ramp_cpp.llama.backend import _llama

    lc = _llama()
    out.print(f"ramp-cpp {__version__}, llama-cpp-python {lc.__version__}")
