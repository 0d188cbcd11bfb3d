"""Operators see and remove runs: ``rdzv runs``, ``rdzv purge``, ``rdzv status``'s
footprint, and the ``rdzv.runs`` functions behind them, on a real etcd."""

from __future__ import annotations

import json
import uuid

import pytest

from helpers import ThreadNode, assert_one_world, make_handler, run_round
from rdzv.etcd_server import EtcdServer
from rdzv.keys import DEFAULT_PREFIX, RunKeys
from rdzv.runs import RunIsLiveError, list_runs, purge_idle_runs, purge_run
from test_cli import one_line_error, rdzv


@pytest.fixture
def client(etcd_server: EtcdServer):
    c = etcd_server.get_rdzv_client()
    yield c
    c.close()


@pytest.fixture
def prefix() -> str:
    """A prefix of this test's own, so that the listing holds only its runs."""
    return f"/runs-{uuid.uuid4()}"


def complete_round(endpoint: str, run_id: str, prefix: str, handlers: list) -> list:
    new = [make_handler(endpoint, run_id, 2, 2, etcd_prefix=prefix) for _ in range(2)]
    handlers.extend(new)
    assert_one_world(run_round([ThreadNode(h) for h in new]), 2)
    return new


def test_runs_lists_live_and_closed_runs(etcd_endpoint, prefix, handlers):
    complete_round(etcd_endpoint, "live", prefix, handlers)
    ended = complete_round(etcd_endpoint, "ended", prefix, handlers)
    ended[0].set_closed()
    for h in ended:
        h.shutdown()
    done = rdzv("runs", "--endpoint", etcd_endpoint, "--etcd-prefix", prefix, "--json")
    assert done.returncode == 0, done.stderr
    runs = {r["run_id"]: r for r in json.loads(done.stdout)["runs"]}
    assert set(runs) == {"live", "ended"}
    assert runs["live"]["status"] == "final" and runs["live"]["round"] == 0
    assert runs["live"]["members"] == 2 and runs["live"]["live"]
    assert runs["ended"]["status"] == "closed" and not runs["ended"]["live"]
    for run in runs.values():
        assert run["keys"] > 0 and run["bytes"] > 0 and run["last_revision"] > 0
        assert run["idle_s"] is not None
    table = rdzv("runs", "--endpoint", etcd_endpoint, "--etcd-prefix", prefix)
    assert table.returncode == 0, table.stderr
    assert table.stdout.split("\n")[0].split()[:5] == ["run", "status", "round", "members", "live"]
    # rdzv status shows the same footprint.
    status = rdzv("status", "--endpoint", etcd_endpoint, "--run-id", "live",
                  "--etcd-prefix", prefix, "--json")
    assert json.loads(status.stdout)["footprint"] == {
        "keys": runs["live"]["keys"], "bytes": runs["live"]["bytes"]}


def test_purge_refuses_a_live_run_unless_forced(client, etcd_endpoint, prefix, handlers):
    complete_round(etcd_endpoint, "busy", prefix, handlers)
    keys = RunKeys(prefix, "busy")
    done = rdzv("purge", "--endpoint", etcd_endpoint, "--etcd-prefix", prefix, "--run-id", "busy")
    assert done.returncode == 1
    assert "is live" in one_line_error(done)
    assert client.get(keys.state) is not None
    with pytest.raises(RunIsLiveError):
        purge_run(client, "busy", prefix)
    # Nor does purging the idle ones touch it.
    assert purge_idle_runs(client, 0, prefix) == []
    forced = rdzv("purge", "--endpoint", etcd_endpoint, "--etcd-prefix", prefix,
                  "--run-id", "busy", "--force", "--json")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["purged"][0]["run_id"] == "busy"
    assert client.range(keys.run) == []
    assert client.lease_time_to_live(keys.state_lease) == -1


def test_purge_idle_runs_by_age(client, etcd_endpoint, prefix, handlers):
    for run_id in ("a", "b"):
        ended = complete_round(etcd_endpoint, run_id, prefix, handlers)
        ended[0].set_closed()
        for h in ended:
            h.shutdown()
    complete_round(etcd_endpoint, "live", prefix, handlers)
    kept = rdzv("purge", "--endpoint", etcd_endpoint, "--etcd-prefix", prefix,
                "--idle-for", "1h", "--json")
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout)["purged"] == []
    done = rdzv("purge", "--endpoint", etcd_endpoint, "--etcd-prefix", prefix, "--idle-for", "0")
    assert done.returncode == 0, done.stderr
    assert [r["run_id"] for r in list_runs(client, prefix)] == ["live"]


@pytest.mark.parametrize("args, words", [
    (["runs", "--etcd-prefix", "/no-such-prefix"], "no rdzv run under --etcd-prefix"),
    (["runs", "--etcd-prefix", "/a/../b"], "--etcd-prefix"),
    (["purge", "--idle-for", "-5"], "expected an age of 0 or more"),
    (["purge", "--idle-for", "2x"], "expected an age of 0 or more"),
    (["purge", "--idle-for", "1h", "--force"], "--force goes with --run-id"),
    (["purge"], "one of the arguments --run-id --idle-for is required"),
    (["purge", "--run-id", "a", "--idle-for", "1"], "not allowed with"),
])
def test_bad_arguments_get_one_line(etcd_endpoint, args, words):
    done = rdzv(args[0], "--endpoint", etcd_endpoint, *args[1:])
    assert done.returncode == 2, done.stderr
    assert words in one_line_error(done)
    assert done.stdout == ""


def test_purge_of_an_unknown_run_says_so(etcd_endpoint):
    done = rdzv("purge", "--endpoint", etcd_endpoint, "--run-id", f"none-{uuid.uuid4()}")
    assert done.returncode == 1
    assert "rdzv runs" in one_line_error(done)


def test_purge_idle_runs_refuses_a_negative_age(client):
    with pytest.raises(ValueError, match="0 or more"):
        purge_idle_runs(client, -1, DEFAULT_PREFIX)
