"""The client's retry policy and its shared connection: a client under another
policy stays one client for closing, and a bounded policy gives up at its horizon."""

from __future__ import annotations

import time
import uuid

import pytest

from rdzv.api import RendezvousConnectionError
from rdzv.client import EtcdClient, EtcdConfig, LeaseLostError, parse_endpoints
from rdzv.retry import RetryPolicy


def _config(endpoint: str, connect_timeout: float = 5.0) -> EtcdConfig:
    return EtcdConfig(endpoints=tuple(parse_endpoints(endpoint)), connect_timeout=connect_timeout)


def test_no_close_releases_a_shared_connection_twice(etcd_endpoint: str) -> None:
    key = f"/rdzv-test/{uuid.uuid4()}".encode()
    # The endpoint written twice: a configuration no other client of this
    # process has, so that these two are the connection's only users.
    endpoint = f"{etcd_endpoint},{etcd_endpoint}"
    first = EtcdClient(_config(endpoint))
    other = EtcdClient(_config(endpoint))  # the same connection, a use of its own
    assert other.etcd3 is first.etcd3
    bounded = first.with_retry(first.retry.bounded(lambda: time.monotonic() + 60))
    assert bounded.etcd3 is first.etcd3 and bounded.retry is not first.retry
    bounded.put(key, b"v")
    for client in (bounded, first, bounded, first):  # each, twice, in any order
        client.close()
    # The other client's use is still there: the connection is open.
    assert other.get(key)[0] == b"v"
    assert other.delete(key) == 1
    last = other.with_retry(RetryPolicy(connect_timeout=1.0))
    other.close()
    # The last use is gone, and with it the connection: neither client can send.
    with pytest.raises(ValueError, match="closed channel"):
        last.etcd3.channel.unary_unary("/etcdserverpb.KV/Range")(b"", timeout=1)


def test_a_bounded_client_gives_up_at_its_horizon() -> None:
    # Nothing listens on port 1: every attempt fails at once and is retried.
    client = EtcdClient(_config("127.0.0.1:1", connect_timeout=30.0))
    try:
        bounded = client.with_retry(client.retry.bounded(lambda: start + 0.3))
        start = time.monotonic()
        with pytest.raises(LeaseLostError, match="presumably expired"):
            bounded.get(b"/k")
        assert time.monotonic() - start < 3  # not connect_timeout's 30 s
        quick = client.with_retry(RetryPolicy(connect_timeout=0.3))
        start = time.monotonic()
        with pytest.raises(RendezvousConnectionError, match="cannot reach etcd"):
            quick.get(b"/k")
        assert time.monotonic() - start < 3
    finally:
        client.close()
