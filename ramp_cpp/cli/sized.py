"""What `search` and `apply` of a sized policy show of a sized run (pipeline/run.py), so both show it alike:
the bars, a line per finished stage with its costs, a line per SAC episode, the result (and which file was
written: the never-worse rule), and `--dry-run`'s table of each stage's expected cost. No command of its own.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from ramp_cpp.cli.common import bar, cost_line, cost_printer, err, executor_for, out, stage_progress

if TYPE_CHECKING:  # imported where used: `--help` loads no model code
    from ramp_cpp.llama.backend import RuntimeOptions
    from ramp_cpp.pipeline.request import Hooks, SizedRequest


def _opt(x: float | None) -> str:
    """A KLD that may not exist yet (a cold search's first episode has no candidate)."""
    return "-" if x is None else f"{x:.5f}"


@contextlib.contextmanager
def interrupts() -> Iterator[Callable[[], None]]:
    """Ctrl-C raises KeyboardInterrupt as usual and is also remembered. Python drops an exception raised in
    a finalizer (`__del__`), so a Ctrl-C landing in one would be lost; the `check` this yields, called at
    every episode, raises it again. Where SIGINT is ignored (a background job) nothing changes."""
    seen: list[int] = []
    prev = signal.getsignal(signal.SIGINT)

    def check() -> None:
        if seen:
            raise KeyboardInterrupt

    if prev is not signal.default_int_handler:
        yield check
        return

    def handler(signum: int, frame: Any) -> None:
        seen.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield check
    finally:
        signal.signal(signal.SIGINT, prev)


def run_sized(
    req: SizedRequest,
    ropts: RuntimeOptions,
    workers: int | None,
    ray: str | None,
    run: Callable[[Hooks, Any], Any],
) -> Any:
    """`run(hooks, executor)` (a sized run) with a bar (and for SAC a line per episode), each stage's cost
    line; Ctrl-C keeps what is finished in the run folder and says so."""
    from ramp_cpp.pipeline.request import Hooks

    with (
        executor_for(workers, ray, ropts.n_threads, ropts.n_gpu_layers) as ex,
        bar(req.method) as p,
        interrupts() as interrupted,
    ):
        ev_task = p.add_task("evaluations", total=req.sac.evaluations) if req.method == "sac" else None

        def on_sac(r: dict[str, Any]) -> None:
            interrupted()
            if ev_task is not None:
                p.update(ev_task, completed=r["evaluations"])
            p.console.print(
                f"ep {r['episode']:4d} {r['kind']:9s} KLD {r['kld']:.5f}  best {_opt(r['best_kld'])}  "
                f"R {r['reward']:+.4f}  evals {r['evaluations']}{' memo' if r['memo'] else ''}",
                highlight=False,
            )

        try:
            return run(Hooks(stage_progress(p), on_sac, cost_printer(p)), ex)
        except KeyboardInterrupt:
            err.print(
                f"interrupted: {req.run_dir} keeps every finished stage and episode; run the same "
                "command again",
                soft_wrap=True,
            )
            raise typer.Exit(130) from None


def report_sized(r: Any, where: Path | None = None) -> None:
    """The run's last lines: the file written (and, when the preset's replaced the allocation's, why), the
    whole run's costs, and where the reports are."""
    from ramp_cpp.costs import total
    from ramp_cpp.pipeline.run import describe

    line = describe(r)
    out.print(f"{where}: {line.split(': ', 1)[1]}" if where else line, soft_wrap=True, highlight=False)
    out.print(cost_line(total(r.costs)), soft_wrap=True, highlight=False)
    out.print(f"allocation {r.allocation}, report {r.report}", soft_wrap=True, highlight=False)


def plan_sized(req: SizedRequest, ropts: RuntimeOptions, what: str) -> None:
    """--dry-run: the plan's checks, a speed probe, and each stage's expected cost as a table, the lines a
    run prints as its stages end; nothing is written (pipeline/estimate.py)."""
    from rich.table import Table

    from ramp_cpp.pipeline.estimate import estimate, total
    from ramp_cpp.pipeline.plan import plan_run
    from ramp_cpp.pipeline.speedcache import known_speeds

    plan = plan_run(req)
    with err.status("speeds: this machine's measured ones, a probe of what it has not measured yet"):
        probe = known_speeds(plan, ropts, plan.presets)
    stages = estimate(plan, plan.presets, ropts, probe)
    t = Table(
        box=None,
        pad_edge=False,
        padding=(0, 1, 0, 0),
        title=f"{what} at --size {req.size} on {Path(req.model_path).name}: expected costs",
    )
    for col in ("stage", "time", "RAM", "written", "held", "E", "passes"):
        t.add_column(col, no_wrap=True, justify="left" if col == "stage" else "right")
    rows = [*stages, total(stages)]
    if any(s.if_unfolded for s in stages):
        rows.append(replace(total(stages, unfolded=True), stage="total†"))
    for s in rows:
        name = s.stage + ("†" if s.if_unfolded else "") + ("*" if s.note else "")
        t.add_row(
            name,
            _seconds(s.wall_s),
            *map(_bytes, (s.peak_rss, s.written, s.held)),
            f"{s.E:.2f}",
            str(s.quant_passes),
            style="bold" if s.stage.startswith("total") else None,
        )
    out.print(t)
    _plan_notes(stages, len(rows) > len(stages) + 1, probe, plan)


def _plan_notes(stages: list[Any], unfolded: bool, probe: Any, plan: Any) -> None:
    for s in stages:
        if s.note:
            out.print(f"* {s.stage}: {s.note}", soft_wrap=True, highlight=False)
    if unfolded:
        out.print(
            "† only if the fold check keeps the unfolded model (total†: the run's cost then)",
            soft_wrap=True,
            highlight=False,
        )
    if plan.gpu is not None:
        g, mib = plan.gpu, 1 << 20
        out.print(
            f"--gpu-size {g.cap_bytes / mib:.2f} MiB: the tensors -ot exps=CPU leaves on the GPU take at "
            f"least {g.least / mib:.2f} MiB, the KV cache {g.kv_bytes / mib:.2f} MiB ({g.kv_from})",
            soft_wrap=True,
            highlight=False,
        )
    if probe.load > 0.5:
        err.print(
            f"the CPUs were busy during the speed probe (load {probe.load:.1f} per core): other work "
            "slows llama.cpp's threads, F16 decoding most, so these times hold only while it goes on; "
            "plan again on an idle machine",
            soft_wrap=True,
            highlight=False,
        )
    out.print(
        f"held: disk the run holds after the stage; E: passes over the {plan.cfg.chunks} reward chunks. "
        f"Speed probe {probe.seconds:.1f} s; nothing was run or written (the run would write to "
        f"{plan.run_dir})",
        soft_wrap=True,
        highlight=False,
    )


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 90 else f"{s / 60:.1f} min" if s < 5400 else f"{s / 3600:.1f} h"


def _bytes(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n < 1000 << 20 else f"{n / (1 << 30):.1f} GiB"
