"""Pure tests of the arbitration rule and the oracle state machine in nac_server.model."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nac_server.model import (
    ALL_MASK,
    Action,
    AcquireRequest,
    Conflict,
    ConflictKind,
    Event,
    EventType,
    ExpireRequest,
    Job,
    NodeAccess,
    Outcome,
    ReleaseRequest,
    Request,
    Response,
    State,
    Tally,
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
        frozenset({(A, Action.MODIFY_VISIBLE_DATA, DNA, "w1"),
                   (A, Action.MODIFY_VISIBLE_DATA, HREQ, "w1")}),
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
        frozenset({(A, Action.GRAPH_RECONFIG, DNA, "commit-1"),
                   (A, Action.GRAPH_RECONFIG, HREQ, "commit-1")}),
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
        frozenset({(A, Action.MODIFY_VISIBLE_DATA, DNA, "vm1-cdrom"),
                   (A, Action.RESIZE, DNA, "vm1-cdrom"),
                   (A, Action.RESIZE, DNA, "mirror-1")}),
    ),
    "several-actions-one-holder": RuleCase(
        (GUEST_WRITER,),
        nodes_of((A, READS, READS)),
        frozenset({(A, Action.MODIFY_VISIBLE_DATA, HREQ, "vm1-disk"),
                   (A, Action.MODIFY_METADATA, HREQ, "vm1-disk"),
                   (A, Action.RESIZE, HREQ, "vm1-disk")}),
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
    assert {(c.action.bit, c.kind) for c in found} == expected_pair(
        held.require, held.allow, require, allow
    ), (held, require, allow)
    assert len(found) == len({(c.action, c.kind) for c in found})
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


def _sample_pairs(seed: int) -> list[tuple[int, int]]:
    extremes = [(0, 0), (0, ALL_MASK), (ALL_MASK, 0), (ALL_MASK, ALL_MASK)]
    rng = random.Random(seed)
    return extremes + [(rng.randrange(64), rng.randrange(64)) for _ in range(60)]


ALL_PAIRS = [(require, allow) for require in range(64) for allow in range(64)]


def test_every_holder_mask_pair_against_sampled_requests() -> None:
    """All 4096 holder (require, allow) pairs x 64 requests: conflicts and tallies match the rule."""
    requests = _sample_pairs(seed=1)
    for holder_require, holder_allow in ALL_PAIRS:
        holder = job("h", "o", "op", (A, holder_require, holder_allow))
        counts = tallies([holder], A)
        for require, allow in requests:
            check_pair(holder, counts, require, allow)


def test_every_request_mask_pair_against_sampled_holders() -> None:
    """All 4096 request (require, allow) pairs x 64 holders: conflicts and tallies match the rule."""
    for holder_require, holder_allow in _sample_pairs(seed=2):
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


@given(
    st.lists(st.tuples(st.sampled_from([A, B]), masks, masks), max_size=5),
    st.lists(st.tuples(st.sampled_from([A, B, C]), masks, masks), min_size=1, max_size=3,
             unique_by=lambda n: n[0]),
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
) -> AcquireRequest:
    return AcquireRequest(job_id, owner, operation, nodes_of(*nodes), ttl_ms=0, dry_run=dry_run)


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
    state, answers = run(
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
    ids=["other-owner", "other-operation", "other-mask", "fewer-nodes", "more-nodes",
         "other-node"],
)
def test_same_id_other_content_answers_already_exists(request_: AcquireRequest) -> None:
    """An acquire reusing a held id with other content answers ALREADY_EXISTS and changes nothing."""
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
                Conflict(A, Action.MODIFY_VISIBLE_DATA, DNA, "j1", "host-a", "commit"),
                Conflict(B, Action.MODIFY_VISIBLE_DATA, DNA, "j2", "host-b", "commit"),
                Conflict(B, Action.MODIFY_VISIBLE_DATA, HREQ, "j2", "host-b", "commit"),
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
