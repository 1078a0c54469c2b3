"""Input validation: destinations and parameters as Postfix and mailcow take them (shared/mailcow-api.md
§3, §8), and body shapes. Every refusal is a 422 problem naming the field, and changes nothing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from tests.helpers import assert_problem, counts, make_settings

JUSTIFICATION = "Recipient TLSA records are stale after a certificate renewal."
DIGEST = ":".join(["ab"] * 32)
LABEL63 = "a" * 63

DESTINATIONS_ACCEPTED = {
    "example.org": "example.org",
    "  Example.COM  ": "example.com",
    "example.net.": "example.net",
    "Bücher.Example": "xn--bcher-kva.example",
    "[mail.example.net]:25": "[mail.example.net]:25",
    "[Mail.Example.NET]": "[mail.example.net]",
    "mail.example.net:2525": "mail.example.net:2525",
    "192.0.2.1": "[192.0.2.1]",
    "[192.0.2.1]:2525": "[192.0.2.1]:2525",
    "[ipv6:2001:db8::1]:25": "[ipv6:2001:db8::1]:25",
    "[IPv6:2001:DB8:0:0::1]": "[ipv6:2001:db8::1]",
    # Postfix's next-hop parser takes IPv6 with and without the prefix, and looks the policy up as written
    "[2001:db8::1]:25": "[2001:db8::1]:25",
    "[2001:DB8:0:0::2]": "[2001:db8::2]",
    f"{LABEL63}.example": f"{LABEL63}.example",
}
DESTINATIONS_REFUSED = [
    ".example.org",  # mailcow's add cannot store it (unless the target says it can)
    "*.x",
    "*.wild.example",
    "user@mail.example",
    "foo bar.example",
    "foo_bar.example",
    "-bad.example",
    "example..org",
    "example.org..",
    "example",  # one label: never a next-hop domain
    "example.123",
    "",
    "   ",
    f"{'a' * 64}.example",
    "[mail.example.net]:0",
    "[mail.example.net]:65536",
    "mail.example.net:",
    "[ipv6:not-an-address]",
    "[2001:db8::zz]:25",
    "[fe80::1%eth0]",  # a zone index: not an address Postfix takes
    "2001:db8::1",  # an IPv6 next hop needs its brackets
    "2001:db8::1:25",
    "[]",
    "[mail.example.net",
    # mailcow's IDNA check counts brackets and the port: it refuses these although Postfix would not
    f"[{LABEL63}.example.net]:25",
    f"[mail.{LABEL63[:60]}]:25",
    f"[{'.'.join([LABEL63] * 3)}.{'b' * 61}]:25",  # 253-character host: too long with brackets and port
]

PARAMETERS_ACCEPTED = [
    ("encrypt", "protocols=>=TLSv1.2 ciphers=high", "protocols=>=TLSv1.2 ciphers=high"),
    ("encrypt", "protocols=>=TLSv1.2,ciphers=HIGH", "protocols=>=TLSv1.2 ciphers=high"),
    ("encrypt", "  protocols=!SSLv2:!SSLv3  ", "protocols=!SSLv2:!SSLv3"),
    ("encrypt", "protocols=>=TLSv1.2:<=TLSv1.3", "protocols=>=TLSv1.2:<=TLSv1.3"),
    ("encrypt", "ciphers=high\tprotocols=>=TLSv1.2", "ciphers=high protocols=>=TLSv1.2"),
    ("may", "connection_reuse=YES", "connection_reuse=yes"),
    ("dane", "exclude=aNULL:eNULL", "exclude=aNULL:eNULL"),
    ("verify", "match=nexthop:dot-nexthop", "match=nexthop:dot-nexthop"),
    ("secure", "match=.Example.org servername=hostname", "match=.example.org servername=hostname"),
    ("fingerprint", f"match={DIGEST}", f"match={DIGEST.upper()}"),
    ("fingerprint", f"match={DIGEST[:59]}|{DIGEST[:47]} match={DIGEST[:59]}", None),
    ("encrypt", "exclude=" + "A" * 247, "exclude=" + "A" * 247),  # exactly 255 characters
    ("none", "", ""),
]
PARAMETERS_REFUSED = [
    ("encrypt", "foo=bar"),
    ("encrypt", "match=x.example"),
    ("may", "match=nexthop"),
    ("none", "ciphers=high"),
    ("encrypt", "protocols=>=TLSv1.2\nciphers=high"),
    ("encrypt", "protocols=>=TLSv1.2\r\nciphers=high"),
    ("encrypt", "ciphers=high\x00"),
    ("encrypt", "{ protocols = >=TLSv1.2 }"),
    ("encrypt", "servername=mail example.net"),
    ("encrypt", "protocols"),
    ("encrypt", "=x"),
    ("encrypt", "ciphers="),
    ("encrypt", "ciphers=high ciphers=medium"),
    ("encrypt", "ciphers=super"),
    ("encrypt", "protocols=TLSv9"),
    ("encrypt", "protocols=>TLSv1.2"),  # Postfix knows >= and <=, not > or <: the policy would be invalid
    ("encrypt", "protocols=<TLSv1.3"),
    ("encrypt", "protocols=>=!TLSv1.2"),
    ("encrypt", "ciphers=null"),  # no encryption at all
    ("encrypt", "ciphers=export"),
    ("encrypt", "connection_reuse=maybe"),
    ("encrypt", "servername=not_a_host"),
    ("encrypt", "exclude=" + "A" * 248),  # 256 characters
    ("encrypt", "exclude=" + ":".join(["AES128-SHA"] * 25)),
    ("fingerprint", ""),
    ("fingerprint", "ciphers=high"),
    ("fingerprint", "match=zz"),
    ("fingerprint", "match=ab:cd"),
    ("verify", "tafile=/etc/ssl/ta.pem"),
    ("secure", "policy_type=sts"),
]

BODY_REFUSED: list[tuple[str, Any, str]] = [
    ("unknown field", {"foo": 1}, "body.foo"),
    ("mailcow's id", {"id": 7}, "body.id"),
    ("missing destination", {"destination": None}, "body.destination"),
    ("missing policy", {"policy": None}, "body.policy"),
    ("missing justification", {"justification": None}, "body.justification"),
    ("duration in words", {"duration": "three days"}, "body.duration"),
    ("duration as a number", {"duration": 86400}, "body.duration"),
    ("negative duration", {"duration": "-P1D"}, "body.duration"),
    ("half a second", {"duration": "PT0.5S"}, "body.duration"),
    ("a fraction of a second", {"duration": "PT90.25S"}, "body.duration"),
    ("a month (28 to 31 days)", {"duration": "P1M"}, "body.duration"),
    ("a year", {"duration": "P1Y"}, "body.duration"),
    ("months among days", {"duration": "P1M2DT3H"}, "body.duration"),
    ("a T with nothing after it", {"duration": "P1DT"}, "body.duration"),
    ("a bare T", {"duration": "PT"}, "body.duration"),
    ("no length at all", {"duration": "P"}, "body.duration"),
    ("weeks next to days", {"duration": "P1W2D"}, "body.duration"),
    ("a unit twice", {"duration": "P1D2D"}, "body.duration"),
    ("non-ASCII digits", {"duration": "P\u0663D"}, "body.duration"),
    ("upper-case policy", {"policy": "DANE"}, "body.policy"),
    ("unknown policy", {"policy": "tls"}, "body.policy"),
    ("short justification", {"justification": "broken"}, "body.justification"),
    ("padded justification", {"justification": "   too short, really   "}, "body.justification"),
    ("destination not a string", {"destination": ["example.org"]}, "body.destination"),
    ("very long destination", {"destination": "a" * 301}, "body.destination"),
    ("very long parameters", {"parameters": "ciphers=high " * 80}, "body.parameters"),
    ("long ticket", {"ticket": "T" * 201}, "body.ticket"),
    ("ticket URL not http", {"ticket_url": "javascript:alert(1)"}, "body.ticket_url"),
    ("unknown target", {"target": "nowhere"}, "body.target"),
]


def _body(**fields: Any) -> dict[str, Any]:
    body = {"destination": "example.org", "policy": "encrypt", "justification": JUSTIFICATION, **fields}
    return {key: value for key, value in body.items() if value is not None}


def _refused(client: Any, engine: Engine, headers: dict[str, str], body: Any, field: str) -> dict[str, Any]:
    before = counts(engine)
    problem = assert_problem(client.post("/v1/overrides", json=body, headers=headers), 422, field=field)
    assert counts(engine) == before
    return problem


def test_destinations_are_normalised(client: Any, auth: Any, subtests: Any) -> None:
    headers = auth("alice", "requester")
    for raw, stored in DESTINATIONS_ACCEPTED.items():
        with subtests.test(destination=raw):
            response = client.post("/v1/overrides", json=_body(destination=raw), headers=headers)
            assert response.status_code == 201, response.text
            assert response.json()["destination"] == stored


def test_destinations_postfix_never_uses_are_refused(client: Any, engine: Engine, auth: Any, subtests: Any) -> None:
    headers = auth("alice", "requester")
    for raw in DESTINATIONS_REFUSED:
        with subtests.test(destination=raw):
            problem = _refused(client, engine, headers, _body(destination=raw), "body.destination")
            assert problem["errors"][0]["message"].startswith("destination ")


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("2001:db8::1:25", "write the next hop as your transport or relayhost does, [2001:db8::1]:25"),
        ("2001:db8::1:25", "[ipv6:2001:db8::1]:25"),
        ("2001:DB8::1", "[2001:db8::1] (or with the RFC 5321 prefix, [ipv6:2001:db8::1])"),
        ("[2001:db8::zz]:25", "'2001:db8::zz' is not an IPv6 address"),
    ],
)
def test_ipv6_next_hops_are_explained(client: Any, engine: Engine, auth: Any, raw: str, words: str) -> None:
    problem = _refused(client, engine, auth("alice", "requester"), _body(destination=raw), "body.destination")
    message = problem["errors"][0]["message"]
    assert words in message and "Codepoint" not in message, message


@pytest.mark.parametrize("settings", [make_settings(mailcow_supports_subdomain_dest=True)], ids=["subdomains"])
def test_subdomain_destinations_when_the_target_supports_them(client: Any, auth: Any) -> None:
    response = client.post("/v1/overrides", json=_body(destination=".Example.ORG"), headers=auth("alice", "requester"))
    assert response.status_code == 201, response.text
    assert response.json()["destination"] == ".example.org"


def test_parameters_are_canonical(client: Any, auth: Any, subtests: Any) -> None:
    headers = auth("alice", "requester")
    for n, (policy, raw, stored) in enumerate(PARAMETERS_ACCEPTED):
        with subtests.test(policy=policy, parameters=raw):
            body = _body(destination=f"p{n}.example", policy=policy, parameters=raw)
            response = client.post("/v1/overrides", json=body, headers=headers)
            assert response.status_code == 201, response.text
            if stored is not None:
                assert response.json()["parameters"] == stored
            assert len(response.json()["parameters"]) <= 255


def test_parameters_postfix_would_choke_on_are_refused(client: Any, engine: Engine, auth: Any, subtests: Any) -> None:
    headers = auth("alice", "requester")
    for policy, raw in PARAMETERS_REFUSED:
        with subtests.test(policy=policy, parameters=raw):
            problem = _refused(client, engine, headers, _body(policy=policy, parameters=raw), "body.parameters")
            assert problem["detail"] and problem["errors"][0]["message"].startswith("parameters ")


@pytest.mark.parametrize("backend", ["sqlite"])  # refused by the schema, before any database work
def test_body_shape_errors(client: Any, engine: Engine, auth: Any, subtests: Any) -> None:
    headers = auth("alice", "requester")
    for name, fields, field in BODY_REFUSED:
        with subtests.test(case=name):
            _refused(client, engine, headers, _body(**fields), field)
    with subtests.test(case="not JSON"):
        before = counts(engine)
        response = client.post(
            "/v1/overrides", content=b"destination=example.org", headers=headers | {"content-type": "text/plain"}
        )
        assert_problem(response, 422, field="body")
        assert counts(engine) == before
    with subtests.test(case="a JSON list"):
        _refused(client, engine, headers, [_body()], "body")


DURATIONS_ACCEPTED = {
    "P3D": "P3D",
    "p1dt6h": "P1DT6H",  # RFC 3339's grammar is case-insensitive
    "PT90M": "PT1H30M",
    "P2W": "P14D",  # weeks are exactly seven days (README: Durations)
    "PT1H0M30S": "PT1H30S",
}


def test_durations_are_read_strictly(client: Any, auth: Any, subtests: Any) -> None:
    headers = auth("alice", "requester")
    for n, (raw, stored) in enumerate(DURATIONS_ACCEPTED.items()):
        with subtests.test(duration=raw):
            body = _body(destination=f"d{n}.example", duration=raw)
            response = client.post("/v1/overrides", json=body, headers=headers)
            assert response.status_code == 201, response.text
            assert response.json()["duration"] == stored


@pytest.mark.parametrize("backend", ["sqlite"])
@pytest.mark.parametrize(
    ("duration", "words"),
    [
        ("P1M", "months and years have no fixed length"),
        ("P1Y", "months and years have no fixed length"),
        ("P1DT", "a 'T' must be followed by hours, minutes or seconds"),
        ("P1W1D", "weeks stand alone"),
        ("PT1.5H", "whole numbers"),
        ("-P1D", "negative"),
    ],
)
def test_refused_durations_say_why(
    client: Any, engine: Engine, auth: Any, make_override: Any, duration: str, words: str
) -> None:
    problem = _refused(client, engine, auth("alice", "requester"), _body(duration=duration), "body.duration")
    assert words in problem["errors"][0]["message"], problem
    override_id = make_override(destination="extend.example")["id"]
    before = counts(engine)
    response = client.post(
        f"/v1/overrides/{override_id}/extend",
        json={"comment": "more time", "duration": duration},
        headers=auth("alice", "requester"),
    )
    assert words in assert_problem(response, 422, field="body.duration")["detail"]
    assert counts(engine) == before


def test_action_body_and_path_errors(client: Any, engine: Engine, auth: Any, make_override: Any, subtests: Any) -> None:
    override_id = make_override()["id"]
    headers = auth("root", "admin")
    cases: list[tuple[str, Any, str]] = [
        (f"/v1/overrides/{override_id}/approve", {}, "body.comment"),
        (f"/v1/overrides/{override_id}/approve", {"comment": ""}, "body.comment"),
        (f"/v1/overrides/{override_id}/reject", {"comment": " \n\t "}, "body.comment"),
        (f"/v1/overrides/{override_id}/approve", {"comment": "ok", "approvals": 2}, "body.approvals"),
        (f"/v1/overrides/{override_id}/reject", {"comment": "x" * 4001}, "body.comment"),
        # The limit holds for what is sent: blanks around a short comment count (found by Schemathesis)
        (f"/v1/overrides/{override_id}/approve", {"comment": "ok" + "\r" * 4000}, "body.comment"),
        (f"/v1/overrides/{override_id}/cancel", {"comment": " " * 2500 + "ok" + " " * 2500}, "body.comment"),
        (f"/v1/overrides/{override_id}/resolve-conflict", {"comment": "ok", "action": " replace"}, "body.action"),
        (f"/v1/overrides/{override_id}/extend", {"comment": "more"}, "body.duration"),
        (f"/v1/overrides/{override_id}/extend", {"comment": "more", "duration": "soon"}, "body.duration"),
        ("/v1/overrides/0/approve", {"comment": "ok"}, "path.override_id"),
        ("/v1/overrides/abc/cancel", {"comment": "ok"}, "path.override_id"),
    ]
    for url, body, field in cases:
        with subtests.test(url=url, body=body):
            before = counts(engine)
            assert_problem(client.post(url, json=body, headers=headers), 422, field=field)
            assert counts(engine) == before
    with subtests.test(case="unknown override"):
        assert_problem(client.post("/v1/overrides/999/approve", json={"comment": "ok"}, headers=headers), 404)
        assert_problem(client.get("/v1/overrides/999", headers=headers), 404)
    with subtests.test(case="unknown route"):
        assert_problem(client.get("/v1/nothing-here", headers=headers), 404)


def test_what_postgresql_would_refuse_is_a_422_not_a_500(
    client: Any, engine: Engine, auth: Any, make_override: Any, subtests: Any
) -> None:
    """NUL characters and numbers beyond the id columns: refused by the API on both databases."""
    override_id = make_override()["id"]
    headers = auth("root", "admin")
    big = 2**31
    huge_cursor = "bzoxMTgwNTkxNjIwNzE3NDExMzAzNDI0"  # "o:1180591620717411303424" (2**70)
    posts: list[tuple[str, Any, str]] = [
        ("/v1/overrides", _body(justification=JUSTIFICATION + "\x00"), "body.justification"),
        ("/v1/overrides", _body(ticket="OPS-1\x00"), "body.ticket"),
        ("/v1/overrides", _body(ticket="OPS-1\nOPS-2"), "body.ticket"),
        ("/v1/overrides", _body(target="default\x00"), "body.target"),
        (f"/v1/overrides/{override_id}/approve", {"comment": "ok\x00"}, "body.comment"),
        (f"/v1/overrides/{big}/approve", {"comment": "ok"}, "path.override_id"),
    ]
    for url, body, field in posts:
        with subtests.test(url=url, field=field):
            before = counts(engine)
            assert_problem(client.post(url, json=body, headers=headers), 422, field=field)
            assert counts(engine) == before
    gets = [
        (f"/v1/overrides/{big}", "path.override_id"),
        (f"/v1/overrides/{big}/events", "path.override_id"),
        ("/v1/overrides?ticket=a%00b", "query.ticket"),
        ("/v1/overrides?destination=a%00b", "query.destination"),
        (f"/v1/overrides?cursor={huge_cursor}", "query.cursor"),
        (f"/v1/audit?override_id={2**70}", "query.override_id"),
        ("/v1/audit?actor=a%00b", "query.actor"),
        ("/v1/audit?cursor=YTo5OTk5OTk5OTk5OTk5OTk5OTk5OTk5", "query.cursor"),  # "a:9999999999999999999999"
    ]
    for url, field in gets:
        with subtests.test(url=url):
            assert_problem(client.get(url, headers=headers), 422, field=field)
    multi_line = client.post(
        f"/v1/overrides/{override_id}/reject",
        json={"comment": "Not yet:\n- ticket missing\n- no diagnosis"},
        headers=headers,
    )
    assert multi_line.status_code == 200, multi_line.text  # line breaks are fine in free text


# Invisible characters: they must not make up a justification's minimum, nor hide in what reviewers read.
INVISIBLE_REFUSED = {
    "zero width space": "\u200b",
    "left-to-right embedding": "\u202a",
    "right-to-left override": "\u202e",
    "pop directional formatting": "\u202c",
    "left-to-right isolate": "\u2066",
    "pop directional isolate": "\u2069",
    "word joiner": "\u2060",
    "BOM": "\ufeff",
    "soft hyphen": "\u00ad",
    "Hangul filler": "\u3164",
    "tag character": "\U000e0041",
    "C1 control (NEL)": "\x85",
    "C1 control (CSI)": "\x9b",
    "lone surrogate": "\ud800",
}


def test_invisible_characters_in_justifications_and_comments_are_refused(
    client: Any, engine: Engine, auth: Any, make_override: Any, subtests: Any
) -> None:
    override_id = make_override()["id"]
    admin = auth("root", "admin") | {"content-type": "application/json"}
    requester = auth("alice", "requester") | {"content-type": "application/json"}
    for why, ch in INVISIBLE_REFUSED.items():
        # JSON with escapes, so a lone surrogate travels; plenty of visible text around each character.
        cases = [
            ("/v1/overrides", requester, _body(destination="example.net", justification=JUSTIFICATION + ch)),
            (f"/v1/overrides/{override_id}/reject", admin, {"comment": f"Not {ch}yet"}),
        ]
        for url, headers, body in cases:
            field = f"body.{'justification' if 'justification' in body else 'comment'}"
            with subtests.test(why=why, field=field):
                before = counts(engine)
                response = client.post(url, content=json.dumps(body), headers=headers)
                assert_problem(response, 422, field=field)
                assert counts(engine) == before


def test_only_visible_characters_count_towards_the_minimum(
    client: Any, engine: Engine, auth: Any, make_override: Any, subtests: Any
) -> None:
    headers = auth("alice", "requester")
    joiners = "\u200d\u200c\u200e\u200f\ufe0f"  # kept in text (scripts and emoji need them), never counted
    with subtests.test(case="19 visible characters and joiners"):
        _refused(client, engine, headers, _body(justification="x" * 19 + joiners * 4), "body.justification")
    with subtests.test(case="joiners only"):
        _refused(client, engine, headers, _body(justification=joiners * 10), "body.justification")
    with subtests.test(case="a comment of joiners only"):
        override_id = make_override(destination="example.net")["id"]
        response = client.post(
            f"/v1/overrides/{override_id}/cancel", json={"comment": " \u200d\u200c "}, headers=headers
        )
        assert_problem(response, 422, field="body.comment")
    with subtests.test(case="20 visible characters"):
        text = "x" * 20 + "\u200d"
        response = client.post("/v1/overrides", json=_body(justification=text), headers=headers)
        assert response.status_code == 201, response.text
        assert response.json()["justification"] == text
    with subtests.test(case="Persian with a zero-width non-joiner, an emoji sequence"):
        text = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645 mail is stuck since 09:00 \U0001f469\u200d\U0001f4bb"
        response = client.post(
            "/v1/overrides", json=_body(destination="example.com", justification=text), headers=headers
        )
        assert response.status_code == 201, response.text
