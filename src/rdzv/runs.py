"""The runs under a prefix, as an operator sees them: list, measure, purge.

``list_runs`` reads every run under an ``etcd_prefix`` with one range request
and one lease query per run; ``purge_run`` and ``purge_idle_runs`` remove runs.
The ``rdzv runs`` and ``rdzv purge`` commands print what these return.

How live a run is comes from its leases (see ``rdzv.keys``): a run's nodes
keep its state lease alive, so the time since that lease's last keep-alive is
the time since the run's last node was seen (``idle_s``), and keys on a node's
own lease (members, confirmations, waiting nodes) mean a node is there now.
"""

from __future__ import annotations

import logging
from typing import Any

from rdzv import _state
from rdzv.api import RendezvousError, RendezvousStateError
from rdzv.client import EtcdClient
from rdzv.config import default_keepalive_interval
from rdzv.keys import DEFAULT_PREFIX, RunKeys, normalize_prefix

__all__ = ["RunIsLiveError", "list_runs", "purge_idle_runs", "purge_run", "run_footprint"]

logger = logging.getLogger(__name__)


class RunIsLiveError(RendezvousError):
    """A purge refused because the run has live nodes (pass ``force`` to purge anyway)."""


def _summary(keys: RunKeys, kvs: list[tuple[bytes, bytes, int, int]], client: EtcdClient
             ) -> dict[str, Any]:
    """What ``list_runs`` reports of one run, from its keys' ``range_records``."""
    run_leases = {keys.data_lease, keys.state_lease}
    state_kv = next((kv for kv in kvs if kv[0] == keys.state), None)
    granted = 0
    status, round_number, state_lease = "none", None, 0
    if state_kv is not None:
        state_lease = state_kv[2]
        try:
            record = _state.decode_state(state_kv[1], keys.state)
            status, round_number = _state.status_name(record.status), record.round
        except RendezvousStateError:
            status = "corrupt"
    members = 0
    if round_number is not None:
        members = sum(1 for key, *_ in kvs if key.startswith(keys.members(round_number)))
    node_keys = sum(1 for _, _, lease, _ in kvs if lease and lease not in run_leases)
    idle_s = None
    if state_lease:
        left, granted = client.lease_ttls(state_lease)
        if left > 0:
            idle_s = max(granted - left, 0)
    # A node keeps the run's leases alive every min(TTL / 4, 60) s. A closed run
    # has no future: only nodes still in it make it live.
    recently_seen = idle_s is not None and (
        idle_s <= 2 * default_keepalive_interval(granted) + 1)
    live = node_keys > 0 or (recently_seen and status != "closed")
    return {
        "run_id": keys.run_id,
        "status": status,
        "round": round_number,
        "members": members,
        "live": live,
        "idle_s": idle_s,
        "last_revision": max((rev for *_, rev in kvs), default=None),
        "keys": len(kvs),
        "bytes": sum(len(key) + len(value) for key, value, *_ in kvs),
    }


def list_runs(client: EtcdClient, prefix: str = DEFAULT_PREFIX) -> list[dict[str, Any]]:
    """Read every run under ``prefix``, sorted by run id.

    Args:
        client: a connection to etcd.
        prefix: the key prefix shared by the runs (``etcd_prefix``).

    Returns:
        One JSON-ready dict per run: ``run_id``; ``status`` (``joinable``,
        ``frozen``, ``final``, ``closed``; ``none`` without a state record,
        ``corrupt`` if it cannot be decoded); ``round``; ``members`` (member keys
        of that round: nodes in it now); ``live`` (a node is in the run, or, if
        it is not closed, kept its lease alive within two keep-alive periods:
        ``min(TTL / 4, 60)`` s each); ``idle_s`` (seconds
        since a node last kept the run alive; None if the run has no state lease);
        ``last_revision`` (the latest change of any of its keys); ``keys`` and
        ``bytes`` (keys and values) it takes in etcd.

    Raises:
        RendezvousConnectionError: etcd cannot be reached.
        ValueError: the prefix is malformed.
    """
    base = normalize_prefix(prefix).encode() + b"/"
    by_run: dict[bytes, list[tuple[bytes, bytes, int, int]]] = {}
    for record in client.range_records(base):
        run, sep, _rest = record[0][len(base):].partition(b"/")
        if sep:
            by_run.setdefault(run, []).append(record)
    runs = []
    for run, kvs in sorted(by_run.items()):
        try:
            keys = RunKeys(prefix, run.decode())
        except (UnicodeDecodeError, ValueError):
            logger.warning("skipping %r under %r: not a run id", run, prefix)
            continue
        runs.append(_summary(keys, kvs, client))
    return runs


def run_footprint(client: EtcdClient, keys: RunKeys) -> dict[str, int]:
    """The keys and bytes (keys and values) that one run takes in etcd.

    Raises:
        RendezvousConnectionError: etcd cannot be reached.
    """
    kvs = client.range(keys.run)
    return {"keys": len(kvs), "bytes": sum(len(k) + len(v) for k, v, _ in kvs)}


def purge_run(client: EtcdClient, run_id: str, prefix: str = DEFAULT_PREFIX,
              force: bool = False) -> dict[str, Any]:
    """Remove every key of one run, and its leases.

    Args:
        client: a connection to etcd.
        run_id: the run's id.
        prefix: the key prefix shared by all runs (``etcd_prefix``).
        force: purge a live run too (its nodes then find their run gone; the
            next ``next_rendezvous()`` starts it anew from round 0).

    Returns:
        The run's ``list_runs`` entry, read before the purge, with ``purged``:
        how many keys were removed.

    Raises:
        RunIsLiveError: the run is live and ``force`` is not set.
        LookupError: there is no such run.
        RendezvousConnectionError: etcd cannot be reached.
        ValueError: the run id or prefix is malformed.
    """
    keys = RunKeys(prefix, run_id)
    kvs = client.range_records(keys.run)
    if not kvs:
        raise LookupError(
            f"no run {run_id!r} under {normalize_prefix(prefix) or '/'!r}; "
            "'rdzv runs' lists the runs there")
    summary = _summary(keys, kvs, client)
    if summary["live"] and not force:
        raise RunIsLiveError(
            f"run {run_id!r} is live ({summary['members']} member(s), last seen "
            f"{summary['idle_s'] or 0} s ago); close it first, or purge with force")
    for lease in (keys.data_lease, keys.state_lease):
        client.lease_revoke(lease)
    # Keys on no lease or on nodes' leases (written by an older rdzv, or of
    # nodes still alive under force).
    client.delete(keys.run, prefix=True)
    logger.info("purged run %r (%d keys)", run_id, summary["keys"])
    return summary | {"purged": summary["keys"]}


def purge_idle_runs(client: EtcdClient, idle_for: float, prefix: str = DEFAULT_PREFIX
                    ) -> list[dict[str, Any]]:
    """Remove every run under ``prefix`` that no node kept alive for ``idle_for`` s.

    Runs that are live are kept; so are runs whose idle time is unknown (no
    state lease: an older rdzv's) only if a node is in them.

    Args:
        client: a connection to etcd.
        idle_for: seconds; at least 0.
        prefix: the key prefix shared by the runs.

    Returns:
        The ``list_runs`` entries of the purged runs.

    Raises:
        ValueError: ``idle_for`` is negative, or the prefix is malformed.
        RendezvousConnectionError: etcd cannot be reached.
    """
    if not idle_for >= 0:
        raise ValueError(f"the idle time must be 0 or more seconds, got {idle_for!r}")
    purged = []
    for run in list_runs(client, prefix):
        if run["live"] or (run["idle_s"] is not None and run["idle_s"] < idle_for):
            continue
        try:
            purged.append(purge_run(client, run["run_id"], prefix))
        except (LookupError, RunIsLiveError) as err:  # it changed since it was listed
            logger.info("kept run %r: %s", run["run_id"], err)
    return purged
