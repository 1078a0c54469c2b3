"""tlsoverride: temporary, approved, audited mailcow TLS policy overrides."""

__version__ = "0.1.0"
