#!/usr/bin/env python3
"""Install the lowest versions pyproject.toml allows (every `name>=X` as `name==X`) into a fresh venv and
run tests/floors_smoke.py with it, from a directory outside the source tree: the floors we declare
must really work.

    python3 .ci/floors.py            # CI runs it before `make test`; about 40 s with a warm pip cache
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def floor_constraints() -> list[str]:
    """`name==floor` for each runtime dependency (extras dropped: constraints name distributions)."""
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    constraints = []
    for requirement in dependencies:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*>=\s*([^,;\s]+)", requirement.strip())
        if match is None:
            raise SystemExit(f"no floor to test in {requirement!r}: write it as name>=version")
        constraints.append(f"{match.group(1)}=={match.group(3)}")
    return constraints


def _same_version(a: str | None, b: str) -> bool:
    def parts(version: str) -> list[str]:
        items = version.split(".")
        while len(items) > 1 and items[-1] == "0":
            items.pop()
        return items

    return a is not None and parts(a) == parts(b)


def main() -> int:
    started = time.monotonic()
    constraints = floor_constraints()
    with tempfile.TemporaryDirectory(prefix="tlso-floors-") as tmp:
        work = Path(tmp)
        (work / "constraints.txt").write_text("\n".join(constraints) + "\n")
        subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True)
        python = str(work / "venv" / "bin" / "python")
        pip = [python, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
        subprocess.run([*pip, "install", "-c", str(work / "constraints.txt"), str(ROOT)], check=True)
        installed = subprocess.run([*pip, "freeze"], check=True, capture_output=True, text=True).stdout
        wanted = {c.split("==")[0].lower().replace("_", "-"): c.split("==")[1] for c in constraints}
        versions = {}
        for line in installed.splitlines():
            name, _, version = line.partition("==")
            versions[name.lower().replace("_", "-")] = version
        wrong = {
            name: versions.get(name) for name, floor in wanted.items() if not _same_version(versions.get(name), floor)
        }
        if wrong:
            raise SystemExit(f"floors not installed as pinned: {wrong}")
        print("floors installed: " + ", ".join(constraints))
        subprocess.run([python, str(ROOT / "tests" / "floors_smoke.py")], check=True, cwd=work)
    print(f"floors smoke test passed in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
