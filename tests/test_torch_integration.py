"""rdzv inside torch: the Store and handler adapters, and the real torchrun on etcd3.

The end-to-end tests start real ``torchrun`` agents (``--rdzv-backend=etcd3``,
found through the ``torchrun.handlers`` entry point) as subprocesses against
the session's etcd. Their workers (``torch_scripts/worker.py``) form a gloo
process group on CPU and write what they saw to JSON files in ``tmp_path``.
"""

from __future__ import annotations

import datetime
import glob
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from helpers import wait_for

needs_torch = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="needs torch: pip install 'rdzv[torch]'"
)

WORKER = os.path.join(os.path.dirname(__file__), "torch_scripts", "worker.py")
AGENT_TIMEOUT_S = 120.0


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )


# ----------------------------------------------------------- without torch
def test_import_rdzv_does_not_import_torch() -> None:
    done = _python(
        "import sys, rdzv, rdzv.api, rdzv.etcd_rendezvous, rdzv.etcd_store\n"
        "assert 'torch' not in sys.modules, 'importing rdzv imported torch'\n"
    )
    assert done.returncode == 0, done.stderr


def test_rdzv_torch_without_torch_says_how_to_install() -> None:
    done = _python(
        "import sys\n"
        "sys.modules['torch'] = None  # as if torch were not installed\n"
        "try:\n"
        "    import rdzv.torch\n"
        "except ImportError as err:\n"
        "    print(err)\n"
        "else:\n"
        "    raise SystemExit('rdzv.torch imported without torch')\n"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pip install 'rdzv[torch]'" in done.stdout


# ------------------------------------------------------------ the adapters
def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def torch_params(etcd_endpoint: str, run_id: str) -> Any:
    """Builds torch's RendezvousParameters for backend etcd3 of this test's run."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    def make(min_nodes: int = 1, max_nodes: int = 1, **config: Any) -> Any:
        config.setdefault("timeout", 30)
        return RendezvousParameters(
            "etcd3", etcd_endpoint, run_id, min_nodes, max_nodes, **config
        )

    return make


@needs_torch
def test_entry_point_registers_etcd3(torch_params: Any, handlers: list[Any]) -> None:
    from torch.distributed.elastic.rendezvous import RendezvousInfo, RendezvousStoreInfo
    from torch.distributed.elastic.rendezvous.registry import get_rendezvous_handler

    from rdzv.torch import TorchEtcdRendezvousHandler, TorchEtcdStore

    handler = get_rendezvous_handler(torch_params())
    handlers.append(handler)
    assert isinstance(handler, TorchEtcdRendezvousHandler)
    assert handler.get_backend() == "etcd3"
    assert handler.use_agent_store is False
    info = handler.next_rendezvous()
    assert type(info) is RendezvousInfo
    assert type(info.bootstrap_store_info) is RendezvousStoreInfo
    assert isinstance(info.store, TorchEtcdStore)
    assert (info.rank, info.world_size) == (0, 1)
    assert handler.num_nodes_waiting() == 0
    # Like torch's backends, shutdown() closes the run: torch's launcher counts on it.
    assert handler.shutdown() is True
    assert handler.shutdown() is True
    later = get_rendezvous_handler(torch_params())
    handlers.append(later)
    assert later.is_closed()


@needs_torch
def test_importing_rdzv_torch_first_still_registers_etcd3() -> None:
    # rdzv.torch imports torch's rendezvous package, which loads the entry points,
    # rdzv.torch among them, while rdzv.torch is still being imported.
    done = _python(
        "import rdzv.torch\n"
        "from torch.distributed.elastic.rendezvous import rendezvous_handler_registry as r\n"
        "r.register('etcd3', rdzv.torch.create_handler)  # raises if another is registered\n"
    )
    assert done.returncode == 0, done.stderr
    assert "Exception while registering" not in done.stderr, done.stderr


@needs_torch
def test_launcher_options_are_accepted(
    etcd_endpoint: str, run_id: str, handlers: list[Any]
) -> None:
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.launcher.api import LaunchConfig

    from rdzv.torch import create_handler

    # What torchrun builds from --rdzv-conf: LaunchConfig adds 'timeout' itself.
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=1, run_id=run_id, rdzv_backend="etcd3",
        rdzv_endpoint=etcd_endpoint, rdzv_configs={"last_call_timeout": "1", "lease_ttl": "5"},
    )
    params = RendezvousParameters(
        backend=config.rdzv_backend, endpoint=config.rdzv_endpoint, run_id=config.run_id,
        min_nodes=config.min_nodes, max_nodes=config.max_nodes, local_addr=config.local_addr,
        **config.rdzv_configs,
    )
    assert set(params.config) == {"last_call_timeout", "lease_ttl", "timeout"}
    handlers.append(create_handler(params))
    with pytest.raises(ValueError, match="no_such_option"):
        create_handler(RendezvousParameters("etcd3", etcd_endpoint, run_id, 1, 1, no_such_option=1))


@needs_torch
def test_errors_are_torchs(torch_params: Any, handlers: list[Any]) -> None:
    from torch.distributed.elastic import rendezvous as torch_rdzv
    from torch.distributed.elastic.rendezvous import RendezvousParameters

    import rdzv.api
    from rdzv.torch import create_handler

    alone = create_handler(torch_params(2, 2, timeout=0.5))
    handlers.append(alone)
    with pytest.raises(torch_rdzv.RendezvousTimeoutError) as timed_out:
        alone.next_rendezvous()
    assert isinstance(timed_out.value.__cause__, rdzv.api.RendezvousTimeoutError)

    with pytest.raises(torch_rdzv.RendezvousConnectionError):
        create_handler(
            RendezvousParameters("etcd3", f"127.0.0.1:{_closed_port()}", "x", 1, 1,
                                 connect_timeout=0.5)
        )

    handler = create_handler(torch_params())
    handlers.append(handler)
    handler.set_closed()
    assert handler.is_closed()
    with pytest.raises(torch_rdzv.RendezvousClosedError) as closed:
        handler.next_rendezvous()
    assert isinstance(closed.value.__cause__, rdzv.api.RendezvousClosedError)


@needs_torch
def test_store_under_torchs_callers(torch_params: Any, handlers: list[Any]) -> None:
    import torch.distributed as dist
    from torch.distributed.elastic.utils import store as store_util

    from rdzv.torch import create_handler

    handler = create_handler(torch_params())
    handlers.append(handler)
    store = handler.next_rendezvous().store
    prefixed = dist.PrefixStore("agent/", store)
    for s in (store, prefixed):
        s.set("k", "v")
        assert s.get("k") == b"v"
        assert s.add("n", 2) == 2 and s.add("n", 3) == 5
        assert s.compare_set("c", "", "x") == b"x"
        assert s.compare_set("c", "y", "z") == b"x"
        s.multi_set(["a", "b"], [b"1", "2"])
        assert s.multi_get(["a", "b"]) == [b"1", b"2"]
        assert s.check(["a", "b"]) and not s.check(["missing"])
        s.wait(["a"], datetime.timedelta(seconds=1))
        assert s.delete_key("a") and not s.delete_key("a")
        s.append("log", b"x")
        s.append("log", b"y")
        assert s.get("log") == b"xy"
    # num_keys and delete_key reach Python through the trampoline's C++ names.
    assert store.num_keys() == prefixed.num_keys() >= 12
    # A timeout set through the PrefixStore (C++ only) governs the Python store.
    prefixed.set_timeout(datetime.timedelta(seconds=0.2))
    assert store.timeout == datetime.timedelta(seconds=0.2)
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="missing"):
        prefixed.get("missing")
    assert time.monotonic() - started < 5
    prefixed.set_timeout(datetime.timedelta(seconds=10))
    store_util.barrier(store, 1, "barrier/", barrier_timeout=5)
    assert store_util.synchronize(prefixed, b"data", 0, 1, "sync/") == [b"data"]
    assert store.clone().get("k") == b"v"


# ------------------------------------------------------- the real torchrun
def _torchrun() -> list[str]:
    script = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "torch.distributed.run"]


class Agent:
    """One ``torchrun`` agent (a node of the job), in its own process group.

    Args:
        log_path: where its stdout and stderr go.
        args: torchrun's arguments.
        launcher: a command prefix it runs under (a test host's, say).
    """

    def __init__(self, log_path: str, args: list[str], launcher: Sequence[str] = ()) -> None:
        self.log_path = log_path
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", LOGLEVEL="INFO")
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(
                [*launcher, *_torchrun(), *args], stdout=log, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-6000:]

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"torchrun {self.pid} still runs after {timeout:g} s; its log:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL the agent's process group (not its workers: torch starts each
        worker in a session of its own)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def stop(self) -> None:
        """SIGTERM (torchrun then stops its workers), SIGKILL if it lingers."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.pid, signal.SIGTERM)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            self.kill()


class Job:
    """Agents of one elastic job sharing a run id, and their workers' files.

    Args:
        out_dir: where workers write their JSON files and agents their logs.
        endpoint: etcd's endpoint.
        run_id: the job's ``--rdzv-id``.
        nnodes: torchrun's ``--nnodes`` (``"2"`` or ``"2:3"``).
        mode: the worker's mode (see worker.py) and its arguments.
        max_restarts: torchrun's ``--max-restarts``.
        rdzv_conf: torchrun's ``--rdzv-conf``.
    """

    def __init__(
        self, out_dir: str, endpoint: str, run_id: str, nnodes: str, mode: list[str],
        max_restarts: int = 0, rdzv_conf: str = "",
    ) -> None:
        self.out_dir = out_dir
        self.agents: list[Agent] = []
        self._max_restarts = max_restarts
        self._args = [
            f"--nnodes={nnodes}", "--nproc-per-node=2", "--rdzv-backend=etcd3",
            f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}", "--monitor-interval=0.2",
            *([f"--rdzv-conf={rdzv_conf}"] if rdzv_conf else []),
        ]
        self._script = [WORKER, out_dir, *mode]

    def start_agent(
        self, max_restarts: int | None = None, launcher: Sequence[str] = ()
    ) -> Agent:
        """Start one more agent (with its own ``--max-restarts`` if given, under
        ``launcher`` if given)."""
        restarts = self._max_restarts if max_restarts is None else max_restarts
        path = os.path.join(self.out_dir, f"agent-{len(self.agents)}.log")
        args = [*self._args, f"--max-restarts={restarts}", *self._script]
        agent = Agent(path, args, launcher)
        self.agents.append(agent)
        return agent

    def wait_all(self, agents: list[Agent] | None = None, succeed: bool = True) -> None:
        """Assert that every agent (or those given) exits in time, with status 0 (or not)."""
        deadline = time.monotonic() + AGENT_TIMEOUT_S
        for agent in agents if agents is not None else self.agents:
            code = agent.wait(max(deadline - time.monotonic(), 0.1))
            assert (code == 0) == succeed, (
                f"torchrun {agent.pid} exited with {code}; its log:\n{agent.log()}"
            )

    def records(self, pattern: str) -> list[dict[str, Any]]:
        found = []
        for path in glob.glob(os.path.join(self.out_dir, pattern)):
            with open(path) as f:
                found.append(json.load(f))
        return found

    def wait_for_records(self, pattern: str, count: int) -> list[dict[str, Any]]:
        """Poll until ``count`` files match ``pattern``; fail with the agents' logs."""
        try:
            wait_for(lambda: len(self.records(pattern)) >= count, AGENT_TIMEOUT_S, pattern)
        except AssertionError as err:
            logs = "\n".join(f"--- agent {a.pid}\n{a.log()}" for a in self.agents)
            raise AssertionError(f"{err}\n{logs}") from None
        return self.records(pattern)

    def results(self) -> list[dict[str, Any]]:
        return sorted(self.records("result-*.json"), key=lambda r: r["rank"])

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()


@pytest.fixture
def job(tmp_path: Any, etcd_endpoint: str, run_id: str) -> Iterator[Any]:
    """Makes the test's ``Job``; stops whatever agents are left at the end."""
    jobs: list[Job] = []

    def make(nnodes: str, mode: list[str], **kwargs: Any) -> Job:
        made = Job(str(tmp_path), etcd_endpoint, run_id, nnodes, mode, **kwargs)
        jobs.append(made)
        return made

    yield make
    for made in jobs:
        made.stop()


def _assert_world(results: list[dict[str, Any]], nodes: int) -> None:
    workers = 2 * nodes
    assert [r["rank"] for r in results] == list(range(workers)), results
    assert {r["world_size"] for r in results} == {workers}, results
    assert {r["group_world_size"] for r in results} == {nodes}, results
    assert {r["sum"] for r in results} == {sum(range(workers))}, results
    assert len({r["agent_pid"] for r in results}) == nodes, results


@needs_torch
@pytest.mark.timeout(240)
def test_two_agents_all_reduce(job: Any) -> None:
    two = job("2", ["allreduce"])
    two.start_agent()
    two.start_agent()
    two.wait_all()
    results = two.results()
    _assert_world(results, 2)
    assert {r["sum"] for r in results} == {6}
    assert {r["restart_count"] for r in results} == {0}


@needs_torch
@pytest.mark.timeout(240)
def test_failed_worker_restarts_the_group(job: Any) -> None:
    two = job("2", ["fail_once"], max_restarts=1)
    two.start_agent()
    two.start_agent()
    two.wait_all()
    assert os.path.exists(os.path.join(two.out_dir, "failed"))
    results = two.results()
    _assert_world(results, 2)
    # The failed agent used its one restart. The other followed it into the next
    # round either as a membership change (not counted) or because its own
    # workers lost rank 0's TCPStore first (counted): both are fine.
    by_agent = {r["agent_pid"]: r["restart_count"] for r in results}
    assert sorted(by_agent.values()) in ([0, 1], [1, 1]), results


@needs_torch
@pytest.mark.timeout(240)
def test_third_agent_scales_the_job_up(job: Any) -> None:
    # --max-restarts=0: a membership change restarts the workers without using a restart.
    grow = job("2:3", ["grow", "3"], rdzv_conf="last_call_timeout=1")
    grow.start_agent()
    grow.start_agent()
    grow.wait_for_records("running-g2-*.json", 4)
    grow.start_agent()
    grow.wait_all()
    results = grow.results()
    _assert_world(results, 3)
    assert {r["restart_count"] for r in results} == {0}


def _three_agents_training(
    job: Any, victim_group_rank: int, max_restarts: int = 0
) -> tuple[Job, Agent, list[int]]:
    """Three agents of a ``2:3`` job (lease_ttl 3 s, last call 1 s) whose workers
    train until a peer dies, then finish once two nodes are left. Returns the job,
    once every worker runs, with its end released; the agent of group rank
    ``victim_group_rank``; and the pids of that agent's workers."""
    shrink = job(
        "2:3", ["shrink", "2"], max_restarts=max_restarts,
        rdzv_conf="last_call_timeout=1,lease_ttl=3",
    )
    for _ in range(3):
        shrink.start_agent()
    running = shrink.wait_for_records("running-g3-*.json", 6)
    victim_pid = next(r["agent_pid"] for r in running if r["group_rank"] == victim_group_rank)
    victim = next(a for a in shrink.agents if a.pid == victim_pid)
    open(os.path.join(shrink.out_dir, "release"), "w").close()
    return shrink, victim, [r["pid"] for r in running if r["agent_pid"] == victim_pid]


@needs_torch
@pytest.mark.timeout(240)
def test_hung_agent_is_dropped_without_a_restart(job: Any) -> None:
    """A hung host (its agent and workers SIGSTOPped: no socket closes, the others'
    collectives would block until gloo's timeout, 60 s here) is reported by
    num_nodes_waiting() within lease_ttl + 1 s: the survivors' agents re-form the
    job without it as a membership change (--max-restarts=0, restart count 0)."""
    shrink, victim, victim_workers = _three_agents_training(job, victim_group_rank=1)
    victim_pid = victim.pid
    survivors = [a for a in shrink.agents if a is not victim]
    hung_at = time.monotonic()
    for pid in (victim_pid, *victim_workers):
        os.killpg(pid, signal.SIGSTOP)
    try:
        shrink.wait_all(survivors)
        elapsed = time.monotonic() - hung_at
    finally:
        for pid in (victim_pid, *victim_workers):
            try:
                os.killpg(pid, signal.SIGKILL)
                os.killpg(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    results = shrink.results()
    _assert_world(results, 2)
    assert victim_pid not in {r["agent_pid"] for r in results}
    assert {r["restart_count"] for r in results} == {0}, results
    # Well before the 60 s the survivors' collectives would have waited.
    assert elapsed < 30, elapsed


@needs_torch
@pytest.mark.timeout(240)
def test_killed_agent_leaves_and_the_rest_finish(job: Any) -> None:
    # Kill the node of group rank 0: it also hosts the workers' TCPStore.
    shrink, victim, victim_workers = _three_agents_training(
        job, victim_group_rank=0, max_restarts=1
    )
    victim_pid = victim.pid
    survivors = [a for a in shrink.agents if a is not victim]
    victim.kill()
    for pid in victim_workers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    shrink.wait_all(survivors)
    results = shrink.results()
    _assert_world(results, 2)
    assert victim_pid not in {r["agent_pid"] for r in results}


@needs_torch
@pytest.mark.timeout(240)
def test_failed_job_closes_the_run_for_the_others(job: Any) -> None:
    # The agent without restarts fails for good at its first failure; its
    # launcher's shutdown() closes the run, so the agent with restarts left fails
    # fast in its next rendezvous instead of waiting torchrun's 900 s rendezvous
    # timeout for its partner. (Three restarts: even if the first agent follows
    # the second into a round or two as a membership change, the second still
    # has a restart left when the first is gone.)
    failing = job("2", ["fail_always"])
    failing.start_agent(max_restarts=0)
    patient = failing.start_agent(max_restarts=3)
    failing.wait_all(succeed=False)
    assert "RendezvousClosedError" in patient.log()
