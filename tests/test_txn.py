"""The translation of rdzv's transaction tuples to etcd v3 messages and back, without
a server: what each tuple is sent as, and what each answer reads as."""

from __future__ import annotations

from typing import Any

import pytest

from rdzv._etcd3_compat import load_etcd3
from rdzv.txn import (
    compare_holds,
    is_read_only,
    merge_unconditional,
    prefix_end,
    range_result,
    request_op,
    txn_request,
    txn_results,
)

rpc = load_etcd3().etcdrpc


def _kvs(*records: tuple[bytes, bytes, int, int]) -> Any:
    response = rpc.RangeResponse(count=len(records))
    for key, value, mod, create in records:
        response.kvs.add(key=key, value=value, mod_revision=mod, create_revision=create)
    return response


@pytest.mark.parametrize("prefix, end", [
    (b"/a/", b"/a0"), (b"a\xff", b"b"), (b"a\xff\xff", b"b"), (b"\xff", b"\0"), (b"", b"\0"),
])
def test_prefix_end_is_the_first_key_after_the_prefix(prefix: bytes, end: bytes) -> None:
    assert prefix_end(prefix) == end


def test_a_transaction_is_sent_as_its_compares_and_branches() -> None:
    request = txn_request(
        rpc,
        [("mod", b"/s", 7), ("create", b"/m", 0), ("value", b"/v", b"x")],
        [("put", b"/s", b"new", 42), ("delete", b"/r/", b"/r0"), ("count", b"/m/", 9)],
        [("get", b"/s")],
    )
    mod, create, value = request.compare
    assert (mod.key, mod.target, mod.mod_revision) == (b"/s", rpc.Compare.MOD, 7)
    assert (create.target, create.create_revision) == (rpc.Compare.CREATE, 0)
    assert (value.target, value.value) == (rpc.Compare.VALUE, b"x")
    assert all(c.result == rpc.Compare.EQUAL for c in request.compare)
    put, delete, count = request.success
    assert (put.request_put.key, put.request_put.value, put.request_put.lease) == (
        b"/s", b"new", 42)
    assert (delete.request_delete_range.key, delete.request_delete_range.range_end) == (
        b"/r/", b"/r0")
    assert count.request_range.count_only
    assert (count.request_range.range_end, count.request_range.max_create_revision) == (
        b"/m0", 9)
    (get,) = request.failure
    assert (get.request_range.key, get.request_range.range_end) == (b"/s", b"")


@pytest.mark.parametrize("op, keys_only", [
    (("range", b"/p/", 5), False), (("range", b"/p/", 5, True), True), (("list", b"/p/", 5), True),
])
def test_ranges_read_in_creation_order(op: tuple[Any, ...], keys_only: bool) -> None:
    request = request_op(rpc, op).request_range
    assert (request.key, request.range_end, request.limit) == (b"/p/", b"/p0", 5)
    assert request.keys_only is keys_only
    assert request.sort_target == rpc.RangeRequest.CREATE
    assert request.sort_order == rpc.RangeRequest.ASCEND


def test_unknown_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown transaction operation 'append'"):
        txn_request(rpc, [], [("append", b"k", b"v")])
    with pytest.raises(ValueError, match="unknown transaction compare 'lease'"):
        txn_request(rpc, [("lease", b"k", 1)], [])
    with pytest.raises(ValueError, match="unknown transaction compare 'lease'"):
        compare_holds("lease", [], 1)


def test_answers_read_back_as_plain_values() -> None:
    found = _kvs((b"/a", b"v", 3, 2), (b"/b", b"w", 5, 4))
    assert range_result("get", found) == (b"v", 3, 2)
    assert range_result("get", _kvs()) is None
    assert range_result("count", rpc.RangeResponse(count=12)) == 12
    assert range_result("list", found) == (2, [b"/a", b"/b"])
    assert range_result("range", found) == [(b"/a", b"v", 2), (b"/b", b"w", 4)]
    responses = [
        rpc.ResponseOp(response_put=rpc.PutResponse()),
        rpc.ResponseOp(response_delete_range=rpc.DeleteRangeResponse(deleted=3)),
        rpc.ResponseOp(response_range=found),
    ]
    ops = [("put", b"/a", b"v", 0), ("delete", b"/r/", b"/r0"), ("get", b"/a")]
    assert txn_results(ops, responses) == [None, 3, (b"v", 3, 2)]
    with pytest.raises(ValueError):  # an answer that does not match its branch
        txn_results(ops, responses[:2])


def test_compares_are_decided_as_etcd_decides_them() -> None:
    present = _kvs((b"/k", b"v", 8, 6)).kvs
    assert compare_holds("mod", present, 8) and not compare_holds("mod", present, 6)
    assert compare_holds("create", present, 6)
    assert compare_holds("value", present, b"v") and not compare_holds("value", present, b"w")
    # An absent key has revisions 0 and no value.
    assert compare_holds("mod", [], 0) and compare_holds("create", [], 0)
    assert not compare_holds("value", [], b"")


def test_only_transactions_without_writes_are_read_only() -> None:
    assert is_read_only([("get", b"k"), ("count", b"p")], [("range", b"p", 1), ("list", b"p", 1)])
    assert not is_read_only([("get", b"k")], [("put", b"k", b"v", 0)])
    assert not is_read_only([("delete", b"k")], [])
    # A transaction inside one writes if either of its branches does.
    assert is_read_only([("txn", [], [("get", b"k")], [("count", b"p")])], [])
    assert not is_read_only([("txn", [], [("get", b"k")], [("put", b"k", b"v", 0)])], [])


def test_a_nested_transaction_is_sent_and_read_back_as_one() -> None:
    op = ("txn", [("create", b"/c", 0)], [("put", b"/c", b"me", 7), ("count", b"/m/")],
          [("get", b"/c")])
    sent = request_op(rpc, op).request_txn
    assert sent.compare[0].key == b"/c" and sent.compare[0].create_revision == 0
    assert sent.success[0].request_put.lease == 7
    assert sent.success[1].request_range.count_only
    assert sent.failure[0].request_range.key == b"/c"
    took = rpc.ResponseOp(response_txn=rpc.TxnResponse(succeeded=True, responses=[
        rpc.ResponseOp(response_put=rpc.PutResponse()),
        rpc.ResponseOp(response_range=rpc.RangeResponse(count=5))]))
    assert txn_results([op], [took]) == [(True, [None, 5])]
    held = rpc.ResponseOp(response_txn=rpc.TxnResponse(succeeded=False, responses=[
        rpc.ResponseOp(response_range=_kvs((b"/c", b"other", 4, 4)))]))
    assert txn_results([op], [held]) == [(False, [(b"other", 4, 4)])]


def _confirm(node: int, shard: int) -> list[tuple[Any, ...]]:
    return [("get", b"shard/%d" % shard), ("put", b"confirmed/%d" % node, b"", node)]


def test_unconditional_transactions_merge_with_each_get_sent_once() -> None:
    parts = [_confirm(node, node % 2) for node in range(5)]
    ((ops, picks),) = merge_unconditional(parts, 128)
    assert ops.count(("get", b"shard/0")) == ops.count(("get", b"shard/1")) == 1
    assert len(ops) == 2 + 5
    # Each part reads back its own operations' results, in its own order.
    for index, pick in picks:
        assert [ops[i] for i in pick] == parts[index]
    assert [index for index, _ in picks] == list(range(5))


def test_merged_transactions_stay_within_the_operations_etcd_takes() -> None:
    parts = [_confirm(node, node) for node in range(100)]
    groups = merge_unconditional(parts, 128)
    assert [len(ops) for ops, _ in groups] == [128, 72]
    assert [index for _, picks in groups for index, _ in picks] == list(range(100))
    with pytest.raises(ValueError, match="exceeds max_ops=1"):
        merge_unconditional(parts, 1)


def test_parts_that_touch_a_key_another_puts_go_in_another_transaction() -> None:
    # A second put of the same key, a read of a key put before, a put of a
    # key read before: each run alone would see what the merge would hide.
    parts = [
        [("put", b"a", b"1", 0)],
        [("put", b"a", b"2", 0)],
        [("get", b"a")],
        [("get", b"b")],
        [("put", b"b", b"3", 0)],
    ]
    groups = merge_unconditional(parts, 128)
    assert [[index for index, _ in picks] for _, picks in groups] == [[0], [1], [2, 3], [4]]


def test_only_gets_and_puts_merge() -> None:
    with pytest.raises(ValueError, match="not 'delete'"):
        merge_unconditional([[("get", b"a")], [("delete", b"a")]], 128)
