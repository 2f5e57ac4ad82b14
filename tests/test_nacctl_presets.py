"""`nacctl explain --preset` and `nacctl presets`, through the console script against a real server.

Every preset of the catalog (nac_client.qemu.CATALOG) is explained with options made from its
builder's signature; the expected masks come from calling the builder itself.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator

import pytest

from nac_cli import main as nacctl_main
from nac_cli import presets
from nac_cli.access import SHORT_NAMES
from nac_client import Action, Client, NodeAccess, qemu
from tests.servers import ServerProcess
from tests.test_nacctl import NACCTL, TTL, Nacctl

NAMES = list(qemu.CATALOG)
CHAIN = ("/vol/top.qcow2", "/vol/mid.qcow2", "/vol/base.qcow2")


@pytest.fixture(scope="module", autouse=True)
def console_script_installed() -> None:
    assert NACCTL.exists(), f"{NACCTL} is missing: run `.venv/bin/pip install -e .`"


@pytest.fixture
def cli(servers: tuple[ServerProcess, ServerProcess], namespace: str) -> Nacctl:
    return Nacctl(servers[0].target, namespace)


@pytest.fixture
def host_a(cli: Nacctl) -> Iterator[Client]:
    with Client(cli.target, namespace=cli.namespace, owner="host-a") as client:
        yield client


def required_values(name: str) -> list[tuple[presets.PresetOption, str]]:
    """A value for each required option: the whole chain for a list, an image of its own else."""
    values = []
    for option in presets.options(name):
        if not option.required:
            continue
        assert option.kind in ("list", "path"), (name, option)
        value = ",".join(CHAIN) if option.kind == "list" else f"/vol/{option.parameter}.qcow2"
        values.append((option, value))
    return values


def preset_args(name: str) -> list[str]:
    args = ["--preset", name]
    for option, value in required_values(name):
        args += [option.flag, value]
    return args


def built(name: str) -> qemu.Preset:
    """The preset the builder itself makes from the same values (all required ones positional)."""
    values = [CHAIN if o.kind == "list" else v for o, v in required_values(name)]
    return qemu.CATALOG[name](*values)


def node_line(access: NodeAccess) -> str:
    def words(mask: frozenset[Action]) -> str:
        return ",".join(SHORT_NAMES[a] for a in sorted(mask)) or "nothing"

    return f"  {access.node}: require {words(access.require)}; allow {words(access.allow)}"


# --- Explaining each preset --------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_explains_on_an_empty_server_and_prints_each_node(
    cli: Nacctl, name: str
) -> None:
    preset = built(name)
    result = cli("explain", *preset_args(name))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"preset {name}: operation {preset.operation!r}",
        f"masks from QEMU's {preset.source}",
        *(node_line(access) for access in preset.nodes),
        "would be granted",
    ]

    answer = cli.json("explain", *preset_args(name))
    assert answer == {
        "preset": name,
        "operation": preset.operation,
        "source": preset.source,
        "nodes": [
            {
                "node": access.node,
                "require": [a.name for a in sorted(access.require)],
                "allow": [a.name for a in sorted(access.allow)],
            }
            for access in preset.nodes
        ],
        "granted": True,
        "conflicts": [],
    }


def test_flags_and_optional_options_reach_the_builder(cli: Nacctl) -> None:
    shared = cli.json("explain", "--preset", "guest-device", "--image", CHAIN[0], "--share-rw")
    assert shared["operation"] == qemu.guest_device(CHAIN[0], share_rw=True).operation
    fixed = cli.json("explain", "--preset", "guest-device", "--image", CHAIN[0], "--no-resizable")
    assert "RESIZE" not in fixed["nodes"][0]["allow"]
    inner = cli.json(
        "explain", "--preset", "block-commit", "--chain", ",".join(CHAIN), "--top", CHAIN[1]
    )
    expected = qemu.block_commit(CHAIN, top=CHAIN[1])
    assert (inner["operation"], inner["source"]) == (expected.operation, expected.source)
    assert [n["node"] for n in inner["nodes"]] == [a.node for a in expected.nodes]


def test_block_stream_is_refused_while_a_block_commit_holds_the_chain_and_names_it(
    cli: Nacctl, host_a: Client
) -> None:
    commit = qemu.block_commit(CHAIN)
    job = host_a.acquire(commit.nodes, operation=commit.operation, ttl=TTL)
    holder = f"job {job.job_id} ({commit.operation} by host-a)"

    args = ("explain", "--preset", "block-stream", "--chain", ",".join(CHAIN))
    refused = cli(*args)
    assert refused.returncode == 3, refused.stderr
    lines = refused.stdout.splitlines()
    stream = qemu.block_stream(CHAIN)
    assert lines[: 2 + len(stream.nodes)] == [
        "preset block-stream: operation 'block-stream'",
        f"masks from QEMU's {stream.source}",
        *(node_line(access) for access in stream.nodes),
    ]
    verdict = lines[2 + len(stream.nodes) :]
    assert verdict, refused.stdout
    assert all(line.startswith("refused on ") and holder in line for line in verdict), verdict

    # The verdict is the one a plain explain of the same masks gives.
    specs = [
        f"--access={a.node}:require={','.join(x.name for x in a.require)};"
        f"allow={','.join(x.name for x in a.allow)}"
        for a in stream.nodes
    ]
    plain = cli("explain", "--operation", "block-stream", *specs)
    assert plain.returncode == 3
    assert sorted(plain.stdout.splitlines()) == sorted(verdict)

    answer = cli("-o", "json", *args)
    assert answer.returncode == 3
    parsed = json.loads(answer.stdout)
    assert parsed["granted"] is False
    assert {c["holder_job_id"] for c in parsed["conflicts"]} == {job.job_id}
    assert [n["node"] for n in parsed["nodes"]] == list(CHAIN)

    host_a.release(job.job_id)
    assert cli(*args).returncode == 0


# --- Usage errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--preset", "no-such-preset"], "no-such-preset"),
        (["--preset", "mirror", "--source", "/a", "--target", "/b", "--top", "/c"], "--top"),
        (["--preset", "mirror", "--source", "/a"], "--target"),
        (["--preset", "block-commit"], "--chain"),
        (["--preset", "block-commit", "--chain", "/a,/b", "--top", "/z"], "/z"),
        (["--preset", "block-commit", "--chain", "/a,,/b"], "--chain"),
        (["--preset", "qemu-img-info", "--image", "/a", "--node", "/b"], "--node"),
        (["--preset", "qemu-img-info", "--image", "/a", "--access", "/b:"], "--access"),
        (["--chain", "/a"], "--chain"),
        (["--preset"], "--preset"),
    ],
)
def test_bad_presets_and_options_exit_2_and_name_them(
    cli: Nacctl, args: list[str], named: str
) -> None:
    result = cli("explain", *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    assert named in result.stderr


def test_combining_a_preset_with_nodes_says_so(cli: Nacctl) -> None:
    result = cli("explain", "--preset", "qemu-img-info", "--image", "/a", "--node", "/b")
    assert "--preset cannot be combined with --node" in result.stderr


def test_no_preset_option_shadows_an_option_of_explain() -> None:
    own = {flag for p in nacctl_main.explain.params for flag in getattr(p, "opts", [])}
    for name in NAMES:
        flags = {flag for o in presets.click_options(name) for flag in o.opts + o.secondary_opts}
        assert not flags & own, name


def test_the_help_of_explain_with_a_preset_lists_its_options() -> None:
    result = Nacctl("127.0.0.1:1", "ns")("explain", "--preset", "block-commit", "--help")
    assert result.returncode == 0, result.stderr
    for flag in ("--chain", "--top", "--base"):
        assert flag in result.stdout


# --- Listing -----------------------------------------------------------------------------------


def test_presets_lists_every_name_with_its_options_and_description() -> None:
    # Listing needs no server.
    offline = Nacctl("127.0.0.1:1", "ns")
    table = offline("presets")
    assert table.returncode == 0, table.stderr
    rows = {line.split()[1]: line for line in table.stdout.splitlines() if line.startswith("│ ")}
    for name in NAMES:
        assert name in rows, name
        assert presets.options(name)[0].flag in rows[name], name

    listed = offline.json("presets")["presets"]
    assert [p["name"] for p in listed] == NAMES
    for entry in listed:
        builder = qemu.CATALOG[entry["name"]]
        assert builder.__doc__ is not None
        assert entry["description"] == builder.__doc__.strip().splitlines()[0]
        assert [o["parameter"] for o in entry["options"]] == list(
            inspect.signature(builder).parameters
        )
