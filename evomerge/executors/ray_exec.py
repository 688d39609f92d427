"""The Ray executor: a pool of Ray actors, each a resident :class:`~evomerge.executors.worker.ModelWorker`.

Each actor holds the base and experts on its own device (``num_gpus=1`` each on a GPU cluster,
CPU actors otherwise; ``num_cpus`` is always explicit) and a model built once; candidates are
materialised in place. Scheduling is asynchronous: a task goes to a free actor as soon as one
is free (``ray.wait`` on the running calls), so no worker idles while tasks are queued.

Cluster: ``address`` (``executor.ray_address`` / ``--ray-address``), else ``RAY_ADDRESS`` (set
by ``ray job submit``), else a private local cluster started here with exactly the CPUs the
workers need, no dashboard and a small object store. The private cluster binds to the loopback
interface only (nothing on the network can reach it) and keeps its sockets and logs in a fresh
per-run temporary directory (``mkdtemp``, mode 0700), removed when the executor closes.

An address is probed before ``ray.init`` (:func:`probe_address`): ``auto`` needs a cluster
started on this machine, ``host:port`` / ``ray://host:port`` must accept a TCP connection within
:data:`PROBE_TIMEOUT_S`; otherwise the search stops at once with one line, instead of Ray's
minutes of retries and a long traceback.

Dead workers: when an actor dies (process exit, OOM kill), evomerge kills what is left of it,
starts a fresh actor in its slot and re-runs the candidate, up to ``max_retries`` times per
candidate; then the candidate is recorded as failed with the reason and the run goes on. More
than ``max_restarts`` restarts in one run means something is wrong with every worker: the run
stops with the last reason.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import tempfile
import time
from collections import deque
from contextlib import contextmanager
from typing import Iterator

from evomerge.errors import ConfigError, EvomergeError
from evomerge.extras import require_extra
from evomerge.executors.base import Executor, register_executor
from evomerge.executors.worker import Outcome, Task, WorkerSpec, make_worker

STARTUP_TIMEOUT_S = 600.0
PROBE_TIMEOUT_S = 5.0
LOOPBACK = "127.0.0.1"


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Make a private cluster started inside the block listen on 127.0.0.1 only.

    Ray (2.60, measured) binds its GCS, raylet and agents to every interface and replaces a
    loopback ``_node_ip_address`` by the machine's address, unless
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` ("no multi-node cluster"): then every listener uses
    the loopback address. The variable reaches the processes Ray starts (they inherit the
    environment) and the driver's already-imported constant; both are restored afterwards.
    """
    from ray._private import ray_constants

    old_env = os.environ.get(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR)
    old_const = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = old_const
        if old_env is None:
            os.environ.pop(ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR, None)
        else:
            os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = old_env


def _host_port(address: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"(?:ray://)?\[?([^\]\s/]+?)\]?:(\d+)/?", address.strip())
    return (m.group(1), int(m.group(2))) if m else None


def probe_address(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise one line unless a Ray cluster can be reached at ``address`` (fast, bounded)."""
    hint = ("start one with `ray start --head`, fix --ray-address / executor.ray_address / $RAY_ADDRESS, "
            "or leave them unset for a private local cluster")
    if address.strip() == "auto":
        from ray._private.services import find_gcs_addresses

        found = find_gcs_addresses()
        if not found:
            raise ConfigError(f"Ray address 'auto': no Ray cluster is running on this machine; {hint}")
        address = sorted(found)[0]
    if address.strip() in ("local", "localhost"):
        return
    hp = _host_port(address)
    if hp is None:
        raise ConfigError(f"Ray address {address!r}: expected host:port, ray://host:port or auto; {hint}")
    kind = "ray_client" if address.strip().startswith("ray://") else "gcs"
    try:
        with socket.create_connection(hp, timeout=timeout):
            pass
        if os.environ.get("RAY_USE_TLS", "0").lower() not in ("1", "true"):
            _grpc_probe(hp, kind, timeout)
    except OSError as e:
        reason = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e) or type(e).__name__)
        raise ConfigError(f"Ray address {address!r}: no Ray cluster answers at {hp[0]}:{hp[1]} within "
                          f"{timeout:g} s ({reason}); {hint}") from None


# One harmless RPC per kind of Ray endpoint (an empty request message is valid for both).
_PROBE_METHOD = {"gcs": "/ray.rpc.NodeInfoGcsService/GetClusterId", "ray_client": "/ray.rpc.RayletDriver/ClusterInfo"}


def _grpc_probe(hp: tuple[str, int], kind: str, timeout: float) -> None:
    """Ask the endpoint one Ray RPC with a deadline. A Ray GCS / Ray Client server answers it
    (or refuses it for want of a token); a port that accepts connections but is not Ray (a
    proxy, a firewall, another service) does not, and would otherwise hang ``ray.init`` for
    minutes."""
    import grpc

    host = f"[{hp[0]}]" if ":" in hp[0] else hp[0]
    with grpc.insecure_channel(f"{host}:{hp[1]}") as channel:
        call = channel.unary_unary(_PROBE_METHOD[kind], request_serializer=None, response_deserializer=None)
        try:
            call(b"", timeout=timeout, wait_for_ready=False)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code not in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE,
                            grpc.StatusCode.DEADLINE_EXCEEDED, None):
                return  # the method exists and the server answered (maybe: token needed): Ray is there
            detail = e.details() if hasattr(e, "details") else str(e)
            what = "timed out" if code == grpc.StatusCode.DEADLINE_EXCEEDED else (
                f"not a Ray {'client server' if kind == 'ray_client' else 'GCS'}: {code.name if code else ''} "
                f"{' '.join(str(detail or '').split())[:120]}".strip())
            raise ConnectionError(errno.EPROTO, what) from None


class _Actor:
    """The body of a Ray actor: builds the worker once, then runs tasks."""

    def __init__(self, spec: WorkerSpec, name: str):
        # Ray sets OMP_NUM_THREADS from num_cpus; ModelWorker also sets torch's thread count.
        self.worker = make_worker(spec, name)

    def ping(self) -> int:
        return os.getpid()

    def run(self, task: Task) -> Outcome:
        return self.worker.run(task)


def death_reason(e: BaseException) -> str:
    """A one-line reason from a Ray actor/worker error."""
    text = " ".join(str(e).split())
    for marker in ("OutOfMemoryError", "out of memory", "killed", "exit code", "exited", "SIGKILL", "SIGSEGV"):
        i = text.find(marker)
        if i >= 0:
            return f"{type(e).__name__}: …{text[max(0, i - 80): i + 120]}…"
    return f"{type(e).__name__}: {text[:240]}"


@register_executor("ray")
class RayExecutor(Executor):
    @classmethod
    def from_config(cls, cfg, spec: WorkerSpec) -> "RayExecutor":
        return cls(spec, workers=cfg.workers, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, address=cfg.ray_address,
                   max_retries=cfg.max_retries, max_restarts=cfg.max_restarts)

    def __init__(self, spec: WorkerSpec, workers: int = 1, *, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 address: str | None = None, max_retries: int = 2, max_restarts: int = 10,
                 temp_dir: str | None = None):
        require_extra("ray", "ray", "the Ray executor")
        super().__init__(spec, workers)
        self.num_cpus, self.num_gpus = float(num_cpus), float(num_gpus)
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.max_retries, self.max_restarts = max_retries, max_restarts
        self.temp_dir = temp_dir  # None: a fresh private directory per local cluster
        self._own_temp: str | None = None
        self._owns_ray = False
        self._actors: list = []
        self._idle: deque[int] = deque()
        self._queue: deque[tuple[Task, int]] = deque()
        self._running: dict = {}  # ObjectRef -> (slot, task, attempt)
        self.last_death: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        if self.address:
            probe_address(self.address)
            try:
                ray.init(address=self.address, log_to_driver=True)
            except (ConnectionError, RuntimeError, ray.exceptions.RayError) as e:
                raise EvomergeError(f"Ray address {self.address!r}: cannot join the cluster ({_short(e)}); "
                                    "for a token-authenticated cluster set RAY_AUTH_MODE=token and the token "
                                    "(RAY_AUTH_TOKEN or ~/.ray/auth_token), see docs/search.md") from None
        else:
            need = max(1, int(round(self.workers * self.num_cpus + 0.4999)))
            temp = self.temp_dir
            if temp is None:  # private (0700) and unpredictable; Ray makes its own "ray" inside 0777
                self._own_temp = tempfile.mkdtemp(prefix="evomerge-ray-")
                temp = os.path.join(self._own_temp, "ray")
            with _loopback_only():
                ray.init(address="local", num_cpus=need, include_dashboard=False, _temp_dir=temp,
                         _node_ip_address=LOOPBACK, object_store_memory=128 * 1024 ** 2, log_to_driver=True,
                         configure_logging=False)
        self._owns_ray = True

    def _check_resources(self) -> None:
        import ray

        have = ray.cluster_resources()
        cpus, gpus = have.get("CPU", 0.0), have.get("GPU", 0.0)
        where = "this machine" if self._owns_ray and not self.address else "the Ray cluster"
        if self.num_gpus > 0 and gpus < self.num_gpus:
            raise ConfigError(
                f"executor.num_gpus is {self.num_gpus:g} per worker but {where} has {gpus:g} GPUs; an actor "
                "would wait forever. Set executor.num_gpus: 0 for CPU workers"
            )
        if self.workers * self.num_cpus > cpus + 1e-9:
            msg = (f"executor: {self.workers} workers × {self.num_cpus:g} CPUs need {self.workers * self.num_cpus:g} "
                   f"CPUs but {where} has {cpus:g}; lower executor.workers or executor.num_cpus")
            if self._owns_ray or not self.address:
                raise ConfigError(msg)

    def _new_actor(self, slot: int):
        import ray

        cls = ray.remote(_Actor).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0,
                                         max_task_retries=0)
        return cls.remote(self.spec, f"ray-{slot}")

    def start(self) -> None:
        if self._actors:
            return
        import ray

        self._init_ray()
        self._check_resources()
        self._actors = [self._new_actor(i) for i in range(self.workers)]
        pings = {a.ping.remote(): i for i, a in enumerate(self._actors)}
        try:
            ready, rest = ray.wait(list(pings), num_returns=len(pings), timeout=STARTUP_TIMEOUT_S)
            if rest:
                raise EvomergeError(f"{len(rest)} Ray workers did not start within {STARTUP_TIMEOUT_S:.0f} s; "
                                    "is the cluster short of CPUs/GPUs for executor.num_cpus/num_gpus?")
            for ref in ready:
                ray.get(ref)
        except ray.exceptions.RayError as e:
            self.close()
            cause = getattr(e, "cause", None) or e
            raise EvomergeError(f"a search worker could not start: {_short(cause)}") from None
        self._idle = deque(range(self.workers))

    def close(self) -> None:
        try:
            import ray
        except ImportError:  # pragma: no cover
            return
        for a in self._actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        self._actors, self._running = [], {}
        self._idle.clear()
        self._queue.clear()
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
            self._owns_ray = False
        if self._own_temp is not None:
            shutil.rmtree(self._own_temp, ignore_errors=True)
            self._own_temp = None

    # ------------------------------------------------------------------ scheduling
    def submit(self, task: Task) -> None:
        self._queue.append((task, 1))
        self._dispatch()

    def _dispatch(self) -> None:
        while self._idle and self._queue:
            slot = self._idle.popleft()
            task, attempt = self._queue.popleft()
            ref = self._actors[slot].run.remote(task)
            self._running[ref] = (slot, task, attempt)

    def _restart(self, slot: int, reason: str) -> None:
        import ray

        self.restarts += 1
        self.last_death = reason
        if self.restarts > self.max_restarts:
            raise EvomergeError(
                f"search workers died {self.restarts} times (executor.max_restarts = {self.max_restarts}); "
                f"last reason: {reason}"
            )
        try:
            ray.kill(self._actors[slot], no_restart=True)
        except Exception:
            pass
        self._actors[slot] = self._new_actor(slot)

    def poll(self, timeout: float | None = None) -> list[Outcome]:
        import ray

        self._dispatch()
        if not self._running:
            if timeout:
                time.sleep(min(timeout, 0.01))
            return []
        ready, _ = ray.wait(list(self._running), num_returns=1, timeout=timeout)
        if ready:  # collect everything else that is done too
            ready, _ = ray.wait(list(self._running), num_returns=len(self._running), timeout=0)
        out: list[Outcome] = []
        for ref in ready:
            slot, task, attempt = self._running.pop(ref)
            try:
                o = ray.get(ref)
                o.attempts = attempt
                self._idle.append(slot)
                out.append(o)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.OutOfMemoryError, ray.exceptions.ObjectLostError) as e:
                reason = death_reason(e)
                self._restart(slot, reason)
                self._idle.append(slot)
                if attempt <= self.max_retries:
                    self._queue.appendleft((task, attempt + 1))
                else:
                    out.append(Outcome(id=task.id, ok=False, worker=f"ray-{slot}", attempts=attempt,
                                       error=f"worker died on each of {attempt} attempts; last: {reason}"))
            except ray.exceptions.RayError as e:  # an exception escaped the worker: not a death
                self._idle.append(slot)
                out.append(Outcome(id=task.id, ok=False, worker=f"ray-{slot}", attempts=attempt,
                                   error=_short(getattr(e, "cause", None) or e)))
        self._dispatch()
        return out

    @property
    def busy(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return len(self._queue)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXC_LINE = re.compile(r"^\s*([A-Za-z_][\w.]*(?:Error|Exception|Exit|Interrupt)): (.*)$")


def _short(e: BaseException) -> str:
    """The innermost ``SomeError: message`` line of a (Ray-wrapped) error, else its first words."""
    lines = _ANSI.sub("", str(e)).splitlines()
    for line in reversed(lines):
        m = _EXC_LINE.match(line)
        if m:
            return f"{m.group(1).rsplit('.', 1)[-1]}: {m.group(2).strip()[:300]}"
    text = " ".join(" ".join(lines).split())
    return f"{type(e).__name__}: {text[:300]}"
