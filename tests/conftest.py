"""Fixtures shared by every test module: real etcd, its endpoint, a fresh run id.

One etcd server serves the whole session; tests keep out of each other's way by
using their own ``run_id`` (and so their own keys). The 3-member cluster is
started only when a test asks for ``etcd_cluster``; a test that kills one of its
members restarts it before returning.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import ProcessNode
from rdzv.api import RendezvousError
from rdzv.etcd_server import EtcdCluster, EtcdServer


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """A single etcd, started once for the session and stopped at its end."""
    with EtcdServer() as server:
        yield server


@pytest.fixture(scope="session")
def etcd_endpoint(etcd_server: EtcdServer) -> str:
    """The session etcd's endpoint, ``127.0.0.1:<port>``."""
    return etcd_server.get_endpoint()


@pytest.fixture
def run_id() -> str:
    """A fresh run id (a uuid4 string) for each test."""
    return str(uuid.uuid4())


@pytest.fixture
def observer(etcd_server: EtcdServer) -> Iterator[Any]:
    """A client of the test's own on the session etcd, to look at etcd from
    outside the handlers."""
    client = etcd_server.get_rdzv_client()
    yield client
    client.close()


@pytest.fixture
def handlers() -> Iterator[list[Any]]:
    """Rendezvous handlers a test creates; each is shut down when the test ends."""
    created: list[Any] = []
    yield created
    for handler in created:
        try:
            handler.shutdown()
        except RendezvousError:  # etcd is down in some tests; the lease expires anyway
            pass


@pytest.fixture(scope="session")
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A 3-member etcd cluster, started the first time a test asks for it."""
    with EtcdCluster(size=3) as cluster:
        yield cluster


@pytest.fixture
def processes() -> Iterator[list[ProcessNode]]:
    """Node processes a test starts; each is resumed if stopped, then closed."""
    created: list[ProcessNode] = []
    yield created
    for node in created:
        if node.proc.poll() is None:
            os.killpg(node.proc.pid, signal.SIGCONT)
        node.close()
