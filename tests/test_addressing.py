"""A call names its portal (issue 14): /portal/<portal>/rest/... or X-Bitrix-Portal.

The grammar is checked as pure functions; the rest over real loopback sockets, through the fast
lane and through plain aiohttp (conftest), in front of the emulator, whose one portal is
``127.0.0.1:<port>``. Until the portal registry lands, the sidecar serves its one portal under
its host[:port] and its member_id, and refuses any other name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from yarl import URL

from sidecar.app import create_app
from sidecar.config import Settings
from sidecar.emulator import Emulator
from sidecar.errors import BadRequest, NotFound
from sidecar.rules import api_path, parse_target, portal_header
from tests.conftest import CLIENT_ID
from tests.test_fastlane import lane
from tests.test_hostile import one_answer

Client = TestClient[web.Request, web.Application]
KEY = "K3y_0123456789ABCDEF0123456789abcdef"  # a portal name is echoed lower-cased
MEMBER = "0123456789abcdef0123456789abcdef"


class TestGrammar:
    @pytest.mark.parametrize(("raw", "portal", "method", "code", "suffix"), [
        ("/portal/corp.bitrix24.com/rest/profile", "corp.bitrix24.com", "profile", "", ""),
        ("/portal/CORP.Bitrix24.com/rest/crm.lead.list.json", "corp.bitrix24.com",
         "crm.lead.list", "", ".json"),
        ("/portal/127.0.0.1:8081/rest/user.current.xml", "127.0.0.1:8081", "user.current", "",
         ".xml"),
        (f"/portal/{MEMBER.upper()}/rest/profile", MEMBER, "profile", "", ""),
        ("/portal/member_id-1/rest/profile", "member_id-1", "profile", "", ""),
        ("/portal/a.bitrix24.de/rest/1/abc_DEF/crm.lead.add", "a.bitrix24.de", "crm.lead.add",
         "abc_DEF", ""),
        ("/rest/profile", "", "profile", "", ""),
        ("/rest/7/code/profile.json", "", "profile", "code", ".json"),
    ])
    def test_the_prefix_names_a_portal(self, raw: str, portal: str, method: str, code: str,
                                       suffix: str) -> None:
        """A host[:port] or a member_id, lower-cased; the rest is /rest/ as always."""
        target = parse_target(f"{raw}?a=1")
        assert (target.portal, target.method, target.code, target.suffix, target.query) == (
            portal, method, code, suffix, "a=1")

    @pytest.mark.parametrize("raw", [
        "/portal//rest/profile", "/portal/../rest/profile", "/portal/./rest/profile",
        "/portal/a..b/rest/profile", "/portal/a./rest/profile", "/portal/.a/rest/profile",
        "/portal/%2e%2e/rest/profile", "/portal/corp%2ebitrix24.com/rest/profile",
        "/portal/a%2fb/rest/profile", "/portal/a:0/rest/profile", "/portal/a:65536/rest/profile",
        "/portal/a:/rest/profile", "/portal/a:b/rest/profile", "/portal/a:1:2/rest/profile",
        "/portal/user@corp.bitrix24.com/rest/profile", "/portal/a_b.c/rest/profile",
        "/portal/-a.b/rest/profile", "/portal/[::1]:80/rest/profile", "/portal/a b/rest/profile",
        "/portal/a\\b/rest/profile", "/portal/a;x/rest/profile", "/portal/пример.рф/rest/profile",
        "/portal/" + "a" * 65 + "/rest/profile", "/portal/" + "a." * 200 + "a/rest/profile",
        "/portal/a/b/rest/profile", "/portal/a", "/portal/a/", "/portal/a/rest",
        "/portal/a/token", "/portal/a/../rest/profile", "/portal/a//rest/profile",
        "/portal/a/rest/../token", "/portal/a/rest/profile/..", "/portal/a/rest/%2e%2e/token",
        "/portal/a/rest/1/x/../../token", "/portal/a/rest/profile;x",
        "/portal/a/portal/b/rest/profile", "/portal/a/REST/profile",
    ])
    def test_anything_else_is_a_400(self, raw: str) -> None:
        """No escape, dot segment, empty name, user part or second prefix passes."""
        with pytest.raises(BadRequest):
            parse_target(raw)

    @pytest.mark.parametrize("raw", ["/portal", "/PORTAL/a/rest/profile", "/portals/a/rest/x",
                                     "/Portal/a/rest/profile"])
    def test_not_the_prefix_is_a_404_as_before(self, raw: str) -> None:
        """Only /portal/ exactly is the prefix (as only /rest/ exactly is REST)."""
        with pytest.raises(NotFound):
            parse_target(raw)

    def test_a_long_portal_name_does_not_cut_a_code_in_half(self) -> None:
        """The error quotes the part from /rest/ on (where show() cannot cut the code), or the
        portal's name whole, or only its length."""
        host = ".".join(["a" * 60] * 4)
        cut = "a" * 60 + "." + "b" * 23  # the key would start at character 100 of the path
        for raw in (f"/portal/{host}/rest/1/{KEY}/bad..method",
                    f"/portal/{cut}/rest/1/{KEY}/bad..method",
                    f"/portal/{host}x{KEY}/rest/profile",
                    f"/portal/{'a' * 100}{KEY}/rest/profile"):
            with pytest.raises(BadRequest) as caught:
                parse_target(raw)
            text = caught.value.description
            assert KEY in text or no_key_in(text)

    @pytest.mark.parametrize(("raw", "portal", "method", "code", "api", "pages"), [
        ("/rest/api/tasks.task.list", "", "tasks.task.list", "", True, False),
        ("/rest/API/tasks.task.get", "", "tasks.task.get", "", True, False),
        ("/rest/api/7/code_X/tasks.task.add", "", "tasks.task.add", "code_X", True, False),
        ("/rest/api/batch", "", "batch", "", True, False),
        ("/all/rest/api/tasks.task.list", "", "tasks.task.list", "", True, True),
        ("/all/rest/api/1/c/tasks.task.list", "", "tasks.task.list", "c", True, True),
        ("/all/rest/crm.lead.list", "", "crm.lead.list", "", False, True),
        ("/portal/a.b/rest/api/tasks.task.list", "a.b", "tasks.task.list", "", True, False),
        ("/portal/a.b/all/rest/api/1/c/tasks.task.list", "a.b", "tasks.task.list", "c", True,
         True),
        ("/all/portal/a.b/rest/api/tasks.task.list", "a.b", "tasks.task.list", "", True, True),
        ("/all/portal/a.b/rest/crm.deal.list", "a.b", "crm.deal.list", "", False, True),
    ])
    def test_rest_v3_and_whole_list_shapes(  # noqa: PLR0917 - one row of the table
        self, raw: str, portal: str, method: str, code: str, api: bool, pages: bool,
    ) -> None:
        """/rest/api/ (REST 3.0) and /all (whole lists), behind the portal's prefix or not."""
        target = parse_target(f"{raw}?bx24_sdk_ver=1")
        assert (target.portal, target.method, target.code, target.api, target.pages,
                target.suffix, target.query) == (portal, method, code, api, pages, "",
                                                 "bx24_sdk_ver=1")
        assert api_path(raw) == api

    @pytest.mark.parametrize("raw", [
        "/rest/api/x.json", "/rest/api/tasks.task.list.xml", "/rest/api/1/c/x.JSON",
        "/rest/api/", "/rest/api//x", "/rest/api/../token", "/rest/api/./x",
        "/rest/api/x/..", "/rest/api/%2e%2e/token", "/rest/api%2fx", "/rest/%61pi/x",
        "/rest/api/1/c/../../token", "/rest/api/1/c/d/x", "/rest/api/api/x",
        "/rest/api/12345678901/c/x", "/rest/api/1/" + "c" * 65 + "/x", "/rest/api/x;y",
        "/rest/api/" + "a" * 65, "/rest/api/" + ".".join(["a"] * 17),
        "/all/rest/api/x.json", "/all/rest/api/../x", "/all/portal/../rest/x",
        "/all/portal//rest/x", "/all/portal/a/token", "/all/portal/a/all/rest/x",
        "/portal/a/all/all/rest/api/x", "/portal/a/all/../rest/x", "/portal/a/all//rest/x",
        "/portal/a/all/portal/a/rest/x", "/portal/x/all/rest/api/../x",
        "/rest/api/x?a=b#c", "/rest/api/x?a=\r\n",
    ])
    def test_bad_v3_and_whole_list_addresses_are_a_400(self, raw: str) -> None:
        """No suffix for REST 3.0, and /all takes no trick of its own."""
        with pytest.raises(BadRequest):
            parse_target(raw)

    @pytest.mark.parametrize("raw", ["/all/all/rest/x", "/all/token", "/all/../token",
                                     "/all//rest/x", "/ALL/rest/x", "/%61ll/rest/x", "/all",
                                     "/all/", "/all/oauth/token/", "/all/./rest/x"])
    def test_not_a_whole_list_address_is_a_404(self, raw: str) -> None:
        """Only /all/ exactly, once, before /rest/ or the portal's prefix."""
        with pytest.raises(NotFound):
            parse_target(raw)

    def test_the_header(self) -> None:
        """X-Bitrix-Portal: the same grammar; '' without it; repeated or malformed is a 400."""
        assert portal_header(CIMultiDict()) == ""
        assert portal_header(CIMultiDict({"x-bitrix-portal": " Corp.Bitrix24.com:443 "})) == (
            "corp.bitrix24.com:443")
        assert portal_header(CIMultiDict({"X-Bitrix-Portal": MEMBER})) == MEMBER
        for value in ("", "a..b", "%61", "a/b", "https://corp.bitrix24.com", "a:99999"):
            with pytest.raises(BadRequest):
                portal_header(CIMultiDict({"X-Bitrix-Portal": value}))
        with pytest.raises(BadRequest, match="more than one"):
            portal_header(CIMultiDict([("X-Bitrix-Portal", "a"), ("X-Bitrix-Portal", "a")]))


# -- over real sockets ------------------------------------------------------------------------


def host_of(emulator: Emulator) -> str:
    """The emulator portal's host:port, as an install event's domain carries it."""
    return URL(emulator.base_url).raw_authority


async def bitrix_error(response: Any, status: int) -> tuple[str, str]:
    """Assert ``status`` and Bitrix24's error shape; return error and description."""
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body) == {"error", "error_description"}, body
    assert body["error_description"]
    return body["error"], body["error_description"]


class TestOnePortalNamed:
    async def test_the_prefix_by_host_is_served(self, sidecar: Client, emulator: Emulator,
                                                fast_lane: bool) -> None:
        """/portal/<host:port>/rest/<method>: GET and POST reach the portal at /rest/<method>,
        served by the lane when it runs."""
        host = host_of(emulator)
        response = await sidecar.get(f"/portal/{host}/rest/profile.json?x=1")
        assert response.status == 200, await response.text()
        assert (await response.json())["result"]["ID"] == "1"
        response = await sidecar.post(f"/portal/{host.upper()}/rest/crm.lead.add",
                                      data={"fields[TITLE]": "prefixed"})
        assert response.status == 200, await response.text()
        assert emulator.leads[1]["TITLE"] == "prefixed"
        assert [(c.path, c.query.partition("&")[0]) for c in emulator.rest_log][:1] == [
            ("/rest/profile.json", "x=1")]
        assert emulator.rest_log[1].path == "/rest/crm.lead.add"
        if server := lane(sidecar, fast_lane):
            assert (server.served, server.handed_off) == (2, 0)

    async def test_the_prefix_by_member_id_is_served(self, sidecar: Client,
                                                     emulator: Emulator) -> None:
        """The held pair's member_id names the portal too, in any case."""
        for member in (emulator.member_id, emulator.member_id.upper()):
            response = await sidecar.get(f"/portal/{member}/rest/profile")
            assert response.status == 200, await response.text()

    async def test_the_header_is_served_and_never_forwarded(self, sidecar: Client,
                                                            emulator: Emulator) -> None:
        """X-Bitrix-Portal by host or member_id on a plain call (and on /token)."""
        for name in (host_of(emulator), emulator.member_id):
            response = await sidecar.get("/rest/profile", headers={"X-Bitrix-Portal": name})
            assert response.status == 200, await response.text()
            response = await sidecar.get("/token", headers={"X-Bitrix-Portal": name})
            assert response.status == 200, await response.text()
        assert len(emulator.rest_log) == 2
        for call in emulator.rest_log:
            assert not any(n.lower() == "x-bitrix-portal" for n in call.headers), call.headers

    async def test_prefix_and_header_naming_it_alike_are_served(self, sidecar: Client,
                                                                emulator: Emulator) -> None:
        """The same name twice, or its host in one place and its member_id in the other."""
        host, member = host_of(emulator), emulator.member_id
        for in_path, in_header in ((host, host), (host, member), (member, host.upper())):
            response = await sidecar.get(f"/portal/{in_path}/rest/profile",
                                         headers={"X-Bitrix-Portal": in_header})
            assert response.status == 200, (in_path, in_header, await response.text())

    async def test_the_webhook_shape_behind_the_prefix(self, sidecar: Client,
                                                       emulator: Emulator) -> None:
        """/portal/<portal>/rest/<user>/<code>/<method>: a library taking a webhook address works
        unchanged; the user and code never reach the portal."""
        response = await sidecar.get(f"/portal/{host_of(emulator)}/rest/1/anycode/profile.json")
        assert response.status == 200, await response.text()
        response = await sidecar.post(f"/portal/{emulator.member_id}/rest/7/x_Y/crm.lead.add",
                                      json={"fields": {"TITLE": "webhook"}})
        assert response.status == 200, await response.text()
        assert [c.path for c in emulator.rest_log] == ["/rest/profile.json", "/rest/crm.lead.add"]
        assert all("anycode" not in repr(c) and "x_Y" not in repr(c) for c in emulator.rest_log)


class TestOtherPortalsRefused:
    async def test_an_unknown_portal_is_a_404(self, sidecar: Client, emulator: Emulator) -> None:
        """Another host, port or member_id, by prefix or header: 404, nothing forwarded."""
        url = URL(emulator.base_url)
        assert url.host is not None
        assert url.port is not None
        others = [f"{url.host}:{url.port + 1}", "localhost", f"localhost:{url.port}",
                  "corp.bitrix24.com", MEMBER, url.host]
        for other in others:
            for response in (await sidecar.get(f"/portal/{other}/rest/profile"),
                             await sidecar.get("/rest/profile",
                                               headers={"X-Bitrix-Portal": other}),
                             await sidecar.get(f"/portal/{other}/rest/1/code/profile",
                                               headers={"X-Bitrix-Portal": other})):
                error, description = await bitrix_error(response, 404)
                assert error == "SIDECAR_PORTAL_UNKNOWN"
                assert json.dumps(other) in description
        response = await sidecar.get("/token", headers={"X-Bitrix-Portal": MEMBER})
        assert (await bitrix_error(response, 404))[0] == "SIDECAR_PORTAL_UNKNOWN"
        assert list(emulator.rest_log) == []

    async def test_two_different_portals_named_is_a_400(self, sidecar: Client,
                                                        emulator: Emulator) -> None:
        """Prefix and header naming different portals (either way round, known or not): 400,
        and the call reaches neither."""
        host, member = host_of(emulator), emulator.member_id
        for in_path, in_header in ((host, MEMBER), (MEMBER, host), (member, "corp.bitrix24.com"),
                                   ("corp.bitrix24.com", "corp.bitrix24.de")):
            response = await sidecar.post(f"/portal/{in_path}/rest/crm.lead.add",
                                          data={"fields[TITLE]": "x"},
                                          headers={"X-Bitrix-Portal": in_header})
            error, _ = await bitrix_error(response, 400)
            assert error == "SIDECAR_PORTAL_MISMATCH", (in_path, in_header)
        assert list(emulator.rest_log) == []
        assert emulator.leads == {}

    async def test_a_malformed_or_repeated_header_is_a_400(self, sidecar: Client,
                                                           emulator: Emulator) -> None:
        """The header's grammar is the prefix's; two headers are one too many."""
        host = host_of(emulator)
        for headers in ([("X-Bitrix-Portal", "../x")], [("X-Bitrix-Portal", "a%2eb")],
                        [("X-Bitrix-Portal", "")], [("X-Bitrix-Portal", f"http://{host}")],
                        [("X-Bitrix-Portal", host), ("X-Bitrix-Portal", host)]):
            response = await sidecar.get("/rest/profile", headers=CIMultiDict(headers))
            assert (await bitrix_error(response, 400))[0] == "SIDECAR_BAD_REQUEST", headers
        assert list(emulator.rest_log) == []

    @pytest.mark.parametrize("target", [
        "/portal/{host}/rest/profile/../../../token", "/portal/{host}/rest/%2e%2e/token",
        "/portal/{host}/../token", "/portal/{host}/rest/1/x/..%2f..%2ftoken",
        "/portal/%2e%2e/rest/profile", "/portal/{host}%2f..%2f/rest/profile",
        "/portal/{host}/oauth/token/", "/portal/{host}//rest/profile",
        "/portal/{host}/rest/prof%69le", "/portal/{host}/rest/crm..lead",
    ])
    async def test_hostile_paths_behind_the_prefix_are_refused(
        self, sidecar: Client, emulator: Emulator, target: str,
    ) -> None:
        """Traversal and escapes behind (or in) the prefix: a 400 in Bitrix shape, sent byte for
        byte, nothing forwarded, and the sidecar keeps serving."""
        raw = target.replace("{host}", host_of(emulator)).encode()
        answer = await one_answer(sidecar, b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                           b"Connection: close\r\n\r\n" % raw)
        assert answer.status == 400, answer
        assert answer.bitrix_error()[0] == "SIDECAR_BAD_REQUEST"
        assert list(emulator.rest_log) == []
        response = await sidecar.get(f"/portal/{host_of(emulator)}/rest/profile")
        assert response.status == 200


@pytest.fixture
async def keyed(
    make_settings: Callable[..., Settings], emulator: Emulator,
    aiohttp_client: Callable[..., Any],
) -> Client:
    """An authorized sidecar whose calls must carry KEY."""
    settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), client_key=KEY)
    client: Client = await aiohttp_client(create_app(settings, watch_interval=0.05))
    return client


def no_key_in(text: str) -> bool:
    """Say whether ``text`` holds no piece of KEY 8 characters long (whole or cut, any case)."""
    key, text = KEY.lower(), text.lower()
    return not any(key[i:i + 8] in text for i in range(len(key) - 7))


class TestClientKeyWithThePrefix:
    async def test_the_key_as_the_code_behind_the_prefix(self, keyed: Client,
                                                         emulator: Emulator) -> None:
        """/portal/<portal>/rest/<user>/<key>/<method> is served; no key, or a wrong one, is
        a 401; the key never reaches the portal."""
        host = host_of(emulator)
        response = await keyed.get(f"/portal/{host}/rest/1/{KEY}/profile")
        assert response.status == 200, await response.text()
        response = await keyed.get(f"/portal/{host}/rest/profile",
                                   headers={"X-Sidecar-Key": KEY})
        assert response.status == 200, await response.text()
        for target in (f"/portal/{host}/rest/profile", f"/portal/{host}/rest/1/nokey/profile"):
            response = await keyed.get(target)
            assert response.status == 401, target
            assert no_key_in(await response.text())
        assert len(emulator.rest_log) == 2
        assert all(no_key_in(repr(call)) for call in emulator.rest_log)

    async def test_refusals_behind_the_prefix_do_not_echo_the_key(
        self, keyed: Client, emulator: Emulator,
    ) -> None:
        """A malformed address, an unknown portal or a mismatch quoting what holds the key:
        refused, with no piece of the key in the answer."""
        host = host_of(emulator)
        long_host = ".".join(["a" * 60] * 4)
        header = {"X-Sidecar-Key": KEY}
        cases: list[tuple[str, dict[str, str], int]] = [
            (f"/portal/{host}/rest/1/{KEY}/bad..method", {}, 400),
            (f"/portal/{host}/rest/1/{KEY}/x/y/z", {}, 400),
            (f"/portal/{long_host}/rest/1/{KEY}/bad..method", {}, 400),
            (f"/portal/{'a' * 60}.{'b' * 23}/rest/1/{KEY}/bad..method", {}, 400),
            (f"/portal/{'a' * 90}{KEY}/rest/profile", header, 400),
            (f"/portal/{KEY}/rest/profile", header, 404),
            (f"/portal/{KEY}.example.com/rest/1/{KEY}/profile", {}, 400),  # "_": no host
            ("/rest/profile", {**header, "X-Bitrix-Portal": KEY}, 404),
            (f"/portal/{host}/rest/1/{KEY}/profile", {"X-Bitrix-Portal": KEY}, 400),
            ("/rest/profile", {**header, "X-Bitrix-Portal": f"{KEY}/x"}, 400),
        ]
        for target, headers, status in cases:
            response = await keyed.get(target, headers=headers)
            assert response.status == status, (target, await response.text())
            assert no_key_in(await response.text()), target
        assert list(emulator.rest_log) == []

    async def test_refusals_of_v3_and_whole_list_paths_do_not_echo_the_key(
        self, keyed: Client, emulator: Emulator,
    ) -> None:
        """The key as the code of a REST 3.0 webhook address (behind /all and the portal's
        prefix or not): a malformed address, a bad body, an unknown portal are refused in
        REST 3.0's shape with no piece of the key; the key never reaches the portal."""
        host = host_of(emulator)
        long_host = ".".join(["a" * 60] * 4)
        cases: list[tuple[str, dict[str, str], bytes, int]] = [
            (f"/rest/api/1/{KEY}/bad..method", {}, b"", 400),
            (f"/rest/api/1/{KEY}/tasks.task.list.json", {}, b"", 400),
            (f"/rest/api/1/{KEY}/x/y/z", {}, b"", 400),
            (f"/all/rest/api/1/{KEY}/bad..method", {}, b"", 400),
            (f"/portal/{host}/all/rest/api/1/{KEY}/x..y", {}, b"", 400),
            (f"/all/portal/{host}/rest/api/1/{KEY}/x.xml", {}, b"", 400),
            (f"/portal/{long_host}/rest/api/1/{KEY}/bad..method", {}, b"", 400),
            (f"/portal/{'a' * 60}.{'b' * 19}/rest/api/1/{KEY}/bad..method", {}, b"", 400),
            (f"/rest/api/1/{KEY}/tasks.task.list", {}, b"not json", 400),
            (f"/rest/api/1/{KEY}/tasks.task.list", {"X-Bitrix-Pages": KEY}, b"", 400),
            (f"/rest/api/1/{KEY}/tasks.task.list", {"X-Bitrix-Portal": KEY}, b"", 404),
            (f"/portal/{KEY}/rest/api/1/{KEY}/tasks.task.list", {}, b"", 404),
            (f"/portal/{host}/rest/api/1/{KEY}/tasks.task.list", {"X-Bitrix-Portal": KEY}, b"",
             400),
        ]
        for target, headers, body, status in cases:
            response = await keyed.post(target, data=body,
                                        headers={"Content-Type": "application/json", **headers})
            text = await response.text()
            assert response.status == status, (target, text)
            assert isinstance(json.loads(text)["error"], dict), (target, text)
            assert no_key_in(text), (target, text)
        assert list(emulator.rest_log) == []
