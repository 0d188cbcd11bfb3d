"""A torchrun worker for the end-to-end tests: gloo on CPU, results as JSON files.

Usage: ``worker.py OUT_DIR MODE [FINAL_NODES]``. Every mode ends the same way: it
``all_reduce``s the worker's global rank and writes ``OUT_DIR/result-<rank>.json``
(ranks, world sizes, restart count, the sum). Before that:

- ``allreduce``: nothing.
- ``fail_once``: global rank 1 raises once per job (the first to create
  ``OUT_DIR/failed`` does), before joining the process group.
- ``grow``: while the job has fewer than FINAL_NODES nodes, write
  ``OUT_DIR/running-g<nodes>-r<rank>.json`` and stay alive, waiting for the agent
  to restart the workers into a bigger world.
- ``shrink``: unless the job has FINAL_NODES nodes and ``OUT_DIR/release``
  exists, write the same marker and run ``all_reduce`` steps until a peer dies.
- ``fail_always``: join the process group; global rank 0 raises, the others
  fail in ``all_reduce`` when it is gone. Every attempt fails.

Waits end at a deadline with exit status 3, so that a stuck test fails
instead of leaving workers behind.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

DEADLINE_S = 90.0
STEP_S = 0.05


def _env(name: str) -> int:
    return int(os.environ[name])


def _write_json(path: str, record: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, path)


def _record() -> dict:
    return {
        "rank": _env("RANK"),
        "world_size": _env("WORLD_SIZE"),
        "group_rank": _env("GROUP_RANK"),
        "group_world_size": _env("GROUP_WORLD_SIZE"),
        "local_rank": _env("LOCAL_RANK"),
        "restart_count": _env("TORCHELASTIC_RESTART_COUNT"),
        "pid": os.getpid(),
        "agent_pid": os.getppid(),
        "host": socket.gethostname(),
        "master_addr": os.environ["MASTER_ADDR"],
    }


def _mark_running(out_dir: str) -> None:
    record = _record()
    name = f"running-g{record['group_world_size']}-r{record['rank']}.json"
    _write_json(os.path.join(out_dir, name), record)


def _init() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))


def _stay_until_restarted(out_dir: str) -> int:
    _mark_running(out_dir)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        time.sleep(STEP_S)
    print("worker: the agent never restarted this worker", file=sys.stderr)
    return 3


def _train_until_a_peer_dies(out_dir: str) -> int:
    _init()
    _mark_running(out_dir)
    deadline = time.monotonic() + DEADLINE_S
    step = torch.ones(1)
    while time.monotonic() < deadline:
        dist.all_reduce(step)  # raises once a peer's process is gone
        time.sleep(STEP_S)
    print("worker: no peer died before the deadline", file=sys.stderr)
    return 3


def _finish(out_dir: str) -> int:
    if not dist.is_initialized():
        _init()
    record = _record()
    total = torch.tensor([record["rank"]], dtype=torch.int64)
    dist.all_reduce(total)
    record["sum"] = int(total.item())
    _write_json(os.path.join(out_dir, f"result-{record['rank']}.json"), record)
    dist.destroy_process_group()
    return 0


def main(argv: list[str]) -> int:
    out_dir, mode = argv[0], argv[1]
    final_nodes = int(argv[2]) if len(argv) > 2 else 0
    nodes = _env("GROUP_WORLD_SIZE")
    if mode == "fail_once" and _env("RANK") == 1:
        try:
            fd = os.open(os.path.join(out_dir, "failed"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            raise RuntimeError("worker: rank 1 fails on purpose, once")
    elif mode == "grow" and nodes < final_nodes:
        return _stay_until_restarted(out_dir)
    elif mode == "shrink":
        released = os.path.exists(os.path.join(out_dir, "release"))
        if not (released and nodes == final_nodes):
            return _train_until_a_peer_dies(out_dir)
    elif mode == "fail_always":
        _init()
        if _env("RANK") == 0:
            raise RuntimeError("worker: rank 0 fails on purpose, every time")
        dist.all_reduce(torch.ones(1))  # raises once rank 0 is gone
        return 3
    elif mode not in ("allreduce", "fail_once", "grow"):
        raise SystemExit(f"worker: unknown mode {mode!r}")
    return _finish(out_dir)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
