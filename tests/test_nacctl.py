"""nacctl through its installed console script, against real server processes and a real Redis.

Each test runs .venv/bin/nacctl as a user would, with NAC_SERVER and NAC_NAMESPACE in the
environment, and checks exit codes, table text and JSON. State is set up with the client
library, which is tested on its own elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nac_cli import main as nacctl_main
from nac_cli.exit_codes import EXIT_CODES_TEXT
from nac_client import Action, Client, Job, NodeAccess
from nac_server.embedded import RedisProcess
from tests.servers import ServerProcess

NACCTL = Path(sys.executable).parent / "nacctl"
ADMIN_TOKEN = "nacctl-test-token"

W = Action.MODIFY_VISIBLE_DATA
R = Action.READ_VISIBLE_DATA
NODE = "/vol/base.qcow2"


@dataclass(frozen=True)
class Nacctl:
    """Runs the console script against one server and namespace."""

    target: str
    namespace: str

    def env(self, admin_token: str | None) -> dict[str, str]:
        # Nothing from the caller's NAC_* environment leaks in; the venv's bin comes first so
        # commands run under `acquire` find nacctl too.
        base = {k: v for k, v in os.environ.items() if not k.startswith("NAC_")}
        path = f"{NACCTL.parent}{os.pathsep}{base.get('PATH', '')}"
        return {
            **base,
            "PATH": path,
            "NAC_SERVER": self.target,
            "NAC_NAMESPACE": self.namespace,
            **({"NAC_ADMIN_TOKEN": admin_token} if admin_token is not None else {}),
        }

    def __call__(
        self, *args: str, admin_token: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(NACCTL), *args],
            env=self.env(admin_token),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [str(NACCTL), *args],
            env=self.env(None),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def json(self, *args: str) -> Any:
        result = self("-o", "json", *args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture(scope="module", autouse=True)
def console_script_installed() -> None:
    assert NACCTL.exists(), f"{NACCTL} is missing: run `.venv/bin/pip install -e .`"


@pytest.fixture
def cli(servers: tuple[ServerProcess, ServerProcess], namespace: str) -> Nacctl:
    return Nacctl(servers[0].target, namespace)


@pytest.fixture(scope="module")
def admin_server(
    e2e_redis: RedisProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A replica with an admin token, for the operator commands."""
    log = tmp_path_factory.mktemp("admin") / "server.log"
    with ServerProcess(e2e_redis.url, "--admin-token", ADMIN_TOKEN, log_path=log) as server:
        yield server


@pytest.fixture
def admin_cli(admin_server: ServerProcess, namespace: str) -> Nacctl:
    return Nacctl(admin_server.target, namespace)


@pytest.fixture
def host_a(cli: Nacctl) -> Iterator[Client]:
    with Client(cli.target, namespace=cli.namespace, owner="host-a") as client:
        yield client


# Jobs that tests set up and do not renew: a test of several nacctl runs can take minutes on a
# loaded machine, and none of these is meant to expire on its own.
TTL = 600


def hold_base(client: Client, *, operation: str = "backup", ttl: float = TTL) -> Job:
    """A reader of NODE that lets others only read."""
    return client.acquire([NodeAccess(NODE, [R], [R])], operation=operation, ttl=ttl)


def acquire_running(cli: Nacctl, options: list[str], shell: str) -> subprocess.Popen[str]:
    """nacctl acquire of NODE for writing, running `sh -c shell` while it holds it."""
    return cli.popen(
        "acquire", *options, "--node", NODE, "--require", "write", "--", "sh", "-c", shell
    )


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def revision(client: Client) -> int:
    return client.get_node(NODE).revision


# --- Help and usage ----------------------------------------------------------------------------


def test_help_lists_commands_and_exit_codes_and_every_command_has_examples() -> None:
    top = subprocess.run(
        [str(NACCTL), "--help"], capture_output=True, text=True, check=False, timeout=30
    )
    assert top.returncode == 0
    assert "Exit codes:" in top.stdout
    assert "deadlock" in top.stdout
    for command in nacctl_main.cli.commands:
        assert command in top.stdout
        shown = subprocess.run(
            [str(NACCTL), command, "--help"], capture_output=True, text=True, check=False
        )
        assert shown.returncode == 0, shown.stderr
        assert "Examples:" in shown.stdout, command


def test_the_exit_code_table_is_the_same_in_the_docstring_and_the_help() -> None:
    assert nacctl_main.__doc__ is not None
    assert EXIT_CODES_TEXT in nacctl_main.__doc__


@pytest.mark.parametrize(
    "args",
    [
        ["explain"],
        ["explain", "--node", NODE, "--require", "scribble"],
        ["explain", "--access", "no-masks-here"],
        ["explain", "--access", f"{NODE}:require=write;deny=read"],
        ["explain", "--node", NODE, "--access", f"{NODE}:require=read"],
        ["acquire", "--node", NODE],
        ["watch", "--snapshot", "--from", "3"],
        ["--output", "yaml", "jobs"],
    ],
)
def test_usage_errors_exit_2(cli: Nacctl, args: list[str]) -> None:
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""


def test_an_unreachable_server_exits_5() -> None:
    # A port bound here and never listened on refuses connections: nobody else can serve on
    # it while the test runs, as could happen with a port that was merely free a moment ago.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        result = Nacctl(f"127.0.0.1:{port}", "ns")("--timeout", "1", "jobs", timeout=60)
    assert result.returncode == 5, result.stderr


# --- Reading -----------------------------------------------------------------------------------


def test_jobs_shows_holders_in_a_table_and_as_json(cli: Nacctl, host_a: Client) -> None:
    assert cli("jobs").stdout.strip() == "no jobs"
    job = hold_base(host_a)

    table = cli("jobs")
    assert table.returncode == 0, table.stderr
    row = next(line for line in table.stdout.splitlines() if job.job_id in line)
    assert "host-a" in row
    assert "backup" in row
    assert f"{NODE} require=read allow=read" in row
    assert "Waiting" not in table.stdout

    listed = cli.json("jobs")
    assert listed["waiters"] == []
    [shown] = listed["jobs"]
    assert (shown["job_id"], shown["owner"], shown["state"]) == (job.job_id, "host-a", "HELD")
    assert shown["nodes"] == [
        {"node": NODE, "require": ["READ_VISIBLE_DATA"], "allow": ["READ_VISIBLE_DATA"]}
    ]
    assert shown["fencing_token"] == job.fencing_token
    assert cli.json("jobs", "--node", "/vol/other.qcow2")["jobs"] == []
    assert cli.json("jobs", "--owner", "host-b")["jobs"] == []
    assert len(cli.json("jobs", "--owner", "host-a")["jobs"]) == 1


def test_job_shows_one_job_and_an_unknown_one_exits_4(cli: Nacctl, host_a: Client) -> None:
    job = hold_base(host_a)

    table = cli("job", job.job_id)
    assert table.returncode == 0, table.stderr
    assert "fencing token" in table.stdout
    assert str(job.fencing_token) in table.stdout
    assert cli.json("job", job.job_id)["job_id"] == job.job_id

    missing = cli("job", "no-such-job")
    assert missing.returncode == 4
    assert "no-such-job" in missing.stderr


def test_node_shows_holders_and_per_action_counts(cli: Nacctl, host_a: Client) -> None:
    job = hold_base(host_a)

    table = cli("node", NODE)
    assert table.returncode == 0, table.stderr
    assert f"node {NODE} in namespace {cli.namespace}" in table.stdout
    assert job.job_id in table.stdout
    tally = next(line for line in table.stdout.splitlines() if "MODIFY_VISIBLE_DATA" in line)
    assert re.findall(r"\d+", tally) == ["0", "1"]  # required by none, not allowed by one

    state = cli.json("node", NODE)
    assert [h["job_id"] for h in state["holders"]] == [job.job_id]
    counts = {t["action"]: (t["required_by"], t["not_allowed_by"]) for t in state["tallies"]}
    assert counts["READ_VISIBLE_DATA"] == (1, 0)
    assert counts["MODIFY_VISIBLE_DATA"] == (0, 1)
    assert (state["waiters"], state["lock_delay"]) == ([], None)

    assert "no holders" in cli("node", "/vol/free.qcow2").stdout


def test_explain_says_would_be_granted_or_why_not_one_line_per_conflict(
    cli: Nacctl, host_a: Client
) -> None:
    granted = cli("explain", "--node", NODE, "--require", "write", "--allow", "read")
    assert (granted.returncode, granted.stdout) == (0, "would be granted\n")

    job = hold_base(host_a)
    refused = cli("explain", "--node", NODE, "--require", "WRITE", "--allow", "Read")
    assert refused.returncode == 3, refused.stderr
    assert refused.stdout.splitlines() == [
        f"refused on {NODE}: job {job.job_id} (backup by host-a) does not allow MODIFY_VISIBLE_DATA"
    ]

    # Compact specs give each node masks of its own; full names work as well as short ones.
    both = cli(
        "explain",
        "--access",
        f"{NODE}:require=MODIFY_VISIBLE_DATA;allow=none",
        "--access",
        "/vol/free.qcow2:require=resize",
    )
    assert both.returncode == 3
    assert sorted(both.stdout.splitlines()) == sorted(
        [
            f"refused on {NODE}: job {job.job_id} (backup by host-a) does not allow "
            "MODIFY_VISIBLE_DATA",
            f"refused on {NODE}: job {job.job_id} (backup by host-a) requires "
            "READ_VISIBLE_DATA, which this job does not allow",
        ]
    )

    answer = cli("-o", "json", "explain", "--node", NODE, "--require", "write,read")
    assert answer.returncode == 3
    parsed = json.loads(answer.stdout)
    assert parsed["granted"] is False
    assert {(c["action"], c["kind"], c["holder_job_id"]) for c in parsed["conflicts"]} == {
        ("MODIFY_VISIBLE_DATA", "HOLDER_DOES_NOT_ALLOW", job.job_id),
        ("READ_VISIBLE_DATA", "HOLDER_REQUIRES", job.job_id),
    }
    assert all(c["explanation"].startswith("refused on") for c in parsed["conflicts"])
    assert cli.json("explain", "--node", "/vol/free.qcow2", "--require", "write") == {
        "granted": True,
        "conflicts": [],
    }


# --- Watch -------------------------------------------------------------------------------------


def test_watch_prints_one_line_per_event_and_json_lines(cli: Nacctl, host_a: Client) -> None:
    job = hold_base(host_a)
    start = revision(host_a)
    host_a.release(job.job_id)

    lines = cli("watch", "--from", str(start), "--count", "2")
    assert lines.returncode == 0, lines.stderr
    acquired, released = lines.stdout.splitlines()
    assert acquired.startswith(f"{start} ")
    assert f"ACQUIRED job {job.job_id} (backup by host-a) on {NODE} require=read" in acquired
    assert f"RELEASED job {job.job_id}" in released

    events = cli("-o", "json", "watch", "--from", str(start), "--count", "2")
    assert events.returncode == 0, events.stderr
    parsed = [json.loads(line) for line in events.stdout.splitlines()]
    assert [(e["revision"], e["type"]) for e in parsed] == [
        (start, "ACQUIRED"),
        (start + 1, "RELEASED"),
    ]
    assert parsed[0]["job"]["job_id"] == job.job_id


def test_watch_snapshot_and_node_filter(cli: Nacctl, host_a: Client) -> None:
    job = hold_base(host_a)
    host_a.acquire([NodeAccess("/vol/other.qcow2", [R], [R])], operation="scrub", ttl=TTL)

    snapshot = cli("-o", "json", "watch", "--snapshot", "--node", NODE, "--count", "2")
    assert snapshot.returncode == 0, snapshot.stderr
    parsed = [json.loads(line) for line in snapshot.stdout.splitlines()]
    assert [e["type"] for e in parsed] == ["SNAPSHOT", "SNAPSHOT_COMPLETE"]
    assert parsed[0]["job"]["job_id"] == job.job_id


def test_watch_runs_live_until_count_events(cli: Nacctl, host_a: Client) -> None:
    watcher = cli.popen("watch", "--node", NODE, "--count", "1")
    # A watch from now starts at the revision it pins when it starts; keep making events until
    # one arrives after that.
    try:
        deadline = time.monotonic() + 60
        while watcher.poll() is None and time.monotonic() < deadline:
            host_a.release(hold_base(host_a).job_id)
            time.sleep(0.3)
        out, err = watcher.communicate(timeout=30)
    finally:
        watcher.kill()
    assert watcher.returncode == 0, err
    assert len(out.splitlines()) == 1
    assert "job " in out


def test_watch_filters_by_job(cli: Nacctl, host_a: Client) -> None:
    start = revision(host_a) + 1
    other = hold_base(host_a, operation="other")
    mine = host_a.acquire([NodeAccess("/vol/mine.qcow2", [W], [])], operation="mine", ttl=TTL)
    host_a.release(other.job_id)
    host_a.release(mine.job_id)

    events = cli("-o", "json", "watch", "--from", str(start), "--job", mine.job_id, "--count", "2")
    assert events.returncode == 0, events.stderr
    parsed = [json.loads(line) for line in events.stdout.splitlines()]
    assert [(e["type"], e["job"]["job_id"]) for e in parsed] == [
        ("ACQUIRED", mine.job_id),
        ("RELEASED", mine.job_id),
    ]


# --- Acquire, release ----------------------------------------------------------------------------


def test_acquire_holds_the_job_while_the_command_runs_and_releases_after(cli: Nacctl) -> None:
    script = 'echo "$NAC_JOB_ID $NAC_FENCING_TOKEN"; nacctl -o json jobs; exit 7'
    result = cli(
        "--owner",
        "host-c",
        "acquire",
        "--node",
        NODE,
        "--require",
        "write,read",
        "--allow",
        "read",
        "--",
        "sh",
        "-c",
        script,
    )
    # The command's own status comes back.
    assert result.returncode == 7, result.stderr
    first_line, listing = result.stdout.split("\n", 1)
    job_id, token = first_line.split()
    [held] = json.loads(listing)["jobs"]
    assert (held["job_id"], held["owner"], held["operation"]) == (job_id, "host-c", "sh")
    assert str(held["fencing_token"]) == token
    assert held["nodes"][0]["require"] == ["MODIFY_VISIBLE_DATA", "READ_VISIBLE_DATA"]

    assert cli.json("jobs")["jobs"] == []


def test_acquire_refused_exits_3_and_explains_on_stderr(cli: Nacctl, host_a: Client) -> None:
    job = hold_base(host_a)
    result = cli("acquire", "--node", NODE, "--require", "write", "--", "touch", "/nonexistent")
    assert result.returncode == 3
    assert result.stdout == ""
    assert (
        f"refused on {NODE}: job {job.job_id} (backup by host-a) does not allow MODIFY_VISIBLE_DATA"
    ) in result.stderr


def test_acquire_in_the_holders_group_runs_beside_it(cli: Nacctl, host_a: Client) -> None:
    """--group puts the job in a group: the group's own holder does not keep it out."""
    nodes = [NodeAccess(NODE, [Action.READ_VISIBLE_DATA], [Action.READ_VISIBLE_DATA])]
    held = host_a.acquire(nodes, operation="backup", group="qemu-1")
    access = ("--node", NODE, "--require", "write")
    assert cli("acquire", *access, "--group", "qemu-2", "--", "true").returncode == 3
    result = cli("acquire", *access, "--group", "qemu-1", "--", "true")
    assert result.returncode == 0, result.stderr
    assert [job["job_id"] for job in cli.json("jobs")["jobs"]] == [held.job_id]


def test_acquire_of_a_missing_command_exits_127_and_releases(cli: Nacctl) -> None:
    result = cli("acquire", "--node", NODE, "--require", "read", "--", "no-such-command-here")
    assert result.returncode == 127
    assert "not found" in result.stderr
    assert cli.json("jobs")["jobs"] == []


def test_acquire_passes_ctrl_c_on_to_the_command_and_exits_with_its_status(
    cli: Nacctl,
) -> None:
    running = cli.popen(
        "acquire", "--node", NODE, "--require", "write", "--",
        "sh", "-c", "trap 'kill $!; exit 42' INT; echo ready; sleep 30 & wait",
    )  # fmt: skip
    try:
        assert running.stdout is not None
        assert running.stdout.readline() == "ready\n"
        running.send_signal(signal.SIGINT)
        _, err = running.communicate(timeout=15)
    finally:
        running.kill()
    assert running.returncode == 42, err
    assert cli.json("jobs")["jobs"] == []


def test_watch_ends_with_exit_0_on_ctrl_c(cli: Nacctl, host_a: Client) -> None:
    hold_base(host_a)
    watching = cli.popen("watch", "--snapshot")
    try:
        assert watching.stdout is not None
        assert " SNAPSHOT " in watching.stdout.readline()
        # Then the watch is live, waiting for the next event.
        assert watching.stdout.readline().split()[2] == "SNAPSHOT_COMPLETE"
        watching.send_signal(signal.SIGINT)
        _, err = watching.communicate(timeout=15)
    finally:
        watching.kill()
    assert watching.returncode == 0, err


def test_acquire_kills_the_command_and_exits_8_when_the_server_goes_away(
    e2e_redis: RedisProcess, namespace: str, tmp_path: Path
) -> None:
    """No renewal is answered for a whole lease, so the hold may be gone: stop the command."""
    pid_file = tmp_path / "pid"
    with ServerProcess(e2e_redis.url, log_path=tmp_path / "server.log") as server:
        cli = Nacctl(server.target, namespace)
        # A lease that renewals keep while the server is up, on a loaded machine too.
        running = acquire_running(cli, ["--ttl", "2"], f"echo $$ > {pid_file}; exec sleep 120")
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
        server.stop()
    _, err = running.communicate(timeout=60)
    assert running.returncode == 8, err
    assert "lost" in err
    sleeper = int(pid_file.read_text())
    wait_until(lambda: not _alive(sleeper))


def test_acquire_killed_by_sigkill_takes_its_command_with_it(cli: Nacctl, tmp_path: Path) -> None:
    """Nobody renews the lease once nacctl is gone, so its command (and what that started) must
    not go on writing: its watchdog stops the command's whole session."""
    pid_file = tmp_path / "pid"
    running = acquire_running(cli, ["--grace", "1"], f"sleep 120 & echo $! > {pid_file}; wait")
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
    grandchild = int(pid_file.read_text())
    assert _alive(grandchild)
    running.kill()
    running.wait(timeout=30)
    wait_until(lambda: not _alive(grandchild))


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_release_ends_a_job_of_this_owner_only(cli: Nacctl, host_a: Client) -> None:
    job = hold_base(host_a)

    foreign = cli("--owner", "host-b", "release", job.job_id)
    assert foreign.returncode == 6, foreign.stderr

    released = cli("--owner", "host-a", "release", job.job_id)
    assert (released.returncode, released.stdout) == (0, f"released job {job.job_id}\n")

    again = cli("-o", "json", "--owner", "host-a", "release", job.job_id)
    assert again.returncode == 3
    assert json.loads(again.stdout) == {"job_id": job.job_id, "released": False}


# --- Waiting, deadlock, operator commands (server features of the queueing release) -------------


def test_acquire_waits_in_the_queue_and_jobs_shows_the_waiter(cli: Nacctl, host_a: Client) -> None:
    holder = hold_base(host_a)
    waiting = cli.popen(
        "--owner",
        "host-b",
        "acquire",
        # Time for the checks below, each a nacctl run of its own, however slow they are.
        "--wait",
        "300",
        "--node",
        NODE,
        "--require",
        "write",
        "--",
        "sh",
        "-c",
        'echo "granted $NAC_JOB_ID"',
    )
    try:
        wait_until(lambda: bool(cli.json("jobs")["waiters"]))
        listed = cli.json("jobs")
        [waiter] = listed["waiters"]
        assert (waiter["owner"], waiter["state"]) == ("host-b", "WAITING")
        assert waiter["queue_positions"] == {NODE: 1}
        table = cli("jobs").stdout
        assert "Waiting, oldest first" in table
        assert waiter["job_id"] in table
        node_state = cli.json("node", NODE)
        assert [w["job_id"] for w in node_state["waiters"]] == [waiter["job_id"]]
        assert "Waiting, next first" in cli("node", NODE).stdout

        host_a.release(holder.job_id)
        out, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, err
    assert out == f"granted {waiter['job_id']}\n"


def test_acquire_whose_wait_runs_out_exits_3(cli: Nacctl, host_a: Client) -> None:
    job = hold_base(host_a)
    started = time.monotonic()
    result = cli("acquire", "--wait", "1", "--node", NODE, "--require", "write", "--", "true")
    assert result.returncode == 3, result.stderr
    assert time.monotonic() - started >= 1.0
    assert f"job {job.job_id} (backup by host-a) does not allow" in result.stderr


def test_a_wait_that_would_deadlock_exits_7(cli: Nacctl) -> None:
    with (
        Client(cli.target, namespace=cli.namespace, owner="host-a") as host_a,
        Client(cli.target, namespace=cli.namespace, owner="host-b") as host_b,
    ):
        host_a.acquire([NodeAccess("/vol/1", [W], [])], operation="first", ttl=TTL)
        host_b.acquire([NodeAccess("/vol/2", [W], [])], operation="second", ttl=TTL)
        outcome: list[BaseException | Job] = []

        def host_a_waits() -> None:
            try:
                # Until host-b's nacctl below has run and its job is released, however slowly.
                outcome.append(
                    host_a.acquire([NodeAccess("/vol/2", [W], [])], operation="cross", wait=300)
                )
            except Exception as err:  # the test reports whatever it was
                outcome.append(err)

        waiter = threading.Thread(target=host_a_waits)
        waiter.start()
        wait_until(lambda: bool(cli.json("jobs")["waiters"]))
        result = cli(
            "--owner",
            "host-b",
            "acquire",
            "--wait",
            "300",
            "--node",
            "/vol/1",
            "--require",
            "write",
            "--",
            "true",
        )
        host_b.release(host_b.list_jobs(owner="host-b")[0].job_id)
        waiter.join(timeout=60)
    assert result.returncode == 7, result.stderr
    assert "deadlock" in result.stderr
    assert [type(o) for o in outcome] == [Job]


def test_force_release_needs_the_admin_token(admin_cli: Nacctl) -> None:
    with Client(admin_cli.target, namespace=admin_cli.namespace, owner="host-a") as host_a:
        job = hold_base(host_a)

    unauthenticated = admin_cli("force-release", job.job_id, "--reason", "test")
    assert unauthenticated.returncode == 6, unauthenticated.stderr
    wrong = admin_cli("force-release", job.job_id, "--reason", "test", admin_token="nope")
    assert wrong.returncode == 6, wrong.stderr
    assert admin_cli.json("jobs")["jobs"] != []

    ended = admin_cli(
        "-o",
        "json",
        "force-release",
        job.job_id,
        "--reason",
        "host-a is fenced",
        admin_token=ADMIN_TOKEN,
    )
    assert ended.returncode == 0, ended.stderr
    answer = json.loads(ended.stdout)
    assert (answer["released"], answer["job"]["job_id"]) == (True, job.job_id)
    assert admin_cli.json("jobs")["jobs"] == []

    again = admin_cli("force-release", job.job_id, "--reason", "x", admin_token=ADMIN_TOKEN)
    assert again.returncode == 3
    assert f"no current job {job.job_id}" in again.stdout


def test_config_shows_and_sets_the_lock_delay_and_node_shows_it(admin_cli: Nacctl) -> None:
    assert admin_cli("config", "--lock-delay", "30").returncode == 6
    table = admin_cli("config", "--lock-delay", "30", admin_token=ADMIN_TOKEN)
    assert table.returncode == 0, table.stderr
    assert "lock-delay" in table.stdout
    assert "30s" in table.stdout
    assert admin_cli.json("config") == {"namespace": admin_cli.namespace, "lock_delay": 30.0}

    with Client(admin_cli.target, namespace=admin_cli.namespace, owner="host-a") as host_a:
        job = hold_base(host_a)
    forced = admin_cli("force-release", job.job_id, "--reason", "test", admin_token=ADMIN_TOKEN)
    assert forced.returncode == 0, forced.stderr

    state = admin_cli.json("node", NODE)
    assert state["lock_delay"]["job"]["job_id"] == job.job_id
    assert state["lock_delay"]["until"] is not None
    assert f"left by lost job {job.job_id}" in admin_cli("node", NODE).stdout

    refused = admin_cli("explain", "--node", NODE, "--require", "write")
    assert refused.returncode == 3
    assert f"lost job {job.job_id} (backup by host-a) is in lock-delay until" in refused.stdout

    cleared = admin_cli("config", "--lock-delay", "0", admin_token=ADMIN_TOKEN)
    assert cleared.returncode == 0
    assert admin_cli.json("config")["lock_delay"] == 0.0


def test_acquire_kills_the_command_and_exits_8_when_force_released(
    admin_cli: Nacctl, tmp_path: Path
) -> None:
    # A lease that renewals keep until the force-release, on a loaded machine too.
    ended = force_release_while_running(
        admin_cli, tmp_path, ["--ttl", "2"], "exec sleep 120", timeout=60
    )
    assert ended.returncode == 8, ended.err
    # Stopped by the next renewal's answer, long before the command would have ended.
    assert ended.seconds < 30
    assert f"lease on job {ended.job_id} lost" in ended.err
    wait_until(lambda: not _alive(ended.pid))


def test_acquire_bounds_grace_by_the_lock_delay(admin_cli: Nacctl, tmp_path: Path) -> None:
    """After a lost lease, others may have the nodes once the lock-delay ends: a command that
    ignores SIGTERM is killed by then, not after a longer --grace."""
    with Client(
        admin_cli.target, namespace=admin_cli.namespace, owner="op", admin_token=ADMIN_TOKEN
    ) as operator:
        operator.configure_namespace(lock_delay=1.0)
    ended = force_release_while_running(
        admin_cli,
        tmp_path,
        ["--grace", "30"],
        "trap '' TERM; while :; do sleep 0.2; done",
        timeout=25,
    )
    assert ended.returncode == 8, ended.err
    assert "longer than the namespace's lock-delay (1s)" in ended.err
    wait_until(lambda: not _alive(ended.pid), timeout=10)


@dataclass(frozen=True)
class Ended:
    returncode: int
    err: str
    job_id: str
    pid: int
    # From the force-release to nacctl's exit.
    seconds: float


def force_release_while_running(
    cli: Nacctl, tmp_path: Path, options: list[str], script: str, timeout: float
) -> Ended:
    """nacctl acquire of NODE runs `sh -c script`; once it runs, an operator force-releases the
    job. How nacctl ended, and the pid of the command's shell."""
    pid_file = tmp_path / "pid"
    running = acquire_running(cli, options, f"echo $$ > {pid_file}; {script}")
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip() != "")
        [held] = cli.json("jobs")["jobs"]
        forced = cli("force-release", held["job_id"], "--reason", "test", admin_token=ADMIN_TOKEN)
        assert forced.returncode == 0, forced.stderr
        started = time.monotonic()
        _, err = running.communicate(timeout=timeout)
    finally:
        running.kill()
    return Ended(
        running.returncode,
        err,
        held["job_id"],
        int(pid_file.read_text()),
        time.monotonic() - started,
    )
