"""nac-server: flags, with environment variables as defaults."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from nac_server.app import ServerConfig, serve
from nac_server.config import Limits
from nac_server.connect import Deployment, UnsupportedDeployment, deployment_of, sentinel_parts


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    defaults = Limits()
    parser = argparse.ArgumentParser(
        prog="nac-server",
        description="Node Access Control server. Without --redis-url it starts a private "
        "redis-server for single-host development. Every flag also reads the environment "
        "variable named in brackets.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )

    def option(flag: str, kind: Callable[[str], object], default: object, text: str) -> None:
        # NAC_<FLAG> overrides the default; argparse converts and checks it like the flag itself.
        env = "NAC_" + flag.removeprefix("--").replace("-", "_").upper()
        fallback = os.environ.get(env, None if default is None else str(default))
        parser.add_argument(flag, type=kind, default=fallback, help=f"{text} [{env}]")

    option("--listen", str, "127.0.0.1:50051", "HOST:PORT to serve on")
    option("--redis-url", str, None, "the shared Redis; without it an embedded one is started")
    option("--data-dir", Path, None, "embedded Redis data directory (default ~/.local/share/nac)")
    option("--default-ttl", float, defaults.default_ttl_ms / 1000, "lease seconds by default")
    option("--min-ttl", float, defaults.min_ttl_ms / 1000, "shortest lease, seconds")
    option("--max-ttl", float, defaults.max_ttl_ms / 1000, "longest lease, seconds")
    option("--max-nodes", int, defaults.max_nodes, "most nodes in one job")
    option("--history", int, defaults.history, "changes kept per namespace for Watch resume")
    option(
        "--history-bytes",
        int,
        defaults.history_bytes,
        "most bytes of records the history of a namespace keeps",
    )
    option(
        "--notice-history",
        int,
        defaults.notice_history,
        "contention notices kept per namespace, apart from the history",
    )
    option("--watch-queue", int, defaults.watch_queue, "events a watcher may lag before it ends")
    option(
        "--sweep-interval",
        float,
        defaults.sweep_interval_s,
        "longest pause between expiry sweeps, seconds",
    )
    option(
        "--lock-delay",
        float,
        defaults.lock_delay_ms / 1000,
        "seconds a lost or force-released holder keeps blocking its nodes, unless the namespace "
        "sets its own; 0 turns it off",
    )
    option("--max-wait", float, defaults.max_wait_ms / 1000, "longest Acquire wait, seconds")
    option(
        "--min-replicas-ack",
        int,
        defaults.min_replicas_ack,
        "answer each change only once this many Redis replicas have it (WAIT), else UNAVAILABLE",
    )
    option(
        "--replica-ack-timeout",
        float,
        defaults.replica_ack_timeout_ms / 1000,
        "seconds to wait for --min-replicas-ack",
    )
    option(
        "--loss-grace",
        float,
        None,
        "seconds after Redis loses its data in which only reclaims are granted "
        "(default: --max-ttl plus --lock-delay)",
    )
    option(
        "--admin-token",
        str,
        None,
        "bearer token for operator calls (ForceRelease, ConfigureNamespace); without it they are "
        "refused",
    )
    option("--grace", float, 5.0, "seconds calls in flight get at shutdown")
    option("--log-level", str, "INFO", "DEBUG, INFO, WARNING or ERROR")
    options = parser.parse_args(argv)
    problems = [
        name
        for name, ok in [
            ("--min-ttl", options.min_ttl > 0),
            ("--default-ttl", options.min_ttl <= options.default_ttl <= options.max_ttl),
            ("--max-nodes", options.max_nodes > 0),
            ("--history", options.history > 0),
            ("--history-bytes", options.history_bytes > 0),
            ("--notice-history", options.notice_history > 0),
            ("--watch-queue", options.watch_queue > 0),
            ("--sweep-interval", options.sweep_interval > 0),
            ("--lock-delay", 0 <= options.lock_delay <= 3600),
            ("--max-wait", options.max_wait >= 0),
            ("--loss-grace", options.loss_grace is None or 0 <= options.loss_grace <= 86400),
            ("--min-replicas-ack", 0 <= options.min_replicas_ack <= 100),
            ("--replica-ack-timeout", 0 < options.replica_ack_timeout <= 60),
        ]
        if not ok
    ]
    if problems:
        parser.error(f"out of range: {', '.join(problems)}")
    if options.redis_url:
        try:
            if deployment_of(options.redis_url) is Deployment.SENTINEL:
                sentinel_parts(options.redis_url)
        except UnsupportedDeployment as error:
            parser.error(f"--redis-url: {error}")
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
            history_bytes=options.history_bytes,
            notice_history=options.notice_history,
            watch_queue=options.watch_queue,
            sweep_interval_s=options.sweep_interval,
            lock_delay_ms=round(options.lock_delay * 1000),
            max_wait_ms=round(options.max_wait * 1000),
            loss_grace_ms=None if options.loss_grace is None else round(options.loss_grace * 1000),
            min_replicas_ack=options.min_replicas_ack,
            replica_ack_timeout_ms=round(options.replica_ack_timeout * 1000),
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
