"""The mailcow stand-in reproduces every behaviour in /work/shared/mailcow-api.md (§ numbers below)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from devtools.mailcow_standin import StandinKey, create_standin_app, idn_to_ascii, php_intval, php_is_numeric
from tests.helpers import free_port
from tests.standin import ADD, ALL, AUTH, DELETE, EDIT, JSON, KEY, RO, RO_KEY, make_app, raw, served, standin_of

EMPTY_DESTS = ["", "   "]


@pytest.fixture
def app() -> Starlette:
    return make_app()


async def add(c: httpx.AsyncClient, body: Any, headers: dict[str, str] = AUTH) -> httpx.Response:
    return await c.post(ADD, content=json.dumps(body), headers=headers)


async def rows(c: httpx.AsyncClient) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = (await c.get("/__standin__/rows")).json()
    return result


async def seed(c: httpx.AsyncClient, dest: str, **row: Any) -> int:
    response = await c.post("/__standin__/rows", json={"dest": dest, **row})
    assert response.status_code == 201, response.text
    row_id: int = response.json()["id"]
    return row_id


def msg(response: httpx.Response) -> Any:
    return response.json()[0]["msg"]


# ---- §1 transport, routing, authentication -------------------------------------------------------


async def test_raw_json_without_json_content_type_is_ignored(app: Starlette) -> None:
    async with raw(app) as c:
        r = await c.post(ADD, content='{"dest":"example.org","policy":"may","active":1}', headers={"X-API-Key": KEY})
        assert (r.status_code, r.text) == (200, '{"type":"error","msg":"Cannot find attributes in post data"}')
        r = await c.post(ADD, content="{}", headers={"X-API-Key": KEY, "Content-Type": "text/plain"})
        assert r.json()["msg"] == "Cannot find attributes in post data"
        assert await rows(c) == []


async def test_form_field_route_add_edit_delete(app: Starlette) -> None:
    async with raw(app) as c:
        attr = json.dumps({"dest": "example.org", "policy": "encrypt", "parameters": "", "active": "1"})
        r = await c.post(ADD, data={"attr": attr, "csrf_token": "x"}, headers={"X-API-Key": KEY})
        assert msg(r) == ["tls_policy_map_entry_saved", "example.org"]
        (row,) = await rows(c)
        r = await c.post(
            EDIT, data={"items": json.dumps([row["id"]]), "attr": json.dumps({"active": 0})}, headers={"X-API-Key": KEY}
        )
        assert msg(r) == ["tls_policy_map_entry_saved", "example.org"]
        assert (await rows(c))[0]["active"] == 0
        r = await c.post(DELETE, data={"items": json.dumps([row["id"]])}, headers={"X-API-Key": KEY})
        assert msg(r) == ["tls_policy_map_entry_deleted", str(row["id"])]
        assert await rows(c) == []


@pytest.mark.parametrize("body", ["{not json", "null", "", "[1,"])
async def test_invalid_json_is_400_before_the_read_only_check(app: Starlette, body: str) -> None:
    async with raw(app) as c:
        for headers in (AUTH, RO):
            r = await c.post(ADD, content=body, headers=headers)
            assert r.status_code == 400
            assert r.json() == {"type": "error", "msg": "Request body doesn't contain valid json!"}
        r = await c.request("GET", ALL, content="{not json", headers=AUTH)  # get does not check
        assert r.status_code == 200


@pytest.mark.parametrize("sent", [f" {KEY}\t", f"{KEY}!", f"<{KEY}>", KEY.replace("-", "-_")])
async def test_key_is_stripped_to_alnum_and_dash(app: Starlette, sent: str) -> None:
    async with raw(app) as c:
        r = await c.get(ALL, headers={"X-API-Key": sent})
        assert (r.status_code, r.text) == (200, "{}")


async def test_ten_failed_logins_in_ten_minutes_would_be_a_ban(app: Starlette) -> None:
    standin = standin_of(app)
    async with raw(app) as c:
        for n in range(10):
            assert not standin.banned("127.0.0.1"), n
            assert (await c.get(ALL, headers={"X-API-Key": "NOPE-NOPE"})).status_code == 401
        assert (await c.get(ALL)).status_code == 200  # no key at all is not a failed login
    assert standin.banned("127.0.0.1") and len(standin.auth_failures) == 10
    assert not standin.banned("192.0.2.1")


async def test_unknown_and_inactive_keys_are_401_text_html(app: Starlette) -> None:
    standin_of(app).set_key(StandinKey("OLD-KEY", active=False))
    async with raw(app) as c:
        for key in ("NOPE-NOPE", "OLD-KEY", "!!!"):
            r = await c.get(ALL, headers={"X-API-Key": key})
            assert r.status_code == 401
            assert r.headers["content-type"] == "text/html; charset=UTF-8"
            assert r.text == '{"type":"error","msg":"authentication failed"}'


async def test_ip_not_allowed_is_401_and_skip_ip_check_bypasses() -> None:
    app = create_standin_app(
        [
            StandinKey("NET-KEY", allow_from=["192.0.2.0/24", "2001:db8::/32"]),
            StandinKey("SKIP-KEY", allow_from=["192.0.2.1"], skip_ip_check=True),
            StandinKey("LOCAL-KEY", allow_from=["10.0.0.1", "127.0.0.0/8"]),
        ]
    )
    async with raw(app) as c:
        r = await c.get(ALL, headers={"X-API-Key": "NET-KEY"})
        assert r.status_code == 401
        assert r.headers["content-type"].startswith("text/html")
        assert r.json() == {"type": "error", "msg": "api access denied for ip 127.0.0.1"}
        assert (await c.get(ALL, headers={"X-API-Key": "SKIP-KEY"})).text == "{}"
        assert (await c.get(ALL, headers={"X-API-Key": "LOCAL-KEY"})).text == "{}"


async def test_read_only_key_can_get_but_not_write(app: Starlette) -> None:
    async with raw(app) as c:
        assert (await c.get(ALL, headers=RO)).text == "{}"
        for path, body in (
            (ADD, {"dest": "example.org", "policy": "may"}),
            (EDIT, {"items": [1], "attr": {}}),
            (DELETE, [1]),
        ):
            r = await c.post(path, content=json.dumps(body), headers=RO)
            assert r.status_code == 403
            assert r.json() == {"type": "error", "msg": "API read/write access denied"}


@pytest.mark.parametrize("key_header", [None, "", "0"])
async def test_no_key_behaviour_per_action(app: Starlette, key_header: str | None) -> None:
    headers = dict(JSON) if key_header is None else {**JSON, "X-API-Key": key_header}
    async with raw(app) as c:
        r = await c.get(ALL, headers=headers)
        assert (r.status_code, r.text, r.headers["content-type"]) == (200, "", "application/json")
        r = await c.get("/api/v1/get/no-such-category/all", headers=headers)  # never reaches the 404
        assert (r.status_code, r.text) == (200, "")
        r = await add(c, {"dest": "example.org", "policy": "may", "active": 1}, headers)
        assert (r.status_code, r.json()) == (200, {"type": "error", "msg": "Cannot add item"})
        for path, body in ((EDIT, {"items": [1], "attr": {"active": 1}}), (DELETE, [1])):
            r = await c.post(path, content=json.dumps(body), headers=headers)
            assert (r.status_code, r.json()["msg"]) == (403, "API read/write access denied")
        assert await rows(c) == []


async def test_wrong_methods(app: Starlette) -> None:
    async with raw(app) as c:
        r = await c.request("GET", ADD, content='{"dest":"x.org"}', headers=AUTH)
        assert (r.status_code, r.json()) == (405, {"type": "error", "msg": "only POST method is allowed"})
        r = await c.get(ADD, headers={"X-API-Key": KEY})  # no attributes: that check runs first
        assert (r.status_code, r.json()["msg"]) == (200, "Cannot find attributes in post data")
        r = await c.request("PUT", DELETE, content="[1]", headers=AUTH)
        assert r.status_code == 405
        r = await c.post(ALL, headers=AUTH)
        assert (r.status_code, r.json()) == (405, {"type": "error", "msg": "only GET method is allowed"})
        r = await c.post(ALL, headers=JSON)  # also without a key
        assert r.status_code == 405


async def test_unknown_routes_are_404(app: Starlette) -> None:
    async with raw(app) as c:
        for method, path in (
            ("GET", "/api/v1/frobnicate/tls-policy-map"),
            ("GET", "/api/v1/get/nope/all"),
            ("POST", "/api/v1/add/nope"),
            ("GET", "/api/v1/"),
        ):
            r = await c.request(method, path, content="{}", headers=AUTH)
            assert (r.status_code, r.json()) == (404, {"type": "error", "msg": "route not found"}), path


async def test_browser_guard_runs_after_the_key_check(app: Starlette) -> None:
    async with raw(app) as c:
        r = await c.get(ALL, headers={**AUTH, "Sec-Fetch-Dest": "document"})
        assert (r.status_code, r.text) == (403, "")
        assert (await c.get(ALL, headers={**AUTH, "Sec-Fetch-Dest": "empty"})).text == "{}"
        r = await c.get(ALL, headers={"X-API-Key": "BAD", "Sec-Fetch-Dest": "document"})
        assert r.status_code == 401


async def test_session_cookie_keeps_auth_and_carries_stale_errors(app: Starlette) -> None:
    async with raw(app, keep_cookies=True) as c:
        r = await add(c, {"dest": "example.org", "policy": "may", "active": 1})
        assert r.headers["set-cookie"].startswith("MCSESSID=")
        assert "Max-Age=10800" in r.headers["set-cookie"]
        # 1. the cookie alone is admin
        assert json.loads((await c.get(ALL, headers={})).text)[0]["dest"] == "example.org"
        # 2. a DB error (empty body) stays in the session and leads the next add/edit/delete answer
        r = await add(c, {"dest": "other.org", "policy": "bogus", "active": 1}, JSON)
        assert (r.status_code, r.text) == (200, "")
        r = await add(c, {"dest": "third.org", "policy": "may", "active": 1}, JSON)
        stale, fresh = r.json()
        assert stale == {
            "type": "danger",
            "log": ["exception_handler"],
            "msg": ["mysql_error", {"errorInfo": ["01000", 1265, "Data truncated for column 'policy' at row 1"]}],
        }
        assert fresh["msg"] == ["tls_policy_map_entry_saved", "third.org"]
        # the next one is clean again
        r = await c.post(DELETE, content="[999]", headers=JSON)
        assert r.json() == [
            {
                "type": "success",
                "log": ["tls_policy_maps", "delete", {"id": [999]}, None],
                "msg": ["tls_policy_map_entry_deleted", "999"],
            }
        ]
    async with raw(app) as c:  # without the cookie the same calls are anonymous
        assert (await c.get(ALL, headers={})).text == ""


# ---- §3 add -------------------------------------------------------------------------------------


async def test_add_success_shape_and_escaping(app: Starlette) -> None:
    async with raw(app) as c:
        body = {"dest": "Bücher.example", "policy": "encrypt", "parameters": "tafile=/etc/x", "active": "1"}
        r = await c.post(ADD, content=json.dumps(body, ensure_ascii=False).encode(), headers=AUTH)
        assert r.status_code == 200
        assert r.text == (
            '[{"type":"success","log":["tls_policy_maps","add",{"dest":"B\\u00fccher.example","policy":"encrypt",'
            '"parameters":"tafile=\\/etc\\/x","active":"1"},null],'
            '"msg":["tls_policy_map_entry_saved","xn--bcher-kva.example"]}]'
        )


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("Example.ORG", "example.org"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("  padded.example \n", "padded.example"),
        # transitional UTS #46: the four deviation characters are mapped as IDNA2003 did (§3)
        ("straße.example", "strasse.example"),
        ("STRASSE.example", "strasse.example"),
        ("a\u03c2.example", "xn--a-0mb.example"),  # final sigma becomes sigma: xn--a-ymb in IDNA2008
        ("\u0915\u094d\u200d\u0937.example", "xn--11b2ezc.example"),  # ZWJ dropped
        ("\u0915\u094d\u200c\u0937.example", "xn--11b2ezc.example"),  # ZWNJ dropped
        ("xn--strae-oqa.example", "xn--strae-oqa.example"),  # an A-label sent as such is kept
        ("\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.net", "example.net"),  # fullwidth,
    ],
)
async def test_add_normalises_dest_with_trim_and_idna(app: Starlette, sent: str, stored: str) -> None:
    async with raw(app) as c:
        r = await add(c, {"dest": sent, "policy": "may", "active": 1})
        assert msg(r) == ["tls_policy_map_entry_saved", stored]
        assert (await rows(c))[0]["dest"] == stored


@pytest.mark.parametrize(
    "dest",
    [
        ".example.org",
        "-bad.example",
        "a" * 64 + ".example",
        ".".join(["a" * 60] * 5),
        "[mail." + "a" * 60 + "]:25",
        *EMPTY_DESTS,
        ".",
        "*",
        "@",
        "a..b.example",
        None,
    ],
)
async def test_add_rejects_invalid_dest(app: Starlette, dest: str | None) -> None:
    body = {"policy": "may", "active": 1} if dest is None else {"dest": dest, "policy": "may", "active": 1}
    async with raw(app) as c:
        r = await add(c, body)
        assert r.json() == [
            {"type": "danger", "log": ["tls_policy_maps", "add", body, None], "msg": "tls_policy_map_dest_invalid"}
        ]
        assert await rows(c) == []


@pytest.mark.parametrize(
    "dest",
    [
        "example.org",
        "[mail.example.net]:25",
        "192.0.2.1",
        "[192.0.2.1]:2525",
        "*.wild.example",
        "user@mail.example",
        "foo bar.example",
        "foo_bar.example",
        "example.org.",
    ],
)
async def test_add_accepts_whatever_idna_accepts(app: Starlette, dest: str) -> None:
    async with raw(app) as c:
        assert msg(await add(c, {"dest": dest, "policy": "may", "active": 1}))[0] == "tls_policy_map_entry_saved"
        assert (await rows(c))[0]["dest"] == dest


async def test_add_array_dest_is_an_empty_body(app: Starlette) -> None:
    async with raw(app) as c:
        r = await add(c, {"dest": ["example.org"], "policy": "may", "active": 1})
        assert (r.status_code, r.text) == (200, "")
        assert await rows(c) == []


@pytest.mark.parametrize(
    "parameters",
    [
        "protocols=>=TLSv1.2  ciphers=high",
        " protocols=>=TLSv1.2",
        "protocols=>=TLSv1.2 ",
        "protocols",
        "=x",
        "{ protocols = TLSv1.2 }",
        "x=",
        5,
    ],
)
async def test_add_rejects_parameters(app: Starlette, parameters: Any) -> None:
    async with raw(app) as c:
        r = await add(c, {"dest": "example.org", "policy": "may", "parameters": parameters, "active": 1})
        assert msg(r) == "tls_policy_map_parameter_invalid"
        assert await rows(c) == []


@pytest.mark.parametrize(
    "parameters",
    [
        "protocols=>=TLSv1.2,ciphers=high",
        "foo=bar",
        "protocols=>=TLSv1.2\nciphers=high",
        "match=a:b servername=x",
        "x=" + "y" * 253,
        "",
        None,
        "0",
    ],
)
async def test_add_accepts_parameters(app: Starlette, parameters: Any) -> None:
    async with raw(app) as c:
        r = await add(c, {"dest": "example.org", "policy": "may", "parameters": parameters, "active": 1})
        assert msg(r)[0] == "tls_policy_map_entry_saved"
        stored = "" if parameters in (None, "0") else parameters  # "0" is empty() in PHP
        assert (await rows(c))[0]["parameters"] == stored


async def test_add_parameters_over_255_is_an_empty_body(app: Starlette) -> None:
    async with raw(app) as c:
        r = await add(c, {"dest": "example.org", "policy": "may", "parameters": "x=" + "y" * 254, "active": 1})
        assert (r.status_code, r.text) == (200, "")
        assert await rows(c) == []


@pytest.mark.parametrize(
    ("active", "stored"),
    [
        ("1", 1),
        (1, 1),
        (True, 1),
        (1.9, 1),
        ("0", 0),
        (False, 0),
        (None, 0),
        ("yes", 0),
        ("abc", 0),
        (2, 2),
        (-1, -1),
        (127, 127),
        (-128, -128),
        ("missing", 0),
    ],
)
async def test_add_active_is_intval(app: Starlette, active: Any, stored: int) -> None:
    body: dict[str, Any] = {"dest": "example.org", "policy": "may"}
    if active != "missing":
        body["active"] = active
    async with raw(app) as c:
        assert msg(await add(c, body))[0] == "tls_policy_map_entry_saved"
        assert (await rows(c))[0]["active"] == stored


@pytest.mark.parametrize("active", [128, -129, "300"])
async def test_add_active_out_of_range_is_an_empty_body(app: Starlette, active: Any) -> None:
    async with raw(app) as c:
        r = await add(c, {"dest": "example.org", "policy": "may", "active": active})
        assert (r.status_code, r.text) == (200, "")
        assert await rows(c) == []


async def test_add_duplicate_dest(app: Starlette) -> None:
    async with raw(app) as c:
        await add(c, {"dest": "example.org", "policy": "may", "active": 0})  # inactive rows count too
        for dest in ("example.org", "EXAMPLE.org", " example.org "):
            r = await add(c, {"dest": dest, "policy": "encrypt", "active": 1})
            assert r.json()[0]["type"] == "danger"
            assert msg(r) == ["tls_policy_map_entry_exists", "example.org"]
        assert len(await rows(c)) == 1


async def test_add_hits_the_case_insensitive_unique_index(app: Starlette) -> None:
    async with raw(app) as c:
        await seed(c, "EXAMPLE.org")  # as edit can store it
        r = await add(c, {"dest": "example.org", "policy": "may", "active": 1})
        assert (r.status_code, r.text) == (200, "")
        assert len(await rows(c)) == 1


async def test_add_policy_is_trimmed_and_lowercased(app: Starlette) -> None:
    async with raw(app) as c:
        await add(c, {"dest": "example.org", "policy": " DANE-ONLY ", "active": 1})
        assert (await rows(c))[0]["policy"] == "dane-only"


@pytest.mark.parametrize("policy", ["bogus", "", None, "dane only", "missing"])
async def test_add_policy_outside_the_enum_is_an_empty_body(app: Starlette, policy: Any) -> None:
    body: dict[str, Any] = {"dest": "example.org", "active": 1}
    if policy != "missing":
        body["policy"] = policy
    async with raw(app) as c:
        r = await add(c, body)
        assert (r.status_code, r.text, r.headers["content-type"]) == (200, "", "application/json")
        assert await rows(c) == []


async def test_add_ignores_extra_fields_and_failed_inserts_use_no_ids(app: Starlette) -> None:
    async with raw(app) as c:
        await add(c, {"dest": "a.example", "policy": "bogus", "active": 1})
        r = await add(c, {"dest": "b.example", "policy": "may", "active": 1, "id": 77, "created": "1999-01-01"})
        assert msg(r)[0] == "tls_policy_map_entry_saved"
        (row,) = await rows(c)
        assert row["id"] == 1
        assert row["created"] != "1999-01-01"


async def test_dest_in_messages_is_html_escaped(app: Starlette) -> None:
    async with raw(app) as c:
        r = await add(c, {"dest": "a<b>&'\".example", "policy": "may", "active": 1})
        assert msg(r) == ["tls_policy_map_entry_saved", "a&lt;b&gt;&amp;&#039;&quot;.example"]


# ---- §4 edit ------------------------------------------------------------------------------------


async def edit(c: httpx.AsyncClient, items: Any, attr: Any) -> httpx.Response:
    return await c.post(EDIT, content=json.dumps({"items": items, "attr": attr}), headers=AUTH)


async def test_edit_unknown_id_continues_with_the_next(app: Starlette) -> None:
    async with raw(app) as c:
        a, b = await seed(c, "a.example"), await seed(c, "b.example")
        r = await edit(c, [a, 999, b], {"active": 0})
        assert [(e["type"], e["msg"]) for e in r.json()] == [
            ("success", ["tls_policy_map_entry_saved", "a.example"]),
            ("danger", "access_denied"),
            ("success", ["tls_policy_map_entry_saved", "b.example"]),
        ]
        assert r.json()[0]["log"] == ["tls_policy_maps", "edit", {"id": [a, 999, b], "active": 0}, None]
        assert [row["active"] for row in await rows(c)] == [0, 0]
        r = await edit(c, ["abc"], {"active": 1})  # intval("abc") == 0
        assert msg(r) == "access_denied"


async def test_edit_field_merge(app: Starlette) -> None:
    async with raw(app) as c:
        row_id = await seed(c, "example.org", policy="encrypt", parameters="protocols=>=TLSv1.2", active=1)

        async def after(attr: dict[str, Any]) -> dict[str, Any]:
            assert msg(await edit(c, [row_id], attr))[0] == "tls_policy_map_entry_saved"
            return (await rows(c))[0]

        assert (await after({"dest": "  Spaced.Example  "}))["dest"] == "  Spaced.Example  "
        assert (await after({"dest": ".sub.example"}))["dest"] == ".sub.example"
        assert (await after({"dest": ""}))["dest"] == ".sub.example"
        assert (await after({"dest": "0"}))["dest"] == ".sub.example"
        assert (await after({"policy": "SECURE"}))["policy"] == "secure"
        assert (await after({"policy": ""}))["policy"] == "secure"
        assert (await after({"parameters": None}))["parameters"] == "protocols=>=TLSv1.2"
        assert (await after({"parameters": ""}))["parameters"] == ""
        assert (await after({"active": None}))["active"] == 1
        assert (await after({"active": "abc"}))["active"] == 0
        assert (await after({}))["dest"] == ".sub.example"


@pytest.mark.parametrize(
    ("attr", "key"),
    [
        ({"dest": "*"}, "tls_policy_map_dest_invalid"),
        ({"dest": "@"}, "tls_policy_map_dest_invalid"),
        ({"dest": "."}, "tls_policy_map_dest_invalid"),
        ({"parameters": "bad"}, "tls_policy_map_parameter_invalid"),
    ],
)
async def test_edit_validation_stops_the_remaining_ids(app: Starlette, attr: dict[str, Any], key: str) -> None:
    async with raw(app) as c:
        a, b = await seed(c, "a.example"), await seed(c, "b.example")
        r = await edit(c, [999, a, b], attr)
        assert [e["msg"] for e in r.json()] == ["access_denied", key]
        assert [row["dest"] for row in await rows(c)] == ["a.example", "b.example"]


async def test_edit_duplicate_uses_the_wrong_message_key_and_stops(app: Starlette) -> None:
    async with raw(app) as c:
        a, b, d = await seed(c, "a.example", active=0), await seed(c, "b.example", active=0), await seed(c, "d.example")
        r = await edit(c, [a, b], {"dest": "d.example", "active": 1})
        assert [e["msg"] for e in r.json()] == [["recipient_map_entry_exists", "d.example"]]
        r = await edit(c, [d, a], {"active": 1, "dest": "a.example"})  # d -> a collides; stops before a
        assert msg(r) == ["recipient_map_entry_exists", "a.example"]
        assert [row["active"] for row in await rows(c)] == [0, 0, 1]
        assert msg(await edit(c, [a], {"dest": "a.example", "active": 1})) == [
            "tls_policy_map_entry_saved",
            "a.example",
        ]


async def test_edit_case_variant_duplicate_is_an_empty_body(app: Starlette) -> None:
    async with raw(app) as c:
        await seed(c, "example.org")
        other = await seed(c, "other.org")
        for dest in ("EXAMPLE.org", "example.org "):
            r = await edit(c, [other], {"dest": dest})
            assert (r.status_code, r.text) == (200, "")
        assert [row["dest"] for row in await rows(c)] == ["example.org", "other.org"]


async def test_edit_self_match_quirk(app: Starlette) -> None:
    async with raw(app) as c:
        row_id = await seed(c, "example.org")
        r = await edit(c, [f"{row_id}abc"], {"active": 0})
        assert msg(r) == ["recipient_map_entry_exists", "example.org"]
        assert msg(await edit(c, [str(row_id)], {"active": 0}))[0] == "tls_policy_map_entry_saved"


async def test_edit_invalid_policy_is_an_empty_body(app: Starlette) -> None:
    async with raw(app) as c:
        row_id = await seed(c, "example.org", policy="encrypt")
        r = await edit(c, [row_id], {"policy": "bogus"})
        assert (r.status_code, r.text) == (200, "")
        assert (await rows(c))[0]["policy"] == "encrypt"


async def test_edit_items_forms(app: Starlette) -> None:
    async with raw(app) as c:
        row_id = await seed(c, "example.org", active=1)
        assert msg(await edit(c, row_id, {"active": 0}))[0] == "tls_policy_map_entry_saved"
        assert msg(await edit(c, str(row_id), {"active": 1}))[0] == "tls_policy_map_entry_saved"
        for items in ([], None):
            r = await edit(c, items, {"active": 0})
            assert r.json() == {"type": "success", "msg": "Task completed"}
        r = await c.post(EDIT, content=json.dumps({"items": [row_id]}), headers=AUTH)  # no attr: a no-op
        assert msg(r) == ["tls_policy_map_entry_saved", "example.org"]
        assert (await rows(c))[0]["active"] == 1


async def test_modified_is_set_only_by_a_real_change() -> None:
    clock = iter(f"2026-01-01 00:00:0{i}" for i in range(10))
    from datetime import datetime

    app = create_standin_app([StandinKey(KEY)], now=lambda: datetime.fromisoformat(next(clock)))
    async with raw(app) as c:
        await add(c, {"dest": "example.org", "policy": "may", "active": 1})
        (row,) = await rows(c)
        assert (row["created"], row["modified"]) == ("2026-01-01 00:00:00", None)
        await edit(c, [row["id"]], {"active": 1, "policy": "MAY"})
        assert (await rows(c))[0]["modified"] is None
        await edit(c, [row["id"]], {"active": 0})
        modified = (await rows(c))[0]["modified"]
        assert modified is not None
        assert modified > row["created"]


# ---- §6 delete ----------------------------------------------------------------------------------


async def test_delete_bare_array_and_scalars(app: Starlette) -> None:
    async with raw(app) as c:
        ids = [await seed(c, f"{n}.example") for n in range(5)]
        r = await c.post(DELETE, content=json.dumps([str(ids[0])]), headers=AUTH)
        assert r.json() == [
            {
                "type": "success",
                "log": ["tls_policy_maps", "delete", {"id": [str(ids[0])]}, None],
                "msg": ["tls_policy_map_entry_deleted", str(ids[0])],
            }
        ]
        r = await c.post(DELETE, content=json.dumps([ids[1], ids[2]]), headers=AUTH)
        assert [e["msg"][1] for e in r.json()] == [str(ids[1]), str(ids[2])]
        r = await c.post(DELETE, content=json.dumps(ids[3]), headers=AUTH)
        assert msg(r) == ["tls_policy_map_entry_deleted", str(ids[3])]
        r = await c.post(DELETE, content=json.dumps(str(ids[4])), headers=AUTH)
        assert msg(r) == ["tls_policy_map_entry_deleted", str(ids[4])]
        assert await rows(c) == []


async def test_delete_items_object_deletes_nothing(app: Starlette) -> None:
    async with raw(app) as c:
        row_id = await seed(c, "example.org")
        r = await c.post(DELETE, content=json.dumps({"items": [row_id]}), headers=AUTH)
        assert r.json() == {"type": "error", "msg": "Cannot delete item"}
        assert len(await rows(c)) == 1


async def test_delete_stops_at_the_first_non_numeric_id(app: Starlette) -> None:
    async with raw(app) as c:
        a, b = await seed(c, "a.example"), await seed(c, "b.example")
        r = await c.post(DELETE, content=json.dumps([a, "x", b]), headers=AUTH)
        assert [e["msg"] for e in r.json()] == [["tls_policy_map_entry_deleted", str(a)]]
        r = await c.post(DELETE, content=json.dumps(["x", b]), headers=AUTH)
        assert r.json() == {"type": "error", "msg": "Cannot delete item"}
        assert [row["id"] for row in await rows(c)] == [b]


async def test_delete_has_no_existence_check(app: Starlette) -> None:
    async with raw(app) as c:
        row_id = await seed(c, "example.org", row_id=1)
        r = await c.post(DELETE, content="[999]", headers=AUTH)
        assert msg(r) == ["tls_policy_map_entry_deleted", "999"]
        r = await c.post(DELETE, content="[1.5]", headers=AUTH)
        assert msg(r) == ["tls_policy_map_entry_deleted", "1.5"]
        assert [row["id"] for row in await rows(c)] == [row_id]
        r = await c.post(DELETE, content="[]", headers=AUTH)
        assert r.json() == {"type": "success", "msg": "Task completed"}


# ---- §7 get -------------------------------------------------------------------------------------


async def test_get_all_shape_order_and_pretty_printing(app: Starlette) -> None:
    async with raw(app) as c:
        assert (await c.get(ALL, headers=AUTH)).text == "{}"
        z = await seed(c, "zzz.example")
        await seed(c, "AAA.example", parameters="tafile=/x")
        await seed(c, "bücher.example", active=0)
        r = await c.get(ALL, headers=AUTH)
        assert r.headers["content-type"] == "application/json"
        data = r.json()
        assert [row["dest"] for row in data] == ["AAA.example", "bücher.example", "zzz.example"]
        assert data[2]["id"] == z
        for row in data:
            assert list(row) == ["id", "dest", "policy", "parameters", "active", "created", "modified"]
            assert isinstance(row["id"], int)
            assert isinstance(row["active"], int)
            assert row["modified"] is None
            assert len(row["created"]) == 19
        assert '\n    {\n        "id": ' in r.text
        assert '"bücher.example"' in r.text  # unescaped unicode
        assert '"tafile=\\/x"' in r.text


async def test_get_one_has_the_stray_zero_key(app: Starlette) -> None:
    async with raw(app) as c:
        row_id = await seed(c, "example.org", row_id=1)
        data = (await c.get("/api/v1/get/tls-policy-map/1", headers=AUTH)).json()
        assert data["0"] is None
        assert list(data) == ["id", "dest", "policy", "parameters", "active", "created", "modified", "0"]
        assert data["id"] == row_id
        for alias in ("01", "1abc", " 1"):
            assert (await c.get(f"/api/v1/get/tls-policy-map/{alias}", headers=AUTH)).json()["id"] == 1
        for missing in ("ALL", "999", "abc", ""):
            r = await c.get(f"/api/v1/get/tls-policy-map/{missing}", headers=AUTH)
            assert (r.status_code, r.text) == (200, "{}"), missing
        assert (await c.get("/api/v1/get/tls-policy-map", headers=AUTH)).text == "{}"


# ---- control API --------------------------------------------------------------------------------


async def test_faults_reset_rows_and_call_log(app: Starlette) -> None:
    async with raw(app) as c:
        r = await c.post("/__standin__/faults", json={"op": "add", "mode": "http500", "count": 2})
        assert r.json()["faults"] == [{"op": "add", "mode": "http500", "count": 2, "delay": 0.0}]
        for _ in range(2):
            assert (await add(c, {"dest": "a.example", "policy": "may", "active": 1})).status_code == 500
        assert await rows(c) == []
        await c.post("/__standin__/faults", json={"op": "any", "mode": "empty"})
        assert (await c.get(ALL, headers=AUTH)).text == ""
        await c.post("/__standin__/faults", json={"op": "add", "mode": "drop_after_commit"})
        assert (await add(c, {"dest": "a.example", "policy": "may", "active": 1})).status_code == 500
        assert [row["dest"] for row in await rows(c)] == ["a.example"]  # committed anyway
        assert (await c.post("/__standin__/faults", json={"op": "x", "mode": "empty"})).status_code == 422
        assert (await c.post("/__standin__/rows", json={"dest": "A.EXAMPLE"})).status_code == 409
        assert (await c.post("/__standin__/rows", json={"dest": "z.example", "policy": "x"})).status_code == 422
        calls = (await c.get("/__standin__/calls")).json()
        assert [(call["op"], call["status"], call["fault"]) for call in calls] == [
            ("add", 500, "http500"),
            ("add", 500, "http500"),
            ("get", 200, "empty"),
            ("add", 500, "drop_after_commit"),
        ]
        assert calls[-1]["auth"] == "key-rw"
        assert KEY not in json.dumps(calls)
        await c.post("/__standin__/reset")
        assert await rows(c) == []
        assert (await c.get("/__standin__/calls")).json() == []
        assert (await c.get("/__standin__/faults")).json() == {"faults": []}
        await c.post("/__standin__/keys", json={"key": "NEW-KEY", "access": "ro"})
        assert (await c.get(ALL, headers={"X-API-Key": "NEW-KEY"})).text == "{}"


def test_php_helpers() -> None:
    assert [php_intval(v) for v in ("12abc", " 7", "1e3", "-0x1A", "", "9" * 30, 2.9, -2.9, [], [0])] == [
        12,
        7,
        1000,
        0,
        0,
        2**63 - 1,
        2,
        -2,
        0,
        1,
    ]
    assert [php_is_numeric(v) for v in ("1", " 1", "1 ", "1.5", ".5", "1e3", "abc", "", True, None, 1.5)] == [
        True,
        True,
        True,
        True,
        True,
        True,
        False,
        False,
        False,
        False,
        True,
    ]
    assert idn_to_ascii("ab--cd.example") is None
    assert idn_to_ascii("trailing-.example") is None
    assert idn_to_ascii("xn--bcher-kva.example") == "xn--bcher-kva.example"
    assert idn_to_ascii("xn--abc.example") is None  # punycode of ASCII only


async def test_timeout_fault_over_a_real_socket() -> None:
    app = make_app()
    with served(app) as base:
        async with httpx.AsyncClient(base_url=base) as c:
            await c.post("/__standin__/faults", json={"op": "get", "mode": "timeout", "delay": 0.6})
            with pytest.raises(httpx.ReadTimeout):
                await c.get(ALL, headers=AUTH, timeout=0.25)
            r = await c.get(ALL, headers={"X-API-Key": RO_KEY})
            assert (r.status_code, r.text) == (200, "{}")


def test_module_runs_under_uvicorn_in_another_process() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devtools.mailcow_standin",
            "--port",
            str(port),
            "--api-key",
            KEY,
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 8
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}{ALL}", headers={"X-API-Key": KEY}, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.05)
        assert (r.status_code, r.text) == (200, "{}")
        assert httpx.get(f"http://127.0.0.1:{port}{ALL}", headers={"X-API-Key": "WRONG"}).status_code == 401
    finally:
        proc.terminate()
        proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()
