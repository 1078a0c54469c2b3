"""Signed checkpoints anchor the audit trail outside its table: a trail cut short, or rewritten and
re-hashed by someone who knows the algorithm, is caught — offline in an export, and in the database."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from app.audit.chain import as_dict, chain_hash
from app.audit.checkpoints import write_checkpoint
from app.audit.export import to_csv_rows
from app.audit.models import GENESIS_HASH, AuditEvent, AuditHead
from app.audit.service import record, verify_chain
from app.audit.signing import Checkpoint, Signer, generate_private_pem, load_private_key, signer_from
from app.cli import main as cli_main
from app.core.db import transaction, utcnow
from app.core.logs import JsonFormatter
from tests.helpers import AUDIT_SIGNING_KEY, act, assert_problem, audit_keys, make_settings

ROOT = Path(__file__).resolve().parents[2]


def _signer() -> Signer:
    signer = signer_from(make_settings())
    assert signer is not None
    return signer


PUBLIC_KEY = _signer().public.encoded()


@dataclass
class History:
    """Eight rows: 1-3 (override created, vote, approved), 4 checkpoint of 3, 5-6 (another created and
    cancelled), 7 checkpoint of 6, 8 (a third created: the unsigned tail)."""

    first: Checkpoint
    second: Checkpoint
    log_lines: list[str]  # the checkpoints as the JSON log published them


@pytest.fixture
def history(client: Any, engine: Engine, auth: Any, make_override: Any, caplog: pytest.LogCaptureFixture) -> History:
    signer = _signer()
    caplog.set_level(logging.INFO, logger="app.audit.checkpoint")
    one = make_override()
    assert act(client, one["id"], "approve", auth("bob", "approver")).status_code == 200
    first = write_checkpoint(engine, signer)
    two = make_override(destination="example.net")
    assert act(client, two["id"], "cancel", auth("alice", "requester")).status_code == 200
    second = write_checkpoint(engine, signer)
    make_override(destination="example.com")
    assert first is not None and second is not None
    lines = [JsonFormatter().format(r) for r in caplog.records if r.name == "app.audit.checkpoint"]
    return History(first, second, lines)


def _export(client: Any, auth: Any, fmt: str = "jsonl") -> str:
    response = client.get("/v1/audit/export", params={"format": fmt}, headers=auth("erin", "auditor"))
    assert response.status_code == 200
    return str(response.text)


def _events(client: Any, auth: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _export(client, auth).splitlines()]


def _write(path: Path, events: list[dict[str, Any]], fmt: str = "jsonl") -> Path:
    if fmt == "csv":
        path.write_text("".join(to_csv_rows(events)), encoding="utf-8", newline="")
    else:
        path.write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    return path


def _rehash(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a forger who knows the algorithm does after an edit: renumber and recompute every hash."""
    result, prev = [], GENESIS_HASH
    for seq, event in enumerate(events, 1):
        event = {**event, "seq": seq, "prev_hash": prev}
        event["hash"] = prev = chain_hash(prev, event)
        result.append(event)
    return result


def _verify(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = cli_main(["audit", "verify", *args])
    out = capsys.readouterr().out
    return code, json.loads(out)


# ---------------------------------------------------------------------------------------------------------------
# Making and publishing checkpoints


def test_a_checkpoint_signs_the_row_before_it_and_is_published(
    engine: Engine, history: History, client: Any, auth: Any
) -> None:
    events = _events(client, auth)
    assert [(e["seq"], e["action"], e["actor"]) for e in events if e["action"] == "audit.checkpoint"] == [
        (4, "audit.checkpoint", "system"),
        (7, "audit.checkpoint", "system"),
    ]
    for checkpoint, event in ((history.first, events[3]), (history.second, events[6])):
        assert event["after"] == checkpoint.model_dump()
        assert (checkpoint.seq, checkpoint.hash) == (event["seq"] - 1, event["prev_hash"])
        assert checkpoint.key_id == _signer().public.key_id and _signer().public.verifies(checkpoint)
    # The log carries each one as a structured field, whatever else the line says.
    published = [json.loads(line) for line in history.log_lines]
    assert [Checkpoint.model_validate(p["checkpoint"]) for p in published] == [history.first, history.second]
    assert all(p["message"].startswith("audit.checkpoint {") for p in published)
    with Session(engine) as session:
        head = session.get(AuditHead, 1)
        assert head is not None and (head.seq, head.checkpoint_seq) == (8, 7)
    # Nothing new since the last one: no checkpoint of a checkpoint.
    write_checkpoint(engine, _signer())
    assert write_checkpoint(engine, _signer()) is None
    assert [e["seq"] for e in _events(client, auth) if e["action"] == "audit.checkpoint"] == [4, 7, 9]


def test_the_signing_key_is_never_shown(engine: Engine, history: History, client: Any, auth: Any) -> None:
    signer = _signer()
    assert AUDIT_SIGNING_KEY not in repr(signer) and AUDIT_SIGNING_KEY not in "".join(history.log_lines)
    assert AUDIT_SIGNING_KEY not in _export(client, auth)
    keys = client.get("/v1/audit/public-keys", headers=auth("erin", "auditor"))
    assert keys.status_code == 200
    assert keys.json() == {"keys": [{"key_id": signer.public.key_id, "algorithm": "Ed25519", "public_key": PUBLIC_KEY}]}
    assert AUDIT_SIGNING_KEY not in keys.text
    assert_problem(client.get("/v1/audit/public-keys", headers=auth("alice", "requester")), 403)


def test_keys_as_pem_or_base64_and_bad_keys_are_refused_without_quoting_them() -> None:
    pem = generate_private_pem().decode()
    assert Signer(load_private_key(pem)).public.key_id != _signer().public.key_id
    for bad in ("not a key", "c2hvcnQ=", pem.replace("PRIVATE KEY", "PUBLIC KEY")):
        with pytest.raises(ValueError) as caught:
            load_private_key(bad)
        assert bad not in str(caught.value)


# ---------------------------------------------------------------------------------------------------------------
# Offline: an export verified with the public key


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_untampered_export_verifies_up_to_its_last_checkpoint(
    client: Any, auth: Any, history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    path = tmp_path / f"audit.{fmt}"
    path.write_text(_export(client, auth, fmt), encoding="utf-8", newline="")
    published = tmp_path / "published.log"
    published.write_text("\n".join(history.log_lines) + "\n")
    code, result = _verify(capsys, "--file", str(path), "--public-key", PUBLIC_KEY, "--checkpoint", str(published))
    assert (code, result) == (
        0,
        {"valid": True, "checked": 8, "first_broken": None, "reason": None, "checkpoints": 4, "anchored_through": 6},
    )


def test_cutting_rows_off_the_end_is_caught_against_a_published_checkpoint(
    client: Any, auth: Any, history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cut = _write(tmp_path / "cut.jsonl", _events(client, auth)[:5])  # rows 6-8 gone, the second checkpoint too
    # The export alone cannot show it: it is valid up to its own last checkpoint, and says how far that is.
    code, result = _verify(capsys, "--file", str(cut), "--public-key", PUBLIC_KEY)
    assert (code, result["valid"], result["checked"], result["anchored_through"]) == (0, True, 5, 3)
    # The checkpoint the log (or a webhook) published says the trail went on.
    for given in (history.log_lines[1], history.second.model_dump_json()):
        code, result = _verify(capsys, "--file", str(cut), "--public-key", PUBLIC_KEY, "--checkpoint", given)
        assert (code, result["valid"], result["first_broken"]) == (1, False, 6)
        assert result["reason"].startswith("rows were cut off the end: the trail ends at seq 5")
        assert "covers seq 6" in result["reason"]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_an_edited_and_rehashed_export_is_caught_by_the_next_checkpoint(
    client: Any, auth: Any, history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    events = _events(client, auth)
    events[4]["comment"] = "approved by the CEO"  # row 5, between the two checkpoints
    forged = _write(tmp_path / f"forged.{fmt}", _rehash(events), fmt)
    code, result = _verify(capsys, "--file", str(forged), "--public-key", PUBLIC_KEY)
    assert (code, result["valid"], result["first_broken"], result["anchored_through"]) == (1, False, 4, 3)
    assert result["reason"] == (
        "the trail was rewritten after seq 3 and re-hashed: the hash of seq 6 differs from the one signed in "
        "the checkpoint at seq 7"
    )
    events = _events(client, auth)
    events[0]["actor"] = "mallory"  # before the first checkpoint
    code, result = _verify(
        capsys, "--file", str(_write(tmp_path / "early.jsonl", _rehash(events))), "--public-key", PUBLIC_KEY
    )
    assert (code, result["first_broken"], result["anchored_through"]) == (1, 1, None)
    assert result["reason"].startswith("the trail was rewritten and re-hashed: the hash of seq 3 differs")


def test_a_rewrite_that_drops_the_checkpoints_is_caught_by_the_published_ones(
    client: Any, auth: Any, history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = [e for e in _events(client, auth) if e["action"] != "audit.checkpoint"]
    events[3]["comment"] = "never cancelled"  # the second override's creation
    forged = _write(tmp_path / "forged.jsonl", _rehash(events))
    code, result = _verify(capsys, "--file", str(forged), "--public-key", PUBLIC_KEY)
    assert (code, result["valid"], result["checkpoints"], result["anchored_through"]) == (0, True, 0, None)
    published = tmp_path / "published.log"
    published.write_text("\n".join(history.log_lines) + "\n")
    code, result = _verify(capsys, "--file", str(forged), "--public-key", PUBLIC_KEY, "--checkpoint", str(published))
    assert (code, result["valid"], result["first_broken"]) == (1, False, 4)
    assert result["reason"].startswith("the trail was rewritten after seq 3 and re-hashed: the hash of seq 6 differs")


def test_a_forged_checkpoint_is_caught(
    client: Any, auth: Any, history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def forge(sign: Any) -> Path:
        events = _events(client, auth)
        events[4]["comment"] = "approved by the CEO"
        events = _rehash(events)
        events[6]["after"] = sign(events[5]).model_dump()  # the checkpoint made to fit the new hash of seq 6
        return _write(tmp_path / "forged.jsonl", _rehash(events))

    # The old signature over the new hash; a key of the forger's own; the forger's key under our key id.
    mallory = Signer(load_private_key(generate_private_pem().decode()))
    cases = {
        "has a bad signature": lambda e: history.second.model_copy(update={"hash": e["hash"]}),
        "which is not a trusted key": lambda e: mallory.sign(e["seq"], e["hash"], utcnow()),
        "has a bad signature (key": lambda e: mallory.sign(e["seq"], e["hash"], utcnow()).model_copy(
            update={"key_id": history.second.key_id}
        ),
    }
    for reason, sign in cases.items():
        code, result = _verify(capsys, "--file", str(forge(sign)), "--public-key", PUBLIC_KEY)
        assert (code, result["valid"], result["first_broken"]) == (1, False, 7), result
        assert result["reason"].startswith("the checkpoint at seq 7 ") and reason in result["reason"]


def test_checkpoints_by_an_untrusted_key_are_not_accepted(
    client: Any, auth: Any, history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = _write(tmp_path / "audit.jsonl", _events(client, auth))
    other = Signer(load_private_key(generate_private_pem().decode())).public.encoded()
    code, result = _verify(capsys, "--file", str(export), "--public-key", other)
    assert (code, result["first_broken"]) == (1, 4)
    assert "is signed by key" in result["reason"] and "which is not a trusted key" in result["reason"]


def test_garbage_is_named_by_its_line_never_a_traceback(
    client: Any, auth: Any, history: History, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = _export(client, auth).splitlines(keepends=True)
    cases: dict[str, tuple[bytes, str]] = {
        "notjson.jsonl": ("".join([*lines[:2], "{not json\n", *lines[2:]]).encode(), "line 3: not JSON"),
        "array.jsonl": ("".join([*lines[:4], "[1, 2]\n", *lines[4:]]).encode(), "line 5: not a JSON object"),
        "latin1.jsonl": ("".join(lines[:1]).encode() + '{"actor": "müller"}\n'.encode("latin-1"), "line 2: not UTF-8"),
    }
    csv_text = _export(client, auth, "csv")
    csv_lines = csv_text.splitlines(keepends=True)
    cases["short.csv"] = (
        "".join([*csv_lines[:3], "1,2,3\r\n", *csv_lines[3:]]).encode(),
        "line 4: 3 fields, expected 11",
    )
    cases["header.csv"] = (b"seq,when\r\n" + "".join(csv_lines[1:]).encode(), "line 1: the header must be")
    cases["seq.csv"] = (csv_text.replace("\r\n1,", "\r\none,", 1).encode(), "line 2: seq is not a number: 'one'")
    cases["nul.csv"] = ("".join([*csv_lines[:2], "2,\0\r\n"]).encode(), "line 3: ")
    for name, (content, reason) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        code, result = _verify(capsys, "--file", str(path), "--public-key", PUBLIC_KEY)
        assert (code, result["valid"]) == (1, False), (name, result)
        assert result["reason"].startswith(reason), (name, result)
    # The real command line: one JSON line on stdout, nothing on stderr.
    process = subprocess.run(
        [sys.executable, "-m", "app", "audit", "verify", "--file", str(tmp_path / "notjson.jsonl")],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("TLSO_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (process.returncode, process.stderr) == (1, "")
    assert json.loads(process.stdout)["reason"].startswith("line 3: not JSON")


def test_bad_keys_and_checkpoints_on_the_command_line_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = _write(tmp_path / "audit.jsonl", [])
    for args, message in (
        (["--public-key", "bm90IGEga2V5"], "audit verify: --public-key: an Ed25519 public key is 32 bytes"),
        (["--checkpoint", "{not json"], "audit verify: --checkpoint: line 1: not JSON"),
        (["--checkpoint", '{"seq": 1}'], "audit verify: --checkpoint: line 1: holds no audit checkpoint"),
        (
            ["--checkpoint", '{"seq": 0, "hash": "x", "at": "", "key_id": "k", "signature": ""}'],
            "not a valid checkpoint",
        ),
        (["--file", str(tmp_path / "missing.jsonl")], "audit verify: cannot read"),
    ):
        assert cli_main(["audit", "verify", "--file", str(export), *args]) == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# Against the database


def _raw(engine: Engine, statement: str, **params: Any) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text(statement), params)


def _dba_disables_the_trigger(engine: Engine, backend: str) -> None:
    if backend == "postgres":  # append-only: a superuser has to switch the trigger off first
        _raw(engine, "ALTER TABLE audit_event DISABLE TRIGGER audit_event_no_update_delete")


def test_deleted_rows_and_a_rolled_back_head_are_caught_against_the_published_checkpoint(
    client: Any,
    engine: Engine,
    auth: Any,
    history: History,
    backend: str,
    database_url: str,
    tmp_path: Path,
) -> None:
    _dba_disables_the_trigger(engine, backend)
    with Session(engine) as session:
        row = session.get(AuditEvent, 4)
        assert row is not None
        kept = row.hash
    _raw(engine, "DELETE FROM audit_event WHERE seq >= 5")
    _raw(engine, "UPDATE audit_head SET seq = 4, hash = :h, checkpoint_seq = 4", h=kept)
    auditor = auth("erin", "auditor")
    alone = client.get("/v1/audit/verify", headers=auditor).json()  # the database alone cannot tell
    assert (alone["valid"], alone["checked"], alone["anchored_through"]) == (True, 4, 3)
    against = client.post("/v1/audit/verify", json={"checkpoints": [history.second.model_dump()]}, headers=auditor)
    assert against.status_code == 200, against.text
    result = against.json()
    assert (result["valid"], result["first_broken"]) == (False, 5)
    assert result["reason"].startswith("rows were cut off the end: the trail ends at seq 4")
    # The command line against the database: the published log line as given, nothing but the database URL.
    published = tmp_path / "published.log"
    published.write_text(history.log_lines[1] + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TLSO_")} | {"TLSO_DATABASE_URL": database_url}
    process = subprocess.run(
        [sys.executable, "-m", "app", "audit", "verify", "--public-key", PUBLIC_KEY, "--checkpoint", str(published)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 1, process.stderr
    assert json.loads(process.stdout)["reason"] == result["reason"]


def test_a_database_rewritten_and_rehashed_is_caught(
    client: Any, engine: Engine, auth: Any, history: History, backend: str
) -> None:
    _dba_disables_the_trigger(engine, backend)
    with Session(engine) as session:
        rows = [as_dict(e) for e in session.exec(select(AuditEvent).order_by(col(AuditEvent.seq))).all()]
    rows[1]["comment"] = "looked fine to me"
    for row in _rehash(rows):
        _raw(
            engine,
            "UPDATE audit_event SET comment = :c, prev_hash = :p, hash = :h WHERE seq = :s",
            c=row["comment"],
            p=row["prev_hash"],
            h=row["hash"],
            s=row["seq"],
        )
        _raw(engine, "UPDATE audit_head SET hash = :h", h=row["hash"])
    result = client.get("/v1/audit/verify", headers=auth("erin", "auditor")).json()
    assert (result["valid"], result["first_broken"]) == (False, 1)
    assert result["reason"].startswith("the trail was rewritten and re-hashed: the hash of seq 3 differs")


def test_posted_checkpoints_are_checked_and_bad_input_is_a_problem(client: Any, auth: Any, history: History) -> None:
    auditor = auth("erin", "auditor")
    good = client.post("/v1/audit/verify", json={"checkpoints": [history.first.model_dump()]}, headers=auditor)
    assert good.status_code == 200 and good.json()["valid"] is True and good.json()["checkpoints"] == 3
    forged = history.first.model_copy(update={"signature": history.second.signature}).model_dump()
    bad = client.post("/v1/audit/verify", json={"checkpoints": [forged]}, headers=auditor).json()
    assert (bad["valid"], bad["reason"]) == (
        False,
        f"the published checkpoint of seq 3 has a bad signature (key {history.first.key_id})",
    )
    for body in ({}, {"checkpoints": []}, {"checkpoints": [{"seq": 1}]}, {"checkpoints": [forged | {"hash": "x"}]}):
        assert_problem(client.post("/v1/audit/verify", json=body, headers=auditor), 422)
    assert_problem(client.post("/v1/audit/verify", json={"checkpoints": [forged]}, headers=auth("a", "requester")), 403)


# ---------------------------------------------------------------------------------------------------------------
# Automatic checkpoints: the worker


async def test_the_worker_signs_the_head_every_n_events_and_after_m_seconds(engine: Engine) -> None:
    from app.worker.loop import Worker

    def events(n: int) -> None:
        with transaction(engine) as session:
            for _ in range(n):
                record(session, actor="alice", action="override.commented", comment="x")

    def checkpoints() -> list[int]:
        with Session(engine) as session:
            return [e.seq for e in session.exec(select(AuditEvent).where(AuditEvent.action == "audit.checkpoint"))]

    async def tick(**settings: Any) -> None:
        worker = Worker(engine, make_settings(**settings))
        try:
            await worker.tick()
        finally:
            await worker.aclose()

    events(2)
    await tick(audit_checkpoint_every_events=3)
    assert checkpoints() == []
    events(1)
    await tick(audit_checkpoint_every_events=3)
    assert checkpoints() == [4]  # signs seq 3
    await tick(audit_checkpoint_every_events=3)
    assert checkpoints() == [4]  # nothing new
    events(1)
    await tick(audit_checkpoint_every_events=3, audit_checkpoint_interval_seconds=3600)
    assert checkpoints() == [4]
    await tick(audit_checkpoint_every_events=3, audit_checkpoint_interval_seconds=0.001)
    assert checkpoints() == [4, 6]  # the oldest unsigned row was older than the interval
    await tick(audit_checkpoint_every_events=3, audit_signing_key=None)  # no key (tests, dev without one)
    with Session(engine) as session:
        assert verify_chain(session, audit_keys()).anchored_through == 5


async def test_checkpoints_reach_every_webhook_sink_that_keeps_the_default(engine: Engine) -> None:
    import httpx

    from app.notify.service import deliver
    from tests.notify.test_service import SECRET, Receiver

    receiver = Receiver()
    with receiver.server:
        settings = make_settings(notify_webhooks={"ops": {"url": receiver.url, "secret": SECRET}})
        async with httpx.AsyncClient() as http:
            await deliver(engine, settings, http, "w1")  # the sink starts at the end of the trail
            with transaction(engine) as session:
                record(session, actor="alice", action="override.created", override_id=1, comment="c")
            checkpoint = write_checkpoint(engine, _signer())
            assert await deliver(engine, settings, http, "w1") == 2
    body = receiver.received[-1]["body"]
    assert (body["type"], body["data"]["checkpoint"]) == (
        "audit.checkpoint",
        checkpoint.model_dump() if checkpoint else None,
    )


# ---------------------------------------------------------------------------------------------------------------
# The command line: `audit checkpoint`, `audit public-key`


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("TLSO_")}
    return subprocess.run(
        [sys.executable, "-m", "app", "audit", *args],
        cwd=ROOT,
        env=base | env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_checkpoint_command_signs_logs_and_prints(engine: Engine, database_url: str, tmp_path: Path) -> None:
    with transaction(engine) as session:
        record(session, actor="alice", action="override.created", comment="c")
    key_file = tmp_path / "audit-signing.pem"
    key_file.write_bytes(generate_private_pem())
    env = {
        "TLSO_DATABASE_URL": database_url,
        "TLSO_AUDIT_SIGNING_KEY_FILE": str(key_file),
        "TLSO_LOG_LEVEL": "ERROR",  # checkpoints are logged whatever the level
    }
    made = _run("checkpoint", **env)
    assert made.returncode == 0, made.stderr
    checkpoint = Checkpoint.model_validate_json(made.stdout)
    assert (checkpoint.seq, checkpoint.key_id) == (1, Signer(load_private_key(key_file.read_text())).public.key_id)
    [line] = [json.loads(line) for line in made.stderr.splitlines() if "audit.checkpoint" in line]
    assert (line["logger"], line["checkpoint"]) == ("app.audit.checkpoint", checkpoint.model_dump())
    again = _run("checkpoint", **env, TLSO_LOG_JSON="false")  # nothing new: the same one, published again
    assert again.returncode == 0 and Checkpoint.model_validate_json(again.stdout) == checkpoint
    [plain] = [line for line in again.stderr.splitlines() if "audit.checkpoint {" in line]
    assert plain.startswith("20") and " INFO app.audit.checkpoint: " in plain  # a plain-text log line
    keys = _run("public-key", **env)
    assert keys.returncode == 0, keys.stderr
    verified = _run("verify", "--public-key", keys.stdout, "--checkpoint", plain, TLSO_DATABASE_URL=database_url)
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["checkpoints"] == 2 and json.loads(verified.stdout)["anchored_through"] == 1
    assert key_file.read_text().strip() not in made.stderr + made.stdout + keys.stdout
    refused = _run("checkpoint", TLSO_DATABASE_URL=database_url)
    assert refused.returncode == 2 and "no signing key" in refused.stderr
    broken = _run("public-key", TLSO_AUDIT_SIGNING_KEY="c2VjcmV0LWJ1dC1icm9rZW4=")
    assert broken.returncode == 2 and "invalid settings" in broken.stderr and "Traceback" not in broken.stderr
    assert "c2VjcmV0LWJ1dC1icm9rZW4=" not in broken.stderr
