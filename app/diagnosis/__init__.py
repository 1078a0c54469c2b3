"""DANE diagnosis of recipient domains as mailcow's Postfix sees them (DNS, DNSSEC, TLSA, STARTTLS)."""

from app.diagnosis.assess import assess_request, is_clean
from app.diagnosis.config import DiagnosisConfig, InvalidDomain, normalize_domain
from app.diagnosis.engine import diagnose
from app.diagnosis.models import (
    AddressResult,
    Diagnosis,
    FailureClass,
    Finding,
    MxHost,
    PolicyOption,
    Recommendation,
    Verdict,
)
from app.diagnosis.policy import POLICY_STRENGTH
from app.mailcow.policies import TlsPolicy

__all__ = [
    "POLICY_STRENGTH",
    "AddressResult",
    "Diagnosis",
    "DiagnosisConfig",
    "FailureClass",
    "Finding",
    "InvalidDomain",
    "MxHost",
    "PolicyOption",
    "Recommendation",
    "TlsPolicy",
    "Verdict",
    "assess_request",
    "diagnose",
    "is_clean",
    "normalize_domain",
]
