"""Real Bitrix24 client libraries, unchanged, with the sidecar as their inbound-webhook address.

Each library is given ``http://127.0.0.1:<port>/rest/`` (where it accepts that shape) or
``http://127.0.0.1:<port>/rest/1/anycode/`` and does what an app does: a simple call, a lead
with a nested multi-field, a read back, a list that needs several pages, and a batch. The
emulator must see every call carry the sidecar's token in ``auth``.

What each library sends (read from its source):

- fast-bitrix24: ``POST {webhook}{method}`` (method lower-cased, no ``.json``) with a JSON body;
  single calls and extra pages go through ``batch`` with ``cmd`` a JSON object of PHP-style
  query strings; retries 5xx (so a 503 rate limit) with backoff.
- bitrix24-rest: ``GET {scheme}://{host}/rest/{user}/{code}/{method}.json`` with every parameter
  PHP-style in the query string, values not percent-encoded; needs the ``/rest/1/anycode/``
  shape (it takes the user id and code out of the path); extra pages fetched at once.
- b24pysdk: ``POST https://{domain}/rest/{user_id}/{key}/{method}.json`` with a JSON body
  (``halt`` a JSON boolean in batches); the scheme is hard-coded to https, so it is driven
  through a TLS terminator in front of the sidecar; retries only on 503.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from sidecar.app import create_app
from sidecar.emulator import Emulator
from tests.conftest import CLIENT_ID, Certificate, pipe, tokens_of

Client = TestClient[web.Request, web.Application]

# Non-ASCII, spaces and brackets, but no "+" or "&": bitrix24-rest puts values in the query
# string without percent-encoding them, so those two would be mangled by the library itself.
LEAD_FIELDS: dict[str, Any] = {
    "TITLE": "Лид Ünïcode (client library)",
    "NAME": "Öльга",
    "PHONE": [{"VALUE": "8 (999) 000-00-00", "VALUE_TYPE": "WORK"}],
}
SEEDED = 120


def webhook_base(sidecar: Client, shape: str) -> str:
    """Return the sidecar's webhook-style base address in one of the two shapes."""
    return str(sidecar.make_url(shape))


async def seed_leads(emulator: Emulator, count: int = SEEDED) -> None:
    """Create leads straight at the emulator (through a webhook of its own), not via the sidecar."""
    emulator.register_webhook(9, "seed")
    before = len(emulator.leads)
    url = f"{emulator.base_url}/rest/9/seed/batch.json"
    async with aiohttp.ClientSession() as session:
        for first in range(0, count, 50):
            cmd = {
                f"c{i}": f"crm.lead.add?fields[TITLE]=Seeded%20{i}"
                for i in range(first, min(first + 50, count))
            }
            async with session.post(url, json={"halt": 1, "cmd": cmd}) as response:
                body = await response.json()
                assert response.status == 200
                assert not body["result"]["result_error"]
    assert len(emulator.leads) == before + count


def assert_sidecar_token(emulator: Emulator, sidecar: Client) -> None:
    """The last call the portal saw carried the sidecar's current token, header and `auth`."""
    call = emulator.rest_log[-1]
    held = tokens_of(sidecar).pair
    assert held is not None
    assert call.token_source == "header"
    assert call.token == held.access_token
    assert call.params["auth"] == held.access_token
    assert "anycode" not in call.path


def assert_is_lead(lead: dict[str, Any], lead_id: int) -> None:
    """The lead read back has the fields the library sent, nested phone included."""
    assert lead["ID"] == str(lead_id)
    assert lead["TITLE"] == LEAD_FIELDS["TITLE"]
    assert lead["NAME"] == LEAD_FIELDS["NAME"]
    phones = [(p["VALUE"], p["VALUE_TYPE"]) for p in lead["PHONE"]]
    assert phones == [("8 (999) 000-00-00", "WORK")]


def assert_all_seeded(leads: list[dict[str, Any]]) -> None:
    """All seeded leads came back exactly once, across every page."""
    assert sorted(int(lead["ID"]) for lead in leads) == list(range(1, SEEDED + 1))
    assert {lead["TITLE"] for lead in leads} == {f"Seeded {i}" for i in range(SEEDED)}


# -- fast-bitrix24 ---------------------------------------------------------------------------


class TestFastBitrix24:
    @pytest.fixture(params=["/rest/", "/rest/1/anycode/"])
    def bitrix(self, sidecar: Client, request: pytest.FixtureRequest) -> Any:
        """A BitrixAsync client on one of the two webhook shapes."""
        fast_bitrix24 = pytest.importorskip("fast_bitrix24")
        return fast_bitrix24.BitrixAsync(webhook_base(sidecar, request.param), verbose=False)

    async def test_simple_call(self, bitrix: Any, sidecar: Client, emulator: Emulator) -> None:
        """A raw call reaches `profile` as a JSON POST to the lower-cased method address."""
        response = await bitrix.call("profile", raw=True)
        assert response["result"]["ID"] == "1"
        call = emulator.rest_log[-1]
        assert (call.http_method, call.method, call.fmt) == ("POST", "profile", "json")
        assert call.headers["Content-Type"].startswith("application/json")
        assert_sidecar_token(emulator, sidecar)

    async def test_add_and_get_a_lead(
        self, bitrix: Any, sidecar: Client, emulator: Emulator
    ) -> None:
        """crm.lead.add with a nested PHONE list (sent inside a batch) and crm.lead.get."""
        lead_id = await bitrix.call("crm.lead.add", {"fields": LEAD_FIELDS})
        assert emulator.rest_log[-1].method == "batch"
        assert_sidecar_token(emulator, sidecar)
        assert isinstance(lead_id, int)
        assert_is_lead(emulator.leads[lead_id], lead_id)

        # One ID in, the library unwraps the single answer to the lead itself.
        lead = await bitrix.get_by_ID("crm.lead.get", [lead_id])
        assert_sidecar_token(emulator, sidecar)
        assert_is_lead(lead, lead_id)

    async def test_get_all_fetches_every_page(
        self, bitrix: Any, sidecar: Client, emulator: Emulator
    ) -> None:
        """get_all reads the first page, then the other pages by `start` inside a batch."""
        await seed_leads(emulator)
        leads = await bitrix.get_all("crm.lead.list", {"select": ["ID", "TITLE"]})
        assert_all_seeded(leads)
        assert [c.method for c in list(emulator.rest_log)[-2:]] == ["crm.lead.list", "batch"]
        assert_sidecar_token(emulator, sidecar)

    async def test_call_batch(self, bitrix: Any, sidecar: Client, emulator: Emulator) -> None:
        """call_batch with a `$result[]` reference between commands."""
        result = await bitrix.call_batch(
            {
                "halt": 0,
                "cmd": {
                    "add": "crm.lead.add?fields[TITLE]=Batched&fields[PHONE][0][VALUE]=777",
                    "get": "crm.lead.get?id=$result[add]",
                },
            }
        )
        assert result["get"]["ID"] == str(result["add"])
        assert result["get"]["TITLE"] == "Batched"
        assert result["get"]["PHONE"][0]["VALUE"] == "777"
        assert_sidecar_token(emulator, sidecar)

    async def test_rate_limit_503_is_retried(
        self, bitrix: Any, sidecar: Client, emulator: Emulator
    ) -> None:
        """The portal's 503 QUERY_LIMIT_EXCEEDED reaches the library, which backs off, retries."""
        emulator.fail_next_rest(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        response = await bitrix.call("profile", raw=True)
        assert response["result"]["ID"] == "1"
        assert [c.method for c in emulator.rest_log] == ["profile", "profile"]
        assert_sidecar_token(emulator, sidecar)

    async def test_expired_token_is_invisible(
        self, bitrix: Any, sidecar: Client, emulator: Emulator
    ) -> None:
        """An expired token is renewed by the sidecar; the library sees one plain success."""
        emulator.expire_access_tokens()
        lead_id = await bitrix.call("crm.lead.add", {"fields": LEAD_FIELDS})
        assert_is_lead(emulator.leads[lead_id], lead_id)
        assert len(emulator.leads) == 1
        assert emulator.stats.refresh_ok == 1
        assert_sidecar_token(emulator, sidecar)


# -- bitrix24-rest ---------------------------------------------------------------------------


class TestBitrix24Rest:
    @pytest.fixture
    def bitrix(self, sidecar: Client) -> Any:
        """A Bitrix24 client on the /rest/1/anycode/ shape, the only one it accepts."""
        bitrix24 = pytest.importorskip("bitrix24")
        return bitrix24.Bitrix24(webhook_base(sidecar, "/rest/1/anycode/"))

    async def test_plain_rest_base_is_refused_by_the_library(self, sidecar: Client) -> None:
        """The library splits user id and code out of the path, so /rest/ alone cannot work."""
        bitrix24 = pytest.importorskip("bitrix24")
        with pytest.raises(ValueError, match="not enough values"):
            bitrix24.Bitrix24(webhook_base(sidecar, "/rest/"))

    async def test_simple_call(self, bitrix: Any, sidecar: Client, emulator: Emulator) -> None:
        """callMethod sends a GET to {method}.json with parameters in the query."""
        profile = await bitrix.callMethod("profile")
        assert profile["ID"] == "1"
        call = emulator.rest_log[-1]
        assert (call.http_method, call.method, call.fmt) == ("GET", "profile", "json")
        assert_sidecar_token(emulator, sidecar)

    async def test_add_and_get_a_lead(
        self, bitrix: Any, sidecar: Client, emulator: Emulator
    ) -> None:
        """Nested fields go as PHP-style query keys and arrive as a structure."""
        lead_id = await bitrix.callMethod("crm.lead.add", {"fields": LEAD_FIELDS})
        assert emulator.rest_log[-1].http_method == "GET"
        assert_sidecar_token(emulator, sidecar)
        assert_is_lead(emulator.leads[lead_id], lead_id)

        lead = await bitrix.callMethod("crm.lead.get", {"id": lead_id})
        assert_sidecar_token(emulator, sidecar)
        assert_is_lead(lead, lead_id)

    async def test_list_fetches_every_page(
        self, bitrix: Any, sidecar: Client, emulator: Emulator
    ) -> None:
        """callMethod reads `total` and fetches the remaining pages by `start`, concurrently."""
        await seed_leads(emulator)
        leads = await bitrix.callMethod("crm.lead.list", {"select": ["ID", "TITLE"]})
        assert_all_seeded(leads)
        assert [c.method for c in list(emulator.rest_log)[-3:]] == ["crm.lead.list"] * 3
        assert sorted(c.params["start"] for c in list(emulator.rest_log)[-3:]) == ["0", "100", "50"]
        assert_sidecar_token(emulator, sidecar)

    async def test_expired_token_is_invisible(
        self, bitrix: Any, sidecar: Client, emulator: Emulator
    ) -> None:
        """An expired token is renewed by the sidecar; the library sees one plain success."""
        emulator.expire_access_tokens()
        lead_id = await bitrix.callMethod("crm.lead.add", {"fields": LEAD_FIELDS})
        assert_is_lead(emulator.leads[lead_id], lead_id)
        assert len(emulator.leads) == 1
        assert emulator.stats.refresh_ok == 1
        assert_sidecar_token(emulator, sidecar)


# -- b24pysdk --------------------------------------------------------------------------------


@pytest.fixture
async def tls_port(sidecar: Client, certificate: Certificate) -> AsyncIterator[int]:
    """Terminate TLS on a loopback port and relay the plain bytes to the sidecar."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate.cert, certificate.key)
    tasks: set[asyncio.Task[None]] = set()

    async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            side_r, side_w = await asyncio.open_connection("127.0.0.1", sidecar.port)
            await asyncio.gather(pipe(client_r, side_w), pipe(side_r, client_w))
        finally:
            tasks.discard(task)

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()
        await server.wait_closed()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class TestB24PySdk:
    @pytest.fixture
    def client(
        self, tls_port: int, certificate: Certificate, monkeypatch: pytest.MonkeyPatch
    ) -> Any:
        """An official SDK client whose webhook is the sidecar behind the TLS terminator."""
        b24pysdk = pytest.importorskip("b24pysdk")
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate.cert))
        webhook = b24pysdk.BitrixWebhook(domain=f"127.0.0.1:{tls_port}", webhook_token="1/anycode")
        return b24pysdk.Client(webhook, timeout=10, initial_retry_delay=0.05,
                               retry_delay_increment=0)

    async def test_plain_http_is_not_possible(self, sidecar: Client) -> None:
        """The SDK builds https://{domain}/rest/...: it cannot talk to a plain-http listener."""
        b24pysdk = pytest.importorskip("b24pysdk")
        webhook = b24pysdk.BitrixWebhook(domain=f"127.0.0.1:{sidecar.port}",
                                         webhook_token="1/anycode")
        client = b24pysdk.Client(webhook, timeout=5)
        with pytest.raises(b24pysdk.errors.BitrixRequestError, match="SSL"):
            await asyncio.to_thread(lambda: client.profile().result)

    async def test_simple_call(self, client: Any, sidecar: Client, emulator: Emulator) -> None:
        """profile() is a JSON POST to /rest/1/anycode/profile.json."""
        profile = await asyncio.to_thread(lambda: client.profile().result)
        assert profile["ID"] == "1"
        call = emulator.rest_log[-1]
        assert (call.http_method, call.method, call.fmt) == ("POST", "profile", "json")
        assert call.headers["Content-Type"] == "application/json"
        assert_sidecar_token(emulator, sidecar)

    async def test_add_and_get_a_lead(
        self, client: Any, sidecar: Client, emulator: Emulator
    ) -> None:
        """crm.lead.add with nested fields in a JSON body, and crm.lead.get."""
        lead_id = await asyncio.to_thread(lambda: client.crm.lead.add(LEAD_FIELDS).result)
        assert_sidecar_token(emulator, sidecar)
        assert_is_lead(emulator.leads[lead_id], lead_id)

        lead = await asyncio.to_thread(lambda: client.crm.lead.get(lead_id).result)
        assert_sidecar_token(emulator, sidecar)
        assert_is_lead(lead, lead_id)

    async def test_as_list_fetches_every_page(
        self, client: Any, sidecar: Client, emulator: Emulator
    ) -> None:
        """as_list() reads the first page, then the others by `start` in a batch."""
        await seed_leads(emulator)
        leads = await asyncio.to_thread(
            lambda: client.crm.lead.list(select=["ID", "TITLE"]).as_list().result
        )
        assert_all_seeded(leads)
        assert [c.method for c in list(emulator.rest_log)[-2:]] == ["crm.lead.list", "batch"]
        assert_sidecar_token(emulator, sidecar)

    async def test_as_list_fast_fetches_every_page(
        self, client: Any, sidecar: Client, emulator: Emulator
    ) -> None:
        """as_list_fast() pages by ID windows: `>ID` filters chained by `$result[]` in a batch."""
        await seed_leads(emulator)
        leads = await asyncio.to_thread(
            lambda: list(client.crm.lead.list(select=["ID", "TITLE"]).as_list_fast().result)
        )
        assert_all_seeded(leads)
        assert_sidecar_token(emulator, sidecar)

    async def test_call_batch(self, client: Any, sidecar: Client, emulator: Emulator) -> None:
        """call_batch of request objects: cmd a JSON object, halt a JSON boolean."""
        await seed_leads(emulator, 2)

        def run() -> Any:
            return client.call_batch(
                {
                    "add": client.crm.lead.add(LEAD_FIELDS),
                    "one": client.crm.lead.get(1),
                    "two": client.crm.lead.get(2),
                }
            ).result

        batch = await asyncio.to_thread(run)
        lead_id = int(batch.result["add"])
        assert_is_lead(emulator.leads[lead_id], lead_id)
        assert batch.result["one"]["TITLE"] == "Seeded 0"
        assert batch.result["two"]["TITLE"] == "Seeded 1"
        assert not batch.result_error
        call = emulator.rest_log[-1]
        assert call.method == "batch"
        assert call.params["halt"] is False
        assert_sidecar_token(emulator, sidecar)

    async def test_rate_limit_503_is_retried(
        self, client: Any, sidecar: Client, emulator: Emulator
    ) -> None:
        """The portal's 503 QUERY_LIMIT_EXCEEDED reaches the SDK, which waits and retries."""
        emulator.fail_next_rest(503, "QUERY_LIMIT_EXCEEDED", "Too many requests")
        profile = await asyncio.to_thread(lambda: client.profile().result)
        assert profile["ID"] == "1"
        assert [c.method for c in emulator.rest_log] == ["profile", "profile"]
        assert_sidecar_token(emulator, sidecar)

    async def test_expired_token_is_invisible(
        self, client: Any, sidecar: Client, emulator: Emulator
    ) -> None:
        """An expired token is renewed by the sidecar; the SDK sees one plain success."""
        emulator.expire_access_tokens()
        lead_id = await asyncio.to_thread(lambda: client.crm.lead.add(LEAD_FIELDS).result)
        assert_is_lead(emulator.leads[lead_id], lead_id)
        assert len(emulator.leads) == 1
        assert emulator.stats.refresh_ok == 1
        assert_sidecar_token(emulator, sidecar)


# -- with a client key -------------------------------------------------------------------------

CLIENT_KEY = "clientkey_0123456789abcdef01234567"


@pytest.fixture
async def keyed(make_settings: Any, emulator: Emulator, aiohttp_client: Any) -> Client:
    """A sidecar that asks every call for CLIENT_KEY."""
    settings = make_settings(auth_code=emulator.issue_code(CLIENT_ID), client_key=CLIENT_KEY)
    client: Client = await aiohttp_client(create_app(settings, watch_interval=0.05))
    return client


class TestClientKey:
    """A library that takes only a webhook address carries the key as the webhook's code."""

    async def test_bitrix24_rest_with_the_key_as_code(
        self, keyed: Client, emulator: Emulator
    ) -> None:
        """bitrix24-rest on /rest/1/<key>/: served; the portal never sees the key."""
        bitrix24 = pytest.importorskip("bitrix24")
        bitrix = bitrix24.Bitrix24(webhook_base(keyed, f"/rest/1/{CLIENT_KEY}/"))
        lead_id = await bitrix.callMethod("crm.lead.add", {"fields": LEAD_FIELDS})
        assert_is_lead(emulator.leads[lead_id], lead_id)
        assert_sidecar_token(emulator, keyed)
        assert all(CLIENT_KEY not in repr(call) for call in emulator.rest_log)

        wrong = bitrix24.Bitrix24(webhook_base(keyed, "/rest/1/anycode/"))
        with pytest.raises(Exception, match="401"):  # as a wrong webhook code at the portal
            await wrong.callMethod("profile")
        assert len(emulator.rest_log) == 1

    async def test_fast_bitrix24_with_the_key_as_code(
        self, keyed: Client, emulator: Emulator
    ) -> None:
        """fast-bitrix24 on /rest/7/<key>/ (any user id): JSON POSTs and batches served."""
        fast_bitrix24 = pytest.importorskip("fast_bitrix24")
        bitrix = fast_bitrix24.BitrixAsync(webhook_base(keyed, f"/rest/7/{CLIENT_KEY}/"),
                                           verbose=False)
        response = await bitrix.call("profile", raw=True)
        assert response["result"]["ID"] == "1"
        lead_id = await bitrix.call("crm.lead.add", {"fields": LEAD_FIELDS})
        assert_is_lead(emulator.leads[lead_id], lead_id)
        assert_sidecar_token(emulator, keyed)
        assert all(CLIENT_KEY not in repr(call) for call in emulator.rest_log)
