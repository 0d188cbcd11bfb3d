"""The world of 10^5 members: within etcd's default limits, a few KB per node.

The freezer's transactions are built and encoded as etcd receives them,
without a server: every one holds at most 128 operations per list and at most
1.5 MiB. Each member reads one rank shard of a few KB. Then the shards of a
world larger than the freeze transaction can carry are written to a real etcd
and read back, and a second freezer of the same cutoff is refused.
"""

from __future__ import annotations

import random

import pytest

from rdzv import _state as core
from rdzv._etcd3_compat import load_etcd3
from rdzv.api import RendezvousStateError
from rdzv.client import txn_request
from rdzv.inspect import read_world
from rdzv.keys import RunKeys
from rdzv.txn import txn_ops

MAX_TXN_OPS = 128  # etcd's --max-txn-ops default
MAX_REQUEST_BYTES = 1536 * 1024  # etcd's --max-request-bytes default (1.5 MiB)
NODE_READ_BYTES = 4096

KEYS = RunKeys("/rdzv", "a-run-id-of-typical-length-0123456789")


def lease_ids(n: int, seed: int = 0) -> list[str]:
    """Node ids as etcd makes lease ids: a member prefix, then a counter."""
    rng = random.Random(seed)
    base = rng.getrandbits(48) << 16
    return [f"{base + i:x}" for i in range(n)]


def freeze_txn(world: list[str], freeze_ops: list) -> list:
    """The freeze transaction's writes as ``Node._freeze`` sends them."""
    state = core.StateRecord(7, core.Status.FROZEN, 1, len(world), 10**9, len(world), 6)
    kv = KEYS.kv(7)
    return [("put", KEYS.state, state.encode(), 0), *freeze_ops,
            ("put", kv + b"MASTER_ADDR", b"node-00000.cluster.example.com", 0),
            ("put", kv + b"MASTER_PORT", b"29500", 0),
            ("put", KEYS.confirmed(7) + world[0].encode(), b"", 2**62)]


@pytest.mark.parametrize("n", [1, 1000, 6000, 10_000, 100_000])
def test_freezer_transactions_fit_etcd_limits(n):
    rpc = load_etcd3().etcdrpc
    world = lease_ids(n)
    cutoff = 10**9
    page_txns, freeze_ops = core.plan_world(KEYS, 7, cutoff, world, "10.0.0.1", 29500)
    txns = [(compares, puts, []) for compares, puts in page_txns]
    txns.append(([("mod", KEYS.state, 10**9)], freeze_txn(world, freeze_ops),
                 [("get", KEYS.state)]))
    for compares, success, failure in txns:
        assert txn_ops(compares, success, failure) <= MAX_TXN_OPS
        size = txn_request(rpc, compares, success, failure).ByteSize()
        assert size <= MAX_REQUEST_BYTES, (n, size)
    # Every shard is written exactly once, and they give back the world.
    shards = [op for _, success, _ in txns for op in success if op[1].startswith(
        KEYS.ranks(7, cutoff))]
    assert len(shards) == len({op[1] for op in shards}) == core.world_shards(n)
    header = next(op[2] for op in freeze_ops if op[1] == KEYS.world(7))
    rebuilt = core.world_from(header, [(op[1], op[2]) for op in shards], KEYS, 7)
    assert rebuilt == (world, "10.0.0.1", 29500)
    # What one member reads: its own shard, a few KB at any world size.
    largest = max(len(op[1]) + len(op[2]) for op in shards)
    assert largest <= NODE_READ_BYTES, (n, largest)
    if n == 100_000:
        assert len(txns) > 1  # the 1.7 MB world cannot go in one request
        assert sum(len(op[2]) for op in shards) > MAX_REQUEST_BYTES


def test_a_member_finds_its_rank_in_its_own_shard():
    world = lease_ids(5000, seed=3)
    page_txns, freeze_ops = core.plan_world(KEYS, 2, 55, world, "h", 1)
    by_key = {op[1]: op[2] for op in freeze_ops}
    shards = core.world_shards(len(world))
    for rank in (0, 1, 2499, 4999):
        node = world[rank]
        key = KEYS.rank_shard(2, 55, core.shard_of(node, shards))
        round_, ranks, addr, port = core.decode_rank_shard(by_key[key], key)
        assert (round_, ranks[node], addr, port) == (2, rank, "h", 1)
    assert not page_txns


def test_shards_that_do_not_give_every_rank_are_refused():
    world = lease_ids(300)
    _, ops = core.plan_world(KEYS, 1, 9, world)
    header = ops[0][2]
    shards = [(op[1], op[2]) for op in ops[1:]]
    with pytest.raises(RendezvousStateError, match="do not give all 300 ranks"):
        core.world_from(header, shards[1:], KEYS, 1)
    # Shards of another cutoff (a freezer that lost) are not part of this world.
    stray = [(KEYS.rank_shard(1, 8, 0), core.encode_rank_shard(1, [("x", 0)]))]
    assert core.world_from(header, stray + shards, KEYS, 1)[0] == world


def test_large_world_pages_in_etcd_and_a_second_freezer_of_the_cutoff(etcd_server, run_id):
    """The transactions written before a freeze, against a real etcd: they
    publish the world that ``rdzv.inspect.read_world`` reads back, and a second freezer that
    read the members at the same revision cannot write its shards there."""
    keys = RunKeys("/rdzv", run_id)
    world = lease_ids(core.SHARD_MEMBERS * (core.CAS_SHARDS + 1), seed=5)
    page_txns, freeze_ops = core.plan_world(keys, 0, 77, world, "10.0.0.9", 29400)
    assert len(page_txns) >= 1
    client = etcd_server.get_rdzv_client()
    try:
        for compares, puts in page_txns:
            assert client.txn(compares, puts, [])[0]
        rival = core.plan_world(keys, 0, 77, list(reversed(world)))[0]
        assert not client.txn(*rival[0], [])[0]
        client.txn([], freeze_ops, [])
        assert read_world(client, keys, 0) == (world, "10.0.0.9", 29400)
    finally:
        client.close()
