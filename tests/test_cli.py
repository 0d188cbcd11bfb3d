"""The ``rdzv`` command, driven as a subprocess against a real etcd."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import ThreadNode, assert_one_world, make_handler, run_round, wait_for
from rdzv import cli
from rdzv.api import RendezvousClosedError
from rdzv.client import EtcdClient, EtcdConfig, parse_endpoints
from rdzv.inspect import read_run_status

RDZV = [sys.executable, "-m", "rdzv"]
SUBCOMMANDS = ("server", "join", "status", "close", "demo", "bench")


def rdzv(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``rdzv ARGS`` to completion."""
    return subprocess.run(
        [*RDZV, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def start(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
    """Start ``rdzv ARGS`` in the background, stdout and stderr piped."""
    kwargs.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([*RDZV, *args], stdout=subprocess.PIPE, text=True, **kwargs)


def run_args(endpoint: str, run_id: str) -> list[str]:
    return ["--endpoint", endpoint, "--run-id", run_id]


def status_json(endpoint: str, run_id: str) -> dict[str, Any]:
    done = rdzv("status", *run_args(endpoint, run_id), "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def read_status(endpoint: str, run_id: str) -> dict[str, Any]:
    """What ``rdzv status --json`` prints, read in this process (for polling)."""
    client = EtcdClient(EtcdConfig(endpoints=tuple(parse_endpoints(endpoint))))
    try:
        return read_run_status(client, run_id).to_dict()
    finally:
        client.close()


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "error" in lines[0]
    return lines[0]


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def live_round(etcd_endpoint: str, run_id: str) -> Iterator[list[Any]]:
    """Two handlers of ``run_id`` that completed a round and stay alive."""
    handlers = [make_handler(etcd_endpoint, run_id, 2, 2) for _ in range(2)]
    assert_one_world(run_round([ThreadNode(h) for h in handlers]), 2)
    yield handlers
    for handler in handlers:
        handler.shutdown()


# ---------------------------------------------------------------------- join
def test_two_joins_print_one_consistent_json_line_each(etcd_endpoint, run_id):
    nodes = [
        start("join", *run_args(etcd_endpoint, run_id), "--nnodes", "2", "--timeout", "20",
              "--local-addr", "127.0.0.1")
        for _ in range(2)
    ]
    results = []
    for node in nodes:
        out, err = node.communicate(timeout=30)
        assert node.returncode == 0, err
        lines = out.splitlines()
        assert len(lines) == 1, out
        results.append(json.loads(lines[0]))
    assert {r["rank"] for r in results} == {0, 1}
    for r in results:
        assert set(r) == {"rank", "world_size", "round", "master_addr", "master_port", "run_id"}
        assert (r["world_size"], r["round"], r["run_id"]) == (2, 0, run_id)
        assert r["master_addr"] == "127.0.0.1"
    assert results[0]["master_port"] == results[1]["master_port"] > 0


def test_join_timeout_exits_3(etcd_endpoint, run_id):
    done = rdzv("join", *run_args(etcd_endpoint, run_id), "--nnodes", "2:3", "--timeout", "1")
    assert done.returncode == 3, done.stderr
    assert "within 1 s" in one_line_error(done)
    assert done.stdout == ""


def test_close_then_join_exits_4(etcd_endpoint, run_id):
    closed = rdzv("close", *run_args(etcd_endpoint, run_id))
    assert closed.returncode == 0, closed.stderr
    assert closed.stdout.strip() == f"run {run_id!r} closed"
    again = rdzv("close", *run_args(etcd_endpoint, run_id))
    assert again.returncode == 0 and "already closed" in again.stdout
    done = rdzv("join", *run_args(etcd_endpoint, run_id), "--nnodes", "1", "--timeout", "10")
    assert done.returncode == 4, done.stderr
    assert "closed" in one_line_error(done)
    status = status_json(etcd_endpoint, run_id)
    assert status["status"] == "closed" and status["closed"] is True


@pytest.mark.parametrize("command", ["join", "status", "close"])
def test_unreachable_endpoint_exits_5_quickly(command, run_id):
    endpoint = f"127.0.0.1:{closed_port()}"
    extra = ["--nnodes", "1"] if command == "join" else []
    started = time.monotonic()
    done = rdzv(command, *run_args(endpoint, run_id), *extra, "--conf", "connect_timeout=1")
    assert done.returncode == 5, done.stderr
    assert endpoint in one_line_error(done)
    # connect_timeout bounds it, not the rendezvous timeout (600 s); the margin
    # is for starting Python on a loaded machine (timed without it below).
    assert time.monotonic() - started < 20


def test_unreachable_endpoint_fails_within_connect_timeout(run_id, capsys):
    args = run_args(f"127.0.0.1:{closed_port()}", run_id)
    started = time.monotonic()
    assert cli.main(["join", *args, "--nnodes", "1", "--conf", "connect_timeout=1"]) == 5
    assert time.monotonic() - started < 4
    assert "cannot reach etcd" in capsys.readouterr().err


def test_join_shows_progress_only_on_a_terminal(etcd_endpoint, run_id):
    controller, terminal = pty.openpty()
    try:
        node = subprocess.Popen(
            [*RDZV, "join", *run_args(etcd_endpoint, run_id), "--nnodes", "2:4",
             "--timeout", "3"],
            stdout=subprocess.PIPE, stderr=terminal, text=True,
        )
        os.close(terminal)
        shown = b""
        while True:
            ready, _, _ = select.select([controller], [], [], 10)
            assert ready, "no output on the terminal"
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal closed: the process is gone
                break
            if not chunk:
                break
            shown += chunk
        assert node.wait(10) == 3
    finally:
        os.close(controller)
    text = shown.decode(errors="replace")
    assert "round 0: 1/4 (min 2) nodes joined" in text
    assert "s left before timeout" in text
    # Without a terminal (every other test here), stderr holds only the error.


# -------------------------------------------------------------------- status
def test_status_of_a_run_that_does_not_exist(etcd_endpoint, run_id):
    status = status_json(etcd_endpoint, run_id)
    assert status["status"] == "none" and status["members"] == [] and status["round"] is None
    human = rdzv("status", *run_args(etcd_endpoint, run_id))
    assert human.returncode == 0
    assert "status none" in human.stdout


def test_status_during_and_after_a_round(etcd_endpoint, run_id):
    first = start("join", *run_args(etcd_endpoint, run_id), "--nnodes", "2", "--timeout", "30")
    try:
        wait_for(lambda: read_status(etcd_endpoint, run_id)["members"], what="a member key")
        during = status_json(etcd_endpoint, run_id)
        assert (during["status"], during["round"]) == ("joinable", 0)
        (member,) = during["members"]
        assert member["state"] == "joined" and member["rank"] is None
        assert 0 < member["lease_ttl"] <= 10 and member["pid"] == first.pid
        human = rdzv("status", *run_args(etcd_endpoint, run_id)).stdout
        assert "round 0 joinable (min 2, max 2)" in human
        assert member["node"] in human and "members of round 0: 1" in human
        second = start("join", *run_args(etcd_endpoint, run_id), "--nnodes", "2",
                       "--timeout", "30")
        assert second.wait(30) == 0
        assert first.wait(30) == 0
    finally:
        first.kill()
    after = status_json(etcd_endpoint, run_id)
    assert (after["status"], after["world_size"]) == ("final", 2)
    # The joins exited and revoked their leases: the world is listed, keys gone.
    assert [(m["rank"], m["state"]) for m in after["members"]] == [(0, "left"), (1, "left")]


def test_status_shows_joined_count_and_last_call_deadline(etcd_endpoint, run_id, handlers):
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 3, last_call_timeout=30)
                    for _ in range(2))
    nodes = [ThreadNode(handlers[0]).start()]
    wait_for(lambda: read_status(etcd_endpoint, run_id)["joined"] == 1, what="the first join")
    status = status_json(etcd_endpoint, run_id)
    assert (status["joined"], status["last_call_ends"]) == (1, None)
    human = rdzv("status", *run_args(etcd_endpoint, run_id)).stdout.splitlines()
    assert ("members of round 0: 1 of min 2, max 3; waiting for 1 more before the last call "
            "starts") in human
    before = time.time()
    nodes.append(ThreadNode(handlers[1]).start())
    ends = wait_for(lambda: read_status(etcd_endpoint, run_id)["last_call_ends"],
                    what="the last call's deadline")
    # The second join armed the last call: it ends last_call_timeout after that join.
    assert before + 30 <= ends <= time.time() + 30, (before, ends)
    human = rdzv("status", *run_args(etcd_endpoint, run_id)).stdout.splitlines()
    when = time.strftime("%H:%M:%S UTC", time.gmtime(ends))
    (line,) = [line for line in human if line.startswith("members of round 0: 2 ")]
    assert line.startswith(f"members of round 0: 2 of min 2, max 3; last call ends at {when} (in ")
    assert line.endswith(" s) unless 3 join first"), line
    handlers[0].set_closed()
    assert all(isinstance(node.join(), RendezvousClosedError) for node in nodes)


def test_status_lists_live_members_with_ranks_and_leases(etcd_endpoint, run_id, live_round):
    status = status_json(etcd_endpoint, run_id)
    assert (status["status"], status["round"], status["world_size"]) == ("final", 0, 2)
    assert sorted(m["node"] for m in status["members"]) == sorted(h.node_id for h in live_round)
    for rank, member in enumerate(status["members"]):
        assert member["rank"] == rank and member["state"] == "confirmed"
        assert member["host"] and member["pid"] == os.getpid()
        assert 0 < member["lease_ttl"] <= 10
    human = rdzv("status", *run_args(etcd_endpoint, run_id)).stdout.splitlines()
    assert human[0] == f"run {run_id!r} under '/rdzv': round 0 final (min 2, max 2, world of 2)"
    rows = [line.split() for line in human if "confirmed" in line]
    assert [row[0] for row in rows] == ["0", "1"]
    assert all(row[-1] == "s" and row[-2].isdigit() for row in rows), human


def test_status_shows_topology_labels_in_placement_order(etcd_endpoint, run_id):
    joins = [("node10", ["--topology", "rack2"]), ("node9", ["--topology", "rack1"]),
             ("node3", [])]
    nodes = [start("join", *run_args(etcd_endpoint, run_id), "--nnodes", "4", "--timeout", "30",
                   "--local-addr", host, *topology) for host, topology in joins]
    try:
        wait_for(lambda: len(read_status(etcd_endpoint, run_id)["members"]) == 3,
                 what="three member keys")
        members = status_json(etcd_endpoint, run_id)["members"]
        assert [(m["host"], m["topology"]) for m in members] == [
            ("node9", "rack1"), ("node10", "rack2"), ("node3", None)]
        human = rdzv("status", *run_args(etcd_endpoint, run_id)).stdout.splitlines()
        header = next(line for line in human if "topology" in line).split()
        rows = [line.split() for line in human if "joined" in line]
        at = header.index("topology")
        assert [row[at] for row in rows] == ["rack1", "rack2", "-"]
    finally:
        for node in nodes:
            node.kill()
            node.wait(10)


def test_status_shows_a_waiting_node(etcd_endpoint, run_id, live_round):
    late = start("join", *run_args(etcd_endpoint, run_id), "--nnodes", "2", "--timeout", "30")
    try:
        wait_for(lambda: read_status(etcd_endpoint, run_id)["waiting"], what="a waiting key")
        status = status_json(etcd_endpoint, run_id)
        (waiting,) = status["waiting"]
        assert waiting["state"] == "waiting" and waiting["lease_ttl"] > 0
        assert "waiting for round 1: 1" in rdzv("status", *run_args(etcd_endpoint, run_id)).stdout
    finally:
        late.kill()
        late.wait()


def test_status_watch_refreshes_until_interrupted(etcd_endpoint, run_id):
    watcher = start("status", *run_args(etcd_endpoint, run_id), "--json", "--watch",
                    "--interval", "0.2")
    try:
        assert watcher.stdout is not None
        snapshots = [json.loads(watcher.stdout.readline()) for _ in range(2)]
        assert [s["status"] for s in snapshots] == ["none", "none"]
        assert rdzv("close", *run_args(etcd_endpoint, run_id)).returncode == 0
        wait_for(lambda: json.loads(watcher.stdout.readline())["closed"], what="a closed run")
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(10) == 0
    finally:
        watcher.kill()


def test_etcd_prefix_separates_runs(etcd_endpoint, run_id):
    prefix = ["--etcd-prefix", f"/cli-test-{run_id}"]
    done = rdzv("join", *run_args(etcd_endpoint, run_id), *prefix, "--nnodes", "1")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["world_size"] == 1
    inside = rdzv("status", *run_args(etcd_endpoint, run_id), *prefix, "--json")
    assert json.loads(inside.stdout)["status"] == "final"
    assert status_json(etcd_endpoint, run_id)["status"] == "none"


# -------------------------------------------------------------------- server
def test_server_prints_its_endpoint_and_stops_on_sigterm(run_id):
    server = start("server")
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        assert first.startswith("endpoint: 127.0.0.1:"), first
        endpoint = first.split()[1]
        # Which etcd runs: its version and binary, as `etcd --version` tells.
        label, version, binary = server.stdout.readline().split()
        said = subprocess.run([binary.strip("()"), "--version"], capture_output=True, text=True)
        assert label == "etcd:" and f"etcd Version: {version}\n" in said.stdout
        assert status_json(endpoint, run_id)["status"] == "none"
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0
    finally:
        server.kill()
    done = rdzv("status", *run_args(endpoint, run_id), "--conf", "connect_timeout=0.5")
    assert done.returncode == 5


def test_server_on_a_fixed_port(run_id):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = start("server", "--port", str(port))
    try:
        assert server.stdout is not None
        assert server.stdout.readline().split() == ["endpoint:", f"127.0.0.1:{port}"]
        assert status_json(f"127.0.0.1:{port}", run_id)["status"] == "none"
        server.send_signal(signal.SIGTERM)
        assert server.wait(15) == 0
    finally:
        server.kill()


def test_server_cluster_serves_and_stops_on_sigint(run_id):
    server = start("server", "--cluster", "3")
    try:
        assert server.stdout is not None
        endpoints = server.stdout.readline().split()[1].split(",")
        assert len(endpoints) == 3
        assert status_json(",".join(endpoints), run_id)["status"] == "none"
        server.send_signal(signal.SIGINT)
        assert server.wait(15) == 0
    finally:
        server.kill()


# --------------------------------------------------------------------- usage
BAD_ARGUMENTS = [
    [],
    ["frobnicate"],
    ["join", "--endpoint", "127.0.0.1:2379", "--nnodes", "2"],
    ["join", "--endpoint", "127.0.0.1:2379", "--run-id", "r", "--nnodes", "3:2"],
    ["join", "--endpoint", "127.0.0.1:2379", "--run-id", "r", "--nnodes", "two"],
    ["join", "--endpoint", "127.0.0.1:99999", "--run-id", "r", "--nnodes", "2"],
    ["join", "--endpoint", "127.0.0.1:2379", "--run-id", "a/b", "--nnodes", "2"],
    ["join", "--endpoint", "127.0.0.1:2379", "--run-id", "r", "--nnodes", "2", "--timeout", "-1"],
    ["join", "--endpoint", "127.0.0.1:2379", "--run-id", "r", "--nnodes", "2", "--conf", "novalue"],
    ["join", "--endpoint", "127.0.0.1:2379", "--run-id", "r", "--nnodes", "2", "--conf", "bogus=1"],
    ["join", "--endpoint", "127.0.0.1:2379", "--run-id", "r", "--nnodes", "2",
     "--conf", "lease_ttl=1"],
    ["join", "--endpoint", "127.0.0.1:2379", "--run-id", "r", "--nnodes", "2",
     "--timeout", "5", "--conf", "timeout=6"],
    ["status", "--endpoint", "127.0.0.1:2379", "--run-id", "r", "--surprise"],
    ["status", "--endpoint", "127.0.0.1:2379", "--run-id", "r", "--conf", "protocol=gopher"],
    ["demo", "--nodes", "1"],
    ["server", "--port", "0"],
    ["--log-level", "loud", "demo"],
]


@pytest.mark.parametrize("args", [BAD_ARGUMENTS[0], BAD_ARGUMENTS[3], BAD_ARGUMENTS[9]])
def test_bad_arguments_exit_2_with_one_line(args):
    done = rdzv(*args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert one_line_error(done).startswith("rdzv")
    assert done.stdout == ""


@pytest.mark.parametrize("value", ["-1:2", "-1", "0", "3:2", "two", "1:", ":2", "1:2:3", "-"])
def test_every_bad_nnodes_gets_the_same_one_line_message(value, capsys):
    join = ["join", "--endpoint", "127.0.0.1:2379", "--run-id", "r"]
    for args in ([*join, "--nnodes", value], [*join, f"--nnodes={value}"]):
        assert cli.main(args) == 2
        err = capsys.readouterr().err
        assert err == (
            "rdzv join: error: argument --nnodes: expected N or MIN:MAX, whole numbers with "
            f"1 <= MIN <= MAX, got {value!r} (see: rdzv join --help)\n"
        )


# The same checks in this process: main() returns what the command exits with.
@pytest.mark.parametrize("args", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_before_any_io(args, capsys):
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("rdzv"), err


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_every_subcommand_shows_an_example(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"rdzv {command}" in out.split("example:", 1)[1]
    assert "--log-level" in out


def test_help_of_the_command_lists_subcommands_and_exit_codes():
    done = rdzv("--help")
    assert done.returncode == 0
    for command in SUBCOMMANDS:
        assert f"rdzv {command}" in done.stdout or f"    {command}" in done.stdout
    assert "demo-node" not in done.stdout
    assert "3 timeout, 4 closed, 5 connection failure" in done.stdout


def test_log_level_works_before_and_after_the_command(etcd_endpoint, run_id):
    for args in (["--log-level", "debug", "status"], ["status", "--log-level", "DEBUG"]):
        done = rdzv(*args, *run_args(etcd_endpoint, run_id))
        assert done.returncode == 0, done.stderr


def _bench(cwd: Any, *args: str) -> subprocess.CompletedProcess[str]:
    """``rdzv bench ARGS`` in ``cwd``, with the benchmark's path set to ``fake_bench.py``."""
    code = (
        "import sys; from rdzv import cli; from rdzv.cli import bench; "
        "bench._BENCHMARK = bench.Path('fake_bench.py'); sys.exit(cli.main(sys.argv[1:]))"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "bench", *args],
        capture_output=True, text=True, cwd=cwd, timeout=30, check=False,
    )


def test_bench_passes_its_arguments_to_the_benchmark(tmp_path):
    missing = _bench(tmp_path)
    assert missing.returncode == 2
    assert "fake_bench.py not found" in one_line_error(missing)
    (tmp_path / "fake_bench.py").write_text(
        "import sys\nprint(sys.argv[1:])\nsys.exit(7 if '--fail' in sys.argv else 0)\n"
    )
    done = _bench(tmp_path, "--", "--nodes", "8", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['--nodes', '8', '--help']"
    assert _bench(tmp_path, "--fail").returncode == 7


# ---------------------------------------------------------------------- demo
@pytest.mark.parametrize("threads", [False, True])
def test_demo_prints_a_table_of_rounds(threads):
    done = rdzv("demo", "--nodes", "4", *(["--threads"] if threads else []), timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("round"))
    assert lines[header].split()[:3] == ["round", "world", "who"]
    first, second = (lines[header + 1].split(), lines[header + 2].split())
    assert first[:2] == ["0", "4"] and second[:2] == ["1", "4"]
    assert "3 survivors + 1 late node" in lines[header + 2]
    assert all(float(cell) < 30 for cell in first[-3:] + second[-3:])
    # A survivor stalled past its 3 s lease rejoins as a new node: said, not hidden.
    assert re.search(r"the late node got rank \d; \d/3 survivors kept their rank", done.stdout)
    assert ("shut down cleanly" if threads else "killed with SIGKILL") in done.stdout
