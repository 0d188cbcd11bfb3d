"""Forks of a busy process: does every child complete a rendezvous of its own?

```
python benchmarks/fork_safety.py                       # 200 forks, 8 busy handlers
python benchmarks/fork_safety.py --forks 500 --append  # and append the table to RESULTS.md
```

A parent process holds one idle handler (after a round: its lease kept alive,
its state watch open) and ``--busy`` handlers in threads, each completing rounds
of its own one-node run without pause, so that gRPC calls, the shared watch
stream and the keep-alive stream are in flight when it forks. It forks ``--forks``
children one after the other (``multiprocessing``'s fork context); each child
creates a handler, completes one round of a run of its own and exits. A child
is classified by how it ends: ``ok`` (round completed), ``error`` (an exception),
``crash`` (killed by a signal, such as gRPC's abort), ``hang`` (no answer in
``--child-limit`` seconds; killed; a parent stops forking after 3 hangs). The
parent runs once with gRPC's default
settings and once with ``GRPC_ENABLE_FORK_SUPPORT=1``, each in a fresh process,
against one etcd started by the script. The busy handlers' rounds and errors
during the forks are counted too: the parent must not notice its children.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

from rdzv.api import RendezvousParameters
from rdzv.etcd_rendezvous import create_rdzv_handler
from rdzv.etcd_server import EtcdServer

_MAX_HANGS = 3
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def _handler(endpoint: str) -> Any:
    params = RendezvousParameters(
        "etcd3", endpoint, str(uuid.uuid4()), 1, 1, timeout=20, last_call_timeout=1
    )
    return create_rdzv_handler(params)


def _child(endpoint: str, answer: Any) -> None:
    start = time.monotonic()
    handler = _handler(endpoint)
    info = handler.next_rendezvous()
    handler.shutdown()
    answer.send((info.rank, info.world_size, time.monotonic() - start))


def _parent(endpoint: str, forks: int, busy: int, child_limit: float) -> dict[str, Any]:
    """One parent process's run; returns its counts as a dict."""
    fork = multiprocessing.get_context("fork")
    stop = threading.Event()
    rounds = [0] * busy
    busy_errors: list[str] = []

    def keep_busy(i: int) -> None:
        handler = _handler(endpoint)
        while not stop.is_set():
            try:
                handler.next_rendezvous()
                rounds[i] += 1
            except Exception as err:  # counted and shown
                busy_errors.append(f"{type(err).__name__}: {err}")
        handler.shutdown()

    # One more handler, idle after a round: its lease and state watch stay open.
    idle = _handler(endpoint)
    idle.next_rendezvous()
    threads = [threading.Thread(target=keep_busy, args=(i,)) for i in range(busy)]
    for thread in threads:
        thread.start()
    while busy and min(rounds) == 0:
        time.sleep(0.01)
    outcomes = {"ok": 0, "error": 0, "crash": 0, "hang": 0}
    signals: dict[str, int] = {}
    times: list[float] = []
    for _ in range(forks):
        if outcomes["hang"] >= _MAX_HANGS:
            break
        receiver, sender = fork.Pipe(duplex=False)
        child = fork.Process(target=_child, args=(endpoint, sender), daemon=True)
        child.start()
        sender.close()
        answered = receiver.poll(child_limit)
        if answered:
            try:
                times.append(receiver.recv()[2])
            except EOFError:
                answered = False
        child.join(None if answered else 5)
        if child.is_alive():
            child.kill()
            child.join()
            outcomes["hang"] += 1
        elif child.exitcode is not None and child.exitcode < 0:
            outcomes["crash"] += 1
            name = f"signal {-child.exitcode}"
            signals[name] = signals.get(name, 0) + 1
        elif answered and child.exitcode == 0:
            outcomes["ok"] += 1
        else:
            outcomes["error"] += 1
        receiver.close()
    stop.set()
    for thread in threads:
        thread.join()
    idle.shutdown()
    return {
        **outcomes, "signals": signals, "times": times,
        "busy_rounds": sum(rounds), "busy_errors": busy_errors[:3], "busy_error_count":
        len(busy_errors),
    }


def _run_parent(endpoint: str, args: argparse.Namespace, fork_support: bool) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("GRPC_ENABLE_FORK_SUPPORT", None)
    if fork_support:
        env["GRPC_ENABLE_FORK_SUPPORT"] = "1"
    out = subprocess.run(
        [sys.executable, __file__, "--parent", endpoint, "--forks", str(args.forks),
         "--busy", str(args.busy), "--child-limit", str(args.child_limit)],
        env=env, capture_output=True, text=True, check=False,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"failed": f"parent exited with {out.returncode}: {out.stderr[-800:]}"}
    return json.loads(lines[-1])


def _table(rows: list[tuple[str, dict[str, Any]]], args: argparse.Namespace) -> str:
    lines = [
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
        f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{args.forks} forks per parent, {args.busy} busy handlers",
        "",
        "| gRPC fork support | ok | error | crash | hang | child round s, median (p10-p90) "
        "| parent's busy rounds | parent's errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in rows:
        if "failed" in result:
            lines.append(f"| {name} | {result['failed']} |||||||")
            continue
        times = sorted(result["times"])
        if times:
            tenth = times[len(times) // 10]
            ninetieth = times[min(len(times) - 1, len(times) * 9 // 10)]
            spread = f"{statistics.median(times):.3f} ({tenth:.3f}-{ninetieth:.3f})"
        else:
            spread = "-"
        crash = str(result["crash"])
        if result["signals"]:
            crash += " (" + ", ".join(f"{k}: {v}" for k, v in result["signals"].items()) + ")"
        lines.append(
            f"| {name} | {result['ok']} | {result['error']} | {crash} | {result['hang']} | "
            f"{spread} | {result['busy_rounds']} | {result['busy_error_count']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--forks", type=int, default=200)
    parser.add_argument("--busy", type=int, default=8)
    parser.add_argument("--child-limit", type=float, default=15.0)
    parser.add_argument("--append", action="store_true", help="append the table to RESULTS.md")
    parser.add_argument("--parent", metavar="ENDPOINT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.parent:
        print(json.dumps(_parent(args.parent, args.forks, args.busy, args.child_limit)))
        return
    with EtcdServer() as server:
        endpoint = server.get_endpoint()
        rows = [
            ("default", _run_parent(endpoint, args, fork_support=False)),
            ("GRPC_ENABLE_FORK_SUPPORT=1", _run_parent(endpoint, args, fork_support=True)),
        ]
    table = _table(rows, args)
    print(table)
    for name, result in rows:
        for error in result.get("busy_errors", []):
            print(f"{name}: parent's error: {error}")
    if args.append:
        with open(RESULTS, "a") as f:
            f.write(f"\n## Forks of a busy process (`fork_safety.py`)\n\n{table}\n")


if __name__ == "__main__":
    main()
