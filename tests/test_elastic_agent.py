"""torch's ``LocalElasticAgent`` on the ``etcd3`` backend, through the situations
torch's own backends are tested in.

Each agent is a process of its own, started by fork, by spawn or as a
subprocess; it builds its handler through torch's rendezvous registry (the
``torchrun.handlers`` entry point), runs its workers (forked: they do not touch
etcd) and reports its ``RunResult`` through a queue. While the agents are
forked, this process holds an open handler of its own (``bystander``), as a
launcher or a test harness does. All agents share the session's etcd; every
test has its own run id.
"""

from __future__ import annotations

import datetime
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import pytest

from helpers import make_handler, wait_for

# Imported here, once: forked agents and their workers inherit them. torch's
# log formatter imports torch._dynamo when it first logs an exception (a failed
# worker, a failed barrier): seconds that each agent would spend again.
torch = pytest.importorskip("torch", reason="needs torch: pip install 'rdzv[torch]'")
torch_dynamo = pytest.importorskip("torch._dynamo")
import torch.distributed as dist  # noqa: E402
import torch.distributed.elastic.utils.store as store_util  # noqa: E402
import torch.distributed.rpc as rpc  # noqa: E402
from torch.distributed.elastic.agent.server.api import WorkerSpec  # noqa: E402
from torch.distributed.elastic.agent.server.local_elastic_agent import (  # noqa: E402
    LocalElasticAgent,
)
from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs  # noqa: E402
from torch.distributed.elastic.rendezvous import RendezvousParameters, registry  # noqa: E402

AGENT_DEADLINE_S = 60.0


# ---------------------------------------------------------------- the workers
def _env(name: str) -> int:
    return int(os.environ[name])


def report_ranks() -> dict[str, int]:
    """What the agent told this worker about its place in the job."""
    return {
        "rank": _env("RANK"),
        "role_rank": _env("ROLE_RANK"),
        "group_rank": _env("GROUP_RANK"),
        "local_rank": _env("LOCAL_RANK"),
        "role_world_size": _env("ROLE_WORLD_SIZE"),
        "world_size": _env("WORLD_SIZE"),
        "restart_count": _env("TORCHELASTIC_RESTART_COUNT"),
        "pid": os.getpid(),
    }


def sum_ranks(wait: float = 0.0, started_dir: str = "") -> dict[str, int]:
    """All-reduce the global ranks over gloo, ``wait`` s after joining the group;
    raise if the sum is wrong. Marks its start in ``started_dir`` if given, as
    ``<agent pid>-<pid>``."""
    # A worker blocked in gloo on a dead peer runs no Python signal handler:
    # the agent's SIGTERM then takes torch's 30 s to turn into a SIGKILL.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if started_dir:
        open(os.path.join(started_dir, f"{os.getppid()}-{os.getpid()}"), "w").close()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=30))
    total = torch.tensor([_env("RANK")])
    time.sleep(wait)
    dist.all_reduce(total)
    dist.destroy_process_group()
    expected = sum(range(_env("WORLD_SIZE")))
    if int(total.item()) != expected:
        raise RuntimeError(f"all_reduce of the ranks gave {int(total.item())}, not {expected}")
    return {**report_ranks(), "sum": int(total.item())}


def fail_rank_one_once() -> dict[str, int]:
    """Global rank 1 dies (SIGKILL) in the first attempt; everyone reports after."""
    if _env("RANK") == 1 and _env("TORCHELASTIC_RESTART_COUNT") == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return report_ranks()


def fail_odd_ranks() -> None:
    """Odd global ranks raise, every attempt; even ones succeed."""
    if _env("RANK") % 2:
        raise RuntimeError("odd ranks fail on purpose")


def sleep_then_rank(seconds: float) -> int:
    time.sleep(seconds)
    return _env("RANK")


def echo(message: str) -> str:
    return message


def rpc_call(message: str) -> str:
    """Rank 0 asks rank 1 to echo ``message`` over torch RPC."""
    rank = _env("RANK")
    name = "caller" if rank == 0 else "callee"
    rpc.init_rpc(name, rank=rank, world_size=_env("WORLD_SIZE"))
    answer = rpc.rpc_sync("callee", echo, args=(message,)) if rank == 0 else ""
    rpc.shutdown()
    return answer


# ------------------------------------------------------------------ the agents
@dataclass
class AgentConf:
    """One agent: its role, workers and the job's rendezvous."""

    endpoint: str
    run_id: str
    entrypoint: str
    local_world_size: int = 2
    args: tuple = ()
    role: str = "default"
    min_nodes: int = 1
    max_nodes: int = 1
    max_restarts: int = 0
    exit_barrier_timeout: float = 10.0
    exit_barrier_fails: bool = False
    log_dir: str = ""
    rdzv_conf: dict[str, Any] = field(default_factory=dict)


def run_agent(conf: AgentConf) -> dict[str, Any]:
    """Run one ``LocalElasticAgent`` to its end; return what it reported."""
    if conf.exit_barrier_fails:

        def failing_barrier(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("the exit barrier fails on purpose")

        store_util.barrier = failing_barrier
    rdzv_conf = {"timeout": 30, "last_call_timeout": 1, "lease_ttl": 2, **conf.rdzv_conf}
    handler = registry.get_rendezvous_handler(RendezvousParameters(
        "etcd3", conf.endpoint, conf.run_id, conf.min_nodes, conf.max_nodes, **rdzv_conf
    ))
    spec = WorkerSpec(
        role=conf.role, local_world_size=conf.local_world_size,
        entrypoint=globals()[conf.entrypoint], args=conf.args, rdzv_handler=handler,
        max_restarts=conf.max_restarts, monitor_interval=0.05,
    )
    agent = LocalElasticAgent(
        spec, DefaultLogsSpecs(log_dir=tempfile.mkdtemp(dir=conf.log_dir)),
        start_method="fork", exit_barrier_timeout=conf.exit_barrier_timeout,
    )
    result = agent.run()
    closed = handler.shutdown()
    return {
        "role": conf.role,
        "state": result.state.name,
        "returns": {int(rank): value for rank, value in result.return_values.items()},
        "failures": {int(rank): f.exitcode for rank, f in result.failures.items()},
        "remaining_restarts": agent._remaining_restarts,
        "closed": closed,
        "lease_id": handler.handler.lease_id,
        "pid": os.getpid(),
    }


def _agent_process(conf: AgentConf, results: Any) -> None:
    # Its own process group, so that killing the agent kills its workers too.
    os.setpgrp()
    results.put(run_agent(conf))


class Agents:
    """Agents of one test, started by fork, by spawn or as subprocesses."""

    def __init__(self, tmp_path: str) -> None:
        self.tmp_path = tmp_path
        self.results = multiprocessing.get_context("spawn").Queue()
        self.procs: list[Any] = []

    def start(self, conf: AgentConf, how: str = "fork") -> Any:
        conf.log_dir = self.tmp_path
        if how == "subprocess":
            proc = subprocess.Popen(
                [sys.executable, __file__, json.dumps(asdict(conf))],
                stdout=subprocess.PIPE, text=True, start_new_session=True,
                cwd=os.path.dirname(__file__),
            )
        else:
            proc = multiprocessing.get_context(how).Process(
                target=_agent_process, args=(conf, self.results)
            )
            proc.start()
        self.procs.append(proc)
        return proc

    def wait(self, count: int) -> list[dict[str, Any]]:
        """The reports of ``count`` agents (forked, spawned or subprocesses)."""
        reports = []
        for proc in self.procs:
            if isinstance(proc, subprocess.Popen):
                out, _ = proc.communicate(timeout=AGENT_DEADLINE_S)
                report = json.loads(out.strip().splitlines()[-1])
                for key in ("returns", "failures"):  # JSON's keys are strings
                    report[key] = {int(rank): value for rank, value in report[key].items()}
                reports.append(report)
        deadline = time.monotonic() + AGENT_DEADLINE_S
        while len(reports) < count:
            reports.append(self.results.get(timeout=max(deadline - time.monotonic(), 0.1)))
        return reports

    def exitcodes(self) -> list[int | None]:
        for proc in self.procs:
            if not isinstance(proc, subprocess.Popen):
                proc.join(AGENT_DEADLINE_S)
        return [p.returncode if isinstance(p, subprocess.Popen) else p.exitcode
                for p in self.procs]

    def kill_when_working(self, proc: Any, started_dir: str) -> None:
        """SIGKILL an agent and its workers once its workers started."""
        pid = proc.pid
        wait_for(lambda: any(name.startswith(f"{pid}-") for name in os.listdir(started_dir)),
                 AGENT_DEADLINE_S, "the agent's workers to start")
        os.killpg(pid, signal.SIGKILL)
        proc.join(10)

    def stop(self) -> None:
        for proc in self.procs:
            alive = proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_alive()
            if alive:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture(scope="module")
def bystander(etcd_endpoint: str) -> Iterator[Any]:
    """A handler of this process, open while the tests fork their agents."""
    handler = make_handler(etcd_endpoint, f"bystander-{os.getpid()}", 1, 1)
    handler.next_rendezvous()
    yield handler
    handler.shutdown()


@pytest.fixture
def agents(tmp_path: Any, bystander: Any) -> Iterator[Agents]:
    made = Agents(str(tmp_path))
    yield made
    made.stop()
    # The bystander's handler still works after all those forks.
    assert bystander.num_nodes_waiting() == 0


def _check_ranks(reports: list[dict[str, Any]], role_sizes: dict[str, int]) -> None:
    """Global ranks 0..W-1, role ranks 0..R-1 per role, each agent's workers
    consecutive in both, one group rank per agent."""
    world = sum(role_sizes.values())
    infos = [info for report in reports for info in report["returns"].values()]
    assert sorted(i["rank"] for i in infos) == list(range(world))
    assert {i["world_size"] for i in infos} == {world}
    for role, size in role_sizes.items():
        ranks = [i for r in reports if r["role"] == role for i in r["returns"].values()]
        assert sorted(i["role_rank"] for i in ranks) == list(range(size)), role
        assert {i["role_world_size"] for i in ranks} == {size}, role
    group_ranks = []
    for report in reports:
        mine = report["returns"].values()
        assert len({i["group_rank"] for i in mine}) == 1, report
        group_ranks.append(next(iter(mine))["group_rank"])
        for key in ("rank", "role_rank"):
            values = sorted(i[key] for i in mine)
            assert values == list(range(values[0], values[0] + len(values))), (key, report)
    assert sorted(group_ranks) == list(range(len(reports)))


# ------------------------------------------------------------------- scenarios
def _one_agent(agents: Agents, conf: AgentConf, how: str = "fork") -> dict[str, Any]:
    """Run one agent of a job of its own to its end; return its report."""
    agents.start(conf, how)
    (report,) = agents.wait(1)
    return report


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["fork", "spawn", "subprocess"])
def test_one_agent_runs_its_workers(
    agents: Agents, etcd_endpoint: str, run_id: str, how: str
) -> None:
    report = _one_agent(agents, AgentConf(etcd_endpoint, run_id, "sum_ranks"), how)
    assert report["state"] == "SUCCEEDED", report
    assert sorted(report["returns"]) == [0, 1]
    assert {r["sum"] for r in report["returns"].values()} == {1}


@pytest.mark.timeout(120)
def test_failed_workers_fail_the_agent_after_its_restarts(
    agents: Agents, etcd_endpoint: str, run_id: str
) -> None:
    report = _one_agent(
        agents, AgentConf(etcd_endpoint, run_id, "fail_odd_ranks", 4, max_restarts=1)
    )
    assert report["state"] == "FAILED", report
    assert report["remaining_restarts"] == 0
    assert set(report["failures"]) <= {1, 3} and report["failures"], report


@pytest.mark.timeout(120)
def test_a_failed_worker_restarts_the_group(
    agents: Agents, etcd_endpoint: str, run_id: str
) -> None:
    report = _one_agent(
        agents, AgentConf(etcd_endpoint, run_id, "fail_rank_one_once", 2, max_restarts=1)
    )
    assert report["state"] == "SUCCEEDED", report
    assert {r["restart_count"] for r in report["returns"].values()} == {1}
    assert report["remaining_restarts"] == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("layout", ["homogeneous", "heterogeneous"])
def test_ranks_across_roles_and_agents(
    agents: Agents, etcd_endpoint: str, run_id: str, layout: str
) -> None:
    sizes = {
        "homogeneous": [("master", 1), ("trainer", 2), ("trainer", 2), ("ps", 1), ("ps", 1)],
        "heterogeneous": [("master", 3), ("trainer", 1), ("trainer", 2), ("ps", 2)],
    }[layout]
    for role, local_world_size in sizes:
        agents.start(AgentConf(
            etcd_endpoint, run_id, "report_ranks", local_world_size, role=role,
            min_nodes=len(sizes), max_nodes=len(sizes),
        ))
    reports = agents.wait(len(sizes))
    assert {r["state"] for r in reports} == {"SUCCEEDED"}, reports
    role_sizes: dict[str, int] = {}
    for role, local_world_size in sizes:
        role_sizes[role] = role_sizes.get(role, 0) + local_world_size
    _check_ranks(reports, role_sizes)


def _two_agents_and_one_killed_at_work(
    agents: Agents, etcd_endpoint: str, run_id: str, tmp_path: Any, min_nodes: int
) -> AgentConf:
    """Start two agents of a job of up to two nodes (two restarts each) whose workers
    sum their ranks 1 s after joining the group; SIGKILL the second agent and its
    workers once they started. Returns the job's ``AgentConf``."""
    conf = AgentConf(
        etcd_endpoint, run_id, "sum_ranks", 2, args=(1.0, str(tmp_path)),
        min_nodes=min_nodes, max_nodes=2, max_restarts=2,
    )
    agents.start(conf)
    doomed = agents.start(conf)
    agents.kill_when_working(doomed, str(tmp_path))
    return conf


@pytest.mark.timeout(120)
def test_a_dead_agent_is_replaced(
    agents: Agents, etcd_endpoint: str, run_id: str, tmp_path: Any
) -> None:
    # The agent dies with its workers in the group; the survivor's workers fail,
    # and it starts them again in a round with the replacement.
    conf = _two_agents_and_one_killed_at_work(agents, etcd_endpoint, run_id, tmp_path, 2)
    agents.start(conf)
    reports = agents.wait(2)
    assert [r["state"] for r in reports] == ["SUCCEEDED"] * 2, reports
    assert {r["sum"] for report in reports for r in report["returns"].values()} == {6}
    codes = agents.exitcodes()
    assert codes[1] == -signal.SIGKILL and codes[0] == codes[2] == 0, codes


@pytest.mark.timeout(120)
def test_a_dead_agent_leaves_a_smaller_job(
    agents: Agents, etcd_endpoint: str, run_id: str, tmp_path: Any
) -> None:
    _two_agents_and_one_killed_at_work(agents, etcd_endpoint, run_id, tmp_path, 1)
    (report,) = agents.wait(1)
    assert report["state"] == "SUCCEEDED", report
    assert {r["world_size"] for r in report["returns"].values()} == {2}
    assert agents.exitcodes() == [0, -signal.SIGKILL]


@pytest.mark.timeout(120)
def test_torch_rpc_between_the_agents_workers(
    agents: Agents, etcd_endpoint: str, run_id: str
) -> None:
    pytest.importorskip("numpy", reason="torch RPC's set-up needs numpy: pip install numpy")
    for role in ("caller", "callee"):
        agents.start(AgentConf(
            etcd_endpoint, run_id, "rpc_call", 1, args=("over rpc",), role=role,
            min_nodes=2, max_nodes=2,
        ))
    reports = agents.wait(2)
    assert {r["state"] for r in reports} == {"SUCCEEDED"}, reports
    answers = {value for r in reports for value in r["returns"].values()}
    assert answers == {"over rpc", ""}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("exit_barrier_timeout", [6.0, 0.2], ids=["waits", "times_out"])
def test_workers_that_end_apart(
    agents: Agents, etcd_endpoint: str, run_id: str, exit_barrier_timeout: float
) -> None:
    # One agent's worker ends 1.5 s after the other's: the exit barrier waits for
    # it, or times out; either way both agents succeed.
    for seconds in (0.0, 1.5):
        agents.start(AgentConf(
            etcd_endpoint, run_id, "sleep_then_rank", 1, args=(seconds,), min_nodes=2,
            max_nodes=2, exit_barrier_timeout=exit_barrier_timeout,
        ))
    reports = agents.wait(2)
    assert {r["state"] for r in reports} == {"SUCCEEDED"}, reports
    for report in reports:
        assert all(rank == value for rank, value in report["returns"].items()), report


@pytest.mark.timeout(120)
def test_a_failed_exit_barrier_does_not_fail_the_job(
    agents: Agents, etcd_endpoint: str, run_id: str
) -> None:
    report = _one_agent(
        agents, AgentConf(etcd_endpoint, run_id, "report_ranks", 1, exit_barrier_fails=True)
    )
    assert report["state"] == "SUCCEEDED", report


@pytest.mark.timeout(120)
def test_shutdown_closes_the_run_and_frees_the_node(
    agents: Agents, etcd_endpoint: str, run_id: str, etcd_server: Any
) -> None:
    report = _one_agent(agents, AgentConf(etcd_endpoint, run_id, "report_ranks", 2))
    assert report["state"] == "SUCCEEDED" and report["closed"] is True, report
    observer = etcd_server.get_rdzv_client()
    try:
        assert observer.lease_time_to_live(report["lease_id"]) == -1
    finally:
        observer.close()
    late = make_handler(etcd_endpoint, run_id, 1, 1)
    try:
        assert late.is_closed()
    finally:
        late.shutdown()
    # No worker outlives its agent.
    for info in report["returns"].values():
        with pytest.raises(ProcessLookupError):
            os.kill(info["pid"], 0)


if __name__ == "__main__":
    # An agent as a subprocess: the configuration as JSON, the report on stdout.
    _conf = json.loads(sys.argv[1])
    _conf["args"] = tuple(_conf["args"])
    print(json.dumps(run_agent(AgentConf(**_conf))), flush=True)
