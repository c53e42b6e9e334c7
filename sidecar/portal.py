"""What the portal is to the proxy: where a call goes (its address, token attached) and what a
refusal of the portal's means (auth error, rate limit, time limit), read from its answer."""

from __future__ import annotations

import json
import re
import time
import zlib
from dataclasses import dataclass

from sidecar.errors import SidecarError, UpstreamError, UpstreamTimeout
from sidecar.portalwire import PortalConnectionError
from sidecar.storage import TokenPair
from sidecar.upstream import Origin

# 401 answers with these errors are cured by a fresh token.
REFRESHABLE = frozenset({"expired_token", "invalid_token"})
# How long a method blocked by OPERATION_TIME_LIMIT rests when the answer does not say.
DEFAULT_PAUSE = 60.0
_XML_ERROR_RE = re.compile(rb"<error>\s*([A-Za-z_]+)\s*</error>")


class Addresses:
    """Turn a pair and a method into the portal's origin and the raw path, token attached."""

    def __init__(self, rest_base: str) -> None:
        self._rest_base = rest_base
        self._origins: dict[str, Origin] = {}

    def target(self, pair: TokenPair, method: str, suffix: str, query: str, *,
               api: bool = False) -> tuple[Origin, str]:
        """Where the call goes: the portal's origin and the raw path with the token added
        (``api``: a REST 3.0 path, the token left to the body)."""
        base = pair.client_endpoint or self._rest_base
        origin = self._origins.get(base)
        if origin is None:
            try:
                origin = Origin.parse(base)
            except ValueError:
                raise UpstreamError("the portal's REST address is not an http(s) "
                                    "address") from None
            if len(self._origins) > 8:  # the address changes only when a portal is renamed
                self._origins.clear()
            self._origins[base] = origin
        if api:  # REST 3.0 reads no parameters from the query: the token goes in the body
            path = f"{origin.base_path}api/{method}"
            return origin, f"{path}?{query}" if query else path
        auth = f"auth={pair.access_token}"
        path = f"{origin.base_path}{method}{suffix}?{query}&{auth}" if query \
            else f"{origin.base_path}{method}{suffix}?{auth}"
        return origin, path


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer the proxy reads before relaying it (a 401, 429 or 503)."""

    status: int
    payload: bytes
    encoding: str
    error: str | None  # the REST error code; None: not a REST answer (a proxy's page)

    @classmethod
    def read(cls, status: int, payload: bytes, encoding: str) -> Refusal:
        """Classify an answer."""
        return cls(status, payload, encoding, error_code(payload, encoding))

    @property
    def auth_error(self) -> bool:
        """The token is expired or invalid: a fresh one cures it.

        REST 3.0's code for it is undocumented: any code that ends so (``expired_token``,
        ``..._EXPIREDTOKENEXCEPTION``) counts.
        """
        if self.status != 401 or self.error is None:
            return False
        if self.error in REFRESHABLE:
            return True
        bare = self.error.lower().replace("_", "").removesuffix("exception")
        return bare.endswith(("expiredtoken", "invalidtoken"))

    @property
    def rate_limited(self) -> bool:
        """The portal's bucket is full: the call did not run."""
        return self.status == 503 and self.error == "QUERY_LIMIT_EXCEEDED"

    @property
    def time_limited(self) -> bool:
        """The method used up its time budget: it is blocked for a while."""
        return self.status == 429 and self.error == "OPERATION_TIME_LIMIT"


def plain(payload: bytes, encoding: str) -> bytes:
    """Return a body decompressed (gzip or deflate), as our own checks need it."""
    if encoding.strip().lower() in ("gzip", "deflate", "x-gzip"):
        # wbits=47 accepts gzip and zlib headers alike; the cap bounds a zip bomb.
        return zlib.decompressobj(wbits=47).decompress(payload, 1 << 20)
    return payload


def error_code(payload: bytes, encoding: str) -> str | None:
    """Return the ``error`` of a REST error body: JSON or XML, compressed or not."""
    try:
        payload = plain(payload, encoding)
        if payload.lstrip().startswith(b"<"):
            match = _XML_ERROR_RE.search(payload)
            return match.group(1).decode("latin-1") if match else None
        data = json.loads(payload)
    except (ValueError, zlib.error):
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):  # REST 3.0: {"error": {"code": ..., "message": ...}}
        error = error.get("code")
    return error if isinstance(error, str) else None


def reset_in(payload: bytes, encoding: str) -> float:
    """Seconds until a method blocked by OPERATION_TIME_LIMIT is allowed again."""
    try:
        data = json.loads(plain(payload, encoding))
        reset = float(data["time"]["operating_reset_at"])
    except (ValueError, TypeError, KeyError, zlib.error):
        return DEFAULT_PAUSE
    # The reset time is whole seconds: a second more makes sure the block has lifted.
    return min(max(reset - time.time() + 1.0, 1.0), 600.0)


def network_failure(exc: TimeoutError | PortalConnectionError, time_limit: float,
                    what: str = "") -> tuple[str, SidecarError]:
    """Turn the portal client's failure into its metric label and the sidecar's error."""
    if isinstance(exc, TimeoutError):
        return "timeout", UpstreamTimeout(
            f"the portal did not answer {what}within {time_limit:g} s")
    return "unreachable", UpstreamError(f"the portal is unreachable: {exc}")
