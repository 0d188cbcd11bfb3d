"""Recovery of an elastic torchrun job from a hung or crashed host: rdzv against torch.

Three real ``torchrun`` agents (``--nnodes=2:3 --nproc-per-node=1
--monitor-interval=0.5 --max-restarts=3``), each with one worker running a gloo
``all_reduce`` every 0.2 s, form a world of 3. Then one host fails:

``hang``
    its agent and its worker are stopped (SIGSTOP on both process groups: torch
    starts each worker in a session of its own). Nothing closes their sockets,
    as when a kernel is stuck or a NIC, a cable or a switch port dies.
``crash``
    both are killed (SIGKILL): their sockets close, and the survivors'
    collectives fail at once.

The clock runs from the fault until both survivors' new workers have completed
an ``all_reduce`` in a world of 2, split into:

``detection``
    until both survivors' old workers are gone (their agent was told and
    stopped them, or their collective failed);
``re-rendezvous``
    until both new workers' processes started (the agents' rendezvous and the
    spawn);
``worker start``
    until both completed their first ``all_reduce`` in the new world (Python,
    torch's import, the process group).

Backends, all on this machine, one after the other:

``rdzv``
    ``--rdzv-backend=etcd3`` on an etcd started here (``lease_ttl=3``,
    ``last_call_timeout=1``).
``c10d``
    torch's ``c10d`` backend on a TCPStore started here (so the failed host
    never holds it), ``last_call_timeout=1``.
``etcd-v2``
    torch's ``etcd-v2`` backend on the same etcd's v2 API (``--enable-v2``), if
    ``python-etcd`` is installed, ``last_call_timeout=1``.

Each (backend, fault) pair runs ``--repeats`` times (median and min-max are
reported), with ``--limit`` seconds for the recovery; a pair whose first try
passes the limit is not tried again (it is reported as not recovered).

Usage::

    python benchmarks/recovery.py                       # all, 3 repeats, 120 s limit
    python benchmarks/recovery.py --backends rdzv --faults hang --repeats 1
    python benchmarks/recovery.py --append              # also append to RESULTS.md

The same file is the workers' script (``--worker``).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "RESULTS.md")
BACKENDS = ("rdzv", "c10d", "etcd-v2")
FAULTS = ("hang", "crash")
LEASE_TTL = 3
LAST_CALL = 1
MONITOR_INTERVAL = 0.5
FORM_TIMEOUT = 120.0
PHASES = ("detection", "re-rendezvous", "worker start")


# ------------------------------------------------------------------ the worker
def worker(out_dir: str) -> None:
    """One torchrun worker: all_reduce every 0.2 s; say when it runs, and when it fails."""
    started = time.monotonic()
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    tensor = torch.ones(1)
    dist.all_reduce(tensor)
    record = {
        "pid": os.getpid(),
        "agent_pid": os.getppid(),
        "group_rank": int(os.environ["GROUP_RANK"]),
        "world_size": dist.get_world_size(),
        "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")),
        "started": started,
        "running": time.monotonic(),
    }
    _write(out_dir, f"running-{os.getpid()}.json", record)
    # No SIGTERM handler: the agent's SIGTERM ends a worker blocked in a
    # collective at once, as it would a real job's.
    try:
        while True:
            time.sleep(0.2)
            dist.all_reduce(tensor)
    except Exception as err:  # a peer is gone: the agent restarts the group
        _write(out_dir, f"failed-{os.getpid()}.json", {"at": time.monotonic(), "error": str(err)})
        sys.exit(1)


def _write(out_dir: str, name: str, record: dict[str, Any]) -> None:
    path = os.path.join(out_dir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------ the job
def _torchrun() -> list[str]:
    script = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "torch.distributed.run"]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def _workers_of(out_dir: str) -> list[int]:
    """Pids of the worker processes started with ``--worker out_dir``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"--worker" in args and os.fsencode(out_dir) in args:
            pids.append(int(entry))
    return pids


class Job:
    """Three torchrun agents of one run, their logs and their workers' records."""

    def __init__(self, backend: str, endpoint: str, out_dir: str) -> None:
        self.out_dir = out_dir
        run_id = f"recovery-{uuid.uuid4().hex[:8]}"
        conf = {
            "rdzv": f"lease_ttl={LEASE_TTL},last_call_timeout={LAST_CALL}",
            "c10d": f"last_call_timeout={LAST_CALL},is_host=false",
            "etcd-v2": f"last_call_timeout={LAST_CALL}",
        }[backend]
        args = [
            "--nnodes=2:3", "--nproc-per-node=1", f"--monitor-interval={MONITOR_INTERVAL}",
            "--max-restarts=3", f"--rdzv-backend={'etcd3' if backend == 'rdzv' else backend}",
            f"--rdzv-endpoint={endpoint}", f"--rdzv-id={run_id}", f"--rdzv-conf={conf}",
            os.path.abspath(__file__), "--worker", out_dir,
        ]  # fmt: skip
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", LOGLEVEL="WARNING")
        self.agents = []
        for i in range(3):
            with open(os.path.join(out_dir, f"agent-{i}.log"), "w") as log:
                self.agents.append(subprocess.Popen(
                    [*_torchrun(), *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,
                ))  # fmt: skip

    def running(self) -> list[dict[str, Any]]:
        records = []
        for path in glob.glob(os.path.join(self.out_dir, "running-*.json")):
            with open(path) as f:
                records.append(json.load(f))
        return records

    def wait_for(self, condition: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = condition()
            if found:
                return found
            time.sleep(0.02)
        return None

    def log_tail(self) -> str:
        tails = []
        for i in range(len(self.agents)):
            with open(os.path.join(self.out_dir, f"agent-{i}.log"), errors="replace") as f:
                tails.append(f"--- agent {i}\n" + f.read()[-1500:])
        return "\n".join(tails)

    def stop(self) -> None:
        """Kill every agent and worker of the job (stopped ones too).

        Workers run in sessions of their own, and one that never got as far as
        its record (blocked in a rendezvous that a torch backend never re-formed)
        is found by its command line, which names this job's folder.
        """
        pids = [a.pid for a in self.agents] + [r["pid"] for r in self.running()]
        pids += _workers_of(self.out_dir)
        for pid in pids:
            _signal_group(pid, signal.SIGKILL)
            _signal_group(pid, signal.SIGCONT)
        for agent in self.agents:
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                pass


def trial(backend: str, fault: str, endpoint: str, limit: float) -> dict[str, float] | str:
    """One fault and recovery; the phases' seconds, or why there is no figure."""
    out_dir = tempfile.mkdtemp(prefix=f"rdzv-recovery-{backend}-")
    job = Job(backend, endpoint, out_dir)
    try:
        def world_of(size: int, since: float) -> list[dict[str, Any]] | None:
            latest: dict[int, dict[str, Any]] = {}
            for r in job.running():
                if r["started"] >= since and r["world_size"] == size and _alive(r["pid"]):
                    latest[r["agent_pid"]] = r
            return list(latest.values()) if len(latest) == size else None

        formed = job.wait_for(lambda: world_of(3, 0.0), FORM_TIMEOUT)
        if not formed:
            return f"no world of 3 within {FORM_TIMEOUT:g} s\n{job.log_tail()}"
        victim = next(r for r in formed if r["group_rank"] == 1)
        survivors = [r for r in formed if r is not victim]
        sig = signal.SIGSTOP if fault == "hang" else signal.SIGKILL
        fault_at = time.monotonic()
        _signal_group(victim["agent_pid"], sig)
        _signal_group(victim["pid"], sig)
        gone: dict[int, float] = {}

        def recovered() -> list[dict[str, Any]] | None:
            now = time.monotonic()
            for r in survivors:
                if r["pid"] not in gone and not _alive(r["pid"]):
                    gone[r["pid"]] = now
            new = world_of(2, fault_at)
            if new and {r["agent_pid"] for r in new} == {r["agent_pid"] for r in survivors}:
                return new
            return None

        new = job.wait_for(recovered, limit)
        if not new:
            if os.environ.get("RECOVERY_LOGS"):
                print(job.log_tail())
            return f"not within {limit:g} s"
        detected = max(gone.get(r["pid"], min(n["started"] for n in new)) for r in survivors)
        spawned = max(r["started"] for r in new)
        running = max(r["running"] for r in new)
        return {
            "total": running - fault_at,
            "detection": detected - fault_at,
            "re-rendezvous": spawned - detected,
            "worker start": running - spawned,
        }
    finally:
        job.stop()
        shutil.rmtree(out_dir, ignore_errors=True)


# --------------------------------------------------------------- the harness
def _fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def table(results: dict[tuple[str, str], list[Any]], limit: float) -> str:
    lines = [
        "| backend | fault | recovered in, s | detection | re-rendezvous | worker start | tries |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (backend, fault), tries in results.items():
        ok = [t for t in tries if isinstance(t, dict)]
        failed = len(tries) - len(ok)
        if not ok:
            lines.append(f"| {backend} | {fault} | not within {limit:g} s | | | | "
                         f"0 of {len(tries)} |")
            continue
        cells = [_fmt([t[k] for t in ok]) for k in ("total", *PHASES)]
        note = f"{len(ok)} of {len(tries)}" + (f" ({failed} not within {limit:g} s)"
                                                 if failed else "")
        lines.append(f"| {backend} | {fault} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


def _version(name: str) -> str:
    try:
        import importlib.metadata

        return importlib.metadata.version(name)
    except Exception:
        return "not installed"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--faults", default=",".join(FAULTS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=float, default=120.0,
                        help="seconds a recovery may take before it counts as none")
    parser.add_argument("--append", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    faults = [f for f in args.faults.split(",") if f]
    for name, given, known in (("backend", backends, BACKENDS), ("fault", faults, FAULTS)):
        unknown = set(given) - set(known)
        if unknown:
            parser.error(f"unknown {name}(s) {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(known)}")
    if "etcd-v2" in backends and importlib.util.find_spec("etcd") is None:
        print("etcd-v2 skipped: python-etcd is not installed (pip install python-etcd)")
        backends.remove("etcd-v2")

    import torch.distributed as dist

    from rdzv.api import free_port
    from rdzv.etcd_server import EtcdServer

    started = datetime.datetime.now(datetime.timezone.utc)
    load = os.getloadavg()
    results: dict[tuple[str, str], list[Any]] = {}
    with EtcdServer(enable_v2=True) as server:
        for backend in backends:
            for fault in faults:
                tries: list[Any] = []
                results[(backend, fault)] = tries
                for i in range(args.repeats):
                    store = None
                    endpoint = server.get_endpoint()
                    if backend == "c10d":
                        port = free_port()
                        store = dist.TCPStore("127.0.0.1", port, is_master=True,
                                              wait_for_workers=False)
                        endpoint = f"127.0.0.1:{port}"
                    outcome = trial(backend, fault, endpoint, args.limit)
                    del store
                    if isinstance(outcome, str) and outcome.startswith("no world"):
                        print(f"{backend} {fault} try {i + 1}: {outcome}")
                        continue
                    tries.append(outcome)
                    shown = (outcome if isinstance(outcome, str) else
                             ", ".join(f"{k} {v:.1f} s" for k, v in outcome.items()))
                    print(f"{backend} {fault} try {i + 1}: {shown}", flush=True)
                    if isinstance(outcome, str):
                        break  # past the limit once: not worth the minutes again
    wall = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
    section = "\n".join([
        f"## `recovery.py`: a hung or crashed host under torchrun, {started:%Y-%m-%d %H:%M} UTC",
        "",
        f"`python benchmarks/recovery.py {' '.join(sys.argv[1:])}`".replace(" `", "`"),
        "",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}; load average at start {load[0]:.2f} "
        f"(1 min); whole run {wall / 60:.1f} min",
        f"- torch {_version('torch')}, python-etcd {_version('python-etcd')}; 3 agents "
        f"`--nnodes=2:3 --nproc-per-node=1 --monitor-interval={MONITOR_INTERVAL}`, one gloo "
        f"worker each (all_reduce every 0.2 s); rdzv `lease_ttl={LEASE_TTL}`, all "
        f"`last_call_timeout={LAST_CALL}`; the failed host is group rank 1",
        "",
        table(results, args.limit),
        "",
        "Seconds from the fault until both survivors' new workers completed an all_reduce "
        "in a world of 2: median (min-max).",
        "",
    ])
    print()
    print(section)
    if args.append:
        with open(RESULTS, "a") as f:
            f.write("\n" + section)


if __name__ == "__main__":
    main()
