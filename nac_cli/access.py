"""Reading actions and node access from the command line, and naming actions back in short."""

from __future__ import annotations

from collections.abc import Iterable

from nac_client import Action, NodeAccess

ALIASES: dict[str, Action] = {
    "write": Action.MODIFY_VISIBLE_DATA,
    "meta": Action.MODIFY_METADATA,
    "graph": Action.GRAPH_RECONFIG,
    "read": Action.READ_VISIBLE_DATA,
    "readmeta": Action.READ_METADATA,
    "resize": Action.RESIZE,
}
SHORT_NAMES: dict[Action, str] = {action: alias for alias, action in ALIASES.items()}

# Words for whole masks: "allow=all" lets others do anything, "none" (or nothing) is empty.
_EVERY_ACTION = "all"
_NO_ACTION = "none"

ACTIONS_HELP = (
    "Actions, case-insensitive, full or short: MODIFY_VISIBLE_DATA (write), MODIFY_METADATA "
    "(meta), GRAPH_RECONFIG (graph), READ_VISIBLE_DATA (read), READ_METADATA (readmeta), RESIZE "
    "(resize); 'all' and 'none' name every action and no action."
)


class SpecError(ValueError):
    """A command-line action list or access spec that does not parse; says what is wrong."""


def parse_action(word: str) -> Action:
    """Reads one action: a full name or a short alias, any case, '-' for '_'.

    Raises:
        SpecError: The word names no action.
    """
    key = word.strip().lower().replace("-", "_")
    if key in ALIASES:
        return ALIASES[key]
    try:
        return Action[key.upper()]
    except KeyError:
        known = ", ".join([*ALIASES, *(a.name for a in Action)])
        raise SpecError(f"unknown action {word.strip()!r}; known: {known}") from None


def parse_actions(lists: Iterable[str]) -> frozenset[Action]:
    """Reads comma-separated action lists, as given to repeated --require or --allow.

    Raises:
        SpecError: A word names no action.
    """
    actions: set[Action] = set()
    for listed in lists:
        for word in listed.split(","):
            key = word.strip().lower()
            if key in ("", _NO_ACTION):
                continue
            if key == _EVERY_ACTION:
                actions.update(Action)
            else:
                actions.add(parse_action(word))
    return frozenset(actions)


def parse_access(spec: str) -> NodeAccess:
    """Reads one compact access spec: NODE:require=A,B;allow=C.

    The node is everything before the last colon, so node names may contain colons; both
    parts after it are optional ("NODE:" requires and allows nothing).

    Raises:
        SpecError: The spec has no colon, an unknown part or an unknown action.
    """
    node, colon, masks = spec.rpartition(":")
    if not colon or not node:
        raise SpecError(f"access {spec!r} is not NODE:require=A,B;allow=C")
    found: dict[str, frozenset[Action]] = {}
    for part in filter(None, (p.strip() for p in masks.split(";"))):
        key, equals, value = part.partition("=")
        key = key.strip().lower()
        if not equals or key not in ("require", "allow"):
            raise SpecError(f"in access {spec!r}: {part!r} is not require=... or allow=...")
        if key in found:
            raise SpecError(f"in access {spec!r}: {key} given twice")
        found[key] = parse_actions([value])
    return NodeAccess(node, found.get("require", ()), found.get("allow", ()))


def node_accesses(
    nodes: Iterable[str], require: Iterable[str], allow: Iterable[str], specs: Iterable[str]
) -> tuple[NodeAccess, ...]:
    """The nodes a command asks for: each --node with the --require/--allow masks, then each
    --access spec with its own.

    Raises:
        SpecError: Nothing was asked for, a node is named twice, or a mask does not parse.
    """
    required, allowed = parse_actions(require), parse_actions(allow)
    accesses = [NodeAccess(node, required, allowed) for node in nodes]
    accesses += [parse_access(spec) for spec in specs]
    if not accesses:
        raise SpecError("name at least one node with --node or --access")
    seen: set[str] = set()
    for access in accesses:
        if access.node in seen:
            raise SpecError(f"node {access.node!r} is named twice")
        seen.add(access.node)
    return tuple(accesses)


def short_actions(actions: Iterable[Action]) -> str:
    """Actions by their short names, in Action order, e.g. "write,read"; "-" for none."""
    return ",".join(SHORT_NAMES[a] for a in sorted(actions)) or "-"
