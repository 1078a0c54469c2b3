"""deploy/compose.yaml: valid against the Compose specification (the docker client here has no compose
plugin and no engine, so the schema stands in for `docker compose config`), and it says what operators
rely on: migrations before anything else, two API replicas and two workers sharing one metrics
directory, secrets as files, non-root, probes on /healthz and /readyz, only settings that exist."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
APP_SERVICES = ("migrate", "api", "worker")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return document


def test_the_file_follows_the_compose_specification() -> None:
    # check-jsonschema (test extra) ships the Compose specification's schema.
    beside = Path(sys.executable).parent / "check-jsonschema"
    tool = str(beside) if beside.exists() else shutil.which("check-jsonschema")
    assert tool, "check-jsonschema is part of the test extra"
    result = subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_migrations_run_first_and_everything_waits_for_them(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["migrate"]["command"] == ["migrate"] and services["migrate"]["restart"] == "no"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker"):
        depends = services[name]["depends_on"]
        assert depends["migrate"]["condition"] == "service_completed_successfully", name
        assert depends["postgres"]["condition"] == "service_healthy", name
    assert services["postgres"]["healthcheck"]["test"][1] == "pg_isready"


def test_two_api_replicas_and_two_workers_share_one_metrics_directory(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["api"]["command"][0] == "serve" and services["worker"]["command"] == ["worker"]
    mounts = {}
    for name in ("api", "worker"):
        assert services[name]["deploy"]["replicas"] == 2, name
        directory = services[name]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
        (volume,) = [v.split(":")[0] for v in services[name]["volumes"] if v.split(":")[1] == directory]
        mounts[name] = (volume, directory)
    assert mounts["api"] == mounts["worker"] and mounts["api"][0] in compose["volumes"]


def test_the_api_probe_asks_healthz_and_readyz(compose: dict[str, Any]) -> None:
    probe = " ".join(compose["services"]["api"]["healthcheck"]["test"])
    assert "/healthz" in probe and "/readyz" in probe and ":8000" in probe


def test_secrets_are_files_and_never_environment_values(compose: dict[str, Any]) -> None:
    assert all(set(secret) == {"file"} for secret in compose["secrets"].values())
    for name, service in compose["services"].items():
        for key, value in service.get("environment", {}).items():
            assert not re.search(r"(PASSWORD|_KEY|SECRET|TOKEN)$", key), f"{name}: {key} holds a secret inline"
        for secret in service.get("secrets", []):
            assert secret in compose["secrets"], (name, secret)
    environment = compose["services"]["api"]["environment"]
    assert environment["TLSO_MAILCOW_API_KEY_FILE"].startswith("/run/secrets/")
    assert environment["PGPASSFILE"].startswith("/run/secrets/")
    assert ":" not in environment["TLSO_DATABASE_URL"].split("//", 1)[1].split("@")[0]  # no password in the URL


def test_nothing_runs_as_root(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        user = str(service.get("user", "root")).split(":")[0]
        assert user not in ("root", "0"), name
    for name in APP_SERVICES:
        assert compose["services"][name]["read_only"] is True
        assert compose["services"][name]["cap_drop"] == ["ALL"]


def test_every_setting_it_names_exists(compose: dict[str, Any]) -> None:
    """A typo in a variable name would be silently ignored by the service."""
    for name in APP_SERVICES:
        for key in compose["services"][name]["environment"]:
            if key.startswith("TLSO_"):
                assert key[5:].lower() in Settings.model_fields, f"{name}: {key} is not a setting"
