"""Transport security and etcd authentication, against real etcd processes.

TLS: rounds over https with server and mutual TLS; every TLS misconfiguration
fails fast with a ``RendezvousConnectionError`` that says it is a TLS failure.
Authentication: rounds as a user whose role covers only the ``/rdzv/`` prefix,
with credentials as parameters or in the environment; refused credentials fail
at once (one Authenticate, no retry storm); expired tokens are renewed. Secrets:
no password and no private key material in anything rdzv logs or raises.

The certificates come from ``certs.write_certificates``. Each etcd is started
once for the module, but for the plain-http one with authentication.
"""

from __future__ import annotations

import http.client
import importlib
import json
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from certs import Certificates, write_certificates
from helpers import ThreadNode, assert_one_world, make_handler, run_round, wait_for
from rdzv import cli
from rdzv._etcd3_compat import load_etcd3
from rdzv.api import RendezvousConnectionError
from rdzv.client import EtcdClient, EtcdConfig
from rdzv.etcd_server import EtcdServer
from rdzv.retry import is_tls_failure
from rdzv.txn import prefix_end

USER = "trainer"
# Random, so that finding it anywhere can only mean it leaked.
PASSWORD = f"pw-{uuid.uuid4().hex}"
ROOT_PASSWORD = f"root-{uuid.uuid4().hex}"
# Each failure below must be reported well within the default connect_timeout (5 s).
TLS_FAILURE_DEADLINE_S = 6.0
AUTH_FAILURE_DEADLINE_S = 2.0
# Simple tokens expire this long after their last use (etcd's minimum is 1 s; it
# sweeps expired tokens once a second).
TOKEN_TTL_S = 1
# Keep-alives that never come during a test: for handlers that must not use their
# token while it expires.
NO_KEEPALIVE = {"lease_ttl": 3600, "keepalive_interval": 1800}


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return write_certificates(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(certs: Certificates) -> Iterator[EtcdServer]:
    """etcd over https; any client that trusts ``certs.ca`` may connect."""
    with EtcdServer(tls=certs.tls_files()) as server:
        yield server


@pytest.fixture(scope="module")
def mtls_server(certs: Certificates) -> Iterator[EtcdServer]:
    """etcd over https that requires a client certificate signed by ``certs.ca``."""
    with EtcdServer(tls=certs.tls_files(client_cert_auth=True)) as server:
        yield server


@pytest.fixture(scope="module")
def auth_server(certs: Certificates) -> Iterator[EtcdServer]:
    """etcd over https with authentication on and short-lived tokens."""
    with EtcdServer(
        tls=certs.tls_files(), extra_args=["--auth-token-ttl", str(TOKEN_TTL_S)]
    ) as server:
        _enable_auth(server)
        yield server


@pytest.fixture(autouse=True)
def _no_credentials_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials in the developer's environment must not leak into these tests."""
    monkeypatch.delenv("RDZV_ETCD_USERNAME", raising=False)
    monkeypatch.delenv("RDZV_ETCD_PASSWORD", raising=False)


# ------------------------------------------------------------------- helpers
def _enable_auth(server: EtcdServer) -> None:
    """Add root, and USER with readwrite on ``/rdzv/`` only; then turn auth on.

    Uses etcd's raw v3 auth API: etcd refuses AuthEnable until a root user with
    the root role exists.
    """
    rpc = load_etcd3().etcdrpc
    permission = importlib.import_module("etcd3.etcdrpc.auth_pb2").Permission
    client = server.get_rdzv_client()
    try:
        auth = rpc.AuthStub(client.etcd3.channel)
        auth.UserAdd(rpc.AuthUserAddRequest(name="root", password=ROOT_PASSWORD))
        auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        auth.RoleAdd(rpc.AuthRoleAddRequest(name="rdzv-user"))
        auth.RoleGrantPermission(
            rpc.AuthRoleGrantPermissionRequest(
                name="rdzv-user",
                perm=permission(
                    permType=permission.READWRITE,
                    key=b"/rdzv/",
                    range_end=prefix_end(b"/rdzv/"),
                ),
            )
        )
        auth.UserAdd(rpc.AuthUserAddRequest(name=USER, password=PASSWORD))
        auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=USER, role="rdzv-user"))
        auth.AuthEnable(rpc.AuthEnableRequest())
    finally:
        client.close()


def _authenticate_calls(server: EtcdServer) -> int:
    """How many Authenticate requests etcd has started serving, from its metrics."""
    url = urlsplit(server.get_metrics_url())
    # http.client, not urllib: a proxy from the environment must not be asked.
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    return sum(
        int(float(line.rsplit(" ", 1)[1]))
        for line in text.splitlines()
        if line.startswith("grpc_server_started_total{") and 'grpc_method="Authenticate"' in line
    )


def _token_expiry_probe(
    server: EtcdServer, certs: Certificates, interval: float = 0.3, pool: int = 10
) -> Callable[[], bool]:
    """A condition, true once every token last used before this call has expired.

    A token cannot be asked whether it has expired without using it, and using a
    valid token resets its TTL. So this mints ``pool`` probe tokens at a time and
    spends one per check (every ``interval`` s): once one is rejected, every token
    last used before it was minted is expired too, as they share the TTL and etcd
    sweeps them together.
    """
    rpc = load_etcd3().etcdrpc
    client = EtcdClient(
        EtcdConfig(endpoints=((server.get_host(), server.get_port()),), **_https(certs))
    )
    channel = client.etcd3.channel
    login = rpc.AuthenticateRequest(name=USER, password=PASSWORD)
    probes: list[str] = []
    next_check = 0.0

    def expired() -> bool:
        nonlocal next_check
        if time.monotonic() < next_check:
            return False
        next_check = time.monotonic() + interval
        if not probes:
            probes.extend(rpc.AuthStub(channel).Authenticate(login, 5).token for _ in range(pool))
        try:
            rpc.KVStub(channel).Range(
                rpc.RangeRequest(key=b"/rdzv/probe"), 5, metadata=(("token", probes.pop(0)),)
            )
        except grpc.RpcError as err:
            if "invalid auth token" not in (err.details() or ""):
                raise
            client.close()
            return True
        return False

    return expired


def _etcd_log(server: EtcdServer) -> str:
    assert server.data_dir is not None
    return (Path(server.data_dir) / "etcd.log").read_text(errors="replace")


def _https(certs: Certificates, **config: Any) -> dict[str, Any]:
    return {"protocol": "https", "cacert": certs.ca, **config}


def _round(endpoint: str, handlers: list[Any], n: int, **config: Any) -> list[Any]:
    """A full round of ``n`` new nodes; checks it and that the store works."""
    run_id = str(uuid.uuid4())
    handlers.extend(make_handler(endpoint, run_id, n, n, **config) for _ in range(n))
    infos = run_round([ThreadNode(h) for h in handlers[-n:]])
    assert_one_world(infos, n)
    infos[0].store.set("greeting", b"hello")
    assert infos[-1].store.get("greeting") == b"hello"
    return infos


def _secrets(certs: Certificates) -> list[str]:
    """The passwords, and every base64 line of the private keys' PEM bodies."""
    found = [PASSWORD, ROOT_PASSWORD]
    for path in (certs.client_key, certs.expired_client_key, certs.server_key):
        found += [
            line
            for line in Path(path).read_text().splitlines()
            if line and not line.startswith("-----")
        ]
    return found


def _exception_texts(err: BaseException | None) -> Iterator[str]:
    """Message, repr and traceback of ``err`` and of every exception chained to it."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield str(err)
        yield repr(err)
        yield "".join(traceback.format_exception(err))
        err = err.__cause__ or err.__context__


def _assert_no_secrets(
    certs: Certificates, caplog: pytest.LogCaptureFixture, err: BaseException | None
) -> None:
    texts = [
        *(record.getMessage() for record in caplog.records),
        *(record.exc_text or "" for record in caplog.records),
        *(repr(record.args) for record in caplog.records),
        *_exception_texts(err),
    ]
    for secret in _secrets(certs):
        leaks = [text for text in texts if secret in text]
        assert not leaks, f"a secret appears in: {leaks[0][:200]!r}"


# ----------------------------------------------------------------------- TLS
def test_round_over_https(tls_server, certs, handlers, caplog):
    caplog.set_level(logging.DEBUG)
    _round(tls_server.get_endpoint(), handlers, 3, **_https(certs))
    _assert_no_secrets(certs, caplog, None)


def test_round_over_mutual_tls(mtls_server, certs, handlers, caplog):
    caplog.set_level(logging.DEBUG)
    config = _https(certs, cert=certs.client, key=certs.client_key)
    _round(mtls_server.get_endpoint(), handlers, 2, **config)
    _assert_no_secrets(certs, caplog, None)


@dataclass(frozen=True)
class TLSCase:
    server: str  # fixture name
    config: dict[str, str]  # Certificates attribute per rendezvous option
    etcd_says: str | None  # what etcd logs when it rejects the connection


TLS_FAILURES = {
    "wrong-ca": TLSCase("tls_server", {"cacert": "other_ca"}, None),
    "wrong-ca-mutual": TLSCase(
        "mtls_server", {"cacert": "other_ca", "cert": "client", "key": "client_key"}, None
    ),
    "missing-client-cert": TLSCase("mtls_server", {"cacert": "ca"}, "didn't provide a certificate"),
    "expired-client-cert": TLSCase(
        "mtls_server",
        {"cacert": "ca", "cert": "expired_client", "key": "expired_client_key"},
        "certificate has expired",
    ),
}


@pytest.mark.parametrize("case", TLS_FAILURES.values(), ids=TLS_FAILURES.keys())
def test_tls_failure_is_reported_fast_as_such(request, certs, run_id, caplog, case):
    server = request.getfixturevalue(case.server)
    config = {option: getattr(certs, name) for option, name in case.config.items()}
    caplog.set_level(logging.DEBUG)
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError) as failure:
        make_handler(server.get_endpoint(), run_id, 1, 1, protocol="https", **config)
    elapsed = time.monotonic() - start
    message = str(failure.value)
    assert "TLS failure" in message, message
    assert server.get_endpoint() in message
    assert elapsed < TLS_FAILURE_DEADLINE_S, f"took {elapsed:.1f} s: {message}"
    if case.etcd_says is not None:
        # The failure has the intended cause, not merely some TLS failure.
        wait_for(lambda: case.etcd_says in _etcd_log(server), 10, f"etcd to log {case.etcd_says!r}")
    _assert_no_secrets(certs, caplog, failure.value)


def test_plain_http_against_https_etcd_says_tls(tls_server, run_id):
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError) as failure:
        make_handler(tls_server.get_endpoint(), run_id, 1, 1, protocol="http")
    elapsed = time.monotonic() - start
    assert elapsed < TLS_FAILURE_DEADLINE_S
    assert "TLS" in str(failure.value), str(failure.value)


@pytest.mark.parametrize("option", ["cacert", "cert", "key"])
def test_missing_tls_file_is_a_value_error_naming_it(mtls_server, certs, run_id, tmp_path, option):
    config = _https(certs, cert=certs.client, key=certs.client_key)
    config[option] = str(tmp_path / f"no-such-{option}.pem")
    with pytest.raises(ValueError, match=f"no-such-{option}.pem"):
        make_handler(mtls_server.get_endpoint(), run_id, 1, 1, **config)


# ---------------------------------------------------------- authentication
def test_round_with_username_and_password(auth_server, certs, handlers, caplog):
    caplog.set_level(logging.DEBUG)
    config = _https(certs, username=USER, password=PASSWORD)
    _round(auth_server.get_endpoint(), handlers, 3, **config)
    _assert_no_secrets(certs, caplog, None)


@pytest.mark.parametrize("in_params", [(), ("username",)], ids=["both-in-env", "password-in-env"])
def test_round_with_credentials_from_env(auth_server, certs, handlers, monkeypatch, in_params):
    monkeypatch.setenv("RDZV_ETCD_USERNAME", USER)
    monkeypatch.setenv("RDZV_ETCD_PASSWORD", PASSWORD)
    config = _https(certs, **{name: USER for name in in_params})
    _round(auth_server.get_endpoint(), handlers, 2, **config)


def test_cli_reads_with_credentials_from_env(auth_server, certs, run_id, monkeypatch, capsys):
    # The CLI takes them from the environment by the handler's rule.
    monkeypatch.setenv("RDZV_ETCD_USERNAME", USER)
    monkeypatch.setenv("RDZV_ETCD_PASSWORD", PASSWORD)
    status = ["status", "--endpoint", auth_server.get_endpoint(), "--run-id", run_id, "--json",
              "--conf", "protocol=https", "--conf", f"cacert={certs.ca}"]
    assert cli.main(status) == 0
    assert json.loads(capsys.readouterr().out)["status"] == "none"
    monkeypatch.delenv("RDZV_ETCD_PASSWORD")
    assert cli.main(status) == 2
    assert "'username' and 'password'" in capsys.readouterr().err


def test_wrong_password_fails_at_once(auth_server, certs, run_id, caplog):
    caplog.set_level(logging.DEBUG)
    before = _authenticate_calls(auth_server)
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError) as failure:
        make_handler(
            auth_server.get_endpoint(), run_id, 1, 1,
            **_https(certs, username=USER, password=f"not-{PASSWORD}"),
        )  # fmt: skip
    elapsed = time.monotonic() - start
    message = str(failure.value)
    assert "authentication failed" in message, message
    assert elapsed < AUTH_FAILURE_DEADLINE_S, f"took {elapsed:.1f} s"
    # Refused credentials are not retried: etcd saw exactly one attempt.
    assert _authenticate_calls(auth_server) - before == 1
    assert f"not-{PASSWORD}" not in message
    _assert_no_secrets(certs, caplog, failure.value)


def test_no_credentials_against_auth_etcd_says_authentication(auth_server, certs, run_id):
    start = time.monotonic()
    with pytest.raises(RendezvousConnectionError, match="authentication"):
        make_handler(auth_server.get_endpoint(), run_id, 1, 1, **NO_KEEPALIVE, **_https(certs))
    assert time.monotonic() - start < AUTH_FAILURE_DEADLINE_S


@pytest.mark.parametrize(
    "params, env",
    [
        ({"username": USER}, {}),
        ({"password": PASSWORD}, {}),
        ({}, {"RDZV_ETCD_PASSWORD": PASSWORD}),
        ({}, {"RDZV_ETCD_USERNAME": USER}),
    ],
    ids=["username-only", "password-only", "env-password-only", "env-username-only"],
)
def test_only_one_of_username_and_password_is_a_value_error(
    auth_server, certs, run_id, monkeypatch, params, env
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="'username' and 'password'") as failure:
        make_handler(auth_server.get_endpoint(), run_id, 1, 1, **_https(certs, **params))
    assert PASSWORD not in str(failure.value)


def _outside_permissions(endpoint: str, run_id: str, certs: Certificates) -> Any:
    """Run a round as USER under a prefix USER has no permission on (it fails)."""
    config = _https(certs, username=USER, password=PASSWORD)
    handler = make_handler(
        endpoint, run_id, 1, 1, etcd_prefix="/not-granted", **NO_KEEPALIVE, **config
    )
    try:
        return handler.next_rendezvous()
    finally:
        handler.shutdown()


def test_key_outside_the_users_permissions_says_permission_denied(auth_server, certs, run_id):
    with pytest.raises(RendezvousConnectionError) as failure:
        _outside_permissions(auth_server.get_endpoint(), run_id, certs)
    message = str(failure.value)
    assert "permission denied" in message, message
    assert "check username and password" not in message, message


def _lease_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("rdzv-keepalive")}


def test_refused_handler_leaves_no_keepalive_behind(auth_server, certs, run_id):
    before = _lease_threads()
    with pytest.raises(RendezvousConnectionError):
        _outside_permissions(auth_server.get_endpoint(), run_id, certs)
    leaked = _lease_threads() - before
    assert not leaked, f"keep-alive threads still running: {sorted(t.name for t in leaked)}"


def test_idle_handlers_renew_expired_tokens(auth_server, certs, handlers):
    """Handlers idle for longer than the token TTL still complete a round."""
    endpoint = auth_server.get_endpoint()
    config = _https(certs, username=USER, password=PASSWORD)
    run_id = str(uuid.uuid4())
    # Nothing uses their tokens until the round (etcd 3.5 does not check tokens on
    # keep-alives, but later versions may).
    idle = [make_handler(endpoint, run_id, 2, 2, **NO_KEEPALIVE, **config) for _ in range(2)]
    handlers.extend(idle)
    wait_for(_token_expiry_probe(auth_server, certs), 15, "tokens to expire")
    before = _authenticate_calls(auth_server)
    infos = run_round([ThreadNode(h) for h in idle])
    assert_one_world(infos, 2)
    # Each idle handler found its token expired and authenticated again.
    assert _authenticate_calls(auth_server) - before >= len(idle)


def test_round_with_authentication_over_plain_http():
    with EtcdServer() as server:
        _enable_auth(server)
        handlers: list[Any] = []
        try:
            _round(
                server.get_endpoint(), handlers, 1,
                username=USER, password=PASSWORD, connect_timeout=2,
            )  # fmt: skip
        finally:
            for handler in handlers:
                handler.shutdown()


# ------------------------------------------------------------------- secrets
def test_config_repr_hides_the_password(certs):
    config = EtcdConfig(
        endpoints=(("127.0.0.1", 2379),),
        protocol="https",
        cacert=certs.ca,
        cert=certs.client,
        key=certs.client_key,
        username=USER,
        password=PASSWORD,
    )
    for text in (repr(config), str(config), config.describe()):
        assert PASSWORD not in text
    assert USER in repr(config)


@pytest.mark.parametrize(
    "detail, tls",
    [
        ("Ssl handshake failed: SSL_ERROR_SSL: error:1000007d:SSL routines", True),
        ("failed to connect to all addresses; Handshake failed", True),
        ("Socket closed; Unwrap failed (TSI_DATA_CORRUPTED)", True),
        ("x509: certificate signed by unknown authority", True),
        # gRPC's TCP connect step, cut off (a child just after a fork): retried.
        ("connections to all backends failing; last error: UNKNOWN: "
         "ipv4:127.0.0.1:2379: tcp handshaker shutdown", False),
        ("failed to connect to all addresses; Connection refused", False),
    ],
)
def test_tls_failures_are_told_from_connection_failures(detail, tls):
    assert is_tls_failure(detail) is tls
