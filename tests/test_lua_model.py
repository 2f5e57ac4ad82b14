"""The real Lua scripts, driven through Store against real Redis, agree with nac_server.model.

The state machine below runs every request the store serves: acquire (with and without a wait,
dry runs, retries and re-checks of queued jobs), update, unwait, release, expire, force-release
and the end of a lock-delay. After every step it compares the answer and the whole stored state
with the model: holders, waiters in queue order, each node's tallies, queue and lock-delays, the
event stream and the set of Redis keys. A scripted history, branch_walk, drives the same machine
through every branch of MUST_REACH on purpose, so that coverage does not depend on the examples
hypothesis happens to draw.

CONTENDED notices are rate-limited by the store's clock, so the model does not have them. They
take no revision and live in their own stream, so revisions compare one for one, and the notices
are checked on their own.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import TypeVar, cast

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import event as note_event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from redis.asyncio import Redis

from nac_server import deployment, model
from nac_server.embedded import RedisProcess
from nac_server.history import Position
from nac_server.keys import NAMESPACES_KEY, Keys
from nac_server.model import (
    ALL_MASK,
    AcquireRequest,
    Action,
    Conflict,
    ConflictKind,
    EndDelayRequest,
    ExpireRequest,
    ForceReleaseRequest,
    Job,
    NodeAccess,
    Outcome,
    ReleaseRequest,
    Request,
    Response,
    State,
    UnwaitRequest,
    UpdateRequest,
)
from nac_server.records import StoredEvent
from nac_server.store import Store
from tests import store_calls

T = TypeVar("T")

NS = "prop"
NODES = ["/vol/a.qcow2", "/vol/b.qcow2", "/vol/c.qcow2", "/vol/d.qcow2"]
OWNERS = ["host-a", "host-b", "host-c"]
OPERATIONS = ["commit", "mirror", "backup"]
JOB_IDS = [f"j{i}" for i in range(8)]
# Mostly no group, so that groups meet jobs of no group and of the other group.
GROUPS = ["", "", "qemu-1", "qemu-2"]
# Long enough that no lease, wait, waiter liveness or lock-delay runs out on its own during a run;
# expiry and the end of a delay are forced through their zsets.
TTL_MS = 3_600_000
WAIT_MS = 60_000
LOCK_DELAY_MS = 600_000
LIVENESS_MS = 600_000
# The model's lock-delay: any positive value; the delay's end is compared loosely.
MODEL_LOCK_DELAY_MS = 1

READS = Action.READ_VISIBLE_DATA.bit | Action.READ_METADATA.bit
WRITE = Action.MODIFY_VISIBLE_DATA.bit
GRAPH = Action.GRAPH_RECONFIG.bit
RESIZE = Action.RESIZE.bit
LIVE_KINDS = (ConflictKind.HOLDER_DOES_NOT_ALLOW, ConflictKind.HOLDER_REQUIRES)
# Uniform masks conflict almost always. Two thirds of the draws take the usual shapes (need
# little, share much), so that several jobs hold one node and the aggregate counts must follow
# each of them out again.
usual_requires = st.sampled_from([0, READS, Action.READ_METADATA.bit, WRITE | READS, RESIZE, GRAPH])
usual_allows = st.sampled_from(
    [ALL_MASK, ALL_MASK & ~RESIZE, ALL_MASK & ~WRITE, ALL_MASK & ~GRAPH, READS | WRITE]
)
require_masks = st.one_of(usual_requires, usual_requires, st.integers(0, ALL_MASK))
allow_masks = st.one_of(usual_allows, usual_allows, st.integers(0, ALL_MASK))
node_lists = st.lists(st.sampled_from(NODES), min_size=1, max_size=3, unique=True).flatmap(
    lambda names: st.tuples(
        *(st.builds(NodeAccess, st.just(name), require_masks, allow_masks) for name in names)
    )
)

# What the runs reached, over every example of the stateful test.
REACHED: Counter[str] = Counter()
# Branches that branch_walk reaches on purpose (the random runs print how often they reach each).
MUST_REACH = (
    "acquire GRANTED",
    "acquire REFUSED",
    "acquire QUEUED (new waiter)",
    "acquire QUEUED (re-check kept its place)",
    "acquire GRANTED from the queue",
    "acquire DEADLOCK",
    "acquire DEADLOCK on a re-check",
    "conflict LOCK_DELAY",
    "conflict WAITING_AHEAD",
    "update UPDATED",
    "update REFUSED",
    "update UNCHANGED",
    "unwait left",
    "expire into lock-delay",
    "force-release into lock-delay",
    "lock-delay ended",
    "CONTENDED event",
    "acquire GRANTED beside its group",
    "lock-delay blocks its own group",
)


JobKey = tuple[str, str, str, tuple[NodeAccess, ...], int, str]


def job_key(job: Job, token_floor: int = 0) -> JobKey:
    """What Redis and the model must agree on; the times belong to Redis's clock alone. Redis's
    tokens count from a floor taken from its clock (the model's from 0): token_floor."""
    return (
        job.job_id,
        job.owner,
        job.operation,
        tuple(sorted(job.nodes)),
        job.fencing_token - token_floor if job.fencing_token else 0,
        job.group,
    )


def loose(conflicts: tuple[Conflict, ...]) -> list[Conflict]:
    """Conflicts with the end of any lock-delay left out (the model has no clock)."""
    return sorted(replace(c, until_ms=0) for c in conflicts)


async def _awaited(awaitable: Awaitable[T]) -> T:
    # redis-py types its commands as Awaitable, and run_until_complete wants a coroutine.
    return await awaitable


class LuaModelMachine(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.redis: Redis = self.run(self._connect())
        self.run(self.redis.flushall())
        self.store = Store(self.redis, lock_delay_ms=LOCK_DELAY_MS, waiter_liveness_ms=LIVENESS_MS)
        # The Lua keeps a lost job's id taken until its delay ends (see the model's State).
        self.state = State(lock_delay_ms=MODEL_LOCK_DELAY_MS)
        self.keys = Keys(NS)
        # Where Redis's revisions and tokens start (from its clock), learnt from the first seen.
        self.revision_floor: int | None = None
        self.token_floor: int | None = None
        self.registered = False
        # Every stored change so far, as (revision, type), and the last notice read.
        self.stored_events: list[tuple[int, str]] = []
        self.last_notice = Position(0)
        # (holder id, waiting owner) -> the store's time of the pair's last CONTENDED notice.
        self.contended_at: dict[tuple[str, str], int] = {}

    async def _connect(self) -> Redis:
        return Redis.from_url(self.url, decode_responses=True)

    def run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(_awaited(awaitable))

    def teardown(self) -> None:
        self.run(self.redis.aclose())
        self.loop.close()

    def reach(self, branch: str) -> None:
        REACHED[branch] += 1
        # The scripted walk drives the machine outside a hypothesis test.
        if currently_in_test_context():
            note_event(branch)

    # --- revisions and events ---------------------------------------------------------------

    def store_time_ms(self) -> int:
        seconds, micros = self.run(self.redis.time())
        return int(seconds) * 1000 + int(micros) // 1000

    def read_new_events(self) -> list[StoredEvent]:
        """The changes and notices stored since the last call, each in its own stream's order."""
        seen = self.stored_events[-1][0] if self.stored_events else 0
        new = self.run(self.store.log.events(NS, Position(seen), 100_000))
        changes = [e for e in new if not e.notice]
        self.stored_events += [(e.revision, e.type) for e in changes]
        if changes and not seen:
            assert changes[0].first, "the oldest event must be the history's first"
        start = seen + 1 if seen else (changes[0].revision if changes else 1)
        assert [e.revision for e in changes] == list(range(start, start + len(changes)))
        notices = [e for e in new if e.notice and e.position > self.last_notice]
        if notices:
            self.last_notice = notices[-1].position
        return changes + notices

    def modelled_revision(self, revision: int) -> int:
        """The model's revision for a store revision. Redis's count from a floor taken from its
        clock when the namespace's first event was written, the model's from 0; notices take
        none."""
        if revision == 0:
            return 0
        if self.revision_floor is None:
            [first] = self.run(self.store.log.events(NS, Position(0), 1))
            assert first.first, "the oldest event must be the history's first"
            self.revision_floor = first.revision - 1
        return revision - self.revision_floor

    def key(self, job: Job) -> JobKey:
        """job_key of a job read from Redis."""
        if job.fencing_token and self.token_floor is None:
            raise AssertionError("a token was read before any grant was checked")
        return job_key(job, self.token_floor or 0)

    # --- one step -----------------------------------------------------------------------------

    def check(self, request: Request, stored: Response, started_ms: int) -> Response:
        """Step the model with request and compare its answer with the store's."""
        self.state, expected = model.step(self.state, request)
        self.check_contention(request, stored, started_ms)
        assert stored.outcome is expected.outcome, (stored, expected)
        assert self.modelled_revision(stored.revision) == expected.revision, (stored, expected)
        assert loose(stored.conflicts) == loose(expected.conflicts), (stored, expected)
        for conflict in stored.conflicts:
            assert (conflict.until_ms > 0) == (conflict.kind is ConflictKind.LOCK_DELAY), conflict
        assert stored.positions == expected.positions, (stored, expected)
        assert bool(stored.cycle) == bool(expected.cycle), (stored, expected)
        assert (stored.delay_end_ms > 0) == (expected.delay_end_ms > 0), (stored, expected)
        assert (stored.job is None) == (expected.job is None), (stored, expected)
        if stored.job is not None and expected.job is not None:
            if self.token_floor is None and stored.job.fencing_token:
                # The first grant: the model's tokens start at 1.
                self.token_floor = stored.job.fencing_token - expected.job.fencing_token
            assert self.key(stored.job) == job_key(expected.job), (stored, expected)
        kinds = {conflict.kind for conflict in expected.conflicts}
        for kind in (ConflictKind.LOCK_DELAY, ConflictKind.WAITING_AHEAD):
            if kind in kinds:
                self.reach(f"conflict {kind.name}")
        return expected

    def check_contention(self, request: Request, stored: Response, started_ms: int) -> None:
        """The CONTENDED notices a call sent: only for refusals and queuing, at most one per live
        holder in the way and waiting owner per second, each with that holder's conflicts, all
        after the call's revision and none taking one."""
        contended = [event for event in self.read_new_events() if event.type == "CONTENDED"]
        assert all(event.notice > 0 for event in contended), contended
        may_contend = (
            isinstance(request, AcquireRequest | UpdateRequest)
            and not request.dry_run
            and stored.outcome in (Outcome.REFUSED, Outcome.QUEUED)
        )
        if not may_contend:
            assert contended == [], (request, contended)
            return
        assert isinstance(request, AcquireRequest | UpdateRequest)
        if contended:
            self.reach("CONTENDED event")
        holders = {c.holder_job_id for c in stored.conflicts if c.kind in LIVE_KINDS}
        named = [event.job.job_id for event in contended]
        assert len(named) == len(set(named)) and set(named) <= holders, (named, holders)
        owner = request.owner
        for event in contended:
            assert event.revision == stored.revision, (event, stored)
            assert event.contention is not None
            assert (event.contention.waiter.job_id, event.contention.waiter.owner) == (
                request.job_id,
                owner,
            )
            carried = list(event.contention.conflicts)
            wanted = [
                c
                for c in stored.conflicts
                if c.holder_job_id == event.job.job_id and c.kind in LIVE_KINDS
            ]
            # A notice names at most 16 conflicts.
            assert set(carried) <= set(wanted), (event, stored)
            assert len(carried) == min(16, len(wanted)), (event, stored)
        # At most one notice per holder and waiting owner per second of the store's clock; a
        # pair's first never waits.
        for holder in holders:
            pair = (holder, owner)
            emitted = next((e for e in contended if e.job.job_id == holder), None)
            if emitted is None:
                assert pair in self.contended_at, pair
                assert started_ms - self.contended_at[pair] < 1000, pair
                continue
            if pair in self.contended_at:
                assert emitted.time_ms - self.contended_at[pair] >= 1000, pair
            self.contended_at[pair] = emitted.time_ms

    def do_acquire(self, request: AcquireRequest) -> Response:
        started = self.store_time_ms()
        stored = self.run(
            store_calls.acquire(
                self.store,
                NS,
                request.job_id,
                request.owner,
                request.operation,
                request.nodes,
                TTL_MS,
                dry_run=request.dry_run,
                wait_ms=WAIT_MS if request.wait else 0,
                group=request.group,
            )
        )
        if not request.dry_run:
            self.registered = True
        was_queued = self.state.waiter(request.job_id) is not None and not request.dry_run
        ungrouped = self.state.conflicts(request.nodes) if request.group else ()
        expected = self.check(request, stored, started)
        if expected.outcome is Outcome.GRANTED and any(c.kind in LIVE_KINDS for c in ungrouped):
            self.reach("acquire GRANTED beside its group")
        if request.group and any(
            c.kind is ConflictKind.LOCK_DELAY and self.lost_group(c.holder_job_id) == request.group
            for c in expected.conflicts
        ):
            self.reach("lock-delay blocks its own group")
        branch = f"acquire {expected.outcome.name}"
        if expected.outcome is Outcome.QUEUED:
            branch += " (re-check kept its place)" if was_queued else " (new waiter)"
        if expected.outcome is Outcome.GRANTED and was_queued:
            self.reach("acquire GRANTED from the queue")
        if expected.outcome is Outcome.DEADLOCK and was_queued:
            self.reach("acquire DEADLOCK on a re-check")
        self.reach(branch)
        return stored

    def lost_group(self, job_id: str) -> str:
        entry = self.state.delays.get(job_id)
        return "" if entry is None else entry[0].group

    def end_delay(self, job_id: str) -> None:
        """Time passes for the lock-delay of job_id, and only for it; the sweep ends it."""
        self.run(self.redis.zadd(self.keys.delays, {job_id: 0}))
        due = self.run(self.store.due(NS))
        assert (due.jobs, due.waiters) == ((), ())
        assert [job.job_id for job in due.delays] == [job_id]
        for lost in due.delays:
            assert self.key(lost) == job_key(self.state.delays[job_id][0])
            started = self.store_time_ms()
            ended = self.run(self.store.end_delay(NS, lost))
            assert ended
            # end_delay answers a bool; its revision is that of its event, the current one.
            revision = self.run(self.store.log.revision(NS))
            self.check(
                EndDelayRequest(lost.job_id), Response(Outcome.RELEASED, revision, lost), started
            )
            self.reach("lock-delay ended")

    def do_update(self, request: UpdateRequest) -> Response:
        started = self.store_time_ms()
        stored = self.run(
            store_calls.update(
                self.store,
                NS,
                request.job_id,
                request.owner,
                request.nodes,
                dry_run=request.dry_run,
            )
        )
        expected = self.check(request, stored, started)
        self.reach(f"update {expected.outcome.name}")
        return expected

    def do_release(self, job_id: str, owner: str) -> Response:
        started = self.store_time_ms()
        stored = self.run(store_calls.release(self.store, NS, job_id, owner))
        return self.check(ReleaseRequest(job_id, owner), stored, started)

    def do_force_release(self, job_id: str) -> Response:
        started = self.store_time_ms()
        stored = self.run(store_calls.force_release(self.store, NS, job_id, "stuck", "operator"))
        expected = self.check(ForceReleaseRequest(job_id), stored, started)
        if expected.outcome is Outcome.RELEASED:
            self.reach("force-release into lock-delay")
        return expected

    def do_unwait(self, job: Job) -> bool:
        """The waiting call for job gives up; whether it was queued."""
        started = self.store_time_ms()
        left = self.run(self.store.unwait(NS, job.job_id, [a.node for a in job.nodes]))
        revision = self.run(self.store.log.revision(NS))
        stored = (
            Response(Outcome.RELEASED, revision, job)
            if left
            else Response(Outcome.NOT_HELD, revision)
        )
        self.check(UnwaitRequest(job.job_id), stored, started)
        if left:
            self.reach("unwait left")
        return left

    def contested(self) -> list[tuple[str, str]]:
        """(held job, node) pairs where another holder or a lock-delay keeps that node from being
        taken exclusively, so that a conversion taking it must be refused."""
        blocking = [*self.state.jobs.values(), *(lost for lost, _ in self.state.delays.values())]
        return sorted(
            {
                (job_id, access.node)
                for job_id in self.state.jobs
                for other in blocking
                if other.job_id != job_id
                for access in other.nodes
                if (access.require, access.allow) != (0, ALL_MASK)
            }
        )

    # --- rules --------------------------------------------------------------------------------

    @rule(
        job_id=st.sampled_from(JOB_IDS),
        owner=st.sampled_from(OWNERS),
        operation=st.sampled_from(OPERATIONS),
        nodes=node_lists,
        dry_run=st.booleans(),
        wait=st.booleans(),
        group=st.sampled_from(GROUPS),
    )
    def acquire(
        self,
        job_id: str,
        owner: str,
        operation: str,
        nodes: tuple[NodeAccess, ...],
        dry_run: bool,
        wait: bool,
        group: str,
    ) -> None:
        self.do_acquire(
            AcquireRequest(job_id, owner, operation, nodes, dry_run=dry_run, wait=wait, group=group)
        )

    @rule(
        job_id=st.sampled_from(JOB_IDS),
        owner=st.sampled_from(OWNERS),
        nodes=node_lists,
        group=st.sampled_from(GROUPS),
    )
    def acquire_waiting(
        self, job_id: str, owner: str, nodes: tuple[NodeAccess, ...], group: str
    ) -> None:
        """Acquire with a wait, a second rule so that queues form often."""
        self.do_acquire(AcquireRequest(job_id, owner, "commit", nodes, wait=True, group=group))

    @precondition(lambda self: bool(self.state.waiters))
    @rule(data=st.data(), wait=st.booleans())
    def recheck_waiter(self, data: st.DataObject, wait: bool) -> None:
        """The waiting call checks again, in its place in the queue (with or without a wait)."""
        waiter = data.draw(st.sampled_from(self.state.waiters))
        nodes = data.draw(st.permutations(waiter.job.nodes))
        request = AcquireRequest(
            waiter.job.job_id,
            waiter.job.owner,
            waiter.job.operation,
            tuple(nodes),
            wait=wait,
            group=waiter.job.group,
        )
        answer = self.do_acquire(request)
        assert answer.outcome in (Outcome.QUEUED, Outcome.GRANTED)

    @precondition(lambda self: len({job.owner for job in self.state.jobs.values()}) > 1)
    @rule(data=st.data(), ids=st.permutations(JOB_IDS))
    def hold_and_wait(self, data: st.DataObject, ids: list[str]) -> None:
        """Two owners each wait, exclusively, for a node the other holds: the second wait closes
        a cycle unless something else decides first."""
        first = data.draw(st.sampled_from(sorted(self.state.jobs)))
        owner = self.state.jobs[first].owner
        others = sorted(i for i, job in self.state.jobs.items() if job.owner != owner)
        second = data.draw(st.sampled_from(others))
        free = [i for i in ids if i not in self.state.jobs]
        if len(free) < 2:
            return
        for job_id, waiting, held in ((free[0], first, second), (free[1], second, first)):
            node = data.draw(st.sampled_from(self.state.jobs[held].nodes)).node
            waiter = self.state.jobs[waiting].owner
            self.do_acquire(
                AcquireRequest(job_id, waiter, "commit", (NodeAccess(node, WRITE, 0),), wait=True)
            )

    @precondition(lambda self: bool(self.state.waiters) and bool(self.state.jobs))
    @rule(data=st.data())
    def free_a_waiter(self, data: st.DataObject) -> None:
        """The holders in a waiter's way release their jobs, and the waiter checks again: it is
        granted unless a lock-delay or an earlier waiter still keeps it out."""
        waiter = data.draw(st.sampled_from(self.state.waiters))
        in_the_way = self.state.conflicts(waiter.job.nodes, seq=waiter.seq, group=waiter.job.group)
        for job_id in sorted({c.holder_job_id for c in in_the_way if c.kind in LIVE_KINDS}):
            self.do_release(job_id, self.state.jobs[job_id].owner)
        job = waiter.job
        answer = self.do_acquire(
            AcquireRequest(job.job_id, job.owner, job.operation, job.nodes, group=job.group)
        )
        assert answer.outcome in (Outcome.QUEUED, Outcome.GRANTED)

    @precondition(lambda self: bool(self.state.jobs) or bool(self.state.waiters))
    @rule(
        data=st.data(),
        change=st.sampled_from(["none", "none", "owner", "operation", "mask", "nodes", "group"]),
    )
    def acquire_known_id(self, data: st.DataObject, change: str) -> None:
        """Reuse a held or queued id, nodes shuffled and, unless change is none, one part
        altered."""
        known = [*self.state.jobs.values(), *(w.job for w in self.state.waiters)]
        held = data.draw(st.sampled_from(known))
        owner, operation, group = held.owner, held.operation, held.group
        nodes = list(data.draw(st.permutations(held.nodes)))
        if change == "owner":
            owner = data.draw(st.sampled_from([o for o in OWNERS if o != owner]))
        elif change == "operation":
            operation = data.draw(st.sampled_from([o for o in OPERATIONS if o != operation]))
        elif change == "mask":
            index = data.draw(st.integers(0, len(nodes) - 1))
            flip = data.draw(st.integers(1, ALL_MASK))
            target = nodes[index]
            nodes[index] = (
                NodeAccess(target.node, target.require ^ flip, target.allow)
                if data.draw(st.booleans())
                else NodeAccess(target.node, target.require, target.allow ^ flip)
            )
        elif change == "group":
            group = data.draw(st.sampled_from([g for g in GROUPS if g != group]))
        elif change == "nodes":
            names = data.draw(
                st.lists(st.sampled_from(NODES), min_size=1, max_size=3, unique=True).filter(
                    lambda names: sorted(names) != sorted(a.node for a in held.nodes)
                )
            )
            kept = {access.node: access for access in held.nodes}
            nodes = [kept.get(name, NodeAccess(name, 0, ALL_MASK)) for name in names]
        queued = held.job_id not in self.state.jobs
        request = AcquireRequest(
            held.job_id, owner, operation, tuple(nodes), wait=data.draw(st.booleans()), group=group
        )
        answer = self.do_acquire(request)
        if change != "none":
            assert answer.outcome is Outcome.ALREADY_EXISTS
        elif queued:
            assert answer.outcome in (Outcome.QUEUED, Outcome.GRANTED)
        else:
            assert answer.outcome is Outcome.EXISTING

    @precondition(lambda self: bool(self.state.jobs))
    @rule(
        data=st.data(),
        how=st.sampled_from(
            ["random", "loosen", "loosen", "tighten", "contest", "contest", "same", "unknown"]
        ),
        right_owner=st.integers(0, 4),
        other_owner=st.sampled_from(OWNERS),
        dry_run=st.integers(0, 3),
    )
    def update(
        self, data: st.DataObject, how: str, right_owner: int, other_owner: str, dry_run: int
    ) -> None:
        """Convert a held job (mostly by its owner): a new node list, the same one shuffled,
        loosened (always granted) or tightened (often refused); or an id that is not held."""
        job = self.state.jobs[data.draw(st.sampled_from(sorted(self.state.jobs)))]
        job_id = job.job_id
        nodes: tuple[NodeAccess, ...] = tuple(data.draw(st.permutations(job.nodes)))
        masks = st.integers(0, ALL_MASK)
        if how == "unknown":
            job_id = data.draw(st.sampled_from([i for i in JOB_IDS if i not in self.state.jobs]))
            nodes = data.draw(node_lists)
        elif how == "random":
            nodes = data.draw(node_lists)
        elif how == "loosen":
            # Fewer nodes, fewer requires, more allows: always granted.
            kept = data.draw(st.lists(st.sampled_from(nodes), min_size=1, unique=True))
            nodes = tuple(
                NodeAccess(a.node, a.require & data.draw(masks), a.allow | data.draw(masks))
                for a in kept
            )
        elif how == "contest":
            # Also take, exclusively, a node that another holder or a lock-delay blocks.
            others = [j for j in self.state.jobs.values() if j.job_id != job_id]
            others += [lost for lost, _ in self.state.delays.values()]
            if others:
                other = data.draw(st.sampled_from(others))
                taken = data.draw(st.sampled_from(other.nodes)).node
                nodes = (*(a for a in nodes if a.node != taken), NodeAccess(taken, ALL_MASK, 0))
        elif how == "tighten":
            nodes = tuple(
                NodeAccess(a.node, a.require | data.draw(masks), a.allow & data.draw(masks))
                for a in nodes
            )
        held = self.state.jobs.get(job_id)
        owner = held.owner if held is not None and right_owner else other_owner
        # A dry run one time in four.
        expected = self.do_update(UpdateRequest(job_id, owner, nodes, dry_run=not dry_run))
        if held is not None and owner == held.owner:
            if how == "loosen":
                assert expected.outcome in (Outcome.UPDATED, Outcome.UNCHANGED, Outcome.WOULD_GRANT)
            if how == "same":
                assert expected.outcome is Outcome.UNCHANGED

    @precondition(lambda self: bool(self.contested()))
    @rule(data=st.data(), dry_run=st.booleans())
    def update_contested(self, data: st.DataObject, dry_run: bool) -> None:
        """A holder converts to take, exclusively, a node that another holder or a lock-delay
        blocks: refused, whatever else it keeps. (Random conversions rarely collide.)"""
        job_id, node = data.draw(st.sampled_from(self.contested()))
        job = self.state.jobs[job_id]
        nodes = (*(a for a in job.nodes if a.node != node), NodeAccess(node, ALL_MASK, 0))
        answer = self.do_update(UpdateRequest(job_id, job.owner, nodes, dry_run=dry_run))
        assert answer.outcome is Outcome.REFUSED, answer

    @precondition(lambda self: bool(self.state.waiters))
    @rule(data=st.data())
    def unwait(self, data: st.DataObject) -> None:
        """A waiting call gives up (its wait ended or its client went away); sometimes for an id
        that is not queued."""
        ids = st.sampled_from([w.job.job_id for w in self.state.waiters]) | st.sampled_from(JOB_IDS)
        job_id = data.draw(ids)
        queued = self.state.waiter(job_id)
        # The arbiter builds its Waiter from the request; the script checks the nodes.
        job = (
            queued.job if queued is not None else Job(job_id, "host-a", "op", data.draw(node_lists))
        )
        assert self.do_unwait(job) == (queued is not None)

    @rule(
        data=st.data(),
        how=st.sampled_from(["release", "release", "release", "force"]),
        right_owner=st.integers(0, 3),
        other_owner=st.sampled_from(OWNERS),
    )
    def end_job(self, data: st.DataObject, how: str, right_owner: int, other_owner: str) -> None:
        """Release (mostly by its owner) or force-release, often of an id that is not held."""
        # Half the time a held job, else any id of the pool (often one that is not held).
        ids = st.sampled_from(JOB_IDS)
        if self.state.jobs:
            ids = st.sampled_from(sorted(self.state.jobs)) | ids
        job_id = data.draw(ids)
        held = self.state.jobs.get(job_id)
        if how == "force":
            self.do_force_release(job_id)
            return
        owner = held.owner if held is not None and right_owner else other_owner
        self.do_release(job_id, owner)

    @precondition(lambda self: bool(self.state.jobs))
    @rule(data=st.data(), force=st.booleans())
    def lose_job(self, data: st.DataObject, force: bool) -> None:
        """A held job's lease runs out, or an operator ends it: its nodes go into lock-delay."""
        job_id = data.draw(st.sampled_from(sorted(self.state.jobs)))
        if not force:
            self.expire(job_id)
            return
        assert self.do_force_release(job_id).outcome is Outcome.RELEASED

    def expire(self, job_id: str) -> None:
        # Stands in for time passing: this lease, and only this one, has run out.
        self.run(self.redis.zadd(self.keys.leases, {job_id: 0}))
        due = self.run(self.store.due(NS))
        assert [job.job_id for job in due.jobs] == [job_id]
        assert (due.waiters, due.delays) == ((), ())
        for job in due.jobs:
            started = self.store_time_ms()
            stored = self.run(self.store.expire(NS, job))
            self.check(ExpireRequest(job.job_id), stored, started)
            self.reach("expire into lock-delay")

    @precondition(lambda self: bool(self.state.delays))
    @rule(data=st.data())
    def delay_ends(self, data: st.DataObject) -> None:
        self.end_delay(data.draw(st.sampled_from(sorted(self.state.delays))))

    # --- the whole state ----------------------------------------------------------------------

    def check_whole_state(self) -> None:
        """Every invariant below, for a history driven step by step rather than by hypothesis."""
        self.jobs_and_waiters_match()
        self.nodes_match()
        self.events_match()
        self.no_other_keys()

    @invariant()
    def jobs_and_waiters_match(self) -> None:
        revision, jobs, waiters = self.run(self.store.snapshot(NS))
        assert self.modelled_revision(revision) == self.state.revision
        assert [self.key(job) for job in jobs] == [
            job_key(self.state.jobs[job_id]) for job_id in sorted(self.state.jobs)
        ]
        assert [(self.key(w.job), w.seq) for w in waiters] == [
            (job_key(w.job), w.seq) for w in self.state.waiters
        ]
        # Plain ZRANGE without scores: a list of members, whatever the union type says.
        leases = cast(list[str], self.run(self.redis.zrange(self.keys.leases, 0, -1)))
        assert sorted(leases) == sorted(self.state.jobs)
        waitexp = cast(list[str], self.run(self.redis.zrange(self.keys.waitexp, 0, -1)))
        assert sorted(waitexp) == sorted(w.job.job_id for w in self.state.waiters)
        ghosts = cast(list[str], self.run(self.redis.zrange(self.keys.delays, 0, -1)))
        assert sorted(ghosts) == sorted(self.state.delays)

    @invariant()
    def nodes_match(self) -> None:
        jobs = list(self.state.jobs.values())
        for name in NODES:
            view = self.run(self.store.node(NS, name))
            assert self.modelled_revision(view.revision) == self.state.revision
            assert view.tallies == self.state.tallies(name), name
            assert [self.key(job) for job in view.holders] == sorted(
                job_key(job) for job in jobs if job.access_to(name) is not None
            )
            assert [w.job.job_id for w in view.waiters] == [
                w.job.job_id for w in self.state.queue(name)
            ], name
            assert sorted(self.key(delay.job) for delay in view.delays) == sorted(
                job_key(lost)
                for lost, _ in self.state.delays.values()
                if lost.access_to(name) is not None
            ), name
            # The per-group counts: live holders of a group only, no zeros left behind.
            expected: Counter[str] = Counter()
            for job in jobs:
                access = job.access_to(name)
                if access is None or not job.group:
                    continue
                expected["gn:" + job.group] += 1
                for action in Action:
                    if access.require & action.bit:
                        expected[f"gr{action.value}:{job.group}"] += 1
                    if access.allow & action.bit:
                        expected[f"ga{action.value}:{job.group}"] += 1
            stored = self.run(self.redis.hgetall(self.keys.node(name)))
            grouped = {k: int(v) for k, v in stored.items() if k[0] == "g"}
            assert grouped == dict(expected), name

    @invariant()
    def events_match(self) -> None:
        events = [
            e for e in self.run(self.store.log.events(NS, Position(0), 100_000)) if not e.notice
        ]
        assert [(e.revision, e.type) for e in events] == self.stored_events
        assert [self.modelled_revision(e.revision) for e in events] == list(
            range(1, len(events) + 1)
        )
        modelled = [
            (self.modelled_revision(e.revision), e.type, e.job.job_id)
            for e in events
            if e.type != "CONTENDED"
        ]
        assert modelled == [(e.revision, e.type.name, e.job_id) for e in self.state.events]

    @invariant()
    def no_other_keys(self) -> None:
        keys = self.keys
        state = self.state
        held = {access.node for job in state.jobs.values() for access in job.nodes}
        lost = {access.node for job, _ in state.delays.values() for access in job.nodes}
        queued = {access.node for w in state.waiters for access in w.job.nodes}
        expected = {keys.node(name) for name in held | lost} | {keys.queue(n) for n in queued}
        if self.registered:
            expected.add(NAMESPACES_KEY)
        if state.jobs:
            expected |= {keys.jobs, keys.leases}
        if self.stored_events:
            expected |= {keys.revision, keys.events, keys.evbytes}
        if state.last_token:
            expected.add(keys.fence)
        if state.waiters:
            expected |= {keys.waiters, keys.waitexp}
        if state.last_seq:
            expected.add(keys.waitseq)
        if state.delays:
            expected |= {keys.delays, keys.delayjobs}
        if self.last_notice.is_notice:
            expected |= {keys.contended, keys.notices}
        if self.store.deployment.id:
            # Set when the first grant looked at the deployment's epoch.
            expected |= {deployment.ID_KEY, deployment.RUN_KEY}
        assert set(self.run(self.redis.keys("*"))) == expected


@pytest.fixture(scope="module")
def redis_url(redis_process: RedisProcess) -> str:
    return redis_process.url


def test_lua_scripts_match_the_model(redis_url: str) -> None:
    """Every answer and the whole stored state match the model after every step of random
    histories. The examples are fixed by the hypothesis profile (see conftest.py); a longer random
    run is scripts/fuzz-model, which sets NAC_MODEL_EXAMPLES and NAC_MODEL_STEPS. Which branches
    the histories reach is printed; test_every_branch_on_purpose reaches each by construction."""

    class Bound(LuaModelMachine):
        url = redis_url

    REACHED.clear()
    run_state_machine_as_test(
        Bound,
        settings=settings(
            max_examples=int(os.environ.get("NAC_MODEL_EXAMPLES", "80")),
            stateful_step_count=int(os.environ.get("NAC_MODEL_STEPS", "30")),
            # Each step is several round trips to Redis.
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
    print("branches reached:", dict(sorted(REACHED.items())))
    missing = [branch for branch in MUST_REACH if not REACHED[branch]]
    if missing:
        print("not reached by these random histories:", missing)


def sole(node: str) -> NodeAccess:
    return NodeAccess(node, ALL_MASK, 0)


def shared(node: str) -> NodeAccess:
    return NodeAccess(node, READS, ALL_MASK)


Step = tuple[Callable[[], object], tuple[str, ...]]


def branch_walk(m: LuaModelMachine) -> list[Step]:
    """A history that reaches every branch of MUST_REACH on purpose: each step, and the branches
    it must reach (more may follow)."""

    def acquire(
        job_id: str, owner: str, *nodes: NodeAccess, wait: bool = False, group: str = ""
    ) -> Callable[[], object]:
        return lambda: m.do_acquire(
            AcquireRequest(job_id, owner, "commit", nodes, wait=wait, group=group)
        )

    def dry_run(job_id: str, owner: str, *nodes: NodeAccess) -> Callable[[], object]:
        return lambda: m.do_acquire(AcquireRequest(job_id, owner, "commit", nodes, dry_run=True))

    def update(job_id: str, *nodes: NodeAccess) -> Callable[[], object]:
        return lambda: m.do_update(UpdateRequest(job_id, m.state.jobs[job_id].owner, nodes))

    def unwait(job_id: str) -> Callable[[], object]:
        def leave() -> None:
            waiter = m.state.waiter(job_id)
            assert waiter is not None, job_id
            m.do_unwait(waiter.job)

        return leave

    a, b, c, d = NODES[:4]
    return [
        (acquire("j0", "host-a", sole(a)), ("acquire GRANTED",)),
        # The first refusal of a pair always tells the holder; a dry run never does.
        (acquire("j1", "host-b", shared(a)), ("acquire REFUSED", "CONTENDED event")),
        (dry_run("j1", "host-b", shared(a)), ("acquire REFUSED",)),
        (acquire("j1", "host-b", shared(a), sole(b), wait=True), ("acquire QUEUED (new waiter)",)),
        (
            acquire("j1", "host-b", sole(b), shared(a), wait=True),
            ("acquire QUEUED (re-check kept its place)",),
        ),
        # Nothing holds b, but j1 waits for it first.
        (acquire("j2", "host-c", shared(b)), ("acquire REFUSED", "conflict WAITING_AHEAD")),
        (partial(m.do_release, "j0", "host-a"), ()),
        (
            acquire("j1", "host-b", shared(a), sole(b)),
            ("acquire GRANTED", "acquire GRANTED from the queue"),
        ),
        # host-a holds c and waits for a, which j1 of host-b holds; host-b waiting for c would
        # close the cycle.
        (acquire("j2", "host-a", sole(c)), ("acquire GRANTED",)),
        (acquire("j3", "host-a", sole(a), wait=True), ("acquire QUEUED (new waiter)",)),
        (acquire("j4", "host-b", sole(c), wait=True), ("acquire DEADLOCK",)),
        (unwait("j3"), ("unwait left",)),
        (update("j1", shared(a), shared(b)), ("update UPDATED",)),
        (update("j1", shared(b), shared(a)), ("update UNCHANGED",)),
        # Taking c, which j2 holds alone.
        (update("j1", shared(a), shared(b), sole(c)), ("update REFUSED",)),
        (partial(m.expire, "j2"), ("expire into lock-delay",)),
        (acquire("j5", "host-c", shared(c)), ("acquire REFUSED", "conflict LOCK_DELAY")),
        (update("j1", shared(a), sole(c)), ("update REFUSED", "conflict LOCK_DELAY")),
        (partial(m.end_delay, "j2"), ("lock-delay ended",)),
        (acquire("j5", "host-c", shared(c)), ("acquire GRANTED",)),
        (partial(m.do_force_release, "j1"), ("force-release into lock-delay",)),
        (acquire("j6", "host-c", sole(b)), ("acquire REFUSED", "conflict LOCK_DELAY")),
        (partial(m.end_delay, "j1"), ("lock-delay ended",)),
        (acquire("j6", "host-c", sole(b)), ("acquire GRANTED",)),
        (partial(m.do_release, "j5", "host-c"), ()),
        (partial(m.do_release, "j6", "host-c"), ()),
        # One group arbitrates itself: j7 joins j0 on a, which keeps out any other job.
        (acquire("j0", "host-a", sole(a), group="qemu-1"), ("acquire GRANTED",)),
        (acquire("j1", "host-b", sole(a), group="qemu-2"), ("acquire REFUSED",)),
        (acquire("j7", "host-a", sole(a), group="qemu-1"), ("acquire GRANTED beside its group",)),
        (update("j7", sole(a), shared(b)), ("update UPDATED",)),
        # Lost, j0 leaves its group: its lock-delay keeps out its own group too.
        (partial(m.expire, "j0"), ("expire into lock-delay",)),
        (acquire("j3", "host-a", sole(a), group="qemu-1"), ("lock-delay blocks its own group",)),
        (partial(m.end_delay, "j0"), ("lock-delay ended",)),
        (acquire("j3", "host-a", sole(a), group="qemu-1"), ("acquire GRANTED beside its group",)),
        (partial(m.do_release, "j3", "host-a"), ()),
        (partial(m.do_release, "j7", "host-a"), ()),
        # host-a waits for host-b; host-b waits for host-c only, until host-a's conversion puts
        # it in host-b's way too: the re-check finds the cycle.
        (acquire("j0", "host-b", sole(a)), ("acquire GRANTED",)),
        (acquire("j1", "host-a", sole(c)), ("acquire GRANTED",)),
        (acquire("j2", "host-a", sole(a), wait=True), ("acquire QUEUED (new waiter)",)),
        (acquire("j3", "host-c", shared(d)), ("acquire GRANTED",)),
        (acquire("j4", "host-b", sole(d), wait=True), ("acquire QUEUED (new waiter)",)),
        (update("j1", sole(c), shared(d)), ("update UPDATED",)),
        (acquire("j4", "host-b", sole(d), wait=True), ("acquire DEADLOCK on a re-check",)),
        (unwait("j2"), ("unwait left",)),
        (partial(m.do_release, "j0", "host-b"), ()),
        (partial(m.do_release, "j1", "host-a"), ()),
        (partial(m.do_release, "j3", "host-c"), ()),
    ]


def test_every_branch_on_purpose(redis_url: str) -> None:
    """branch_walk reaches each branch of MUST_REACH by construction: every step must reach the
    branches it names, and the model's answer and the whole stored state are compared after it,
    as in the random runs."""

    class Bound(LuaModelMachine):
        url = redis_url

    machine = Bound()
    walked: Counter[str] = Counter()
    try:
        machine.check_whole_state()
        for number, (action, branches) in enumerate(branch_walk(machine), 1):
            before = REACHED.copy()
            action()
            machine.check_whole_state()
            gained = REACHED - before
            assert set(branches) <= set(gained), (number, branches, dict(gained))
            walked.update(gained)
        assert (machine.state.jobs, machine.state.waiters, machine.state.delays) == ({}, (), {})
    finally:
        machine.teardown()
    print("branches walked:", dict(sorted(walked.items())))
    missing = [branch for branch in MUST_REACH if not walked[branch]]
    assert not missing, f"{missing} not reached on purpose"


async def test_acquire_recovers_from_script_flush(store: Store, redis: Redis) -> None:
    """After SCRIPT FLUSH the scripts are loaded again and an acquire still works."""
    node = [NodeAccess("/vol/a.qcow2", READS, ALL_MASK)]
    first = await store_calls.acquire(store, NS, "j0", "host-a", "backup", node, TTL_MS)
    assert first.outcome is Outcome.GRANTED
    await redis.script_flush()
    sha = store.scripts.acquire.sha
    assert await redis.script_exists(sha) == [False]
    second = await store_calls.acquire(store, NS, "j1", "host-b", "backup", node, TTL_MS)
    assert second.outcome is Outcome.GRANTED
    assert second.job is not None
    assert first.job is not None
    assert second.job.fencing_token == first.job.fencing_token + 1
    assert await redis.script_exists(sha) == [True]


async def test_retried_acquire_takes_no_token(store: Store) -> None:
    """A retried acquire answers EXISTING with the same token; the next new job gets token + 1."""
    nodes = [
        NodeAccess("/vol/a.qcow2", READS, ALL_MASK),
        NodeAccess("/vol/b.qcow2", READS, READS),
    ]
    granted = await store_calls.acquire(store, NS, "j0", "host-a", "mirror", nodes, TTL_MS)
    assert granted.outcome is Outcome.GRANTED
    assert granted.job is not None
    for attempt in (nodes, nodes[::-1]):
        retried = await store_calls.acquire(store, NS, "j0", "host-a", "mirror", attempt, TTL_MS)
        assert retried.outcome is Outcome.EXISTING
        assert retried.revision == granted.revision
        assert retried.job == granted.job
    following = await store_calls.acquire(
        store, NS, "j1", "host-b", "commit", [NodeAccess("/vol/c.qcow2", 0, 0)], TTL_MS
    )
    assert following.outcome is Outcome.GRANTED
    assert following.job is not None
    assert following.job.fencing_token == granted.job.fencing_token + 1
    assert following.revision == granted.revision + 1


async def test_contention_of_a_recheck_names_the_right_node(store: Store) -> None:
    """A queued job checked again with its nodes listed in another order: the CONTENDED event
    for a holder that is new in its way names the node that holder is on. (The store used to
    index the conflicts by the call's order but send the queued record's.)"""
    write, read = WRITE, Action.READ_VISIBLE_DATA.bit
    a, b, c = "/a", "/b", "/c"
    await store_calls.acquire(store, NS, "h0", "o1", "op", [NodeAccess(a, write, 0)], TTL_MS)
    await store_calls.acquire(store, NS, "h1", "o1", "op", [NodeAccess(c, 0, ALL_MASK)], TTL_MS)
    queued = await store_calls.acquire(
        store,
        NS,
        "j2",
        "o2",
        "op",
        [NodeAccess(a, read, ALL_MASK), NodeAccess(b, read, ALL_MASK)],
        TTL_MS,
        wait_ms=WAIT_MS,
    )
    assert queued.outcome is Outcome.QUEUED
    # A conversion goes ahead of the queue: h1 now keeps j2 out of b too.
    updated = await store_calls.update(store, NS, "h1", "o1", [NodeAccess(b, write, 0)])
    assert updated.outcome is Outcome.UPDATED
    again = await store_calls.acquire(
        store,
        NS,
        "j2",
        "o2",
        "op",
        [NodeAccess(b, read, ALL_MASK), NodeAccess(a, read, ALL_MASK)],
        TTL_MS,
        wait_ms=WAIT_MS,
    )
    assert again.outcome is Outcome.QUEUED
    assert {(c.node, c.holder_job_id) for c in again.conflicts} == {(a, "h0"), (b, "h1")}
    # h1's first notice to o2 is never held back by the once-a-second limit (h0's may be).
    events = await store.log.events(NS, Position(0), 100)
    from_h1 = [e for e in events if e.type == "CONTENDED" and e.job.job_id == "h1"]
    assert len(from_h1) == 1
    assert from_h1[0].contention is not None
    assert [c.node for c in from_h1[0].contention.conflicts] == [b]
