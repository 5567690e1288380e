"""Evaluations through an executor (executor.py, measure/evaljob.py): the serial default keeps the order and
saves each result as it comes; on a Ray cluster started here on the loopback address (a head with no CPU and
two one-CPU worker nodes) the group probes and --fold auto give the same values, allocation and file as the
serial run, and a worker killed mid-job costs that job only."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import synthetic

from ramp_cpp.calibration.artifact import CalibConfig, save_calibration
from ramp_cpp.calibration.collect import calibrate
from ramp_cpp.costs import COUNTERS
from ramp_cpp.errors import RampError
from ramp_cpp.executor import (
    RayExecutor,
    Serial,
    check_reachable,
    cluster_endpoint,
    loopback_only,
    make_executor,
)
from ramp_cpp.llama.backend import RuntimeOptions
from ramp_cpp.llama.evaluate import EvalConfig, base_logprobs
from ramp_cpp.llama.ggufio import read_inventory
from ramp_cpp.measure.candidates import CandidateConfig
from ramp_cpp.measure.groups import GroupConfig, calibrate_sensitivity
from ramp_cpp.measure.tensorcache import build_cache
from ramp_cpp.pipeline.plan import size_range
from ramp_cpp.pipeline.request import SizedRequest
from ramp_cpp.pipeline.run import run_direct
from ramp_cpp.pipeline.sizedconfig import SizedConfig

ECFG = EvalConfig(n_ctx=128, n_chunks=2)
OPTS = RuntimeOptions(n_ctx=128, n_threads=1)


def _square(x: int) -> int:
    return x * x


def test_serial_keeps_order_and_reports_each_result() -> None:
    seen: list[tuple[int, int]] = []
    assert Serial().map(_square, [3, 1, 2], lambda i, r: seen.append((i, r))) == [9, 1, 4]
    assert seen == [(0, 9), (1, 1), (2, 4)]


def test_no_workers_means_serial_and_missing_ray_is_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(make_executor(None, None, None, 0), Serial)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(RampError, match=r"ramp-cpp\[ray\]"):
        make_executor(2, None, None, 0)


# -- a cluster's address --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, endpoint",
    [
        ("10.0.0.5:6380", ("10.0.0.5", 6380)),
        ("head", ("head", 6379)),  # Ray's default GCS port
        ("ray://head", ("head", 10001)),  # Ray Client's default port
        ("ray://10.0.0.5:20001", ("10.0.0.5", 20001)),
        ("[::1]:6380", ("::1", 6380)),
        ("[::1]", ("::1", 6379)),
        ("local", None),
        ("auto", None),  # Ray finds this machine's cluster itself
    ],
)
def test_where_an_address_connects(
    address: str, endpoint: tuple[str, int] | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_endpoint(address) == endpoint


def test_auto_checks_ray_address_and_bad_addresses_are_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6390")
    assert cluster_endpoint("auto") == ("10.0.0.5", 6390)
    for bad in ("head:port", ":6379", "ray://"):
        with pytest.raises(RampError, match="not a Ray address"):
            cluster_endpoint(bad)


def test_reachable_only_with_something_listening() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        check_reachable(f"127.0.0.1:{port}")
    with pytest.raises(RampError, match=rf"cannot reach the Ray cluster at 127.0.0.1:{port}: Connection ref"):
        check_reachable(f"127.0.0.1:{port}")


def test_an_address_with_nothing_behind_it_fails_at_once_in_one_line(
    tiny_model: Path, tmp_path: Path
) -> None:
    """`--ray 127.0.0.1:1`: Ray alone retries for minutes without a word (36 s per attempt, 20 attempts)."""
    pytest.importorskip("ray")
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    args = ["search", "--model", str(tiny_model), "--size", f"{(lo + hi) / 2 / 1024:.1f}KiB",
            "--out", str(tmp_path / "r"), "--ray", "127.0.0.1:1"]
    # the command's own imports (torch, Ray) take most of its time, up to ~45 s on a loaded 2-core machine:
    # the bound here only tells seconds from Ray's minutes; the executor's own time is checked below
    r = subprocess.run([sys.executable, "-c", "from ramp_cpp.cli.app import main; main()", *args],
                       capture_output=True, text=True, timeout=150)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert lines[0].startswith("error: cannot reach the Ray cluster at 127.0.0.1:1"), lines[0]
    assert not (tmp_path / "r").exists()
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is initialised in this process: an executor joins it whatever its address")
    t0 = time.monotonic()
    with pytest.raises(RampError, match="cannot reach the Ray cluster at 127.0.0.1:1"):
        RayExecutor(workers=1, address="127.0.0.1:1")
    assert time.monotonic() - t0 <= 30
    assert not ray.is_initialized()


@pytest.mark.slow
def test_a_local_cluster_listens_on_loopback_only(tmp_path: Path) -> None:
    """The cluster `--workers N` starts: its node is 127.0.0.1 and every port its processes open is bound to
    127.0.0.1 (without `loopback_only` Ray binds its GCS and raylet to every interface)."""
    pytest.importorskip("ray")
    tmp = tempfile.mkdtemp(prefix="rayl-", dir="/tmp")  # unix socket paths must stay under 108 bytes
    script = tmp_path / "local.py"
    script.write_text(LOCAL_CLUSTER)
    try:
        r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "RAY_TMPDIR": tmp, "RAY_USAGE_STATS_ENABLED": "0"})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["nodes"] == ["127.0.0.1"] and got["values"] == [3, 4]
    assert got["listening"], "no listening socket found: the check saw nothing"
    assert all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::ffff:127.0.0.1]") for a in got["listening"]), got
    assert got["restored"]  # this process's Ray switch and environment are as they were


LOCAL_CLUSTER = """
import json, os, subprocess
import ray._private.ray_constants as rc
from ramp_cpp.executor import RayExecutor

before = (rc.ENABLE_RAY_CLUSTER, os.environ.get(rc.ENABLE_RAY_CLUSTERS_ENV_VAR))
ex = RayExecutor(workers=1, cpus=1)
try:
    # Ray's processes: those naming this run's RAY_TMPDIR, their children, and this driver
    pids = set(subprocess.run(["pgrep", "-f", os.environ["RAY_TMPDIR"]], capture_output=True, text=True)
               .stdout.split()) | {str(os.getpid())}
    for p in list(pids):
        pids |= set(subprocess.run(["pgrep", "-P", p], capture_output=True, text=True).stdout.split())
    values = ex.map(abs, [-3, 4])
    ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    listening = [ln.split()[3] for ln in ss if any(f"pid={p}," in ln for p in pids)]
    nodes = [n["NodeManagerAddress"] for n in ex.nodes()]
finally:
    ex.close()
restored = (rc.ENABLE_RAY_CLUSTER, os.environ.get(rc.ENABLE_RAY_CLUSTERS_ENV_VAR)) == before
print(json.dumps({"nodes": nodes, "values": values, "listening": listening, "restored": restored}))
"""


# -- a local cluster --------------------------------------------------------------------------------------

_CLUSTER: dict[str, Any] = {}  # the fixture's ray.cluster_utils.Cluster, for the test that removes a node


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayExecutor]:
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    # Ray's files (sessions, sockets, its address file) under a short temp dir of the test's own: unix
    # socket paths must stay under 108 bytes
    tmp = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")
    # every node and this driver on 127.0.0.1, not on the host's own IP: what a local cluster gets
    with pytest.MonkeyPatch.context() as mp, loopback_only():
        mp.setenv("RAY_TMPDIR", tmp)
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
        for _ in range(2):
            c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ex = RayExecutor(workers=2, cpus=1, address=c.address)
        _CLUSTER["c"] = c
        try:
            assert c.address.startswith("127.0.0.1:")
            assert [n["NodeManagerAddress"] for n in ex.nodes()] == ["127.0.0.1"] * 3
            yield ex
        finally:
            import ray

            ray.shutdown()
            c.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def measured(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    m = synthetic.measured(tiny_model, tmp_path_factory.mktemp("workers"))
    base_logprobs(tiny_model, m["text"], ECFG, OPTS)  # so that the probes below decode only their own tokens
    return m


def _probes(m: dict[str, Any], tiny_model: Path, ex: Any) -> tuple[Any, Any, dict[str, Any]]:
    cfg = GroupConfig(pairs=2)
    seen: list[int] = []
    tokens = COUNTERS.tokens
    scaled, rep = calibrate_sensitivity(
        m["sens"], m["cache"], tiny_model, m["text"], ECFG, OPTS, cfg, lambda a, b: seen.append(a),
        executor=ex,
    )
    (state,) = Path(m["cache"].directory).glob("groups-*.json")
    evals = json.loads(state.read_text())["evals"]
    state.unlink()  # the next run measures again
    assert rep.evaluated_now == rep.evaluations == len(evals)
    assert sorted(seen) == list(range(1, len(evals) + 1))
    # the tokens the workers decoded are counted here: E stays right
    assert COUNTERS.tokens - tokens == rep.evaluations * ECFG.n_chunks * ECFG.n_ctx
    # what each evaluation measured, not when or how long
    clocks = ("seconds", "ended")
    return scaled, rep, {k: {f: v for f, v in e.items() if f not in clocks} for k, e in evals.items()}


def test_probes_on_the_cluster_equal_the_serial_ones(
    cluster: RayExecutor, measured: dict[str, Any], tiny_model: Path
) -> None:
    s_scaled, s_rep, s_evals = _probes(measured, tiny_model, Serial())
    r_scaled, r_rep, r_evals = _probes(measured, tiny_model, cluster)
    assert r_evals == s_evals  # every KLD, stderr and PPL to the last digit
    assert r_scaled == s_scaled
    assert [g.ratio for g in r_rep.groups] == [g.ratio for g in s_rep.groups]


def test_tensor_cache_passes_on_the_cluster_write_the_serial_bytes(
    cluster: RayExecutor, measured: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    """Each candidate type's llama.cpp pass as a job: the same .bin and .json files as the serial build, and
    the quantizer passes the workers ran are counted here."""
    m = measured
    names = [t.name for t in m["sens"].tensors]
    types = CandidateConfig().requested()
    built = {}
    for name, ex in (("serial", Serial()), ("ray", cluster)):
        passes = COUNTERS.quant_passes
        built[name] = build_cache(
            tiny_model, types, tmp_path / name, imatrix=m["cal"].imatrix(), searched=names, executor=ex
        )
        assert COUNTERS.quant_passes - passes == len({*built[name].types, built[name].base})
    files = {
        name: {p.name: p.read_bytes() for p in sorted(c.directory.iterdir()) if p.suffix in (".bin", ".json")}
        for name, c in built.items()
    }
    assert files["ray"] == files["serial"]
    assert {f"{t.name}.json" for t in built["ray"].types} <= set(files["ray"])


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_fold_auto_run_on_the_cluster_writes_the_serial_file(
    cluster: RayExecutor, measured: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    tf = measured["text_file"]
    cfg = SizedConfig(text=str(tf), n_ctx=128, chunks=2, calib=CalibConfig(text=str(tf), samples=2, ctx=64))
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    size = f"{(lo + hi) / 2 / 1024:.1f}KiB"
    runs = {}
    for name, ex in (("serial", Serial()), ("ray", cluster)):
        runs[name] = run_direct(SizedRequest(tiny_model, tmp_path / name, "greedy", size, cfg, presets=(),
            sensitivity="measured", gcfg=GroupConfig(pairs=1), fold="auto"), OPTS, executor=ex)
    s, r = runs["serial"], runs["ray"]
    assert _sha(s.gguf) == _sha(r.gguf)
    a_s, a_r = (json.loads(x.allocation.read_text()) for x in (s, r))
    assert a_s["tensors"] == a_r["tensors"]
    rep_s, rep_r = (json.loads(x.report.read_text())["summary"] for x in (s, r))
    assert rep_s["fold"] == rep_r["fold"] and rep_s["fold"]["reward_kld"]["on"] > 0  # both files scored
    klds = [[g["kld"] for g in rep["kld_groups"]["groups"]] for rep in (rep_s, rep_r)]
    assert klds[0] == klds[1]


def _dies_once(marker: str) -> Any:
    def job(x: int) -> tuple[int, int]:
        p = Path(marker) / f"{x}"
        tries = int(p.read_text()) + 1 if p.exists() else 1
        p.write_text(str(tries))
        if x == 1 and tries == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the worker process dies mid-job
        return x * 10, tries

    return job


@pytest.mark.parametrize(
    "workers,address,threads,gpu_layers,cpus,gpus",
    [
        (2, None, None, 0, max(1, (os.cpu_count() or 1) // 2), 0.0),  # local: the cores split between jobs
        (4, None, 3, 0, 3, 0.0),  # --threads wins
        (None, "127.0.0.1:1", None, 99, 1, 1.0),  # a cluster: 1 CPU per job unless told, a GPU with layers
    ],
)
def test_what_each_job_asks_ray_for(
    cluster: RayExecutor, workers: int | None, address: str | None, threads: int | None, gpu_layers: int,
    cpus: int, gpus: float,
) -> None:
    ex = make_executor(workers, address, threads, gpu_layers)  # joins the running cluster: Ray is initialised
    assert isinstance(ex, RayExecutor) and (ex.cpus, ex.gpus, ex.threads) == (cpus, gpus, cpus)


def test_jobs_import_their_function_from_the_pythonpath_folders(cluster: RayExecutor, tmp_path: Path) -> None:
    """The benchmark scripts' cells are functions of bench/, not of an installed package: `pythonpath` puts
    the folder on each job's PYTHONPATH, where a worker started without it could not import them."""
    (tmp_path / "cellmod_a3f.py").write_text("def triple(x):\n    return 3 * x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import cellmod_a3f  # type: ignore[import-not-found]

        with_path = RayExecutor(workers=2, cpus=1, address=cluster.address, pythonpath=(str(tmp_path),))
        assert with_path.map(cellmod_a3f.triple, [1, 2, 3]) == [3, 6, 9]
        with pytest.raises(Exception, match="cellmod_a3f"):
            cluster.map(cellmod_a3f.triple, [1])  # the same job without the folder: no such module there
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("cellmod_a3f", None)


def test_a_killed_worker_costs_one_retried_job(cluster: RayExecutor, tmp_path: Path) -> None:
    seen: list[int] = []
    out = cluster.map(_dies_once(str(tmp_path)), [0, 1, 2], lambda i, r: seen.append(i))
    assert [r[0] for r in out] == [0, 10, 20]
    assert [r[1] for r in out] == [1, 2, 1]  # job 1 ran twice, the others once
    assert sorted(seen) == [0, 1, 2]


def test_an_error_in_a_job_reaches_the_caller_without_retries(cluster: RayExecutor, tmp_path: Path) -> None:
    def bad(x: int) -> int:
        (tmp_path / f"ran-{x}-{os.getpid()}").touch()
        raise RampError(f"job {x} is wrong")

    with pytest.raises(RampError, match="job 0 is wrong"):
        cluster.map(bad, [0])
    assert len(list(tmp_path.glob("ran-0-*"))) == 1


def test_cli_workers_only_for_a_sized_search(tiny_model: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ramp_cpp.cli.app import app

    runner = CliRunner()
    paper = ["paper-search", "--model", str(tiny_model), "--out", str(tmp_path / "r"), "--budget", "4.5"]
    r = runner.invoke(app, [*paper, "--workers", "2"])
    assert r.exit_code == 2 and "No such option" in r.output  # the paper's search runs serially
    sized = ["search", "--model", str(tiny_model), "--out", str(tmp_path / "r"), "--size", "1MiB"]
    r = runner.invoke(app, [*sized, "--workers", "0"])
    assert r.exit_code == 2 and "--workers" in r.output
    assert not (tmp_path / "r").exists()


def _cli_inputs(measured: dict[str, Any], tiny_model: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """A CLI search's text file, a tiny calibration of the model, and a --size between its smallest and
    largest files."""
    tf = measured["text_file"]
    cal = calibrate(tiny_model, tf.read_text(), CalibConfig(text=str(tf), samples=2, ctx=64))
    calib = save_calibration(cal, tmp_path / "calib.safetensors")
    lo, hi = size_range(read_inventory(tiny_model), CandidateConfig())
    return tf, calib, f"{(lo + hi) / 2 / 1024:.1f}KiB"


def test_cli_sized_search_with_workers(
    cluster: RayExecutor, measured: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    """`search --workers 2` joins the running cluster (as it would start a local one) and writes the file
    the serial command writes."""
    from typer.testing import CliRunner

    from ramp_cpp.cli.app import app

    runner = CliRunner()
    tf, calib, size = _cli_inputs(measured, tiny_model, tmp_path)
    args = [
        "search", "--model", str(tiny_model), "--method", "greedy", "--size", size,
        "--text", str(tf), "--calib", str(calib), "--chunks", "2", "--ctx", "128", "--threads", "1",
        "--fold", "auto",
    ]
    shas = []
    for name, extra in (("serial", []), ("ray", ["--workers", "2"])):
        r = runner.invoke(app, [*args, "--out", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
        assert ("up to 2 jobs at once" in r.output) == (name == "ray")
        (gguf,) = (tmp_path / name).glob("*ramp-*.gguf")
        shas.append(_sha(gguf))
    assert shas[0] == shas[1]


def test_sac_rounds_on_the_cluster_equal_the_serial_rounds(
    cluster: RayExecutor, measured: dict[str, Any], tiny_model: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`search --method sac --rollouts 2`: each round's two allocations scored as jobs on two workers give
    the reward KLDs, the allocation and the file of the same search scored in this process."""
    from typer.testing import CliRunner

    from ramp_cpp.allocate.sac.scoring import JobScorer
    from ramp_cpp.allocate.sac.search import CHECKPOINT, load_checkpoint
    from ramp_cpp.cli.app import app

    batches: list[int] = []
    spread = JobScorer.__call__

    def counted(self: JobScorer, choices: Any) -> list[float]:
        batches.append(len(choices))
        return spread(self, choices)

    monkeypatch.setattr(JobScorer, "__call__", counted)
    runner = CliRunner()
    tf, calib, size = _cli_inputs(measured, tiny_model, tmp_path)
    args = [
        "search", "--model", str(tiny_model), "--method", "sac", "--size", size, "--evaluations", "5",
        "--rollouts", "2", "--text", str(tf), "--calib", str(calib), "--chunks", "2", "--ctx", "128",
        "--threads", "1", "--fold", "off", "--no-presets",
    ]
    runs = []
    for name, extra in (("serial", []), ("ray", ["--workers", "2"])):
        r = runner.invoke(app, [*args, "--out", str(tmp_path / name), *extra])
        assert r.exit_code == 0, r.output
        (gguf,) = (tmp_path / name).glob("*ramp-*.gguf")
        sac = json.loads((tmp_path / name / "report.json").read_text())["summary"]["sac"]
        _, st = load_checkpoint(tmp_path / name / CHECKPOINT)
        runs.append((_sha(gguf), sac["reward_kld"], [(r["episode"], r["kld"]) for r in st.log]))
    assert runs[0] == runs[1]
    assert len(runs[0][2]) > 3  # rounds ran, not only the reference and the final rollout
    assert max(batches) == 2  # and the cluster run scored them as batches of jobs


def test_cli_measure_kld_groups_with_workers(
    cluster: RayExecutor, measured: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    """`measure --kld-groups --workers 2` (each run with its own cache, so both compute every probe) gives
    the serial command's group KLDs."""
    from typer.testing import CliRunner

    from ramp_cpp.cli.app import app
    from ramp_cpp.errors import RampError
    from ramp_cpp.store.texts import load_text

    try:
        load_text("wikitext2-valid")
    except RampError:
        pytest.skip("wikitext2-valid is not available offline")
    _, calib, _ = _cli_inputs(measured, tiny_model, tmp_path)
    got = {}
    for name, extra in (("serial", []), ("ray", ["--workers", "2"])):
        r = CliRunner().invoke(app, [
            "measure", str(tiny_model), "--calib", str(calib),
            "--cache-dir", str(tmp_path / f"{name}-cache"), "--kld-groups", "--chunks", "1", "--ctx", "64",
            "--threads", "1", "--json", *extra,
        ])
        assert r.exit_code == 0, r.output
        d = json.loads(r.output[r.output.index("{"):])
        assert d["kld_groups"]["evaluated_now"] > 1
        got[name] = [(g["name"], g["kld"]) for g in d["kld_groups"]["groups"]]
    assert got["serial"] == got["ray"]


def _sleeps(marker: str) -> Any:
    def job(x: int) -> int:
        (Path(marker) / f"{x}-{os.getpid()}").touch()
        time.sleep(6)
        return x

    return job


def test_a_removed_node_costs_its_job_only(cluster: RayExecutor, tmp_path: Path) -> None:
    """Last in this file: a third node joins, each of three jobs gets one node's CPU, and once all three run
    the third node is removed; its job runs again on a remaining node and the batch finishes."""
    c = _CLUSTER["c"]
    node = c.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    c.wait_for_nodes()

    def remove_when_all_run() -> None:
        deadline = time.time() + 120
        while len(list(tmp_path.iterdir())) < 3 and time.time() < deadline:
            time.sleep(0.1)
        c.remove_node(node, allow_graceful=False)

    remover = threading.Thread(target=remove_when_all_run)
    remover.start()
    try:
        assert cluster.map(_sleeps(str(tmp_path)), [0, 1, 2]) == [0, 1, 2]
    finally:
        remover.join()
    runs = Counter(p.name.split("-")[0] for p in tmp_path.iterdir())
    assert sorted(runs.values()) == [1, 1, 2], runs  # one job ran twice: the one on the removed node
