"""nac-server's flags and their environment variables."""

from __future__ import annotations

import pytest

from nac_server.cli import config_from, parse_args


def test_environment_sets_defaults_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NAC_LOCK_DELAY", "3")
    monkeypatch.setenv("NAC_LISTEN", "0.0.0.0:7000")
    monkeypatch.setenv("NAC_ADMIN_TOKEN", "t0ken")
    config = config_from(parse_args(["--lock-delay", "2"]))
    assert config.limits.lock_delay_ms == 2000
    assert config.listen == "0.0.0.0:7000"
    assert config.admin_token == "t0ken"
    assert config.redis_url is None


def test_defaults() -> None:
    config = config_from(parse_args([]))
    assert (config.listen, config.limits.default_ttl_ms, config.limits.lock_delay_ms) == (
        "127.0.0.1:50051",
        30_000,
        15_000,
    )
    assert config.admin_token is None


@pytest.mark.parametrize(
    "argv",
    [["--min-ttl", "0"], ["--default-ttl", "99999"], ["--history", "0"], ["--lock-delay", "-1"]],
)
def test_out_of_range_flags_are_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        parse_args(argv)
    assert stopped.value.code == 2


def test_a_bad_environment_value_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("NAC_DEFAULT_TTL", "soon")
    with pytest.raises(SystemExit) as stopped:
        parse_args([])
    assert stopped.value.code == 2
    assert "--default-ttl" in capsys.readouterr().err
