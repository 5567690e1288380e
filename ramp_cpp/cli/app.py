"""`ramp-cpp`: the Typer app and its entry point. The commands live one group to a module beside this one
(models, quantize, demo, calibrate, measure, search, apply; what they share in common.py); this module alone
registers them, in the order `ramp-cpp --help` lists them, each behind the one error handling every command
has: a RampError is one red `error:` line on stderr and exit code 2, never a traceback; Ctrl-C exits 130.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from ramp_cpp import __version__
from ramp_cpp.cli import apply, calibrate, demo, measure, models, quantize, search
from ramp_cpp.cli.common import err, out
from ramp_cpp.errors import RampError, from_os_error

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="RAMP mixed-precision quantization for llama.cpp."
)


def version() -> None:
    """Print ramp-cpp's version and the llama.cpp it runs on."""
    from ramp_cpp.llama.backend import _llama

    lc = _llama()
    out.print(f"ramp-cpp {__version__}, llama-cpp-python {lc.__version__}")


COMMANDS: tuple[tuple[str, Callable[..., None]], ...] = (
    ("version", version),
    ("demo-model", demo.demo_model),
    ("inspect", models.inspect),
    ("quantize", quantize.quantize),
    ("eval", quantize.eval_),
    ("demo", demo.demo),
    ("calibrate", calibrate.calibrate),
    ("imatrix", calibrate.imatrix_),
    ("fold", calibrate.fold),
    ("offgrid", models.offgrid_),
    ("pad", models.pad_),
    ("upcycle", models.upcycle_),
    ("features", calibrate.features),
    ("search", search.search),
    ("apply", apply.apply),
    ("measure", measure.measure),
)


def guarded(fn: Callable[..., None]) -> Callable[..., None]:
    """`fn` whose RampError becomes one red line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except RampError as e:
            err.print(f"[red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except OSError as e:  # the environment's (a full disk, a permission): one line too
            err.print(f"[red]error:[/] {from_os_error(e)}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


for _name, _fn in COMMANDS:
    app.command(_name)(guarded(_fn))


def main() -> None:
    app()
