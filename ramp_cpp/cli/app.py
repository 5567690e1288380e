"""`ramp-cpp`: the Typer app and its entry point. Each command lives in the module named after it beside this
one (`demo-model` in demo_model.py, `paper-search` in paper_search.py; `inspect` and `offgrid` in models.py;
what they share in common.py, what a sized run shows in sized.py); this module alone registers them, in the
order `ramp-cpp --help` lists them, each behind the one error handling every command has: a RampError is one
red `error:` line on stderr and exit code 2, never a traceback; Ctrl-C exits 130.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from ramp_cpp.cli import (
    apply,
    calibrate,
    demo,
    demo_model,
    eval,
    features,
    fold,
    imatrix,
    measure,
    models,
    pad,
    paper_search,
    quantize,
    search,
    upcycle,
    version,
)
from ramp_cpp.cli.common import err
from ramp_cpp.errors import RampError, from_os_error

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="RAMP mixed-precision quantization for llama.cpp."
)


COMMANDS: tuple[tuple[str, Callable[..., None]], ...] = (
    ("version", version.version),
    ("demo-model", demo_model.demo_model),
    ("inspect", models.inspect),
    ("quantize", quantize.quantize),
    ("eval", eval.eval_),
    ("demo", demo.demo),
    ("calibrate", calibrate.calibrate),
    ("imatrix", imatrix.imatrix_),
    ("fold", fold.fold),
    ("offgrid", models.offgrid_),
    ("pad", pad.pad_),
    ("upcycle", upcycle.upcycle_),
    ("features", features.features),
    ("search", search.search),
    ("paper-search", paper_search.paper_search),
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
