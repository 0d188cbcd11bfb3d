"""Sans-I/O tests of the compiled core: codecs, transition table, rank assignment."""

import ast
import enum
import random
from pathlib import Path

import pytest

import rdzv._state as core
from rdzv.api import RendezvousStateError
from rdzv.keys import RunKeys
from rdzv.txn import txn_ops

Status = core.Status
Event = core.Event


def test_core_is_the_compiled_extension():
    assert core.__file__.endswith((".so", ".pyd")), core.__file__


def record(status, round=0, min_nodes=2, max_nodes=4, cutoff=0, world=0, last_final=-1):
    return core.StateRecord(round, status, min_nodes, max_nodes, cutoff, world, last_final)


@pytest.mark.parametrize(
    "rec",
    [
        record(Status.JOINABLE),
        record(Status.FROZEN, round=7, cutoff=123, world=3, last_final=5),
        record(Status.FINAL, round=2**40, min_nodes=1, max_nodes=10**6, cutoff=9, world=10**6),
        record(Status.CLOSED, round=3, last_final=2),
    ],
)
def test_state_record_round_trips(rec):
    assert core.decode_state(rec.encode(), b"/p/r/state") == rec


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "not an rdzv version-1 record"),
        (b"rdzv2 round=0", "not an rdzv version-1 record"),
        (b"\xff\xfe garbage", "not an rdzv version-1 record"),
        (record(Status.JOINABLE).encode()[:-1], "bad last_final"),
        (record(Status.JOINABLE).encode().replace(b"joinable", b"melted"), "unknown status"),
        (record(Status.JOINABLE).encode().replace(b"round=0", b"round=-1"), "outside [0,"),
        (record(Status.JOINABLE).encode().replace(b"min=2", b"min=9"), "min=9 > max=4"),
        (record(Status.FROZEN, cutoff=5, world=1).encode(), "outside"),
        (record(Status.JOINABLE).encode() + b" extra=1", "fields"),
        (record(Status.JOINABLE).encode().replace(b"max=", b"mix="), "expected field 'max'"),
    ],
)
def test_bad_state_record_names_the_key(data, fragment):
    with pytest.raises(RendezvousStateError) as info:
        core.decode_state(data, b"/p/run/state")
    assert "/p/run/state" in str(info.value)
    assert fragment in str(info.value)


# The whole table: every (status, event) pair either moves where the protocol
# says or is refused.
EXPECTED = {
    (Status.NONE, Event.OPEN): (Status.JOINABLE, 0),
    (Status.NONE, Event.CLOSE): (Status.CLOSED, 0),
    (Status.JOINABLE, Event.FREEZE): (Status.FROZEN, 0),
    (Status.JOINABLE, Event.CLOSE): (Status.CLOSED, 0),
    (Status.FROZEN, Event.FINALIZE): (Status.FINAL, 0),
    (Status.FROZEN, Event.RESTART): (Status.JOINABLE, 1),
    (Status.FROZEN, Event.CLOSE): (Status.CLOSED, 0),
    (Status.FINAL, Event.OPEN): (Status.JOINABLE, 1),
    (Status.FINAL, Event.CLOSE): (Status.CLOSED, 0),
}


@pytest.mark.parametrize("status", list(Status))
@pytest.mark.parametrize("event", list(Event))
def test_transition_table(status, event):
    rec = None if status == Status.NONE else record(status, round=4, cutoff=10, world=3)
    expected = EXPECTED.get((status, event))
    if expected is None:
        with pytest.raises(core.TransitionError):
            core.transition(rec, event)
        return
    new = core.transition(rec, event, cutoff=10, world_size=3)
    assert new.status == expected[0]
    assert new.round == (rec.round if rec else 0) + expected[1]
    # Only rounds that completed become last_final.
    if status == Status.FINAL and event == Event.OPEN:
        assert new.last_final == rec.round
    elif rec is not None:
        assert new.last_final == rec.last_final


# The node machine's phases: every (phase, move) pair either moves where a node
# can go or is refused.
Phase, Move = core.Phase, core.Move
_ANY_ROUND_PHASE = (Phase.IDLE, Phase.JOINED, Phase.CONFIRMED, Phase.WAITING)
PHASES_EXPECTED = {
    **{(phase, Move.BEGIN): Phase.IDLE for phase in Phase},
    **{(phase, Move.LEAVE): Phase.IDLE for phase in Phase},
    **{(phase, Move.JOIN): Phase.JOINED for phase in _ANY_ROUND_PHASE},
    **{(phase, Move.REGISTER): Phase.WAITING for phase in _ANY_ROUND_PHASE},
    (Phase.JOINED, Move.CONFIRM): Phase.CONFIRMED,
    (Phase.JOINED, Move.SURPLUS): Phase.IDLE,
    (Phase.CONFIRMED, Move.COMPLETE): Phase.DONE,
}


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("move", list(Move))
def test_phase_table(phase, move):
    expected = PHASES_EXPECTED.get((phase, move))
    if expected is None:
        with pytest.raises(core.TransitionError, match="cannot"):
            core.phase_after(phase, move)
        return
    assert core.phase_after(phase, move) == expected


def test_rounds_only_grow_through_any_path():
    rec = record(Status.JOINABLE)
    seen = [rec.round]
    for event in (Event.FREEZE, Event.RESTART, Event.FREEZE, Event.FINALIZE, Event.OPEN):
        rec = rec.transition(event, cutoff=1, world_size=2)
        seen.append(rec.round)
    assert seen == sorted(seen) and seen[-1] == 2


def members(*descriptors):
    return [(f"id{i}", core.encode_member(host, addr, pid, 1000 + i))
            for i, (host, addr, pid) in enumerate(descriptors)]


def test_fresh_world_ranks_are_host_major_and_deterministic():
    joined = members(("b", "b", 1), ("a", "a", 7), ("b", "b", 0), ("a", "a", 3))
    ranks = core.assign_ranks(joined, [], 4)
    assert ranks == ["id3", "id1", "id2", "id0"]  # a/3, a/7, b/0, b/1
    assert core.assign_ranks(list(reversed(joined)), [], 4) == ranks


def test_world_is_the_first_max_nodes_joiners():
    joined = members(*[(f"h{i}", "x", i) for i in range(6)])
    assert sorted(core.assign_ranks(joined, [], 4)) == ["id0", "id1", "id2", "id3"]


def test_survivors_keep_their_ranks():
    joined = members(("z", "z", 0), ("y", "y", 0), ("x", "x", 0), ("new", "new", 0))
    previous = ["gone", "id0", "id1", "id2"]  # id0 had rank 1, id1 rank 2, id2 rank 3
    ranks = core.assign_ranks(joined, previous, 4)
    assert ranks[1:] == ["id0", "id1", "id2"]
    assert ranks[0] == "id3"


def test_survivor_whose_rank_no_longer_exists_is_renumbered():
    joined = members(("a", "a", 0), ("b", "b", 0))
    previous = ["gone1", "gone2", "id0", "id1"]  # both survivors had ranks >= 2
    assert sorted(core.assign_ranks(joined, previous, 4)) == ["id0", "id1"]
    assert core.assign_ranks(joined, previous, 4) == ["id0", "id1"]


def test_world_and_member_codecs():
    record = core.encode_world(5, 812, 1000, "::1", 29500)
    assert core.decode_world(record, b"k") == (5, 812, 1000, "::1", 29500)
    for bad in (b"", b"rdzv1-world round=x cutoff=1 size=1 master=h,1", b"junk",
                b"rdzv1-world round=1 cutoff=1 size=1 master=h",
                b"rdzv1-world round=1 size=1 master=h,1",
                b"rdzv1-world round=1 cutoff=1 size=2147483648 master=h,1"):
        with pytest.raises(RendezvousStateError, match="k"):
            core.decode_world(bad, b"k")
    shard = core.encode_rank_shard(5, [("a", 3), ("b", 0)], "h", 1)
    assert core.decode_rank_shard(shard, b"k") == (5, {"a": 3, "b": 0}, "h", 1)
    for bad in (b"rdzv1-ranks round=5 master=h,1 ids=a:1,a:2",
                b"rdzv1-ranks round=5 master=h,1 ids=a", b"rdzv1-ranks round=5 ids=a:1",
                b"rdzv1-ranks round=5 master=h,1 ids=a:-1"):
        with pytest.raises(RendezvousStateError, match="k"):
            core.decode_rank_shard(bad, b"k")
    assert core.decode_member(core.encode_member("h", "10.0.0.1", 42, 7)) == (
        "h", "10.0.0.1", 42, 7, "", "stable")
    assert core.decode_member(b"rubbish") is None
    with pytest.raises(ValueError):
        core.encode_member("has space", "a", 1)


def test_backoff_is_jittered_starts_small_and_is_capped():
    backoff = core.Backoff(50e-6, 0.01)
    delays = [backoff.next_delay() for _ in range(50)]
    assert delays[0] <= 50e-6
    assert max(delays) <= 0.01
    assert len(set(delays)) > 40


def test_node_rejects_bad_bounds():
    with pytest.raises(ValueError):
        core.Node("n", RunKeys("/p", "r"), 3, 2, 0, b"", 1.0, 1.0)


def test_the_stub_shows_the_whole_python_api():
    """_state.pyi, shipped with the package, names every public function, class,
    field and method of the compiled core, and nothing it lacks."""
    stub = ast.parse(Path(core.__file__).with_name("_state.pyi").read_text())
    shown = {}
    for item in stub.body:
        if isinstance(item, (ast.ClassDef, ast.FunctionDef)):
            shown[item.name] = item
        elif isinstance(item, ast.AnnAssign):
            shown[item.target.id] = item
    enum_members = {m.name for e in (Status, Event, Phase, Move, core.Step) for m in e}
    public = set()
    for name, value in vars(core).items():
        if name.startswith("_") or name in enum_members:
            continue
        defined_here = getattr(value, "__module__", None) == core.__name__
        if defined_here or (name.isupper() and isinstance(value, (int, tuple))):
            public.add(name)
    assert public == set(shown)
    for name, item in shown.items():
        cls = getattr(core, name)
        if not isinstance(item, ast.ClassDef) or issubclass(cls, (enum.Enum, Exception)):
            continue
        members = {m.name if isinstance(m, ast.FunctionDef) else m.target.id
                   for m in item.body if isinstance(m, (ast.FunctionDef, ast.AnnAssign))}
        assert {n for n in dir(cls) if not n.startswith("_")} == members - {"__init__"}, name


def test_a_lone_node_is_driven_by_its_actions_without_a_server():
    """A round of one, driven by hand: the node asks for each request and takes
    its answer; it never holds a client. Read, join, open, freeze (with its
    confirmation), finalize: five transactions, and the round watch while it
    freezes."""
    keys = RunKeys("/p", "solo")
    me = core.encode_member("h", "10.0.0.1", 1, 29500)
    node = core.Node("a", keys, 1, 1, 7, me, 1.0, 5.0, random.Random(0))
    node.begin()
    read = node.next_action(0.0)
    assert read.step == core.Step.STEP_TXN and read.success == [("get", keys.state)]
    with pytest.raises(RuntimeError, match="unanswered"):
        node.next_action(0.0)
    node.feed((True, 1, [None]))
    join = node.next_action(0.0)
    assert [spec.tag for spec in node.watches] == ["state"]
    assert join.success[0] == ("put", keys.members(0) + b"a", me, 7)
    # The first joiner takes the counter key and counts the members (itself).
    assert join.success[1][0] == "txn" and join.success[1][2][0][1] == keys.counter(0)
    node.feed((True, 2, [None, (True, [None, 1])]))
    opening = node.next_action(0.0)
    assert node.counter
    assert opening.compares == [("mod", keys.state, 0)]
    node.feed((True, 3, [None]))
    freeze_read = node.next_action(0.0)
    assert freeze_read.success == [("range", keys.members(0), 1)]
    node.feed((True, 4, [[(keys.members(0) + b"a", me, 2)]]))
    freeze = node.next_action(0.0)
    assert core.decode_state(freeze.success[0][2]).status == Status.FROZEN
    node.feed((True, 5, [None] * len(freeze.success)))
    finalize = node.next_action(0.0)
    assert node.phase == Phase.CONFIRMED and node.freezer
    assert "round" in [spec.tag for spec in node.watches]
    assert core.decode_state(finalize.success[0][2]).status == Status.FINAL
    node.feed((True, 6, [None]))
    done = node.next_action(0.0)
    assert done.step == core.Step.STEP_DONE and done.result.world_size == 1
    assert (node.rank, node.master) == (0, ("10.0.0.1", 29500))


def test_a_failed_request_is_the_node_machines_to_decide():
    node = core.Node("a", RunKeys("/p", "r"), 1, 2, 7, b"", 1.0, 5.0, random.Random(0))
    node.begin()
    node.next_action(0.0)
    node.fail(RendezvousStateError("etcd said no"))
    with pytest.raises(RendezvousStateError, match="etcd said no"):
        node.next_action(0.0)
    with pytest.raises(RuntimeError, match="no task"):
        node.next_action(0.0)


def _joined_waiter(keys, node_id, min_nodes, max_nodes):
    """A node that joined open round 0 of ``keys``' run (another counts), at time 0."""
    node = core.Node(node_id, keys, min_nodes, max_nodes, 7, b"", 30.0, 5.0, random.Random(0))
    node.begin()
    node.next_action(0.0)
    opened = record(Status.JOINABLE, min_nodes=min_nodes, max_nodes=max_nodes)
    node.feed((True, 1, [(opened.encode(), 1, 1)]))
    join = node.next_action(0.0)
    assert join.success[0][1] == keys.members(0) + node_id.encode()
    node.feed((True, 2, [None, (False, [(b"counter", 2, 2)])]))
    wait = node.next_action(0.0)
    assert wait.step == core.Step.STEP_WAIT and not node.counter
    return node


@pytest.mark.parametrize("min_nodes, max_nodes, fewest, most", [
    (4, 4, 4, 4),            # a small round: every joiner
    (1000, 1000, 2, 20),     # about 8 of the 1,000
    (4000, 10000, 2, 20),
])
def test_only_a_few_joiners_of_a_large_round_watch_its_counter(min_nodes, max_nodes, fewest,
                                                               most):
    """A joiner that has waited a second watches the counter key (to take the
    count over at once if the counter dies); in a large round only a few do,
    and the others find the key gone by their periodic check."""
    keys = RunKeys("/p", "large")
    watching = 0
    for i in range(min_nodes):
        node = _joined_waiter(keys, f"n{i:05d}", min_nodes, max_nodes)
        assert [spec.tag for spec in node.watches] == ["state"]
        later = node.next_action(1.5)  # past the second, before any periodic check
        assert later.step == core.Step.STEP_WAIT
        watching += "counter" in [spec.tag for spec in node.watches]
    assert fewest <= watching <= most, watching


def test_a_member_whose_view_lagged_finds_its_round_retired_and_goes_on():
    """A confirmed member checks its round's world (a member left) and finds
    the world deleted: the run moved on while this node's view lagged behind,
    and the round was retired. It reads the state record and goes on from
    there; only a record that did not move makes the missing world an error."""
    keys = RunKeys("/p", "lag")
    node = _joined_waiter(keys, "a", 2, 2)
    frozen = record(Status.FROZEN, min_nodes=2, max_nodes=2, cutoff=3, world=2)
    node.observe_state(frozen.encode(), 3)
    confirm = node.next_action(0.0)
    assert confirm.success[1] == ("put", keys.confirmed(0) + b"a", b"", 7)
    shard = core.encode_rank_shard(0, [("a", 0), ("b", 1)], "10.0.0.1", 29500)
    node.feed((True, 4, [(shard, 4, 4), None]))
    assert node.next_action(0.0).step == core.Step.STEP_WAIT
    assert node.phase == Phase.CONFIRMED
    node.observe_member_deleted()
    check = node.next_action(1.0)
    assert check.success[2] == ("get", keys.world(0))
    node.feed((True, 9, [1, [], None, []]))
    reread = node.next_action(1.0)
    assert (reread.step, reread.key) == (core.Step.STEP_GET, keys.state)
    moved = record(Status.JOINABLE, round=2, min_nodes=2, max_nodes=2, last_final=1)
    node.feed((moved.encode(), 8, 8))
    join = node.next_action(1.0)
    assert node.state.round == 2
    assert join.success[0][1] == keys.members(2) + b"a"


def test_a_member_finds_its_world_missing_while_the_state_record_stands_still():
    """The same check, but the state record did not move: the world of a
    frozen round is gone, which the protocol never does; the call fails."""
    keys = RunKeys("/p", "gone")
    node = _joined_waiter(keys, "a", 2, 2)
    frozen = record(Status.FROZEN, min_nodes=2, max_nodes=2, cutoff=3, world=2)
    node.observe_state(frozen.encode(), 3)
    node.next_action(0.0)
    shard = core.encode_rank_shard(0, [("a", 0), ("b", 1)], "10.0.0.1", 29500)
    node.feed((True, 4, [(shard, 4, 4), None]))
    node.next_action(0.0)
    node.observe_member_deleted()
    node.next_action(1.0)
    node.feed((True, 9, [1, [], None, []]))
    node.next_action(1.0)
    node.feed((frozen.encode(), 3, 3))
    with pytest.raises(RendezvousStateError, match="is missing"):
        node.next_action(1.0)


def _join_action(keys, round, node_id, stale=()):
    """A node's join of ``round``, taken from a node machine, with ``stale``
    keys of its own to delete."""
    node = core.Node(node_id, keys, 2, 2, 7, b"d", 30.0, 5.0, random.Random(0))
    node.begin()
    node.next_action(0.0)
    node.feed((True, 1, [(record(Status.JOINABLE, round=round).encode(), 1, 1)]))
    join = node.next_action(0.0)
    assert join.join
    return core.Action(core.Step.STEP_TXN, join.compares,
                       join.success + [("delete", key) for key in stale], join.failure, join=True)


def test_joins_merge_per_round_within_etcds_limits():
    keys = RunKeys("/p", "m")
    joins = [_join_action(keys, 3, f"a{i}", [b"old/a%d/%d" % (i, k) for k in range(i % 3)])
             for i in range(150)]
    joins.append(_join_action(keys, 4, "b"))
    groups = core.merge_joins(joins, 128)
    assert sorted(i for _, indices in groups for i in indices) == list(range(151))
    for action, indices in groups:
        rounds = {joins[i].compares[0][1] for i in indices}
        assert len(rounds) == 1
        assert txn_ops(action.compares, action.success, action.failure) <= 128
        # Every member key and older key, and one counter transaction, last.
        assert len(action.success) == sum(len(joins[i].success) - 1 for i in indices) + 1
        assert [op[0] for op in action.success].count("txn") == 1
        assert action.success[-1] == joins[indices[0]].success[1]
    alone = [action for action, indices in groups if indices == [150]]
    assert alone == [joins[150]]


def test_each_merged_join_gets_the_answer_of_its_own():
    keys = RunKeys("/p", "s")
    joins = [_join_action(keys, 3, "a"), _join_action(keys, 3, "b", [b"old/b"])]
    [(merged, _)] = core.merge_joins(joins, 128)
    # puts a, b; delete old/b; the counter's transaction.
    took = core.split_joins(joins, (True, 9, [None, None, 1, (True, [None, 2])]))
    assert took == [(True, 9, [None, (True, [None, 2])]),
                    (True, 9, [None, (False, [(b"a", 9, 9)]), 1])]
    held = (b"z", 5, 5)
    assert core.split_joins(joins, (True, 9, [None, None, 0, (False, [held])])) == \
        [(True, 9, [None, (False, [held])]), (True, 9, [None, (False, [held]), 0])]
    state, mine = (b"frozen", 8, 2), (b"d", 4, 4)
    assert core.split_joins(joins, (False, 9, [state, None, mine])) == \
        [(False, 9, [state, None]), (False, 9, [state, mine])]
    assert merged.failure == [("get", keys.state), joins[0].failure[1], joins[1].failure[1]]
