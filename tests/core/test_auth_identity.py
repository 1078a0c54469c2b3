"""Who the caller is, across channels: the identity headers' encoding, one person key for every
comparison of people, and identity strings held to the text rules of every other input (no 500s).

Each person named by the security review (`josé`, `Zoë`, `müller`, `ALİCE`) is tried through the real
API in both directions: an integration asks for them and they decide themselves, and the other way round.
"""

# ruff: noqa: RUF001 (look-alike characters are what this file is about)

from __future__ import annotations

import itertools
import json
import time
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jws
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from app.core.db import transaction, utcnow
from app.core.devidp import DevIdentityProvider
from app.overrides.models import Vote
from tests.core.test_person import VARIANTS
from tests.helpers import COMMENT, act, assert_problem, audit_rows, counts

Headers = dict[str, str | bytes]

# (how the integration spells the person, how their own token does)
PEOPLE = [("josé", "josé"), ("Zoë", "zoë"), ("müller", "MÜLLER"), ("ALİCE", "alice")]
# How an integration may send a header value: percent-encoded UTF-8 (portable), or raw UTF-8 bytes.
ENCODINGS = {"percent": lambda text: quote(text, safe=""), "utf-8": lambda text: text.encode()}
_domains = itertools.count(1)


def _request(**fields: Any) -> dict[str, Any]:
    return {
        "destination": f"d{next(_domains)}.example",
        "policy": "encrypt",
        "justification": "Recipient TLSA records are stale after a certificate renewal.",
        **fields,
    }


def _token(idp: DevIdentityProvider, **claims: Any) -> dict[str, str]:
    """A validly signed token with these claims (None leaves one out)."""
    now = int(time.time())
    values = {"iss": idp.issuer, "aud": idp.audience, "sub": "alice", "roles": ["requester"], "nbf": now}
    values |= {"iat": now, "exp": now + 600, **claims}
    body = {key: value for key, value in values.items() if value is not None}
    # JSON with escapes (json.dumps' default): a lone surrogate can travel in a token only so.
    token = jws.serialize_compact({"alg": "ES256", "kid": idp.key.kid}, json.dumps(body).encode(), idp.key)
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def bot(idp: DevIdentityProvider) -> Any:
    """`bot(person, encoding)` → headers of the ticketing integration acting for `person`."""

    def make(person: str | bytes, encoding: str = "percent", **extra: str | bytes) -> Headers:
        headers: Headers = _token(idp, sub="bot", roles=["integration"], client_id="ticketing")
        headers["X-On-Behalf-Of"] = ENCODINGS[encoding](person) if isinstance(person, str) else person
        return headers | extra

    return make


@pytest.fixture
def user(idp: DevIdentityProvider) -> Any:
    """`user(sub, *roles)` → headers of a person calling with their own token."""

    def make(sub: str, *roles: str) -> dict[str, str]:
        return _token(idp, sub=sub, name=sub, roles=list(roles))

    return make


# ---------------------------------------------------------------------------------------------------------------
# One person, two channels: nobody decides on their own request


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(("integration_spelling", "own_spelling"), PEOPLE)
def test_asked_through_an_integration_decided_by_the_same_person(
    client: Any, engine: Engine, bot: Any, user: Any, integration_spelling: str, own_spelling: str, encoding: str
) -> None:
    created = client.post("/v1/overrides", json=_request(), headers=bot(integration_spelling, encoding))
    assert created.status_code == 201, created.text
    assert created.json()["requested_by"] == integration_spelling  # stored as given, not as Latin-1 mojibake
    override_id = created.json()["id"]
    before = counts(engine)
    for action in ("approve", "reject"):
        assert_problem(act(client, override_id, action, user(own_spelling, "approver")), 403)
    assert counts(engine)["vote"] == before["vote"]
    refusals = [row for row in audit_rows(engine, "auth.refused") if row["override_id"] == override_id]
    assert [row["actor"] for row in refusals] == [own_spelling, own_spelling]
    # ...and it is their own request: they see it and may withdraw it.
    mine = client.get("/v1/overrides", headers=user(own_spelling, "requester")).json()["items"]
    assert [item["id"] for item in mine] == [override_id]
    assert act(client, override_id, "cancel", user(own_spelling, "requester")).status_code == 200


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize(("integration_spelling", "own_spelling"), PEOPLE)
def test_asked_directly_decided_through_an_integration_for_the_same_person(
    client: Any, engine: Engine, bot: Any, user: Any, integration_spelling: str, own_spelling: str, encoding: str
) -> None:
    created = client.post("/v1/overrides", json=_request(), headers=user(own_spelling, "requester"))
    assert created.status_code == 201, created.text
    override_id = created.json()["id"]
    before = counts(engine)
    for action in ("approve", "reject"):
        assert_problem(act(client, override_id, action, bot(integration_spelling, encoding)), 403)
    assert counts(engine)["vote"] == before["vote"]
    mine = client.get("/v1/overrides", headers=bot(integration_spelling, encoding)).json()["items"]
    assert [item["id"] for item in mine] == [override_id]  # the integration sees it as that person's


def test_an_extension_is_not_approved_by_whoever_asked_for_it(client: Any, bot: Any, user: Any) -> None:
    override_id = client.post("/v1/overrides", json=_request(), headers=bot("alice")).json()["id"]  # the bot's to see
    assert act(client, override_id, "approve", user("bob", "approver")).status_code == 200
    asked = act(client, override_id, "extend", user("Zoë", "admin"), duration="P1D")  # an admin asks for more
    assert asked.status_code == 200, asked.text
    assert_problem(act(client, override_id, "approve", bot("ZOË")), 403)  # the admin, through the bot
    assert_problem(act(client, override_id, "approve", bot("ALİCE")), 403)  # the owner
    extended = act(client, override_id, "approve", user("bob", "approver"))
    assert extended.status_code == 200 and extended.json()["pending_extension"] is None, extended.text


def test_one_vote_per_person_and_round_whatever_the_spelling(client: Any, bot: Any, user: Any) -> None:
    override_id = client.post("/v1/overrides", json=_request(policy="none"), headers=bot("alice"))
    override_id = override_id.json()["id"]  # `none` needs two approvals; submitted through the bot: it sees it
    assert act(client, override_id, "approve", user("Zoë", "approver")).status_code == 200
    assert_problem(act(client, override_id, "approve", bot("ZOE\u0308")), 409)  # zoë again, through the bot
    assert_problem(act(client, override_id, "approve", user("ｚｏë", "approver")), 409)


def test_the_database_keeps_one_vote_per_person_and_round(client: Any, engine: Engine, user: Any) -> None:
    """The unique constraint is on the key: a race between two spellings of one reviewer has one winner."""
    override_id = client.post("/v1/overrides", json=_request(), headers=user("alice", "requester")).json()["id"]
    vote = {"override_id": override_id, "round": 0, "reviewer_key": "zoe", "decision": "approve", "comment": "ok"}
    with transaction(engine) as session:
        session.add(Vote(**vote, reviewer="Zoë", reviewer_name="Zoë", created_at=utcnow()))
    with pytest.raises(IntegrityError), transaction(engine) as session:
        session.add(Vote(**vote, reviewer="ZOË", reviewer_name="ZOË", created_at=utcnow()))
        session.flush()


def test_the_requester_filter_and_visibility_use_the_key(client: Any, bot: Any, user: Any) -> None:
    mine = client.post("/v1/overrides", json=_request(), headers=bot("ALİCE")).json()["id"]
    client.post("/v1/overrides", json=_request(), headers=user("bob", "requester"))
    for spelling in ("alice", "ALİCE", "ali\u200dce", "ＡＬＩＣＥ"):
        found = client.get("/v1/overrides", params={"requester": spelling}, headers=user("erin", "auditor"))
        assert [item["id"] for item in found.json()["items"]] == [mine], spelling
    assert client.get(f"/v1/overrides/{mine}", headers=user("Alice", "requester")).status_code == 200
    assert_problem(client.get(f"/v1/overrides/{mine}", headers=user("alicia", "requester")), 404)


# ---------------------------------------------------------------------------------------------------------------
# The same, for generated names and their variants (tests/core/test_person.py has the pure property)

PLAIN = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzäöüéèçñøßıİ"), min_size=2, max_size=8)


@pytest.mark.parametrize("backend", ["sqlite"])
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(st.data())
def test_no_variant_decides_on_its_own_request_through_the_api(
    client: Any, engine: Engine, bot: Any, user: Any, data: st.DataObject
) -> None:
    name = data.draw(PLAIN.filter(lambda n: n.strip()))
    variant = name
    for step in data.draw(st.lists(st.sampled_from(sorted(VARIANTS)), min_size=1, max_size=3)):
        variant = VARIANTS[step](variant, data.draw)
    asker, decider = data.draw(st.permutations([name, variant]))
    through_bot = data.draw(st.booleans())  # who asks through the integration: the asker or the decider
    asked = client.post(
        "/v1/overrides", json=_request(), headers=bot(asker) if through_bot else user(asker, "requester")
    )
    if asked.status_code != 201:  # an identity the API refuses (an invisible character): nothing to decide on
        assert asked.status_code in (401, 422), asked.text
        return
    votes = counts(engine)["vote"]
    decided = act(client, asked.json()["id"], "approve", user(decider, "approver") if through_bot else bot(decider))
    assert decided.status_code in (401, 403, 422), (asker, decider, decided.text)
    assert counts(engine)["vote"] == votes


# ---------------------------------------------------------------------------------------------------------------
# Reserved names and the header encoding


@pytest.mark.parametrize("backend", ["sqlite"])  # refused before any database work
@pytest.mark.parametrize("spelling", ["system", "System", "ｓｙｓｔｅｍ", " system", "sys\u200dtem", "SYSTEM\ufe0f"])
def test_system_is_nobody_s_name_in_any_spelling(
    client: Any, bot: Any, idp: DevIdentityProvider, spelling: str
) -> None:
    assert_problem(client.get("/v1/overrides", headers=bot(spelling)), 422, field="header.X-On-Behalf-Of")
    body = assert_problem(client.get("/v1/overrides", headers=_token(idp, sub=spelling)), 401)
    assert "reserved" in body["detail"]


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("jos%C3%A9", "josé"),
        ("jos%c3%a9", "josé"),  # hex digits in either case
        ("jos\u00c3\u00a9", "josé"),  # raw UTF-8 bytes, as Starlette hands them on (Latin-1)
        ("100%25 ops", "100% ops"),
        ("%E5%BC%A0%E4%BC%9F", "张伟"),
        ("  padded  ", "padded"),
    ],
)
def test_identity_headers_are_utf8_percent_encoded_or_raw(client: Any, bot: Any, sent: str, stored: str) -> None:
    raw = sent.encode("latin-1")
    response = client.post("/v1/overrides", json=_request(), headers=bot(raw, **{"X-On-Behalf-Of-Name": raw}))
    assert response.status_code == 201, response.text
    assert (response.json()["requested_by"], response.json()["requested_by_name"]) == (stored, stored)


BAD_HEADERS = {
    "Latin-1, not UTF-8": b"jos\xe9",
    "percent-encoded Latin-1": b"jos%E9",
    "a truncated sequence": b"jos%C3",
    "an overlong encoding": b"%C0%AF",
    "an encoded surrogate": b"%ED%A0%80",
    "a lone %": b"100%",
    "% without hex digits": b"%zz",
    "NUL": b"al%00ice",
    "a C0 control": b"al%1Bice",
    "DEL": b"al%7Fice",
    "a C1 control (raw)": b"al\xc2\x85ice",
    "a C1 control (percent)": b"al%C2%9Bice",
    "a line separator": b"al%E2%80%A8ice",
    "zero width space": b"al%E2%80%8Bice",
    "right-to-left override": b"%E2%80%AEecila",
    "a bidi isolate": b"alice%E2%81%A6",
    "BOM": b"%EF%BB%BFalice",
    "only blanks": b"%20%20",
    "only marks": b"%CC%81%CC%88",
    "201 characters": b"x" * 201,
}


# A display name of marks only names nobody, but it shows something: accepted in X-On-Behalf-Of-Name.
BAD_HEADER_CASES = [
    (header, why, value)
    for header in ("X-On-Behalf-Of", "X-On-Behalf-Of-Name")
    for why, value in BAD_HEADERS.items()
    if not (header == "X-On-Behalf-Of-Name" and why == "only marks")
]


def test_an_identity_header_that_does_not_decode_is_a_422_naming_it(
    live_server: Any, engine: Engine, bot: Any, subtests: Any
) -> None:
    """Through a real server: the test client re-encodes header bytes that are not UTF-8."""
    import httpx

    before = counts(engine)
    with httpx.Client(base_url=live_server.url) as http:
        for header, why, value in BAD_HEADER_CASES:
            with subtests.test(header=header, why=why):
                response = http.post("/v1/overrides", json=_request(), headers=bot("alice") | {header: value})
                body = assert_problem(response, 422, field=f"header.{header}")
                assert header in body["errors"][0]["message"]
    assert counts(engine) == before


@pytest.mark.parametrize("backend", ["sqlite"])
def test_an_identity_header_is_sent_once(client: Any, idp: DevIdentityProvider) -> None:
    headers = [(k, v) for k, v in _token(idp, sub="bot", roles=["integration"]).items()]
    for header in ("X-On-Behalf-Of", "X-On-Behalf-Of-Name"):
        twice = [*headers, ("X-On-Behalf-Of", "alice"), (header, "bob"), (header, "carol")]
        assert_problem(client.get("/v1/overrides", headers=twice), 422, field=f"header.{header}")


def test_raw_utf8_reaches_a_real_server_intact(live_server: Any, bot: Any) -> None:
    """Through uvicorn's HTTP parser, not only the test client: raw UTF-8 bytes and percent-encoding."""
    import httpx

    for encoding in ENCODINGS:
        response = httpx.post(f"{live_server.url}/v1/overrides", json=_request(), headers=bot("Zoë Müller", encoding))
        assert response.status_code == 201, response.text
        assert response.json()["requested_by"] == "Zoë Müller"


def test_the_headers_are_documented_on_every_authenticated_route(client: Any) -> None:
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if not operation.get("security") and not any(
                p["name"] == "Authorization" for p in operation.get("parameters", [])
            ):
                continue
            headers = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "header"}
            assert {"X-On-Behalf-Of", "X-On-Behalf-Of-Name"} <= set(headers), (method, path)
            assert "percent-encoded" in headers["X-On-Behalf-Of"]["description"]


# ---------------------------------------------------------------------------------------------------------------
# No 500s from any caller


@pytest.mark.parametrize("path_id", ["%C2%B2", "%E2%91%A0", "99999999999", "0", "-1", "1e3"])
def test_a_refused_header_on_any_path_id_is_a_403_on_record(
    client: Any, engine: Engine, idp: DevIdentityProvider, path_id: str
) -> None:
    """X-On-Behalf-Of from a non-integration is refused and recorded, whatever the path's id looks like
    (`²` and `①` are digits to str.isdigit, 99999999999 is beyond PostgreSQL's integer)."""
    headers = _token(idp, sub="bob", roles=["approver"]) | {"X-On-Behalf-Of": "carol"}
    assert_problem(client.post(f"/v1/overrides/{path_id}/approve", json=COMMENT, headers=headers), 403)
    [refused] = audit_rows(engine, "auth.refused")
    assert refused["actor"] == "bob" and refused["override_id"] is None


def test_a_refused_header_is_recorded_as_sent(client: Any, engine: Engine, idp: DevIdentityProvider) -> None:
    for value in (b"jos%C3%A9", b"al%00ice", b"al\xc2\x85ice"):
        headers = _token(idp, sub="bob", roles=["approver"]) | {"X-On-Behalf-Of": value}
        assert_problem(client.post("/v1/overrides", json=_request(), headers=headers), 403)
    with engine.connect() as conn:
        recorded = conn.execute(sa.text("SELECT after FROM audit_event WHERE action = 'auth.refused' ORDER BY seq"))
        after = [row[0] if isinstance(row[0], dict) else json.loads(row[0]) for row in recorded]
    assert [a["on_behalf_of"] for a in after] == ["josé", "al%00ice", "al%C2%85ice"]


BAD_CLAIMS = {
    "sub with NUL": {"sub": "al\x00ice"},
    "sub with a C0 control": {"sub": "al\x1bice"},
    "sub with a C1 control": {"sub": "al\x85ice"},
    "sub with DEL": {"sub": "al\x7fice"},
    "sub with a line break": {"sub": "alice\nadmin"},
    "sub with a zero width space": {"sub": "al\u200bice"},
    "sub with a bidi override": {"sub": "\u202eecila"},
    "sub with a lone surrogate": {"sub": "al\ud800ice"},
    "sub not a string": {"sub": 42},
    "sub empty": {"sub": ""},
    "sub blank": {"sub": "   "},
    "sub of marks only": {"sub": "\u0301\u0308"},
    "sub too long": {"sub": "x" * 201},
    "name with NUL": {"name": "Al\x00ice"},
    "name with a C1 control": {"name": "Al\x9bice"},
    "name not a string": {"name": ["Alice"]},
    "preferred_username with NUL": {"preferred_username": "al\x00ice"},
    "client_id with NUL": {"client_id": "tick\x00eting"},
    "azp with a C1 control": {"azp": "tick\x85eting"},
}


@pytest.mark.parametrize("claims", BAD_CLAIMS.values(), ids=list(BAD_CLAIMS))
def test_a_token_with_an_unusable_identity_is_a_401_that_says_why(
    client: Any, engine: Engine, idp: DevIdentityProvider, claims: dict[str, Any]
) -> None:
    before = counts(engine)
    response = client.post("/v1/overrides", json=_request(), headers=_token(idp, **claims))
    body = assert_problem(response, 401)
    claim = next(iter(claims))
    assert claim in body["detail"] or ("subject" in body["detail"] and claim == "sub"), body
    assert counts(engine) == before


def test_identity_strings_are_stored_as_given_and_compared_by_key(client: Any, engine: Engine, bot: Any) -> None:
    created = client.post(
        "/v1/overrides", json=_request(), headers=bot("Ｚｏë", **{"X-On-Behalf-Of-Name": "Zo%C3%AB M%C3%BCller"})
    )
    assert created.status_code == 201, created.text
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT requested_by, requested_by_key, requested_by_name FROM override")).one()
    assert tuple(row) == ("Ｚｏë", "zoe", "Zoë Müller")
