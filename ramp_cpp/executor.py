"""Where a batch of independent evaluations runs: in this process, one after another (the default: nothing to
install), or as Ray tasks on local workers or an existing Ray cluster.

A run's expensive steps are batches of jobs that do not depend on each other (the group probes of one
folding choice, the two files of the fold decision, a benchmark's cells). The run hands a batch to
`Executor.map(fn, jobs, on_result)` and gets the results back in the jobs' order; `on_result(i, result)` is
called in the calling process as each one finishes (in completion order), so the caller can save it at once
and a run interrupted as a whole re-does only the jobs in flight.

Ray (`RayExecutor`):

    placement   every job asks for `cpus` CPUs (its llama.cpp threads) and, with layers offloaded, `gpus`
                GPUs, so Ray starts no more jobs on a node than it has cores (and GPUs) for
    faults      a worker that dies mid-job (kill -9, a node removed) costs that job only: Ray runs it again,
                up to `max_retries` times, on whatever node has room; an exception raised by the job itself
                is not retried (it is an error of the input, the same everywhere) and reaches the caller
    costs       the tokens llama.cpp decodes in a worker are counted there; each result carries them back
                and they are added to this process's `costs.COUNTERS`, so E units stay right
    files       `fn` and the jobs travel pickled (by reference to an installed ramp_cpp module); paths in a
                job (tensor cache, base log-probs, model) must name the same files on every node: a shared
                filesystem, or one node

`fn` must be a module-level function the workers can import by name: of an installed package, or of a
folder named in `pythonpath` (the benchmark scripts': each job's PYTHONPATH gets it, through Ray's runtime
environment, so it must be the same path on every node).

Joining a cluster first opens a TCP connection to its address (`CONNECT_TIMEOUT_S`): with nothing listening
there, Ray itself retries for minutes without a word; this says so in one line at once. A local cluster
started here listens on 127.0.0.1 only, with no dashboard: nothing outside this machine can submit to it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from ramp_cpp.costs import COUNTERS
from ramp_cpp.errors import RampError

J = TypeVar("J")
R = TypeVar("R")
OnResult = Callable[[int, Any], None]

CONNECT_TIMEOUT_S = 5.0  # to open a TCP connection to a cluster's address before Ray is asked to join it
RAY_PORT, RAY_CLIENT_PORT = 6379, 10001  # Ray's defaults: the head's GCS, the Ray Client server (ray://)
LOOPBACK = "127.0.0.1"


class Executor(Protocol):
    workers: int  # jobs that may run at once (1: serial)

    @property
    def threads(self) -> int | None:
        """llama.cpp threads of each job (None: the run's own --threads)."""

    def map(self, fn: Callable[[J], R], jobs: Sequence[J], on_result: OnResult | None = None) -> list[R]: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...


@dataclass
class Serial:
    """Each job in this process, in order: what every run did before there was an executor."""

    workers: int = 1
    threads: int | None = None

    def map(self, fn: Callable[[J], R], jobs: Sequence[J], on_result: OnResult | None = None) -> list[R]:
        out = []
        for i, j in enumerate(jobs):
            r = fn(j)
            if on_result:
                on_result(i, r)
            out.append(r)
        return out

    def describe(self) -> str:
        return "serial"

    def close(self) -> None:
        pass


def _counted(fn: Callable[[Any], Any], job: Any) -> tuple[Any, int, int, int]:
    """Run `fn(job)` in a worker: its result, and the tokens, quantizer passes and weights quantized in
    memory it counted."""
    t, q, w = COUNTERS.tokens, COUNTERS.quant_passes, COUNTERS.quant_weights
    r = fn(job)
    return r, COUNTERS.tokens - t, COUNTERS.quant_passes - q, COUNTERS.quant_weights - w


@dataclass
class RayExecutor:
    """Jobs as Ray tasks. `address`: an existing cluster ("auto", "ray://host:10001", "host:6379"); None
    starts a local one sized for `workers` jobs of `cpus` CPUs each and stops it at `close()`."""

    workers: int
    cpus: int = 1
    gpus: float = 0.0
    address: str | None = None
    max_retries: int = 3
    pythonpath: tuple[str, ...] = ()  # folders the jobs import `fn` from besides the installed packages
    _started: bool = field(default=False, repr=False)
    _remote: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.cpus < 1 or self.gpus < 0:
            raise RampError(
                f"workers and CPUs per job must be >= 1 and GPUs >= 0, got {self.workers}, {self.cpus}, "
                f"{self.gpus}"
            )
        try:
            import ray
        except ImportError:
            raise RampError(
                "--workers/--ray need Ray: pip install 'ramp-cpp[ray]' (or make install-ray)"
            ) from None
        if not ray.is_initialized():
            kw: dict[str, Any] = {
                "include_dashboard": False,
                "logging_level": logging.WARNING,
                "log_to_driver": False,
                "configure_logging": True,
            }
            if self.address is None:
                kw.update(num_cpus=self.workers * self.cpus, num_gpus=int(self.gpus * self.workers) or None,
                          _node_ip_address=LOOPBACK)
            else:
                check_reachable(self.address)
            try:
                with loopback_only() if self.address is None else contextlib.nullcontext():
                    ray.init(address=self.address, **kw)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise RampError(f"cannot join the Ray cluster at {self.address}: {e}") from None
            self._started = True
        self._remote = ray.remote(_counted)

    def map(self, fn: Callable[[J], R], jobs: Sequence[J], on_result: OnResult | None = None) -> list[R]:
        import ray
        from ray.exceptions import RayError, RayTaskError

        if not jobs:
            return []
        kw: dict[str, Any] = {
            "num_cpus": self.cpus, "num_gpus": self.gpus, "max_retries": self.max_retries,
            "retry_exceptions": False,
        }
        if self.pythonpath:
            path = [*self.pythonpath, *filter(None, [os.environ.get("PYTHONPATH")])]
            kw["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(path)}}
        task = self._remote.options(**kw)
        refs = [task.remote(fn, j) for j in jobs]
        index = {r.hex(): i for i, r in enumerate(refs)}
        out: list[Any] = [None] * len(refs)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0].hex()]
            try:
                r, tokens, passes, weights = ray.get(done[0])
            except RayTaskError as e:
                for p in pending:
                    ray.cancel(p)
                cause = e.cause if isinstance(e.cause, BaseException) else None
                if cause is not None:
                    raise cause from None
                raise RampError(f"job {i} failed on a Ray worker: {e}") from None
            except RayError as e:  # its worker or node lost more often than Ray retries
                for p in pending:
                    ray.cancel(p)
                raise RampError(f"job {i} failed after {self.max_retries} retries: {e}") from None
            COUNTERS.tokens += tokens
            COUNTERS.quant_passes += passes
            COUNTERS.quant_weights += weights
            out[i] = r
            if on_result:
                on_result(i, r)
        return out

    @property
    def threads(self) -> int:
        """A job's llama.cpp threads: the CPUs Ray reserved for it, so that no node is oversubscribed."""
        return self.cpus

    def nodes(self) -> list[dict[str, Any]]:
        import ray

        return [n for n in ray.nodes() if n.get("Alive")]

    def describe(self) -> str:
        where = f"Ray cluster {self.address}" if self.address else "local Ray"
        gpu = f", {self.gpus:g} GPU" if self.gpus else ""
        return f"{where}: up to {self.workers} jobs at once, {self.cpus} CPU{gpu} each"

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """While a local cluster starts: Ray's own switch for machines that must not open a port to the network
    (what it does on macOS and Windows). Ray turns a node address of 127.0.0.1 into this machine's network
    address unless it is off; with the node on 127.0.0.1 its servers listen on 127.0.0.1 only. The processes
    Ray starts read the switch from the environment; this process's is put back once the cluster is up
    (joining another cluster later needs the network address)."""
    from ray._private import ray_constants

    env, flag = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = flag
        if env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = env


def cluster_endpoint(address: str) -> tuple[str, int] | None:
    """The host and port a Ray address connects to: "host[:port]" (the head's GCS, 6379 by default),
    "ray://host[:port]" (the Ray Client server, 10001); for "auto", $RAY_ADDRESS's; None for "auto" without
    it and "local", which Ray resolves on this machine."""
    if address == "auto" and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if address in ("auto", "local"):
        return None
    client = address.startswith("ray://")
    rest, default = (address.removeprefix("ray://"), RAY_CLIENT_PORT) if client else (address, RAY_PORT)
    host, sep, port = rest.rpartition(":")
    if not sep or "]" in port:  # no port ("host", "[::1]")
        host, port = rest, ""
    host = host.strip("[]")
    if not host or (port and not port.isdigit()):
        raise RampError(f"--ray {address}: not a Ray address (host:port, ray://host:port or auto)")
    return host, int(port) if port else default


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise RampError in at most about `timeout` seconds if nothing accepts a TCP connection at the cluster's
    address."""
    end = cluster_endpoint(address)
    if end is None:
        return
    try:
        socket.create_connection(end, timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else e.strerror or str(e)
        raise RampError(
            f"cannot reach the Ray cluster at {address}: {why} (is `ray start --head` running there?)"
        ) from None


def make_executor(
    workers: int | None,
    address: str | None,
    threads: int | None,
    gpu_layers: int,
    pythonpath: tuple[str, ...] = (),
) -> Executor:
    """Serial when neither `workers` nor `address` is given; else Ray. Each job gets `threads` CPUs
    (default: this machine's cores split evenly between the local workers, at least 1; on a cluster, 1) and
    one GPU when layers are offloaded. A cluster's size is Ray's to know: `workers` only sizes a local one."""
    if not workers and not address:
        return Serial()
    n = workers or 1
    # on a cluster this machine's cores say nothing about the nodes': one CPU per job unless told
    cpus = threads or (1 if address else max(1, (os.cpu_count() or 1) // n))
    return RayExecutor(n, cpus, 1.0 if gpu_layers else 0.0, address, pythonpath=pythonpath)
