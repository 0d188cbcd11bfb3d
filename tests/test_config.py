"""The configuration rules, each in one place: durations, credentials from the
environment, a round's bounds and the options, read the same way by the handler,
the store and the CLI. No etcd is needed: every rule is checked before any I/O."""

from __future__ import annotations

import datetime
import math
from typing import Any

import pytest

from rdzv import cli
from rdzv.api import RendezvousParameters
from rdzv.config import (
    DEFAULT_CONNECT_TIMEOUT,
    MAX_LEASE_TTL,
    MAX_NODES,
    MAX_SECONDS,
    EtcdConfig,
    RendezvousOptions,
    check_node_bounds,
    default_keepalive_interval,
    environment_credentials,
    parse_seconds,
)
from rdzv.etcd_store import EtcdStore

A_YEAR = 365 * 24 * 3600


def _params(*, min_nodes: int = 1, max_nodes: int = 2, **options: Any) -> RendezvousParameters:
    return RendezvousParameters("etcd3", "127.0.0.1:1", "run", min_nodes, max_nodes, **options)


@pytest.mark.parametrize(
    "value, seconds",
    [(5, 5.0), (0.25, 0.25), ("1.5", 1.5), (" 7 ", 7.0), (datetime.timedelta(minutes=2), 120.0),
     (A_YEAR, float(A_YEAR)), (str(A_YEAR), float(A_YEAR))],
)
def test_a_duration_is_a_number_text_or_timedelta(value: Any, seconds: float) -> None:
    assert parse_seconds(value, "The x") == seconds


@pytest.mark.parametrize(
    "value",
    [0, -1, "0", "soon", "", None, True, False, b"5", [5], math.nan, math.inf, "inf", "1e400",
     A_YEAR + 1, f"{A_YEAR}.5", datetime.timedelta(0), datetime.timedelta(days=366)],
)
def test_a_bad_duration_is_refused_with_the_one_message(value: Any) -> None:
    with pytest.raises(ValueError) as raised:
        parse_seconds(value, "The x")
    assert str(raised.value) == (
        f"The x must be a positive number of seconds, at most {MAX_SECONDS:.0f} (a year), "
        f"got {value!r}."
    )


def test_the_handler_the_store_and_etcds_config_share_the_rule() -> None:
    messages = []
    with pytest.raises(ValueError) as raised:
        RendezvousOptions.from_params(_params(store_timeout=A_YEAR + 1))
    messages.append(str(raised.value))
    with pytest.raises(ValueError) as raised:
        EtcdConfig(endpoints=(("h", 1),), connect_timeout=A_YEAR + 1)
    messages.append(str(raised.value))
    # The store checks its timeout before it ever uses the client.
    with pytest.raises(ValueError) as raised:
        EtcdStore(None, "/p/", timeout=A_YEAR + 1)  # type: ignore[arg-type]
    messages.append(str(raised.value))
    tail = f" must be a positive number of seconds, at most {MAX_SECONDS:.0f} (a year), got "
    assert [m.split(tail)[0] for m in messages] == [
        "The rendezvous option 'store_timeout'", "'connect_timeout'", "The store timeout"
    ]
    assert all(m.endswith(f"{tail}{A_YEAR + 1!r}.") for m in messages)


@pytest.mark.parametrize("value, accepted", [
    (2, 2), ("10", 10), (MAX_LEASE_TTL, MAX_LEASE_TTL), (1, None), (2.0, None), ("2.5", None),
    (MAX_LEASE_TTL + 1, None), (True, None), ("\uff11\uff10", None),
])
def test_lease_ttl_is_whole_seconds_up_to_etcds_limit(value: Any, accepted: int | None) -> None:
    params = _params(lease_ttl=value, keepalive_interval=0.5)
    if accepted is not None:
        assert RendezvousOptions.from_params(params).lease_ttl == accepted
        return
    with pytest.raises(ValueError, match=r"'lease_ttl' must be a whole number of seconds from 2 "
                       r"to 9000000000 \(about 285 years, etcd's limit\)"):
        RendezvousOptions.from_params(params)


def test_options_get_their_defaults_and_are_read_once() -> None:
    options = RendezvousOptions.from_params(_params(lease_ttl=400, closed_run_grace="0.5"))
    assert options.etcd.endpoints == (("127.0.0.1", 1),)
    assert options.etcd.connect_timeout == DEFAULT_CONNECT_TIMEOUT
    assert options.keepalive_interval == 60.0  # lease_ttl / 4, at most a minute
    assert default_keepalive_interval(8) == 2.0  # the same rule for the run's leases
    assert options.closed_run_grace == 1  # whole seconds, rounded up
    assert (options.timeout, options.last_call_timeout, options.store_timeout) == (600, 30, 300)
    assert options.etcd_prefix == "/rdzv"
    assert options.rank_order == "stable"
    assert options.lease_scope == "node"


def test_lease_scope_is_node_or_process() -> None:
    assert RendezvousOptions.from_params(_params(lease_scope="process")).lease_scope == "process"
    with pytest.raises(ValueError, match="'lease_scope' must be one of node, process, got 'host'"):
        RendezvousOptions.from_params(_params(lease_scope="host"))


def test_credentials_come_from_the_environment_where_options_leave_them_out() -> None:
    environ = {"RDZV_ETCD_USERNAME": "env-user", "RDZV_ETCD_PASSWORD": "env-pw"}
    assert environment_credentials({}, environ) == {"username": "env-user", "password": "env-pw"}
    assert environment_credentials({"username": "u", "password": None}, environ) == {
        "password": "env-pw"
    }
    assert environment_credentials({}, {"RDZV_ETCD_USERNAME": ""}) == {}
    params = _params()
    options = RendezvousOptions.from_params(params, environ)
    assert (options.etcd.username, options.etcd.password) == ("env-user", "env-pw")
    assert "password" not in params.config  # the caller's parameters hold no password


def test_one_credential_from_the_environment_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="'username' and 'password'"):
        RendezvousOptions.from_params(_params(), {"RDZV_ETCD_USERNAME": "only-user"})


@pytest.mark.parametrize("low, high, message", [
    (0, 1, r"minimum number of rendezvous nodes \(0\) must be greater than zero"),
    (3, 2, r"maximum number of rendezvous nodes \(2\) must be greater than or equal"),
    (1, MAX_NODES + 1, rf"max_nodes={MAX_NODES + 1} is more than {MAX_NODES} nodes"),
    (1.0, 2, "min_nodes must be an integer"),
    (1, True, "max_nodes must be an integer"),
])
def test_a_rounds_bounds_are_checked_by_one_rule(low: Any, high: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_node_bounds(low, high)
    with pytest.raises(ValueError, match=message):
        _params(min_nodes=low, max_nodes=high)


def test_keepalive_interval_has_a_floor_and_stays_below_lease_ttl() -> None:
    with pytest.raises(ValueError, match=r"'keepalive_interval' must be a number of seconds of "
                       r"at least 0\.05, at most 31536000 \(a year\), got 0\.01"):
        RendezvousOptions.from_params(_params(keepalive_interval=0.01))
    with pytest.raises(ValueError, match=r"keepalive_interval \(10 s\) must be shorter"):
        RendezvousOptions.from_params(_params(keepalive_interval=10))


def test_the_cli_reads_durations_and_bounds_by_the_same_rules(
    capsys: pytest.CaptureFixture[str],
) -> None:
    join = ["join", "--endpoint", "127.0.0.1:1", "--run-id", "r"]
    assert cli.main([*join, "--nnodes", "2", "--timeout", str(A_YEAR + 1)]) == 2
    assert f"at most {MAX_SECONDS:.0f} (a year), got '{A_YEAR + 1}'" in capsys.readouterr().err
    assert cli.main([*join, "--nnodes", f"1:{MAX_NODES + 1}"]) == 2
    assert f"is more than {MAX_NODES} nodes" in capsys.readouterr().err
