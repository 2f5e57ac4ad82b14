"""nac-qmp-guard: a QMP proxy in front of one QEMU process that asks NAC before every block
operation, keeps each operation's lease alive, and fences the operation when a lease is lost."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence

from nac_client import AsyncClient
from nac_guard.proxy import GuardConfig, QmpGuard

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m)?$")


def duration_s(text: str) -> float:
    """15, 15s, 500ms or 1m as seconds."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 15s or 500ms")
    value = float(match.group(1))
    seconds = (
        value / 1000 if match.group(2) == "ms" else value * 60 if match.group(2) == "m" else value
    )
    if not 0.5 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is outside 500ms..1h")
    return seconds


def node_map(text: str) -> dict[str, str]:
    """auto, or a JSON file mapping node-names or local filenames to shared image paths."""
    if text == "auto":
        return {}
    try:
        with open(text, encoding="utf-8") as handle:
            loaded = json.load(handle)
    except (OSError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"--node-map {text}: {err}") from None
    if not isinstance(loaded, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v for k, v in loaded.items()
    ):
        raise argparse.ArgumentTypeError(
            f"--node-map {text}: must be a JSON object of non-empty strings"
        )
    return loaded


def parser() -> argparse.ArgumentParser:
    parsed = argparse.ArgumentParser(
        prog="nac-qmp-guard",
        description="Proxy one QEMU QMP socket and ask NAC before every block operation.",
    )
    parsed.add_argument("--qmp-socket", required=True, help="QEMU's QMP socket (unix path)")
    parsed.add_argument("--listen", required=True, help="unix socket path for QMP clients")
    parsed.add_argument("--nac", required=True, help="NAC server, HOST:PORT")
    parsed.add_argument("--namespace", required=True, help="NAC namespace of the shared storage")
    parsed.add_argument("--owner", required=True, help="this host's id, the jobs' owner")
    parsed.add_argument("--ttl", type=duration_s, default=15.0, help="lease length (15s)")
    parsed.add_argument(
        "--node-map",
        type=node_map,
        default={},
        help="auto (QEMU's filenames) or a JSON file of node-name/filename -> shared path",
    )
    parsed.add_argument("--group", default="", help="NAC group (default: from QEMU's UUID)")
    parsed.add_argument("--log-level", default="INFO")
    return parsed


async def run(options: argparse.Namespace) -> int:
    config = GuardConfig(
        qmp_socket=options.qmp_socket,
        listen=options.listen,
        namespace=options.namespace,
        owner=options.owner,
        ttl_s=options.ttl,
        node_map=options.node_map,
        group=options.group,
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(options.listen)
    async with AsyncClient(options.nac, namespace=options.namespace, owner=options.owner) as nac:
        guard = QmpGuard(config, nac)
        await guard.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        closed = asyncio.ensure_future(guard.wait_closed())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            stopping.cancel()
            await guard.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(options.listen)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    options = parser().parse_args(argv)
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s nac-qmp-guard %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(run(options))
    except (OSError, ConnectionError) as err:
        logging.getLogger("nac_guard").error("%s", err)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
