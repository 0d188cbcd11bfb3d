"""Helpers shared by the rendezvous tests: nodes as threads and as processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from rdzv.api import RendezvousParameters
from rdzv.etcd_rendezvous import EtcdRendezvousHandler, create_rdzv_handler

NODE_SCRIPT = os.path.join(os.path.dirname(__file__), "rdzv_node.py")


def make_handler(
    endpoint: str, run_id: str, min_nodes: int, max_nodes: int, **config: Any
) -> EtcdRendezvousHandler:
    config.setdefault("timeout", 60)
    config.setdefault("last_call_timeout", 30)
    return create_rdzv_handler(
        RendezvousParameters("etcd", endpoint, run_id, min_nodes, max_nodes, **config)
    )


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "") -> Any:
    """Poll ``condition`` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.02)


class ThreadNode:
    """``next_rendezvous()`` of one handler, run in a thread."""

    def __init__(self, handler: EtcdRendezvousHandler) -> None:
        self.handler = handler
        self.result: Any = None
        self.finished_at = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> ThreadNode:
        self.result = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.result = self.handler.next_rendezvous()
        except Exception as err:  # the test inspects it
            self.result = err
        self.finished_at = time.monotonic()

    def join(self, timeout: float = 60.0) -> Any:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "next_rendezvous() did not return in time"
        return self.result

    @property
    def done(self) -> bool:
        return self._thread is not None and not self._thread.is_alive()


def run_round(nodes: list[ThreadNode], timeout: float = 60.0) -> list[Any]:
    for node in nodes:
        node.start()
    return [node.join(timeout) for node in nodes]


def assert_one_world(infos: list[Any], size: int) -> None:
    """Guarantee 1 and 2: one world size, ranks exactly 0..size-1."""
    errors = [i for i in infos if isinstance(i, BaseException)]
    assert not errors, errors
    assert {i.world_size for i in infos} == {size}
    assert sorted(i.rank for i in infos) == list(range(size))


class ProcessNode:
    """A node in its own process (see rdzv_node.py), for real kills."""

    def __init__(
        self, endpoint: str, run_id: str, min_nodes: int, max_nodes: int, **config: Any
    ) -> None:
        config.setdefault("timeout", 60)
        config.setdefault("last_call_timeout", 30)
        args = [f"{k}={v}" for k, v in config.items()]
        self.proc = subprocess.Popen(
            [sys.executable, NODE_SCRIPT, endpoint, run_id, str(min_nodes), str(max_nodes), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.node_id = self._read()["node_id"]

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"node process exited with {self.proc.poll()}"
        return json.loads(line)

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, Any]:
        return self._read()

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(timeout=10)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.kill()
