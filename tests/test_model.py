"""Pure tests of the arbitration rule and the oracle state machine in nac_server.model."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nac_server.model import (
    ALL_MASK,
    AcquireRequest,
    Action,
    Conflict,
    ConflictKind,
    EndDelayRequest,
    Event,
    EventType,
    ExpireRequest,
    ForceReleaseRequest,
    Job,
    NodeAccess,
    Outcome,
    ReleaseRequest,
    Request,
    Response,
    State,
    Tally,
    UnwaitRequest,
    UpdateRequest,
    Waiter,
    actions_in,
    find_conflicts,
    mask_of,
    step,
    tallies,
)

W = Action.MODIFY_VISIBLE_DATA.bit
META = Action.MODIFY_METADATA.bit
GRAPH = Action.GRAPH_RECONFIG.bit
R = Action.READ_VISIBLE_DATA.bit
RMETA = Action.READ_METADATA.bit
RESIZE = Action.RESIZE.bit
READS = R | RMETA

DNA = ConflictKind.HOLDER_DOES_NOT_ALLOW
HREQ = ConflictKind.HOLDER_REQUIRES
DELAY = ConflictKind.LOCK_DELAY
AHEAD = ConflictKind.WAITING_AHEAD

A, B, C = "/vol/a.qcow2", "/vol/b.qcow2", "/vol/c.qcow2"


def job(job_id: str, owner: str, operation: str, *nodes: tuple[str, int, int]) -> Job:
    return Job(job_id, owner, operation, tuple(NodeAccess(*n) for n in nodes))


def nodes_of(*nodes: tuple[str, int, int]) -> tuple[NodeAccess, ...]:
    return tuple(NodeAccess(*n) for n in nodes)


# --- The rule, case by case -----------------------------------------------------------------------

GUEST_WRITER = job("vm1-disk", "host-a", "guest", (A, W | META | READS | RESIZE, READS))
GUEST_READER = job("vm1-cdrom", "host-a", "guest", (A, READS, READS))
# A mirror source: reads the data, lets the guest keep writing, but the size must stay put.
MIRROR = job("mirror-1", "host-b", "mirror", (A, READS, ALL_MASK & ~RESIZE))


@dataclass(frozen=True)
class RuleCase:
    holders: tuple[Job, ...]
    request: tuple[NodeAccess, ...]
    # (node, action, kind, holder id); owner and operation are checked against the holder.
    expected: frozenset[tuple[str, Action, ConflictKind, str]]


RULE_CASES = {
    "no-holders": RuleCase((), nodes_of((A, ALL_MASK, 0)), frozenset()),
    "two-writers-conflict-both-ways": RuleCase(
        (job("w1", "host-a", "commit", (A, W | READS, READS)),),
        nodes_of((A, W | READS, READS)),
        frozenset(
            {
                (A, Action.MODIFY_VISIBLE_DATA, DNA, "w1"),
                (A, Action.MODIFY_VISIBLE_DATA, HREQ, "w1"),
            }
        ),
    ),
    "readers-that-allow-reads-coexist": RuleCase(
        (GUEST_READER,), nodes_of((A, READS, READS)), frozenset()
    ),
    "reader-that-refuses-writes-blocks-writer": RuleCase(
        (GUEST_READER,),
        nodes_of((A, W, ALL_MASK)),
        frozenset({(A, Action.MODIFY_VISIBLE_DATA, DNA, "vm1-cdrom")}),
    ),
    "guest-requiring-resize-refused-by-mirror": RuleCase(
        (MIRROR,),
        nodes_of((A, W | READS | RESIZE, ALL_MASK)),
        frozenset({(A, Action.RESIZE, DNA, "mirror-1")}),
    ),
    "mirror-refused-by-guest-requiring-resize": RuleCase(
        (job("vm2", "host-a", "guest", (A, W | READS | RESIZE, ALL_MASK)),),
        nodes_of((A, READS, ALL_MASK & ~RESIZE)),
        frozenset({(A, Action.RESIZE, HREQ, "vm2")}),
    ),
    "mirror-and-writing-guest-without-resize-coexist": RuleCase(
        (MIRROR,), nodes_of((A, W | READS, ALL_MASK)), frozenset()
    ),
    "several-nodes-refused-only-on-one": RuleCase(
        (job("backup-1", "host-c", "backup", (B, READS, READS)),),
        nodes_of((A, W | READS, READS), (B, W | READS, READS), (C, W | READS, READS)),
        frozenset({(B, Action.MODIFY_VISIBLE_DATA, DNA, "backup-1")}),
    ),
    "same-owner-still-conflicts": RuleCase(
        (job("commit-1", "host-a", "commit", (A, GRAPH, 0)),),
        nodes_of((A, GRAPH, 0)),
        frozenset(
            {
                (A, Action.GRAPH_RECONFIG, DNA, "commit-1"),
                (A, Action.GRAPH_RECONFIG, HREQ, "commit-1"),
            }
        ),
    ),
    "disjoint-nodes-never-conflict": RuleCase(
        (job("x", "host-a", "commit", (A, ALL_MASK, 0)),),
        nodes_of((B, ALL_MASK, 0), (C, ALL_MASK, 0)),
        frozenset(),
    ),
    "require-nothing-allow-everything-fits-anything": RuleCase(
        (job("x", "host-a", "commit", (A, ALL_MASK, 0)),),
        nodes_of((A, 0, ALL_MASK)),
        frozenset(),
    ),
    "every-holder-reported": RuleCase(
        (GUEST_READER, MIRROR, job("ok", "host-c", "backup", (A, 0, ALL_MASK))),
        nodes_of((A, RESIZE | W, READS)),
        frozenset(
            {
                (A, Action.MODIFY_VISIBLE_DATA, DNA, "vm1-cdrom"),
                (A, Action.RESIZE, DNA, "vm1-cdrom"),
                (A, Action.RESIZE, DNA, "mirror-1"),
            }
        ),
    ),
    "several-actions-one-holder": RuleCase(
        (GUEST_WRITER,),
        nodes_of((A, READS, READS)),
        frozenset(
            {
                (A, Action.MODIFY_VISIBLE_DATA, HREQ, "vm1-disk"),
                (A, Action.MODIFY_METADATA, HREQ, "vm1-disk"),
                (A, Action.RESIZE, HREQ, "vm1-disk"),
            }
        ),
    ),
}


@pytest.mark.parametrize("case", RULE_CASES.values(), ids=RULE_CASES.keys())
def test_rule_cases(case: RuleCase) -> None:
    """find_conflicts reports exactly the expected conflicts, each naming its holder fully."""
    found = find_conflicts(case.holders, case.request)
    assert found == sorted(found)
    assert {(c.node, c.action, c.kind, c.holder_job_id) for c in found} == case.expected
    assert len(found) == len(case.expected)
    by_id = {holder.job_id: holder for holder in case.holders}
    for conflict in found:
        holder = by_id[conflict.holder_job_id]
        assert (conflict.holder_owner, conflict.holder_operation) == (
            holder.owner,
            holder.operation,
        )
        assert conflict.node in {access.node for access in case.request}
        assert holder.access_to(conflict.node) is not None


def test_conflict_names_node_action_kind_and_holder() -> None:
    """A conflict carries node, action, kind and the holder's id, owner and operation."""
    holder = job("j-9", "host-b", "backup", (B, READS, READS))
    assert find_conflicts([holder], nodes_of((B, RESIZE, ALL_MASK))) == [
        Conflict(B, Action.RESIZE, DNA, "j-9", "host-b", "backup")
    ]


def test_mask_helpers_round_trip() -> None:
    """mask_of and actions_in are inverse over every mask."""
    for mask in range(ALL_MASK + 1):
        assert mask_of(actions_in(mask)) == mask
    assert ALL_MASK == 63


# --- Exhaustive checks against an independent statement of the rule ----------------------------

BITS = [1 << i for i in range(6)]


def expected_pair(
    holder_require: int, holder_allow: int, require: int, allow: int
) -> set[tuple[int, ConflictKind]]:
    """The rule restated bit by bit: (bit, kind) for each way the holder refuses the request."""
    found: set[tuple[int, ConflictKind]] = set()
    for bit in BITS:
        if require & bit and not holder_allow & bit:
            found.add((bit, DNA))
        if holder_require & bit and not allow & bit:
            found.add((bit, HREQ))
    return found


def refused_by_tallies(counts: dict[Action, Tally], require: int, allow: int) -> bool:
    """The O(actions) check the Lua makes from the per-node aggregate counts."""
    return any(
        (require & action.bit and tally.not_allowed_by > 0)
        or (not allow & action.bit and tally.required_by > 0)
        for action, tally in counts.items()
    )


def check_pair(holder: Job, holder_counts: dict[Action, Tally], require: int, allow: int) -> None:
    held = holder.nodes[0]
    found = find_conflicts([holder], [NodeAccess(A, require, allow)])
    # The rule as two bit expressions, one per kind; each bit set is one conflict.
    not_allowed = require & ~held.allow & ALL_MASK
    required = held.require & ~allow & ALL_MASK
    got = {DNA: 0, HREQ: 0}
    for conflict in found:
        got[conflict.kind] |= conflict.action.bit
    assert (got[DNA], got[HREQ]) == (not_allowed, required), (held, require, allow)
    assert len(found) == not_allowed.bit_count() + required.bit_count()
    assert refused_by_tallies(holder_counts, require, allow) == bool(found), (held, require, allow)


@pytest.mark.parametrize("action", list(Action), ids=[a.name for a in Action])
def test_each_action_all_sixteen_bit_combinations(action: Action) -> None:
    """For one action alone, each of the 16 bit combinations gives exactly the rule's conflicts."""
    bit = action.bit
    for holder_req, holder_allow, req, allow in itertools.product((0, 1), repeat=4):
        # Other actions are neutral: nobody requires them, everybody allows them.
        others = ALL_MASK & ~bit
        holder = job("h", "o", "op", (A, bit * holder_req, others | bit * holder_allow))
        found = find_conflicts([holder], [NodeAccess(A, bit * req, others | bit * allow)])
        expected = set()
        if req and not holder_allow:
            expected.add(Conflict(A, action, DNA, "h", "o", "op"))
        if holder_req and not allow:
            expected.add(Conflict(A, action, HREQ, "h", "o", "op"))
        assert set(found) == expected
        assert len(found) == len(expected)


def _sample_pairs(seed: int, count: int) -> list[tuple[int, int]]:
    extremes = [(0, 0), (0, ALL_MASK), (ALL_MASK, 0), (ALL_MASK, ALL_MASK)]
    rng = random.Random(seed)
    return extremes + [(rng.randrange(64), rng.randrange(64)) for _ in range(count - 4)]


ALL_PAIRS = [(require, allow) for require in range(64) for allow in range(64)]


def test_every_holder_mask_pair_against_sampled_requests() -> None:
    """All 4096 holder mask pairs x 64 requests: conflicts and tallies match the rule."""
    requests = _sample_pairs(seed=1, count=64)
    for holder_require, holder_allow in ALL_PAIRS:
        holder = job("h", "o", "op", (A, holder_require, holder_allow))
        counts = tallies([holder], A)
        for require, allow in requests:
            check_pair(holder, counts, require, allow)


def test_every_request_mask_pair_against_sampled_holders() -> None:
    """All 4096 request mask pairs x 16 holders: conflicts and tallies match the rule."""
    # Fewer holders than requests above: the two directions share the per-pair check.
    for holder_require, holder_allow in _sample_pairs(seed=2, count=16):
        holder = job("h", "o", "op", (A, holder_require, holder_allow))
        counts = tallies([holder], A)
        for require, allow in ALL_PAIRS:
            check_pair(holder, counts, require, allow)


def test_tallies_count_holders_per_action() -> None:
    """tallies counts, per action, the holders requiring it and the holders not allowing it."""
    holders = [
        job("1", "o", "op", (A, W | R, READS)),
        job("2", "o", "op", (A, R, ALL_MASK), (B, ALL_MASK, 0)),
        job("3", "o", "op", (B, W, W)),
    ]
    counts = tallies(holders, A)
    assert counts[Action.MODIFY_VISIBLE_DATA] == Tally(required_by=1, not_allowed_by=1)
    assert counts[Action.READ_VISIBLE_DATA] == Tally(required_by=2, not_allowed_by=0)
    assert counts[Action.RESIZE] == Tally(required_by=0, not_allowed_by=1)
    assert tallies(holders, C) == {action: Tally() for action in Action}


masks = st.integers(0, ALL_MASK)


# No deadline: an example takes a millisecond or two, and one paused for 200 ms by a busy
# machine would fail the test as flaky.
@settings(deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from([A, B]), masks, masks), max_size=5),
    st.lists(
        st.tuples(st.sampled_from([A, B, C]), masks, masks),
        min_size=1,
        max_size=3,
        unique_by=lambda n: n[0],
    ),
)
def test_many_holders_tallies_predict_refusal(
    held: list[tuple[str, int, int]], wanted: list[tuple[str, int, int]]
) -> None:
    """With several holders, refusal from the tallies equals find_conflicts being non-empty."""
    holders = [job(f"h{i}", "o", "op", access) for i, access in enumerate(held)]
    request = nodes_of(*wanted)
    found = find_conflicts(holders, request)
    expected = {
        (access.node, bit, kind, holder.job_id)
        for access in request
        for holder in holders
        if holder.nodes[0].node == access.node
        for bit, kind in expected_pair(
            holder.nodes[0].require, holder.nodes[0].allow, access.require, access.allow
        )
    }
    assert {(c.node, c.action.bit, c.kind, c.holder_job_id) for c in found} == expected
    refused = any(
        refused_by_tallies(tallies(holders, access.node), access.require, access.allow)
        for access in request
    )
    assert refused == bool(found)


# --- The state machine ----------------------------------------------------------------------------


def acquire(
    job_id: str,
    owner: str,
    *nodes: tuple[str, int, int],
    operation: str = "commit",
    dry_run: bool = False,
    wait: bool = False,
) -> AcquireRequest:
    return AcquireRequest(
        job_id, owner, operation, nodes_of(*nodes), ttl_ms=0, dry_run=dry_run, wait=wait
    )


def run(state: State, *requests: Request) -> tuple[State, list[Response]]:
    answers = []
    for request in requests:
        state, answer = step(state, request)
        answers.append(answer)
    return state, answers


def held_state() -> State:
    """Two jobs granted: j1 on A (reader), j2 on B (writer)."""
    state, answers = run(
        State(),
        acquire("j1", "host-a", (A, READS, READS)),
        acquire("j2", "host-b", (B, W | READS, READS), (C, READS, ALL_MASK)),
    )
    assert [a.outcome for a in answers] == [Outcome.GRANTED, Outcome.GRANTED]
    return state


def test_grants_take_increasing_tokens_and_revisions() -> None:
    """Each grant takes the next fencing token and the next revision."""
    state, answers = run(
        State(),
        acquire("j1", "host-a", (A, READS, READS)),
        acquire("j2", "host-b", (A, READS, READS)),
        acquire("j3", "host-a", (B, W, 0)),
    )
    assert [a.outcome for a in answers] == [Outcome.GRANTED] * 3
    assert [a.revision for a in answers] == [1, 2, 3]
    assert [a.job.fencing_token for a in answers if a.job] == [1, 2, 3]
    assert (state.revision, state.last_token) == (3, 3)
    assert set(state.jobs) == {"j1", "j2", "j3"}


def test_token_continues_after_release() -> None:
    """A release takes a revision but no token; the next grant's token is the last one plus one."""
    _, answers = run(
        held_state(),
        ReleaseRequest("j1", "host-a"),
        acquire("j1", "host-a", (A, READS, READS)),
    )
    assert [a.outcome for a in answers] == [Outcome.RELEASED, Outcome.GRANTED]
    assert [a.revision for a in answers] == [3, 4]
    assert answers[1].job is not None
    assert answers[1].job.fencing_token == 3


@pytest.mark.parametrize(
    "nodes",
    [
        ((B, W | READS, READS), (C, READS, ALL_MASK)),
        ((C, READS, ALL_MASK), (B, W | READS, READS)),
    ],
    ids=["same-order", "reversed-order"],
)
def test_repeated_acquire_answers_existing(nodes: tuple[tuple[str, int, int], ...]) -> None:
    """A repeated acquire with the same content answers EXISTING, taking no revision or token."""
    before = held_state()
    after, answer = step(before, acquire("j2", "host-b", *nodes))
    assert answer.outcome is Outcome.EXISTING
    assert answer.revision == before.revision
    assert answer.job == before.jobs["j2"]
    assert after == before


@pytest.mark.parametrize(
    "request_",
    [
        acquire("j2", "host-a", (B, W | READS, READS), (C, READS, ALL_MASK)),
        acquire("j2", "host-b", (B, W | READS, READS), (C, READS, ALL_MASK), operation="mirror"),
        acquire("j2", "host-b", (B, W | READS, READS), (C, READS, READS)),
        acquire("j2", "host-b", (B, W | READS, READS)),
        acquire("j2", "host-b", (B, W | READS, READS), (C, READS, ALL_MASK), (A, 0, ALL_MASK)),
        acquire("j2", "host-b", (B, W | READS, READS), (A, READS, ALL_MASK)),
    ],
    ids=["other-owner", "other-operation", "other-mask", "fewer-nodes", "more-nodes", "other-node"],
)
def test_same_id_other_content_answers_already_exists(request_: AcquireRequest) -> None:
    """Reusing a held id with other content answers ALREADY_EXISTS and changes nothing."""
    before = held_state()
    after, answer = step(before, request_)
    assert answer.outcome is Outcome.ALREADY_EXISTS
    assert answer.revision == before.revision
    assert answer.job == before.jobs["j2"]
    assert after == before


@pytest.mark.parametrize(
    ("request_", "outcome"),
    [
        (acquire("j3", "host-c", (A, READS, ALL_MASK), dry_run=True), Outcome.WOULD_GRANT),
        (acquire("j3", "host-c", (A, W, ALL_MASK), dry_run=True), Outcome.REFUSED),
        (acquire("j3", "host-c", (A, W, ALL_MASK)), Outcome.REFUSED),
        (acquire("j3", "host-c", (C, 0, 0), (A, 0, ALL_MASK)), Outcome.REFUSED),
    ],
    ids=["dry-run-would-grant", "dry-run-refused", "refused", "refused-on-second-node"],
)
def test_dry_run_and_refusal_change_nothing(request_: AcquireRequest, outcome: Outcome) -> None:
    """A dry run or a refusal leaves jobs, revision, token and events as they were."""
    before = held_state()
    after, answer = step(before, request_)
    assert answer.outcome is outcome
    assert answer.revision == before.revision
    assert answer.job is None
    assert bool(answer.conflicts) == (outcome is Outcome.REFUSED)
    assert after == before


def test_refusal_lists_the_conflicts() -> None:
    """A refused acquire answers the sorted conflicts with the current holders."""
    state = held_state()
    _, answer = step(state, acquire("j3", "host-c", (A, W, ALL_MASK), (B, READS, READS)))
    assert answer.outcome is Outcome.REFUSED
    assert answer.conflicts == tuple(
        sorted(
            [
                Conflict(B, Action.MODIFY_VISIBLE_DATA, HREQ, "j2", "host-b", "commit"),
                Conflict(A, Action.MODIFY_VISIBLE_DATA, DNA, "j1", "host-a", "commit"),
            ]
        )
    )


def test_release_by_another_owner_is_denied() -> None:
    """Release by another owner answers PERMISSION_DENIED with the job and changes nothing."""
    before = held_state()
    after, answer = step(before, ReleaseRequest("j1", "host-b"))
    assert answer.outcome is Outcome.PERMISSION_DENIED
    assert answer.job == before.jobs["j1"]
    assert answer.revision == before.revision
    assert after == before


@pytest.mark.parametrize(
    "request_",
    [ReleaseRequest("nope", "host-a"), ExpireRequest("nope")],
    ids=["release", "expire"],
)
def test_ending_an_unknown_job_answers_not_held(request_: Request) -> None:
    """Release or expiry of a job that is not held answers NOT_HELD and changes nothing."""
    before = held_state()
    after, answer = step(before, request_)
    assert answer.outcome is Outcome.NOT_HELD
    assert answer.revision == before.revision
    assert answer.job is None
    assert after == before


def test_release_frees_the_nodes() -> None:
    """After a release the job is gone and its nodes take a job it used to refuse."""
    state, answers = run(
        held_state(),
        acquire("j3", "host-c", (A, W, ALL_MASK)),
        ReleaseRequest("j1", "host-a"),
        acquire("j3", "host-c", (A, W, ALL_MASK)),
    )
    assert [a.outcome for a in answers] == [Outcome.REFUSED, Outcome.RELEASED, Outcome.GRANTED]
    assert set(state.jobs) == {"j2", "j3"}


def test_expire_ends_the_job_with_an_expired_event() -> None:
    """Expiry ends the job whatever its owner and records an EXPIRED event."""
    before = held_state()
    after, answer = step(before, ExpireRequest("j2"))
    assert answer.outcome is Outcome.RELEASED
    assert answer.job == before.jobs["j2"]
    assert answer.revision == before.revision + 1
    assert set(after.jobs) == {"j1"}
    assert after.events[-1] == Event(answer.revision, EventType.EXPIRED, "j2")


def test_events_have_one_revision_per_change() -> None:
    """Events are numbered 1, 2, 3, ... with one event per change and none for the rest."""
    state, _ = run(
        State(),
        acquire("j1", "host-a", (A, READS, READS)),
        acquire("j1", "host-a", (A, READS, READS)),
        acquire("j2", "host-b", (A, W, 0)),
        acquire("j2", "host-b", (B, W, 0), dry_run=True),
        ReleaseRequest("j1", "host-b"),
        acquire("j2", "host-b", (B, W, 0)),
        ReleaseRequest("j1", "host-a"),
        ReleaseRequest("j1", "host-a"),
        ExpireRequest("j2"),
        ExpireRequest("j2"),
    )
    assert state.events == (
        Event(1, EventType.ACQUIRED, "j1"),
        Event(2, EventType.ACQUIRED, "j2"),
        Event(3, EventType.RELEASED, "j1"),
        Event(4, EventType.EXPIRED, "j2"),
    )
    assert state.revision == 4
    assert state.last_token == 2
    assert dict(state.jobs) == {}


# --- Jobs over time: queues, deadlocks, lock-delay, conversion -----------------------------------

X, Y, Z = "/vol/x.qcow2", "/vol/y.qcow2", "/vol/z.qcow2"
WRITER = (W | READS, READS)
# Reads and refuses writes: compatible with other such readers, not with a writer.
READER = (READS, READS)
# Reads and lets anything else happen: compatible with the writer and the reader above.
SHARER = (READS, ALL_MASK)
EXCLUSIVE = (W, 0)


def on(node: str, masks: tuple[int, int]) -> tuple[str, int, int]:
    return (node, *masks)


# A reader holds A, a writer (another owner) waits behind it.
QUEUE = (
    acquire("r1", "host-a", on(A, READER)),
    acquire("w1", "host-b", on(A, WRITER), wait=True),
)
# A holds X and B holds Y; A waits for Y: the first half of a hold-and-wait cycle.
HOLD_AND_WAIT = (
    acquire("a1", "host-a", on(X, EXCLUSIVE)),
    acquire("b1", "host-b", on(Y, EXCLUSIVE)),
    acquire("a2", "host-a", on(Y, EXCLUSIVE), wait=True),
)
HELD_WRITER = (acquire("w", "host-a", on(A, WRITER)),)
LOST_WRITER = (*HELD_WRITER, ExpireRequest("w", now_ms=10))

ConflictKey = tuple[str, Action, ConflictKind, str]
MVD = Action.MODIFY_VISIBLE_DATA


@dataclass(frozen=True)
class StepCase:
    """One request after some others: its answer, what it appends and what is left."""

    given: tuple[Request, ...]
    request: Request
    outcome: Outcome
    # (node, action, kind, holder id)
    conflicts: frozenset[ConflictKey] = frozenset()
    positions: tuple[int, ...] = ()
    # The events the request appends, as (type, job id).
    events: tuple[tuple[EventType, str], ...] = ()
    # After the request, when given: held ids, queue order, ids in lock-delay.
    holders: frozenset[str] | None = None
    waiters: tuple[str, ...] | None = None
    delays: frozenset[str] | None = None
    lock_delay_ms: int = 1000


STEP_CASES = {
    # Fair queuing.
    "writer-behind-a-reader-queues": StepCase(
        QUEUE[:1],
        QUEUE[1],
        Outcome.QUEUED,
        frozenset({(A, MVD, DNA, "r1")}),
        positions=(1,),
        events=((EventType.WAITING, "w1"),),
        waiters=("w1",),
    ),
    "refused-without-wait-does-not-queue": StepCase(
        QUEUE[:1],
        acquire("w1", "host-b", on(A, WRITER)),
        Outcome.REFUSED,
        frozenset({(A, MVD, DNA, "r1")}),
        waiters=(),
    ),
    "reader-behind-a-waiting-writer-is-refused": StepCase(
        QUEUE,
        acquire("r2", "host-c", on(A, READER)),
        Outcome.REFUSED,
        frozenset({(A, MVD, AHEAD, "w1")}),
        holders=frozenset({"r1"}),
        waiters=("w1",),
    ),
    "reader-behind-a-waiting-writer-queues-second": StepCase(
        QUEUE,
        acquire("r2", "host-c", on(A, READER), wait=True),
        Outcome.QUEUED,
        frozenset({(A, MVD, AHEAD, "w1")}),
        positions=(2,),
        events=((EventType.WAITING, "r2"),),
        waiters=("w1", "r2"),
    ),
    "compatible-with-everyone-is-granted-past-the-queue": StepCase(
        QUEUE,
        acquire("s1", "host-c", on(A, SHARER)),
        Outcome.GRANTED,
        events=((EventType.ACQUIRED, "s1"),),
        holders=frozenset({"r1", "s1"}),
        waiters=("w1",),
    ),
    "a-waiter-blocks-only-its-own-nodes": StepCase(
        QUEUE,
        acquire("x1", "host-c", on(B, EXCLUSIVE)),
        Outcome.GRANTED,
        events=((EventType.ACQUIRED, "x1"),),
    ),
    "positions-follow-the-request-order": StepCase(
        (*QUEUE, acquire("r9", "host-a", on(B, EXCLUSIVE))),
        acquire("w2", "host-c", on(B, WRITER), on(A, WRITER), wait=True),
        Outcome.QUEUED,
        frozenset(
            {
                (A, MVD, DNA, "r1"),
                (A, MVD, AHEAD, "w1"),
                (B, MVD, DNA, "r9"),
                (B, MVD, HREQ, "r9"),
                (B, Action.READ_VISIBLE_DATA, DNA, "r9"),
                (B, Action.READ_METADATA, DNA, "r9"),
            }
        ),
        positions=(1, 2),
        events=((EventType.WAITING, "w2"),),
    ),
    "queued-id-with-other-content-already-exists": StepCase(
        QUEUE, acquire("w1", "host-c", on(A, WRITER)), Outcome.ALREADY_EXISTS, waiters=("w1",)
    ),
    "dry-run-does-not-look-the-queued-id-up": StepCase(
        QUEUE,
        acquire("w1", "host-b", on(A, WRITER), dry_run=True),
        Outcome.REFUSED,
        frozenset({(A, MVD, DNA, "r1"), (A, MVD, AHEAD, "w1")}),
        waiters=("w1",),
    ),
    # Re-checks: the same call again, in its own place.
    "recheck-still-kept-out-keeps-its-place": StepCase(
        (*QUEUE, acquire("r2", "host-c", on(A, READER), wait=True)),
        QUEUE[1],
        Outcome.QUEUED,
        frozenset({(A, MVD, DNA, "r1")}),
        positions=(1,),
        waiters=("w1", "r2"),
    ),
    "recheck-without-wait-still-queued": StepCase(
        QUEUE,
        acquire("w1", "host-b", on(A, WRITER)),
        Outcome.QUEUED,
        frozenset({(A, MVD, DNA, "r1")}),
        positions=(1,),
        waiters=("w1",),
    ),
    "recheck-counts-only-earlier-waiters": StepCase(
        (*QUEUE, acquire("r2", "host-c", on(A, READER), wait=True)),
        acquire("r2", "host-c", on(A, READER)),
        Outcome.QUEUED,
        frozenset({(A, MVD, AHEAD, "w1")}),
        positions=(2,),
        waiters=("w1", "r2"),
    ),
    "recheck-granted-leaves-the-queue": StepCase(
        (*QUEUE, ReleaseRequest("r1", "host-a")),
        QUEUE[1],
        Outcome.GRANTED,
        events=((EventType.ACQUIRED, "w1"),),
        holders=frozenset({"w1"}),
        waiters=(),
    ),
    "granted-once-the-waiter-ahead-leaves": StepCase(
        (
            *QUEUE,
            acquire("r2", "host-c", on(A, READER), wait=True),
            UnwaitRequest("w1"),
        ),
        acquire("r2", "host-c", on(A, READER)),
        Outcome.GRANTED,
        events=((EventType.ACQUIRED, "r2"),),
        holders=frozenset({"r1", "r2"}),
        waiters=(),
    ),
    # Deadlocks: a wait that would close a cycle of owners.
    "hold-and-wait-cycle-is-a-deadlock": StepCase(
        HOLD_AND_WAIT,
        acquire("b2", "host-b", on(X, EXCLUSIVE), wait=True),
        Outcome.DEADLOCK,
        holders=frozenset({"a1", "b1"}),
        waiters=("a2",),
    ),
    "the-same-without-a-wait-is-refused": StepCase(
        HOLD_AND_WAIT,
        acquire("b2", "host-b", on(X, EXCLUSIVE)),
        Outcome.REFUSED,
        frozenset({(X, MVD, DNA, "a1"), (X, MVD, HREQ, "a1")}),
        waiters=("a2",),
    ),
    "three-owner-cycle-is-a-deadlock": StepCase(
        (
            *HOLD_AND_WAIT[:2],
            acquire("c1", "host-c", on(Z, EXCLUSIVE)),
            HOLD_AND_WAIT[2],
            acquire("b2", "host-b", on(Z, EXCLUSIVE), wait=True),
        ),
        acquire("c2", "host-c", on(X, EXCLUSIVE), wait=True),
        Outcome.DEADLOCK,
        waiters=("a2", "b2"),
    ),
    "a-chain-without-a-cycle-queues": StepCase(
        HOLD_AND_WAIT,
        acquire("c2", "host-c", on(X, EXCLUSIVE), wait=True),
        Outcome.QUEUED,
        frozenset({(X, MVD, DNA, "a1"), (X, MVD, HREQ, "a1")}),
        positions=(1,),
        events=((EventType.WAITING, "c2"),),
        waiters=("a2", "c2"),
    ),
    "waiting-for-its-own-owner-is-no-cycle": StepCase(
        HOLD_AND_WAIT[:1],
        acquire("a2", "host-a", on(X, EXCLUSIVE), wait=True),
        Outcome.QUEUED,
        frozenset({(X, MVD, DNA, "a1"), (X, MVD, HREQ, "a1")}),
        positions=(1,),
        events=((EventType.WAITING, "a2"),),
    ),
    "cycle-through-a-waiter-ahead-is-a-deadlock": StepCase(
        (
            acquire("b1", "host-b", on(Y, EXCLUSIVE)),
            acquire("a1", "host-a", on(Y, EXCLUSIVE), wait=True),
        ),
        acquire("b2", "host-b", on(Y, EXCLUSIVE), wait=True),
        Outcome.DEADLOCK,
        waiters=("a1",),
    ),
    "a-lock-delay-is-no-edge-of-a-cycle": StepCase(
        (
            acquire("a1", "host-a", on(X, EXCLUSIVE)),
            ExpireRequest("a1"),
            acquire("b1", "host-b", on(Y, EXCLUSIVE)),
            acquire("a2", "host-a", on(Y, EXCLUSIVE), wait=True),
        ),
        acquire("b2", "host-b", on(X, EXCLUSIVE), wait=True),
        Outcome.QUEUED,
        frozenset({(X, MVD, DELAY, "a1")}),
        positions=(1,),
        events=((EventType.WAITING, "b2"),),
    ),
    # a2 still notes b1 in its way until it checks again: the edges are those of the last check.
    "a-stale-edge-counts-until-the-waiter-checks-again": StepCase(
        (*HOLD_AND_WAIT, ReleaseRequest("b1", "host-b")),
        acquire("b2", "host-b", on(X, EXCLUSIVE), wait=True),
        Outcome.DEADLOCK,
    ),
    # Lock-delay: a lost holder keeps blocking with its masks.
    "expiry-leaves-a-lock-delay": StepCase(
        HELD_WRITER,
        ExpireRequest("w", now_ms=10),
        Outcome.RELEASED,
        events=((EventType.EXPIRED, "w"),),
        holders=frozenset(),
        delays=frozenset({"w"}),
    ),
    "force-release-leaves-a-lock-delay": StepCase(
        HELD_WRITER,
        ForceReleaseRequest("w", now_ms=10),
        Outcome.RELEASED,
        events=((EventType.FORCE_RELEASED, "w"),),
        holders=frozenset(),
        delays=frozenset({"w"}),
    ),
    "release-leaves-none": StepCase(
        HELD_WRITER,
        ReleaseRequest("w", "host-a"),
        Outcome.RELEASED,
        events=((EventType.RELEASED, "w"),),
        delays=frozenset(),
    ),
    "expiry-leaves-none-when-lock-delay-is-off": StepCase(
        HELD_WRITER,
        ExpireRequest("w"),
        Outcome.RELEASED,
        events=((EventType.EXPIRED, "w"),),
        delays=frozenset(),
        lock_delay_ms=0,
    ),
    "force-release-of-an-unknown-job-is-not-held": StepCase(
        HELD_WRITER, ForceReleaseRequest("nope"), Outcome.NOT_HELD, delays=frozenset()
    ),
    "lost-writer-blocks-a-writer-once-per-action": StepCase(
        LOST_WRITER,
        acquire("w2", "host-b", on(A, WRITER)),
        Outcome.REFUSED,
        frozenset({(A, MVD, DELAY, "w")}),
    ),
    "lost-writer-blocks-a-reader-refusing-writes": StepCase(
        LOST_WRITER,
        acquire("r2", "host-b", on(A, READER)),
        Outcome.REFUSED,
        frozenset({(A, MVD, DELAY, "w")}),
    ),
    "reader-compatible-with-the-lost-writer-is-granted": StepCase(
        LOST_WRITER,
        acquire("s2", "host-b", on(A, SHARER)),
        Outcome.GRANTED,
        events=((EventType.ACQUIRED, "s2"),),
        delays=frozenset({"w"}),
    ),
    "end-of-delay-is-an-event": StepCase(
        LOST_WRITER,
        EndDelayRequest("w"),
        Outcome.RELEASED,
        events=((EventType.LOCK_DELAY_ENDED, "w"),),
        delays=frozenset(),
    ),
    "end-of-delay-frees-the-node": StepCase(
        (*LOST_WRITER, EndDelayRequest("w")),
        acquire("w2", "host-b", on(A, WRITER)),
        Outcome.GRANTED,
        events=((EventType.ACQUIRED, "w2"),),
    ),
    "no-delay-to-end-is-not-held": StepCase(
        LOST_WRITER, EndDelayRequest("other"), Outcome.NOT_HELD, delays=frozenset({"w"})
    ),
    "lost-id-taken-already-exists": StepCase(
        LOST_WRITER,
        acquire("w", "host-a", on(B, WRITER)),
        Outcome.ALREADY_EXISTS,
        holders=frozenset(),
    ),
    "a-waiter-kept-out-by-a-lock-delay-still-goes-first": StepCase(
        (*LOST_WRITER, acquire("w2", "host-b", (A, RESIZE, ALL_MASK), wait=True)),
        acquire("s2", "host-c", (A, READS, ALL_MASK & ~RESIZE)),
        Outcome.REFUSED,
        frozenset({(A, Action.RESIZE, AHEAD, "w2")}),
    ),
    # Unwait.
    "unwait-leaves-the-queue": StepCase(
        QUEUE,
        UnwaitRequest("w1"),
        Outcome.RELEASED,
        events=((EventType.WAIT_ENDED, "w1"),),
        holders=frozenset({"r1"}),
        waiters=(),
    ),
    "unwait-of-a-job-not-queued-is-not-held": StepCase(
        QUEUE, UnwaitRequest("nope"), Outcome.NOT_HELD, waiters=("w1",)
    ),
    "unwait-of-a-held-job-is-not-held": StepCase(
        QUEUE, UnwaitRequest("r1"), Outcome.NOT_HELD, holders=frozenset({"r1"})
    ),
    # Conversion.
    "update-of-an-unknown-job-is-not-held": StepCase(
        QUEUE, UpdateRequest("nope", "host-a", nodes_of(on(A, READER))), Outcome.NOT_HELD
    ),
    "update-of-a-queued-job-is-not-held": StepCase(
        QUEUE, UpdateRequest("w1", "host-b", nodes_of(on(B, READER))), Outcome.NOT_HELD
    ),
    "update-by-another-owner-is-denied": StepCase(
        QUEUE, UpdateRequest("r1", "host-b", nodes_of(on(B, READER))), Outcome.PERMISSION_DENIED
    ),
    "update-to-the-same-nodes-is-unchanged": StepCase(
        (acquire("j", "host-a", on(A, READER), on(B, WRITER)),),
        UpdateRequest("j", "host-a", nodes_of(on(B, WRITER), on(A, READER))),
        Outcome.UNCHANGED,
    ),
    "update-granted": StepCase(
        QUEUE[:1],
        UpdateRequest("r1", "host-a", nodes_of(on(A, SHARER), on(B, WRITER))),
        Outcome.UPDATED,
        events=((EventType.UPDATED, "r1"),),
        holders=frozenset({"r1"}),
    ),
    "update-refused-by-another-holder": StepCase(
        (*QUEUE[:1], acquire("s1", "host-b", on(A, SHARER))),
        UpdateRequest("s1", "host-b", nodes_of(on(A, WRITER))),
        Outcome.REFUSED,
        frozenset({(A, MVD, DNA, "r1")}),
    ),
    "update-refused-by-a-lock-delay": StepCase(
        (*LOST_WRITER, acquire("s2", "host-b", on(A, SHARER))),
        UpdateRequest("s2", "host-b", nodes_of(on(A, READER))),
        Outcome.REFUSED,
        frozenset({(A, MVD, DELAY, "w")}),
    ),
    "update-dry-run-would-grant": StepCase(
        QUEUE[:1],
        UpdateRequest("r1", "host-a", nodes_of(on(A, WRITER)), dry_run=True),
        Outcome.WOULD_GRANT,
    ),
    "update-dry-run-refused": StepCase(
        (*QUEUE[:1], acquire("s1", "host-b", on(A, SHARER))),
        UpdateRequest("s1", "host-b", nodes_of(on(A, WRITER)), dry_run=True),
        Outcome.REFUSED,
        frozenset({(A, MVD, DNA, "r1")}),
    ),
    "update-never-against-itself": StepCase(
        QUEUE[:1],
        UpdateRequest("r1", "host-a", nodes_of(on(A, EXCLUSIVE))),
        Outcome.UPDATED,
        events=((EventType.UPDATED, "r1"),),
    ),
    "update-goes-ahead-of-the-waiters": StepCase(
        QUEUE,
        UpdateRequest("r1", "host-a", nodes_of(on(A, EXCLUSIVE))),
        Outcome.UPDATED,
        events=((EventType.UPDATED, "r1"),),
        waiters=("w1",),
    ),
    "loosening-always-succeeds": StepCase(
        (
            acquire("j", "host-a", on(A, WRITER), on(B, READER)),
            acquire("s", "host-b", on(A, SHARER), on(B, SHARER)),
            acquire("q", "host-c", on(B, WRITER), wait=True),
        ),
        UpdateRequest("j", "host-a", nodes_of((A, W, ALL_MASK))),
        Outcome.UPDATED,
        events=((EventType.UPDATED, "j"),),
        holders=frozenset({"j", "s"}),
    ),
    "update-that-drops-a-node-frees-it": StepCase(
        (
            acquire("j", "host-a", on(A, READER), on(B, EXCLUSIVE)),
            UpdateRequest("j", "host-a", nodes_of(on(A, READER))),
        ),
        acquire("x", "host-b", on(B, EXCLUSIVE)),
        Outcome.GRANTED,
        events=((EventType.ACQUIRED, "x"),),
    ),
}


def run_case(case: StepCase) -> tuple[State, State, Response]:
    start = State(lock_delay_ms=case.lock_delay_ms)
    before, _ = run(start, *case.given)
    after, answer = step(before, case.request)
    return before, after, answer


@pytest.mark.parametrize("case", STEP_CASES.values(), ids=STEP_CASES.keys())
def test_step_cases(case: StepCase) -> None:
    """Each request answers as the rules say, appends its events and leaves the expected state."""
    before, after, answer = run_case(case)
    assert answer.outcome is case.outcome, answer
    assert {(c.node, c.action, c.kind, c.holder_job_id) for c in answer.conflicts} == (
        case.conflicts
    )
    assert list(answer.conflicts) == sorted(set(answer.conflicts))
    assert answer.positions == case.positions
    appended = after.events[len(before.events) :]
    assert [(e.type, e.job_id) for e in appended] == list(case.events)
    assert [e.revision for e in appended] == list(
        range(before.revision + 1, before.revision + 1 + len(appended))
    )
    assert after.revision == answer.revision == before.revision + len(appended)
    assert bool(answer.cycle) == (answer.outcome is Outcome.DEADLOCK)
    if case.holders is not None:
        assert set(after.jobs) == case.holders
    if case.waiters is not None:
        assert [w.job.job_id for w in after.waiters] == list(case.waiters)
    if case.delays is not None:
        assert set(after.delays) == case.delays
    if not appended and answer.outcome is not Outcome.QUEUED:
        # Only a re-check changes the state without an event: it notes who is in the way.
        assert after == before


def test_recheck_keeps_the_place_and_notes_who_is_in_the_way() -> None:
    """A re-check takes no revision and no new seq; it refreshes the waiter's wait-for edges."""
    state, _ = run(State(), *QUEUE, acquire("r2", "host-c", on(A, READER), wait=True))
    assert [(w.job.job_id, w.seq, w.blocked) for w in state.waiters] == [
        ("w1", 1, (("host-a", "r1"),)),
        ("r2", 2, (("host-b", "w1"),)),
    ]
    # The reader in w1's way converts to a job that keeps w1 out with another holder's help
    # (an owner that waits for nobody, so no cycle closes).
    state, _ = run(
        state,
        acquire("s1", "host-d", on(A, SHARER)),
        UpdateRequest("s1", "host-d", nodes_of(on(A, READER))),
    )
    after, answer = step(state, QUEUE[1])
    assert answer.outcome is Outcome.QUEUED
    assert answer.positions == (1,)
    assert (after.revision, after.last_seq, after.events) == (
        state.revision,
        state.last_seq,
        state.events,
    )
    assert after.waiters[0] == Waiter(state.waiters[0].job, 1, (("host-a", "r1"), ("host-d", "s1")))
    assert after.waiters[1] == state.waiters[1]


def test_waiter_edges_leave_lock_delays_out() -> None:
    """The wait-for edges name holders and earlier waiters, never lost holders."""
    state, _ = run(
        State(lock_delay_ms=1000),
        *LOST_WRITER,
        acquire("r1", "host-b", on(B, READER)),
        acquire("w2", "host-c", on(A, WRITER), on(B, WRITER), wait=True),
        acquire("w3", "host-a", (B, READS, ALL_MASK & ~W), wait=True),
    )
    assert [(w.job.job_id, w.blocked) for w in state.waiters] == [
        ("w2", (("host-b", "r1"),)),
        ("w3", (("host-c", "w2"),)),
    ]
    assert state.last_seq == 2


def test_deadlock_changes_nothing_and_names_the_cycle() -> None:
    """The hold-and-wait example: B's wait would close A -> B -> A. Nothing changes, no event."""
    before, _ = run(State(), *HOLD_AND_WAIT)
    after, answer = step(before, acquire("b2", "host-b", on(X, EXCLUSIVE), wait=True))
    assert answer.outcome is Outcome.DEADLOCK
    assert after == before
    assert answer.revision == before.revision
    assert answer.conflicts == ()
    assert answer.cycle == (
        "host-b (job b2) waits for job a1 of host-a; host-a (job a2) waits for job b1 of host-b"
    )


def test_lock_delay_ends_and_tallies() -> None:
    """A lost holder's conflicts carry the end of its delay; the tallies count it as a holder;
    a clean release leaves nothing behind."""
    state, answers = run(
        State(lock_delay_ms=500),
        acquire("w", "host-a", on(A, WRITER), on(B, READER)),
        acquire("s", "host-b", on(A, SHARER)),
        ForceReleaseRequest("w", now_ms=1000),
        ExpireRequest("s", now_ms=2000),
    )
    assert [a.delay_end_ms for a in answers[2:]] == [1500, 2500]
    assert {job_id: end for job_id, (_, end) in state.delays.items()} == {"w": 1500, "s": 2500}
    lost = [state.delays["w"][0], state.delays["s"][0]]
    assert state.tallies(A) == tallies(lost, A)
    assert state.tallies(A)[Action.MODIFY_VISIBLE_DATA] == Tally(required_by=1, not_allowed_by=1)
    assert state.tallies(B) == tallies(lost[:1], B)
    _, answer = step(state, acquire("x", "host-c", on(A, EXCLUSIVE)))
    assert {(c.holder_job_id, c.until_ms) for c in answer.conflicts} == {("w", 1500), ("s", 2500)}
    assert all(c.kind is DELAY for c in answer.conflicts)
    _, released = step(state, ReleaseRequest("nope", "host-a"))
    assert released.delay_end_ms == 0


def test_update_keeps_token_and_lease() -> None:
    """A conversion changes only the node list: same token, acquisition time and lease."""
    state, _ = run(
        State(), AcquireRequest("j", "host-a", "commit", nodes_of(on(A, READER)), 30, now_ms=7)
    )
    after, answer = step(state, UpdateRequest("j", "host-a", nodes_of(on(B, WRITER))))
    assert answer.outcome is Outcome.UPDATED
    assert answer.job == Job(
        "j", "host-a", "commit", nodes_of(on(B, WRITER)), 1, acquired_ms=7, expires_ms=37, ttl_ms=30
    )
    assert after.jobs["j"] == answer.job
    assert after.last_token == 1


def test_events_of_jobs_over_time() -> None:
    """Every change takes the next revision and appends one event, whatever its kind."""
    state, _ = run(
        State(lock_delay_ms=10),
        *QUEUE,
        UpdateRequest("r1", "host-a", nodes_of(on(A, SHARER))),
        acquire("x", "host-c", on(B, EXCLUSIVE), wait=True),
        acquire("w1", "host-b", on(A, WRITER)),
        ForceReleaseRequest("x"),
        EndDelayRequest("x"),
        acquire("q", "host-a", on(A, EXCLUSIVE), wait=True),
        UnwaitRequest("q"),
    )
    assert [(e.revision, e.type, e.job_id) for e in state.events] == [
        (1, EventType.ACQUIRED, "r1"),
        (2, EventType.WAITING, "w1"),
        (3, EventType.UPDATED, "r1"),
        (4, EventType.ACQUIRED, "x"),
        (5, EventType.ACQUIRED, "w1"),
        (6, EventType.FORCE_RELEASED, "x"),
        (7, EventType.LOCK_DELAY_ENDED, "x"),
        (8, EventType.WAITING, "q"),
        (9, EventType.WAIT_ENDED, "q"),
    ]
    assert [e.name for e in EventType] == [
        "ACQUIRED",
        "RELEASED",
        "EXPIRED",
        "UPDATED",
        "FORCE_RELEASED",
        "WAITING",
        "WAIT_ENDED",
        "LOCK_DELAY_ENDED",
    ]


# --- Random histories ----------------------------------------------------------------------------

ids = st.sampled_from(["j0", "j1", "j2", "j3", "j4"])
owners = st.sampled_from(["host-a", "host-b", "host-c"])
history_nodes = st.lists(
    st.tuples(st.sampled_from([A, B, C]), masks, masks),
    min_size=1,
    max_size=3,
    unique_by=lambda n: n[0],
).map(lambda found: nodes_of(*found))
requests: st.SearchStrategy[Request] = st.one_of(
    st.builds(
        AcquireRequest,
        ids,
        owners,
        st.just("op"),
        history_nodes,
        dry_run=st.booleans(),
        wait=st.booleans(),
    ),
    st.builds(ReleaseRequest, ids, owners),
    st.builds(ExpireRequest, ids),
    st.builds(ForceReleaseRequest, ids),
    st.builds(EndDelayRequest, ids),
    st.builds(UnwaitRequest, ids),
    st.builds(UpdateRequest, ids, owners, history_nodes, dry_run=st.booleans()),
)


def compatible(one: NodeAccess, other: NodeAccess) -> bool:
    return not (one.require & ~other.allow or other.require & ~one.allow)


@settings(deadline=None)  # as above: timing is not what this checks
@given(st.lists(requests, max_size=40))
def test_random_histories_keep_the_invariants(history: list[Request]) -> None:
    """Whatever happens: holders and lost holders never conflict; an id is held, queued or lost,
    never two of these; the queue is in seq order; revisions count the events; loosening a held
    job is always granted."""
    state = State(lock_delay_ms=5)
    for request in history:
        state, _ = step(state, request)
        blocking = [*state.jobs.values(), *(job for job, _ in state.delays.values())]
        for i, one in enumerate(blocking):
            for other in blocking[i + 1 :]:
                for access in one.nodes:
                    held = other.access_to(access.node)
                    assert held is None or compatible(access, held), (one, other)
        queued = [w.job.job_id for w in state.waiters]
        assert len(set(queued)) == len(queued)
        assert not set(queued) & set(state.jobs)
        assert not set(state.delays) & (set(queued) | set(state.jobs))
        seqs = [w.seq for w in state.waiters]
        assert seqs == sorted(seqs) and all(0 < seq <= state.last_seq for seq in seqs)
        assert [e.revision for e in state.events] == list(range(1, state.revision + 1))
        tokens = [job.fencing_token for job in state.jobs.values()]
        assert all(0 < token <= state.last_token for token in tokens)
        assert len(set(tokens)) == len(tokens)
    for job in state.jobs.values():
        looser = tuple(NodeAccess(a.node, 0, ALL_MASK) for a in job.nodes[:1])
        _, answer = step(state, UpdateRequest(job.job_id, job.owner, looser))
        assert answer.outcome in (Outcome.UPDATED, Outcome.UNCHANGED)


def test_a_cycle_closed_by_a_conversion_is_reported_at_the_re_check() -> None:
    """w1 (host-b) waits for r1; r2 (host-c) queued behind w1. host-c's own holder then
    converts into w1's way: host-b waits for host-c, which waits for host-b. The re-check of w1
    answers DEADLOCK, and w1 leaves the queue with WAIT_ENDED."""
    state, _ = run(State(), *QUEUE, acquire("r2", "host-c", on(A, READER), wait=True))
    state, _ = run(
        state,
        acquire("s1", "host-c", on(A, SHARER)),
        UpdateRequest("s1", "host-c", nodes_of(on(A, READER))),
    )
    after, answer = step(state, QUEUE[1])
    assert answer.outcome is Outcome.DEADLOCK
    assert answer.cycle == (
        "host-b (job w1) waits for job s1 of host-c; host-c (job r2) waits for job w1 of host-b"
    )
    assert [w.job.job_id for w in after.waiters] == ["r2"]
    assert after.events[-1] == Event(after.revision, EventType.WAIT_ENDED, "w1")
    assert answer.revision == after.revision == state.revision + 1
