"""Transactions as plain tuples, and the etcd v3 requests and results they map to.

The core and the store describe a transaction as tuples, which keeps protobuf and
I/O out of them; this module alone turns those tuples into etcd's ``TxnRequest``
(or ``RangeRequest``) messages and etcd's answers back into plain values. It does
no I/O: ``EtcdClient.txn`` sends what it builds.

compares
    ``("mod", key, rev)``: the key's mod_revision equals ``rev`` (0: absent);
    ``("create", key, rev)``: its create_revision equals ``rev`` (0: absent);
    ``("value", key, value)``: the key holds ``value`` (an absent key fails).
operations
    ``("get", key)`` -> ``(value, mod_revision, create_revision)`` or ``None``;
    ``("count", prefix[, max_create_revision])`` -> number of keys under
    ``prefix`` (created at or before ``max_create_revision`` if given);
    ``("range", prefix, limit[, keys_only])`` -> ``[(key, value,
    create_revision), ...]`` in creation order (values empty with
    ``keys_only``); ``("list", prefix, limit)`` -> ``(count, [key, ...])``: how
    many keys are under ``prefix`` and the first ``limit`` of them, in one read;
    ``("put", key, value, lease)`` -> ``None``;
    ``("delete", key[, range_end])`` -> number of keys deleted (with
    ``range_end``: every key in ``[key, range_end)``);
    ``("txn", compares, success, failure)`` -> ``(succeeded, results)``: a
    transaction inside the transaction. etcd decides its compares on what the
    keys held before the outer transaction's writes, and runs its branch in
    place, at the same revision.

``rpc`` below is etcd3's generated protobuf module (``etcd3.etcdrpc``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "READ_OPS",
    "compare_holds",
    "is_read_only",
    "merge_unconditional",
    "prefix_end",
    "range_request",
    "range_result",
    "request_op",
    "txn_ops",
    "txn_request",
    "txn_results",
]

#: The operations that only read.
READ_OPS = ("get", "count", "range", "list")


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def is_read_only(success: Sequence[Sequence[Any]], failure: Sequence[Sequence[Any]]) -> bool:
    """Whether neither branch of a transaction writes."""
    return all(
        op[0] in READ_OPS or (op[0] == "txn" and is_read_only(op[2], op[3]))
        for op in (*success, *failure)
    )


def txn_ops(
    compares: Sequence[Sequence[Any]],
    success: Sequence[Sequence[Any]],
    failure: Sequence[Sequence[Any]],
) -> int:
    """The smallest ``--max-txn-ops`` under which etcd takes this transaction.

    etcd checks the longest of a transaction's three lists against its limit,
    and each transaction inside it against what that length leaves of the
    limit: a branch of 128 operations (the default limit) can hold no inner
    transaction at all.
    """
    longest = max(len(compares), len(success), len(failure))
    inner = [txn_ops(op[1], op[2], op[3]) for op in (*success, *failure) if op[0] == "txn"]
    return longest + max(inner, default=0)


def merge_unconditional(
    parts: Sequence[Sequence[Sequence[Any]]], max_ops: int
) -> list[tuple[list[Sequence[Any]], list[tuple[int, list[int]]]]]:
    """Group unconditional transactions into as few transactions as possible.

    Each part is the operations of a transaction without compares (it always
    runs its success branch), gets and puts only. Parts that touch no key
    another part of their group puts run as one transaction exactly as they
    would one after the other: each get reads what it would alone, and the
    puts land together. Gets of the same key are sent once.

    Args:
        parts: the parts' operations, ``("get", key)`` and ``("put", ...)``.
        max_ops: the most operations one merged transaction may hold (etcd's
            ``--max-txn-ops``, 128 by default).

    Returns:
        ``[(ops, picks), ...]``: per merged transaction, its operations, and
        for each of its parts ``(index in parts, [index in ops of each of the
        part's operations])``, in the order of ``parts``.

    Raises:
        ValueError: a part has an operation other than a get or a put, or
            more than ``max_ops`` operations.
    """
    groups: list[tuple[list[Sequence[Any]], list[tuple[int, list[int]]]]] = []
    ops: list[Sequence[Any]] = []
    picks: list[tuple[int, list[int]]] = []
    gets: dict[bytes, int] = {}
    puts: set[bytes] = set()
    for index, part in enumerate(parts):
        for op in part:
            if op[0] not in ("get", "put"):
                raise ValueError(f"only gets and puts can be merged, not {op[0]!r}")
        if len(part) > max_ops:
            raise ValueError(f"a part of {len(part)} operations exceeds max_ops={max_ops}")
        part_gets = {op[1] for op in part if op[0] == "get"}
        part_puts = {op[1] for op in part if op[0] == "put"}
        new_ops = sum(1 for op in part if op[0] == "put" or op[1] not in gets)
        if ops and (len(ops) + new_ops > max_ops or not part_puts.isdisjoint(puts)
                    or not part_puts.isdisjoint(gets) or not part_gets.isdisjoint(puts)):
            groups.append((ops, picks))
            ops, picks, gets, puts = [], [], {}, set()
        pick = []
        for op in part:
            if op[0] == "get":
                at = gets.get(op[1])
                if at is None:
                    at = gets[op[1]] = len(ops)
                    ops.append(op)
            else:
                at = len(ops)
                ops.append(op)
            pick.append(at)
        puts |= part_puts
        picks.append((index, pick))
    if ops:
        groups.append((ops, picks))
    return groups


def txn_request(
    rpc: Any,
    compares: Sequence[Sequence[Any]],
    success: Sequence[Sequence[Any]],
    failure: Sequence[Sequence[Any]] = (),
) -> Any:
    """The etcd ``TxnRequest`` a transaction given as tuples is sent as.

    Args:
        rpc: etcd3's generated protobuf module (``etcd3.etcdrpc``).
        compares, success, failure: as the module docstring says.

    Raises:
        ValueError: a compare or operation of an unknown kind.
    """
    return rpc.TxnRequest(
        compare=[_compare(rpc, c) for c in compares],
        success=[request_op(rpc, o) for o in success],
        failure=[request_op(rpc, o) for o in failure],
    )


def range_request(rpc: Any, prefix: bytes, limit: int, keys_only: bool = False) -> Any:
    """A read of the keys under ``prefix`` in creation order, at most ``limit`` (0: all)."""
    return rpc.RangeRequest(
        key=prefix,
        range_end=prefix_end(prefix),
        limit=limit,
        keys_only=keys_only,
        sort_order=rpc.RangeRequest.ASCEND,
        sort_target=rpc.RangeRequest.CREATE,
    )


def request_op(rpc: Any, op: Sequence[Any]) -> Any:
    """The ``RequestOp`` of one operation tuple.

    Raises:
        ValueError: the operation's kind is unknown.
    """
    kind = op[0]
    if kind == "get":
        return rpc.RequestOp(request_range=rpc.RangeRequest(key=op[1]))
    if kind == "count":
        request = rpc.RangeRequest(key=op[1], range_end=prefix_end(op[1]), count_only=True)
        if len(op) > 2:
            request.max_create_revision = op[2]
        return rpc.RequestOp(request_range=request)
    if kind == "range":
        keys_only = len(op) > 3 and bool(op[3])
        return rpc.RequestOp(request_range=range_request(rpc, op[1], op[2], keys_only))
    if kind == "list":
        return rpc.RequestOp(request_range=range_request(rpc, op[1], op[2], True))
    if kind == "put":
        return rpc.RequestOp(
            request_put=rpc.PutRequest(key=op[1], value=op[2], lease=op[3])
        )
    if kind == "delete":
        request = rpc.DeleteRangeRequest(key=op[1])
        if len(op) > 2:
            request.range_end = op[2]
        return rpc.RequestOp(request_delete_range=request)
    if kind == "txn":
        return rpc.RequestOp(request_txn=txn_request(rpc, op[1], op[2], op[3]))
    raise ValueError(f"unknown transaction operation {kind!r}")


def _compare(rpc: Any, compare: Sequence[Any]) -> Any:
    kind, key, expected = compare
    if kind == "mod":
        return rpc.Compare(
            key=key,
            result=rpc.Compare.EQUAL,
            target=rpc.Compare.MOD,
            mod_revision=expected,
        )
    if kind == "create":
        return rpc.Compare(
            key=key,
            result=rpc.Compare.EQUAL,
            target=rpc.Compare.CREATE,
            create_revision=expected,
        )
    if kind == "value":
        return rpc.Compare(
            key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.VALUE, value=expected
        )
    raise ValueError(f"unknown transaction compare {kind!r}")


def txn_results(ops: Sequence[Sequence[Any]], responses: Sequence[Any]) -> list[Any]:
    """The results of the branch ``ops`` that ran, from the ``TxnResponse``'s
    ``responses``, shaped as the module docstring says."""
    results: list[Any] = []
    for op, item in zip(ops, responses, strict=True):
        kind = op[0]
        if kind == "delete":
            results.append(item.response_delete_range.deleted)
        elif kind == "put":
            results.append(None)
        elif kind == "txn":
            inner = item.response_txn
            branch = op[2] if inner.succeeded else op[3]
            results.append((inner.succeeded, txn_results(branch, inner.responses)))
        else:
            results.append(range_result(kind, item.response_range))
    return results


def range_result(kind: str, response: Any) -> Any:
    """A read's result from its ``RangeResponse``, shaped as the module docstring
    says for ``kind``."""
    if kind == "get":
        kvs = response.kvs
        return (kvs[0].value, kvs[0].mod_revision, kvs[0].create_revision) if kvs else None
    if kind == "count":
        return response.count
    if kind == "list":
        return response.count, [kv.key for kv in response.kvs]
    return [(kv.key, kv.value, kv.create_revision) for kv in response.kvs]


def compare_holds(kind: str, kvs: Sequence[Any], expected: Any) -> bool:
    """Whether a compare holds for the key's read ``kvs``, as etcd decides it:
    an absent key has revisions 0 and fails every value compare.

    Raises:
        ValueError: the compare's kind is unknown.
    """
    if kind == "value":
        return bool(kvs) and kvs[0].value == expected
    if kind == "mod":
        return (kvs[0].mod_revision if kvs else 0) == expected
    if kind == "create":
        return (kvs[0].create_revision if kvs else 0) == expected
    raise ValueError(f"unknown transaction compare {kind!r}")
