"""The benchmark runs end to end: its own Redis, nac-server, ceiling server and load processes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^(nac|ceiling)\s+(\d+)\s+(\d+\.\d)\s+(\d+\.\d\d)\s+(\d+\.\d\d)")


# The subprocess timeout below is the real limit; pytest's default of 120 s would cut it short.
@pytest.mark.timeout(150)
def test_quick_run_prints_a_table_and_the_ratio() -> None:
    finished = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "acquire_release.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    lines = finished.stdout.strip().splitlines()

    last = re.fullmatch(r"ratio_at_64 (\d+\.\d\d)", lines[-1])
    assert last is not None, lines[-1]
    assert float(last.group(1)) > 0

    rows = [match.groups() for line in lines if (match := ROW.match(line))]
    assert sorted((name, int(level)) for name, level, *_ in rows) == sorted(
        (name, level) for name in ("nac", "ceiling") for level in (1, 16, 64)
    )
    assert all(float(rate) > 0 for _, _, rate, _, _ in rows)
