"""Acquire+Release throughput of nac-server against a ceiling: the same gRPC service doing only one
trivial EVALSHA per call (bench/ceiling_server.py).

Starts its own redis-server, one nac-server and one ceiling server, then for each concurrency level
flushes Redis and runs a separate load-generator process (this script with --load, so that it does
not share the servers' GIL) which alternates short slices between the two servers, ABBA. In each
slice N asyncio workers loop Acquire (a fresh job id, a node of their own, so nothing conflicts)
then Release; one pair is both calls, timed together. The last line of output is
`ratio_at_<highest level> <NAC pairs/s / ceiling pairs/s>`.

    .venv/bin/python bench/acquire_release.py [--duration 5] [--levels 1,16,64] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis import Redis

from nac_proto.nac.v1 import nac_pb2 as pb
from nac_proto.nac.v1 import nac_pb2_grpc
from nac_server.embedded import RedisProcess, free_port
from nac_server.keys import NAMESPACES_KEY

BENCH_DIR = Path(__file__).resolve().parent
NAMESPACE = "bench"
RPC_TIMEOUT_S = 10.0
START_TIMEOUT_S = 30.0


# ---------------------------------------------------------------- load generator (--load mode)


@dataclass
class LoadResult:
    pairs: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    first_error: str
    slice_rates: list[float]

    @property
    def rate(self) -> float:
        return self.pairs / self.seconds


@dataclass
class Tally:
    """One target's measured pairs, summed over its slices."""

    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    slice_rates: list[float] = field(default_factory=list)

    def result(self) -> LoadResult:
        self.latencies.sort()
        return LoadResult(
            pairs=len(self.latencies),
            seconds=self.seconds,
            p50_ms=percentile(self.latencies, 0.50) * 1000,
            p99_ms=percentile(self.latencies, 0.99) * 1000,
            errors=len(self.errors),
            first_error=self.errors[0] if self.errors else "",
            slice_rates=self.slice_rates,
        )


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted sample."""
    if not ordered:
        return float("nan")
    rank = max(1, round(fraction * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


async def run_slice(
    stub: nac_pb2_grpc.NodeAccessControlAsyncStub,
    concurrency: int,
    lead_s: float,
    window_s: float,
    tag: str,
    tally: Tally,
) -> None:
    """N workers loop Acquire+Release; pairs completing within the window are counted."""
    # The lead-in is not counted, so that the window sees a full pipeline, not its ramp-up.
    window_start = time.perf_counter() + lead_s
    end = window_start + window_s

    async def worker(index: int) -> None:
        owner = f"w{index}"
        node = pb.NodeAccess(
            node=f"/vol/w{index}.qcow2",
            require=[pb.MODIFY_VISIBLE_DATA],
            allow=[pb.READ_VISIBLE_DATA],
        )
        sequence = 0
        while (started := time.perf_counter()) < end:
            sequence += 1
            job_id = f"{tag}-{owner}-{sequence}"
            try:
                acquired = await stub.Acquire(
                    pb.AcquireRequest(
                        namespace=NAMESPACE,
                        job_id=job_id,
                        owner=owner,
                        operation="bench",
                        nodes=[node],
                    ),
                    timeout=RPC_TIMEOUT_S,
                )
                released = await stub.Release(
                    pb.ReleaseRequest(namespace=NAMESPACE, job_id=job_id, owner=owner),
                    timeout=RPC_TIMEOUT_S,
                )
            except grpc.aio.AioRpcError as error:
                tally.errors.append(f"{error.code().name}: {error.details()}")
                continue
            finished = time.perf_counter()
            if not (acquired.granted and released.released):
                tally.errors.append(f"granted={acquired.granted} released={released.released}")
            # Counted by completion time, so pairs/s is exactly completions per window second.
            elif window_start <= finished <= end:
                tally.latencies.append(finished - started)

    counted_before = len(tally.latencies)
    await asyncio.gather(*(worker(index) for index in range(concurrency)))
    tally.seconds += window_s
    tally.slice_rates.append((len(tally.latencies) - counted_before) / window_s)


async def generate_load(
    targets: Sequence[tuple[str, str]],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    slice_s: float,
    lead_s: float,
) -> dict[str, LoadResult]:
    """Alternate short slices between the targets, ABBA, until each has had duration_s.

    Interleaving exposes every target to the same background noise (other processes on the
    machine come and go within seconds), which whole runs one after the other would not.
    """
    rounds = max(2, round(duration_s / slice_s))
    window_s = duration_s / rounds
    tallies = {name: Tally() for name, _ in targets}
    channels = [grpc.aio.insecure_channel(address) for _, address in targets]
    try:
        for channel in channels:
            await asyncio.wait_for(channel.channel_ready(), START_TIMEOUT_S)
        stubs = [
            (name, nac_pb2_grpc.NodeAccessControlStub(channel))
            for (name, _), channel in zip(targets, channels, strict=True)
        ]
        # Warm-up is thrown away: connections, script caches and allocators settle first.
        for name, stub in stubs:
            await run_slice(stub, concurrency, 0.0, warmup_s, f"{name}-warm", Tally())
        for number in range(rounds):
            for name, stub in stubs if number % 2 == 0 else stubs[::-1]:
                await run_slice(
                    stub, concurrency, lead_s, window_s, f"{name}-{number}", tallies[name]
                )
    finally:
        for channel in channels:
            await channel.close()
    return {name: tally.result() for name, tally in tallies.items()}


def load_main(options: argparse.Namespace) -> int:
    # Each --target is NAME=HOST:PORT; slices follow this order, then the reverse.
    targets = [(spec.partition("=")[0], spec.partition("=")[2]) for spec in options.target]
    results = asyncio.run(
        generate_load(
            targets,
            options.concurrency,
            options.warmup,
            options.duration,
            options.slice,
            options.lead,
        )
    )
    print(json.dumps({name: result.__dict__ for name, result in results.items()}), flush=True)
    return 0


# ---------------------------------------------------------------- driver


class Processes:
    """Every child this run starts, so that each one is stopped whatever happens."""

    def __init__(self) -> None:
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, command: Sequence[str], log: IO[bytes] | None) -> subprocess.Popen[bytes]:
        """With a log, both streams go there; without, stdout is piped back to us."""
        # A session of its own: Ctrl-C reaches only this script, which then stops the child in
        # order instead of it dying half-way.
        child = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if log is None else log,
            stderr=log,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.children.append(child)
        return child

    @staticmethod
    def stop(child: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()

    def stop_all(self) -> None:
        for child in reversed(self.children):
            self.stop(child)
        self.children.clear()


@dataclass
class Target:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


def nac_command(address: str, redis_url: str) -> list[str]:
    script = Path(sys.executable).parent / "nac-server"
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "nac_server"]
    return [
        *launcher,
        "--listen",
        address,
        "--redis-url",
        redis_url,
        "--log-level",
        "WARNING",
        "--grace",
        "1",
        # The bench empties Redis between levels on purpose: no grace period after that.
        "--loss-grace",
        "0",
    ]


def wait_serving(target: Target, probe: str) -> None:
    """Until nac-server's health says SERVING, or the ceiling answers one Acquire."""
    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(target.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        stub = nac_pb2_grpc.NodeAccessControlStub(channel)
        while time.monotonic() < deadline:
            if target.process.poll() is not None:
                raise RuntimeError(
                    f"{target.name} exited with {target.process.returncode}:\n{target.log_tail()}"
                )
            try:
                if probe == "health":
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                elif stub.Acquire(pb.AcquireRequest(), timeout=0.5).granted:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"{target.name} on {target.address} not serving:\n{target.log_tail()}")


def start_target(processes: Processes, name: str, redis_url: str, scratch: Path) -> Target:
    address = f"127.0.0.1:{free_port()}"
    if name == "nac":
        command = nac_command(address, redis_url)
    else:
        command = [
            sys.executable,
            str(BENCH_DIR / "ceiling_server.py"),
            "--listen",
            address,
            "--redis-url",
            redis_url,
        ]
    log_path = scratch / f"{name}.log"
    with log_path.open("wb") as log:
        process = processes.start(command, log)
    target = Target(name, address, process, log_path)
    wait_serving(target, "health" if name == "nac" else "acquire")
    return target


def reset_redis(client: Redis) -> None:
    client.flushall()
    # nac-server registers a namespace once per process; put the registration back so that its
    # expiry sweeper keeps visiting the bench namespace as it would in steady state.
    client.sadd(NAMESPACES_KEY, NAMESPACE)


def run_level(
    processes: Processes,
    targets: Sequence[Target],
    concurrency: int,
    options: argparse.Namespace,
) -> dict[str, LoadResult]:
    """One load process at one concurrency level against every target, in slices."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--load",
        *(f"--target={target.name}={target.address}" for target in targets),
        f"--concurrency={concurrency}",
        f"--warmup={options.warmup}",
        f"--duration={options.duration}",
        f"--slice={options.slice}",
        f"--lead={options.lead}",
    ]
    child = processes.start(command, None)
    rounds = max(2, round(options.duration / options.slice))
    budget = len(targets) * (options.warmup + options.duration + rounds * options.lead)
    try:
        output, _ = child.communicate(timeout=budget + 2 * RPC_TIMEOUT_S + 30)
    finally:
        processes.stop(child)
        processes.children.remove(child)
    if child.returncode != 0:
        raise RuntimeError(f"load generator exited with {child.returncode}")
    raw = json.loads(output.decode().strip().splitlines()[-1])
    results = {name: LoadResult(**fields) for name, fields in raw.items()}
    for target in targets:
        result = results[target.name]
        if result.errors:
            raise RuntimeError(
                f"{target.name} at {concurrency} in flight: {result.errors} failed pairs, "
                f"first: {result.first_error}\n{target.log_tail()}"
            )
        if target.process.poll() is not None:
            raise RuntimeError(f"{target.name} died:\n{target.log_tail()}")
    return results


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def redis_version(binary: str) -> str:
    text = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"v=(\S+)", text)
    return found.group(1) if found else text.strip()


def header(redis_binary: str, options: argparse.Namespace) -> list[str]:
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    versions = ", ".join(
        f"{package} {metadata.version(package)}" for package in ("grpcio", "redis", "hiredis")
    )
    rounds = max(2, round(options.duration / options.slice))
    return [
        f"# machine: {cpu_model()}, {cores} cores ({usable} usable), "
        f"Python {platform.python_version()}, redis-server {redis_version(redis_binary)}, "
        f"{versions}",
        f"# note: only {usable} cores: the load generator, the server under test and redis-server "
        "share them (and whatever else runs here); this affects both implementations equally",
        f"# per level: Redis flushed, then one load process (one channel per server, N asyncio "
        f"workers) warms each server {options.warmup:g} s, then measures {options.duration:g} s "
        f"each in {rounds} slices per server of {options.duration / rounds:g} s "
        f"(+{options.lead:g} s uncounted lead-in), alternating nac/ceiling ABBA",
    ]


def table(results: dict[tuple[str, int], LoadResult], levels: Sequence[int]) -> list[str]:
    lines = [
        f"{'implementation':<15}{'in-flight':>10}{'pairs/s':>11}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'NAC/ceiling':>13}"
    ]
    for level in levels:
        nac, ceiling = results[("nac", level)], results[("ceiling", level)]
        for name, result in (("nac", nac), ("ceiling", ceiling)):
            ratio = f"{nac.rate / ceiling.rate:.2f}" if name == "nac" else ""
            lines.append(
                f"{name:<15}{level:>10}{result.rate:>11.1f}{result.p50_ms:>9.2f}"
                f"{result.p99_ms:>9.2f}{ratio:>13}".rstrip()
            )
    return lines


def drive(options: argparse.Namespace) -> int:
    levels: list[int] = options.levels
    processes = Processes()
    redis_process = RedisProcess()
    results: dict[tuple[str, int], LoadResult] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="nac-bench-") as scratch_name:
            scratch = Path(scratch_name)
            redis_process.start()
            client = Redis.from_url(redis_process.url)
            try:
                targets = [
                    start_target(processes, name, redis_process.url, scratch)
                    for name in ("nac", "ceiling")
                ]
                for index, level in enumerate(levels):
                    reset_redis(client)
                    # Which server goes first alternates too, so neither always follows warm-up.
                    order = targets if index % 2 == 0 else targets[::-1]
                    for name, result in run_level(processes, order, level, options).items():
                        results[(name, level)] = result
                        # Per-slice rates on stderr show how steady the machine was.
                        slices = " ".join(f"{rate:.0f}" for rate in result.slice_rates)
                        print(
                            f"# {name:<8} {level:>3} in flight: {result.rate:.1f} pairs/s "
                            f"(slices: {slices})",
                            file=sys.stderr,
                            flush=True,
                        )
            finally:
                client.close()
                processes.stop_all()
        top = max(levels)
        ratio = results[("nac", top)].rate / results[("ceiling", top)].rate
        for line in [*header(redis_process.binary, options), *table(results, levels)]:
            print(line)
        print(f"ratio_at_{top} {ratio:.2f}", flush=True)
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        processes.stop_all()
        redis_process.stop()


def _terminated(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so the finally blocks stop every child.
    raise KeyboardInterrupt


def parse_levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels are positive integers, e.g. 1,16,64")
    return levels


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--duration", type=float, default=5.0, help="measured seconds per level and server")
    add(
        "--levels",
        type=parse_levels,
        default=[1, 16, 64],
        help="concurrency levels, comma-separated; the last line is at the highest",
    )
    add(
        "--quick",
        action="store_true",
        help="smoke run: 0.5 s per level and server, shorter warm-up, slices and lead-in",
    )
    add("--warmup", type=float, default=1.0, help="uncounted seconds per server and level first")
    add("--slice", type=float, default=1.0, help="measured seconds of one slice, about")
    add("--lead", type=float, default=0.2, help="uncounted seconds at the start of each slice")
    # Internal: the load-generator process.
    add("--load", action="store_true", help=argparse.SUPPRESS)
    add("--target", action="append", default=[], help=argparse.SUPPRESS)
    add("--concurrency", type=int, default=1, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.quick:
        options.duration, options.warmup, options.slice, options.lead = 0.5, 0.2, 0.25, 0.05
    if options.duration <= 0 or options.slice <= 0 or options.warmup < 0 or options.lead < 0:
        parser.error("--duration and --slice must be positive, --warmup and --lead not negative")
    if options.load and not options.target:
        parser.error("--load needs --target NAME=HOST:PORT")
    return options


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    if options.load:
        return load_main(options)
    signal.signal(signal.SIGTERM, _terminated)
    return drive(options)


if __name__ == "__main__":
    sys.exit(main())
