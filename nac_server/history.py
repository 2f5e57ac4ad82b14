"""Where an event stands in a namespace's order, and how the two streams merge into it.

A namespace keeps two Redis streams. The history holds the changes of state, one per revision,
with ids "<revision>-0". The notices stream holds advisory events (CONTENDED), which take no
revision: the k-th notice sent after revision R has id "<R>-<k>". Ordering both by id gives the
one order in which they happened, and capping them apart means notices never push a change of
state out of the history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

# The largest sequence number a stream id can have: "R-LAST" comes after every notice of R.
LAST = 2**64 - 1


@dataclass(frozen=True, order=True)
class Position:
    """A place in the merged order: a revision, and 0 for its change of state or k for the k-th
    notice after it."""

    revision: int
    notice: int = 0

    @classmethod
    def parse(cls, stream_id: str) -> Position:
        revision, _, notice = stream_id.partition("-")
        return cls(int(revision), int(notice or 0))

    @classmethod
    def before(cls, revision: int) -> Position:
        """Just before revision's change of state: after every notice of the revision before."""
        return cls(revision - 1, LAST)

    @property
    def stream_id(self) -> str:
        return f"{self.revision}-{self.notice}"

    @property
    def is_notice(self) -> bool:
        return self.notice > 0


class Positioned(Protocol):
    @property
    def position(self) -> Position: ...


T = TypeVar("T", bound=Positioned)


def merge(
    changes: Sequence[T], notices: Sequence[T], limit: int
) -> tuple[list[T], Position | None]:
    """One ordered batch from reads of both streams that each returned at most limit entries.

    A read cut short at limit may have left out entries before the other stream's last, so the
    batch ends at the earliest such cut. Returns the batch and the position it reaches (None when
    both reads were empty).
    """
    merged = sorted([*changes, *notices], key=lambda item: item.position)
    cuts = [entries[-1].position for entries in (changes, notices) if len(entries) >= limit]
    if cuts:
        end = min(cuts)
        merged = [item for item in merged if item.position <= end]
    return merged, (merged[-1].position if merged else None)


def follows(last: Position, item: Position) -> bool | None:
    """Whether item comes straight after last: True if it does, False if it is old (already
    past), None if something in between is missing. Notices may be missed (they are advisory and
    capped on their own), changes of state never."""
    if item <= last:
        return False
    if item.is_notice:
        return True if item.revision == last.revision else None
    return True if item.revision == last.revision + 1 else None
