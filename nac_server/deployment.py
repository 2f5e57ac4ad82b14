"""The deployment's epoch: how replicas notice that Redis has lost its data.

Every replica runs the epoch script on each sweep. The deployment id in Redis goes when Redis
loses its data (restarted without its files, or a failover to a replica that had not seen the
writes); the first replica that knew the old id declares the loss and starts a grace period for
every namespace, in which only reclaims of jobs held before are granted (see the proto's
AcquireRequest.reclaim). Holders from before the loss may still be writing, and the store no
longer knows them; like an NFSv4 server after a reboot, NAC lets them come back first.
"""

from __future__ import annotations

import logging
import uuid

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from nac_server.scripts import script_source

log = logging.getLogger("nac.deployment")

# One hash tag, so that the script's two keys share a Cluster slot.
ID_KEY = "nac:{deployment}:id"
GRACE_KEY = "nac:{deployment}:grace"
RUN_KEY = "nac:{deployment}:run"
FLOOR_KEY = "nac:{deployment}:floor"


class Deployment:
    def __init__(self, redis: Redis, grace_ms: int) -> None:
        self._redis = redis
        self._script: AsyncScript = redis.register_script(script_source("epoch"))
        # Where revisions and tokens must go above (µs of the store's clock), since a Redis
        # process that may lack the last writes took over; 0 when none did.
        self.floor_us = 0
        self.grace_ms = grace_ms
        self.id = ""
        # The end of the grace period on the store's clock, 0 when there has been none.
        self.grace_end_ms = 0

    async def check(self) -> bool:
        """Looks at the epoch; True when this look found the store's data lost."""
        run_id = str((await self._redis.info("server"))["run_id"])
        current, grace_end, floor = await self._script(
            keys=[ID_KEY, GRACE_KEY, RUN_KEY, FLOOR_KEY],
            args=[self.id, uuid.uuid4().hex, self.grace_ms, run_id],
        )
        if int(floor) > self.floor_us:
            log.warning(
                "another Redis process serves (run %s): counters go above %d", run_id, floor
            )
        self.floor_us = int(floor)
        lost = bool(self.id) and current != self.id
        if lost:
            log.warning(
                "the store lost its data (deployment %s is now %s): only reclaims are granted "
                "until %d ms",
                self.id,
                current,
                int(grace_end),
            )
        self.id = str(current)
        self.grace_end_ms = int(grace_end)
        return lost
