"""A shared etcd stays healthy: runs clean up after themselves.

Old rounds are deleted inside the transitions that retire them, so a run's
footprint stays bounded however many rounds it goes through.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from helpers import ThreadNode, assert_one_world, make_handler, run_round
from rdzv.client import EtcdClient
from rdzv.etcd_server import EtcdServer
from rdzv.keys import DEFAULT_PREFIX, RunKeys


@pytest.fixture
def client(etcd_server: EtcdServer) -> Iterator[EtcdClient]:
    c = etcd_server.get_rdzv_client()
    yield c
    c.close()


def footprint(client: EtcdClient, keys: RunKeys) -> tuple[int, int]:
    """``(keys, bytes of keys and values)`` of one run."""
    kvs = client.range(keys.run)
    return len(kvs), sum(len(k) + len(v) for k, v, _ in kvs)


def test_a_run_keeps_a_bounded_footprint_over_100_rounds(client, etcd_endpoint, run_id, handlers):
    handlers.extend(make_handler(etcd_endpoint, run_id, 2, 2) for _ in range(2))
    keys = RunKeys(DEFAULT_PREFIX, run_id)
    nodes = [ThreadNode(h) for h in handlers]
    sizes = []
    for r in range(100):
        infos = run_round(nodes)
        assert_one_world(infos, 2)
        assert {h.round for h in handlers} == {r}
        infos[0].store.set(f"payload-{r}", b"x" * 1024)
        sizes.append(footprint(client, keys))
    # The state record and at most three rounds: the one before the last
    # (retired when the next one opens), the last and its store.
    most_keys = max(n for n, _ in sizes[5:])
    most_bytes = max(b for _, b in sizes[5:])
    assert most_keys <= 16, sizes
    assert most_bytes <= 4 * 1024, sizes
    assert sizes[-1][0] <= sizes[5][0] + 2, sizes
    rounds = {k[len(keys.run):].split(b"/")[1] for k, _, _ in client.range(keys.run + b"rounds/")}
    assert len(rounds) <= 3, rounds
