"""`--gpu-size`: a second cap on the bytes left on the GPU when llama.cpp offloads the experts
(`-ot exps=CPU`), besides the whole-file `--size`. The allocators honour both and the cap binds (on a
sensitivity built from a tiny MoE's real tensor sizes); the two-cap greedy against brute force and a trivially
feasible allocation on small random tables; an end-to-end `search` whose reported GPU-resident bytes are
those of the file it wrote; an infeasible cap refused in one line before any work."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import synthetic
from gguf import GGUFReader
from test_allocators import random_rows, table
from test_cli_errors import one_error_line
from typer.testing import CliRunner

from ramp_cpp.allocate.allocators import greedy, uniform
from ramp_cpp.allocate.gpu import GpuBudget, gpu_cap, kv_cache_bytes, smallest_resident
from ramp_cpp.cli.app import app
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.measure.candidates import CandidateConfig, searched_tensors, tensor_candidates
from ramp_cpp.measure.sensitivity import Option, Sensitivity, TensorOptions, undominated
from ramp_cpp.model.ladder import tensor_nbytes
from ramp_cpp.pipeline.plan import size_range

runner = CliRunner()
METHODS = {"uniform": uniform, "greedy": greedy}


def on_gpu(name: str) -> bool:
    """What `-ot exps=CPU` leaves on the GPU: every tensor whose name does not contain `exps`."""
    return "exps" not in name


def padded(n: int, align: int) -> int:
    return math.ceil(n / align) * align


def file_resident(path: Path) -> int:
    """GPU-resident bytes of a GGUF, read with gguf-py's own reader: each tensor's data padded to the
    file's alignment, for every tensor -ot exps=CPU keeps on the GPU."""
    r = GGUFReader(path)
    f = r.get_field("general.alignment")
    align = int(f.contents()) if f is not None else 32
    return sum(padded(int(t.n_bytes), align) for t in r.tensors if on_gpu(t.name))


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write_moe(tmp_path_factory.mktemp("moe") / "moe.f16.gguf")


def moe_sensitivity(path: Path) -> Sensitivity:
    """The tiny MoE's searched tensors with their real candidate bytes and a made-up error that falls with
    bits per weight (attention and embeddings 4x as sensitive as the experts): real sizes, toy errors."""
    info, cc = read_inventory(path), CandidateConfig()
    lo, _ = size_range(info, cc)
    tensors, least = [], 0
    for t in searched_tensors(info, cc.embeddings):  # embeddings and output searched too, as a run does
        opts = []
        for _, w in tensor_candidates(cc, t, True):
            nb = padded(tensor_nbytes(w, t.n_params), info.alignment)
            weight = 1.0 if "exps" in t.name else 4.0
            opts.append(Option(w, nb, weight * t.n_params * 2.0 ** (-8 * nb / t.n_params)))
        front = undominated(opts)
        least += front[0].nbytes
        tensors.append(TensorOptions(t.name, t.n_params, front))
    return Sensitivity("0" * 64, None, lo - least, info.n_params_total, tuple(tensors))


def resident(sens: Sensitivity, choice: dict) -> int:
    return sum(t.option(choice[t.name]).nbytes for t in sens.tensors if on_gpu(t.name))


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("frac", [0.0, 0.3, 0.7])
def test_allocators_honour_a_binding_gpu_cap(moe: Path, method: str, frac: float) -> None:
    sens = moe_sensitivity(moe)
    info = read_inventory(moe)
    size = (sens.min_bytes() + sens.max_bytes()) // 2
    alloc = METHODS[method]
    free = alloc(sens, size)
    floor = sum(t.options[0].nbytes for t in sens.tensors if on_gpu(t.name))
    weights_cap = floor + int(frac * (resident(sens, free) - floor))
    assert resident(sens, free) > weights_cap  # without the cap the GPU-resident bytes exceed it
    # the cap as the plan resolves it: KV and the unsearched resident tensors (norms, router: F32, kept)
    kv = 4096
    r = GGUFReader(moe)
    unsearched = {t.name for t in r.tensors} - {t.name for t in sens.tensors}
    fixed = sum(
        padded(int(t.n_bytes), info.alignment) for t in r.tensors if t.name in unsearched and on_gpu(t.name)
    )
    cap = gpu_cap(info, CandidateConfig(), weights_cap + kv + fixed, kv, "test")
    budget = cap.budget(sens)
    assert budget.weights_bytes == weights_cap
    assert smallest_resident(info, CandidateConfig()) == floor + fixed
    got = alloc(sens, size, gpu=budget)
    assert resident(sens, got) <= weights_cap and sens.file_bytes(got) <= size
    assert got != free


def test_a_cap_that_does_not_bind_changes_nothing(moe: Path) -> None:
    sens = moe_sensitivity(moe)
    size = (sens.min_bytes() + sens.max_bytes()) // 2
    everything = frozenset(t.name for t in sens.tensors if on_gpu(t.name))
    for alloc in METHODS.values():
        free = alloc(sens, size)
        assert alloc(sens, size, gpu=GpuBudget(resident(sens, free), everything)) == free


def brute(sens: Sensitivity, size: int, gpu: GpuBudget) -> float:
    """Least Σ error over every allocation within both caps, by enumeration."""
    best = math.inf
    for combo in itertools.product(*(t.options for t in sens.tensors)):
        g = sum(o.nbytes for t, o in zip(sens.tensors, combo, strict=True) if t.name in gpu.resident)
        if sens.fixed_bytes + sum(o.nbytes for o in combo) <= size and g <= gpu.weights_bytes:
            best = min(best, sum(o.error for o in combo))
    return best


def resident_smallest(sens: Sensitivity, size: int, gpu: GpuBudget) -> float:
    """A trivially feasible allocation's error: every GPU-resident tensor at its smallest option, the others
    by the one-cap greedy."""
    pinned = [TensorOptions(t.name, t.n_params, t.options[:1]) if t.name in gpu.resident else t
              for t in sens.tensors]
    fixed = Sensitivity(sens.model_sha256, None, sens.fixed_bytes, sens.n_params_total, tuple(pinned))
    return sens.error(greedy(fixed, size))


@pytest.mark.parametrize("seed", range(16))
def test_two_cap_greedy_against_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sens = table(random_rows(rng, 6, 2, 4, 200))
    gpu_names = frozenset(t.name for t in sens.tensors[:3])
    g_lo = sum(t.options[0].nbytes for t in sens.tensors[:3])
    size = int(rng.integers((sens.min_bytes() + sens.max_bytes()) // 2, sens.max_bytes() + 1))
    free = GpuBudget(0, gpu_names).used(sens, greedy(sens, size))
    if free == g_lo:
        pytest.skip("greedy alone leaves the resident tensors at their smallest: no cap can bind")
    gpu = GpuBudget(int(rng.integers(g_lo, free)), gpu_names)  # below what greedy alone puts there: binds
    got = greedy(sens, size, gpu=gpu)
    assert sens.file_bytes(got) <= size and gpu.used(sens, got) <= gpu.weights_bytes
    assert brute(sens, size, gpu) <= sens.error(got) + 1e-9  # no claim of optimality: only feasibility
    assert sens.error(got) <= resident_smallest(sens, size, gpu) + 1e-9
    u = uniform(sens, size, gpu=gpu)
    assert sens.file_bytes(u) <= size and gpu.used(sens, u) <= gpu.weights_bytes


def test_a_gpu_cap_below_the_smallest_types_is_refused() -> None:
    sens = table([[(100, 3.0), (200, 1.0)], [(100, 3.0), (200, 1.0)]])
    for alloc in METHODS.values():
        with pytest.raises(Exception, match="GPU-resident"):
            alloc(sens, sens.max_bytes(), gpu=GpuBudget(150, frozenset({"blk.0.w", "blk.1.w"})))


@pytest.mark.parametrize(
    ("spec", "ctx"),
    [
        (synthetic.MoESpec(), 64),
        (synthetic.MoESpec(n_layer=3, n_head_kv=4), 100),
        (synthetic.MoESpec(n_head=8, n_head_kv=1), 256),
    ],
)
def test_kv_bytes_from_the_metadata(tmp_path: Path, spec: synthetic.MoESpec, ctx: int) -> None:
    p = synthetic.write_moe(tmp_path / "m.gguf", spec)
    head_dim = spec.n_embd // spec.n_head
    # per layer, K and V: ctx x n_head_kv x head_dim F16 values each
    assert kv_cache_bytes(p, ctx) == spec.n_layer * 2 * ctx * spec.n_head_kv * head_dim * 2


def recipe(tmp: Path, text_file: Path) -> Path:
    p = tmp / "recipe.toml"
    p.write_text(f'text = "{text_file}"\nsamples = 2\nctx = 64\nseed = 0\n')
    return p


def cheap(moe: Path, out: Path, text_file: Path, size: int) -> list[str]:
    return ["search", "--model", str(moe), "--out", str(out), "--size", str(size), "--sensitivity", "proxy",
            "--fold", "on", "--text", str(text_file), "--chunks", "1", "--ctx", "64",
            "--recipe", str(recipe(out.parent, text_file)), "--threads", "1"]  # fmt: skip


def test_search_reports_the_gpu_bytes_of_the_file_it_wrote(
    moe: Path, text_file: Path, tmp_path: Path
) -> None:
    info, cc = read_inventory(moe), CandidateConfig()
    lo, hi = size_range(info, cc)
    size = (lo + hi) // 2
    kv = 2 * 2 * 64 * 2 * 64 * 2  # 2 layers, K and V, 64 tokens, 2 KV heads of 64, F16
    cap = kv + smallest_resident(info, cc) * 6 // 5
    out = tmp_path / "run"
    r = runner.invoke(app, [*cheap(moe, out, text_file, size), "--method", "greedy", "--gpu-size", str(cap),
                            "--kv-ctx", "64"])  # fmt: skip
    assert r.exit_code == 0, r.output
    (gguf,) = out.glob("moe.ramp-*.gguf")
    g = json.loads((out / "report.json").read_text())["summary"]["gpu"]
    on_file = file_resident(gguf)
    assert g["resident_bytes"] == on_file and g["kv_bytes"] == kv and g["cap_bytes"] == cap
    assert g["resident_plus_kv"] == on_file + kv <= cap
    assert gguf.stat().st_size <= size
    meta = {f.name: f.contents() for f in GGUFReader(gguf).fields.values() if f.name.startswith("ramp.")}
    assert meta["ramp.gpu_bytes"] == on_file and meta["ramp.gpu_cap_bytes"] == cap
    assert f"{on_file / 2**20:.2f} MiB of tensors" in r.output
    assert "-ot exps=CPU" in (out / "README.md").read_text()


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--method", "greedy", "--gpu-size", "1KiB"], "cannot hold"),
        (["--method", "greedy", "--gpu-size", "900KiB", "--kv-ctx", "100000"], "cannot hold"),
        (["--method", "greedy", "--gpu-size", "lots"], "--gpu-size takes a number"),
        (["--method", "greedy", "--kv-size", "1MiB"], "name --gpu-size too"),
        (["--method", "greedy", "--gpu-size", "1GiB", "--kv-size", "1MiB", "--kv-ctx", "64"], "not both"),
        (["--method", "sac", "--gpu-size", "1GiB"], "--gpu-size applies to --method greedy or uniform"),
    ],
)
def test_bad_gpu_caps_fail_in_one_line_before_work(
    moe: Path, text_file: Path, tmp_path: Path, args: list[str], match: str
) -> None:
    lo, hi = size_range(read_inventory(moe), CandidateConfig())
    out = tmp_path / "run"
    one_error_line(runner.invoke(app, [*cheap(moe, out, text_file, (lo + hi) // 2), *args]), match)
    assert not out.exists()
