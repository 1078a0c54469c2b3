"""The wheel installs anywhere: built from the sources alone, installed into a fresh virtualenv, it
migrates a database from a directory that holds no source code.

The wheel is built once per session (`installed_wheel`); tests about what it ships reuse it. To stay
fast and offline it is built without build isolation (the test extra brings setuptools) and installed
with `--no-deps` into a venv that borrows the project venv's dependencies through a `.pth` line: the
project's own editable install is not borrowed (a `.pth` path line adds a folder, it does not run the
`.pth` files inside it), so `import app` can only find the wheel.
"""

from __future__ import annotations

import os
import shutil
import site
import sqlite3
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.core.db import make_engine
from app.core.migrations import current_and_head

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class InstalledWheel:
    wheel: Path
    python: Path  # the fresh venv's interpreter

    def names(self) -> list[str]:
        with zipfile.ZipFile(self.wheel) as archive:
            return archive.namelist()

    def run(self, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
        clean = {key: value for key, value in os.environ.items() if not key.startswith(("TLSO_", "PYTHON"))}
        return subprocess.run(
            [str(self.python), *args], cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=120
        )


@pytest.fixture(scope="session")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> InstalledWheel:
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    # devtools/ (the mailcow stand-in) sits beside app/ as in the checkout: the package discovery must leave it out.
    for package in ("app", "devtools"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q"]
    built = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (work / "dist").glob("tlsoverride-*.whl")

    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    Path(purelib, "project-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    installed = subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installed.returncode == 0, installed.stderr
    return InstalledWheel(wheel=wheel, python=python)


def test_the_wheel_ships_the_migrations(installed_wheel: InstalledWheel) -> None:
    names = installed_wheel.names()
    assert "app/migrations/env.py" in names and "app/migrations/script.py.mako" in names
    versions = [ROOT / name for name in names if name.startswith("app/migrations/versions/2")]
    assert sorted(path.name for path in versions) == sorted(
        path.name for path in (ROOT / "app" / "migrations" / "versions").glob("2*.py")
    )


def test_the_installed_package_migrates_from_any_directory(installed_wheel: InstalledWheel, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = installed_wheel.run("-c", "import app; print(app.__file__)", cwd=elsewhere)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(installed_wheel.python.parents[1]), where.stdout

    database = tmp_path / "db" / "installed.db"
    result = installed_wheel.run(
        "-m", "app", "migrate", cwd=elsewhere, TLSO_ENV="test", TLSO_DATABASE_URL=f"sqlite:///{database}"
    )
    assert result.returncode == 0, result.stderr
    engine = make_engine(f"sqlite:///{database}")
    try:
        current, head = current_and_head(engine)
    finally:
        engine.dispose()
    assert current == head is not None and head in result.stdout
    with sqlite3.connect(database) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"override", "vote", "audit_event"} <= tables


def test_the_wheel_ships_no_test_double(installed_wheel: InstalledWheel) -> None:
    """The mailcow stand-in is a development tool: no module of the product is, or holds, a copy of it."""
    names = installed_wheel.names()
    assert not [name for name in names if "standin" in name or name.startswith("devtools/")], names
    with zipfile.ZipFile(installed_wheel.wheel) as archive:
        doubles = [name for name in names if name.endswith(".py") and b"class MailcowStandin" in archive.read(name)]
    assert doubles == []


def test_dev_mode_without_the_stand_in_says_why(installed_wheel: InstalledWheel, tmp_path: Path) -> None:
    """Installed from the wheel, dev mode has no stand-in to talk to: it stops with a reason, not a traceback."""
    result = installed_wheel.run(
        "-m", "app", "dev", "--port", "9", cwd=tmp_path, TLSO_DATABASE_URL=f"sqlite:///{tmp_path / 'dev.db'}"
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "stand-in" in result.stderr and "TLSO_MAILCOW_URL" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "dev.db").exists()
