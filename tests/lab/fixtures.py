"""pytest fixture for the DANE lab: `from tests.lab.fixtures import dane_lab` in a test module (or list
`tests.lab.fixtures` in the root conftest's `pytest_plugins`).

The lab is built (fresh keys and signatures) and started once per session, and stopped at the end.
Without nsd/unbound/ldnsutils the tests that use it are skipped, unless TLSO_REQUIRE_LAB=1 (CI),
where a missing or broken lab fails them loudly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.lab.lab import Lab, LabError, missing_tools

INSTALL_HINT = "see tests/lab/README.md for the apt-get line"


def lab_required() -> bool:
    return os.environ.get("TLSO_REQUIRE_LAB") == "1"


@pytest.fixture(scope="session")
def dane_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """A running lab: `.resolver` ("127.0.0.1:PORT"), `.smtp_port`, `.config(**overrides)`."""
    missing = missing_tools()
    if missing:
        reason = f"DANE lab unavailable: {', '.join(missing)} not installed ({INSTALL_HINT})"
        if lab_required():
            pytest.fail(f"{reason}; TLSO_REQUIRE_LAB=1 demands the lab", pytrace=False)
        pytest.skip(reason)
    try:
        lab = Lab.build(tmp_path_factory.mktemp("dane-lab"))
        lab.start()
    except LabError as exc:
        # The tools are there, so a lab that does not come up is a real failure, not a skip.
        pytest.fail(f"DANE lab did not start: {exc}", pytrace=False)
    try:
        yield lab
    finally:
        lab.stop()
