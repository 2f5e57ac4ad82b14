"""nacctl: the operator's command line for NAC, modelled on etcdctl and `consul lock`.

It talks to one server with the blocking client (nac_client.Client). Every command prints a
table by default and JSON with -o json (one object; JSON lines for `watch`). Global options
also come from the environment: NAC_SERVER, NAC_NAMESPACE, NAC_OWNER, NAC_ADMIN_TOKEN,
NAC_OUTPUT, NAC_TIMEOUT.

Commands: jobs, job, node, explain, presets, watch, acquire, release, force-release, config.

Exit codes:
  0    success
  1    any other error
  2    usage error
  3    refused: a conflict, `explain` found one, or `release`/`force-release` released nothing
  4    not found
  5    server or its store unavailable, or no answer in time
  6    permission denied or unauthenticated (wrong owner, missing or wrong admin token)
  7    deadlock: waiting would close a cycle
  8    `acquire`: the lease was lost while the command ran; the command was killed
  130  interrupted (Ctrl-C) before the command ran
  `acquire -- COMMAND` otherwise exits with the command's own status (128+N if killed by
  signal N; 127 if it was not found, 126 if it could not be run).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console

from nac_cli import presets, render
from nac_cli.access import ACTIONS_HELP, SpecError, node_accesses
from nac_cli.exit_codes import EXIT_CODES_TEXT, ExitCode, exit_code_for
from nac_cli.supervise import Outcome, run_while_held
from nac_client import Client, Conflict, Deadlock, Event, JobState, NacError, NodeAccess, qemu

F = TypeVar("F", bound=Callable[..., Any])

# Wide enough that piped tables do not wrap job ids and node names; a terminal keeps its width.
PIPE_WIDTH = 200


@dataclass(frozen=True)
class Settings:
    """The global options, shared by every command."""

    server: str
    namespace: str
    owner: str | None
    admin_token: str | None
    output: str
    timeout: float

    @property
    def json(self) -> bool:
        return self.output == "json"

    def client(self) -> Client:
        return Client(
            self.server,
            namespace=self.namespace,
            owner=self.owner,
            timeout=self.timeout,
            admin_token=self.admin_token,
        )


pass_settings = click.make_pass_decorator(Settings)


def console() -> Console:
    plain = Console(highlight=False)
    return plain if plain.is_terminal else Console(highlight=False, width=PIPE_WIDTH)


def print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2))


def warn(message: str) -> None:
    click.echo(f"nacctl: {message}", err=True)


def read_accesses(
    nodes: Sequence[str], require: Sequence[str], allow: Sequence[str], specs: Sequence[str]
) -> tuple[NodeAccess, ...]:
    try:
        return node_accesses(nodes, require, allow, specs)
    except SpecError as err:
        raise click.UsageError(str(err)) from err


def access_options(command: F) -> F:
    """--node/--require/--allow and --access, for the commands that name nodes and masks."""
    options = [
        click.option(
            "--node",
            "nodes",
            multiple=True,
            metavar="NODE",
            help="A node, with the --require and --allow masks. Repeatable: every --node gets "
            "the same masks.",
        ),
        click.option(
            "--require",
            multiple=True,
            metavar="A[,A...]",
            help="Actions the job performs on each --node. Repeatable.",
        ),
        click.option(
            "--allow",
            multiple=True,
            metavar="A[,A...]",
            help="Actions the job lets others perform on each --node; the rest are "
            "prohibited. Repeatable.",
        ),
        click.option(
            "--access",
            "access_specs",
            multiple=True,
            metavar="NODE:require=A,B;allow=C",
            help="A node with masks of its own. Repeatable. The node is everything before the "
            "last colon, so end a node name that has colons with ':' when it has no masks.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


EPILOG = f"""{ACTIONS_HELP}

\b
Exit codes:
{EXIT_CODES_TEXT}
"""


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=EPILOG,
)
@click.option(
    "-s",
    "--server",
    envvar="NAC_SERVER",
    default="127.0.0.1:50051",
    show_default=True,
    show_envvar=True,
    help="The NAC server, HOST:PORT.",
)
@click.option(
    "-n",
    "--namespace",
    envvar="NAC_NAMESPACE",
    default="default",
    show_default=True,
    show_envvar=True,
    help="The storage domain to act in.",
)
@click.option(
    "--owner",
    envvar="NAC_OWNER",
    show_envvar=True,
    help="The owner that acquire holds jobs under and release must match. [default: hostname:pid]",
)
@click.option(
    "--admin-token",
    envvar="NAC_ADMIN_TOKEN",
    show_envvar=True,
    help="The server's admin token, for force-release and config --lock-delay. Prefer the "
    "environment variable: arguments are visible to other users in ps.",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "json"]),
    envvar="NAC_OUTPUT",
    default="table",
    show_default=True,
    show_envvar=True,
    help="Tables for people, or JSON (JSON lines for watch).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    envvar="NAC_TIMEOUT",
    default=10.0,
    show_default=True,
    show_envvar=True,
    help="Seconds each call attempt may take (a waiting acquire adds its wait).",
)
@click.pass_context
def cli(
    ctx: click.Context,
    server: str,
    namespace: str,
    owner: str | None,
    admin_token: str | None,
    output: str,
    timeout: float,
) -> None:
    """Ask, hold and watch NAC, the arbiter for operations on shared block storage.

    \b
    Examples:
      nacctl jobs                                   # who holds what, who waits
      nacctl node /vol/base.qcow2                   # one node: holders, counts, queue
      nacctl explain --node /vol/base.qcow2 --require write --allow read
      nacctl acquire --node /vol/base.qcow2 --require write,read --allow read \\
          -- qemu-img commit /vol/top.qcow2
      nacctl -o json watch --node /vol/base.qcow2
    """
    ctx.obj = Settings(
        server=server,
        namespace=namespace,
        owner=owner or None,
        admin_token=admin_token or None,
        output=output,
        timeout=timeout,
    )


# --- Reading ------------------------------------------------------------------------------------


@cli.command()
@click.option("--node", help="Only jobs holding or waiting for this node.")
@click.option("--owner", "owner_filter", metavar="OWNER", help="Only jobs of this owner.")
@pass_settings
def jobs(settings: Settings, node: str | None, owner_filter: str | None) -> None:
    """List the jobs holding nodes, then the jobs waiting, with their queue positions.

    \b
    Examples:
      nacctl jobs
      nacctl jobs --node /vol/base.qcow2
      nacctl -o json jobs --owner host-b | jq '.jobs[].job_id'
    """
    with settings.client() as client:
        listed = client.list_jobs(node=node, owner=owner_filter, include_waiters=True)
    held = [j for j in listed if j.state is JobState.HELD]
    waiting = [j for j in listed if j.state is JobState.WAITING]
    if settings.json:
        print_json(
            {
                "jobs": [render.job_json(j) for j in held],
                "waiters": [render.job_json(j) for j in waiting],
            }
        )
        return
    out = console()
    if not held and not waiting:
        out.print("no jobs")
        return
    out.print(render.held_table(held))
    if waiting:
        out.print(render.waiting_table(waiting))


@cli.command()
@click.argument("job_id")
@pass_settings
def job(settings: Settings, job_id: str) -> None:
    """Show one current job. Exits 4 if no current job has JOB_ID.

    \b
    Examples:
      nacctl job 7f3c2a
      nacctl -o json job 7f3c2a | jq .fencing_token
    """
    with settings.client() as client:
        found = client.get_job(job_id)
    if settings.json:
        print_json(render.job_json(found))
    else:
        console().print(render.job_table(found))


@cli.command()
@click.argument("name")
@pass_settings
def node(settings: Settings, name: str) -> None:
    """Show one node: its holders, per-action counts, queue and any lock-delay.

    A node nobody holds shows no holders and zero counts.

    \b
    Examples:
      nacctl node /vol/base.qcow2
      nacctl -o json node /vol/base.qcow2 | jq '.waiters | length'
    """
    with settings.client() as client:
        state = client.get_node(name)
    if settings.json:
        print_json(render.node_json(state))
        return
    out = console()
    out.print(
        f"node {name} in namespace {state.namespace} at revision {state.revision}", markup=False
    )
    if state.holders:
        out.print(render.held_table(state.holders, title="Holders"))
    else:
        out.print("no holders")
    out.print(render.tally_table(state))
    if state.waiters:
        out.print(render.node_waiters_table(state))
    if state.lock_delay is not None:
        delay = state.lock_delay
        out.print(
            f"in lock-delay until {render.timestamp(delay.until)}, left by lost "
            f"{render.job_words(delay.job)}",
            markup=False,
        )


def _preset_named(args: Sequence[str]) -> str | None:
    """The NAME of --preset NAME (or --preset=NAME) among a command's arguments."""
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--preset":
            return args[index + 1] if index + 1 < len(args) else None
        if arg.startswith("--preset="):
            return arg.partition("=")[2]
    return None


class ExplainCommand(click.Command):
    """`explain`, which takes the options of the preset that --preset names as its own.

    The preset is found among the arguments before they are parsed, so its options are parsed,
    checked and listed in --help like any other: a missing or unknown one is a usage error.
    """

    _META_KEY = "nac_cli.preset_options"

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        name = _preset_named(args)
        if name is not None:
            try:
                ctx.meta[self._META_KEY] = presets.click_options(name)
            except presets.PresetError as err:
                raise click.UsageError(str(err), ctx) from err
        return super().parse_args(ctx, args)

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        params = super().get_params(ctx)
        extra: list[click.Parameter] = list(ctx.meta.get(self._META_KEY, ()))
        # Before --help, which click keeps last.
        return [*params[:-1], *extra, *params[-1:]] if extra else params


@cli.command(cls=ExplainCommand)
@access_options
@click.option(
    "--preset",
    metavar="NAME",
    help="Explain a QEMU operation from the catalog (see `nacctl presets`), with its own "
    "options, instead of --node/--access.",
)
@click.option(
    "--operation",
    help="The operation name the explanations would give other jobs. [default: the preset's "
    "operation, or explain]",
)
@pass_settings
def explain(
    settings: Settings,
    /,
    nodes: tuple[str, ...],
    require: tuple[str, ...],
    allow: tuple[str, ...],
    access_specs: tuple[str, ...],
    preset: str | None,
    operation: str | None,
    **preset_args: Any,
) -> int:
    """Say whether a job would be granted now, and if not why, changing nothing.

    Prints one line per conflict (each node, action and job in the way), or "would be
    granted". Exits 3 when it would be refused. With --preset, first says which operation the
    preset stands for, the QEMU source of its masks and what it requires and allows on each
    node; `nacctl explain --preset NAME --help` lists the preset's options.

    \b
    Examples:
      nacctl explain --node /vol/base.qcow2 --require write --allow read
      nacctl explain --access '/vol/top.qcow2:require=read;allow=read' \\
                     --access '/vol/base.qcow2:require=write,read;allow=read'
      nacctl explain --preset block-commit --chain /vol/top.qcow2,/vol/base.qcow2
      nacctl explain --preset guest-device --image /vol/top.qcow2 --share-rw
    """
    built: qemu.Preset | None = None
    if preset is not None:
        if nodes or require or allow or access_specs:
            raise click.UsageError(
                "--preset cannot be combined with --node, --require, --allow or --access"
            )
        try:
            built = presets.build(preset, preset_args)
        except presets.PresetError as err:
            raise click.UsageError(str(err)) from err
        accesses = built.nodes
    else:
        accesses = read_accesses(nodes, require, allow, access_specs)
    name = operation or (built.operation if built is not None else "explain")
    with settings.client() as client:
        conflicts = client.check(accesses, operation=name)
    if settings.json:
        answer = render.preset_json(preset, built) if preset and built else {}
        answer |= {
            "granted": not conflicts,
            "conflicts": [render.conflict_json(c) for c in conflicts],
        }
        print_json(answer)
        return ExitCode.REFUSED if conflicts else ExitCode.OK
    if preset is not None and built is not None:
        for line in render.preset_lines(preset, built):
            click.echo(line)
    if conflicts:
        for conflict in conflicts:
            click.echo(str(conflict))
    else:
        click.echo("would be granted")
    return ExitCode.REFUSED if conflicts else ExitCode.OK


@cli.command("presets")
@pass_settings
def list_presets(settings: Settings) -> None:
    """List the QEMU presets that `explain --preset` takes, with their options.

    Each preset stands for one QEMU operation; its masks come from QEMU's permission code.

    \b
    Examples:
      nacctl presets
      nacctl -o json presets | jq -r '.presets[].name'
    """
    if settings.json:
        print_json(
            {
                "presets": [
                    {
                        "name": name,
                        "description": presets.description(name),
                        "options": [o.json() for o in presets.options(name)],
                    }
                    for name in presets.names()
                ]
            }
        )
        return
    console().print(render.presets_table(presets.names()))


@cli.command()
@click.option(
    "--node", "nodes", multiple=True, metavar="NODE", help="Only events on this node. Repeatable."
)
@click.option(
    "--job", "job_ids", multiple=True, metavar="JOB", help="Only events about this job. Repeatable."
)
@click.option(
    "--from",
    "start_revision",
    type=click.IntRange(min=1),
    metavar="REV",
    help="Replay the kept history from revision REV, then go on live.",
)
@click.option("--snapshot", is_flag=True, help="Open with one SNAPSHOT event per current job.")
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many events.")
@pass_settings
def watch(
    settings: Settings,
    nodes: tuple[str, ...],
    job_ids: tuple[str, ...],
    start_revision: int | None,
    snapshot: bool,
    count: int | None,
) -> None:
    """Print the namespace's events as they happen, one a line, until Ctrl-C.

    Resumes by itself after a disconnect, with no gap and no duplicate. Ctrl-C ends it with
    exit 0.

    \b
    Examples:
      nacctl watch
      nacctl watch --node /vol/base.qcow2 --snapshot
      nacctl -o json watch --job 7f3c2a --count 1      # wait for the next event of a job
    """
    if snapshot and start_revision:
        raise click.UsageError("--snapshot and --from do not go together")
    delivered = 0
    with settings.client() as client:
        events = client.watch(
            nodes=nodes, job_ids=job_ids, start_revision=start_revision or 0, snapshot=snapshot
        )
        try:
            for event in events:
                _print_event(settings, event)
                delivered += 1
                if count is not None and delivered >= count:
                    break
        except KeyboardInterrupt:
            pass  # the way to stop a watch
        finally:
            # End the stream now, not whenever the generator is collected.
            if isinstance(events, Generator):
                events.close()


def _print_event(settings: Settings, event: Event) -> None:
    if settings.json:
        click.echo(json.dumps(render.event_json(event)))
    else:
        click.echo(render.event_line(event))


# --- Holding ------------------------------------------------------------------------------------


@cli.command(context_settings={"allow_interspersed_args": False})
@access_options
@click.option(
    "--operation", help="Operation name other jobs' explanations show. [default: the command]"
)
@click.option(
    "--ttl",
    type=click.FloatRange(min=0, min_open=True),
    help="Lease seconds; renewed in the background. [default: the server's]",
)
@click.option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Seconds to queue for the nodes when refused. [default: answer at once]",
)
@click.option("--job-id", help="The job's id. [default: a fresh uuid]")
@click.option(
    "--group",
    default="",
    help="The job's group: jobs of one group never conflict with each other. [default: none]",
)
@click.option(
    "--grace",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL when the lease is lost.",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_settings
def acquire(
    settings: Settings,
    nodes: tuple[str, ...],
    require: tuple[str, ...],
    allow: tuple[str, ...],
    access_specs: tuple[str, ...],
    operation: str | None,
    ttl: float | None,
    wait: float,
    job_id: str | None,
    group: str,
    grace: float,
    command: tuple[str, ...],
) -> int:
    """Hold nodes while COMMAND runs; release them when it exits.

    The command sees NAC_JOB_ID, NAC_FENCING_TOKEN and NAC_NAMESPACE in its environment.
    The lease is renewed in the background. If it is lost (the server ended the job, or
    renewals failed for a whole lease), the command and everything it started get SIGTERM,
    then SIGKILL after --grace, and nacctl exits 8. Ctrl-C and SIGTERM are passed on to the
    command. Otherwise nacctl exits with the command's status. A refusal exits 3, with one
    line per conflict.

    \b
    Examples:
      nacctl acquire --node /vol/base.qcow2 --require write,read --allow read \\
          -- qemu-img commit /vol/top.qcow2
      nacctl acquire --wait 60 --ttl 15 --operation backup \\
          --access '/vol/a.qcow2:require=read;allow=read,readmeta' -- ./backup.sh
    """
    accesses = read_accesses(nodes, require, allow, access_specs)
    name = operation or os.path.basename(command[0])
    outcome: Outcome | None = None
    with settings.client() as client:
        # Others may be granted the nodes once the lock-delay after a lost lease ends: a command
        # still running past it would write beside them.
        lock_delay = client.get_namespace_config().lock_delay.total_seconds()
        if 0 < lock_delay < grace:
            warn(
                f"--grace {grace:g}s is longer than the namespace's lock-delay "
                f"({lock_delay:g}s): a command whose lease is lost gets SIGKILL after "
                f"{lock_delay:g}s"
            )
            grace = lock_delay
        hold = client.hold(
            accesses, operation=name, job_id=job_id, ttl=ttl, wait=wait or None, group=group
        )
        try:
            with hold:
                env = {
                    "NAC_JOB_ID": hold.job.job_id,
                    "NAC_FENCING_TOKEN": str(hold.job.fencing_token),
                    "NAC_NAMESPACE": hold.job.namespace,
                }
                outcome = run_while_held(hold, command, extra_env=env, grace=grace)
        except NacError as err:
            if outcome is None:
                raise
            # The command has run: its status matters more; the lease will simply run out.
            warn(f"could not release job {hold.job.job_id}: {err.message}")
        except FileNotFoundError:
            warn(f"{command[0]}: command not found")
            return ExitCode.COMMAND_NOT_FOUND
        except OSError as err:
            warn(f"{command[0]}: {err.strerror or err}")
            return ExitCode.COMMAND_NOT_EXECUTABLE
    assert outcome is not None  # every other way out of the hold raised or returned
    if outcome.lost_reason is not None:
        warn(
            f"lease on job {hold.job.job_id} lost ({outcome.lost_reason}); "
            f"stopped {command[0]} (status {outcome.returncode})"
        )
        return ExitCode.LEASE_LOST
    return outcome.returncode


@cli.command()
@click.argument("job_id")
@pass_settings
def release(settings: Settings, job_id: str) -> int:
    """End a job held under --owner. Exits 3 if it was not held, 6 if another owner holds it.

    Use force-release for another owner's job.

    \b
    Examples:
      nacctl --owner host-a:4242 release 7f3c2a
    """
    with settings.client() as client:
        released = client.release(job_id)
    if settings.json:
        print_json({"job_id": job_id, "released": released})
    else:
        click.echo(f"released job {job_id}" if released else f"job {job_id} was not held")
    return ExitCode.OK if released else ExitCode.REFUSED


@cli.command("force-release")
@click.argument("job_id")
@click.option("--reason", required=True, help="Why, for the audit trail.")
@click.option("--actor", help="Who is asking, for the audit trail. [default: user@host]")
@pass_settings
def force_release(settings: Settings, job_id: str, reason: str, actor: str | None) -> int:
    """End any owner's job, as an operator (needs the admin token).

    Its nodes stay blocked for the namespace's lock-delay, since the holder may still be
    writing, and its fencing token is stale from then on. Exits 3 if no current job has
    JOB_ID.

    \b
    Examples:
      NAC_ADMIN_TOKEN=... nacctl force-release 7f3c2a --reason "host-b is fenced"
    """
    with settings.client() as client:
        ended = client.force_release(job_id, reason=reason, actor=actor or _operator_name())
    if settings.json:
        print_json(
            {
                "job_id": job_id,
                "released": ended is not None,
                "job": render.job_json(ended) if ended is not None else None,
            }
        )
    elif ended is not None:
        click.echo(f"force-released {render.job_words(ended)}")
    else:
        click.echo(f"no current job {job_id}")
    return ExitCode.OK if ended is not None else ExitCode.REFUSED


def _operator_name() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid, as in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


@cli.command()
@click.option(
    "--lock-delay",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Set how long a lost or force-released holder keeps blocking its nodes; 0 turns it "
    "off. Needs the admin token.",
)
@pass_settings
def config(settings: Settings, lock_delay: float | None) -> None:
    """Show the namespace's settings, or set them.

    \b
    Examples:
      nacctl config
      NAC_ADMIN_TOKEN=... nacctl config --lock-delay 30
    """
    with settings.client() as client:
        if lock_delay is None:
            current = client.get_namespace_config()
        else:
            current = client.configure_namespace(lock_delay=lock_delay)
    if settings.json:
        print_json(render.config_json(current))
    else:
        console().print(render.config_table(current))


# --- Running ------------------------------------------------------------------------------------


def report(error: NacError) -> None:
    """Says on stderr what went wrong; a refusal one line per conflict."""
    if isinstance(error, Conflict):
        warn(f"job {error.job_id} was refused:")
        for conflict in error.conflicts:
            click.echo(str(conflict), err=True)
    elif isinstance(error, Deadlock):
        warn(f"deadlock: {error.message}" + (f" (cycle: {error.cycle})" if error.cycle else ""))
    else:
        warn(error.message)


def run(argv: Sequence[str] | None = None) -> int:
    """Runs nacctl with these arguments (sys.argv[1:] when None) and returns its exit code."""
    try:
        result = cli.main(
            args=list(argv) if argv is not None else None,
            prog_name="nacctl",
            standalone_mode=False,
        )
    except click.ClickException as err:
        err.show()
        return err.exit_code
    except click.Abort:
        # click turns Ctrl-C into Abort.
        warn("interrupted")
        return ExitCode.INTERRUPTED
    except NacError as err:
        report(err)
        return exit_code_for(err)
    return int(result) if isinstance(result, int) else ExitCode.OK


def main() -> NoReturn:
    """The nacctl console script."""
    # The client logs what nacctl reports itself (a lost hold, a failed release) as warnings.
    logging.basicConfig(level=logging.ERROR, format="nacctl: %(name)s: %(message)s")
    sys.exit(run())
