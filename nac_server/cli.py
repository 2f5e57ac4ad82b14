"""nac-server: flags, with environment variables as defaults."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from nac_server.app import ServerConfig, serve
from nac_server.config import Limits


def _env(name: str, default: str | None) -> str | None:
    return os.environ.get(name, default)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = Limits()
    parser = argparse.ArgumentParser(
        prog="nac-server",
        description="Node Access Control server. Without --redis-url it starts a private "
        "redis-server for single-host development.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--listen", default=_env("NAC_LISTEN", "127.0.0.1:50051"), help="HOST:PORT [NAC_LISTEN]")
    add("--redis-url", default=_env("NAC_REDIS_URL", None), help="shared Redis [NAC_REDIS_URL]")
    add(
        "--data-dir",
        type=Path,
        default=_env("NAC_DATA_DIR", None),
        help="embedded Redis data directory [NAC_DATA_DIR] (default ~/.local/share/nac)",
    )
    add(
        "--default-ttl",
        type=float,
        default=float(_env("NAC_DEFAULT_TTL", str(defaults.default_ttl_ms / 1000)) or 0),
        help="lease seconds when a request names none [NAC_DEFAULT_TTL]",
    )
    add(
        "--min-ttl",
        type=float,
        default=float(_env("NAC_MIN_TTL", str(defaults.min_ttl_ms / 1000)) or 0),
        help="shortest lease seconds [NAC_MIN_TTL]",
    )
    add(
        "--max-ttl",
        type=float,
        default=float(_env("NAC_MAX_TTL", str(defaults.max_ttl_ms / 1000)) or 0),
        help="longest lease seconds [NAC_MAX_TTL]",
    )
    add(
        "--max-nodes",
        type=int,
        default=int(_env("NAC_MAX_NODES", str(defaults.max_nodes)) or 0),
        help="most nodes in one job [NAC_MAX_NODES]",
    )
    add(
        "--history",
        type=int,
        default=int(_env("NAC_HISTORY", str(defaults.history)) or 0),
        help="events kept per namespace for Watch resume [NAC_HISTORY]",
    )
    add(
        "--watch-queue",
        type=int,
        default=int(_env("NAC_WATCH_QUEUE", str(defaults.watch_queue)) or 0),
        help="events a watcher may lag before it is ended [NAC_WATCH_QUEUE]",
    )
    add(
        "--sweep-interval",
        type=float,
        default=float(_env("NAC_SWEEP_INTERVAL", str(defaults.sweep_interval_s)) or 0),
        help="longest pause between expiry sweeps, seconds [NAC_SWEEP_INTERVAL]",
    )
    add(
        "--lock-delay",
        type=float,
        default=float(_env("NAC_LOCK_DELAY", str(defaults.lock_delay_ms / 1000)) or 0),
        help="seconds a lost or force-released holder keeps blocking its nodes, unless the "
        "namespace sets its own; 0 turns it off [NAC_LOCK_DELAY]",
    )
    add(
        "--max-wait",
        type=float,
        default=float(_env("NAC_MAX_WAIT", str(defaults.max_wait_ms / 1000)) or 0),
        help="longest Acquire wait, seconds [NAC_MAX_WAIT]",
    )
    add(
        "--admin-token",
        default=_env("NAC_ADMIN_TOKEN", None),
        help="bearer token for operator calls (ForceRelease, ConfigureNamespace); without it "
        "they are refused [NAC_ADMIN_TOKEN]",
    )
    add(
        "--grace",
        type=float,
        default=float(_env("NAC_GRACE", "5") or 0),
        help="seconds calls in flight get at shutdown [NAC_GRACE]",
    )
    add("--log-level", default=_env("NAC_LOG_LEVEL", "INFO"), help="[NAC_LOG_LEVEL]")
    options = parser.parse_args(argv)
    problems = [
        name
        for name, ok in [
            ("--min-ttl", options.min_ttl > 0),
            ("--default-ttl", options.min_ttl <= options.default_ttl <= options.max_ttl),
            ("--max-nodes", options.max_nodes > 0),
            ("--history", options.history > 0),
            ("--watch-queue", options.watch_queue > 0),
            ("--sweep-interval", options.sweep_interval > 0),
            ("--lock-delay", 0 <= options.lock_delay <= 3600),
            ("--max-wait", options.max_wait >= 0),
        ]
        if not ok
    ]
    if problems:
        parser.error(f"out of range: {', '.join(problems)}")
    return options


def config_from(options: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        listen=options.listen,
        redis_url=options.redis_url,
        data_dir=options.data_dir,
        grace_s=options.grace,
        admin_token=options.admin_token or None,
        limits=Limits(
            default_ttl_ms=round(options.default_ttl * 1000),
            min_ttl_ms=round(options.min_ttl * 1000),
            max_ttl_ms=round(options.max_ttl * 1000),
            max_nodes=options.max_nodes,
            history=options.history,
            watch_queue=options.watch_queue,
            sweep_interval_s=options.sweep_interval,
            lock_delay_ms=round(options.lock_delay * 1000),
            max_wait_ms=round(options.max_wait * 1000),
        ),
    )


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    logging.basicConfig(
        level=options.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config_from(options)))


if __name__ == "__main__":
    main()
