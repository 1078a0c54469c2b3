"""The README keeps its promises: every setting is listed, and CI runs the test command it gives."""

from __future__ import annotations

import re
from pathlib import Path

from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme() -> None:
    missing = [name for name in Settings.model_fields if f"`TLSO_{name.upper()}" not in README]
    assert missing == [], f"settings missing from the README's table: {missing}"


def test_ci_runs_the_readme_test_command() -> None:
    section = README.split("## Test it", 1)[1]
    command = re.search(r"```sh\n(.+?)\n```", section, re.S)
    assert command is not None
    ci = (ROOT / ".ci" / "run").read_text()
    assert command.group(1).strip() in [line.strip() for line in ci.splitlines()]
