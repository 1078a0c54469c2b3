"""app.diagnosis.certs on certificates made here (tests/lab/pki.py): no network."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from app.diagnosis.certs import pkix_check
from tests.lab.pki import Issued, issue


def bundle(tmp_path: Path, *cas: Issued) -> str:
    path = tmp_path / "bundle.pem"
    path.write_bytes(b"".join(ca.cert.public_bytes(serialization.Encoding.PEM) for ca in cas))
    return str(path)


def test_pkix_error_names_each_candidate_with_its_own_error(tmp_path: Path) -> None:
    ca_file = bundle(tmp_path, issue("lab CA", ca=True))
    self_signed = issue("mx.example.test")
    result = pkix_check([self_signed.cert], ["mx.example.test", "example.test"], ca_file)
    assert result.names == [] and result.error is not None
    # The MX host name's own problem first (what `verify` checks), not only the recipient domain's
    # "no matching subjectAltName".
    host_part, domain_part = result.error.split("; ")
    assert host_part.startswith("mx.example.test: ") and "self-signed" in host_part
    assert domain_part.startswith("example.test: ") and "subjectAltName" in domain_part
    assert "encountered processing" not in result.error


def test_pkix_error_groups_names_that_fail_alike(tmp_path: Path) -> None:
    ca = issue("lab CA", ca=True)
    now = datetime.now(UTC)
    expired = issue("mx.example.test", issuer=ca, not_before=now - timedelta(days=9), not_after=now - timedelta(days=1))
    result = pkix_check([expired.cert], ["mx.example.test", "alias.example.test"], bundle(tmp_path, ca))
    assert result.error is not None and result.error.count("not valid at validation time") == 1
    assert result.error.startswith("mx.example.test, alias.example.test: ")


def test_pkix_names_that_pass_leave_no_error(tmp_path: Path) -> None:
    ca = issue("lab CA", ca=True)
    leaf = issue("mx.example.test", issuer=ca)
    result = pkix_check([leaf.cert], ["example.test", "mx.example.test"], bundle(tmp_path, ca))
    assert (result.names, result.error) == (["mx.example.test"], None)
