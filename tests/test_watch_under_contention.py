"""A slow watcher under heavy contention resumes without losing a change of state.

Twelve clients contend for eight nodes through two replicas, and every refusal sends contention
notices. A watcher that reads one event every few milliseconds falls behind, is ended with
RESOURCE_EXHAUSTED, resumes from the revision after its last event, and must still receive every
change of state exactly once: the notices, many more than the history holds, never push a change
out of it. The load makes fewer changes than the history keeps, so any OUT_OF_RANGE is a bug.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_proto.nac.v1 import nac_pb2_grpc
from nac_server.embedded import RedisProcess
from tests.servers import ServerProcess

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    Stub = nac_pb2_grpc.NodeAccessControlAsyncStub
else:
    Stub = nac_pb2_grpc.NodeAccessControlStub

W, R = pb.MODIFY_VISIBLE_DATA, pb.READ_VISIBLE_DATA
NODES = [f"/vol/disk{i}.qcow2" for i in range(8)]
CLIENTS = 12
GRANTS_PER_CLIENT = 35
# More than the load's changes of state (two per grant), far fewer than its notices.
HISTORY = 1_000
WATCH_QUEUE = 16
READ_PAUSE_S = 0.004
LOCAL_POOL = [("grpc.use_local_subchannel_pool", 1)]
# The watcher's link: a fixed 16 KiB stream window, so how much the transport buffers for a
# reader that has stopped does not depend on what the window grew to.
SLOW_LINK = [*LOCAL_POOL, ("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 16_384)]


@pytest.fixture(scope="module")
def replicas(
    e2e_redis: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    logs: Path = tmp_path_factory.mktemp("contention")
    flags = (
        *("--history", str(HISTORY), "--watch-queue", str(WATCH_QUEUE), "--lock-delay", "0"),
        # Keep every notice, so the test can count them all.
        *("--notice-history", "1000000"),
    )
    first = ServerProcess(e2e_redis.url, *flags, log_path=logs / "first.log").start()
    second = ServerProcess(e2e_redis.url, *flags, log_path=logs / "second.log").start()
    try:
        yield first, second
    finally:
        first.stop()
        second.stop()


@pytest.fixture
async def stubs(
    replicas: tuple[ServerProcess, ServerProcess],
) -> AsyncIterator[tuple[Stub, Stub]]:
    async with (
        grpc.aio.insecure_channel(replicas[0].target, options=LOCAL_POOL) as first,
        grpc.aio.insecure_channel(replicas[1].target, options=LOCAL_POOL) as second,
    ):
        yield Stub(first), Stub(second)


async def contend(stub: Stub, namespace: str, client: int) -> Counter[str]:
    """Take three nodes at a time, exclusively, until granted GRANTS_PER_CLIENT times; each refusal
    retries with a fresh job id, as an impatient agent would."""
    rng = random.Random(client)
    done: Counter[str] = Counter()
    attempt = 0
    while done["granted"] < GRANTS_PER_CLIENT:
        attempt += 1
        job_id = f"c{client}-{attempt}"
        nodes = [pb.NodeAccess(node=n, require=[W, R], allow=[]) for n in rng.sample(NODES, 3)]
        reply = await stub.Acquire(
            pb.AcquireRequest(
                namespace=namespace,
                job_id=job_id,
                owner=f"host-{client}",
                operation="block-commit",
                nodes=nodes,
            )
        )
        if not reply.granted:
            done["refused"] += 1
            await asyncio.sleep(0)
            continue
        done["granted"] += 1
        await asyncio.sleep(0.003)
        await stub.Release(
            pb.ReleaseRequest(namespace=namespace, job_id=job_id, owner=f"host-{client}")
        )
    return done


def warm_up(namespace: str) -> pb.AcquireRequest:
    node = pb.NodeAccess(node="/vol/warm-up.qcow2", require=[R], allow=[R])
    return pb.AcquireRequest(
        namespace=namespace, job_id="warm-up", owner="a", operation="info", nodes=[node]
    )


class SlowWatcher:
    """Reads one event every READ_PAUSE_S and resumes, as the client library does, from the
    revision after the last event it received."""

    def __init__(self, stub: Stub, namespace: str) -> None:
        self.stub = stub
        self.namespace = namespace
        self.changes: list[tuple[int, int]] = []  # (revision, type) of each change received
        self.notices = 0
        self.resumes: Counter[str] = Counter()
        self.next_revision = 1
        self.first_event = asyncio.Event()
        self.stalled = asyncio.Event()

    async def run(self, until_revision: asyncio.Future[int]) -> None:
        while not (until_revision.done() and self.next_revision > until_revision.result()):
            call = self.stub.Watch(
                pb.WatchRequest(namespace=self.namespace, start_revision=self.next_revision)
            )
            try:
                async for event in call:
                    if not self.stalled.is_set():
                        # Stop reading after the first event until the load has run for a while:
                        # falling behind then does not depend on how fast this machine is.
                        self.first_event.set()
                        await self.stalled.wait()
                    await asyncio.sleep(READ_PAUSE_S)
                    if event.type == pb.WatchEvent.CONTENDED:
                        assert event.notice > 0
                        self.notices += 1
                    else:
                        assert event.notice == 0
                        self.changes.append((event.revision, event.type))
                    self.next_revision = event.revision + 1
                    if until_revision.done() and self.next_revision > until_revision.result():
                        return
            except grpc.aio.AioRpcError as error:
                code = error.code()
                assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (code, error.details())
                self.resumes[code.name] += 1
            finally:
                call.cancel()


async def test_a_slow_watcher_gets_every_change_exactly_once_under_contention(
    replicas: tuple[ServerProcess, ServerProcess], stubs: tuple[Stub, Stub], namespace: str
) -> None:
    first, second = stubs
    slow_link = grpc.aio.insecure_channel(replicas[0].target, options=SLOW_LINK)
    watcher = SlowWatcher(Stub(slow_link), namespace)
    final_revision: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    watching = asyncio.create_task(watcher.run(final_revision))
    try:
        async with asyncio.timeout(240):
            # The watcher must be following live when the load starts: a watcher still reading
            # history is never ended for lagging (it gets OUT_OF_RANGE once its place is gone).
            # It is, one store read after it has received a change that came before the load.
            await first.Acquire(warm_up(namespace))
            await watcher.first_event.wait()
            await asyncio.sleep(1.0)
            await first.Release(pb.ReleaseRequest(namespace=namespace, job_id="warm-up", owner="a"))
            load = [
                asyncio.create_task(contend((first, second)[i % 2], namespace, i))
                for i in range(CLIENTS)
            ]
            # Half the load happens before the watcher reads a second event.
            pending = set(load)
            while len(pending) > CLIENTS // 2:
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            watcher.stalled.set()
            outcomes = sum((await asyncio.gather(*load)), Counter[str]())
            listed = await first.ListJobs(pb.ListJobsRequest(namespace=namespace))
            final_revision.set_result(listed.revision)
            await watching
    finally:
        watching.cancel()
        await slow_link.close()

    grants = CLIENTS * GRANTS_PER_CLIENT
    assert outcomes["granted"] == grants
    base = watcher.changes[0][0] - 1
    assert listed.revision - base == 2 * grants + 2 < HISTORY
    # Every change exactly once, in order: the revisions with no gap and no repeat.
    assert [revision for revision, _ in watcher.changes] == list(
        range(base + 1, listed.revision + 1)
    )
    kinds = Counter(kind for _, kind in watcher.changes)
    assert kinds == {pb.WatchEvent.ACQUIRED: grants + 1, pb.WatchEvent.RELEASED: grants + 1}
    # It did fall behind and resume, and the notices it was sent outnumber what the history keeps.
    assert watcher.resumes["RESOURCE_EXHAUSTED"] >= 1, watcher.resumes
    notices_sent = await count_notices(first, namespace, listed.revision)
    assert notices_sent > HISTORY, (notices_sent, outcomes)
    print(
        f"changes {listed.revision} refusals {outcomes['refused']} notices sent {notices_sent} "
        f"received {watcher.notices} resumes {dict(watcher.resumes)}"
    )


async def count_notices(stub: Stub, namespace: str, upto: int) -> int:
    """The notices sent up to revision upto (the replicas keep them all here)."""
    seen = 0
    async with asyncio.timeout(60):
        async for event in stub.Watch(pb.WatchRequest(namespace=namespace, start_revision=1)):
            seen += event.type == pb.WatchEvent.CONTENDED
            if event.revision >= upto:
                return seen
    return seen
