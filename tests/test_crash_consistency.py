"""A short run of scripts/crash_consistency.py: writers killed with SIGKILL at random points
leave every file whole (old or new version), and the next writer leaves no temporary file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "crash_consistency.py"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and advisory locks are POSIX")
def test_kill_minus_nine_during_saves_never_damages_a_file_or_leaves_a_temp_file():
    spec = importlib.util.spec_from_file_location("crash_consistency", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.run(runs=4, seed=1, max_delay=1.0, log=None)
    assert result["runs"] == 4
    assert result["damaged"] == 0, result["problems"]
    assert result["temps_after_next_write"] == 0
