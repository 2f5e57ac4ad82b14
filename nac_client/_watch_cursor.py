"""Where a watch stands, so that a new stream resumes with no gap and no duplicate."""

from __future__ import annotations

from dataclasses import dataclass, field

from nac_client._types import Event, EventType


@dataclass
class WatchCursor:
    """The pure state of a resumable watch.

    Attributes:
        next_revision: The first revision the caller has not seen; 0 until known.
        snapshot_pending: True until a snapshot has completed, when the watch asked for one.
    """

    next_revision: int
    snapshot_pending: bool
    _snapshot: list[Event] = field(default_factory=list)
    # The (revision, notice) of the last event delivered; None before the first one.
    _last: tuple[int, int] | None = None

    @classmethod
    def start(cls, start_revision: int, *, snapshot: bool) -> WatchCursor:
        if start_revision < 0:
            raise ValueError(f"start_revision must not be negative, got {start_revision}")
        if snapshot and start_revision:
            raise ValueError("a watch takes either a snapshot or a start_revision, not both")
        return cls(next_revision=start_revision, snapshot_pending=snapshot)

    @property
    def needs_pin(self) -> bool:
        """True when the watch starts "from now" and that revision is not yet known."""
        return not self.snapshot_pending and self.next_revision == 0

    def pin(self, current_revision: int) -> None:
        """Fixes "from now" as the events after current_revision, so a resume has a start."""
        self.next_revision = current_revision + 1

    def resume_point(self) -> tuple[int, bool]:
        """The (start_revision, snapshot) to open the next stream with."""
        if self.snapshot_pending:
            return 0, True
        return self.next_revision, False

    def stream_opened(self) -> None:
        # A snapshot cut short is taken again whole: its jobs may have changed since.
        self._snapshot.clear()

    def accept(self, event: Event) -> list[Event]:
        """Takes one event off the stream and returns those to hand to the caller now.

        A snapshot is held back until SNAPSHOT_COMPLETE, so the caller never builds state from a
        partial one; events already delivered are dropped.
        """
        if self.snapshot_pending:
            if event.type is not EventType.SNAPSHOT_COMPLETE:
                self._snapshot.append(event)
                return []
            self.snapshot_pending = False
            self.next_revision = event.revision + 1
            self._last = (event.revision, 0)
            held, self._snapshot = self._snapshot, []
            delivered = [e for e in held if e.type is EventType.SNAPSHOT] + [event]
            # Only a misbehaving server sends live events before SNAPSHOT_COMPLETE; keep the new.
            early = sorted(
                (e for e in held if e.type is not EventType.SNAPSHOT), key=lambda e: e.revision
            )
            for live in early:
                delivered += self._accept_live(live)
            return delivered
        return self._accept_live(event)

    def _accept_live(self, event: Event) -> list[Event]:
        # Events are ordered by (revision, notice): notices (CONTENDED) take no revision of their
        # own and follow the change of state they carry the revision of.
        last = self._last or (self.next_revision - 1, _AFTER_EVERY_NOTICE)
        position = (event.revision, event.notice)
        if position <= last:
            return []
        self._last = position
        self.next_revision = event.revision + 1
        return [event]


_AFTER_EVERY_NOTICE = 2**64
