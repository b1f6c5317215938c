"""bench/inprocess.py still runs: the no-socket harness behind the instruction counts in bench/."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "inprocess.py"


@pytest.mark.parametrize(
    ("arguments", "unit"),
    [
        (["appends", "-n", "500", "--rounds", "1"], "append"),
        (["long-poll", "--readers", "20", "-n", "3", "--rounds", "1"], "delivery"),
    ],
)
def test_the_in_process_harness_measures_every_scenario(arguments: list[str], unit: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *arguments], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert re.fullmatch(rf"CPU us per {unit}: [\d.]+ \(min [\d.]+\)\n", done.stdout), done.stdout
