"""Authorization without the 30-second race: the browser callback and Bitrix24's install events."""

from __future__ import annotations

import hashlib
import html
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from sidecar import phpquery
from sidecar.adapter import error_response, expect_continue
from sidecar.admission import Admission
from sidecar.authinfo import authorize_url, code_hint
from sidecar.authorization import Authorization, Consent, replacement_refusal
from sidecar.clientkey import check_peer, loopback_peer
from sidecar.config import Settings
from sidecar.errors import (
    BadRequest,
    BodyTooLarge,
    ClientGone,
    OAuthError,
    Refused,
    SidecarError,
)
from sidecar.grants import (
    InstallWindow,
    install_window,
    link_valid,
    take_install_window,
    take_link,
)
from sidecar.oauth import origin_text, valid_endpoint
from sidecar.rules import HostPolicy, origin_of
from sidecar.storage import UNINSTALLED, PairStore, TokenPair

if TYPE_CHECKING:
    from sidecar.registry import Portal, Portals

STATE_TTL = 600.0
MAX_STATES = 1000  # browser flows started from the pod's loopback
MAX_LINK_STATES = 100  # flows started from the operator's links, kept apart from the others
VERIFY_TIMEOUT = 15.0
COOKIE = "bitrix_sidecar_flow"
INSTALL_MAX_BODY = 64 * 1024  # an install payload is a few KiB
log = structlog.get_logger("sidecar.authflow")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Where:
    """The listener a request to /oauth/ arrived on."""

    policy: HostPolicy
    public: bool  # the OAuth listener, which may be published: nothing starts there unbidden


@dataclass(frozen=True)
class _Start:
    issued: float
    browser: str  # the digest of the cookie the starting browser got
    via: str  # "link" or "loopback"


class Starts:
    """The browser flows under way: each state is bound to the browser that started it.

    Flows started from the operator's links are kept apart, so a flood of starts from the
    pod's loopback cannot push them out.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._books: dict[str, OrderedDict[str, _Start]] = {
            "link": OrderedDict(), "loopback": OrderedDict()}
        self._caps = {"link": MAX_LINK_STATES, "loopback": MAX_STATES}

    def issue(self, via: str) -> tuple[str, str]:
        """Remember a new flow; return its state and the cookie that binds it."""
        self._prune()
        state = secrets.token_urlsafe(24)
        cookie = secrets.token_urlsafe(32)
        book = self._books[via]
        book[state] = _Start(self._clock(), _digest(cookie), via)
        while len(book) > self._caps[via]:
            book.popitem(last=False)
        return state, cookie

    def take(self, state: str, cookie: str) -> _Start:
        """Accept a state once, from the browser it was issued to, within STATE_TTL."""
        self._prune()
        for book in self._books.values():
            start = book.get(state) if state else None
            if start is None:
                continue
            if not cookie or not secrets.compare_digest(_digest(cookie), start.browser):
                # Left in place: a stranger holding the state cannot spend the operator's flow.
                raise Refused(
                    "this callback did not come from the browser that started the flow (its "
                    "cookie is missing or differs): finish in the same browser, at the same "
                    "address the flow started on"
                )
            del book[state]
            return start
        raise Refused(
            "unknown, used or expired state: this callback was not started here (or was "
            "already used); start again"
        )

    def _prune(self) -> None:
        now = self._clock()
        for book in self._books.values():
            while book and now - next(iter(book.values())).issued > STATE_TTL:
                book.popitem(last=False)


# The start page is not to be framed (its button would be clickjacking's target), cached, or
# named in a Referer.
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
START_FORM_MAX = 4096


async def _small_form(request: web.Request) -> Mapping[str, Any]:
    """Read a short urlencoded form (the start button's), or raise BadRequest."""
    if request.content_length is not None and request.content_length > START_FORM_MAX:
        raise BodyTooLarge("the start form is too large")
    body = b""
    try:
        while len(body) <= START_FORM_MAX:  # a read gives what has arrived: read to the end
            chunk = await request.content.read(START_FORM_MAX + 1 - len(body))
            if not chunk:
                break
            body += chunk
    except ConnectionResetError:
        raise ClientGone("the client hung up in the middle of its body") from None
    if len(body) > START_FORM_MAX:
        raise BodyTooLarge("the start form is too large")
    try:
        return dict(parse_qsl(body.decode("ascii"), keep_blank_values=True))
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the start form cannot be read") from None


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()


class AuthFlow:
    """Serve ``/oauth/start``, ``/oauth/callback`` and ``/oauth/install``.

    Only the operator changes whose authorization is held: a browser flow starts from the
    pod's loopback or from a one-time link the CLI makes, its state is bound to that browser
    by a cookie, and an install replaces a working pair only with the stored application
    token (same member, same user) or inside an install window the operator opened.
    """

    def __init__(
        self,
        settings: Settings,
        tokens: Authorization | None,
        store: PairStore,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.monotonic,
        checks: Admission | None = None,
        portals: Portals | None = None,
    ) -> None:
        self._settings = settings
        self._checks = checks or Admission()  # app.info calls unauthenticated requests start
        self._single = tokens  # None in marketplace mode
        self._portals = portals
        self._store = store
        self._session = session
        self._starts = Starts(clock)
        self._portal_host = urlsplit(settings.portal).netloc.lower()
        self._portal_origins = frozenset({origin_of(settings.portal)})

    def add_routes(
        self, app: web.Application, where: Where,
        wrap: Callable[[Handler], Handler] = lambda handler: handler,
    ) -> None:
        """Register the three endpoints (before any catch-all) for the listener ``where``."""

        async def start_page(request: web.Request) -> web.StreamResponse:
            return await self.start_page(request, where)

        async def start(request: web.Request) -> web.StreamResponse:
            return await self.start(request, where)

        async def callback(request: web.Request) -> web.StreamResponse:
            return await self.callback(request, where)

        async def install(request: web.Request) -> web.StreamResponse:
            return await self.install(request, where)

        app.router.add_get("/oauth/start", wrap(start_page), allow_head=False,
                           expect_handler=expect_continue)
        app.router.add_post("/oauth/start", wrap(start), expect_handler=expect_continue)
        app.router.add_get("/oauth/callback", wrap(callback), allow_head=False,
                           expect_handler=expect_continue)
        app.router.add_post("/oauth/install", wrap(install), expect_handler=expect_continue)

    def _check(self, request: web.Request, where: Where, *, navigation: bool = False,
               trusted_origins: frozenset[str] = frozenset()) -> None:
        """The listener's Host, Origin and Sec-Fetch checks; on the proxy listener, also no
        loopback Host from another machine."""
        where.policy.check(request.headers, request.host, navigation=navigation,
                           trusted_origins=trusted_origins)
        if not where.public:
            check_peer(request.host, request.remote or "")

    # -- the browser callback ----------------------------------------------------------------

    async def start_page(self, request: web.Request, where: Where) -> web.Response:
        """Show the button that starts the flow; a GET changes nothing.

        Link scanners (chat previews, mail filters) fetch a link before the person does, and a
        page elsewhere can send a browser here: neither uses up a link or starts a flow.
        """
        try:
            # Any site may link here (the operator's link pasted in a chat, say).
            self._check(request, where, navigation=True)
            self._one_portal()
            link = request.query.get("link", "")
            await self._may_start(request, where, link, use=False)
        except SidecarError as exc:
            log.warning("oauth_start_refused", error=exc.code, description=exc.description)
            return error_response(exc)
        hidden = (f'<input type="hidden" name="link" value="{html.escape(link)}">' if link
                  else "")
        return web.Response(
            text=_page(
                "Authorize bitrix-sidecar",
                f"<p>This lets bitrix-sidecar act for the app on "
                f"{html.escape(self._settings.portal)} as the portal user you are signed in as."
                f"</p><form method='post' action='/oauth/start'>{hidden}"
                "<button type='submit'>Continue to Bitrix24</button></form>",
            ),
            content_type="text/html", headers=_PAGE_HEADERS,
        )

    async def start(self, request: web.Request, where: Where) -> web.Response:
        """Start the flow, posted from the start page: bind a fresh state to this browser and
        send it to the portal's approval page."""
        try:
            self._check(request, where)
            self._one_portal()
            # Posted by our own page only: no other site can press the button for the operator.
            origin = origin_of(request.headers.get("Origin", ""))
            if origin not in {f"http://{request.host}".lower(),
                              f"https://{request.host}".lower()}:
                raise Refused("the flow starts only from its own page (/oauth/start)")
            form = await _small_form(request)
            link = str(form.get("link", ""))
            via = await self._may_start(request, where, link, use=True)
        except SidecarError as exc:
            log.warning("oauth_start_refused", error=exc.code, description=exc.description)
            return error_response(exc)
        state, cookie = self._starts.issue(via)
        log.info("oauth_started", via=via)
        response = web.Response(
            status=303,
            headers={"Location": authorize_url(self._settings, state), **_PAGE_HEADERS},
        )
        # Lax: the portal's redirect back is a top-level navigation from its site. Secure where
        # the flow runs on https (a Secure cookie set over plain http is dropped by browsers).
        response.set_cookie(COOKIE, cookie, max_age=int(STATE_TTL), path="/oauth/callback",
                            httponly=True, samesite="Lax",
                            secure=where.public and self._settings.public_url.startswith(
                                "https:"))
        return response

    async def _may_start(self, request: web.Request, where: Where, link: str, *,
                         use: bool) -> str:
        """Say how this flow may start ("link" or "loopback"), or raise Refused."""
        if link:
            ok = (await take_link(self._store, link) if use
                  else await link_valid(self._store, link))
            if not ok:
                raise Refused(
                    "this start link is unknown, used or expired (a link works once, for "
                    "10 minutes): make a new one with 'bitrix-sidecar authorize-link'"
                )
            return "link"
        if where.public or not loopback_peer(request.remote or ""):
            raise Refused(
                "a browser flow starts here only from the operator's one-time link: run "
                "'bitrix-sidecar authorize-link' beside the sidecar and open the address "
                "it prints"
            )
        return "loopback"

    async def callback(self, request: web.Request, where: Where) -> web.Response:
        """Check the state and its browser, exchange the code at once, say what is authorized."""
        query = request.query
        try:
            self._check(request, where, navigation=True)
            if query.get("error"):
                raise BadRequest(
                    f"the portal answered {query['error']}: "
                    f"{query.get('error_description', 'the app was not approved')}"
                )
            self._starts.take(query.get("state", ""), request.cookies.get(COOKIE, ""))
            code = query.get("code", "")
            if not code:
                raise BadRequest("the callback carries no code")
            self._check_domain(query.get("domain", ""))
            if self._single is None:
                assert self._portals is not None
                previous = None
                pair = await self._portals.authorize(code, trigger="callback")
            else:
                previous = self._single.pair
                pair = await self._single.authorize(code, trigger="callback")
        except OAuthError as exc:
            return error_response(BadRequest(f"{exc.description}{code_hint(exc, self._settings)}"))
        except SidecarError as exc:
            log.warning("oauth_callback_refused", error=exc.code, description=exc.description)
            return error_response(exc)
        response = web.Response(text=self._success_page(pair, previous), content_type="text/html",
                                headers={"Cache-Control": "no-store"})
        response.del_cookie(COOKIE, path="/oauth/callback")
        return response

    def _one_portal(self) -> None:
        """Refuse the browser flow in marketplace mode: it names no portal to approve on."""
        if self._single is None:
            raise BadRequest(
                "in marketplace mode portals are added by installing the app on them; to "
                "authorize one as the operator, open the address 'bitrix-sidecar authorize-url "
                "--portal HOST' prints and run 'bitrix-sidecar authorize <the redirect address>'")

    def _check_domain(self, domain: str) -> None:
        if self._single is None:
            if domain and not any(self._settings.portals.allows(f"{scheme}://{domain}")
                                  for scheme in ("https", "http")):
                raise Refused(f"the authorization came from {domain}, which BITRIX_PORTAL does "
                              "not allow")
            return
        if domain and domain.lower() != self._portal_host:
            raise Refused(
                f"the authorization came from {domain}, but BITRIX_PORTAL is "
                f"{self._portal_host}"
            )

    def _success_page(self, pair: TokenPair, previous: TokenPair | None) -> str:
        rows = {
            "Portal": self._settings.portal,
            "Member": pair.member_id,
            "User": pair.user_id,
            "Scope": pair.scope,
            "Access token valid until": _utc(pair.expires_at),
        }
        table = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows.items()
        )
        note = ""
        if previous is not None and previous.user_id != pair.user_id:
            note = (f"<p><strong>The app now acts as user {html.escape(pair.user_id)}; it "
                    f"acted as user {html.escape(previous.user_id or '(unknown)')}.</strong></p>")
        return _page(
            "bitrix-sidecar is authorized",
            f"<p>bitrix-sidecar now holds a token pair and renews it by itself.</p>{note}"
            f"<table>{table}</table><p>You can close this page.</p>",
        )

    # -- install events ----------------------------------------------------------------------

    async def install(self, request: web.Request, where: Where) -> web.Response:
        """Take a pair from ONAPPINSTALL or a UI app's install POST, after checking it."""
        try:
            # The portal's own install page may post here from its site; no other page may.
            self._check(request, where, trusted_origins=self._portal_origins)
            # An install payload is a few KiB, on every listener (the proxy listener's own
            # limit, SIDECAR_MAX_BODY, is for REST calls).
            if request.content_length is not None and request.content_length > INSTALL_MAX_BODY:
                raise BodyTooLarge(
                    f"the install payload is over {INSTALL_MAX_BODY // 1024} KiB")
            request = request.clone(client_max_size=INSTALL_MAX_BODY)
            try:
                form = await request.post()
            except web.HTTPRequestEntityTooLarge:
                raise BodyTooLarge("the install payload is too large") from None
            except (ValueError, LookupError, HttpProcessingError, RequestPayloadError):
                # Bad framing, a bogus charset, invalid UTF-8, a broken multipart body.
                raise BadRequest("the install payload cannot be read as a form") from None
            except ConnectionResetError:
                raise ClientGone("the client hung up in the middle of its body") from None
            data = phpquery.parse(
                [(k, v) for k, v in form.items() if isinstance(v, str)]
                + [(k, v) for k, v in request.query.items()]
            )
            if isinstance(data.get("auth"), dict) and data.get("event"):
                site = request.headers.get("Sec-Fetch-Site", "").strip().lower()
                if request.headers.get("Origin") or site in ("cross-site", "same-site"):
                    # The portal posts events server to server; a browser never does.
                    raise Refused("an install event from a browser page is refused")
                return await self._event(str(data["event"]).upper(), data["auth"])
            if data.get("AUTH_ID") and data.get("REFRESH_ID"):
                return await self._ui_install(data)
            raise BadRequest(
                "not an install event: expected ONAPPINSTALL (event, auth[...]) or an install "
                "page POST (AUTH_ID, REFRESH_ID, member_id)"
            )
        except SidecarError as exc:
            log.warning("install_refused", error=exc.code, description=exc.description)
            return error_response(exc)

    def _proven(self, given: str, tokens: Authorization) -> bool:
        """Say whether ``given`` is the application token stored from a real install."""
        held = tokens.pair
        expected = held.application_token if held is not None else ""
        return bool(expected) and secrets.compare_digest(given.encode(), expected.encode())

    async def _event(self, event: str, auth: Mapping[str, Any]) -> web.Response:
        given = str(auth.get("application_token") or "")
        if event != "ONAPPINSTALL":
            # Only a token stored from a real install vouches for other events: an uninstall
            # would otherwise be anyone's to send.
            portal = self._portal_of(auth)
            tokens = portal.tokens if portal is not None else self._single
            if not (tokens is not None and tokens.working() and self._proven(given, tokens)):
                raise Refused(
                    f"{event} is accepted only with the application_token of the install "
                    "that holds the working authorization"
                )
            if event == "ONAPPUNINSTALL" and portal is not None and self._portals is not None:
                await portal.tokens.forget(f"{UNINSTALLED} the app was removed from the portal")
                await self._portals.remove(portal, uninstalled=True)
            elif event == "ONAPPUNINSTALL":
                await tokens.revoke("the app was uninstalled from the portal")
            else:
                log.info("install_event_ignored", install_event=event)
            return web.json_response({"result": True})
        pair = TokenPair(
            access_token=str(auth.get("access_token") or ""),
            refresh_token=str(auth.get("refresh_token") or ""),
            expires_at=time.time() + _seconds(auth.get("expires_in"), 3600),
            scope=str(auth.get("scope") or ""),
            member_id=str(auth.get("member_id") or ""),
            client_endpoint=valid_endpoint(auth.get("client_endpoint")),
            server_endpoint=valid_endpoint(auth.get("server_endpoint")),
            domain=str(auth.get("domain") or ""),
            user_id=str(auth.get("user_id") or ""),
            status=str(auth.get("status") or ""),
            application_token=given,
            obtained_at=time.time(),
        )
        await self._accept(pair, trigger="install_event", proof=given)
        return web.json_response({"result": True})

    async def _ui_install(self, data: Mapping[str, Any]) -> web.Response:
        domain = str(data.get("DOMAIN") or "")
        scheme = "http" if str(data.get("PROTOCOL", "1")) == "0" else "https"
        pair = TokenPair(
            access_token=str(data["AUTH_ID"]),
            refresh_token=str(data["REFRESH_ID"]),
            expires_at=time.time() + _seconds(data.get("AUTH_EXPIRES"), 3600),
            member_id=str(data.get("member_id") or ""),
            client_endpoint=valid_endpoint(f"{scheme}://{domain}/rest/") if domain else "",
            domain=domain,
            status=str(data.get("status") or ""),
            obtained_at=time.time(),
        )
        # The portal's install page carries no application token; an app's own page that
        # forwards one proves it like an event does.
        given = str(data.get("application_token") or data.get("APPLICATION_TOKEN") or "")
        await self._accept(pair, trigger="install_page", proof=given)
        # The portal's install page waits for this call before it calls the app installed.
        return web.Response(
            text=_page(
                "bitrix-sidecar is installed",
                "<p>bitrix-sidecar now holds a token pair for this portal.</p>"
                '<script src="https://api.bitrix24.com/api/v1/"></script>'
                "<script>BX24.init(function(){BX24.installFinish();});</script>",
            ),
            content_type="text/html",
        )

    def _portal_of(self, auth: Mapping[str, Any]) -> Portal | None:
        """In marketplace mode, the held portal an event names by its member_id (or None)."""
        if self._portals is None or self._single is not None:
            return None
        member_id = str(auth.get("member_id") or "").lower()
        return self._portals.find(member_id) if member_id else None

    async def _consent(self, proof: str,
                       tokens: Authorization) -> tuple[Consent, InstallWindow | None]:
        """Who stands behind an install: nobody (no working pair held), the stored application
        token, or the operator's open install window; refuse before the portal is asked."""
        if not tokens.working():
            return Consent.NONE, None
        if self._proven(proof, tokens):
            return Consent.APPLICATION_TOKEN, None
        window = await install_window(self._store)
        if window is None:
            raise Refused(replacement_refusal(
                tokens.pair, True, TokenPair("", "", 0.0), Consent.NONE))
        return Consent.OPERATOR, window

    def _held_for(self, pair: TokenPair) -> Authorization | None:
        """The authorization an install's pair is for: the single portal's, the held portal's
        with its member_id, or None for a portal not held yet (marketplace mode)."""
        if self._single is not None:
            return self._single
        assert self._portals is not None
        if not self._settings.portals.allows(pair.client_endpoint):
            raise Refused(f"the portal {origin_text(pair.client_endpoint)} is not among those "
                          "BITRIX_PORTAL allows")
        portal = self._portals.find(pair.member_id.lower()) if pair.member_id else None
        if not pair.member_id:
            raise BadRequest("the install payload names no member_id")
        return portal.tokens if portal is not None else None

    async def _accept(self, pair: TokenPair, *, trigger: str, proof: str) -> None:
        """Refuse a pair for another portal or member, or one the portal does not accept."""
        if not pair.access_token or not pair.refresh_token:
            raise BadRequest("the install payload carries no token pair")
        if not pair.client_endpoint:
            raise BadRequest("the install payload names no usable client_endpoint")
        tokens = self._held_for(pair)
        if tokens is not None:
            tokens.check_portal(pair)
            consent, window = await self._consent(proof, tokens)
        else:
            consent, window = Consent.NONE, None
        async with self._checks.slot():
            scope, user_id = await self._verify(pair)
        # The portal says whose token it is and what it may do; the payload's word is not taken.
        pair = replace(pair, scope=scope or pair.scope, user_id=user_id)
        adopted: Portal | None = None
        built = False
        if tokens is None:
            assert self._portals is not None
            # A portal not held yet: its member_id is the OAuth server's word, not the payload's.
            pair = await self._portals.confirm(pair)
            adopted, built = await self._portals.adopt(pair)
            tokens = adopted.tokens
        try:
            await self._install(pair, tokens, consent, window, trigger=trigger, proof=proof)
        except BaseException:
            # Only the install that built the bundle drops it (a replay of the same event
            # running beside it may be the one whose pair is being stored).
            if built and adopted is not None and adopted.tokens.pair is None:
                assert self._portals is not None
                await self._portals.remove(adopted)
            raise
        if adopted is not None and self._portals is not None:
            # A portal held by nobody before, now by this install (taken while none is held).
            self._portals.renamed(adopted)
            self._portals.added(pair, trigger)

    async def _install(self, pair: TokenPair, tokens: Authorization, consent: Consent,
                       window: InstallWindow | None, *, trigger: str, proof: str) -> None:
        """Store an install's verified pair through its authorization."""
        tokens.check_portal(pair)
        tokens.check_replacement(pair, consent, proof)
        held = tokens.pair
        if held is not None and held.application_token and not pair.application_token:
            pair = replace(pair, application_token=held.application_token)
        if window is not None:
            if not window.admits(pair.user_id):
                raise Refused(
                    f"the install window is for user {window.user_id}, this install is for "
                    f"user {pair.user_id or '(unknown)'}"
                )
            if await take_install_window(self._store) is None:
                raise Refused("the install window was closed or used meanwhile")
            log.warning("install_window_used", user_id=pair.user_id)
        await tokens.install(pair, trigger=trigger, consent=consent, proof=proof)

    async def _verify(self, pair: TokenPair) -> tuple[str, str]:
        """Ask the portal with the new token: only a token the portal accepts is stored.

        ``app.info`` must name our client id; ``profile`` says which user the token acts as.
        Returns the granted scope (comma separated) and the user id, where the portal tells.
        """
        info = await self._ask(pair, "app.info")
        if not isinstance(info, dict):
            raise Refused("the portal does not accept the token in the payload")
        code = info.get("CODE")
        # A local app's code is its client id; a marketplace app's is its vendor code
        # ("vendor.app"), which the client id ("app.…") does not show: it must be there.
        local = self._settings.client_id.startswith("local.")
        if not isinstance(code, str) or not code or (local and code != self._settings.client_id):
            raise Refused("the portal does not confirm the token is this application's")
        scope = info.get("SCOPE")
        profile = await self._ask(pair, "profile")
        user = profile.get("ID") if isinstance(profile, dict) else None
        if not isinstance(user, (str, int)) or not str(user).strip():
            # Never the payload's user_id instead: the same-user rule rests on this answer.
            raise Refused("the portal did not say which user the token acts as")
        return (",".join(str(s) for s in scope) if isinstance(scope, list) else "",
                str(user).strip())

    async def _ask(self, pair: TokenPair, method: str) -> Any:
        url = f"{pair.client_endpoint}{method}"
        try:
            async with self._session.post(
                url, data={"auth": pair.access_token}, allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=VERIFY_TIMEOUT),
            ) as response:
                body = await response.json(content_type=None)
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError, ValueError):
            raise Refused("the portal could not be asked to confirm the token") from None
        return body.get("result") if ok and isinstance(body, dict) else None


def _seconds(value: Any, default: float) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return default
    return seconds if 0 < seconds < 86400 * 2 else default


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(timestamp))


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
        f"{body}</body></html>"
    )


