"""A target's TLS policy map as tlsoverride reads it: one listing indexed by id and by dest, which rows
say what an override says, and how a row of ours drifted. The rules here are the ones the worker's
reconcile job acts on and the ones `GET /v1/targets/{name}/policies` shows."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, Protocol

from app.mailcow.client import PolicyRow
from app.mailcow.dest import dest_forms, dest_key


class Claim(Protocol):
    """What one of our rows should say: an override's destination, policy and parameters, and the id of the
    row it recorded (None: none yet)."""

    @property
    def destination(self) -> str: ...

    @property
    def policy(self) -> str: ...

    @property
    def parameters(self) -> str: ...

    @property
    def mailcow_id(self) -> int | None: ...


def row_dict(row: PolicyRow) -> dict[str, Any]:
    return dataclasses.asdict(row)


def is_our_content(row: PolicyRow, destination: str, policy: str, parameters: str) -> bool:
    """The row says what the override says (dest, policy, parameters); `active` is checked separately."""
    return dest_key(row.dest) == dest_key(destination) and row.policy == policy and row.parameters == parameters


def expected_row(claim: Claim) -> dict[str, Any]:
    return {"dest": claim.destination, "policy": claim.policy, "parameters": claim.parameters, "active": 1}


class PolicyMap:
    """One listing of a target's map, indexed by id and by dest."""

    def __init__(self, rows: Iterable[PolicyRow]) -> None:
        self.rows = list(rows)
        self.by_id = {row.id: row for row in self.rows}
        self.by_dest = {dest_key(row.dest): row for row in self.rows}

    def at(self, destination: str) -> PolicyRow | None:
        """The row whose dest is `destination` (the only place tlsoverride ever puts its own rows)."""
        return self.by_dest.get(dest_key(destination))

    def holding(self, destination: str) -> PolicyRow | None:
        """The row that holds `destination`: at its dest, or else where mailcow's add put the same name typed
        with a deviation character (`straße.example` → `strasse.example`, mailcow-api.md §3)."""
        for key in dest_forms(destination):
            row = self.by_dest.get(key)
            if row is not None:
                return row
        return None


def drift_of(wanted: Claim, policy_map: PolicyMap) -> dict[str, Any] | None:
    """How an ACTIVE override's row differs from what it should be; None when it is as applied.

    kinds: `missing` (no row for the destination), `recreated` (our content under another id: someone
    re-added it), `replaced` (a row we did not write now holds the destination, in either of its forms:
    see `PolicyMap.holding`), `edited` (our row, changed by hand: the differing fields are listed).
    """
    row = policy_map.by_id.get(wanted.mailcow_id) if wanted.mailcow_id is not None else None
    if row is None:
        other = policy_map.holding(wanted.destination)
        if other is None:
            return {"kind": "missing", "expected": expected_row(wanted), "found": None}
        if is_our_content(other, wanted.destination, wanted.policy, wanted.parameters) and other.active == 1:
            return {"kind": "recreated", "expected": expected_row(wanted), "found": row_dict(other)}
        return {"kind": "replaced", "expected": expected_row(wanted), "found": row_dict(other)}
    fields = [
        name
        for name, differs in (
            ("dest", dest_key(row.dest) != dest_key(wanted.destination)),
            ("policy", row.policy != wanted.policy),
            ("parameters", row.parameters != wanted.parameters),
            ("active", row.active != 1),
        )
        if differs
    ]
    if not fields:
        return None
    return {"kind": "edited", "fields": fields, "expected": expected_row(wanted), "found": row_dict(row)}


def same_drift(old: dict[str, Any] | None, new: dict[str, Any] | None) -> bool:
    """Already reported: the same kind and the same row content (timestamps aside)."""
    if old is None or new is None:
        return old is new
    return bool(old.get("kind") == new.get("kind") and old.get("found") == new.get("found"))
